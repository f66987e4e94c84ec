//! `herald.proto` end to end with the real binary: subprotocol negotiation, protobuf and JSON
//! clients on one channel, binary data reaching JSON and SSE subscribers as `b64data`,
//! protobuf API bodies, a recovery larger than a page in parts, and frames of the wrong kind.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use base64::Engine as _;
use common::{Server, TIMEOUT};
use herald_client::{Client, ConnectOptions, Event, Events, Opcode};
use herald_protocol::WireFormat;
use serde_json::{json, Value};

const CONFIG: &str = "[namespaces.m]\nhistory_size = 1000\nclient_publish = true\n\
                      [namespaces.live]\nclient_publish = true\n";

async fn connect(server: &Server, format: WireFormat) -> (Client, Events) {
    let options = ConnectOptions { format, ..ConnectOptions::default() };
    let (c, e, info) = Client::connect(&server.ws_url(), options).await.expect("connects");
    assert!(info.expect("connect reply").ping_interval_ms > 0);
    (c, e)
}

/// The upgrade answer to a request offering `protocols` (one header line each).
fn upgrade_with(server: &Server, protocols: &[&str]) -> String {
    let mut stream = std::net::TcpStream::connect(server.addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut request = String::from(
        "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n",
    );
    for p in protocols {
        request.push_str(&format!("Sec-WebSocket-Protocol: {p}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
        }
    }
    // The body of a refusal, if any, follows the head.
    std::thread::sleep(Duration::from_millis(50));
    stream.set_nonblocking(true).unwrap();
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&answer).to_lowercase()
}

#[test]
fn the_server_picks_an_offered_subprotocol_or_refuses_clearly() {
    let server = Server::start("", &[]);
    let chosen = |answer: &str| {
        answer
            .lines()
            .find_map(|l| l.strip_prefix("sec-websocket-protocol:"))
            .map(|p| p.trim().to_owned())
    };
    let proto = upgrade_with(&server, &["herald.proto"]);
    assert!(proto.starts_with("http/1.1 101"), "{proto}");
    assert_eq!(chosen(&proto).as_deref(), Some("herald.proto"));
    // The client's order of preference, unknown names skipped, over several header lines.
    let both = upgrade_with(&server, &["x.unknown, herald.json", "herald.proto"]);
    assert_eq!(chosen(&both).as_deref(), Some("herald.json"));
    // None offered: JSON, and no subprotocol named.
    let none = upgrade_with(&server, &[]);
    assert!(none.starts_with("http/1.1 101"), "{none}");
    assert_eq!(chosen(&none), None);
    // Only unknown ones: refused with a 400 naming what was offered and what is spoken.
    let refused = upgrade_with(&server, &["mqtt", "wamp.2.json"]);
    assert!(refused.starts_with("http/1.1 400"), "{refused}");
    assert!(chosen(&refused).is_none(), "{refused}");
    for word in ["mqtt", "wamp.2.json", "herald.json", "herald.proto"] {
        assert!(refused.contains(word), "{word} missing from {refused}");
    }
}

/// The next `n` publications of `events` as `(channel, offset, data, binary)`.
async fn pubs(events: &mut Events, n: usize) -> Vec<(String, Option<u64>, Value, Option<Vec<u8>>)> {
    let mut out = Vec::new();
    while out.len() < n {
        match tokio::time::timeout(TIMEOUT, events.recv()).await.expect("in time") {
            Some(Event::Pub { channel, offset, data, binary, .. }) => {
                out.push((channel, offset, data, binary))
            }
            Some(Event::Ping) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    out
}

#[tokio::test]
async fn protobuf_and_json_clients_share_a_channel_in_order() {
    let server = Server::start(CONFIG, &[]);
    let (proto, mut proto_events) = connect(&server, WireFormat::Proto).await;
    let (json_client, mut json_events) = connect(&server, WireFormat::Json).await;
    proto.subscribe("m:t", None).await.unwrap();
    json_client.subscribe("m:t", None).await.unwrap();
    let mut api = server.api().await;

    let binary: &[u8] = b"\x00\x01\x02\xfftick";
    // Every way in: protobuf client (binary and JSON-text bytes), JSON client (JSON and
    // b64data), API JSON, API protobuf.
    assert_eq!(proto.publish_binary("m:t", binary).await.unwrap(), Some(1));
    assert_eq!(proto.publish_binary("m:t", br#"{"p":2}"#).await.unwrap(), Some(2));
    assert_eq!(json_client.publish("m:t", &json!({"j": 3})).await.unwrap(), Some(3));
    assert_eq!(json_client.publish_binary("m:t", b"\xfe").await.unwrap(), Some(4));
    api.publish("m:t", &json!([5])).await.unwrap();
    let result = api.publish_protobuf("m:t", b"\x06six").await.unwrap();
    assert_eq!(result.offset, Some(6));
    assert!(result.epoch.is_some() && result.error.is_none());

    let want: Vec<(Option<u64>, Value, Option<Vec<u8>>)> = vec![
        (Some(1), Value::Null, Some(binary.to_vec())),
        (Some(2), json!({"p": 2}), None),
        (Some(3), json!({"j": 3}), None),
        (Some(4), Value::Null, Some(b"\xfe".to_vec())),
        (Some(5), json!([5]), None),
        (Some(6), Value::Null, Some(b"\x06six".to_vec())),
    ];
    for events in [&mut proto_events, &mut json_events] {
        let got: Vec<_> = pubs(events, 6)
            .await
            .into_iter()
            .map(|(c, o, d, b)| {
                assert_eq!(c, "m:t");
                (o, d, b)
            })
            .collect();
        assert_eq!(got, want);
    }

    // History and recovery in protobuf carry the bytes too (binary as `b64data` in the JSON
    // shape the client hands over).
    let history = proto.history("m:t", None, Some(2)).await.unwrap();
    assert_eq!(history["publications"][0]["data"], json!([5]));
    assert_eq!(
        history["publications"][1]["b64data"],
        json!(base64::engine::general_purpose::STANDARD.encode(b"\x06six"))
    );
    let epoch = history["epoch"].as_str().unwrap().to_owned();
    let (late, _late_events) = connect(&server, WireFormat::Proto).await;
    let since = herald_client::StreamPosition { offset: 4, epoch };
    let sub = late.subscribe("m:t", Some(since)).await.unwrap();
    assert!(sub.recovered);
    assert_eq!(sub.publications.iter().map(|p| p.0).collect::<Vec<_>>(), [Some(5), Some(6)]);

    // The API's JSON answer to HTTP history names binary data the same way.
    let h = api.json("GET", "/api/history?channel=m:t&limit=1", None).await.unwrap();
    assert_eq!(h["publications"][0]["b64data"], json!("BnNpeA=="));
}

#[tokio::test]
async fn an_sse_subscriber_gets_binary_data_as_b64data() {
    let server = Server::start(CONFIG, &[]);
    let mut sse = std::net::TcpStream::connect(server.addr).unwrap();
    sse.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(sse, "GET /sse?channel=live:s HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
        .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("\r\n\r\n") {
        let n = sse.read(&mut buf).unwrap();
        seen.extend_from_slice(&buf[..n]);
    }
    // Subscribed once the node counts the stream.
    let mut api = server.api().await;
    for _ in 0..100 {
        let channels = api.json("GET", "/api/channels", None).await.unwrap();
        if channels["channels"].as_array().is_some_and(|c| !c.is_empty()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    api.publish_protobuf("live:s", b"\x00bin").await.unwrap();
    api.publish("live:s", &json!({"t": 1})).await.unwrap();
    let mut text = String::new();
    while text.matches("event: pub").count() < 2 {
        let n = sse.read(&mut buf).unwrap();
        assert!(n > 0, "stream ended: {text}");
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let datas: Vec<Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str(d).ok())
        .collect();
    assert_eq!(
        datas,
        vec![
            json!({"channel": "live:s", "data": null, "b64data": "AGJpbg=="}),
            json!({"channel": "live:s", "data": {"t": 1}})
        ]
    );
}

#[tokio::test]
async fn protobuf_api_bodies_are_checked_and_answered_in_kind() {
    let server = Server::start(CONFIG, &[]);
    let mut api = server.api().await;
    let batch = api
        .batch_protobuf(&[
            ("m:b".into(), b"\x01".to_vec()),
            ("bad name".into(), b"x".to_vec()),
            ("nope:x".into(), b"x".to_vec()),
            ("live:b".into(), b"\x02".to_vec()),
            ("m:b".into(), b"\x03".to_vec()),
        ])
        .await
        .unwrap();
    let r = &batch.results;
    assert_eq!(r.len(), 5);
    assert_eq!((r[0].offset, r[4].offset), (Some(1), Some(2)));
    assert_eq!(r[1].error.as_ref().map(|e| e.code), Some(400));
    assert!(r[1].error.as_ref().unwrap().message.contains("channel"));
    assert_eq!(r[2].error.as_ref().map(|e| e.code), Some(404));
    // A channel without history: no offset, no epoch, no error.
    assert_eq!(r[3], Default::default());

    // Protobuf in, JSON out when the request does not accept protobuf.
    let body = {
        use prost::Message as _;
        herald_protocol::pb::PublishRequest {
            channel: "m:b".into(),
            data: Some(b"\xff"[..].into()),
        }
        .encode_to_vec()
    };
    let request = format!(
        "POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let mut s = std::net::TcpStream::connect(server.addr).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    s.write_all(&body).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains(r#""offset":3"#), "{answer}");

    // Malformed protobuf: a 400 naming it, never a 500.
    let (status, _, body) =
        api.request_protobuf("POST", "/api/publish", b"\x0a\xff\xff").await.unwrap();
    assert_eq!(status, 400);
    assert!(String::from_utf8_lossy(&body).contains("protobuf"));
    let (status, _, _) = api.request_protobuf("POST", "/api/batch", b"\x0a\x05\x0a").await.unwrap();
    assert_eq!(status, 400);
    // A missing channel.
    let (status, _, body) =
        api.request_protobuf("POST", "/api/publish", b"\x12\x01x").await.unwrap();
    assert_eq!(status, 400);
    assert!(String::from_utf8_lossy(&body).contains("channel"));
}

#[tokio::test]
async fn a_recovery_larger_than_a_page_arrives_whole_in_protobuf() {
    let server =
        Server::start("[namespaces.m]\nhistory_size = 1000\n[limits]\nmax_history_page = 7\n", &[]);
    let mut api = server.api().await;
    let first = api.publish("m:r", &json!(1)).await.unwrap();
    let epoch = first["epoch"].as_str().unwrap().to_owned();
    let items: Vec<(String, Vec<u8>)> =
        (2..=100u32).map(|i| ("m:r".to_owned(), i.to_be_bytes().to_vec())).collect();
    api.batch_protobuf(&items).await.unwrap();
    let (client, mut events) = connect(&server, WireFormat::Proto).await;
    let since = herald_client::StreamPosition { offset: 1, epoch: epoch.clone() };
    let sub = client.subscribe("m:r", Some(since)).await.unwrap();
    assert!(sub.recovered);
    assert_eq!(sub.offset, Some(100));
    let offsets: Vec<u64> = sub.publications.iter().filter_map(|p| p.0).collect();
    assert_eq!(offsets, (2..=100).collect::<Vec<_>>());
    assert_eq!(sub.publications[0].1, Value::Null);
    assert_eq!(sub.binary[0].as_deref(), Some(&2u32.to_be_bytes()[..]));
    assert!(sub.binary.iter().all(Option::is_some));
    // Live publications follow the reply.
    api.publish_protobuf("m:r", b"\x00live").await.unwrap();
    let got = pubs(&mut events, 1).await;
    assert_eq!(got[0].1, Some(101));
    assert_eq!(got[0].3.as_deref(), Some(&b"\x00live"[..]));
}

/// The close code that ends `events`.
async fn close_code(mut events: Events) -> Option<u16> {
    loop {
        match tokio::time::timeout(TIMEOUT, events.recv()).await.expect("in time") {
            Some(Event::Closed { code, .. }) => return code,
            Some(_) => {}
            None => return None,
        }
    }
}

#[tokio::test]
async fn frames_of_the_wrong_kind_and_bad_protobuf_close_with_4002() {
    let server = Server::start(CONFIG, &[]);
    // JSON text on a protobuf connection.
    let (c, e) = connect(&server, WireFormat::Proto).await;
    c.send_frame(Opcode::Text, br#"{"op":"pong"}"#).await.unwrap();
    assert_eq!(close_code(e).await, Some(4002));
    // A length prefix past the frame's end.
    let (c, e) = connect(&server, WireFormat::Proto).await;
    c.send_frame(Opcode::Binary, b"\x09\x08\x01").await.unwrap();
    assert_eq!(close_code(e).await, Some(4002));
    // A command with a usable id but an unknown op: an error reply, the connection stays.
    let (c, _e) = connect(&server, WireFormat::Proto).await;
    let unknown_op = [0x04, 0x08, 0x07, 0x7a, 0x00]; // id 7, field 15 (no such op), empty
    let reply = c.request_raw_bytes(7, &unknown_op).await.unwrap();
    let error = reply.unwrap_err();
    assert_eq!(error.code, 400, "{error:?}");
    assert!(c.subscribe("m:still", None).await.is_ok());
    // Binary on a JSON connection.
    let (c, e) = connect(&server, WireFormat::Json).await;
    c.send_frame(Opcode::Binary, b"\x02\x42\x00").await.unwrap();
    assert_eq!(close_code(e).await, Some(4002));
}

#[tokio::test]
async fn bytes_shaped_like_json_but_not_utf8_reach_json_subscribers_as_b64data() {
    let server = Server::start(CONFIG, &[]);
    let (publisher, _p) = connect(&server, WireFormat::Json).await;
    let (json_client, mut json_events) = connect(&server, WireFormat::Json).await;
    json_client.subscribe("m:u", None).await.unwrap();
    // `"\xff"`: a JSON string in shape, but not UTF-8; a text frame holding it would be
    // refused by every WebSocket client (RFC 6455 requires UTF-8 in text frames).
    publisher.publish_binary("m:u", b"\"\xff\"").await.unwrap();
    publisher.publish("m:u", &json!("after")).await.unwrap();
    let got = pubs(&mut json_events, 2).await;
    assert_eq!(got[0].2, Value::Null);
    assert_eq!(got[0].3.as_deref(), Some(&b"\"\xff\""[..]));
    assert_eq!(got[1].2, json!("after"), "the connection lives on");
    let mut api = server.api().await;
    let h = api
        .json("GET", "/api/history?channel=m:u&limit=1&since_offset=0&since_epoch=x", None)
        .await;
    assert!(h.is_ok(), "{h:?}");
}

#[tokio::test]
async fn protobuf_publishes_need_data_and_batches_are_counted_before_decoding() {
    let server = Server::start(&format!("{CONFIG}[limits]\nmax_batch_publications = 3\n"), &[]);
    // A publish without `data` (proto3 `optional`): 400 as in JSON.
    let (client, _e) = connect(&server, WireFormat::Proto).await;
    let no_data = [0x07, 0x08, 0x09, 0x2a, 0x03, 0x0a, 0x01, b'm']; // id 9, publish { channel: "m" }
    let reply = client.request_raw_bytes(9, &no_data).await.unwrap();
    let error = reply.unwrap_err();
    assert_eq!((error.code, error.message.as_str()), (400, "missing field `data`"));
    // Empty data is data.
    assert_eq!(client.publish_binary("live:x", b"").await.unwrap(), None);
    // An empty refresh token is a bad token: 401, as in JSON.
    let err = client.refresh("").await.unwrap_err();
    assert!(matches!(err, herald_client::ClientError::Reply { code: 401, .. }), "{err:?}");

    let mut api = server.api().await;
    let (status, _, body) =
        api.request_protobuf("POST", "/api/publish", b"\x0a\x03m:b").await.unwrap();
    assert_eq!(status, 400);
    assert!(String::from_utf8_lossy(&body).contains("`data` is missing"));
    // Four empty publications (`0a 00` each): over the bound of 3, refused before decoding.
    let (status, _, body) =
        api.request_protobuf("POST", "/api/batch", &[0x0a, 0x00].repeat(4)).await.unwrap();
    assert_eq!(status, 413, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("this one 4"));
    // A million of them (2 MB): the same 413, without building a million messages.
    let (status, _, _) =
        api.request_protobuf("POST", "/api/batch", &[0x0a, 0x00].repeat(1_000_000)).await.unwrap();
    assert_eq!(status, 413);
}

#[tokio::test]
async fn bad_commands_take_tokens_so_a_frame_of_them_is_cut_with_4029() {
    let server =
        Server::start(&format!("{CONFIG}[limits]\ncommand_burst = 5\ncommand_rate = 1\n"), &[]);
    let (client, events) = connect(&server, WireFormat::Proto).await;
    // 40 commands with ids and no op (3 bytes each, a 400 reply of ~70 bytes each).
    let mut frame = Vec::new();
    for id in 1..=40u8 {
        frame.extend_from_slice(&[0x02, 0x08, id]);
    }
    client.send_frame(Opcode::Binary, &frame).await.unwrap();
    assert_eq!(close_code(events).await, Some(4029));
}
