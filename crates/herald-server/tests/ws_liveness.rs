//! Liveness: `ping` pushes at the advertised interval; a client silent for two intervals is
//! closed with 4011, one that answers stays.

mod common;

use std::time::Duration;

use common::Server;
use herald_client::{Client, ConnectOptions, Event};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_client_is_closed_with_4011_and_answering_client_stays() {
    let server = Server::start("ping_interval_secs = 1\n", &[]);
    let silent_options = ConnectOptions { auto_pong: false, ..Default::default() };
    let (_silent, mut silent_events, info) =
        Client::connect(&server.ws_url(), silent_options).await.expect("connect");
    assert_eq!(info.expect("connect reply").ping_interval_ms, 1000);
    let (live, mut live_events, _) =
        Client::connect(&server.ws_url(), ConnectOptions::default()).await.expect("connect");

    let mut pings = 0;
    let mut code = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while let Ok(Some(ev)) = tokio::time::timeout_at(deadline, silent_events.recv()).await {
        match ev {
            Event::Ping => pings += 1,
            Event::Disconnect { code: c, reconnect, .. } => {
                assert!(reconnect);
                code = Some(c);
            }
            Event::Closed { .. } => break,
            _ => {}
        }
    }
    assert_eq!(code, Some(4011));
    assert!(pings >= 1, "pings were sent before the close");

    // The answering client got pings too and is still served.
    let mut live_pings = 0;
    while let Some(ev) = live_events.try_recv() {
        match ev {
            Event::Ping => live_pings += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(live_pings >= 1, "{live_pings}");
    live.subscribe("still-here", None).await.expect("still connected");
}
