//! What the server sends in `herald.json`: replies and pushes, encoded to JSON text (one line,
//! not yet framed).
//!
//! Every encoder writes JSON by hand into one `Vec<u8>`; strings that need escaping go through
//! `serde_json`. A publication's `data` is bytes: when they are one JSON text in UTF-8
//! (anything published through JSON is) they are embedded verbatim as `"data"`; other bytes
//! (published in `herald.proto`, as protobuf over the API or as `b64data`) go as
//! `"data":null,"b64data":"..."`, standard base64 with padding (see [`is_json_text`]). A hub encodes a publication once and pushes the same bytes to every
//! subscriber.
//!
//! ```
//! use herald_protocol::push::{encode_pub, encode_reply_ok, ReplyOk};
//!
//! assert_eq!(encode_pub("news", Some(7), br#"{"x":1}"#), br#"{"pub":{"channel":"news","offset":7,"data":{"x":1}}}"#);
//! assert_eq!(encode_reply_ok(3, &ReplyOk::Publish { offset: None }), br#"{"id":3,"ok":{}}"#);
//! ```

use crate::code::{CloseCode, ErrorCode};
use crate::command::StreamPosition;

/// One publication inside a `subscribe` or `history` reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublicationRef<'a> {
    /// The publication's offset; `None` where the channel keeps no history.
    pub offset: Option<u64>,
    /// The publication's `data` (see [`is_json_text`] for how JSON carries it).
    pub data: &'a [u8],
}

/// The `ok` body of a reply, one variant per op.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyOk<'a> {
    /// `{"client": "<id>", "ping_interval_ms": N}`.
    Connect {
        /// The connection's id.
        client: &'a str,
        /// How often the server pings.
        ping_interval_ms: u64,
    },
    /// `{"offset": N, "epoch": "E", "recovered": b, "publications": [...]}`.
    Subscribe {
        /// The channel's current position; `None` (no offset, no epoch) where it keeps no
        /// history.
        position: Option<&'a StreamPosition>,
        /// True when nothing after `since` is missing.
        recovered: bool,
        /// The recovered publications, oldest first.
        publications: &'a [PublicationRef<'a>],
    },
    /// `{}`.
    Unsubscribe,
    /// `{}`: the connection's token was replaced.
    Refresh,
    /// `{"offset": N}`, or `{}` where the channel keeps no history.
    Publish {
        /// The publication's offset.
        offset: Option<u64>,
    },
    /// `{"offset": N, "epoch": "E", "publications": [...]}`.
    History {
        /// The channel's current position; `None` where it keeps no history.
        position: Option<&'a StreamPosition>,
        /// The publications, in ascending offset order.
        publications: &'a [PublicationRef<'a>],
        /// The server's page bound cut the reply: written as `"more":true`, left out when false.
        more: bool,
    },
}

/// True when `s` can be written between quotes as it is.
fn is_plain(s: &str) -> bool {
    !s.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20)
}

/// Writes `s` as a JSON string.
pub(crate) fn write_str(out: &mut Vec<u8>, s: &str) {
    if is_plain(s) {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else if serde_json::to_writer(&mut *out, s).is_err() {
        // Writing a string into a Vec cannot fail; keep the output valid regardless.
        out.extend_from_slice(b"\"\"");
    }
}

/// Writes raw JSON text verbatim; a `'\n'` or `'\r'` (JSON allows them only as whitespace)
/// becomes a space so the message stays on one line (for `herald.json` and SSE `data:` lines),
/// and empty text becomes `null` so the output stays JSON.
pub(crate) fn write_raw_json(out: &mut Vec<u8>, data: &[u8]) {
    if data.is_empty() {
        out.extend_from_slice(b"null");
        return;
    }
    let start = out.len();
    out.extend_from_slice(data);
    if memchr::memchr2(b'\n', b'\r', data).is_some() {
        for b in &mut out[start..] {
            if *b == b'\n' || *b == b'\r' {
                *b = b' ';
            }
        }
    }
}

/// True when `data` is exactly one JSON text (optionally surrounded by whitespace) in valid
/// UTF-8, which a JSON subscriber receives as `"data"`; any other bytes, the empty string
/// included, reach it as `"data":null` with `"b64data"` (base64). Everything published through
/// JSON passes; bytes published in `herald.proto` pass when they happen to be JSON (such as
/// UTF-8 `{"x":1}`).
///
/// UTF-8 is checked first and on its own: `serde_json`'s validation of a slice skips strings
/// without checking their UTF-8, and a text frame must be valid UTF-8 (RFC 6455).
pub fn is_json_text(data: &[u8]) -> bool {
    !data.is_empty()
        && std::str::from_utf8(data)
            .is_ok_and(|text| serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok())
}

/// Writes `"data":<json>` when `data` is JSON text, else `"data":null,"b64data":"<base64>"`
/// (`data` stays, as PROTOCOL.md names it in every publication; `b64data` says what it holds).
pub(crate) fn write_data(out: &mut Vec<u8>, data: &[u8]) {
    if is_json_text(data) {
        out.extend_from_slice(b"\"data\":");
        write_raw_json(out, data);
    } else {
        out.extend_from_slice(b"\"data\":null,\"b64data\":");
        write_base64(out, data);
    }
}

/// Writes `data` as a JSON string of standard base64 (with padding).
pub(crate) fn write_base64(out: &mut Vec<u8>, data: &[u8]) {
    use base64::Engine as _;
    out.push(b'"');
    let start = out.len();
    out.resize(start + base64::encoded_len(data.len(), true).unwrap_or(0), 0);
    let n = base64::engine::general_purpose::STANDARD
        .encode_slice(data, &mut out[start..])
        .unwrap_or(0);
    out.truncate(start + n);
    out.push(b'"');
}

pub(crate) fn write_u64(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// `{"pub":{"channel":"C","offset":N,"data":<raw>}}`; `offset` omitted when `None`.
pub fn encode_pub(channel: &str, offset: Option<u64>, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(48 + channel.len() + data.len());
    out.extend_from_slice(b"{\"pub\":");
    write_publication(&mut out, channel, offset, data);
    out.push(b'}');
    out
}

/// `{"pub":{"channel":"C","offset":N,"epoch":"E","data":<raw>}}`: the first `pub` of an epoch
/// a subscriber has not seen names it (`epoch: None` writes the plain push).
pub fn encode_pub_in_epoch(
    channel: &str,
    offset: Option<u64>,
    epoch: Option<&str>,
    data: &[u8],
) -> Vec<u8> {
    let extra = epoch.map_or(0, |e| e.len() + 12);
    let mut out = Vec::with_capacity(48 + extra + channel.len() + data.len());
    out.extend_from_slice(b"{\"pub\":");
    write_publication_in_epoch(&mut out, channel, offset, epoch, data);
    out.push(b'}');
    out
}

/// Writes `{"channel":"C","offset":N,"data":<raw>}` (`offset` omitted when `None`): the body of
/// a `pub` push and of an SSE `pub` event.
pub(crate) fn write_publication(
    out: &mut Vec<u8>,
    channel: &str,
    offset: Option<u64>,
    data: &[u8],
) {
    write_publication_in_epoch(out, channel, offset, None, data);
}

/// [`write_publication`] with `"epoch":"E"` after the offset when `epoch` is given.
fn write_publication_in_epoch(
    out: &mut Vec<u8>,
    channel: &str,
    offset: Option<u64>,
    epoch: Option<&str>,
    data: &[u8],
) {
    out.extend_from_slice(b"{\"channel\":");
    write_str(out, channel);
    if let Some(offset) = offset {
        out.extend_from_slice(b",\"offset\":");
        write_u64(out, offset);
    }
    if let Some(epoch) = epoch {
        out.extend_from_slice(b",\"epoch\":");
        write_str(out, epoch);
    }
    out.push(b',');
    write_data(out, data);
    out.push(b'}');
}

/// `{"ping":{}}`.
pub fn encode_ping() -> &'static [u8] {
    b"{\"ping\":{}}"
}

/// `{"disconnect":{"code":C,"reason":"...","reconnect":b}}`, reason and flag from the code.
pub fn encode_disconnect(code: CloseCode) -> Vec<u8> {
    let mut out = Vec::with_capacity(80);
    out.extend_from_slice(b"{\"disconnect\":{\"code\":");
    write_u64(&mut out, u64::from(code.as_u16()));
    out.extend_from_slice(b",\"reason\":");
    write_str(&mut out, code.reason());
    out.extend_from_slice(if code.reconnect() {
        b",\"reconnect\":true}}"
    } else {
        b",\"reconnect\":false}}"
    });
    out
}

/// `{"unsub":{"channel":"C","code":C,"reason":"..."}}`.
pub fn encode_unsub(channel: &str, code: u16, reason: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(48 + channel.len() + reason.len());
    out.extend_from_slice(b"{\"unsub\":{\"channel\":");
    write_str(&mut out, channel);
    out.extend_from_slice(b",\"code\":");
    write_u64(&mut out, u64::from(code));
    out.extend_from_slice(b",\"reason\":");
    write_str(&mut out, reason);
    out.extend_from_slice(b"}}");
    out
}

/// The body of a history answer (`GET /api/history`): `{"offset":N,"epoch":"E",
/// "publications":[...]}` with each `data` relayed verbatim, and `"more":true` when the page
/// bound cut it.
pub fn encode_history_body(
    position: Option<&StreamPosition>,
    publications: &[PublicationRef<'_>],
    more: bool,
) -> Vec<u8> {
    let mut out =
        Vec::with_capacity(64 + publications.iter().map(|p| p.data.len() + 32).sum::<usize>());
    out.push(b'{');
    write_position(&mut out, position);
    write_publications(&mut out, publications);
    write_more(&mut out, more);
    out.push(b'}');
    out
}

fn write_more(out: &mut Vec<u8>, more: bool) {
    if more {
        out.extend_from_slice(b",\"more\":true");
    }
}

fn write_position(out: &mut Vec<u8>, position: Option<&StreamPosition>) {
    if let Some(pos) = position {
        out.extend_from_slice(b"\"offset\":");
        write_u64(out, pos.offset);
        out.extend_from_slice(b",\"epoch\":");
        write_str(out, &pos.epoch);
        out.push(b',');
    }
}

fn write_publications(out: &mut Vec<u8>, publications: &[PublicationRef<'_>]) {
    out.extend_from_slice(b"\"publications\":[");
    write_publication_items(out, publications, true);
    out.push(b']');
}

/// The publications of a list, comma separated; `first` when none precedes them in the list.
fn write_publication_items(out: &mut Vec<u8>, publications: &[PublicationRef<'_>], first: bool) {
    for (i, p) in publications.iter().enumerate() {
        if i > 0 || !first {
            out.push(b',');
        }
        out.push(b'{');
        if let Some(offset) = p.offset {
            out.extend_from_slice(b"\"offset\":");
            write_u64(out, offset);
            out.push(b',');
        }
        write_data(out, p.data);
        out.push(b'}');
    }
}

/// A `subscribe` reply sent in parts, for a recovery larger than one page: the parts,
/// concatenated, are the reply [`encode_reply_ok`] gives for [`ReplyOk::Subscribe`] with the
/// same publications (keys in another order), so each part can go out while the next page is
/// read. [`SubscribeParts::head`] opens it, [`SubscribeParts::more`] adds publications,
/// [`SubscribeParts::tail`] closes it with the position and `recovered`, known only at the end.
#[derive(Debug, Default)]
pub struct SubscribeParts {
    /// Some publication was written (the next one needs a comma).
    any: bool,
}

impl SubscribeParts {
    /// Parts that follow others; `any` when a publication was written before.
    pub fn after(any: bool) -> Self {
        SubscribeParts { any }
    }

    /// `{"id":N,"ok":{"publications":[` and the first publications.
    pub fn head(&mut self, id: u32, publications: &[PublicationRef<'_>]) -> Vec<u8> {
        let mut out = Vec::with_capacity(48 + items_len(publications));
        out.extend_from_slice(b"{\"id\":");
        write_u64(&mut out, u64::from(id));
        out.extend_from_slice(b",\"ok\":{\"publications\":[");
        out.extend_from_slice(&self.more(publications));
        out
    }

    /// More publications of the list.
    pub fn more(&mut self, publications: &[PublicationRef<'_>]) -> Vec<u8> {
        let mut out = Vec::with_capacity(items_len(publications));
        write_publication_items(&mut out, publications, !self.any);
        self.any |= !publications.is_empty();
        out
    }

    /// `],"offset":N,"epoch":"E","recovered":b}}`.
    pub fn tail(self, position: Option<&StreamPosition>, recovered: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(80);
        out.extend_from_slice(b"],");
        write_position(&mut out, position);
        out.extend_from_slice(if recovered {
            b"\"recovered\":true}}"
        } else {
            b"\"recovered\":false}}"
        });
        out
    }
}

fn items_len(publications: &[PublicationRef<'_>]) -> usize {
    publications.iter().map(|p| p.data.len() + 32).sum()
}

/// `{"id":N,"ok":{...}}`.
pub fn encode_reply_ok(id: u32, ok: &ReplyOk<'_>) -> Vec<u8> {
    let publications_len = match ok {
        ReplyOk::Subscribe { publications, .. } | ReplyOk::History { publications, .. } => {
            publications.iter().map(|p| p.data.len() + 32).sum()
        }
        _ => 0,
    };
    let mut out = Vec::with_capacity(64 + publications_len);
    out.extend_from_slice(b"{\"id\":");
    write_u64(&mut out, u64::from(id));
    out.extend_from_slice(b",\"ok\":{");
    match ok {
        ReplyOk::Connect { client, ping_interval_ms } => {
            out.extend_from_slice(b"\"client\":");
            write_str(&mut out, client);
            out.extend_from_slice(b",\"ping_interval_ms\":");
            write_u64(&mut out, *ping_interval_ms);
        }
        ReplyOk::Subscribe { position, recovered, publications } => {
            write_position(&mut out, *position);
            out.extend_from_slice(if *recovered {
                b"\"recovered\":true,"
            } else {
                b"\"recovered\":false,"
            });
            write_publications(&mut out, publications);
        }
        ReplyOk::Unsubscribe | ReplyOk::Refresh | ReplyOk::Publish { offset: None } => {}
        ReplyOk::Publish { offset: Some(offset) } => {
            out.extend_from_slice(b"\"offset\":");
            write_u64(&mut out, *offset);
        }
        ReplyOk::History { position, publications, more } => {
            write_position(&mut out, *position);
            write_publications(&mut out, publications);
            write_more(&mut out, *more);
        }
    }
    out.extend_from_slice(b"}}");
    out
}

/// `{"id":N,"error":{"code":C,"message":"..."}}`.
pub fn encode_reply_error(id: u32, code: ErrorCode, message: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(48 + message.len());
    out.extend_from_slice(b"{\"id\":");
    write_u64(&mut out, u64::from(id));
    out.extend_from_slice(b",\"error\":{\"code\":");
    write_u64(&mut out, u64::from(code.as_u16()));
    out.extend_from_slice(b",\"message\":");
    write_str(&mut out, message);
    out.extend_from_slice(b"}}");
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    #[test]
    fn pub_in_epoch_names_it_after_the_offset() {
        assert_eq!(
            encode_pub_in_epoch("c", Some(1), Some("e2"), b"7"),
            br#"{"pub":{"channel":"c","offset":1,"epoch":"e2","data":7}}"#
        );
        assert_eq!(encode_pub_in_epoch("c", Some(1), None, b"7"), encode_pub("c", Some(1), b"7"));
    }

    use super::*;
    use crate::json::{decode_server_messages, ReplyError, ServerMessage};
    use proptest::prelude::*;
    use serde_json::{json, Value};

    fn s(v: Vec<u8>) -> String {
        String::from_utf8(v).unwrap()
    }

    #[test]
    fn exact_encodings() {
        let pos = StreamPosition { offset: 9, epoch: "ab".into() };
        let pubs = [
            PublicationRef { offset: Some(8), data: b"1" },
            PublicationRef { offset: None, data: br#"{"a":"b"}"# },
        ];
        let table: Vec<(Vec<u8>, &str)> = vec![
            (
                encode_pub("c", Some(1), b"true"),
                r#"{"pub":{"channel":"c","offset":1,"data":true}}"#,
            ),
            (encode_pub("c", None, b"[1]"), r#"{"pub":{"channel":"c","data":[1]}}"#),
            (encode_pub("c", None, b""), r#"{"pub":{"channel":"c","data":null,"b64data":""}}"#),
            (
                encode_pub("c", None, b"\x00\xfe"),
                r#"{"pub":{"channel":"c","data":null,"b64data":"AP4="}}"#,
            ),
            // JSON in shape but not UTF-8: never written into a text frame as it is.
            (
                encode_pub("c", None, b"\"\xff\""),
                r#"{"pub":{"channel":"c","data":null,"b64data":"Iv8i"}}"#,
            ),
            (encode_pub("c", None, b"{\n}"), r#"{"pub":{"channel":"c","data":{ }}}"#),
            (encode_pub("a\"b", None, b"1"), r#"{"pub":{"channel":"a\"b","data":1}}"#),
            (encode_ping().to_vec(), r#"{"ping":{}}"#),
            (
                encode_disconnect(CloseCode::SlowConsumer),
                r#"{"disconnect":{"code":4008,"reason":"slow consumer","reconnect":true}}"#,
            ),
            (
                encode_disconnect(CloseCode::ProtocolError),
                r#"{"disconnect":{"code":4002,"reason":"protocol error","reconnect":false}}"#,
            ),
            (
                encode_unsub("c", 4003, "go\naway"),
                r#"{"unsub":{"channel":"c","code":4003,"reason":"go\naway"}}"#,
            ),
            (
                encode_reply_ok(1, &ReplyOk::Connect { client: "x1", ping_interval_ms: 25000 }),
                r#"{"id":1,"ok":{"client":"x1","ping_interval_ms":25000}}"#,
            ),
            (
                encode_reply_ok(
                    2,
                    &ReplyOk::Subscribe {
                        position: Some(&pos),
                        recovered: true,
                        publications: &pubs,
                    },
                ),
                r#"{"id":2,"ok":{"offset":9,"epoch":"ab","recovered":true,"publications":[{"offset":8,"data":1},{"data":{"a":"b"}}]}}"#,
            ),
            (
                encode_reply_ok(
                    2,
                    &ReplyOk::Subscribe { position: None, recovered: false, publications: &[] },
                ),
                r#"{"id":2,"ok":{"recovered":false,"publications":[]}}"#,
            ),
            (encode_reply_ok(3, &ReplyOk::Unsubscribe), r#"{"id":3,"ok":{}}"#),
            (
                encode_reply_ok(4, &ReplyOk::Publish { offset: Some(5) }),
                r#"{"id":4,"ok":{"offset":5}}"#,
            ),
            (encode_reply_ok(4, &ReplyOk::Publish { offset: None }), r#"{"id":4,"ok":{}}"#),
            (
                encode_reply_ok(
                    5,
                    &ReplyOk::History {
                        position: Some(&pos),
                        publications: &pubs[..1],
                        more: false,
                    },
                ),
                r#"{"id":5,"ok":{"offset":9,"epoch":"ab","publications":[{"offset":8,"data":1}]}}"#,
            ),
            (
                encode_reply_ok(
                    5,
                    &ReplyOk::History {
                        position: Some(&pos),
                        publications: &pubs[..1],
                        more: true,
                    },
                ),
                r#"{"id":5,"ok":{"offset":9,"epoch":"ab","publications":[{"offset":8,"data":1}],"more":true}}"#,
            ),
            (
                encode_reply_ok(
                    5,
                    &ReplyOk::History { position: None, publications: &[], more: false },
                ),
                r#"{"id":5,"ok":{"publications":[]}}"#,
            ),
            (
                encode_reply_error(6, ErrorCode::AlreadySubscribed, "already \"subscribed\""),
                r#"{"id":6,"error":{"code":409,"message":"already \"subscribed\""}}"#,
            ),
        ];
        for (got, want) in table {
            let got = s(got);
            assert_eq!(got, want);
            // Every encoding is valid JSON.
            serde_json::from_str::<Value>(&got).unwrap();
        }
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            ".{0,10}".prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                proptest::collection::btree_map(".{0,6}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn arb_pretty_json() -> impl Strategy<Value = (Value, String)> {
        (arb_json(), any::<bool>()).prop_map(|(v, pretty)| {
            let text =
                if pretty { serde_json::to_string_pretty(&v).unwrap() } else { v.to_string() };
            (v, text)
        })
    }

    proptest! {
        #[test]
        fn subscribe_parts_equal_the_whole_reply(
            sizes in proptest::collection::vec(0usize..4, 0..6),
            id in 1..=u32::MAX,
            recovered in any::<bool>(),
            with_position in any::<bool>(),
        ) {
            let pos = StreamPosition { offset: 99, epoch: "e\"1".into() };
            let position = with_position.then_some(&pos);
            let data: Vec<String> = (0..sizes.iter().sum::<usize>()).map(|i| format!("{{\"n\":{i}}}")).collect();
            let pubs: Vec<PublicationRef> = data.iter().enumerate()
                .map(|(i, d)| PublicationRef { offset: Some(i as u64 + 1), data: d.as_bytes() })
                .collect();
            let mut parts = SubscribeParts::default();
            let mut at = 0;
            let mut text = Vec::new();
            for (i, n) in sizes.iter().enumerate() {
                let chunk = &pubs[at..at + n];
                at += n;
                text.extend(if i == 0 { parts.head(id, chunk) } else { parts.more(chunk) });
            }
            if sizes.is_empty() {
                text.extend(parts.head(id, &[]));
            }
            text.extend(parts.tail(position, recovered));
            let whole = encode_reply_ok(id, &ReplyOk::Subscribe { position, recovered, publications: &pubs });
            let a: Value = serde_json::from_slice(&text).unwrap();
            let b: Value = serde_json::from_slice(&whole).unwrap();
            prop_assert_eq!(a, b);
        }
    }

    proptest! {
        #[test]
        fn pushes_round_trip(
            channel in ".{1,20}",
            offset in proptest::option::of(any::<u64>()),
            (data, text) in arb_pretty_json(),
            code in 0u16..5000,
            reason in ".{0,30}",
            id in 1..=u32::MAX,
            epoch in ".{0,10}",
            recovered in any::<bool>(),
            close in proptest::sample::select(CloseCode::ALL.to_vec()),
        ) {
            let pos = StreamPosition { offset: offset.unwrap_or(0), epoch: epoch.clone() };
            let pubs = [PublicationRef { offset, data: text.as_bytes() }];
            let mut frame = Vec::new();
            for line in [
                encode_pub(&channel, offset, text.as_bytes()),
                encode_ping().to_vec(),
                encode_disconnect(close),
                encode_unsub(&channel, code, &reason),
                encode_reply_ok(id, &ReplyOk::Subscribe { position: Some(&pos), recovered, publications: &pubs }),
                encode_reply_ok(id, &ReplyOk::History { position: None, publications: &pubs, more: id % 2 == 0 }),
                encode_reply_ok(id, &ReplyOk::Publish { offset }),
                encode_reply_ok(id, &ReplyOk::Connect { client: &reason, ping_interval_ms: code.into() }),
                encode_reply_error(id, ErrorCode::TooLarge, &reason),
            ] {
                prop_assert!(!line.contains(&b'\n'));
                frame.extend_from_slice(&line);
                frame.push(b'\n');
            }
            let got: Vec<ServerMessage> =
                decode_server_messages(&frame).map(Result::unwrap).collect();
            let publication = match offset {
                Some(o) => json!({"offset": o, "data": data.clone()}),
                None => json!({"data": data.clone()}),
            };
            let want = vec![
                ServerMessage::Pub { channel: channel.clone(), offset, epoch: None, data: data.clone(), binary: None },
                ServerMessage::Ping,
                ServerMessage::Disconnect {
                    code: close.as_u16(),
                    reason: close.reason().into(),
                    reconnect: close.reconnect(),
                },
                ServerMessage::Unsub { channel: channel.clone(), code, reason: reason.clone() },
                ServerMessage::Reply {
                    id,
                    result: Ok(json!({
                        "offset": pos.offset, "epoch": epoch, "recovered": recovered,
                        "publications": [publication.clone()],
                    })),
                },
                ServerMessage::Reply {
                    id,
                    result: Ok(if id % 2 == 0 {
                        json!({"publications": [publication], "more": true})
                    } else {
                        json!({"publications": [publication]})
                    }),
                },
                ServerMessage::Reply {
                    id,
                    result: Ok(match offset { Some(o) => json!({"offset": o}), None => json!({}) }),
                },
                ServerMessage::Reply {
                    id,
                    result: Ok(json!({"client": reason, "ping_interval_ms": code})),
                },
                ServerMessage::Reply {
                    id,
                    result: Err(ReplyError { code: 413, message: reason.clone() }),
                },
            ];
            prop_assert_eq!(got, want);
        }
    }
}
