//! Connection tokens on live connections (PROTOCOL.md 1.1): a connection whose token expires is
//! closed with 4012 (WebSocket: `disconnect` push, then the close frame; SSE: `event:
//! disconnect`), unless it sent `refresh` with a new token for the same user in time; a bad
//! refresh is answered 401 and changes nothing; `exp`, `nbf` and `iat` are honoured with
//! `auth.leeway_secs` of clock skew.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{Server, TIMEOUT};
use herald_client::{Client, ClientError, ConnectOptions, Event, Events};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SECRET: &str = "0123456789abcdef0123456789abcdef";

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

fn token(claims: Value) -> String {
    herald_server::auth::sign_hs256(SECRET.as_bytes(), &claims)
}

fn config(leeway_secs: u64) -> String {
    format!("[auth]\nhmac_secret = \"{SECRET}\"\nleeway_secs = {leeway_secs}\n")
}

async fn connect(server: &Server, token: String) -> (Client, Events) {
    let options = ConnectOptions { token: Some(token), ..Default::default() };
    let (c, e, _) = Client::connect(&server.ws_url(), options).await.expect("connect");
    (c, e)
}

/// Waits for the `disconnect` push with `code`, then the close frame with the same code.
async fn expect_close(events: &mut Events, code: u16, reconnect: bool) {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let mut pushed = false;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(Event::Disconnect { code: c, reconnect: r, .. })) => {
                assert_eq!((c, r), (code, reconnect), "disconnect push");
                pushed = true;
            }
            Ok(Some(Event::Closed { code: c, reason })) => {
                assert!(pushed, "close frame {c:?} ({reason}) without the disconnect push");
                assert_eq!(c, Some(code), "close frame ({reason})");
                return;
            }
            Ok(Some(Event::Ping | Event::Pub { .. })) => {}
            Ok(Some(other)) => panic!("unexpected {other:?}"),
            Ok(None) => panic!("events ended without a close frame"),
            Err(_) => panic!("no close {code} within {TIMEOUT:?}"),
        }
    }
}

async fn refresh(client: &Client, id: u32, token: &str) -> Result<Value, u16> {
    let text = json!({"op": "refresh", "id": id, "token": token}).to_string();
    match client.request_raw(id, &text).await.expect("refresh answered") {
        Ok(ok) => Ok(ok),
        Err(e) => Err(e.code),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_tokens_close_with_4012_unless_refreshed_for_the_same_user() {
    let server = Server::start(&config(0), &[]);
    let soon = now() + 2.0;

    // Token in `connect`, and token in the upgrade URL: both expire.
    let (expiring, mut expiring_events) =
        connect(&server, token(json!({"sub": "alice", "exp": soon}))).await;
    expiring.subscribe("news", None).await.unwrap();
    let options = ConnectOptions {
        query_token: Some(token(json!({"sub": "carol", "exp": soon}))),
        send_connect: false,
        ..Default::default()
    };
    let (query, mut query_events, _) = Client::connect(&server.ws_url(), options).await.unwrap();
    query.subscribe("news", None).await.unwrap();

    // Refreshed in time with a token for the same user: stays.
    let (refreshed, mut refreshed_events) =
        connect(&server, token(json!({"sub": "bob", "exp": soon}))).await;
    refreshed.subscribe("news", None).await.unwrap();
    let later = token(json!({"sub": "bob", "exp": now() + 600.0}));
    assert_eq!(refresh(&refreshed, 1_000_000, &later).await, Ok(json!({})));
    // The client library's own call, once more with a still later token.
    let latest = token(json!({"sub": "bob", "exp": now() + 700.0}));
    refreshed.refresh(&latest).await.expect("refresh through herald-client");

    // Refreshed with another user's token, a forged one, an expired one: 401, and the
    // connection stays as it was (served now, closed at its original expiry).
    let (wrong, mut wrong_events) =
        connect(&server, token(json!({"sub": "dave", "exp": soon}))).await;
    let others = [
        token(json!({"sub": "bob", "exp": now() + 600.0})),
        herald_server::auth::sign_hs256(b"not the secret, not at all!!", &json!({"sub": "dave"})),
        token(json!({"sub": "dave", "exp": now() - 10.0})),
        "junk".to_string(),
    ];
    for (i, t) in others.iter().enumerate() {
        assert_eq!(refresh(&wrong, 1_000_000 + i as u32, t).await, Err(401), "{i}");
    }
    wrong.subscribe("news", None).await.expect("still served after refused refreshes");

    // An anonymous connection has no token to refresh and never expires.
    let (anonymous, mut anonymous_events, _) =
        Client::connect(&server.ws_url(), ConnectOptions::default()).await.unwrap();
    anonymous.subscribe("news", None).await.unwrap();
    assert_eq!(refresh(&anonymous, 1_000_000, &later).await, Err(401));

    expect_close(&mut expiring_events, 4012, true).await;
    expect_close(&mut query_events, 4012, true).await;
    expect_close(&mut wrong_events, 4012, true).await;

    // The refreshed and the anonymous connections are still served.
    let mut api = server.api().await;
    api.publish("news", &json!("after expiry")).await.unwrap();
    for events in [&mut refreshed_events, &mut anonymous_events] {
        loop {
            match tokio::time::timeout(TIMEOUT, events.recv()).await.expect("an event") {
                Some(Event::Pub { data, .. }) => {
                    assert_eq!(data, json!("after expiry"));
                    break;
                }
                Some(Event::Ping) => {}
                other => panic!("expected the publication, got {other:?}"),
            }
        }
    }
    refreshed.subscribe("more", None).await.expect("refreshed connection still open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbf_iat_and_exp_honour_the_leeway_at_connect() {
    let strict = Server::start(&config(0), &[]);
    let lenient = Server::start(&config(5), &[]);
    let t = now();
    let cases = [
        ("exp 3 s ago", json!({"sub": "a", "exp": t - 3.0})),
        ("nbf in 3 s", json!({"sub": "a", "nbf": t + 3.0})),
        ("iat in 3 s", json!({"sub": "a", "iat": t + 3.0})),
    ];
    for (what, claims) in &cases {
        let (c, _e) = connect(&lenient, token(claims.clone())).await;
        c.subscribe("x", None).await.unwrap_or_else(|e| panic!("{what}: within leeway: {e}"));

        let options = ConnectOptions { token: Some(token(claims.clone())), ..Default::default() };
        match Client::connect(&strict.ws_url(), options).await {
            Err(ClientError::Closed) => {}
            other => panic!("{what} without leeway: expected a refusal, got {:?}", other.is_ok()),
        }
        let options = ConnectOptions {
            query_token: Some(token(claims.clone())),
            send_connect: false,
            ..Default::default()
        };
        let (_c, mut e, _) = Client::connect(&strict.ws_url(), options).await.unwrap();
        expect_close(&mut e, 4001, false).await;
    }
    // Far beyond the leeway: refused on both.
    let future = token(json!({"sub": "a", "nbf": t + 3600.0}));
    let options =
        ConnectOptions { query_token: Some(future), send_connect: false, ..Default::default() };
    let (_c, mut e, _) = Client::connect(&lenient.ws_url(), options).await.unwrap();
    expect_close(&mut e, 4001, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_connection_lasts_until_exp_plus_leeway() {
    let server = Server::start(&config(3), &[]);
    let start = now();
    let (c, mut events) = connect(&server, token(json!({"sub": "a", "exp": start + 1.0}))).await;
    // Past `exp`, well within the leeway (closing is due at start + 4 s): still served.
    tokio::time::sleep(Duration::from_secs_f64((start + 2.0 - now()).max(0.0))).await;
    c.subscribe("x", None).await.expect("served within the leeway");
    while let Some(ev) = events.try_recv() {
        assert!(matches!(ev, Event::Ping), "{ev:?}");
    }
    expect_close(&mut events, 4012, true).await;
    assert!(now() >= start + 3.0, "closed before exp + leeway");
}

/// Reads an SSE response until the server closes it or `until` is in its body; returns the
/// body with any chunked framing removed.
async fn read_sse(stream: &mut tokio::net::TcpStream, until: Option<&str>) -> String {
    let mut raw = Vec::new();
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let mut buf = [0u8; 4096];
    loop {
        let body = dechunk(&raw);
        if until.is_some_and(|u| body.contains(u)) {
            return body;
        }
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return body,
            Ok(Ok(n)) => raw.extend_from_slice(&buf[..n]),
            Err(_) => panic!("stream neither ended nor sent {until:?}: {body}"),
        }
    }
}

/// The body of an HTTP/1.1 response: the complete chunks when chunked, else everything after
/// the head.
fn dechunk(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    let Some((head, mut rest)) = text.split_once("\r\n\r\n") else { return String::new() };
    if !head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        return rest.to_string();
    }
    let mut body = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else { break };
        if size == 0 || after.len() < size + 2 {
            break;
        }
        body.push_str(&after[..size]);
        rest = &after[size + 2..];
    }
    body
}

async fn open_sse(server: &Server, query: &str) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let req = format!("GET /sse?{query} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_streams_with_an_expiring_token_end_with_disconnect_4012() {
    let server = Server::start(&config(0), &[]);
    let expiring = token(json!({"sub": "alice", "exp": now() + 2.0}));
    let lasting = token(json!({"sub": "bob", "exp": now() + 600.0}));
    let mut a = open_sse(&server, &format!("channel=news&token={expiring}")).await;
    let mut b = open_sse(&server, &format!("channel=news&token={lasting}")).await;
    let mut anonymous = open_sse(&server, "channel=news").await;

    let body = read_sse(&mut a, None).await;
    assert!(body.contains("event: disconnect"), "{body}");
    let last = body.trim_end().rsplit("\n\n").next().unwrap();
    assert!(last.starts_with("event: disconnect"), "disconnect is the last event: {body}");
    let data: Value = serde_json::from_str(last.split_once("data: ").unwrap().1).unwrap();
    assert_eq!((data["code"].clone(), data["reconnect"].clone()), (json!(4012), json!(true)));

    // The others go on.
    let mut api = server.api().await;
    api.publish("news", &json!("still here")).await.unwrap();
    for s in [&mut b, &mut anonymous] {
        let body = read_sse(s, Some("still here")).await;
        assert!(!body.contains("event: disconnect"), "{body}");
    }
}

#[tokio::test]
async fn tokens_signed_with_the_previous_secret_are_accepted_during_a_rotation() {
    const NEW: &str = "fedcba9876543210fedcba9876543210";
    let server = Server::start(
        &format!("[auth]\nhmac_secret = \"{NEW}\"\nprevious_hmac_secret = \"{SECRET}\"\nallow_anonymous = false\n"),
        &[],
    );
    let claims = json!({"sub": "alice", "exp": now() + 60.0});
    // The previous secret (tokens handed out before the rotation) and the new one.
    for secret in [SECRET, NEW] {
        let token = herald_server::auth::sign_hs256(secret.as_bytes(), &claims);
        let (client, _events) = connect(&server, token).await;
        client.subscribe("news", None).await.expect("subscribed");
    }
    // Any other secret: refused with 4001.
    let forged = herald_server::auth::sign_hs256(b"not-the-secret-not-the-secret-xx", &claims);
    let options = ConnectOptions { token: Some(forged), ..Default::default() };
    let result = Client::connect(&server.ws_url(), options).await;
    assert!(result.is_err(), "a token of another secret must not connect");
    // Without the current secret, a previous one is refused at start-up.
    let (code, text) = common::run_herald(&["--set", "auth.previous_hmac_secret=x"], &[]);
    assert_ne!(code, Some(0));
    assert!(text.contains("auth.previous_hmac_secret"), "{text}");
}

#[tokio::test]
async fn audience_and_issuer_are_required_when_configured() {
    let server = Server::start(
        &format!(
            "[auth]\nhmac_secret = \"{SECRET}\"\naudience = \"herald\"\nissuer = \"https://id.example\"\nallow_anonymous = false\n"
        ),
        &[],
    );
    let exp = now() + 60.0;
    let good = token(
        json!({"sub": "a", "exp": exp, "aud": ["web", "herald"], "iss": "https://id.example"}),
    );
    let (client, _events) = connect(&server, good).await;
    client.subscribe("news", None).await.expect("subscribed");
    for claims in [
        json!({"sub": "a", "exp": exp, "aud": "web", "iss": "https://id.example"}),
        json!({"sub": "a", "exp": exp, "aud": "herald", "iss": "https://other.example"}),
        json!({"sub": "a", "exp": exp}),
    ] {
        let options = ConnectOptions { token: Some(token(claims.clone())), ..Default::default() };
        assert!(Client::connect(&server.ws_url(), options).await.is_err(), "{claims}");
    }
}
