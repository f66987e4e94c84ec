//! SIGTERM: every client gets `disconnect` 4000 with `reconnect: true` and the close frame, and
//! the process exits 0 within a few seconds.

mod common;

use std::time::Duration;

use common::{Server, TIMEOUT};
use herald_client::{Client, ConnectOptions, Event};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_tells_every_client_and_exits_zero() {
    let mut server = Server::start("", &[]);
    let mut clients = Vec::new();
    for i in 0..20 {
        let (c, e) = server.client().await;
        c.subscribe(&format!("ch{}", i % 4), None).await.expect("subscribe");
        clients.push((c, e));
    }
    let status = tokio::task::block_in_place(|| server.terminate(Duration::from_secs(8)));
    let status = status.expect("herald exits within 8 s");
    assert!(status.success(), "exit status {status:?}\n{}", server.log());
    for (_c, mut events) in clients {
        let mut disconnect = None;
        let mut close = None;
        while let Ok(Some(ev)) = tokio::time::timeout(TIMEOUT, events.recv()).await {
            match ev {
                Event::Disconnect { code, reconnect, .. } => disconnect = Some((code, reconnect)),
                Event::Closed { code, .. } => {
                    close = code;
                    break;
                }
                _ => {}
            }
        }
        assert_eq!(disconnect, Some((4000, true)));
        assert_eq!(close, Some(4000));
    }
    assert!(server.log().contains("shutting down"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_flushes_what_is_queued_before_saying_4000() {
    const N: u64 = 500;
    // Small socket buffers, and a client that reads nothing until the server was told to stop:
    // most of the publications are still in the server's queue when SIGTERM arrives.
    let config = "[limits]\nsocket_send_buffer_bytes = 4096\n[namespaces.h]\nhistory_size = 1000\n";
    let mut server = Server::start(config, &[]);
    let options = ConnectOptions { event_capacity: 1, ..Default::default() };
    let (c, mut events, _) = Client::connect(&server.ws_url(), options).await.expect("connect");
    c.subscribe("h:drain", None).await.expect("subscribe");
    let mut api = server.api().await;
    let batch: Vec<(String, serde_json::Value)> = (1..=N)
        .map(|i| ("h:drain".to_string(), serde_json::json!({"i": i, "pad": "x".repeat(1000)})))
        .collect();
    api.batch(&batch).await.expect("batch");
    let (_, _, metrics) = api.request("GET", "/metrics", None).await.expect("metrics");
    let queued = String::from_utf8_lossy(&metrics)
        .lines()
        .find(|l| l.starts_with("herald_queue_depth_sum"))
        .map(str::to_string);
    let _ =
        std::process::Command::new("kill").arg("-TERM").arg(server.child.id().to_string()).status();
    let mut next = 1;
    let mut disconnect = None;
    while let Ok(Some(ev)) = tokio::time::timeout(TIMEOUT, events.recv()).await {
        match ev {
            Event::Pub { offset, .. } => {
                assert!(disconnect.is_none(), "nothing after the disconnect");
                assert_eq!(offset, Some(next));
                next += 1;
            }
            Event::Disconnect { code, .. } => disconnect = Some(code),
            Event::Closed { .. } => break,
            _ => {}
        }
    }
    assert_eq!(next - 1, N, "every queued publication was flushed before the close ({queued:?})");
    assert_eq!(disconnect, Some(4000));
    let status = tokio::task::block_in_place(|| server.terminate(Duration::from_secs(8)));
    assert!(status.expect("exits").success());
}
