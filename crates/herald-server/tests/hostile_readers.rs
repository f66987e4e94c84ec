//! Clients that do not read, read in bursts, ask for more than they read, or keep sending while
//! they are cut: none of them slows the publishers or the other subscribers, a reader that is
//! only momentarily behind is never cut, and every cut ends cleanly.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream as StdTcpStream;
use std::time::{Duration, Instant};

use common::{metric, metrics, RawWs, Server, TIMEOUT};
use herald_protocol::ws::{self, Opcode, Role};
use serde_json::{json, Value};

/// Waits until the metric's value satisfies `done` (or the time is up) and returns it.
async fn wait_metric_until(
    server: &Server,
    name: &str,
    done: impl Fn(f64) -> bool,
    limit: Duration,
) -> f64 {
    let deadline = Instant::now() + limit;
    loop {
        let value = metric(&metrics(server).await, name);
        if done(value) || Instant::now() >= deadline {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the metric reaches `at_least` (or the time is up) and returns its value.
async fn wait_metric(server: &Server, name: &str, at_least: f64, limit: Duration) -> f64 {
    wait_metric_until(server, name, |v| v >= at_least, limit).await
}

/// A WebSocket subscriber that never reads, on a socket with tiny buffers.
fn ws_never_reader(server: &Server, channel: &str) -> StdTcpStream {
    let mut stream = common::raw_ws(server, 4096);
    let cmd = format!(r#"{{"op":"subscribe","id":1,"channel":"{channel}"}}"#);
    stream.write_all(&ws::encode_frame(Role::Client, Opcode::Text, cmd.as_bytes())).unwrap();
    stream
}

/// An SSE stream that never reads, on a socket with tiny buffers.
fn sse_never_reader(server: &Server, channel: &str) -> StdTcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&server.addr.into()).unwrap();
    let mut stream: StdTcpStream = socket.into();
    write!(stream, "GET /sse?channel={channel} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    stream
}

/// Reads `count` publications of `channel` in order from a client, failing on anything else.
async fn read_all(events: &mut herald_client::Events, channel: &str, count: u64) {
    for i in 0..count {
        let (c, _, data) = events.next_pub(TIMEOUT).await.unwrap_or_else(|e| {
            panic!("publication {i} of {count} did not arrive: {e}");
        });
        assert_eq!(c, channel);
        assert_eq!(data["i"], json!(i), "in order, none skipped");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_readers_do_not_freeze_a_channel() {
    // The issue's case: 3 readers and 4 never-readers (here 4 WebSocket, 2 SSE) on one channel. Before, once ~800 KB had
    // been published every publish waited 2 s and got 503, and the readers got nothing more.
    let config = "[limits]\nslow_consumer_grace_ms = 500\nsocket_send_buffer_bytes = 4096\n";
    let server = Server::start(config, &[]);
    let mut readers = Vec::new();
    for _ in 0..3 {
        let (client, events) = server.client().await;
        client.subscribe("hot", None).await.unwrap();
        readers.push((client, events));
    }
    let mut _stalled: Vec<StdTcpStream> = (0..4).map(|_| ws_never_reader(&server, "hot")).collect();
    _stalled.extend((0..2).map(|_| sse_never_reader(&server, "hot")));
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut api = server.api().await;
    let pad = "p".repeat(5000);
    const COUNT: u64 = 600; // 3 MB: several times the never-readers' bounds
    let mut tasks = Vec::new();
    let mut clients = Vec::new();
    for (client, mut events) in readers {
        clients.push(client);
        tasks.push(tokio::spawn(async move {
            read_all(&mut events, "hot", COUNT).await;
            events
        }));
    }
    let mut slowest = Duration::ZERO;
    for i in 0..COUNT {
        let body = json!({"channel": "hot", "data": {"i": i, "pad": pad}}).to_string();
        let started = Instant::now();
        let (status, _, answer) =
            api.request("POST", "/api/publish", Some(body.as_bytes())).await.unwrap();
        slowest = slowest.max(started.elapsed());
        assert_eq!(status, 200, "publish {i}: {}", String::from_utf8_lossy(&answer));
    }
    let mut kept = Vec::new();
    for task in tasks {
        kept.push(tokio::time::timeout(TIMEOUT * 3, task).await.unwrap().unwrap());
    }
    // The never-readers were cut as slow consumers, the publisher never waited for them.
    let cut = wait_metric(&server, "herald_disconnects_total{code=\"4008\"}", 6.0, TIMEOUT).await;
    assert_eq!(cut, 6.0, "exactly the six never-readers were cut");
    assert_eq!(metric(&metrics(&server).await, "herald_publish_overloaded_total"), 0.0);
    // The cut ones are gone once their close flush gave up (they read nothing); the readers stay.
    let open = wait_metric_until(&server, "herald_connections", |v| v <= 3.0, TIMEOUT).await;
    assert_eq!(open, 3.0, "the readers are still connected");
    eprintln!("slowest publish while the never-readers were connected: {slowest:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_survives_a_burst_far_larger_than_its_queue() {
    // 12 MB in 6 batches of 2 MB, against a 1 MiB queue bound and a small socket buffer: a
    // client that reads is only momentarily behind and is never cut; one that never reads is.
    let config = "[limits]\nsocket_send_buffer_bytes = 65536\nslow_consumer_grace_ms = 1000\n";
    let server = Server::start(config, &[]);
    // A small event channel: while the reader pauses, its client stops reading the socket.
    let options = herald_client::ConnectOptions { event_capacity: 16, ..Default::default() };
    let (client, mut events, _) =
        herald_client::Client::connect(&server.ws_url(), options).await.unwrap();
    client.subscribe("burst", None).await.unwrap();
    let _stalled = ws_never_reader(&server, "burst");
    tokio::time::sleep(Duration::from_millis(200)).await;

    let pad = "b".repeat(10_000);
    const BATCHES: u64 = 6;
    const PER_BATCH: u64 = 200;
    // The reader pauses until the first batch (2 MB, twice its queue bound) is accepted, so it
    // is certainly behind once; then it reads everything.
    let (first_batch_done, first_batch) = tokio::sync::oneshot::channel::<()>();
    let reader = tokio::spawn(async move {
        let _ = first_batch.await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        read_all(&mut events, "burst", BATCHES * PER_BATCH).await;
        events
    });
    let mut api = server.api().await;
    let mut first_batch_done = Some(first_batch_done);
    for b in 0..BATCHES {
        let batch: Vec<(String, Value)> = (0..PER_BATCH)
            .map(|k| ("burst".to_string(), json!({"i": b * PER_BATCH + k, "pad": pad})))
            .collect();
        let answer = api.batch(&batch).await.unwrap();
        assert!(answer["results"].as_array().unwrap().iter().all(|r| r.get("error").is_none()));
        if let Some(done) = first_batch_done.take() {
            let _ = done.send(());
        }
    }
    let mut events = tokio::time::timeout(TIMEOUT * 3, reader).await.unwrap().unwrap();
    // Still connected: a publication after the burst arrives.
    api.publish("burst", &json!({"i": "after"})).await.unwrap();
    let (_, _, data) = events.next_pub(TIMEOUT).await.unwrap();
    assert_eq!(data["i"], json!("after"));
    let cut = wait_metric(&server, "herald_disconnects_total{code=\"4008\"}", 1.0, TIMEOUT).await;
    assert_eq!(cut, 1.0, "only the never-reader was cut");
    let m = metrics(&server).await;
    assert!(metric(&m, "herald_slow_recoveries_total") >= 1.0, "the reader fell behind: {m}");
    drop(client);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_asking_for_more_than_its_queue_holds_is_served_not_cut() {
    // Five ~500 KB history pages asked in one frame, with a 1 MiB queue and a 1.5 MiB cap (the
    // replies together are 2.5 MB): each command waits until the connection has drained enough.
    let config = "[limits]\nmax_queue_burst_bytes = 1572864\nsocket_send_buffer_bytes = 65536\n\
                  [namespaces.h]\nhistory_size = 1000\n";
    let server = Server::start(config, &[]);
    let mut api = server.api().await;
    let pad = "h".repeat(10_000);
    let batch: Vec<(String, Value)> =
        (0..100).map(|i| ("h:big".to_string(), json!({"i": i, "pad": pad}))).collect();
    api.batch(&batch).await.unwrap();

    let mut raw = RawWs::connect(&server, 1 << 16);
    let commands: Vec<String> = (1..=5)
        .map(|id| format!(r#"{{"op":"history","id":{id},"channel":"h:big","limit":50}}"#))
        .collect();
    raw.send(&commands.join("\n"));
    let mut replies = 0;
    let (messages, close) = raw.read_until(TIMEOUT * 2, |v| {
        if v.get("ok").is_some() {
            replies += 1;
        }
        replies == 5
    });
    assert_eq!(close, None, "not closed: {:?}", messages.last());
    for (k, reply) in messages.iter().enumerate() {
        assert_eq!(reply["id"], json!(k + 1), "{reply}");
        assert_eq!(reply["ok"]["publications"].as_array().unwrap().len(), 50, "one whole page");
    }
    assert_eq!(metric(&metrics(&server).await, "herald_disconnects_total{code=\"4008\"}"), 0.0);
}

/// Reads one whole server frame stream until the close frame, the end or an error; returns
/// the text messages, the close code and how the socket ended.
fn read_to_close(stream: &mut StdTcpStream, limit: Duration) -> (Vec<Value>, Option<u16>, String) {
    stream.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let mut decoder = ws::Decoder::new(Role::Client, 1 << 24);
    let mut buf = vec![0u8; 65536];
    let mut out = Vec::new();
    let mut messages = Vec::new();
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        match stream.read(&mut buf) {
            Ok(0) => return (out, None, "eof".into()),
            Ok(n) => {
                decoder.feed(&buf[..n], &mut messages).unwrap();
                for m in messages.drain(..) {
                    match m {
                        ws::Message::Text(t) => {
                            for line in t.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                                out.push(serde_json::from_slice(line).unwrap());
                            }
                        }
                        ws::Message::Close(c) => return (out, c.map(|c| c.code), "close".into()),
                        _ => {}
                    }
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return (out, None, format!("error: {e}")),
        }
    }
    (out, None, "timeout".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_still_sending_sees_the_disconnect_and_close_frame() {
    // Clients that keep sending (pongs, commands) while the server closes them used to get a
    // TCP reset, which threw away the disconnect push and the close frame before they read them.
    let server = Server::start("", &["--set", "auth.hmac_secret=0123456789abcdef0123456789abcdef"]);
    let token = herald_server::auth::sign_hs256(
        b"0123456789abcdef0123456789abcdef",
        &json!({"sub": "chatty"}),
    );
    let mut streams = Vec::new();
    for _ in 0..4 {
        let mut stream = common::raw_ws(&server, 1 << 16);
        let cmd = format!(r#"{{"op":"connect","id":1,"token":"{token}"}}"#);
        stream.write_all(&ws::encode_frame(Role::Client, Opcode::Text, cmd.as_bytes())).unwrap();
        streams.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Each client floods pongs from another thread, until its reader saw the close frame.
    let mut handles = Vec::new();
    for stream in streams {
        let mut writer = stream.try_clone().unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        let sender = std::thread::spawn(move || {
            let pong = ws::encode_frame(Role::Client, Opcode::Text, br#"{"op":"pong"}"#);
            while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                if writer.write_all(&pong).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        });
        let mut reader = stream;
        let read = std::thread::spawn(move || {
            let got = read_to_close(&mut reader, TIMEOUT);
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            got
        });
        handles.push((sender, read));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut api = server.api().await;
    let (status, _, body) = api
        .request("POST", "/api/disconnect", Some(br#"{"user":"chatty","code":4008}"#))
        .await
        .unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    for (sender, read) in handles {
        let (messages, close, how) = read.join().unwrap();
        sender.join().unwrap();
        let disconnect = messages.iter().find(|m| m.get("disconnect").is_some());
        assert!(disconnect.is_some(), "no disconnect push ({how}): {messages:?}");
        assert_eq!(disconnect.unwrap()["disconnect"]["code"], json!(4008));
        assert_eq!(close, Some(4008), "ended by {how}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_to_commands_before_a_bad_frame_are_sent_then_4002() {
    let server = Server::start("", &[]);
    let mut stream = common::raw_ws(&server, 1 << 16);
    let mut bytes = ws::encode_frame(
        Role::Client,
        Opcode::Text,
        br#"{"op":"subscribe","id":7,"channel":"ok"}"#,
    )
    .to_vec();
    // A frame with a reserved bit set: a protocol error, in the same TCP write.
    let mut bad = ws::encode_frame(Role::Client, Opcode::Text, b"x").to_vec();
    bad[0] |= 0x40;
    bytes.extend_from_slice(&bad);
    stream.write_all(&bytes).unwrap();
    let (messages, close, how) = read_to_close(&mut stream, TIMEOUT);
    assert_eq!(messages.first().map(|m| m["id"].clone()), Some(json!(7)), "{messages:?}");
    assert!(messages[0].get("ok").is_some(), "{messages:?}");
    assert_eq!(close, Some(4002), "ended by {how}: {messages:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_pub_of_a_new_epoch_names_it() {
    let config = "[namespaces.t]\nhistory_size = 10\nhistory_ttl_secs = 1\n";
    let server = Server::start(config, &[]);
    let mut api = server.api().await;
    api.publish("t:e", &json!(0)).await.unwrap();
    let mut raw = RawWs::connect(&server, 1 << 16);
    raw.send(r#"{"op":"subscribe","id":1,"channel":"t:e"}"#);
    let (reply, _) = raw.read_until(TIMEOUT, |v| v.get("id").is_some());
    let mut known = reply.last().unwrap()["ok"]["epoch"].as_str().unwrap().to_string();

    // Same epoch: no epoch field.
    api.publish("t:e", &json!(1)).await.unwrap();
    let (got, _) = raw.read_until(TIMEOUT, |v| v.get("pub").is_some());
    let first = &got.last().unwrap()["pub"];
    assert!(first.get("epoch").is_none(), "{first}");

    // The history expires after 1 s idle: the next publication starts a new epoch.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    api.publish("t:e", &json!(2)).await.unwrap();
    api.publish("t:e", &json!(3)).await.unwrap();
    let mut pubs = Vec::new();
    let (got, close) = raw.read_until(TIMEOUT, |v| {
        if v.get("pub").is_some() {
            pubs.push(v["pub"].clone());
        }
        pubs.len() == 2
    });
    assert_eq!(close, None, "{got:?}");
    let epoch = pubs[0]["epoch"].as_str().expect("the first pub of the new epoch names it");
    assert_ne!(epoch, known);
    assert_eq!(pubs[0]["offset"], json!(1));
    known = epoch.to_string();
    assert!(pubs[1].get("epoch").is_none(), "only the first names it: {}", pubs[1]);
    assert_eq!(pubs[1]["offset"], json!(2));
    let (_, _, body) = api.request("GET", "/api/history?channel=t:e&limit=0", None).await.unwrap();
    let h: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(h["epoch"], json!(known));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_whose_own_publish_waits_keeps_draining_and_is_not_cut() {
    // The node is saturated (three never-readers hold more than its backlog bound), so a
    // publish waits for capacity. The client publishing meanwhile has 2 MB queued to it, far
    // over its queue bound: its connection keeps draining while its own publish waits, so it is
    // not judged slow. (Before, its writer stopped during its publish and it was cut with the
    // never-readers.)
    let config = "[limits]\nmax_queue_bytes = 65536\nslow_consumer_grace_ms = 1000\n\
                  max_backlog_bytes = 1048576\npublish_timeout_ms = 5000\n\
                  socket_send_buffer_bytes = 65536\n[namespaces.pub]\nclient_publish = true\n";
    let server = Server::start(config, &[]);
    let (client, mut events) = server.client().await;
    client.subscribe("pub:hot", None).await.unwrap();
    let _stalled: Vec<StdTcpStream> = (0..3).map(|_| ws_never_reader(&server, "pub:hot")).collect();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let pad = "s".repeat(10_000);
    let mut api = server.api().await;
    const COUNT: u64 = 200; // 2 MB
    let batch: Vec<(String, Value)> =
        (0..COUNT).map(|i| ("pub:hot".to_string(), json!({"i": i, "pad": pad}))).collect();
    api.batch(&batch).await.unwrap();
    // Its own publication, sent while 2 MB are queued to it and the node is saturated.
    let publish = tokio::spawn(async move {
        let started = Instant::now();
        let r = client.publish("pub:hot", &json!({"i": COUNT})).await;
        (client, r, started.elapsed())
    });
    read_all(&mut events, "pub:hot", COUNT + 1).await;
    let (client, answer, waited) = tokio::time::timeout(TIMEOUT, publish).await.unwrap().unwrap();
    assert!(answer.is_ok(), "its publish was accepted: {answer:?}");
    eprintln!("the client's publish waited {waited:?}");
    let cut = wait_metric(&server, "herald_disconnects_total{code=\"4008\"}", 3.0, TIMEOUT).await;
    assert_eq!(cut, 3.0, "the three never-readers were cut");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        metric(&metrics(&server).await, "herald_disconnects_total{code=\"4008\"}"),
        3.0,
        "and not the publishing reader"
    );
    assert!(client.history("pub:hot", None, Some(0)).await.is_ok(), "still connected");
}
