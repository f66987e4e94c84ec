//! Server-Sent Events: event encoding and the `Last-Event-ID` position format.
//!
//! A publication is one event, encoded once and shared by every SSE subscriber:
//!
//! ```text
//! event: pub
//! data: {"channel":"C","offset":N,"data":<json>}
//! ```
//!
//! The `id:` line is per stream, written in front of each event by the stream's writer: it
//! holds the stream's position on *every* channel of the stream, so that the browser's
//! `Last-Event-ID` (which remembers only the last id) lets the server resume all of them.
//!
//! Id format: entries separated by `;`, each `channel~epoch~offset` for a channel with history,
//! or just `channel` for one without (`~` and `;` never occur in channel names or epochs):
//!
//! ```
//! use herald_protocol::sse::{encode_event_id, parse_event_id};
//! let id = encode_event_id([("news", None), ("market:A", Some(("e1", 42)))]);
//! assert_eq!(id, "news;market:A~e1~42");
//! let positions = parse_event_id(&id);
//! assert_eq!(positions["market:A"].as_ref().map(|p| p.offset), Some(42));
//! assert!(positions["news"].is_none());
//! ```

use std::collections::HashMap;

use crate::command::StreamPosition;
use crate::push::{write_publication, write_str, write_u64};

/// A comment line keeping the stream (and proxies) alive.
pub const PING: &[u8] = b": ping\n\n";

/// `event: pub` with the publication as `data:`, ending with the blank line.
pub fn encode_pub_event(channel: &str, offset: Option<u64>, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + channel.len() + data.len());
    out.extend_from_slice(b"event: pub\ndata: ");
    write_publication(&mut out, channel, offset, data);
    out.extend_from_slice(b"\n\n");
    out
}

/// `event: reset` naming the channels whose missed publications cannot be recovered.
pub fn encode_reset_event<'a>(channels: impl IntoIterator<Item = &'a str>) -> Vec<u8> {
    let mut out = b"event: reset\ndata: {\"channels\":[".to_vec();
    for (i, c) in channels.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_str(&mut out, c);
    }
    out.extend_from_slice(b"]}\n\n");
    out
}

/// `event: disconnect`: the server ends the stream (the browser reconnects by itself).
pub fn encode_disconnect_event(code: u16, reason: &str, reconnect: bool) -> Vec<u8> {
    let mut out = b"event: disconnect\ndata: {\"code\":".to_vec();
    write_u64(&mut out, u64::from(code));
    out.extend_from_slice(b",\"reason\":");
    write_str(&mut out, reason);
    out.extend_from_slice(if reconnect {
        b",\"reconnect\":true}\n\n"
    } else {
        b",\"reconnect\":false}\n\n"
    });
    out
}

/// Encodes the stream's positions as an event id (see the module docs).
pub fn encode_event_id<'a>(
    positions: impl IntoIterator<Item = (&'a str, Option<(&'a str, u64)>)>,
) -> String {
    let mut out = String::new();
    for (i, (channel, position)) in positions.into_iter().enumerate() {
        if i > 0 {
            out.push(';');
        }
        out.push_str(channel);
        if let Some((epoch, offset)) = position {
            out.push('~');
            out.push_str(epoch);
            out.push('~');
            out.push_str(itoa::Buffer::new().format(offset));
        }
    }
    out
}

/// Parses an event id into channel -> position (`None`: mentioned, without history). Malformed
/// entries are skipped: a client can only lose recovery by sending garbage, never break the
/// stream.
pub fn parse_event_id(id: &str) -> HashMap<String, Option<StreamPosition>> {
    let mut out = HashMap::new();
    for entry in id.split(';') {
        let mut parts = entry.split('~');
        let channel = parts.next().unwrap_or_default().trim();
        if channel.is_empty() || crate::channel::ChannelName::validate(channel).is_err() {
            continue;
        }
        match (parts.next(), parts.next(), parts.next()) {
            (None, _, _) => {
                out.insert(channel.to_string(), None);
            }
            (Some(epoch), Some(offset), None) if !epoch.is_empty() => {
                if let Ok(offset) = offset.parse::<u64>() {
                    out.insert(
                        channel.to_string(),
                        Some(StreamPosition { offset, epoch: epoch.to_string() }),
                    );
                }
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn pub_event_is_one_data_line() {
        let e = encode_pub_event("a", Some(3), b"{\n\"x\":\r1}");
        assert_eq!(
            e,
            b"event: pub\ndata: {\"channel\":\"a\",\"offset\":3,\"data\":{ \"x\": 1}}\n\n"
        );
        let e = encode_pub_event("a", None, b"1");
        assert_eq!(e, b"event: pub\ndata: {\"channel\":\"a\",\"data\":1}\n\n");
    }

    #[test]
    fn reset_and_disconnect_events() {
        assert_eq!(
            encode_reset_event(["a", "b:c"]),
            b"event: reset\ndata: {\"channels\":[\"a\",\"b:c\"]}\n\n"
        );
        assert_eq!(
            encode_disconnect_event(4008, "slow consumer", true),
            b"event: disconnect\ndata: {\"code\":4008,\"reason\":\"slow consumer\",\"reconnect\":true}\n\n"
        );
    }

    #[test]
    fn malformed_ids_are_skipped() {
        let p = parse_event_id("a~e~1;b~~2;c~e~x;d~e~1~2;bad name;;e");
        assert_eq!(p.len(), 2);
        assert_eq!(p["a"], Some(StreamPosition { offset: 1, epoch: "e".into() }));
        assert_eq!(p["e"], None);
    }

    proptest! {
        #[test]
        fn ids_roundtrip(entries in proptest::collection::btree_map(
            "[A-Za-z0-9_.:@/=#,-]{1,20}",
            proptest::option::of(("[a-z0-9]{1,8}", any::<u64>())),
            0..10,
        )) {
            let id = encode_event_id(entries.iter().map(|(c, p)| (c.as_str(), p.as_ref().map(|(e, o)| (e.as_str(), *o)))));
            prop_assert!(!id.contains('\n') && !id.contains('\r') && !id.contains('\0'));
            let parsed = parse_event_id(&id);
            prop_assert_eq!(parsed.len(), entries.len());
            for (c, p) in &entries {
                let got = parsed[c].as_ref().map(|s| (s.epoch.clone(), s.offset));
                prop_assert_eq!(got, p.clone());
            }
        }
    }
}
