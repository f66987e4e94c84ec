//! HTTP requests through the real router ([`herald_server::api::router`]) of a node on the
//! in-memory broker: the API's bodies (JSON and `application/x-protobuf`), the history query,
//! the `/sse` query (`channel=`, `token=`, `last_event_id=`, percent-decoding) with a
//! `Last-Event-ID` header, and the `/ws` handshake's headers (subprotocol negotiation, the
//! `token=` query). Bad input is a 4xx naming the problem: a request must never panic nor be
//! answered 500.
//!
//! Input: byte 0 picks the endpoint, byte 1 the options (bit 0: protobuf `Content-Type`, bit 1:
//! protobuf `Accept`, bit 2: no API key, bit 3: a `Last-Event-ID` / `Sec-WebSocket-Protocol`
//! header); the rest is the body of a POST, or the query of a GET, up to a first `\n` after
//! which comes the header's value. A `/sse` stream that opens is dropped at once (only its
//! status is checked): its writer then sees the body gone and closes it.
//!
//! Epochs are random, so a fuzzer could never name one: in the `/sse` query and header,
//! `EPOCH` stands for the current epoch of channel `h:a`, `TAG` for its position tag (the
//! compact `Last-Event-ID`) and `BACK` for an offset 6 below its newest publication, within its
//! history (8) but more than a page (4) back, so that a resume is recovered page by page.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::body::Body;
use herald_server::app::App;
use herald_server::config::{Config, Sources};
use http::{header, HeaderValue, Method, Request, StatusCode};
use libfuzzer_sys::fuzz_target;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt as _;

/// The node's configuration: an API key, token auth, namespaces with history (short-lived, so
/// the streams of the fuzzer's many channels expire), small limits so they are reached.
const CONFIG: &str = r#"
api_key = "fuzz-key"
api_threads = 0

[auth]
hmac_secret = "fuzz-secret-0123456789abcdef0123"

[namespaces.h]
history_size = 8
history_ttl_secs = 5
client_publish = true

[namespaces.c]
history_size = 4
history_ttl_secs = 5
conflate = true

[namespaces.p]
anonymous_subscribe = false

[limits]
max_publication_bytes = 4096
max_batch_publications = 32
max_history_page = 4
max_channels_per_stream = 8
"#;

struct Fixture {
    runtime: tokio::runtime::Runtime,
    router: axum::Router,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        // One worker runs what handlers spawn (SSE writers, expiry sweeps) between requests.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let config = Config::load(&Sources { file: Some(CONFIG.into()), ..Default::default() })
            .expect("the fuzz configuration is valid");
        let node = runtime.block_on(herald_server::build_node(&config)).expect("a memory node");
        let app = App {
            node,
            shutdown_timeout: config.shutdown_timeout,
            config: Arc::new(config),
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
            started: Instant::now(),
            api: None,
            moved: Default::default(),
        };
        Fixture { router: herald_server::api::router(app), runtime }
    })
}

/// `bytes` as a URI query: bytes a query may not hold are percent-encoded (so every byte
/// reaches the server's decoder), the rest (`&`, `=`, `%`, `+` ...) left as the fuzzer wrote.
fn query(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        if b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?%".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn split_header(rest: &[u8]) -> (&[u8], Option<&[u8]>) {
    match rest.iter().position(|&b| b == b'\n') {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    }
}

/// The channel whose position `EPOCH`, `TAG` and `BACK` name.
const RESUME_CHANNEL: &str = "h:a";
/// Publications `h:a` keeps at least (its history holds 8, a page 4).
const RESUME_OFFSET: u64 = 12;

fn get(uri: &str) -> Request<Body> {
    Request::get(uri)
        .header(header::AUTHORIZATION, "Bearer fuzz-key")
        .body(Body::empty())
        .expect("a valid request")
}

/// The current epoch and offset of `h:a`, publishing into it first when its history expired or
/// is short.
fn resume_position(fixture: &Fixture) -> (String, u64) {
    let router = &fixture.router;
    fixture.runtime.block_on(async move {
        loop {
            let uri = format!("/api/history?channel={RESUME_CHANNEL}&limit=0");
            let response = router.clone().oneshot(get(&uri)).await.expect("infallible");
            let body = axum::body::to_bytes(response.into_body(), usize::MAX).await.expect("body");
            let top: serde_json::Value = serde_json::from_slice(&body).expect("history is JSON");
            let offset = top["offset"].as_u64().unwrap_or(0);
            if let (Some(epoch), true) = (top["epoch"].as_str(), offset >= RESUME_OFFSET) {
                return (epoch.to_owned(), offset);
            }
            let publications: Vec<serde_json::Value> = (0..RESUME_OFFSET)
                .map(|i| serde_json::json!({"channel": RESUME_CHANNEL, "data": i}))
                .collect();
            let batch = serde_json::json!({ "publications": publications }).to_string();
            let request = Request::post("/api/batch")
                .header(header::AUTHORIZATION, "Bearer fuzz-key")
                .body(Body::from(batch))
                .expect("a valid request");
            let response = router.clone().oneshot(request).await.expect("infallible");
            assert!(response.status().is_success(), "{response:?}");
        }
    })
}

/// `text` with `EPOCH`, `TAG` and `BACK` replaced (see the module docs).
fn resume_placeholders(text: &[u8], (epoch, offset): &(String, u64)) -> Vec<u8> {
    let tag = herald_protocol::sse::position_tag(RESUME_CHANNEL, epoch);
    let back = (offset - 6).to_string();
    let mut out = Vec::with_capacity(text.len());
    let mut rest = text;
    while !rest.is_empty() {
        if let Some(tail) = rest.strip_prefix(b"EPOCH") {
            out.extend_from_slice(epoch.as_bytes());
            rest = tail;
        } else if let Some(tail) = rest.strip_prefix(b"TAG") {
            out.extend_from_slice(&tag);
            rest = tail;
        } else if let Some(tail) = rest.strip_prefix(b"BACK") {
            out.extend_from_slice(back.as_bytes());
            rest = tail;
        } else {
            out.push(rest[0]);
            rest = &rest[1..];
        }
    }
    out
}

fn has_placeholder(text: &[u8]) -> bool {
    text.windows(5).any(|w| w == b"EPOCH")
        || text.windows(3).any(|w| w == b"TAG")
        || text.windows(4).any(|w| w == b"BACK")
}

fuzz_target!(|data: &[u8]| {
    let [endpoint, options, rest @ ..] = data else { return };
    let protobuf_body = options & 1 != 0;
    let protobuf_accept = options & 2 != 0;
    let api_key = options & 4 == 0;
    let with_header = options & 8 != 0;

    let fixture = fixture();
    let mut request = Request::builder();
    let mut body = Vec::new();
    let mut streaming = false;
    // A Last-Event-ID with `EPOCH` or `TAG` replaced.
    let mut resumed: Option<Vec<u8>> = None;
    let (uri, extra) = match endpoint % 10 {
        0 => {
            body = rest.to_vec();
            ("/api/publish".to_owned(), None)
        }
        1 => {
            body = rest.to_vec();
            ("/api/batch".to_owned(), None)
        }
        2 => (format!("/api/history?{}", query(rest)), None),
        3 => {
            streaming = true;
            let (q, h) = split_header(rest);
            if has_placeholder(rest) {
                let position = resume_position(fixture);
                resumed = h.map(|h| resume_placeholders(h, &position));
                (format!("/sse?{}", query(&resume_placeholders(q, &position))), None)
            } else {
                (format!("/sse?{}", query(q)), h.map(|h| ("last-event-id", h)))
            }
        }
        4 => ("/api/channels".to_owned(), None),
        5 => {
            let (q, h) = split_header(rest);
            request = request
                .header(header::UPGRADE, "websocket")
                .header(header::CONNECTION, "Upgrade")
                .header(header::SEC_WEBSOCKET_VERSION, "13")
                .header(header::SEC_WEBSOCKET_KEY, "dGhlIHNhbXBsZSBub25jZQ==");
            (format!("/ws?{}", query(q)), h.map(|h| ("sec-websocket-protocol", h)))
        }
        6 => {
            body = rest.to_vec();
            ("/api/disconnect".to_owned(), None)
        }
        7 => ("/api/info".to_owned(), None),
        8 => ("/metrics".to_owned(), None),
        _ => ("/readyz".to_owned(), None),
    };
    let method = if matches!(endpoint % 10, 0 | 1 | 6) { Method::POST } else { Method::GET };
    let extra = extra.or(resumed.as_deref().map(|h| ("last-event-id", h)));
    if let (true, Some((name, value))) = (with_header, extra) {
        // A value HTTP cannot carry (control characters) is left out.
        if let Ok(value) = HeaderValue::from_bytes(value) {
            request = request.header(name, value);
        }
    }
    if api_key {
        request = request.header(header::AUTHORIZATION, "Bearer fuzz-key");
    }
    if protobuf_body {
        request = request.header(header::CONTENT_TYPE, "application/x-protobuf");
    } else {
        request = request.header(header::CONTENT_TYPE, "application/json");
    }
    if protobuf_accept {
        request = request.header(header::ACCEPT, "application/x-protobuf");
    }
    let Ok(request) = request.method(method).uri(uri.as_str()).body(Body::from(body)) else {
        return;
    };

    let router = fixture.router.clone();
    fixture.runtime.block_on(async move {
        let response = router.oneshot(request).await.expect("the router is infallible");
        let status = response.status();
        if streaming && status.is_success() {
            return; // the stream's body is dropped unread
        }
        let body =
            axum::body::to_bytes(response.into_body(), usize::MAX).await.expect("a buffered body");
        assert_ne!(status, StatusCode::INTERNAL_SERVER_ERROR, "{uri}: {body:?}");
    });
});
