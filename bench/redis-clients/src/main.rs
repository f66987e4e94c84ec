//! Compares two Rust Redis clients, `redis` (redis-rs 1.x) and `fred` (10.x), on the two paths
//! Herald's Redis broker is busiest on:
//!
//! 1. **publish**: Herald's publication script via EVALSHA (loaded once) through one
//!    multiplexed connection (a `redis` `ConnectionManager`, a `fred` `Client`), 64 tasks each
//!    making calls one after another, 100-byte data, 1000 channels in turn. Measured twice: the
//!    script as Herald runs it (it reads `INFO server` for the run id), and with that line
//!    replaced by a constant, to show what the INFO call costs.
//! 2. **receive**: one subscriber connection subscribed to 1000 channels while a separate
//!    publisher (a raw pipelined socket, the same for both crates) floods PUBLISH with 100-byte
//!    payloads; counts the messages the subscriber gets, each decoded to (channel, payload).
//!    The publisher is this same program started as `flood <addr>` in a process of its own.
//!
//! Besides the rates it reports the client's CPU time per call or message (user + system time
//! of this process over the window; on a shared machine that is steadier than the rates) and
//! how busy redis-server was (its CPU time over the window; 100% = one core saturated).
//!
//! The program starts its own `redis-server` on a free loopback port (`--save "" --appendonly
//! no`, and no output-buffer limit for pub/sub clients so a slow subscriber is not cut off),
//! runs 3 rounds, each measuring both crates (the crate that goes first alternates), prints
//! every figure and the medians, and stops the server.
//!
//! Run (from this directory):
//!
//! ```sh
//! CARGO_TARGET_DIR=/root/.cache/herald/target-redis-clients cargo run --release -j1
//! ```
//!
//! Environment: `REDIS_SERVER` (default `redis-server`) the server binary, `BENCH_SECS`
//! (default 5) the length of each measurement, `BENCH_ROUNDS` (default 3).

use std::net::{SocketAddr, TcpListener};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use fred::prelude::{
    Builder, ClientLike, Config as FredConfig, EventInterface, LuaInterface, PubsubInterface,
    Value as FredValue,
};
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// Herald's publication script, as the broker runs it.
const SCRIPT: &str = r#"local run = string.match(redis.call('INFO', 'server'), 'run_id:(%w+)')
local m = redis.call('HMGET', KEYS[1], 'e', 'r')
local epoch = m[1]
if not epoch or m[2] ~= run then epoch = ARGV[4]; redis.call('DEL', KEYS[2]); redis.call('HSET', KEYS[1], 'e', epoch, 'o', 0, 'r', run) end
local offset = redis.call('HINCRBY', KEYS[1], 'o', 1)
local size = tonumber(ARGV[2])
if size > 0 then redis.call('RPUSH', KEYS[2], ARGV[1]); redis.call('LTRIM', KEYS[2], -size, -1); redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[3])) end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
redis.call('PUBLISH', ARGV[5], 'h' .. offset .. ' ' .. epoch .. ' ' .. ARGV[1])
return {offset, epoch}"#;
const INFO_LINE: &str = "local run = string.match(redis.call('INFO', 'server'), 'run_id:(%w+)')";
const CONST_LINE: &str = "local run = 'c0ffee'";

const CHANNELS: usize = 1000;
const TASKS: usize = 64;
const DATA_LEN: usize = 100;
/// PUBLISH commands the flooding publisher writes at a time (at most two batches in flight).
const BATCH: usize = 1000;
const WARMUP: Duration = Duration::from_millis(500);

#[derive(Clone, Copy, PartialEq)]
enum Crate {
    Redis,
    Fred,
}

impl Crate {
    fn name(self) -> &'static str {
        match self {
            Crate::Redis => "redis 1.x",
            Crate::Fred => "fred 10.x",
        }
    }
}

const TESTS: [&str; 3] = [
    "publish: EVALSHA script (with INFO), calls/s",
    "publish: EVALSHA script (INFO -> constant), calls/s",
    "receive: pub/sub messages/s at the subscriber",
];

/// The keys and arguments of one channel's publication.
struct Channel {
    state: String,
    history: String,
    pubsub: String,
}

fn channels() -> Arc<Vec<Channel>> {
    Arc::new(
        (0..CHANNELS)
            .map(|n| Channel {
                state: format!("herald:{{bench:{n}}}:s"),
                history: format!("herald:{{bench:{n}}}:h"),
                pubsub: format!("herald:{{bench:{n}}}"),
            })
            .collect(),
    )
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() == 3 && args[1] == "flood" {
        return flood(args[2].parse()?).await;
    }
    let secs: u64 = env_or("BENCH_SECS", 5)?;
    let rounds: usize = env_or("BENCH_ROUNDS", 3)?;
    let window = Duration::from_secs(secs);
    let mut server = RedisServer::start().await?;
    let outcome = run(&server, window, rounds).await;
    server.stop().await;
    outcome
}

async fn run(server: &RedisServer, window: Duration, rounds: usize) -> Result<()> {
    let url = server.url();
    let const_script = SCRIPT.replace(INFO_LINE, CONST_LINE);
    assert_ne!(const_script, SCRIPT);
    // figures[crate][test] = one measurement per round.
    let mut figures: Vec<Vec<Vec<Measured>>> = vec![vec![Vec::new(); TESTS.len()]; 2];
    for round in 0..rounds {
        let order =
            if round % 2 == 0 { [Crate::Redis, Crate::Fred] } else { [Crate::Fred, Crate::Redis] };
        for krate in order {
            settle(&url).await?;
            let with_info = publish_rate(krate, server, SCRIPT, window).await?;
            settle(&url).await?;
            let constant = publish_rate(krate, server, &const_script, window).await?;
            settle(&url).await?;
            let receive = receive_rate(krate, server, window).await?;
            let rates = [with_info, constant, receive];
            for (test, m) in rates.into_iter().enumerate() {
                eprintln!(
                    "round {} {:<9} {:>9.0}/s {:>6.2} us client CPU each, server {:>3.0}% busy  {}",
                    round + 1,
                    krate.name(),
                    m.rate,
                    m.cpu_us,
                    m.server_busy * 100.0,
                    TESTS[test]
                );
                figures[krate as usize][test].push(m);
            }
        }
    }
    println!(
        "\nMedians of {rounds} rounds. Client CPU: this process's user+system time per call or"
    );
    println!("message. Server busy: redis-server's CPU time / wall time (100% = one core).\n");
    println!("| measurement | redis 1.x | fred 10.x | client CPU redis / fred | server busy redis / fred | runs (redis; fred) |");
    println!("|---|---:|---:|---:|---:|---|");
    for (test, name) in TESTS.iter().enumerate() {
        let [r, f] = [Crate::Redis, Crate::Fred].map(|c| &figures[c as usize][test]);
        let rates = |ms: &[Measured]| ms.iter().map(|m| m.rate).collect::<Vec<_>>();
        let cpus = |ms: &[Measured]| ms.iter().map(|m| m.cpu_us).collect::<Vec<_>>();
        let busy = |ms: &[Measured]| ms.iter().map(|m| m.server_busy * 100.0).collect::<Vec<_>>();
        println!(
            "| {name} | {:.0} | {:.0} | {:.2} / {:.2} us | {:.0}% / {:.0}% | {}; {} |",
            median(&rates(r)),
            median(&rates(f)),
            median(&cpus(r)),
            median(&cpus(f)),
            median(&busy(r)),
            median(&busy(f)),
            list(&rates(r)),
            list(&rates(f))
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 1. Publications through one connection

/// Calls/s of the script over `window`, from `TASKS` tasks sharing one connection.
async fn publish_rate(
    krate: Crate,
    server: &RedisServer,
    script: &str,
    window: Duration,
) -> Result<Measured> {
    let url = server.url();
    let url = url.as_str();
    let channels = channels();
    let data: Vec<u8> = (0..DATA_LEN).map(|i| b'a' + (i % 26) as u8).collect();
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = tokio::task::JoinSet::new();
    let mut fred_client = None;
    match krate {
        Crate::Redis => {
            let client = redis::Client::open(url)?;
            let mut conn = client.get_connection_manager().await?;
            let sha: String =
                redis::cmd("SCRIPT").arg("LOAD").arg(script).query_async(&mut conn).await?;
            for _ in 0..TASKS {
                let (mut conn, sha, data) = (conn.clone(), sha.clone(), data.clone());
                let (channels, next, done, stop) =
                    (channels.clone(), next.clone(), done.clone(), stop.clone());
                tasks.spawn(async move {
                    while !stop.load(Relaxed) {
                        let ch = &channels[next.fetch_add(1, Relaxed) % CHANNELS];
                        let (offset, _epoch): (i64, String) = redis::cmd("EVALSHA")
                            .arg(&sha)
                            .arg(2)
                            .arg(&ch.state)
                            .arg(&ch.history)
                            .arg(&data)
                            .arg(100)
                            .arg(300_000)
                            .arg("abcd1234")
                            .arg(&ch.pubsub)
                            .query_async(&mut conn)
                            .await?;
                        anyhow::ensure!(offset > 0);
                        done.fetch_add(1, Relaxed);
                    }
                    Ok(())
                });
            }
        }
        Crate::Fred => {
            let client = Builder::from_config(FredConfig::from_url(url)?).build()?;
            client.init().await?;
            let sha: String = client.script_load(script).await?;
            let data = fred::bytes::Bytes::from(data);
            for _ in 0..TASKS {
                let (client, sha, data) = (client.clone(), sha.clone(), data.clone());
                let (channels, next, done, stop) =
                    (channels.clone(), next.clone(), done.clone(), stop.clone());
                tasks.spawn(async move {
                    while !stop.load(Relaxed) {
                        let ch = &channels[next.fetch_add(1, Relaxed) % CHANNELS];
                        let args: Vec<FredValue> = vec![
                            FredValue::Bytes(data.clone()),
                            FredValue::Integer(100),
                            FredValue::Integer(300_000),
                            "abcd1234".into(),
                            ch.pubsub.as_str().into(),
                        ];
                        let keys = vec![ch.state.as_str(), ch.history.as_str()];
                        let (offset, _epoch): (i64, String) =
                            client.evalsha(&sha, keys, args).await?;
                        anyhow::ensure!(offset > 0);
                        done.fetch_add(1, Relaxed);
                    }
                    Ok(())
                });
            }
            fred_client = Some(client);
        }
    }
    let measured = measure(&done, window, server).await;
    stop.store(true, Relaxed);
    while let Some(outcome) = tasks.join_next().await {
        outcome??;
    }
    if let Some(client) = fred_client {
        client.quit().await?;
    }
    Ok(measured)
}

// ---------------------------------------------------------------------------------------------
// 2. Pub/sub receive rate

/// Messages/s one subscriber connection receives (and decodes) while a raw pipelined
/// publisher floods its 1000 channels.
async fn receive_rate(krate: Crate, server: &RedisServer, window: Duration) -> Result<Measured> {
    let (url, addr) = (server.url(), server.addr);
    let url = url.as_str();
    let channels = channels();
    let names: Vec<String> = channels.iter().map(|c| c.pubsub.clone()).collect();
    let received = Arc::new(AtomicU64::new(0));
    let bad = Arc::new(AtomicU64::new(0));
    let lost = Arc::new(AtomicU64::new(0));
    let consume = {
        let (received, bad) = (received.clone(), bad.clone());
        move |channel: &str, payload: &[u8]| {
            if payload.len() != DATA_LEN || !channel.starts_with("herald:{bench:") {
                bad.fetch_add(1, Relaxed);
            }
            received.fetch_add(1, Relaxed);
        }
    };
    let mut fred_client = None;
    let reader = match krate {
        Crate::Redis => {
            let client = redis::Client::open(url)?;
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&names).await?;
            let mut stream = pubsub.into_on_message();
            tokio::spawn(async move {
                while let Some(msg) = stream.next().await {
                    consume(msg.get_channel_name(), msg.get_payload_bytes());
                }
            })
        }
        Crate::Fred => {
            let client = Builder::from_config(FredConfig::from_url(url)?)
                .with_performance_config(|c| c.broadcast_channel_capacity = 1 << 16)
                .build()?;
            client.init().await?;
            let mut rx = client.message_rx();
            client.subscribe(names).await?;
            let lost = lost.clone();
            fred_client = Some(client);
            tokio::spawn(async move {
                use tokio::sync::broadcast::error::RecvError;
                loop {
                    match rx.recv().await {
                        Ok(msg) => consume(&msg.channel, msg.value.as_bytes().unwrap_or_default()),
                        Err(RecvError::Lagged(n)) => {
                            lost.fetch_add(n, Relaxed);
                        }
                        Err(RecvError::Closed) => break,
                    }
                }
            })
        }
    };
    // The publisher is this program in another process, so its CPU is not counted as ours.
    let mut publisher = Command::new(std::env::current_exe()?)
        .args(["flood", &addr.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let started = Instant::now();
    let measured = measure(&received, window, server).await;
    drop(publisher.stdin.take()); // tells it to stop
    let mut out = String::new();
    publisher.stdout.take().context("publisher stdout")?.read_to_string(&mut out).await?;
    let pub_rate =
        out.trim().parse::<f64>().context("publisher count")? / started.elapsed().as_secs_f64();
    publisher.wait().await?;
    reader.abort();
    if let Some(client) = fred_client {
        client.quit().await?;
    }
    let (bad, lost) = (bad.load(Relaxed), lost.load(Relaxed));
    eprintln!(
        "    ({}: publisher sent {pub_rate:.0}/s; malformed {bad}; lost to lag {lost})",
        krate.name()
    );
    if bad > 0 {
        bail!("{bad} messages decoded wrong");
    }
    Ok(measured)
}

/// The publisher process (`flood <addr>`): floods PUBLISH over a raw socket, `BATCH` commands
/// per write, at most two batches unanswered, until its standard input closes; then prints how
/// many were answered. Crate-neutral, so both subscribers face the same publisher.
async fn flood(addr: SocketAddr) -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    let stopper = stop.clone();
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        stopper.store(true, Relaxed);
    });
    let channels = channels();
    let payload = "p".repeat(DATA_LEN);
    let mut batch = Vec::new();
    for ch in channels.iter().cycle().take(BATCH) {
        let name = &ch.pubsub;
        let cmd = format!(
            "*3\r\n$7\r\nPUBLISH\r\n${}\r\n{name}\r\n${DATA_LEN}\r\n{payload}\r\n",
            name.len()
        );
        batch.extend_from_slice(cmd.as_bytes());
    }
    let mut socket = TcpStream::connect(addr).await?;
    socket.set_nodelay(true)?;
    let mut buf = vec![0u8; 64 * 1024];
    let (mut written, mut answered) = (0usize, 0usize);
    while !stop.load(Relaxed) {
        socket.write_all(&batch).await?;
        written += BATCH;
        // Each reply is one integer line, ":<receivers>\r\n".
        while answered + BATCH < written {
            let n = socket.read(&mut buf).await?;
            if n == 0 {
                bail!("redis closed the publisher's connection");
            }
            answered += buf[..n].iter().filter(|&&b| b == b'\n').count();
        }
    }
    println!("{answered}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Helpers

/// Waits until the connections of the previous measurement are gone (a subscriber's backlog
/// is freed with its connection), so that they take no server time from the next one.
async fn settle(url: &str) -> Result<()> {
    let mut conn = redis::Client::open(url)?.get_multiplexed_async_connection().await?;
    for _ in 0..100 {
        let info: String = redis::cmd("INFO").arg("clients").query_async(&mut conn).await?;
        if info.lines().any(|l| l.trim() == "connected_clients:1") {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("connections of the previous measurement are still open after 5 s")
}

/// One measurement: events/s, this process's CPU time per event, and how busy the server was
/// (its CPU time / wall time).
#[derive(Clone, Copy)]
struct Measured {
    rate: f64,
    cpu_us: f64,
    server_busy: f64,
}

/// Measures `counter` over `window`, after a warm-up.
async fn measure(counter: &AtomicU64, window: Duration, server: &RedisServer) -> Measured {
    tokio::time::sleep(WARMUP).await;
    let server_pid = server.child.id().map_or("0".into(), |id| id.to_string());
    let (start, from) = (Instant::now(), counter.load(Relaxed));
    let (cpu, server_cpu) = (cpu_time("self"), cpu_time(&server_pid));
    tokio::time::sleep(window).await;
    let events = (counter.load(Relaxed) - from) as f64;
    let elapsed = start.elapsed().as_secs_f64();
    Measured {
        rate: events / elapsed,
        cpu_us: (cpu_time("self") - cpu).as_secs_f64() * 1e6 / events,
        server_busy: (cpu_time(&server_pid) - server_cpu).as_secs_f64() / elapsed,
    }
}

/// User + system CPU time of a process, all threads (Linux, 100 ticks a second).
fn cpu_time(pid: &str) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name's ')': state is field 3, utime 14, stime 15.
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks: u64 =
        fields.get(11..13).map_or(0, |f| f.iter().filter_map(|t| t.parse::<u64>().ok()).sum());
    Duration::from_millis(ticks * 10)
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn list(values: &[f64]) -> String {
    values.iter().map(|v| format!("{v:.0}")).collect::<Vec<_>>().join(", ")
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> Result<T> {
    match std::env::var(name) {
        Ok(v) => v.parse().ok().with_context(|| format!("{name}={v} is not valid")),
        Err(_) => Ok(default),
    }
}

/// A redis-server of our own on a free loopback port, killed when stopped or dropped.
struct RedisServer {
    child: Child,
    addr: SocketAddr,
}

impl RedisServer {
    async fn start() -> Result<Self> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let binary = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let child = Command::new(&binary)
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .args(["--client-output-buffer-limit", "pubsub 0 0 0", "--loglevel", "warning"])
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {binary}"))?;
        let server = RedisServer { child, addr };
        for _ in 0..100 {
            if TcpStream::connect(addr).await.is_ok() {
                eprintln!("redis-server on {addr}");
                return Ok(server);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("redis-server did not listen on {addr}")
    }

    fn url(&self) -> String {
        format!("redis://{}/", self.addr)
    }

    async fn stop(&mut self) {
        let _ = self.child.kill().await;
    }
}
