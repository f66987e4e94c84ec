//! A quick fan-out load check for `herald-reference` (not the benchmark tool: `herald-bench` is).
//!
//! Connects `--connections` raw WebSocket subscribers, optionally reports the server's RSS per
//! idle connection (`--server-pid`), then publishes `--publications` messages carrying their send
//! time, one per `POST /publish` (at `--rate` per second, or back to back when 0), and reports
//! deliveries/s and delivery latency percentiles.
//!
//! ```text
//! taskset -c 0 herald-reference --listen 127.0.0.1:8090 &
//! taskset -c 1 cargo run --release -p herald-reference --example fanout_load -- \
//!     --connections 2000 --publications 2000 --server-pid $!
//! ```
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use clap::Parser;
use herald_protocol::ws::{self, Decoder, Message, Role};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Command line.
#[derive(Parser, Debug)]
struct Args {
    /// Server address.
    #[arg(long, default_value = "127.0.0.1:8090")]
    addr: SocketAddr,
    /// Number of subscribers.
    #[arg(long, default_value_t = 2000)]
    connections: usize,
    /// Number of publications.
    #[arg(long, default_value_t = 1000)]
    publications: u64,
    /// Publications per second; 0 publishes back to back (each waits for the previous answer).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Payload padding in bytes (added to each publication).
    #[arg(long, default_value_t = 64)]
    padding: usize,
    /// Server process id, to report its RSS per idle connection.
    #[arg(long)]
    server_pid: Option<u32>,
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

async fn subscribe(addr: SocketAddr) -> (TcpStream, Vec<u8>) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let key = ws::client_key();
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            assert!(buf.starts_with(b"HTTP/1.1 101 "));
            return (stream, buf.split_off(end + 4));
        }
        let mut chunk = [0u8; 512];
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "eof during handshake");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The send time (µs since `start`) in a payload `{"pub":{...,"data":{"t":T,...}}}`.
fn sent_at(payload: &[u8]) -> Option<u64> {
    let at = payload.windows(4).position(|w| w == b"\"t\":")? + 4;
    let digits: Vec<u8> = payload[at..].iter().copied().take_while(u8::is_ascii_digit).collect();
    std::str::from_utf8(&digits).ok()?.parse().ok()
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let base_rss = args.server_pid.and_then(rss_kib);
    let start = Instant::now();

    // Connect the subscribers (in batches, so the accept backlog never overflows).
    let mut streams = Vec::with_capacity(args.connections);
    for chunk in (0..args.connections).collect::<Vec<_>>().chunks(200) {
        let handles: Vec<_> = chunk.iter().map(|_| tokio::spawn(subscribe(args.addr))).collect();
        for h in handles {
            streams.push(h.await.unwrap());
        }
    }
    let connected = start.elapsed();
    eprintln!("{} subscribers connected in {:.2?}", streams.len(), connected);
    tokio::time::sleep(Duration::from_millis(500)).await;
    if let (Some(pid), Some(base)) = (args.server_pid, base_rss) {
        let now = rss_kib(pid).unwrap_or(0);
        eprintln!(
            "server RSS: {base} KiB before, {now} KiB with {} idle subscribers: {:.0} bytes per connection",
            streams.len(),
            (now.saturating_sub(base) * 1024) as f64 / streams.len() as f64
        );
    }

    let expected = args.publications;
    let mut readers = Vec::new();
    for (mut stream, rest) in streams {
        readers.push(tokio::spawn(async move {
            let mut decoder = Decoder::new(Role::Client, 1 << 20);
            let mut messages = Vec::new();
            let mut latencies = Vec::with_capacity(expected as usize);
            let mut count = 0u64;
            let mut chunk = vec![0u8; 16 * 1024];
            let mut pending = rest;
            while count < expected {
                decoder.feed(&pending, &mut messages).unwrap();
                let now = start.elapsed().as_micros() as u64;
                for message in messages.drain(..) {
                    if let Message::Text(payload) = message {
                        if let Some(t) = sent_at(&payload) {
                            latencies.push(now.saturating_sub(t));
                        }
                        count += 1;
                    }
                }
                if count >= expected {
                    break;
                }
                let n = stream.read(&mut chunk).await.unwrap();
                if n == 0 {
                    break;
                }
                pending = chunk[..n].to_vec();
            }
            latencies
        }));
    }

    // Publish.
    let mut publisher = TcpStream::connect(args.addr).await.unwrap();
    publisher.set_nodelay(true).unwrap();
    let padding = "x".repeat(args.padding);
    let publish_start = Instant::now();
    let mut response = vec![0u8; 1024];
    for i in 0..args.publications {
        if args.rate > 0.0 {
            let due = publish_start + Duration::from_secs_f64(i as f64 / args.rate);
            tokio::time::sleep_until(due.into()).await;
        }
        let body = format!("{{\"t\":{},\"p\":\"{padding}\"}}\n", start.elapsed().as_micros());
        let request = format!(
            "POST /publish HTTP/1.1\r\nHost: bench\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        publisher.write_all(request.as_bytes()).await.unwrap();
        // The answer is small and fixed: read until its body `{}`.
        let mut got = Vec::new();
        while !got.ends_with(b"{}") {
            let n = publisher.read(&mut response).await.unwrap();
            assert!(n > 0);
            got.extend_from_slice(&response[..n]);
        }
    }
    let published = publish_start.elapsed();

    let mut all = Vec::new();
    for r in readers {
        all.extend(r.await.unwrap());
    }
    let elapsed = publish_start.elapsed();
    all.sort_unstable();
    let deliveries = all.len() as u64;
    println!(
        "{} subscribers, {} publications in {:.2?} ({:.0}/s), {} deliveries in {:.2?}: {:.0} deliveries/s",
        args.connections,
        args.publications,
        published,
        args.publications as f64 / published.as_secs_f64(),
        deliveries,
        elapsed,
        deliveries as f64 / elapsed.as_secs_f64()
    );
    println!(
        "latency µs: p50 {} p90 {} p99 {} p99.9 {} max {}",
        percentile(&all, 0.5),
        percentile(&all, 0.9),
        percentile(&all, 0.99),
        percentile(&all, 0.999),
        all.last().copied().unwrap_or(0)
    );
}
