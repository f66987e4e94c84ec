//! The `herald.json` codec: client commands in, server messages out (for clients).
//!
//! A text frame holds one or more JSON messages separated by `\n`. The server decodes commands
//! with [`decode_commands`]; pushes and replies are encoded by [`crate::push`]. Clients (the Rust
//! SDK, tests) encode commands with [`encode_command`] and decode what the server sends with
//! [`decode_server_messages`].
//!
//! Decoding borrows from the frame (`&str`, `&RawValue`); only a publication's `data` and the
//! validated names are copied out.
//!
//! ```
//! use herald_protocol::json::{decode_commands, DecodeError};
//! use herald_protocol::{CommandKind, ErrorCode};
//!
//! let frame = b"{\"op\":\"subscribe\",\"id\":1,\"channel\":\"news\"}\n{\"op\":\"pong\"}\n{\"op\":\"nope\",\"id\":2}";
//! let cmds: Vec<_> = decode_commands(frame).collect();
//! assert!(matches!(&cmds[0], Ok(c) if c.id == Some(1) && c.kind.op() == "subscribe"));
//! assert!(matches!(&cmds[1], Ok(c) if c.kind == CommandKind::Pong));
//! assert!(matches!(&cmds[2], Err(DecodeError::Reply { id: 2, code: ErrorCode::BadRequest, .. })));
//! ```

use std::borrow::Cow;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::channel::ChannelName;
use crate::code::CloseCode;
use crate::code::ErrorCode;
use crate::command::{Command, CommandKind, StreamPosition};
use crate::format::{Codec, Commands, WireFormat};
use crate::push::{
    self, is_json_text, write_base64, write_raw_json, write_str, PublicationRef, ReplyOk,
    SubscribeParts,
};

/// Why a client command could not be used.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// The line is not a JSON object, or a command needing an `id` has no usable one (missing,
    /// 0, > u32::MAX, not an integer): the server closes with 4002.
    #[error("bad message: {message}")]
    Fatal {
        /// What is wrong, for logs.
        message: String,
    },
    /// The command has a usable id but is bad (unknown op, missing/invalid field, bad channel
    /// name, bad since): reply with this error to `id`.
    #[error("bad command {id}: {message}")]
    Reply {
        /// The command's id, to reply to.
        id: u32,
        /// The error code of the reply (400).
        code: ErrorCode,
        /// The reply's message, naming the problem.
        message: String,
    },
}

/// A command as written, every field still raw JSON.
#[derive(Deserialize)]
struct RawCommand<'a> {
    #[serde(borrow, default)]
    op: Option<&'a RawValue>,
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    token: Option<&'a RawValue>,
    #[serde(borrow, default)]
    channel: Option<&'a RawValue>,
    #[serde(borrow, default)]
    since: Option<&'a RawValue>,
    #[serde(borrow, default)]
    limit: Option<&'a RawValue>,
    /// Present even when `null`: `data` may be any JSON value.
    #[serde(borrow, default, deserialize_with = "present_raw")]
    data: Option<&'a RawValue>,
    /// Binary `data`, base64 (instead of `data`).
    #[serde(borrow, default)]
    b64data: Option<&'a RawValue>,
}

fn present_raw<'de, D>(d: D) -> Result<Option<&'de RawValue>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    <&'de RawValue>::deserialize(d).map(Some)
}

/// A JSON string, borrowed when it has no escapes.
#[derive(Deserialize)]
#[serde(transparent)]
struct JsonStr<'a>(#[serde(borrow)] Cow<'a, str>);

/// The `since` object.
#[derive(Deserialize)]
struct RawSince<'a> {
    offset: u64,
    #[serde(borrow)]
    epoch: JsonStr<'a>,
}

/// Splits one text frame on `'\n'` (ignoring empty / whitespace-only lines and a trailing
/// `'\r'`) and decodes each command.
pub fn decode_commands(frame: &[u8]) -> impl Iterator<Item = Result<Command, DecodeError>> + '_ {
    lines(frame).map(decode_command)
}

/// The non-blank lines of a frame, without their line ends.
fn lines(frame: &[u8]) -> impl Iterator<Item = &[u8]> + '_ {
    let mut rest = Some(frame);
    std::iter::from_fn(move || loop {
        let current = rest?;
        let line = match memchr::memchr(b'\n', current) {
            Some(i) => {
                rest = Some(&current[i + 1..]);
                &current[..i]
            }
            None => {
                rest = None;
                current
            }
        };
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if !line.iter().all(|b| b.is_ascii_whitespace()) {
            return Some(line);
        }
    })
}

fn fatal(message: impl Into<String>) -> DecodeError {
    DecodeError::Fatal { message: message.into() }
}

/// Decodes one command (one line of a frame).
pub fn decode_command(line: &[u8]) -> Result<Command, DecodeError> {
    // A struct would also deserialize from a JSON array: insist on an object.
    if line.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(fatal("message is not a JSON object"));
    }
    let raw: RawCommand<'_> =
        serde_json::from_slice(line).map_err(|e| fatal(format!("invalid JSON: {e}")))?;
    let op = raw.op.and_then(|op| serde_json::from_str::<JsonStr<'_>>(op.get()).ok());
    if op.as_ref().is_some_and(|op| op.0 == "pong") {
        return Ok(Command { id: None, kind: CommandKind::Pong });
    }
    let id = usable_id(raw.id).ok_or_else(|| match &op {
        Some(op) => fatal(format!("command `{}` needs an id (an integer 1..=4294967295)", op.0)),
        None => fatal("command needs an `op` and an id (an integer 1..=4294967295)"),
    })?;
    let bad = |message: String| DecodeError::Reply { id, code: ErrorCode::BadRequest, message };
    let Some(op) = op else {
        return Err(bad(match raw.op {
            None => "missing field `op`".to_owned(),
            Some(_) => "`op` must be a string".to_owned(),
        }));
    };
    let kind = match &*op.0 {
        "connect" => CommandKind::Connect {
            token: optional_str(raw.token, "token").map_err(bad)?.map(Cow::into_owned),
        },
        "subscribe" => CommandKind::Subscribe {
            channel: channel(raw.channel).map_err(bad)?,
            since: since(raw.since).map_err(bad)?,
        },
        "unsubscribe" => CommandKind::Unsubscribe { channel: channel(raw.channel).map_err(bad)? },
        "publish" => {
            let channel = channel(raw.channel).map_err(bad)?;
            // `b64data` with `data` absent or `null` (the shape the server writes); `data`
            // alone is any JSON value, `null` included.
            let data = match (raw.data, raw.b64data) {
                (Some(data), None) => Bytes::copy_from_slice(data.get().as_bytes()),
                (None, Some(b64)) => b64data(b64).map_err(bad)?,
                (Some(data), Some(b64)) if is_null(data) => b64data(b64).map_err(bad)?,
                (Some(_), Some(_)) => {
                    return Err(bad("give one of `data` and `b64data`, not both".to_owned()))
                }
                (None, None) => return Err(bad("missing field `data`".to_owned())),
            };
            CommandKind::Publish { channel, data }
        }
        "history" => CommandKind::History {
            channel: channel(raw.channel).map_err(bad)?,
            since: since(raw.since).map_err(bad)?,
            limit: limit(raw.limit).map_err(bad)?,
        },
        "refresh" => CommandKind::Refresh {
            token: optional_str(raw.token, "token")
                .map_err(bad)?
                .ok_or_else(|| bad("missing field `token`".to_owned()))?
                .into_owned(),
        },
        other => return Err(bad(format!("unknown op {other:?}"))),
    };
    Ok(Command { id: Some(id), kind })
}

/// The id when it is an integer in 1..=u32::MAX.
fn usable_id(raw: Option<&RawValue>) -> Option<u32> {
    let id: u64 = serde_json::from_str(raw?.get()).ok()?;
    u32::try_from(id).ok().filter(|id| *id > 0)
}

fn is_null(raw: &RawValue) -> bool {
    raw.get() == "null"
}

/// An optional string field; `null` counts as absent.
fn optional_str<'a>(raw: Option<&'a RawValue>, name: &str) -> Result<Option<Cow<'a, str>>, String> {
    match raw {
        None => Ok(None),
        Some(raw) if is_null(raw) => Ok(None),
        Some(raw) => serde_json::from_str::<JsonStr<'a>>(raw.get())
            .map(|s| Some(s.0))
            .map_err(|_| format!("`{name}` must be a string")),
    }
}

fn channel(raw: Option<&RawValue>) -> Result<ChannelName, String> {
    let name = optional_str(raw, "channel")?.ok_or_else(|| "missing field `channel`".to_owned())?;
    ChannelName::parse(&name).map_err(|e| format!("invalid `channel`: {e}"))
}

fn since(raw: Option<&RawValue>) -> Result<Option<StreamPosition>, String> {
    match raw {
        None => Ok(None),
        Some(raw) if is_null(raw) => Ok(None),
        Some(raw) => serde_json::from_str::<RawSince<'_>>(raw.get())
            .map(|s| Some(StreamPosition { offset: s.offset, epoch: s.epoch.0.into_owned() }))
            .map_err(|e| {
                format!("invalid `since` (want {{\"offset\": N, \"epoch\": \"E\"}}): {e}")
            }),
    }
}

/// Decodes a `b64data` field: standard base64, padding optional.
fn b64data(raw: &RawValue) -> Result<Bytes, String> {
    let text = serde_json::from_str::<JsonStr<'_>>(raw.get())
        .map_err(|_| "`b64data` must be a base64 string".to_owned())?;
    decode_base64(text.0.as_bytes())
        .map(Bytes::from)
        .map_err(|e| format!("invalid `b64data` (standard base64): {e}"))
}

/// Standard base64, with or without padding: how every `b64data` is read (commands, API
/// bodies, what the server sends).
pub fn decode_base64(text: &[u8]) -> Result<Vec<u8>, base64::DecodeError> {
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    use base64::Engine as _;
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    LENIENT.decode(text)
}

fn limit(raw: Option<&RawValue>) -> Result<Option<u64>, String> {
    match raw {
        None => Ok(None),
        Some(raw) if is_null(raw) => Ok(None),
        Some(raw) => serde_json::from_str::<u64>(raw.get())
            .map(Some)
            .map_err(|_| "`limit` must be a non-negative integer".to_owned()),
    }
}

/// Encodes a client command line (no trailing newline); `data` is embedded verbatim (raw JSON
/// text; a `'\n'` in it, which JSON allows only as whitespace, becomes a space).
pub fn encode_command(cmd: &Command) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(b"{\"op\":\"");
    out.extend_from_slice(cmd.kind.op().as_bytes());
    out.push(b'"');
    if let Some(id) = cmd.id {
        out.extend_from_slice(b",\"id\":");
        out.extend_from_slice(itoa::Buffer::new().format(id).as_bytes());
    }
    let write_channel = |out: &mut Vec<u8>, channel: &ChannelName| {
        out.extend_from_slice(b",\"channel\":");
        write_str(out, channel.as_str());
    };
    let write_since = |out: &mut Vec<u8>, since: &Option<StreamPosition>| {
        if let Some(pos) = since {
            out.extend_from_slice(b",\"since\":{\"offset\":");
            out.extend_from_slice(itoa::Buffer::new().format(pos.offset).as_bytes());
            out.extend_from_slice(b",\"epoch\":");
            write_str(out, &pos.epoch);
            out.push(b'}');
        }
    };
    match &cmd.kind {
        CommandKind::Connect { token } => {
            if let Some(token) = token {
                out.extend_from_slice(b",\"token\":");
                write_str(&mut out, token);
            }
        }
        CommandKind::Subscribe { channel, since } => {
            write_channel(&mut out, channel);
            write_since(&mut out, since);
        }
        CommandKind::Unsubscribe { channel } => write_channel(&mut out, channel),
        CommandKind::Publish { channel, data } => {
            write_channel(&mut out, channel);
            if is_json_text(data) {
                out.extend_from_slice(b",\"data\":");
                write_raw_json(&mut out, data);
            } else {
                // Binary data: `b64data` alone (the server also takes `"data": null` beside it).
                out.extend_from_slice(b",\"b64data\":");
                write_base64(&mut out, data);
            }
        }
        CommandKind::History { channel, since, limit } => {
            write_channel(&mut out, channel);
            write_since(&mut out, since);
            if let Some(limit) = limit {
                out.extend_from_slice(b",\"limit\":");
                out.extend_from_slice(itoa::Buffer::new().format(*limit).as_bytes());
            }
        }
        CommandKind::Refresh { token } => {
            out.extend_from_slice(b",\"token\":");
            write_str(&mut out, token);
        }
        CommandKind::Pong => {}
    }
    out.push(b'}');
    out
}

/// A message the server sent, as a client sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerMessage {
    /// The reply to the command with this `id`.
    Reply {
        /// The command's id.
        id: u32,
        /// The `ok` body, or the `error`.
        result: Result<serde_json::Value, ReplyError>,
    },
    /// A publication in a subscribed channel.
    Pub {
        /// The channel.
        channel: String,
        /// The publication's offset, absent where the channel keeps no history.
        offset: Option<u64>,
        /// The channel's epoch, on the first publication of an epoch the connection has not
        /// seen yet (PROTOCOL.md section 3).
        epoch: Option<String>,
        /// The publication's data, when it is JSON (else `null`).
        data: serde_json::Value,
        /// The publication's data when it is not JSON text (`b64data`, decoded).
        binary: Option<Vec<u8>>,
    },
    /// A ping; answer with a `pong` command.
    Ping,
    /// The server is closing the connection; a close frame with the same code follows.
    Disconnect {
        /// The close code (see [`crate::CloseCode`]).
        code: u16,
        /// Why.
        reason: String,
        /// Whether the client should reconnect.
        reconnect: bool,
    },
    /// The server ended one subscription.
    Unsub {
        /// The channel.
        channel: String,
        /// Why, as a code.
        code: u16,
        /// Why, in words.
        reason: String,
    },
}

/// The `error` of a reply.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct ReplyError {
    /// The error code (see [`ErrorCode`]).
    pub code: u16,
    /// What went wrong.
    pub message: String,
}

/// A server message as written; unknown keys are ignored (the protocol may grow).
#[derive(Deserialize)]
struct RawServerMessage {
    #[serde(default)]
    id: Option<u32>,
    #[serde(default)]
    ok: Option<serde_json::Value>,
    #[serde(default)]
    error: Option<ReplyError>,
    #[serde(default, rename = "pub")]
    publication: Option<RawPub>,
    #[serde(default)]
    ping: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    disconnect: Option<RawDisconnect>,
    #[serde(default)]
    unsub: Option<RawUnsub>,
}

#[derive(Deserialize)]
struct RawPub {
    channel: String,
    #[serde(default)]
    offset: Option<u64>,
    #[serde(default)]
    epoch: Option<String>,
    #[serde(default)]
    data: serde_json::Value,
    #[serde(default)]
    b64data: Option<String>,
}

#[derive(Deserialize)]
struct RawDisconnect {
    code: u16,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    reconnect: bool,
}

#[derive(Deserialize)]
struct RawUnsub {
    channel: String,
    code: u16,
    #[serde(default)]
    reason: String,
}

/// Splits a text frame from the server on `'\n'` (ignoring blank lines) and decodes each
/// message.
pub fn decode_server_messages(
    frame: &[u8],
) -> impl Iterator<Item = Result<ServerMessage, serde_json::Error>> + '_ {
    lines(frame).map(decode_server_message)
}

/// Decodes one message from the server.
pub fn decode_server_message(line: &[u8]) -> Result<ServerMessage, serde_json::Error> {
    use serde::de::Error as _;
    let raw: RawServerMessage = serde_json::from_slice(line)?;
    if let Some(id) = raw.id {
        let result = match (raw.ok, raw.error) {
            (Some(ok), None) => Ok(ok),
            (None, Some(error)) => Err(error),
            _ => {
                return Err(serde_json::Error::custom("a reply needs exactly one of `ok`, `error`"))
            }
        };
        return Ok(ServerMessage::Reply { id, result });
    }
    if let Some(p) = raw.publication {
        let binary = match p.b64data {
            Some(b64) => Some(decode_base64(b64.as_bytes()).map_err(serde_json::Error::custom)?),
            None => None,
        };
        return Ok(ServerMessage::Pub {
            channel: p.channel,
            offset: p.offset,
            epoch: p.epoch,
            data: p.data,
            binary,
        });
    }
    if raw.ping.is_some() {
        return Ok(ServerMessage::Ping);
    }
    if let Some(d) = raw.disconnect {
        return Ok(ServerMessage::Disconnect {
            code: d.code,
            reason: d.reason,
            reconnect: d.reconnect,
        });
    }
    if let Some(u) = raw.unsub {
        return Ok(ServerMessage::Unsub { channel: u.channel, code: u.code, reason: u.reason });
    }
    Err(serde_json::Error::custom("unknown server message"))
}

/// The `herald.json` [`Codec`]: one message per text frame from the server (the client may
/// send several per frame, separated by `\n`).
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonCodec;

impl Codec for JsonCodec {
    fn format(&self) -> WireFormat {
        WireFormat::Json
    }

    fn decode_commands<'a>(&self, message: &'a [u8]) -> Commands<'a> {
        Box::new(decode_commands(message))
    }

    fn encode_pub(
        &self,
        channel: &str,
        offset: Option<u64>,
        epoch: Option<&str>,
        data: &[u8],
    ) -> Vec<u8> {
        push::encode_pub_in_epoch(channel, offset, epoch, data)
    }

    fn encode_reply_ok(&self, id: u32, ok: &ReplyOk<'_>) -> Vec<u8> {
        push::encode_reply_ok(id, ok)
    }

    fn encode_reply_error(&self, id: u32, code: ErrorCode, message: &str) -> Vec<u8> {
        push::encode_reply_error(id, code, message)
    }

    fn encode_ping(&self) -> Vec<u8> {
        push::encode_ping().to_vec()
    }

    fn encode_disconnect(&self, code: CloseCode) -> Vec<u8> {
        push::encode_disconnect(code)
    }

    fn encode_unsub(&self, channel: &str, code: u16, reason: &str) -> Vec<u8> {
        push::encode_unsub(channel, code, reason)
    }

    fn subscribe_head(&self, id: u32, publications: &[PublicationRef<'_>]) -> Vec<u8> {
        SubscribeParts::default().head(id, publications)
    }

    fn subscribe_more(
        &self,
        _id: u32,
        publications: &[PublicationRef<'_>],
        first: bool,
    ) -> Vec<u8> {
        SubscribeParts::after(!first).more(publications)
    }

    fn subscribe_tail(
        &self,
        _id: u32,
        position: Option<&StreamPosition>,
        recovered: bool,
    ) -> Vec<u8> {
        SubscribeParts::default().tail(position, recovered)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ch(name: &str) -> ChannelName {
        ChannelName::parse(name).unwrap()
    }

    #[test]
    fn line_breaks_inside_data_are_written_as_spaces() {
        // A raw '\r' can only be JSON whitespace between data's tokens; the encoder writes it
        // as a space so that a frame's lines stay lines, and that is all it changes.
        let c = ok("{\"op\":\"publish\",\"id\":1,\"channel\":\"c\",\"data\":{\"a\":\r1}}");
        let again = ok(std::str::from_utf8(&encode_command(&c)).unwrap());
        match (&c.kind, &again.kind) {
            (
                CommandKind::Publish { data: before, .. },
                CommandKind::Publish { data: after, .. },
            ) => {
                assert_eq!(&before[..], b"{\"a\":\r1}");
                assert_eq!(&after[..], b"{\"a\": 1}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(again.id, c.id);
    }

    fn ok(line: &str) -> Command {
        match decode_command(line.as_bytes()) {
            Ok(c) => c,
            Err(e) => panic!("{line}: {e:?}"),
        }
    }

    fn cmd(id: u32, kind: CommandKind) -> Command {
        Command { id: Some(id), kind }
    }

    #[test]
    fn decodes_every_op() {
        let pos = |offset, epoch: &str| Some(StreamPosition { offset, epoch: epoch.into() });
        let table = [
            (r#"{"op":"connect","id":1}"#, cmd(1, CommandKind::Connect { token: None })),
            (
                r#"{"op":"connect","id":1,"token":"a.b.c"}"#,
                cmd(1, CommandKind::Connect { token: Some("a.b.c".into()) }),
            ),
            (
                r#"{"op":"connect","id":1,"token":null}"#,
                cmd(1, CommandKind::Connect { token: None }),
            ),
            (
                r#"{"op":"refresh","id":7,"token":"a.b.c"}"#,
                cmd(7, CommandKind::Refresh { token: "a.b.c".into() }),
            ),
            (
                r#"{"op":"subscribe","id":2,"channel":"news"}"#,
                cmd(2, CommandKind::Subscribe { channel: ch("news"), since: None }),
            ),
            (
                r#" { "id" : 4294967295 , "channel" : "m:A#u1,u2", "op" : "subscribe", "since": {"offset": 18446744073709551615, "epoch": "xyz"}} "#,
                cmd(
                    u32::MAX,
                    CommandKind::Subscribe {
                        channel: ch("m:A#u1,u2"),
                        since: pos(u64::MAX, "xyz"),
                    },
                ),
            ),
            (
                r#"{"op":"unsubscribe","id":3,"channel":"news","extra":[1,{"x":2}]}"#,
                cmd(3, CommandKind::Unsubscribe { channel: ch("news") }),
            ),
            (
                r#"{"op":"publish","id":4,"channel":"c","data":{"a": [1, "x\n"]}}"#,
                cmd(
                    4,
                    CommandKind::Publish {
                        channel: ch("c"),
                        data: Bytes::from_static(br#"{"a": [1, "x\n"]}"#),
                    },
                ),
            ),
            (
                r#"{"op":"publish","id":4,"channel":"c","data":null}"#,
                cmd(
                    4,
                    CommandKind::Publish { channel: ch("c"), data: Bytes::from_static(b"null") },
                ),
            ),
            (
                r#"{"op":"publish","id":4,"data": "s" ,"channel":"c"}"#,
                cmd(
                    4,
                    CommandKind::Publish { channel: ch("c"), data: Bytes::from_static(b"\"s\"") },
                ),
            ),
            (
                r#"{"op":"history","id":5,"channel":"c"}"#,
                cmd(5, CommandKind::History { channel: ch("c"), since: None, limit: None }),
            ),
            (
                r#"{"op":"history","id":5,"channel":"c","since":{"offset":3,"epoch":"e"},"limit":0}"#,
                cmd(
                    5,
                    CommandKind::History { channel: ch("c"), since: pos(3, "e"), limit: Some(0) },
                ),
            ),
            (r#"{"op":"pong"}"#, Command { id: None, kind: CommandKind::Pong }),
            (r#"{"op":"pong","id":7}"#, Command { id: None, kind: CommandKind::Pong }),
            (r#"{"op":"pong","id":"junk"}"#, Command { id: None, kind: CommandKind::Pong }),
            // Escaped strings.
            (
                r#"{"op":"sub\u0073cribe","id":6,"channel":"a\/b\u003Ac"}"#,
                cmd(6, CommandKind::Subscribe { channel: ch("a/b:c"), since: None }),
            ),
            (
                r#"{"op":"connect","id":1,"token":"t\"\\\u00e9"}"#,
                cmd(1, CommandKind::Connect { token: Some("t\"\\é".into()) }),
            ),
            (
                r#"{"op":"subscribe","id":2,"channel":"c","since":{"epoch":"\u0041\n","offset":1}}"#,
                cmd(2, CommandKind::Subscribe { channel: ch("c"), since: pos(1, "A\n") }),
            ),
        ];
        for (line, want) in table {
            assert_eq!(ok(line), want, "{line}");
        }
    }

    macro_rules! fatal_cases {
        ($($line:expr),* $(,)?) => {$(
            match decode_command($line.as_bytes()) {
                Err(DecodeError::Fatal { .. }) => {}
                other => panic!("{:?}: expected Fatal, got {other:?}", $line),
            }
        )*};
    }

    #[test]
    fn fatal_without_object_or_usable_id() {
        fatal_cases!(
            "",
            "not json",
            "[1,2]",
            r#"["subscribe",1]"#,
            "\"op\"",
            "42",
            "null",
            r#"{"op":"subscribe","id":1"#,
            r#"{"op":"subscribe","id":1} trailing"#,
            r#"{"op":"subscribe","channel":"c"}"#,
            r#"{"op":"subscribe","id":0,"channel":"c"}"#,
            r#"{"op":"subscribe","id":-1,"channel":"c"}"#,
            r#"{"op":"subscribe","id":4294967296,"channel":"c"}"#,
            r#"{"op":"subscribe","id":1.5,"channel":"c"}"#,
            r#"{"op":"subscribe","id":1.0,"channel":"c"}"#,
            r#"{"op":"subscribe","id":"1","channel":"c"}"#,
            r#"{"op":"subscribe","id":null,"channel":"c"}"#,
            r#"{"op":"nope"}"#,
            r#"{"id":"x"}"#,
            r#"{}"#,
            r#"{"op":"connect","id":1,"id":2}"#,
        );
        // Invalid UTF-8 is not JSON.
        assert!(matches!(
            decode_command(b"{\"op\":\"connect\",\"id\":1,\"token\":\"\xff\"}"),
            Err(DecodeError::Fatal { .. })
        ));
    }

    #[test]
    fn reply_400_with_usable_id() {
        let table = [
            (r#"{"op":"nope","id":9}"#, "unknown op"),
            (r#"{"id":9}"#, "missing field `op`"),
            (r#"{"op":5,"id":9}"#, "`op` must be a string"),
            (r#"{"op":"subscribe","id":9}"#, "missing field `channel`"),
            (r#"{"op":"subscribe","id":9,"channel":null}"#, "missing field `channel`"),
            (r#"{"op":"subscribe","id":9,"channel":5}"#, "`channel` must be a string"),
            (r#"{"op":"subscribe","id":9,"channel":""}"#, "invalid `channel`"),
            (r#"{"op":"subscribe","id":9,"channel":"a b"}"#, "invalid `channel`"),
            (r#"{"op":"unsubscribe","id":9,"channel":"é"}"#, "invalid `channel`"),
            (r#"{"op":"history","id":9}"#, "missing field `channel`"),
            (r#"{"op":"publish","id":9,"data":1}"#, "missing field `channel`"),
            (r#"{"op":"publish","id":9,"channel":"c"}"#, "missing field `data`"),
            (r#"{"op":"subscribe","id":9,"channel":"c","since":1}"#, "invalid `since`"),
            (r#"{"op":"subscribe","id":9,"channel":"c","since":{"offset":1}}"#, "invalid `since`"),
            (r#"{"op":"subscribe","id":9,"channel":"c","since":{"epoch":"e"}}"#, "invalid `since`"),
            (
                r#"{"op":"subscribe","id":9,"channel":"c","since":{"offset":-1,"epoch":"e"}}"#,
                "invalid `since`",
            ),
            (
                r#"{"op":"history","id":9,"channel":"c","since":{"offset":1,"epoch":2}}"#,
                "invalid `since`",
            ),
            (r#"{"op":"history","id":9,"channel":"c","limit":-1}"#, "`limit`"),
            (r#"{"op":"history","id":9,"channel":"c","limit":"5"}"#, "`limit`"),
            (r#"{"op":"history","id":9,"channel":"c","limit":1.5}"#, "`limit`"),
            (r#"{"op":"connect","id":9,"token":5}"#, "`token` must be a string"),
            (r#"{"op":"refresh","id":9}"#, "missing field `token`"),
            (r#"{"op":"refresh","id":9,"token":null}"#, "missing field `token`"),
            (r#"{"op":"refresh","id":9,"token":[]}"#, "`token` must be a string"),
        ];
        for (line, needle) in table {
            match decode_command(line.as_bytes()) {
                Err(DecodeError::Reply { id: 9, code: ErrorCode::BadRequest, message }) => {
                    assert!(message.contains(needle), "{line}: {message:?} lacks {needle:?}")
                }
                other => panic!("{line}: expected Reply, got {other:?}"),
            }
        }
    }

    #[test]
    fn several_commands_per_frame() {
        let frame = b"{\"op\":\"connect\",\"id\":1}\r\n\n   \n\t\r\n{\"op\":\"pong\"}\n[1]\n{\"op\":\"x\",\"id\":2}\n";
        let got: Vec<_> = decode_commands(frame).collect();
        assert_eq!(got.len(), 4);
        assert_eq!(got[0], Ok(cmd(1, CommandKind::Connect { token: None })));
        assert_eq!(got[1], Ok(Command { id: None, kind: CommandKind::Pong }));
        assert!(matches!(got[2], Err(DecodeError::Fatal { .. })));
        assert!(matches!(got[3], Err(DecodeError::Reply { id: 2, .. })));
        assert_eq!(decode_commands(b"").count(), 0);
        assert_eq!(decode_commands(b"\n\r\n \n").count(), 0);
        assert_eq!(decode_commands(b"{\"op\":\"pong\"}").count(), 1);
    }

    #[test]
    fn encodes_commands() {
        let c = cmd(
            3,
            CommandKind::History {
                channel: ch("c"),
                since: Some(StreamPosition { offset: 7, epoch: "e\"".into() }),
                limit: Some(10),
            },
        );
        assert_eq!(
            String::from_utf8(encode_command(&c)).unwrap(),
            r#"{"op":"history","id":3,"channel":"c","since":{"offset":7,"epoch":"e\""},"limit":10}"#
        );
        let p =
            cmd(1, CommandKind::Publish { channel: ch("c"), data: Bytes::from_static(b"{\n}") });
        let line = encode_command(&p);
        assert!(!line.contains(&b'\n'));
        assert_eq!(decode_commands(&line).count(), 1);
        assert_eq!(
            encode_command(&Command { id: None, kind: CommandKind::Pong }),
            br#"{"op":"pong"}"#
        );
    }

    #[test]
    fn decodes_server_messages() {
        let frame = br#"{"id":1,"ok":{"client":"c1","ping_interval_ms":25000}}
{"id":2,"error":{"code":400,"message":"bad"}}
{"pub":{"channel":"news","offset":5,"data":{"x":1}}}
{"pub":{"channel":"news","data":null}}
{"ping":{}}
{"disconnect":{"code":4008,"reason":"slow consumer","reconnect":true}}
{"unsub":{"channel":"news","code":4003,"reason":"gone"}}
{"what":1}
{"id":3}"#;
        let got: Vec<_> = decode_server_messages(frame).collect();
        assert_eq!(got.len(), 9);
        assert_eq!(
            got[0].as_ref().unwrap(),
            &ServerMessage::Reply {
                id: 1,
                result: Ok(serde_json::json!({"client":"c1","ping_interval_ms":25000}))
            }
        );
        assert_eq!(
            got[1].as_ref().unwrap(),
            &ServerMessage::Reply {
                id: 2,
                result: Err(ReplyError { code: 400, message: "bad".into() })
            }
        );
        assert_eq!(
            got[2].as_ref().unwrap(),
            &ServerMessage::Pub {
                channel: "news".into(),
                offset: Some(5),
                epoch: None,
                data: serde_json::json!({"x":1}),
                binary: None
            }
        );
        assert_eq!(
            got[3].as_ref().unwrap(),
            &ServerMessage::Pub {
                channel: "news".into(),
                offset: None,
                epoch: None,
                data: serde_json::Value::Null,
                binary: None
            }
        );
        assert_eq!(got[4].as_ref().unwrap(), &ServerMessage::Ping);
        assert_eq!(
            got[5].as_ref().unwrap(),
            &ServerMessage::Disconnect {
                code: 4008,
                reason: "slow consumer".into(),
                reconnect: true
            }
        );
        assert_eq!(
            got[6].as_ref().unwrap(),
            &ServerMessage::Unsub { channel: "news".into(), code: 4003, reason: "gone".into() }
        );
        assert!(got[7].is_err());
        assert!(got[8].is_err());
    }

    fn arb_channel() -> impl Strategy<Value = ChannelName> {
        "[A-Za-z0-9_.:@/=#,-]{1,40}".prop_map(|s| ChannelName::parse(&s).unwrap())
    }

    fn arb_since() -> impl Strategy<Value = Option<StreamPosition>> {
        proptest::option::of(
            (any::<u64>(), ".{0,12}").prop_map(|(offset, epoch)| StreamPosition { offset, epoch }),
        )
    }

    fn arb_json() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<u64>().prop_map(serde_json::Value::from),
            ".{0,10}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
                proptest::collection::btree_map(".{0,6}", inner, 0..4)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn arb_command() -> impl Strategy<Value = Command> {
        let id = 1..=u32::MAX;
        prop_oneof![
            (id.clone(), proptest::option::of(".{0,20}"))
                .prop_map(|(id, token)| cmd(id, CommandKind::Connect { token })),
            (id.clone(), arb_channel(), arb_since()).prop_map(|(id, channel, since)| cmd(
                id,
                CommandKind::Subscribe { channel, since }
            )),
            (id.clone(), arb_channel())
                .prop_map(|(id, channel)| cmd(id, CommandKind::Unsubscribe { channel })),
            (id.clone(), arb_channel(), arb_json()).prop_map(|(id, channel, data)| cmd(
                id,
                CommandKind::Publish { channel, data: Bytes::from(data.to_string()) }
            )),
            (id.clone(), arb_channel(), arb_since(), proptest::option::of(any::<u64>())).prop_map(
                |(id, channel, since, limit)| cmd(
                    id,
                    CommandKind::History { channel, since, limit }
                )
            ),
            (id.clone(), ".{0,20}").prop_map(|(id, token)| cmd(id, CommandKind::Refresh { token })),
            Just(Command { id: None, kind: CommandKind::Pong }),
        ]
    }

    proptest! {
        #[test]
        fn commands_round_trip(cmds in proptest::collection::vec(arb_command(), 1..5)) {
            let mut frame = Vec::new();
            for c in &cmds {
                let line = encode_command(c);
                prop_assert_eq!(&decode_command(&line).unwrap(), c);
                frame.extend_from_slice(&line);
                frame.push(b'\n');
            }
            let got: Vec<Command> = decode_commands(&frame).map(Result::unwrap).collect();
            prop_assert_eq!(got, cmds);
        }

        #[test]
        fn decode_command_never_panics(line in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_command(&line);
            let _ = decode_commands(&line).count();
            let _ = decode_server_messages(&line).count();
        }

        #[test]
        fn decode_command_never_panics_on_near_json(
            op in prop_oneof![
                proptest::sample::select(vec!["subscribe", "publish", "history", "pong", "connect", "refresh"])
                    .prop_map(str::to_owned),
                ".{0,8}",
            ],
            fields in proptest::collection::vec(
                (prop_oneof![Just("id"), Just("channel"), Just("since"), Just("limit"), Just("data"), Just("token"), Just("offset"), Just("epoch")],
                 arb_json()),
                0..5),
        ) {
            let mut obj = serde_json::Map::new();
            obj.insert("op".into(), op.into());
            for (k, v) in fields {
                obj.insert(k.into(), v);
            }
            let line = serde_json::Value::Object(obj).to_string();
            if let Ok(c) = decode_command(line.as_bytes()) {
                prop_assert_eq!(decode_command(&encode_command(&c)).unwrap(), c);
            }
        }
    }
}
