//! Property tests of the two wire formats: every command and every server message round-trips
//! through `herald.json` and `herald.proto`, and the two agree: the same command decodes the
//! same from both, the same push or reply reaches a client the same through both, and bad
//! input is judged alike (same id and code).

#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use herald_protocol::json::{self, DecodeError, ServerMessage};
use herald_protocol::push::{is_json_text, PublicationRef, ReplyOk};
use herald_protocol::{pb, proto, ChannelName, CloseCode, Command, CommandKind, ErrorCode};
use herald_protocol::{StreamPosition, WireFormat};
use proptest::prelude::*;
use prost::Message as _;

fn channel() -> impl Strategy<Value = ChannelName> {
    "[A-Za-z0-9_.:@/=#,-]{1,40}".prop_map(|s| ChannelName::parse(&s).unwrap())
}

fn text() -> impl Strategy<Value = String> {
    // Quotes, escapes, control characters and non-ASCII included.
    "(\\PC|[\"\\\\\n\t\u{1}]){0,24}"
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        text().prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            prop::collection::btree_map(text(), inner, 0..4)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Publication data: compact JSON text, bytes that are not JSON text, and JSON-shaped bytes
/// that may not be UTF-8 (a string of arbitrary bytes).
fn data() -> impl Strategy<Value = Bytes> {
    prop_oneof![
        json_value().prop_map(|v| Bytes::from(serde_json::to_vec(&v).unwrap())),
        prop::collection::vec(any::<u8>(), 0..64)
            .prop_filter("not JSON text", |b| !is_json_text(b))
            .prop_map(Bytes::from),
        prop::collection::vec(any::<u8>(), 0..16).prop_map(|inner| {
            let inner: Vec<u8> = inner.into_iter().filter(|b| *b != b'"' && *b != b'\\').collect();
            Bytes::from([&b"\""[..], &inner, b"\""].concat())
        }),
    ]
}

fn position() -> impl Strategy<Value = StreamPosition> {
    (any::<u64>(), text()).prop_map(|(offset, epoch)| StreamPosition { offset, epoch })
}

fn command() -> impl Strategy<Value = Command> {
    let id = 1..=u32::MAX;
    let kind = prop_oneof![
        prop::option::of(text()).prop_map(|token| CommandKind::Connect { token }),
        (channel(), prop::option::of(position()))
            .prop_map(|(channel, since)| CommandKind::Subscribe { channel, since }),
        channel().prop_map(|channel| CommandKind::Unsubscribe { channel }),
        (channel(), data()).prop_map(|(channel, data)| CommandKind::Publish { channel, data }),
        (channel(), prop::option::of(position()), prop::option::of(any::<u64>()))
            .prop_map(|(channel, since, limit)| CommandKind::History { channel, since, limit }),
        "[^\\x00]{1,30}".prop_map(|token| CommandKind::Refresh { token }),
    ];
    prop_oneof![
        (id, kind).prop_map(|(id, kind)| Command { id: Some(id), kind }),
        Just(Command { id: None, kind: CommandKind::Pong }),
    ]
}

/// What each format gives back for `cmd`. JSON carries `Connect { token: Some("") }` and a
/// token as written; protobuf's `optional` token too.
fn decoded(format: WireFormat, cmd: &Command) -> Vec<Result<Command, DecodeError>> {
    let bytes = match format {
        WireFormat::Json => json::encode_command(cmd),
        WireFormat::Proto => proto::encode_command(cmd),
    };
    format.codec().decode_commands(&bytes).collect()
}

/// The client's view of one server message encoded by `format`.
fn client_view(format: WireFormat, bytes: &[u8]) -> Vec<ServerMessage> {
    match format {
        WireFormat::Json => json::decode_server_messages(bytes).map(Result::unwrap).collect(),
        WireFormat::Proto => {
            proto::decode_server_messages(bytes).into_iter().map(Result::unwrap).collect()
        }
    }
}

/// The same, through both formats, asserted equal.
fn both(encode: impl Fn(WireFormat) -> Vec<u8>) -> Vec<ServerMessage> {
    let json = client_view(WireFormat::Json, &encode(WireFormat::Json));
    let proto = client_view(WireFormat::Proto, &encode(WireFormat::Proto));
    assert_eq!(json, proto);
    json
}

/// What a client holds for `data`: the JSON value, or the bytes.
fn data_view(data: &[u8]) -> (serde_json::Value, Option<Vec<u8>>) {
    if is_json_text(data) {
        (serde_json::from_slice(data).unwrap(), None)
    } else {
        (serde_json::Value::Null, Some(data.to_vec()))
    }
}

fn publication_json(p: &PublicationRef<'_>) -> serde_json::Value {
    use base64::Engine as _;
    let mut o = serde_json::Map::new();
    if let Some(offset) = p.offset {
        o.insert("offset".into(), offset.into());
    }
    match data_view(p.data) {
        (v, None) => o.insert("data".into(), v),
        (_, Some(b)) => {
            o.insert("data".into(), serde_json::Value::Null);
            o.insert("b64data".into(), base64::engine::general_purpose::STANDARD.encode(b).into())
        }
    };
    o.into()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn every_command_round_trips_through_both_formats(cmd in command()) {
        prop_assert_eq!(decoded(WireFormat::Json, &cmd), vec![Ok(cmd.clone())]);
        prop_assert_eq!(decoded(WireFormat::Proto, &cmd), vec![Ok(cmd)]);
    }

    #[test]
    fn several_commands_per_message_decode_in_order(cmds in prop::collection::vec(command(), 1..6)) {
        let mut json_frame = Vec::new();
        let mut proto_frame = Vec::new();
        for c in &cmds {
            json_frame.extend(json::encode_command(c));
            json_frame.push(b'\n');
            proto_frame.extend(proto::encode_command(c));
        }
        let want: Vec<Result<Command, DecodeError>> = cmds.into_iter().map(Ok).collect();
        prop_assert_eq!(&json::decode_commands(&json_frame).collect::<Vec<_>>(), &want);
        prop_assert_eq!(&proto::decode_commands(&proto_frame).collect::<Vec<_>>(), &want);
    }

    /// A subscribe with any channel text, written in each format: both decoders accept the
    /// same names and refuse the others with the same id and code.
    #[test]
    fn both_decoders_judge_channel_names_alike(id in 1..=u32::MAX, name in "\\PC{0,8}|[a-z:#,]{1,300}") {
        let json_text = format!(
            "{{\"op\":\"subscribe\",\"id\":{id},\"channel\":{}}}",
            serde_json::to_string(&name).unwrap()
        );
        let json_result = json::decode_command(json_text.as_bytes());
        let pb_cmd = pb::Command {
            id,
            op: Some(pb::command::Op::Subscribe(pb::Subscribe { channel: name.clone(), since: None })),
        };
        let proto_result: Vec<_> = proto::decode_commands(&pb_cmd.encode_length_delimited_to_vec()).collect();
        prop_assert_eq!(proto_result.len(), 1);
        match (&json_result, &proto_result[0]) {
            (Ok(a), Ok(b)) => prop_assert_eq!(a, b),
            (Err(DecodeError::Reply { id: a, code: ca, .. }), Err(DecodeError::Reply { id: b, code: cb, .. })) => {
                prop_assert_eq!((a, ca), (b, cb));
                prop_assert_eq!(*ca, ErrorCode::BadRequest);
            }
            (a, b) => prop_assert!(false, "json {:?} vs proto {:?}", a, b),
        }
    }

    #[test]
    fn a_pub_reaches_clients_alike_through_both_formats(
        channel in channel(),
        offset in prop::option::of(any::<u64>()),
        epoch in prop::option::of(text()),
        data in data(),
    ) {
        let got = both(|f| f.codec().encode_pub(channel.as_str(), offset, epoch.as_deref(), &data));
        let (value, binary) = data_view(&data);
        prop_assert_eq!(got, vec![ServerMessage::Pub {
            channel: channel.as_str().to_owned(), offset, epoch, data: value, binary,
        }]);
    }

    #[test]
    fn replies_reach_clients_alike_through_both_formats(
        id in 1..=u32::MAX,
        pos in prop::option::of(position()),
        recovered in any::<bool>(),
        more in any::<bool>(),
        items in prop::collection::vec((prop::option::of(any::<u64>()), data()), 0..5),
        client in text(),
        interval in any::<u64>(),
        message in text(),
    ) {
        let pubs: Vec<PublicationRef<'_>> =
            items.iter().map(|(offset, data)| PublicationRef { offset: *offset, data }).collect();
        let list: Vec<serde_json::Value> = pubs.iter().map(publication_json).collect();
        let mut positioned = serde_json::Map::new();
        if let Some(p) = &pos {
            positioned.insert("offset".into(), p.offset.into());
            positioned.insert("epoch".into(), p.epoch.clone().into());
        }
        let oks: Vec<(ReplyOk<'_>, serde_json::Value)> = vec![
            (
                ReplyOk::Connect { client: &client, ping_interval_ms: interval },
                serde_json::json!({"client": client, "ping_interval_ms": interval}),
            ),
            (ReplyOk::Subscribe { position: pos.as_ref(), recovered, publications: &pubs }, {
                let mut o = positioned.clone();
                o.insert("recovered".into(), recovered.into());
                o.insert("publications".into(), list.clone().into());
                o.into()
            }),
            (ReplyOk::History { position: pos.as_ref(), publications: &pubs, more }, {
                let mut o = positioned.clone();
                o.insert("publications".into(), list.clone().into());
                if more {
                    o.insert("more".into(), true.into());
                }
                o.into()
            }),
            (ReplyOk::Publish { offset: pos.as_ref().map(|p| p.offset) }, match &pos {
                Some(p) => serde_json::json!({"offset": p.offset}),
                None => serde_json::json!({}),
            }),
            (ReplyOk::Unsubscribe, serde_json::json!({})),
            (ReplyOk::Refresh, serde_json::json!({})),
        ];
        for (ok, want) in oks {
            let got = both(|f| f.codec().encode_reply_ok(id, &ok));
            prop_assert_eq!(got, vec![ServerMessage::Reply { id, result: Ok(want) }]);
        }
        // A subscribe reply in parts reaches the client as the reply in one piece.
        let parts = |f: WireFormat| {
            let c = f.codec();
            let (head, rest) = pubs.split_at(pubs.len().min(1));
            let mut out = c.subscribe_head(id, head);
            out.extend(c.subscribe_more(id, rest, head.is_empty()));
            out.extend(c.subscribe_tail(id, pos.as_ref(), recovered));
            out
        };
        let whole = both(|f| f.codec().encode_reply_ok(id, &ReplyOk::Subscribe {
            position: pos.as_ref(), recovered, publications: &pubs,
        }));
        prop_assert_eq!(both(parts), whole);
        let code = ErrorCode::ALL[(id as usize) % ErrorCode::ALL.len()];
        let got = both(|f| f.codec().encode_reply_error(id, code, &message));
        prop_assert_eq!(got, vec![ServerMessage::Reply {
            id,
            result: Err(json::ReplyError { code: code.as_u16(), message: message.clone() }),
        }]);
        let got = both(|f| f.codec().encode_unsub(&client, 4003, &message));
        prop_assert_eq!(got, vec![ServerMessage::Unsub { channel: client.clone(), code: 4003, reason: message.clone() }]);
    }
}

#[test]
fn pings_and_disconnects_reach_clients_alike() {
    assert_eq!(both(|f| f.codec().encode_ping()), vec![ServerMessage::Ping]);
    for code in [CloseCode::SlowConsumer, CloseCode::ProtocolError, CloseCode::TokenExpired] {
        assert_eq!(
            both(|f| f.codec().encode_disconnect(code)),
            vec![ServerMessage::Disconnect {
                code: code.as_u16(),
                reason: code.reason().to_owned(),
                reconnect: code.reconnect(),
            }]
        );
    }
}
