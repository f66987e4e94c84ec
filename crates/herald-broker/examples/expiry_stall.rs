//! How long a publication waits while the expiry sweep runs over many streams.
//!
//! `cargo run --release -p herald-broker --example expiry_stall -- [STREAMS] [BUDGET]`: creates
//! STREAMS (default 1,000,000) streams by publishing once to each, lets them expire, then
//! sweeps them with steps of BUDGET streams per lock hold (default: the server's
//! `EXPIRY_STEP`; `0` = a whole shard per lock hold, as before the sweep was incremental)
//! while another thread publishes to a hot channel, and prints that publisher's latencies.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use herald_broker::memory::{SweepCursor, EXPIRY_STEP};
use herald_broker::{Broker, BrokerHandler, MemoryBroker, Publication, PublishOptions};
use herald_protocol::ChannelName;

struct Discard;

impl BrokerHandler for Discard {
    fn handle_publication(&self, _: &ChannelName, _: &Publication) {}
    fn has_subscribers(&self, _: &ChannelName) -> bool {
        false
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let streams: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1_000_000);
    let budget = match args.next().and_then(|a| a.parse::<usize>().ok()) {
        Some(0) => usize::MAX,
        Some(b) => b,
        None => EXPIRY_STEP,
    };
    let broker = Arc::new(MemoryBroker::new());
    let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    runtime.block_on(broker.start(Arc::new(Discard))).expect("start");
    let ttl = Duration::from_millis(1);
    let short = PublishOptions { history_size: 4, history_ttl: ttl };
    let data = Bytes::from_static(b"\"x\"");
    for i in 0..streams {
        let c = ChannelName::parse(&format!("room:{i}")).expect("valid");
        broker.publish_now(&c, data.clone(), &short).expect("publish");
    }
    std::thread::sleep(Duration::from_millis(20));
    let done = Arc::new(AtomicBool::new(false));
    let publisher = {
        let (broker, done) = (broker.clone(), done.clone());
        std::thread::spawn(move || {
            let hot = ChannelName::parse("hot").expect("valid");
            let long = PublishOptions { history_size: 4, history_ttl: Duration::from_secs(60) };
            let mut latencies = Vec::new();
            while !done.load(Ordering::Relaxed) {
                let start = Instant::now();
                broker.publish_now(&hot, Bytes::from_static(b"1"), &long).expect("publish");
                latencies.push(start.elapsed());
                std::thread::sleep(Duration::from_micros(50));
            }
            latencies
        })
    };
    let start = Instant::now();
    let mut cursor = SweepCursor::default();
    let mut steps = 0;
    while !cursor.is_done() {
        broker.expire_step(
            &mut cursor,
            budget,
            |c| if c.as_str() == "hot" { Duration::from_secs(60) } else { ttl },
            Instant::now(),
        );
        steps += 1;
        std::thread::yield_now();
    }
    let sweep = start.elapsed();
    done.store(true, Ordering::Relaxed);
    let mut latencies = publisher.join().expect("publisher");
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize];
    println!(
        "streams {streams} budget {} sweep {sweep:?} in {steps} steps, left {}; hot publishes {}: p50 {:?} p99 {:?} p99.9 {:?} max {:?}",
        if budget == usize::MAX { "whole shard".to_string() } else { budget.to_string() },
        broker.stream_count(),
        latencies.len(),
        pct(0.5),
        pct(0.99),
        pct(0.999),
        latencies.last().copied().unwrap_or_default(),
    );
}
