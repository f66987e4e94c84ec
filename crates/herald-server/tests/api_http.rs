//! The HTTP API over real sockets: publish, batch, channels, info, health, metrics, API key,
//! and every bad-input path (400 / 401 / 404 / 413 with a JSON error, never a 500).

mod common;

use common::{Server, TIMEOUT};
use serde_json::{json, Value};

const CONFIG: &str = r#"
api_key = "s3cret"
[limits]
max_body_bytes = 4096
max_publication_bytes = 512
[namespaces.hist]
history_size = 10
"#;

fn body_json(body: &[u8]) -> Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)))
}

#[tokio::test]
async fn api_key_is_required_on_api_calls_only() {
    let server = Server::start(CONFIG, &[]);
    let mut anon = server.api().await;
    for (method, path) in [
        ("GET", "/api/info"),
        ("GET", "/api/channels"),
        ("POST", "/api/publish"),
        ("POST", "/api/batch"),
    ] {
        let (status, _, body) = anon.request(method, path, Some(b"{}")).await.expect("request");
        assert_eq!(status, 401, "{method} {path}");
        assert_eq!(body_json(&body)["error"]["code"], json!(401));
    }
    let mut wrong = server.api_with_key("s3cre").await;
    let (status, _, _) = wrong.request("GET", "/api/info", None).await.expect("request");
    assert_eq!(status, 401);
    for path in ["/healthz", "/readyz", "/metrics"] {
        let (status, _, _) = anon.request("GET", path, None).await.expect("request");
        assert_eq!(status, 200, "{path} needs no key");
    }
    let mut api = server.api_with_key("s3cret").await;
    let (status, _, body) = api.request("GET", "/api/info", None).await.expect("request");
    assert_eq!(status, 200);
    let info = body_json(&body);
    assert_eq!(info["version"], json!(env!("CARGO_PKG_VERSION")));
    assert!(info["nodes"][0]["id"].is_string());
}

#[tokio::test]
async fn publish_and_batch_answers() {
    let server = Server::start(CONFIG, &[]);
    let mut api = server.api_with_key("s3cret").await;
    let (client, mut events) = server.client().await;
    client.subscribe("hist:x", None).await.expect("subscribe");

    let r = api.publish("hist:x", &json!({"a": 1})).await.expect("publish");
    assert_eq!(r["offset"], json!(1));
    let epoch = r["epoch"].as_str().expect("epoch").to_string();
    assert_eq!(api.publish("plain", &json!(null)).await.expect("publish"), json!({}));

    let r = api
        .batch(&[
            ("hist:x".into(), json!(2)),
            ("bad name".into(), json!(3)),
            ("nope:y".into(), json!(4)),
            ("hist:x".into(), json!("x".repeat(600))),
            ("hist:x".into(), json!(5)),
        ])
        .await
        .expect("batch");
    let results = r["results"].as_array().expect("results");
    assert_eq!(results.len(), 5);
    assert_eq!(results[0], json!({"offset": 2, "epoch": epoch}));
    assert_eq!(results[1]["error"]["code"], json!(400));
    assert_eq!(results[2]["error"]["code"], json!(404));
    assert_eq!(results[3]["error"]["code"], json!(413));
    assert_eq!(results[4], json!({"offset": 3, "epoch": epoch}));

    // A wrongly typed item fails alone.
    let body = br#"{"publications":[{"channel":5,"data":1},{"channel":"hist:x","data":6}]}"#;
    let (status, _, answer) = api.request("POST", "/api/batch", Some(body)).await.expect("batch");
    assert_eq!(status, 200);
    let answer = body_json(&answer);
    assert_eq!(answer["results"][0]["error"]["code"], json!(400));
    assert_eq!(answer["results"][1], json!({"offset": 4, "epoch": epoch}));
    for (offset, data) in [(1, json!({"a": 1})), (2, json!(2)), (3, json!(5)), (4, json!(6))] {
        let (channel, o, d) = events.next_pub(TIMEOUT).await.expect("pub");
        assert_eq!((channel.as_str(), o, d), ("hist:x", Some(offset), data));
    }

    let (status, _, body) = api.request("GET", "/api/channels", None).await.expect("channels");
    assert_eq!(status, 200);
    assert_eq!(body_json(&body), json!({"channels": [{"channel": "hist:x", "subscribers": 1}]}));
}

#[tokio::test]
async fn bad_input_gets_4xx_with_json_error_never_500() {
    let server = Server::start(CONFIG, &[]);
    let mut api = server.api_with_key("s3cret").await;
    let big = format!(r#"{{"channel":"a","data":"{}"}}"#, "z".repeat(5000));
    let long_channel = format!(r#"{{"channel":"{}","data":1}}"#, "c".repeat(256));
    let too_big_data = format!(r#"{{"channel":"a","data":"{}"}}"#, "z".repeat(600));
    let cases: Vec<(&str, &str, Vec<u8>, u16)> = vec![
        ("POST", "/api/publish", b"{not json".to_vec(), 400),
        ("POST", "/api/publish", b"".to_vec(), 400),
        ("POST", "/api/publish", b"[]".to_vec(), 400),
        ("POST", "/api/publish", br#"{"data":1}"#.to_vec(), 400),
        ("POST", "/api/publish", br#"{"channel":"a"}"#.to_vec(), 400),
        ("POST", "/api/publish", br#"{"channel":"a b","data":1}"#.to_vec(), 400),
        ("POST", "/api/publish", br#"{"channel":7,"data":1}"#.to_vec(), 400),
        ("POST", "/api/publish", long_channel.into_bytes(), 400),
        ("POST", "/api/publish", br#"{"channel":"nope:a","data":1}"#.to_vec(), 404),
        ("POST", "/api/publish", big.clone().into_bytes(), 413),
        ("POST", "/api/publish", too_big_data.into_bytes(), 413),
        ("POST", "/api/batch", b"{}".to_vec(), 400),
        ("POST", "/api/batch", br#"{"publications":{}}"#.to_vec(), 400),
        ("POST", "/api/batch", big.into_bytes(), 413),
        ("GET", "/api/nothing", Vec::new(), 404),
        ("GET", "/api/publish", Vec::new(), 405),
    ];
    for (method, path, body, status) in cases {
        let (got, _, answer) = api.request(method, path, Some(&body)).await.expect("request");
        assert_eq!(got, status, "{method} {path} {}", String::from_utf8_lossy(&body));
        let answer = body_json(&answer);
        assert_eq!(answer["error"]["code"], json!(status));
        assert!(answer["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    // Still serving.
    assert_eq!(api.publish("a", &json!(1)).await.expect("publish"), json!({}));
    let (_, _, metrics) = api.request("GET", "/metrics", None).await.expect("metrics");
    let metrics = String::from_utf8_lossy(&metrics).to_string();
    assert!(metrics.contains("herald_errors_total{code=\"413\"} 3"), "{metrics}");
    assert!(metrics.contains("herald_errors_total{code=\"500\"} 0"), "{metrics}");
}

#[tokio::test]
async fn metrics_count_connections_deliveries_and_bytes() {
    let server = Server::start("", &[]);
    let mut api = server.api().await;
    let (a, mut a_events) = server.client().await;
    let (b, mut b_events) = server.client().await;
    a.subscribe("m", None).await.expect("subscribe");
    b.subscribe("m", None).await.expect("subscribe");
    api.publish("m", &json!("hello")).await.expect("publish");
    a_events.next_pub(TIMEOUT).await.expect("a");
    b_events.next_pub(TIMEOUT).await.expect("b");
    let (status, headers, body) = api.request("GET", "/metrics", None).await.expect("metrics");
    assert_eq!(status, 200);
    assert!(headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("content-type") && v.starts_with("text/plain")));
    let text = String::from_utf8_lossy(&body).to_string();
    let value = |name: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing:\n{text}"))
    };
    assert_eq!(value("herald_connections"), 2.0);
    assert_eq!(value("herald_subscriptions"), 2.0);
    assert_eq!(value("herald_channels"), 1.0);
    assert_eq!(value("herald_publications_total"), 1.0);
    assert_eq!(value("herald_deliveries_total"), 2.0);
    assert!(value("herald_bytes_out_total") > 0.0);
}

#[tokio::test]
async fn previous_api_keys_are_accepted_during_a_rotation() {
    let server = Server::start(
        "api_key = \"new-key\"\nprevious_api_keys = [\"old-key\", \"older-key\"]\n",
        &[],
    );
    for key in ["new-key", "old-key", "older-key"] {
        let mut api = server.api_with_key(key).await;
        let (status, _, _) = api.request("GET", "/api/info", None).await.expect("request");
        assert_eq!(status, 200, "{key}");
    }
    for key in ["new-ke", "old-keyy", ""] {
        let mut api = server.api_with_key(key).await;
        let (status, _, _) = api.request("GET", "/api/info", None).await.expect("request");
        assert_eq!(status, 401, "{key:?}");
    }
    // Previous keys alone are refused at start-up, with the key named.
    let (code, text) = common::run_herald(&["--set", "previous_api_keys=old"], &[]);
    assert_ne!(code, Some(0));
    assert!(text.contains("previous_api_keys") && text.contains("api_key"), "{text}");
}
