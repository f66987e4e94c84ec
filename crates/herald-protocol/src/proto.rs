//! The `herald.proto` codec: Protocol Buffers messages of `proto/herald.proto`, in binary
//! WebSocket frames, each message preceded by its length as a varint (protobuf's "delimited"
//! form); a frame may carry several, in both directions.
//!
//! The server side is [`ProtoCodec`] (commands in, [`pb::ServerMessage`]s out); the `pub` push,
//! the one encoding on the fan-out path, is written by hand straight from the publication's
//! bytes. Clients (the Rust SDK, tests, the bench) encode commands with [`encode_command`] and
//! decode what the server sends with [`decode_server_messages`], into the same
//! [`ServerMessage`] the JSON decoder gives.
//!
//! ```
//! use herald_protocol::format::{Codec, WireFormat};
//! use herald_protocol::{proto, ChannelName, Command, CommandKind};
//!
//! let cmd = Command { id: Some(1), kind: CommandKind::Subscribe { channel: ChannelName::parse("news").unwrap(), since: None } };
//! let frame = proto::encode_command(&cmd);
//! let back: Vec<_> = WireFormat::Proto.codec().decode_commands(&frame).collect();
//! assert_eq!(back, vec![Ok(cmd)]);
//! ```

use bytes::Bytes;
use prost::encoding::{encode_varint, encoded_len_varint};
use prost::Message;

use crate::channel::ChannelName;
use crate::code::{CloseCode, ErrorCode};
use crate::command::{Command, CommandKind, StreamPosition};
use crate::format::{Codec, Commands, WireFormat};
use crate::json::{DecodeError, ReplyError, ServerMessage};
use crate::pb;
use crate::push::{is_json_text, PublicationRef, ReplyOk};

/// Why a message from the server could not be decoded (client side).
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
#[error("bad herald.proto message: {0}")]
pub struct ProtoError(pub String);

/// The `herald.proto` [`Codec`].
#[derive(Debug, Clone, Copy, Default)]
pub struct ProtoCodec;

/// Splits the next varint-delimited message off `rest`.
fn next_delimited<'a>(rest: &mut &'a [u8]) -> Result<&'a [u8], String> {
    let mut buf = *rest;
    let len =
        prost::encoding::decode_varint(&mut buf).map_err(|e| format!("bad length prefix: {e}"))?;
    let len = usize::try_from(len).unwrap_or(usize::MAX);
    if len > buf.len() {
        return Err(format!("a message of {len} bytes announced, {} left in the frame", buf.len()));
    }
    let (message, tail) = buf.split_at(len);
    *rest = tail;
    Ok(message)
}

/// The messages of one frame, each as its bytes, split on their varint length prefixes; a
/// prefix that is not a varint or announces more than the frame holds is an error and ends the
/// sequence.
pub fn delimited(frame: &[u8]) -> impl Iterator<Item = Result<&[u8], String>> + Send + '_ {
    let mut rest = frame;
    let mut failed = false;
    std::iter::from_fn(move || {
        if failed || rest.is_empty() {
            return None;
        }
        let next = next_delimited(&mut rest);
        failed = next.is_err();
        Some(next)
    })
}

fn fatal(message: impl Into<String>) -> DecodeError {
    DecodeError::Fatal { message: message.into() }
}

fn op_name(op: &pb::command::Op) -> &'static str {
    use pb::command::Op;
    match op {
        Op::Connect(_) => "connect",
        Op::Subscribe(_) => "subscribe",
        Op::Unsubscribe(_) => "unsubscribe",
        Op::Publish(_) => "publish",
        Op::History(_) => "history",
        Op::Refresh(_) => "refresh",
        Op::Pong(_) => "pong",
    }
}

fn channel(name: &str) -> Result<ChannelName, String> {
    if name.is_empty() {
        return Err("missing field `channel`".to_owned());
    }
    ChannelName::parse(name).map_err(|e| format!("invalid `channel`: {e}"))
}

fn position(p: pb::StreamPosition) -> StreamPosition {
    StreamPosition { offset: p.offset, epoch: p.epoch }
}

/// Decodes one `Command` message (without its length prefix).
pub fn decode_command(message: &[u8]) -> Result<Command, DecodeError> {
    use pb::command::Op;
    let cmd =
        pb::Command::decode(message).map_err(|e| fatal(format!("not a herald.v1.Command: {e}")))?;
    if let Some(Op::Pong(_)) = cmd.op {
        return Ok(Command { id: None, kind: CommandKind::Pong });
    }
    if cmd.id == 0 {
        return Err(fatal(match &cmd.op {
            Some(op) => format!("command `{}` needs an id (1..=4294967295)", op_name(op)),
            None => "command needs an op and an id (1..=4294967295)".to_owned(),
        }));
    }
    let id = cmd.id;
    let bad = |message: String| DecodeError::Reply { id, code: ErrorCode::BadRequest, message };
    let kind = match cmd.op {
        None => {
            return Err(bad("missing or unknown op (no field of `op` this server knows)".into()))
        }
        Some(Op::Pong(_)) => CommandKind::Pong,
        Some(Op::Connect(c)) => CommandKind::Connect { token: c.token },
        Some(Op::Subscribe(s)) => CommandKind::Subscribe {
            channel: channel(&s.channel).map_err(bad)?,
            since: s.since.map(position),
        },
        Some(Op::Unsubscribe(u)) => {
            CommandKind::Unsubscribe { channel: channel(&u.channel).map_err(bad)? }
        }
        Some(Op::Publish(p)) => CommandKind::Publish {
            channel: channel(&p.channel).map_err(bad)?,
            data: p.data.ok_or_else(|| bad("missing field `data`".into()))?,
        },
        Some(Op::History(h)) => CommandKind::History {
            channel: channel(&h.channel).map_err(bad)?,
            since: h.since.map(position),
            limit: h.limit,
        },
        // An empty token is a bad token (401 from the verifier), as `"token": ""` in JSON.
        Some(Op::Refresh(r)) => CommandKind::Refresh { token: r.token },
    };
    Ok(Command { id: Some(id), kind })
}

/// Decodes the commands of one binary message.
pub fn decode_commands(
    message: &[u8],
) -> impl Iterator<Item = Result<Command, DecodeError>> + Send + '_ {
    let mut commands = delimited(message).map(|m| m.map_err(fatal).and_then(decode_command));
    let mut ended = false;
    std::iter::from_fn(move || {
        if ended {
            return None;
        }
        let next = commands.next()?;
        ended = matches!(next, Err(DecodeError::Fatal { .. }));
        Some(next)
    })
}

/// Encodes one command, length-prefixed (a frame may hold several such, concatenated).
pub fn encode_command(cmd: &Command) -> Vec<u8> {
    use pb::command::Op;
    let channel = |c: &ChannelName| c.as_str().to_owned();
    let since = |s: &Option<StreamPosition>| {
        s.as_ref().map(|p| pb::StreamPosition { offset: p.offset, epoch: p.epoch.clone() })
    };
    let op = match &cmd.kind {
        CommandKind::Connect { token } => Op::Connect(pb::Connect { token: token.clone() }),
        CommandKind::Subscribe { channel: c, since: s } => {
            Op::Subscribe(pb::Subscribe { channel: channel(c), since: since(s) })
        }
        CommandKind::Unsubscribe { channel: c } => {
            Op::Unsubscribe(pb::Unsubscribe { channel: channel(c) })
        }
        CommandKind::Publish { channel: c, data } => {
            Op::Publish(pb::Publish { channel: channel(c), data: Some(data.clone()) })
        }
        CommandKind::History { channel: c, since: s, limit } => {
            Op::History(pb::History { channel: channel(c), since: since(s), limit: *limit })
        }
        CommandKind::Refresh { token } => Op::Refresh(pb::Refresh { token: token.clone() }),
        CommandKind::Pong => Op::Pong(pb::Pong {}),
    };
    pb::Command { id: cmd.id.unwrap_or(0), op: Some(op) }.encode_length_delimited_to_vec()
}

/// A server message, length-prefixed.
fn server_message(kind: pb::server_message::Kind) -> Vec<u8> {
    pb::ServerMessage { kind: Some(kind) }.encode_length_delimited_to_vec()
}

fn reply(id: u32, result: pb::reply::Result) -> Vec<u8> {
    server_message(pb::server_message::Kind::Reply(pb::Reply { id, result: Some(result) }))
}

fn pb_position(p: Option<&StreamPosition>) -> Option<pb::StreamPosition> {
    p.map(|p| pb::StreamPosition { offset: p.offset, epoch: p.epoch.clone() })
}

fn pb_publications(publications: &[PublicationRef<'_>]) -> Vec<pb::Publication> {
    publications
        .iter()
        .map(|p| pb::Publication { offset: p.offset, data: Bytes::copy_from_slice(p.data) })
        .collect()
}

/// Length of a length-delimited field (key of one byte: fields 1..=15).
fn len_field(len: usize) -> usize {
    1 + encoded_len_varint(len as u64) + len
}

fn put_len_field(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    out.push((field << 3 | 2) as u8);
    encode_varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

/// `ServerMessage { pub: Pub { channel, offset, epoch, data } }`, length-prefixed, written
/// directly (the fan-out path): the same bytes prost gives for the message.
pub fn encode_pub(channel: &str, offset: Option<u64>, epoch: Option<&str>, data: &[u8]) -> Vec<u8> {
    let inner = len_field(channel.len())
        + offset.map_or(0, |o| 1 + encoded_len_varint(o))
        + epoch.map_or(0, |e| len_field(e.len()))
        + if data.is_empty() { 0 } else { len_field(data.len()) };
    let outer = len_field(inner);
    let mut out = Vec::with_capacity(encoded_len_varint(outer as u64) + outer);
    encode_varint(outer as u64, &mut out);
    // ServerMessage.pub = 2
    out.push(2 << 3 | 2);
    encode_varint(inner as u64, &mut out);
    put_len_field(&mut out, 1, channel.as_bytes());
    if let Some(offset) = offset {
        out.push(2 << 3);
        encode_varint(offset, &mut out);
    }
    if let Some(epoch) = epoch {
        put_len_field(&mut out, 3, epoch.as_bytes());
    }
    if !data.is_empty() {
        put_len_field(&mut out, 4, data);
    }
    out
}

impl Codec for ProtoCodec {
    fn format(&self) -> WireFormat {
        WireFormat::Proto
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
        encode_pub(channel, offset, epoch, data)
    }

    fn encode_reply_ok(&self, id: u32, ok: &ReplyOk<'_>) -> Vec<u8> {
        use pb::reply::Result as R;
        let result = match *ok {
            ReplyOk::Connect { client, ping_interval_ms } => {
                R::Connect(pb::ConnectOk { client: client.to_owned(), ping_interval_ms })
            }
            ReplyOk::Subscribe { position, recovered, publications } => {
                R::Subscribe(pb::SubscribeOk {
                    position: pb_position(position),
                    recovered,
                    publications: pb_publications(publications),
                    partial: false,
                })
            }
            ReplyOk::Unsubscribe => R::Unsubscribe(pb::Empty {}),
            ReplyOk::Refresh => R::Refresh(pb::Empty {}),
            ReplyOk::Publish { offset } => R::Publish(pb::PublishOk { offset }),
            ReplyOk::History { position, publications, more } => R::History(pb::HistoryOk {
                position: pb_position(position),
                publications: pb_publications(publications),
                more,
            }),
        };
        reply(id, result)
    }

    fn encode_reply_error(&self, id: u32, code: ErrorCode, message: &str) -> Vec<u8> {
        let error = pb::Error { code: u32::from(code.as_u16()), message: message.to_owned() };
        reply(id, pb::reply::Result::Error(error))
    }

    fn encode_ping(&self) -> Vec<u8> {
        server_message(pb::server_message::Kind::Ping(pb::Ping {}))
    }

    fn encode_disconnect(&self, code: CloseCode) -> Vec<u8> {
        server_message(pb::server_message::Kind::Disconnect(pb::Disconnect {
            code: u32::from(code.as_u16()),
            reason: code.reason().to_owned(),
            reconnect: code.reconnect(),
        }))
    }

    fn encode_unsub(&self, channel: &str, code: u16, reason: &str) -> Vec<u8> {
        server_message(pb::server_message::Kind::Unsub(pb::Unsub {
            channel: channel.to_owned(),
            code: u32::from(code),
            reason: reason.to_owned(),
        }))
    }

    fn subscribe_head(&self, id: u32, publications: &[PublicationRef<'_>]) -> Vec<u8> {
        self.subscribe_more(id, publications, true)
    }

    fn subscribe_more(
        &self,
        id: u32,
        publications: &[PublicationRef<'_>],
        _first: bool,
    ) -> Vec<u8> {
        reply(
            id,
            pb::reply::Result::Subscribe(pb::SubscribeOk {
                position: None,
                recovered: false,
                publications: pb_publications(publications),
                partial: true,
            }),
        )
    }

    fn subscribe_tail(
        &self,
        id: u32,
        position: Option<&StreamPosition>,
        recovered: bool,
    ) -> Vec<u8> {
        reply(
            id,
            pb::reply::Result::Subscribe(pb::SubscribeOk {
                position: pb_position(position),
                recovered,
                publications: Vec::new(),
                partial: false,
            }),
        )
    }
}

// ---- client side -------------------------------------------------------------------------

/// A publication's data as JSON sees it: the JSON value when the bytes are JSON text, else
/// `null` and the bytes.
fn data_value(data: &[u8]) -> (serde_json::Value, Option<Vec<u8>>) {
    if is_json_text(data) {
        if let Ok(v) = serde_json::from_slice(data) {
            return (v, None);
        }
    }
    (serde_json::Value::Null, Some(data.to_vec()))
}

/// The JSON form of a publication in a reply: `{"offset":N,"data":...}` or with `b64data`.
fn publication_json(p: &pb::Publication) -> serde_json::Value {
    use base64::Engine as _;
    let mut o = serde_json::Map::new();
    if let Some(offset) = p.offset {
        o.insert("offset".into(), offset.into());
    }
    match data_value(&p.data) {
        (v, None) => o.insert("data".into(), v),
        (_, Some(bytes)) => {
            o.insert("data".into(), serde_json::Value::Null);
            o.insert(
                "b64data".into(),
                base64::engine::general_purpose::STANDARD.encode(bytes).into(),
            )
        }
    };
    serde_json::Value::Object(o)
}

fn position_json(
    o: &mut serde_json::Map<String, serde_json::Value>,
    p: &Option<pb::StreamPosition>,
) {
    if let Some(p) = p {
        o.insert("offset".into(), p.offset.into());
        o.insert("epoch".into(), p.epoch.clone().into());
    }
}

/// A reply's result in the shape of the JSON `ok` body (so a client handles both formats alike).
fn reply_json(result: pb::reply::Result) -> Result<serde_json::Value, ReplyError> {
    use pb::reply::Result as R;
    use serde_json::{json, Map, Value};
    let mut o = Map::new();
    match result {
        R::Error(e) => {
            return Err(ReplyError { code: u16::try_from(e.code).unwrap_or(0), message: e.message })
        }
        R::Connect(c) => {
            o.insert("client".into(), c.client.into());
            o.insert("ping_interval_ms".into(), c.ping_interval_ms.into());
        }
        R::Subscribe(s) => {
            position_json(&mut o, &s.position);
            o.insert("recovered".into(), s.recovered.into());
            let pubs: Vec<Value> = s.publications.iter().map(publication_json).collect();
            o.insert("publications".into(), pubs.into());
        }
        R::Unsubscribe(_) | R::Refresh(_) => {}
        R::Publish(p) => {
            if let Some(offset) = p.offset {
                o.insert("offset".into(), json!(offset));
            }
        }
        R::History(h) => {
            position_json(&mut o, &h.position);
            let pubs: Vec<Value> = h.publications.iter().map(publication_json).collect();
            o.insert("publications".into(), pubs.into());
            if h.more {
                o.insert("more".into(), true.into());
            }
        }
    }
    Ok(Value::Object(o))
}

/// Decodes the messages of one binary frame from the server. The parts of a `subscribe` reply
/// sent in parts (`partial` set) are joined into one reply, as JSON sends it. A message of a
/// kind this decoder does not know (a newer server) is skipped, as the JSON decoder skips
/// unknown messages; a reply whose result it does not know is handed over as an error reply
/// (code 0), so its waiter is not left hanging.
pub fn decode_server_messages(frame: &[u8]) -> Vec<Result<ServerMessage, ProtoError>> {
    use pb::server_message::Kind;
    let mut out = Vec::new();
    // Publications of a subscribe reply whose parts are still arriving: (id, publications).
    let mut parts: Option<(u32, Vec<pb::Publication>)> = None;
    for message in delimited(frame) {
        let decoded = message
            .and_then(|m| pb::ServerMessage::decode(m).map_err(|e| e.to_string()))
            .map_err(ProtoError);
        let message = match decoded {
            Ok(m) => m,
            Err(e) => {
                out.push(Err(e));
                break;
            }
        };
        let item = match message.kind {
            None => continue,
            Some(Kind::Reply(r)) => match (r.result, parts.take()) {
                (Some(pb::reply::Result::Subscribe(mut s)), held) => {
                    let mut publications = match held {
                        Some((id, held)) if id == r.id => held,
                        Some(_) => {
                            out.push(Err(ProtoError("a reply in parts was cut short".into())));
                            Vec::new()
                        }
                        None => Vec::new(),
                    };
                    publications.append(&mut s.publications);
                    if s.partial {
                        parts = Some((r.id, publications));
                        continue;
                    }
                    s.publications = publications;
                    Ok(ServerMessage::Reply {
                        id: r.id,
                        result: reply_json(pb::reply::Result::Subscribe(s)),
                    })
                }
                (result, held) => {
                    if held.is_some() {
                        out.push(Err(ProtoError("a reply in parts was cut short".into())));
                    }
                    match result {
                        Some(result) => {
                            Ok(ServerMessage::Reply { id: r.id, result: reply_json(result) })
                        }
                        None => Ok(ServerMessage::Reply {
                            id: r.id,
                            result: Err(ReplyError {
                                code: 0,
                                message: "a reply of a kind this client does not know".into(),
                            }),
                        }),
                    }
                }
            },
            Some(Kind::Pub(p)) => {
                let (data, binary) = data_value(&p.data);
                Ok(ServerMessage::Pub {
                    channel: p.channel,
                    offset: p.offset,
                    epoch: p.epoch,
                    data,
                    binary,
                })
            }
            Some(Kind::Ping(_)) => Ok(ServerMessage::Ping),
            Some(Kind::Disconnect(d)) => Ok(ServerMessage::Disconnect {
                code: u16::try_from(d.code).unwrap_or(0),
                reason: d.reason,
                reconnect: d.reconnect,
            }),
            Some(Kind::Unsub(u)) => Ok(ServerMessage::Unsub {
                channel: u.channel,
                code: u16::try_from(u.code).unwrap_or(0),
                reason: u.reason,
            }),
        };
        out.push(item);
    }
    if parts.is_some() {
        out.push(Err(ProtoError("a reply in parts did not end in its frame".into())));
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ch(s: &str) -> ChannelName {
        ChannelName::parse(s).unwrap()
    }

    #[test]
    fn the_hand_written_pub_is_what_prost_writes() {
        for (offset, epoch, data) in [
            (Some(7), Some("e1"), &b"\x00\x01binary"[..]),
            (None, None, &b"{\"x\":1}"[..]),
            (Some(0), None, &b""[..]),
            (Some(u64::MAX), Some(""), &[0xffu8; 300][..]),
        ] {
            let expected = pb::ServerMessage {
                kind: Some(pb::server_message::Kind::Pub(pb::Pub {
                    channel: "market:EURUSD".into(),
                    offset,
                    epoch: epoch.map(str::to_owned),
                    data: Bytes::copy_from_slice(data),
                })),
            };
            assert_eq!(
                encode_pub("market:EURUSD", offset, epoch, data),
                expected.encode_length_delimited_to_vec()
            );
        }
    }

    #[test]
    fn commands_decode_with_clear_errors() {
        let sub = Command {
            id: Some(1),
            kind: CommandKind::Subscribe {
                channel: ch("a"),
                since: Some(StreamPosition { offset: 3, epoch: "e".into() }),
            },
        };
        let publish = Command {
            id: Some(2),
            kind: CommandKind::Publish { channel: ch("a"), data: Bytes::from_static(b"\x00\xff") },
        };
        let pong = Command { id: None, kind: CommandKind::Pong };
        let mut frame = encode_command(&sub);
        frame.extend(encode_command(&pong));
        frame.extend(encode_command(&publish));
        let got: Vec<_> = decode_commands(&frame).collect();
        assert_eq!(got, vec![Ok(sub), Ok(pong), Ok(publish)]);

        // A bad channel with a usable id: a reply; no id: fatal.
        let bad = pb::Command {
            id: 5,
            op: Some(pb::command::Op::Unsubscribe(pb::Unsubscribe { channel: "a b".into() })),
        };
        let got: Vec<_> = decode_commands(&bad.encode_length_delimited_to_vec()).collect();
        assert!(
            matches!(&got[..], [Err(DecodeError::Reply { id: 5, code: ErrorCode::BadRequest, message })] if message.contains("channel"))
        );
        let no_op = pb::Command { id: 6, op: None }.encode_length_delimited_to_vec();
        assert!(matches!(
            &decode_commands(&no_op).collect::<Vec<_>>()[..],
            [Err(DecodeError::Reply { id: 6, .. })]
        ));
        let no_id = pb::Command {
            id: 0,
            op: Some(pb::command::Op::Unsubscribe(pb::Unsubscribe { channel: "a".into() })),
        };
        assert!(matches!(
            &decode_commands(&no_id.encode_length_delimited_to_vec()).collect::<Vec<_>>()[..],
            [Err(DecodeError::Fatal { .. })]
        ));
        // A length past the frame's end, or garbage: fatal, and nothing after it.
        let got: Vec<_> = decode_commands(&[0x05, 0x08, 0x01]).collect();
        assert!(
            matches!(&got[..], [Err(DecodeError::Fatal { message })] if message.contains("announced"))
        );
        let got: Vec<_> = decode_commands(&[0x02, 0xff, 0xff, 0x00]).collect();
        assert!(matches!(&got[..], [Err(DecodeError::Fatal { .. })]));
    }

    #[test]
    fn a_reply_in_parts_decodes_as_one() {
        let codec = ProtoCodec;
        let p = |o: u64, d: &'static [u8]| PublicationRef { offset: Some(o), data: d };
        let mut frame = codec.subscribe_head(4, &[p(1, b"1"), p(2, b"\x00")]);
        frame.extend(codec.subscribe_more(4, &[p(3, b"[3]")], false));
        let top = StreamPosition { offset: 3, epoch: "e".into() };
        frame.extend(codec.subscribe_tail(4, Some(&top), true));
        frame.extend(codec.encode_ping());
        let got = decode_server_messages(&frame);
        assert_eq!(
            got,
            vec![
                Ok(ServerMessage::Reply {
                    id: 4,
                    result: Ok(
                        json!({"offset": 3, "epoch": "e", "recovered": true, "publications": [
                            {"offset": 1, "data": 1}, {"offset": 2, "data": null, "b64data": "AA=="}, {"offset": 3, "data": [3]}
                        ]})
                    )
                }),
                Ok(ServerMessage::Ping),
            ]
        );
        // The same reply in one piece decodes the same.
        let whole = codec.encode_reply_ok(
            4,
            &ReplyOk::Subscribe {
                position: Some(&top),
                recovered: true,
                publications: &[p(1, b"1"), p(2, b"\x00"), p(3, b"[3]")],
            },
        );
        assert_eq!(decode_server_messages(&whole)[0], got[0]);
        // Parts that never end are an error, not a silent loss.
        let cut = codec.subscribe_head(4, &[p(1, b"1")]);
        assert!(decode_server_messages(&cut).iter().any(Result::is_err));
    }
}
