//! Every WebSocket error path: each is answered (error reply or close code) and neither the
//! connection (for replies) nor any other client is harmed.

mod common;

use std::time::Duration;

use common::{Server, TIMEOUT};
use herald_client::{Client, ClientError, ConnectOptions, Event, Events};
use herald_protocol::ws::Opcode;
use serde_json::json;

const CONFIG: &str = r#"
[limits]
max_message_bytes = 4096
max_publication_bytes = 1000
[channel_defaults]
client_publish = true
[namespaces.private]
anonymous_subscribe = false
[namespaces.ro]
client_publish = false
[namespaces.hist]
history_size = 10
"#;

/// A bystander subscribed to `watch`; checked at the end of each test.
struct Bystander {
    client: Client,
    events: Events,
}

impl Bystander {
    async fn new(server: &Server) -> Bystander {
        let (client, events) = server.client().await;
        client.subscribe("watch", None).await.expect("bystander subscribes");
        Bystander { client, events }
    }

    async fn still_served(&mut self, server: &Server, tag: &str) {
        let mut api = server.api().await;
        api.publish("watch", &json!(tag)).await.expect("publish");
        let (_, _, data) = self.events.next_pub(TIMEOUT).await.expect("bystander still served");
        assert_eq!(data, json!(tag));
        assert!(!self.client.is_closed());
    }
}

async fn raw_client(server: &Server) -> (Client, Events) {
    let options = ConnectOptions { send_connect: false, ..Default::default() };
    let (c, e, _) = Client::connect(&server.ws_url(), options).await.expect("connect");
    (c, e)
}

async fn expect_reply_error(client: &Client, id: u32, text: &str, code: u16) -> String {
    match client.request_raw(id, text).await.expect("reply") {
        Err(e) => {
            assert_eq!(e.code, code, "{text}: {}", e.message);
            e.message
        }
        Ok(v) => panic!("{text}: expected error {code}, got ok {v}"),
    }
}

/// Waits for the disconnect push and the close, returns the close code seen in both.
async fn expect_close(events: &mut Events, code: u16) {
    let mut saw_disconnect = false;
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let ev = tokio::time::timeout_at(deadline, events.recv())
            .await
            .expect("closed in time")
            .expect("event before end");
        match ev {
            Event::Disconnect { code: c, reconnect, .. } => {
                assert_eq!(c, code);
                assert_eq!(reconnect, [4000, 4008, 4011, 4029, 4500].contains(&c));
                saw_disconnect = true;
            }
            Event::Closed { code: c, .. } => {
                assert!(saw_disconnect, "disconnect push comes before the close");
                assert_eq!(c, Some(code));
                return;
            }
            _ => {}
        }
    }
}

#[tokio::test]
async fn bad_commands_get_error_replies_and_the_connection_lives_on() {
    let server = Server::start(CONFIG, &[]);
    let mut bystander = Bystander::new(&server).await;
    let (client, mut events) = raw_client(&server).await;

    let cases: &[(&str, u16, &str)] = &[
        (r#"{"op":"fly","id":1}"#, 400, "op"),
        (r#"{"id":2}"#, 400, "op"),
        (r#"{"op":"subscribe","id":3}"#, 400, "channel"),
        (r#"{"op":"subscribe","id":4,"channel":"bad name"}"#, 400, "channel"),
        (r#"{"op":"subscribe","id":5,"channel":""}"#, 400, "channel"),
        (r#"{"op":"subscribe","id":6,"channel":"nope:x"}"#, 404, "nope"),
        (r#"{"op":"publish","id":7,"channel":"a"}"#, 400, "data"),
        (r#"{"op":"subscribe","id":8,"channel":"a","since":{"offset":"x"}}"#, 400, "since"),
        (r#"{"op":"subscribe","id":9,"channel":"private:x"}"#, 401, "anonymous"),
        (r#"{"op":"subscribe","id":10,"channel":"a#alice"}"#, 403, "a#alice"),
        (r#"{"op":"publish","id":11,"channel":"ro:x","data":1}"#, 403, "publish"),
    ];
    for (text, code, needle) in cases {
        let id = serde_json::from_str::<serde_json::Value>(text).expect("json")["id"]
            .as_u64()
            .expect("id") as u32;
        let message = expect_reply_error(&client, id, text, *code).await;
        assert!(message.contains(needle), "{text}: message {message:?} should mention {needle}");
    }

    // Too large a publication: 413.
    let big = format!(r#"{{"op":"publish","id":20,"channel":"a","data":"{}"}}"#, "x".repeat(1500));
    expect_reply_error(&client, 20, &big, 413).await;

    // Already subscribed: 409.
    client.subscribe("dup", None).await.expect("first subscribe");
    match client.subscribe("dup", None).await {
        Err(ClientError::Reply { code: 409, .. }) => {}
        other => panic!("expected 409, got {other:?}"),
    }

    // connect that is not the first command: 400.
    expect_reply_error(&client, 30, r#"{"op":"connect","id":30}"#, 400).await;

    // The connection still works.
    client.subscribe("fine", None).await.expect("still usable");
    let mut api = server.api().await;
    api.publish("fine", &json!({"ok": true})).await.expect("publish");
    assert_eq!(events.next_pub(TIMEOUT).await.expect("pub").2, json!({"ok": true}));
    bystander.still_served(&server, "after replies").await;
}

#[tokio::test]
async fn fatal_input_closes_with_the_right_code_and_harms_no_one() {
    let server = Server::start(CONFIG, &[]);
    let mut bystander = Bystander::new(&server).await;

    // Not JSON: 4002.
    let (c, mut e) = raw_client(&server).await;
    c.send_text("this is not json").await.expect("send");
    expect_close(&mut e, 4002).await;

    // A command needing an id without one: 4002.
    let (c, mut e) = raw_client(&server).await;
    c.send_text(r#"{"op":"subscribe","channel":"a"}"#).await.expect("send");
    expect_close(&mut e, 4002).await;

    // id 0 is not usable: 4002.
    let (c, mut e) = raw_client(&server).await;
    c.send_text(r#"{"op":"subscribe","id":0,"channel":"a"}"#).await.expect("send");
    expect_close(&mut e, 4002).await;

    // A binary frame on the JSON protocol: 4002.
    let (c, mut e) = raw_client(&server).await;
    c.send_frame(Opcode::Binary, b"\x01\x02").await.expect("send");
    expect_close(&mut e, 4002).await;

    // A message over max_message_bytes: 4009.
    let (c, mut e) = raw_client(&server).await;
    let huge = format!(r#"{{"op":"publish","id":1,"channel":"a","data":"{}"}}"#, "y".repeat(5000));
    c.send_text(&huge).await.expect("send");
    expect_close(&mut e, 4009).await;

    // A bad token: 4001.
    let options = ConnectOptions { token: Some("not.a.token".into()), ..Default::default() };
    match Client::connect(&server.ws_url(), options).await {
        Err(_) => {}
        Ok((_c, mut e, _)) => expect_close(&mut e, 4001).await,
    }

    bystander.still_served(&server, "after fatal errors").await;
    let (_, _, metrics) =
        server.api().await.request("GET", "/metrics", None).await.expect("metrics");
    let metrics = String::from_utf8_lossy(&metrics).to_string();
    assert!(metrics.contains("herald_disconnects_total{code=\"4002\"} 4"), "{metrics}");
    assert!(metrics.contains("herald_disconnects_total{code=\"4009\"} 1"), "{metrics}");
}

#[tokio::test]
async fn websocket_ping_is_answered_and_client_close_is_clean() {
    let server = Server::start(CONFIG, &[]);
    let (c, mut e) = raw_client(&server).await;
    c.send_frame(Opcode::Ping, b"hi").await.expect("ping");
    c.subscribe("after-ping", None).await.expect("still served");
    c.close().await;
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        match tokio::time::timeout_at(deadline, e.recv()).await.expect("in time") {
            Some(Event::Closed { .. }) | None => break,
            Some(_) => {}
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (_, _, body) = server.api().await.request("GET", "/api/info", None).await.expect("info");
    let info: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(info["nodes"][0]["connections"], json!(0));
    assert_eq!(info["nodes"][0]["subscriptions"], json!(0));
}

#[tokio::test]
async fn anonymous_connections_can_be_forbidden() {
    let config = "[auth]\nallow_anonymous = false\nhmac_secret = \"0123456789abcdef0123\"\n";
    let server =
        Server::start(&format!("{config}[channel_defaults]\nclient_publish = true\n"), &[]);
    let (c, _e) = raw_client(&server).await;
    expect_reply_error(&c, 1, r#"{"op":"connect","id":1}"#, 401).await;
    expect_reply_error(&c, 2, r#"{"op":"subscribe","id":2,"channel":"a"}"#, 401).await;
    expect_reply_error(&c, 3, r#"{"op":"publish","id":3,"channel":"a","data":1}"#, 401).await;
    expect_reply_error(&c, 4, r#"{"op":"history","id":4,"channel":"a"}"#, 401).await;
}

#[tokio::test]
async fn clients_may_not_publish_into_channels_limited_to_other_users() {
    let secret = "0123456789abcdef0123";
    let config =
        format!("[auth]\nhmac_secret = \"{secret}\"\n[channel_defaults]\nclient_publish = true\n");
    let server = Server::start(&config, &[]);
    let bob = herald_server::auth::sign_hs256(secret.as_bytes(), &json!({"sub": "bob"}));
    let options = ConnectOptions { token: Some(bob), ..Default::default() };
    let (c, _e, _) = Client::connect(&server.ws_url(), options).await.expect("connect");
    match c.publish("inbox#alice", &json!("spoofed")).await {
        Err(ClientError::Reply { code: 403, .. }) => {}
        other => panic!("expected 403, got {other:?}"),
    }
    c.publish("inbox#alice,bob", &json!("ok")).await.expect("bob is listed");
    let (anon, _ea) = raw_client(&server).await;
    expect_reply_error(
        &anon,
        9,
        r#"{"op":"publish","id":9,"channel":"inbox#alice","data":1}"#,
        403,
    )
    .await;
}

#[tokio::test]
async fn tokens_authenticate_users_for_user_limited_channels() {
    let secret = "0123456789abcdef0123";
    let config = format!(
        "[auth]\nhmac_secret = \"{secret}\"\n[namespaces.private]\nanonymous_subscribe = false\n"
    );
    let server = Server::start(&config, &[]);
    let alice = herald_server::auth::sign_hs256(
        secret.as_bytes(),
        &json!({"sub": "alice", "exp": 4_000_000_000u64}),
    );
    // Token in `connect`.
    let options = ConnectOptions { token: Some(alice.clone()), ..Default::default() };
    let (a, mut a_events, _) = Client::connect(&server.ws_url(), options).await.expect("connect");
    a.subscribe("private:inbox#alice,bob", None).await.expect("alice may subscribe");
    match a.subscribe("private:inbox#bob", None).await {
        Err(ClientError::Reply { code: 403, .. }) => {}
        other => panic!("expected 403, got {other:?}"),
    }
    // Token in the query.
    let options =
        ConnectOptions { query_token: Some(alice), send_connect: false, ..Default::default() };
    let (q, mut q_events, _) = Client::connect(&server.ws_url(), options).await.expect("connect");
    q.subscribe("private:inbox#alice,bob", None).await.expect("query token authenticates");

    let mut api = server.api().await;
    api.publish("private:inbox#alice,bob", &json!("hi alice")).await.expect("publish");
    assert_eq!(a_events.next_pub(TIMEOUT).await.expect("pub").2, json!("hi alice"));
    assert_eq!(q_events.next_pub(TIMEOUT).await.expect("pub").2, json!("hi alice"));

    // An expired token closes with 4001.
    let expired =
        herald_server::auth::sign_hs256(secret.as_bytes(), &json!({"sub": "alice", "exp": 1}));
    let options =
        ConnectOptions { query_token: Some(expired), send_connect: false, ..Default::default() };
    let (_c, mut e, _) = Client::connect(&server.ws_url(), options).await.expect("upgrade");
    expect_close(&mut e, 4001).await;
}
