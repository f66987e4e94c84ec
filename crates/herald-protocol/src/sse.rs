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
//! # Id format
//!
//! The id names channels by their place in the stream's own `channel=` list (which a resuming
//! `EventSource` repeats: it reconnects to the same URL), so its size does not grow with channel
//! names: `~` then one entry per channel, in the stream's order, separated by `;`. An entry is
//! empty for a channel without history, else an 8-character [`position_tag`] (a hash of the
//! channel name and its epoch, in base64url) followed by the offset in decimal. An entry is at
//! most [`ID_BYTES_PER_CHANNEL`] bytes with its separator, whatever the channel's name or epoch.
//!
//! ```
//! use herald_protocol::sse::{encode_event_id, parse_event_id, position_tag, EventId, IdEntry};
//! let id = encode_event_id([None, Some(("market:A", "e1", 42))]);
//! let tag = position_tag("market:A", "e1");
//! assert_eq!(id, format!("~;{}42", std::str::from_utf8(&tag).unwrap()));
//! let EventId::Indexed(entries) = parse_event_id(&id, 2) else { unreachable!() };
//! assert_eq!(entries[0], IdEntry::NoHistory);
//! assert_eq!(entries[1], IdEntry::At { tag, offset: 42 });
//! ```
//!
//! The older named form (`channel~epoch~offset` or `channel`, joined by `;`) is still parsed,
//! so ids handed out before the compact form resume as before.

use std::collections::HashMap;

use crate::command::StreamPosition;
use crate::push::{write_publication, write_str, write_u64};

/// Most bytes one channel adds to an event id: the `;` separator, the 8-character tag and the
/// offset (at most 20 digits).
pub const ID_BYTES_PER_CHANNEL: usize = 1 + TAG_LEN + 20;

/// Length of a [`position_tag`].
pub const TAG_LEN: usize = 8;

/// Most bytes of the `id: ...\n` line of a stream of `channels` channels.
pub const fn id_line_bound(channels: usize) -> usize {
    // "id: " + "~" + entries + "\n" (the first entry has no separator: one byte to spare).
    4 + 1 + channels * ID_BYTES_PER_CHANNEL + 1
}

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

/// A stream's position on one channel in an [`EventId`], as parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdEntry {
    /// The entry is malformed: the channel counts as not mentioned (subscribed live).
    Unknown,
    /// The channel keeps no history: mentioned, but nothing can be recovered.
    NoHistory,
    /// At `offset` in the epoch whose [`position_tag`] (with the channel's name) is `tag`.
    At {
        /// [`position_tag`] of the channel and its epoch.
        tag: [u8; TAG_LEN],
        /// The offset of the last publication the stream delivered.
        offset: u64,
    },
}

/// A parsed event id (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventId {
    /// The compact form: entry `i` positions the stream's `i`-th channel.
    Indexed(Vec<IdEntry>),
    /// The older named form: channel -> position (`None`: mentioned, without history).
    Named(HashMap<String, Option<StreamPosition>>),
}

impl Default for EventId {
    fn default() -> Self {
        EventId::Named(HashMap::new())
    }
}

/// The 8-character tag of `epoch` on `channel`: 48 bits of a hash of both, in base64url. A
/// resumed entry counts only where the tag matches the channel's current epoch, so an id used
/// with another channel list or after an epoch change is never taken for a valid position.
pub fn position_tag(channel: &str, epoch: &str) -> [u8; TAG_LEN] {
    // FNV-1a over both (0xff never occurs in either), then a 64-bit finaliser (splitmix64).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in channel.as_bytes().iter().chain(&[0xff]).chain(epoch.as_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut tag = [0u8; TAG_LEN];
    for (i, t) in tag.iter_mut().enumerate() {
        *t = ALPHABET[((h >> (58 - 6 * i)) & 63) as usize];
    }
    tag
}

/// Encodes a stream's positions as an event id, one entry per channel in the stream's order:
/// `(channel, epoch, offset)` for a channel with history, `None` for one without.
pub fn encode_event_id<'a>(
    positions: impl IntoIterator<Item = Option<(&'a str, &'a str, u64)>>,
) -> String {
    let mut out = String::from("~");
    for (i, position) in positions.into_iter().enumerate() {
        if i > 0 {
            out.push(';');
        }
        if let Some((channel, epoch, offset)) = position {
            push_entry(&mut out, &position_tag(channel, epoch), offset);
        }
    }
    out
}

/// Appends one entry of the compact form (a tag and an offset).
pub fn push_entry(out: &mut String, tag: &[u8; TAG_LEN], offset: u64) {
    // The tag is base64url: ASCII.
    out.extend(tag.iter().map(|&b| b as char));
    out.push_str(itoa::Buffer::new().format(offset));
}

/// Parses an event id of either form; `channels` caps the entries of the compact form that are
/// looked at (the stream's channel count). Malformed entries are [`IdEntry::Unknown`] (compact)
/// or skipped (named): a client can only lose recovery by sending garbage, never break the
/// stream.
pub fn parse_event_id(id: &str, channels: usize) -> EventId {
    let id = id.trim();
    if let Some(entries) = id.strip_prefix('~') {
        return EventId::Indexed(entries.split(';').take(channels).map(parse_entry).collect());
    }
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
    EventId::Named(out)
}

fn parse_entry(entry: &str) -> IdEntry {
    if entry.is_empty() {
        return IdEntry::NoHistory;
    }
    let (Some(tag), Some(offset)) = (entry.get(..TAG_LEN), entry.get(TAG_LEN..)) else {
        return IdEntry::Unknown;
    };
    let is_tag_char = |b: &u8| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_';
    let digits = !offset.is_empty() && offset.bytes().all(|b| b.is_ascii_digit());
    match (tag.as_bytes().iter().all(is_tag_char), digits.then(|| offset.parse::<u64>())) {
        (true, Some(Ok(offset))) => {
            let mut t = [0u8; TAG_LEN];
            t.copy_from_slice(tag.as_bytes());
            IdEntry::At { tag: t, offset }
        }
        _ => IdEntry::Unknown,
    }
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

    fn named(id: &str) -> HashMap<String, Option<StreamPosition>> {
        match parse_event_id(id, 100) {
            EventId::Named(map) => map,
            other => panic!("named form expected, got {other:?}"),
        }
    }

    fn indexed(id: &str, channels: usize) -> Vec<IdEntry> {
        match parse_event_id(id, channels) {
            EventId::Indexed(entries) => entries,
            other => panic!("compact form expected, got {other:?}"),
        }
    }

    #[test]
    fn malformed_named_ids_are_skipped() {
        let p = named("a~e~1;b~~2;c~e~x;d~e~1~2;bad name;;e");
        assert_eq!(p.len(), 2);
        assert_eq!(p["a"], Some(StreamPosition { offset: 1, epoch: "e".into() }));
        assert_eq!(p["e"], None);
    }

    #[test]
    fn malformed_compact_entries_are_unknown() {
        let tag = position_tag("a", "e");
        let good = format!("{}7", std::str::from_utf8(&tag).unwrap());
        let id =
            format!("~{good};;short;ABCDEFG!1;ABCDEFGH;ABCDEFGHx;ABCDEFGH99999999999999999999");
        let e = indexed(&id, 100);
        assert_eq!(e[0], IdEntry::At { tag, offset: 7 });
        assert_eq!(e[1], IdEntry::NoHistory);
        assert!(e[2..].iter().all(|e| *e == IdEntry::Unknown), "{e:?}");
        assert_eq!(e.len(), 7);
        // Only the stream's channels are looked at.
        assert_eq!(indexed(&id, 2).len(), 2);
        assert_eq!(indexed("~", 3), [IdEntry::NoHistory]);
    }

    #[test]
    fn tags_depend_on_channel_and_epoch() {
        let t = position_tag("a", "e");
        assert_eq!(t, position_tag("a", "e"), "deterministic (every node computes the same)");
        assert_ne!(t, position_tag("b", "e"));
        assert_ne!(t, position_tag("a", "f"));
        assert_ne!(position_tag("ab", "c"), position_tag("a", "bc"));
    }

    #[test]
    fn id_size_is_bounded_per_channel_whatever_the_names() {
        let long = "x".repeat(255);
        let names: Vec<String> = (0..64).map(|i| format!("{i}{long}")[..255].to_string()).collect();
        let epoch = "e".repeat(200);
        let id =
            encode_event_id(names.iter().map(|n| Some((n.as_str(), epoch.as_str(), u64::MAX))));
        assert!(format!("id: {id}\n").len() <= id_line_bound(64));
        assert!(id_line_bound(64) < 2000);
        let id = encode_event_id(names.iter().map(|_| None));
        assert_eq!(id.len(), 64);
    }

    proptest! {
        #[test]
        fn named_ids_still_parse(entries in proptest::collection::btree_map(
            "[A-Za-z0-9_.:@/=#,-]{1,20}",
            proptest::option::of(("[a-z0-9]{1,8}", any::<u64>())),
            0..10,
        )) {
            let id = entries.iter().map(|(c, p)| match p {
                Some((e, o)) => format!("{c}~{e}~{o}"),
                None => c.clone(),
            }).collect::<Vec<_>>().join(";");
            let parsed = named(&id);
            prop_assert_eq!(parsed.len(), entries.len());
            for (c, p) in &entries {
                let got = parsed[c].as_ref().map(|s| (s.epoch.clone(), s.offset));
                prop_assert_eq!(got, p.clone());
            }
        }

        #[test]
        fn compact_ids_roundtrip(entries in proptest::collection::vec(
            proptest::option::of(("[A-Za-z0-9_.:@/=#,-]{1,255}", "[ -~]{1,40}", any::<u64>())),
            1..70,
        )) {
            let id = encode_event_id(entries.iter().map(|p| p.as_ref().map(|(c, e, o)| (c.as_str(), e.as_str(), *o))));
            prop_assert!(id.bytes().all(|b| b.is_ascii_graphic()));
            let line = format!("id: {id}\n");
            prop_assert!(line.len() <= id_line_bound(entries.len()));
            let parsed = indexed(&id, entries.len());
            prop_assert_eq!(parsed.len(), entries.len());
            for (p, got) in entries.iter().zip(&parsed) {
                let want = match p {
                    Some((c, e, o)) => IdEntry::At { tag: position_tag(c, e), offset: *o },
                    None => IdEntry::NoHistory,
                };
                prop_assert_eq!(got, &want);
            }
        }
    }
}
