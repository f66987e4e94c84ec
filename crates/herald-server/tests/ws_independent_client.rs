//! Herald's own WebSocket codec checked by an independent implementation (tokio-tungstenite):
//! handshake and subprotocol, masked client frames, server frames, ping/pong and the close
//! handshake all follow RFC 6455.

mod common;

use std::time::Duration;

use common::{Server, TIMEOUT};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

async fn next_text<S>(ws: &mut S) -> String
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        let msg = tokio::time::timeout(TIMEOUT, ws.next())
            .await
            .expect("in time")
            .expect("open")
            .expect("ok");
        match msg {
            Message::Text(t) => return t.to_string(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn tungstenite_client_speaks_to_herald() {
    let server = Server::start("[channel_defaults]\nclient_publish = true\n", &[]);
    let mut request = server.ws_url().into_client_request().expect("request");
    request.headers_mut().insert("Sec-WebSocket-Protocol", "herald.json".parse().expect("header"));
    let (mut ws, response) = tokio_tungstenite::connect_async(request).await.expect("handshake");
    assert_eq!(response.status(), 101);
    assert_eq!(response.headers()["sec-websocket-protocol"], "herald.json");

    ws.send(Message::text(r#"{"op":"connect","id":1}"#)).await.expect("send");
    let reply: Value = serde_json::from_str(&next_text(&mut ws).await).expect("json");
    assert!(reply["ok"]["client"].is_string());
    assert_eq!(reply["ok"]["ping_interval_ms"], json!(25000));

    ws.send(Message::text(r#"{"op":"subscribe","id":2,"channel":"t"}"#)).await.expect("send");
    let reply: Value = serde_json::from_str(&next_text(&mut ws).await).expect("json");
    assert_eq!(reply, json!({"id": 2, "ok": {"recovered": false, "publications": []}}));

    // A large publication (16-bit and 64-bit length frames both ways).
    for size in [200usize, 70_000] {
        let data = "d".repeat(size);
        let cmd = json!({"op": "publish", "id": 3, "channel": "t", "data": data}).to_string();
        let mut api = server.api().await;
        if size < 60_000 {
            ws.send(Message::text(cmd)).await.expect("send");
        } else {
            // Over the default max_message_bytes for inbound: publish over HTTP instead.
            api.publish("t", &json!(data)).await.expect("publish");
        }
        let mut got_pub = false;
        for _ in 0..2 {
            let text = next_text(&mut ws).await;
            let v: Value = serde_json::from_str(&text).expect("json");
            if let Some(p) = v.get("pub") {
                assert_eq!(p["channel"], json!("t"));
                assert_eq!(p["data"].as_str().map(str::len), Some(size));
                got_pub = true;
                if size >= 60_000 {
                    break;
                }
            }
        }
        assert!(got_pub);
    }

    ws.send(Message::Ping(b"abc".to_vec().into())).await.expect("ping");
    let pong = tokio::time::timeout(TIMEOUT, ws.next())
        .await
        .expect("in time")
        .expect("open")
        .expect("ok");
    assert_eq!(pong, Message::Pong(b"abc".to_vec().into()));

    ws.close(None).await.expect("close");
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(m)) = ws.next().await {
            if let Message::Close(_) = m {
                return true;
            }
        }
        true
    })
    .await;
    assert_eq!(end, Ok(true));
}

#[tokio::test]
async fn bad_upgrades_are_refused_with_json_errors() {
    let server = Server::start("", &[]);
    let mut api = server.api().await;
    let (status, _, body) = api.request("GET", "/ws", None).await.expect("request");
    assert_eq!(status, 400);
    let v: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(v["error"]["code"], json!(400));
}
