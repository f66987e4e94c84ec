//! SIGTERM: every client gets `disconnect` 4000 with `reconnect: true` and the close frame, and
//! the process exits 0 within a few seconds.

mod common;

use std::time::Duration;

use common::{Server, TIMEOUT};
use herald_client::Event;

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
