//! Misbehaving clients never cost the others: a client that never reads is cut with 4008 while
//! the others receive everything in order; floods of subscriptions, commands and connections
//! hit their limits; a conflated channel gives a slow reader the newest value.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{metric, metrics, RawWs, Server, TIMEOUT};
use herald_client::{Client, ClientError, ConnectOptions, Event};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_cut_and_the_others_get_everything() {
    const MESSAGES: u64 = 2000;
    let config = "[namespaces.h]\nhistory_size = 10000\n";
    let server = Server::start(config, &[]);
    // The slow one: subscribes, then never reads.
    let mut slow = RawWs::connect(&server, 4096);
    slow.send(r#"{"op":"subscribe","id":1,"channel":"h:big"}"#);
    let mut fast = Vec::new();
    for _ in 0..4 {
        let (c, e) = server.client().await;
        c.subscribe("h:big", None).await.unwrap();
        fast.push((c, e));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    // The fast readers consume in tasks and report how far they got; the publisher keeps at most
    // WINDOW publications ahead of the slowest fast reader (they keep up; the slow one never
    // reads at all).
    const WINDOW: u64 = 100;
    let progress: Vec<Arc<AtomicU64>> =
        (0..fast.len()).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let mut readers = Vec::new();
    for (k, (client, mut events)) in fast.into_iter().enumerate() {
        let progress = progress[k].clone();
        readers.push(tokio::spawn(async move {
            let _client = client;
            for i in 1..=MESSAGES {
                let (_, offset, data) = events.next_pub(TIMEOUT).await.unwrap();
                assert_eq!(offset, Some(i), "fast client {k}");
                assert_eq!(data["i"], json!(i));
                progress.store(i, Ordering::Relaxed);
            }
        }));
    }
    let payload = "x".repeat(4000);
    let started = Instant::now();
    let mut api = server.api().await;
    for chunk in (1..=MESSAGES).collect::<Vec<_>>().chunks(20) {
        let deadline = Instant::now() + TIMEOUT;
        while progress.iter().map(|p| p.load(Ordering::Relaxed)).min().unwrap_or(0) + WINDOW
            < chunk[0]
        {
            assert!(Instant::now() < deadline, "fast readers stalled");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let batch: Vec<(String, Value)> =
            chunk.iter().map(|i| ("h:big".to_string(), json!({"i": i, "p": payload}))).collect();
        let r = api.batch(&batch).await.unwrap();
        assert!(r["results"].as_array().unwrap().iter().all(|r| r.get("error").is_none()), "{r}");
    }
    let publish_time = started.elapsed();
    for r in readers {
        r.await.unwrap();
    }
    // Cut once it stayed behind for the grace period (3 s) without progress.
    let deadline = Instant::now() + TIMEOUT;
    let text = loop {
        let text = metrics(&server).await;
        if metric(&text, "herald_disconnects_total{code=\"4008\"}") >= 1.0 {
            break text;
        }
        assert!(Instant::now() < deadline, "the slow client was not cut: {text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let slow_kinds = metric(&text, "herald_limit_hits_total{kind=\"queue\"}")
        + metric(&text, "herald_limit_hits_total{kind=\"slow_consumer\"}");
    assert!(slow_kinds >= 1.0, "{text}");
    // The cut connection is gone once its close flush times out (the fast ones ended too).
    let deadline = Instant::now() + TIMEOUT;
    while metric(&metrics(&server).await, "herald_connections") > 0.0 {
        assert!(Instant::now() < deadline, "the slow connection was not closed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The slow client, reading at last, finds its stream ended (4008 if the server could still
    // write it, or plain end of stream), never a gap silently followed by more.
    let mut last = 0;
    let (msgs, _code) = tokio::task::block_in_place(|| slow.read_until(TIMEOUT, |_| false));
    let mut saw_disconnect = false;
    for m in &msgs {
        if let Some(p) = m.get("pub") {
            let o = p["offset"].as_u64().unwrap();
            assert_eq!(o, last + 1, "the slow client never sees a gap");
            last = o;
        }
        if let Some(d) = m.get("disconnect") {
            assert_eq!(d["code"], json!(4008));
            assert_eq!(d["reconnect"], json!(true));
            saw_disconnect = true;
        }
    }
    assert!(last < MESSAGES, "the slow client did not get everything ({last})");
    eprintln!("published {MESSAGES} x 4 KB in {publish_time:?}; slow client got {last}, disconnect push seen: {saw_disconnect}");
}

#[tokio::test]
async fn subscription_flood_gets_429_and_the_connection_lives() {
    let server = Server::start("[limits]\nmax_subscriptions_per_connection = 10\n", &[]);
    let (c, mut e) = server.client().await;
    for i in 0..10 {
        c.subscribe(&format!("s{i}"), None).await.unwrap();
    }
    match c.subscribe("s10", None).await {
        Err(ClientError::Reply { code: 429, message }) => {
            assert!(message.contains("10"), "{message}")
        }
        other => panic!("expected 429, got {other:?}"),
    }
    c.unsubscribe("s0").await.unwrap();
    c.subscribe("s10", None).await.unwrap();
    server.api().await.publish("s10", &json!("ok")).await.unwrap();
    assert_eq!(e.next_pub(TIMEOUT).await.unwrap().2, json!("ok"));
    let text = metrics(&server).await;
    assert_eq!(metric(&text, "herald_limit_hits_total{kind=\"subscriptions\"}"), 1.0);
}

#[tokio::test]
async fn command_flood_gets_429_then_4029() {
    let server = Server::start("[limits]\ncommand_rate = 20\ncommand_burst = 10\n", &[]);
    let options = ConnectOptions { send_connect: false, ..Default::default() };
    let (c, mut events, _) = Client::connect(&server.ws_url(), options).await.unwrap();
    // 15 commands at once: the burst of 10 passes, the rest get 429.
    let frame: Vec<String> = (1..=15)
        .map(|i| format!(r#"{{"op":"unsubscribe","id":{},"channel":"x"}}"#, 100 + i))
        .collect();
    let mut replies = Vec::new();
    let mut waits = Vec::new();
    for (i, line) in frame.iter().enumerate() {
        let c = c.clone();
        let line = line.clone();
        waits.push(tokio::spawn(async move { c.request_raw(101 + i as u32, &line).await }));
    }
    for w in waits {
        replies.push(w.await.unwrap().unwrap());
    }
    let refused = replies.iter().filter(|r| matches!(r, Err(e) if e.code == 429)).count();
    assert!((4..=6).contains(&refused), "{refused} refused of 15");
    // Keep flooding: the connection is closed with 4029.
    let flood: String = (1..=200)
        .map(|i| format!("{{\"op\":\"unsubscribe\",\"id\":{},\"channel\":\"x\"}}\n", 1000 + i))
        .collect();
    c.send_text(&flood).await.unwrap();
    let mut code = None;
    while let Ok(Some(ev)) = tokio::time::timeout(TIMEOUT, events.recv()).await {
        match ev {
            Event::Disconnect { code: c, reconnect, .. } => {
                assert!(reconnect);
                code = Some(c);
            }
            Event::Closed { .. } => break,
            _ => {}
        }
    }
    assert_eq!(code, Some(4029));
}

#[tokio::test]
async fn connection_flood_past_the_limit_gets_4029() {
    let server = Server::start("[limits]\nmax_connections = 5\n", &[]);
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(server.client().await);
    }
    let options = ConnectOptions { send_connect: false, ..Default::default() };
    let (_c, mut events, _) = Client::connect(&server.ws_url(), options).await.unwrap();
    let mut code = None;
    while let Ok(Some(ev)) = tokio::time::timeout(TIMEOUT, events.recv()).await {
        match ev {
            Event::Disconnect { code: c, .. } => code = Some(c),
            Event::Closed { .. } => break,
            _ => {}
        }
    }
    assert_eq!(code, Some(4029));
    // SSE streams count too: refused with 429.
    let mut api = server.api().await;
    let (status, _, _) = api.request("GET", "/sse?channel=a", None).await.unwrap();
    assert_eq!(status, 429);
    // Those held are unharmed, and a freed slot can be used again.
    held[0].0.subscribe("still", None).await.unwrap();
    held.pop().unwrap().0.close().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (c, _e) = server.client().await;
    c.subscribe("again", None).await.unwrap();
}

#[tokio::test]
async fn per_ip_and_per_user_limits() {
    let secret = "0123456789abcdef0123";
    let config = format!(
        "[limits]\nmax_connections_per_ip = 3\nmax_connections_per_user = 1\n[auth]\nhmac_secret = \"{secret}\"\n"
    );
    let server = Server::start(&config, &[]);
    let token = herald_server::auth::sign_hs256(secret.as_bytes(), &json!({"sub": "u1"}));
    let with_token = || ConnectOptions { token: Some(token.clone()), ..Default::default() };
    let (a, _ea, _) = Client::connect(&server.ws_url(), with_token()).await.unwrap();
    // The same user again: refused with 4029 at connect.
    match Client::connect(&server.ws_url(), with_token()).await {
        Err(_) => {}
        Ok((c, _, _)) => panic!("second connection of u1 accepted: {}", c.is_closed()),
    }
    a.subscribe("fine", None).await.unwrap();
    // Per IP: 3 from 127.0.0.1, a 4th from 127.0.0.2 is fine.
    let (_b, _eb) = server.client().await;
    let (_c, _ec) = server.client().await;
    let options = ConnectOptions { send_connect: false, ..Default::default() };
    let (_d, mut ed, _) = Client::connect(&server.ws_url(), options).await.unwrap();
    let mut code = None;
    while let Ok(Some(ev)) = tokio::time::timeout(TIMEOUT, ed.recv()).await {
        match ev {
            Event::Disconnect { code: c, .. } => code = Some(c),
            Event::Closed { .. } => break,
            _ => {}
        }
    }
    assert_eq!(code, Some(4029));
    let other_ip =
        ConnectOptions { local_addr: Some("127.0.0.2".parse().unwrap()), ..Default::default() };
    let (e, _ee, _) = Client::connect(&server.ws_url(), other_ip).await.unwrap();
    e.subscribe("from-another-ip", None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflated_channel_gives_a_slow_reader_the_newest_value() {
    const UPDATES: u64 = 3000;
    let config = "[limits]\nmax_queue_bytes = 65536\n[namespaces.market]\nhistory_size = 100\nconflate = true\n";
    let server = Server::start(config, &[]);
    let mut slow = RawWs::connect(&server, 4096);
    slow.send(r#"{"op":"subscribe","id":1,"channel":"market:X"}"#);
    let (reply, _) =
        tokio::task::block_in_place(|| slow.read_until(TIMEOUT, |v| v.get("id").is_some()));
    assert!(reply.last().unwrap().get("ok").is_some());
    // Far more than the queue and socket buffers hold, while the client does not read.
    let mut api = server.api().await;
    let pad = "p".repeat(1000);
    for chunk in (1..=UPDATES).collect::<Vec<_>>().chunks(100) {
        let batch: Vec<(String, Value)> = chunk
            .iter()
            .map(|i| ("market:X".to_string(), json!({"price": i, "pad": pad})))
            .collect();
        api.batch(&batch).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Now read: prices increase, end at the newest, and no disconnect.
    let (msgs, code) = tokio::task::block_in_place(|| {
        slow.read_until(TIMEOUT, |v| {
            v.get("pub").is_some_and(|p| p["data"]["price"] == json!(UPDATES))
        })
    });
    assert_eq!(code, None, "not disconnected");
    let offsets: Vec<u64> =
        msgs.iter().filter_map(|m| m.get("pub")).map(|p| p["offset"].as_u64().unwrap()).collect();
    assert!(offsets.windows(2).all(|w| w[0] < w[1]), "offsets still increase");
    assert_eq!(*offsets.last().unwrap(), UPDATES, "the newest value arrives");
    assert!(
        offsets.len() < UPDATES as usize,
        "the backlog was conflated ({} of {UPDATES})",
        offsets.len()
    );
    assert!(msgs.iter().all(|m| m.get("disconnect").is_none()));
    let text = metrics(&server).await;
    assert!(metric(&text, "herald_conflated_drops_total") > 0.0);
    assert_eq!(metric(&text, "herald_disconnects_total{code=\"4008\"}"), 0.0);
}
