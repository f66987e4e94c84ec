//! Fan-out over real WebSocket connections: many clients on many channels receive exactly the
//! published sequence of each channel, in order; offsets only where history is kept.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{Server, TIMEOUT};
use serde_json::json;

const CONFIG: &str = r#"
[channel_defaults]
client_publish = true
[namespaces.hist]
history_size = 100
client_publish = true
"#;

fn channel_name(i: usize) -> String {
    if i.is_multiple_of(2) {
        format!("hist:c{i}")
    } else {
        format!("c{i}")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_many_channels_exact_order() {
    const CLIENTS: usize = 40;
    const CHANNELS: usize = 8;
    const PER_CHANNEL: usize = 150;
    let server = Server::start(CONFIG, &[]);

    // Client i subscribes to three channels.
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let (client, events) = server.client().await;
        let mine: Vec<usize> = vec![i % CHANNELS, (i + 3) % CHANNELS, (i + 5) % CHANNELS];
        for &c in &mine {
            let sub = client.subscribe(&channel_name(c), None).await.expect("subscribe");
            assert!(!sub.recovered);
            assert!(sub.publications.is_empty());
            assert_eq!(sub.offset.is_some(), c % 2 == 0, "offset only with history");
        }
        clients.push((client, events, mine));
    }

    // Publish through the HTTP batch API (channels interleaved) and, for every tenth message,
    // through a client's WebSocket `publish`.
    let mut api = server.api().await;
    let (ws_publisher, _pub_events) = server.client().await;
    let mut last_offset: HashMap<usize, u64> = HashMap::new();
    let mut batch = Vec::new();
    for seq in 0..PER_CHANNEL {
        for c in 0..CHANNELS {
            if seq % 10 == 9 {
                // Flush pending batch first to keep the per-channel order of sends.
                if !batch.is_empty() {
                    let res = api.batch(&batch).await.expect("batch");
                    check_results(&res, &batch, &mut last_offset);
                    batch.clear();
                }
                let offset = ws_publisher
                    .publish(&channel_name(c), &json!({"seq": seq, "c": c}))
                    .await
                    .expect("ws publish");
                record_offset(c, offset, &mut last_offset);
            } else {
                batch.push((channel_name(c), json!({"seq": seq, "c": c})));
            }
        }
        if batch.len() >= 64 {
            let res = api.batch(&batch).await.expect("batch");
            check_results(&res, &batch, &mut last_offset);
            batch.clear();
        }
    }
    if !batch.is_empty() {
        let res = api.batch(&batch).await.expect("batch");
        check_results(&res, &batch, &mut last_offset);
    }

    // Every client gets exactly 0..PER_CHANNEL on each of its channels, in order.
    for (i, (_client, events, mine)) in clients.iter_mut().enumerate() {
        let mut next: HashMap<String, usize> = HashMap::new();
        let mut offsets: HashMap<String, u64> = HashMap::new();
        for _ in 0..mine.len() * PER_CHANNEL {
            let (channel, offset, data) = events.next_pub(TIMEOUT).await.expect("publication");
            let c = data["c"].as_u64().expect("c") as usize;
            assert_eq!(channel, channel_name(c));
            assert!(mine.contains(&c), "client {i} got {channel} it did not subscribe to");
            let expected = next.entry(channel.clone()).or_insert(0);
            assert_eq!(data["seq"].as_u64(), Some(*expected as u64), "client {i} on {channel}");
            *expected += 1;
            match offset {
                Some(o) => {
                    assert_eq!(c % 2, 0, "no offsets without history");
                    let prev = offsets.insert(channel.clone(), o);
                    assert!(prev.is_none_or(|p| o > p), "offsets strictly increase");
                }
                None => assert_eq!(c % 2, 1, "offsets with history"),
            }
        }
        // Nothing more arrives.
        tokio::time::sleep(Duration::from_millis(20)).await;
        while let Some(ev) = events.try_recv() {
            assert!(!matches!(ev, herald_client::Event::Pub { .. }), "extra publication {ev:?}");
        }
    }

    let channels = api.request("GET", "/api/channels", None).await.expect("channels");
    let body: serde_json::Value = serde_json::from_slice(&channels.2).expect("json");
    let list = body["channels"].as_array().expect("array");
    assert_eq!(list.len(), CHANNELS);
    let total: u64 = list.iter().map(|c| c["subscribers"].as_u64().unwrap_or(0)).sum();
    assert_eq!(total as usize, CLIENTS * 3);
}

fn record_offset(c: usize, offset: Option<u64>, last: &mut HashMap<usize, u64>) {
    match offset {
        Some(o) => {
            assert_eq!(c % 2, 0);
            let prev = last.insert(c, o);
            assert!(prev.is_none_or(|p| o > p), "publish offsets strictly increase");
        }
        None => assert_eq!(c % 2, 1),
    }
}

fn check_results(
    res: &serde_json::Value,
    batch: &[(String, serde_json::Value)],
    last: &mut HashMap<usize, u64>,
) {
    let results = res["results"].as_array().expect("results");
    assert_eq!(results.len(), batch.len());
    for ((_, data), r) in batch.iter().zip(results) {
        let c = data["c"].as_u64().expect("c") as usize;
        assert!(r.get("error").is_none(), "{r}");
        record_offset(c, r["offset"].as_u64(), last);
        assert_eq!(r.get("epoch").is_some(), c.is_multiple_of(2));
    }
}

#[tokio::test]
async fn unsubscribe_stops_delivery_and_resubscribe_resumes() {
    let server = Server::start(CONFIG, &[]);
    let (a, mut a_events) = server.client().await;
    let (b, mut b_events) = server.client().await;
    a.subscribe("news", None).await.expect("subscribe a");
    b.subscribe("news", None).await.expect("subscribe b");
    let mut api = server.api().await;
    api.publish("news", &json!(1)).await.expect("publish");
    assert_eq!(a_events.next_pub(TIMEOUT).await.expect("a gets 1").2, json!(1));
    assert_eq!(b_events.next_pub(TIMEOUT).await.expect("b gets 1").2, json!(1));

    a.unsubscribe("news").await.expect("unsubscribe");
    api.publish("news", &json!(2)).await.expect("publish");
    assert_eq!(b_events.next_pub(TIMEOUT).await.expect("b gets 2").2, json!(2));
    assert!(a_events.next_pub(Duration::from_millis(300)).await.is_err(), "a unsubscribed");

    a.subscribe("news", None).await.expect("subscribe again");
    api.publish("news", &json!(3)).await.expect("publish");
    assert_eq!(a_events.next_pub(TIMEOUT).await.expect("a gets 3").2, json!(3));
    assert_eq!(b_events.next_pub(TIMEOUT).await.expect("b gets 3").2, json!(3));

    // When the last subscriber leaves, the channel disappears from the listing.
    a.unsubscribe("news").await.expect("unsubscribe");
    b.close().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (_, _, body) = api.request("GET", "/api/channels", None).await.expect("channels");
    let body: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(body["channels"], json!([]));
}

#[tokio::test]
async fn several_commands_in_one_frame_get_every_reply() {
    let server = Server::start(CONFIG, &[]);
    let (client, mut events) = server.client().await;
    client
        .send_text(
            "{\"op\":\"subscribe\",\"id\":10,\"channel\":\"a\"}\n{\"op\":\"subscribe\",\"id\":11,\"channel\":\"hist:b\"}\n\n{\"op\":\"publish\",\"id\":12,\"channel\":\"hist:b\",\"data\":[1,2]}",
        )
        .await
        .expect("send");
    let (channel, offset, data) = events.next_pub(TIMEOUT).await.expect("pub");
    assert_eq!((channel.as_str(), offset, data), ("hist:b", Some(1), json!([1, 2])));
    // Both subscriptions exist.
    let mut api = server.api().await;
    api.publish("a", &json!("x")).await.expect("publish");
    assert_eq!(events.next_pub(TIMEOUT).await.expect("pub").2, json!("x"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publishing_client_moves_to_the_api_runtime_and_loses_nothing() {
    // A client that publishes is served on the API runtime from its first publish on (one
    // publication per round trip is then not paced by the subscriber writers); its
    // subscriptions, queue and order are kept across the move.
    let config = "[namespaces.p]\nclient_publish = true\n";
    for (flags, moves) in [(&[][..], true), (&["--set", "api_threads=0"][..], false)] {
        let server = Server::start(config, flags);
        let (client, mut events) = server.client().await;
        client.subscribe("p:a", None).await.unwrap();
        let mut api = server.api().await;
        for i in 0..50 {
            api.publish("p:a", &json!(i)).await.unwrap();
            if i == 20 {
                client.publish("p:a", &json!("mine")).await.unwrap();
            }
        }
        for i in 0..50 {
            let (_, _, data) = events.next_pub(TIMEOUT).await.unwrap();
            assert_eq!(data, json!(i), "{flags:?}");
            if i == 20 {
                let (_, _, data) = events.next_pub(TIMEOUT).await.unwrap();
                assert_eq!(data, json!("mine"), "{flags:?}");
            }
        }
        for i in 0..20 {
            client.publish("p:a", &json!({"own": i})).await.unwrap();
            let (_, _, data) = events.next_pub(TIMEOUT).await.unwrap();
            assert_eq!(data, json!({"own": i}), "{flags:?}");
        }
        client.subscribe("p:b", None).await.unwrap();
        api.publish("p:b", &json!("b")).await.unwrap();
        assert_eq!(events.next_pub(TIMEOUT).await.unwrap().2, json!("b"));
        client.close().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let log = server.log();
        assert_eq!(log.contains("served on the API runtime"), moves, "{flags:?}");
        let (_, _, body) = api.request("GET", "/api/channels", None).await.unwrap();
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&body).unwrap()["channels"],
            json!([]),
            "the moved connection's close unsubscribed it"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_256_publishing_clients_move_to_the_api_runtime() {
    // 260 clients publish once and stay connected: 256 move, the other 4 are served where
    // they are, and publish just as well.
    let server = Server::start("[namespaces.p]\nclient_publish = true\n", &[]);
    let mut clients = Vec::new();
    for i in 0..260 {
        let (client, events) = server.client().await;
        client.publish("p:cap", &json!(i)).await.unwrap();
        clients.push((client, events));
    }
    for (client, _) in &clients[250..] {
        client.publish("p:cap", &json!("again")).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let moved = server.log().matches("served on the API runtime").count();
    assert_eq!(moved, 256);
    drop(clients);
}
