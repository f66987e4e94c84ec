//! `herald-bench`: Herald's load generator.
//!
//! `codecs` measures one market-tick publication in each wire format without a server.
//!
//! Scenarios: `idle` (server memory per held connection), `fanout` (one channel, many
//! subscribers), `spread` (many channels with Zipf popularity), `ingest` (publications accepted
//! per second over `/api/batch` or WebSocket `publish`), `cluster` (a fan-out over several
//! nodes of one cluster: subscribers and publishers spread over `--url` and `--nodes`, every
//! publication expected at every subscriber, whichever node it was published on). The main process publishes and
//! coordinates; subscriber connections live in worker processes (this same binary, re-executed
//! with the hidden `worker` subcommand), at most ~15,000 each by default, so that no process
//! needs more than its 20,000 open files. Progress goes to stderr once per second; the result
//! is one JSON line on stdout (and a markdown table with `--markdown`).
//!
//! Subscribers are WebSocket connections, or Server-Sent Events streams with `--transport sse`
//! (Herald only). With `--slow-fraction F`, that fraction of them subscribe and then never
//! read again: the others are measured as usual, and the report says how many of the slow
//! ones the server closed.
//!
//! Hostile clients (`fanout` against Herald only; the `hostile` module): `--never-ws N`,
//! `--never-sse N` (subscribe the hot channel, never read), `--bursty N` (read, pause, read),
//! `--many-sse N` (one never-read SSE stream of many long channel names), `--history-flood N`
//! (`{"op":"history"}` without `limit` on a big history, never read). They run in the main
//! process beside the measured subscribers; the report adds, per kind, how many the server cut
//! (4008) and when, the server's disconnects from `/metrics` over time, and the server's RSS
//! sampled every 100 ms (`server_rss_peak`). `--settle S` then closes every connection and
//! reads the idle node's RSS for S more seconds (`server_rss_idle`, `server_rss_settle`).
//!
//! ```text
//! herald --listen 127.0.0.1:18500 --set namespaces.bench.client_publish=true &
//! herald-bench fanout --url ws://127.0.0.1:18500/ws --connections 2000 --rate 0 --duration 10
//! herald-bench fanout --url ws://127.0.0.1:18500/ws --transport sse --slow-fraction 0.01
//! herald-bench fanout --url ws://127.0.0.1:18500/ws --connections 1000 --rate 200 --payload 1000 \
//!     --never-ws 5 --never-sse 5 --bursty 5 --many-sse 2 --history-flood 4 --settle 20
//! herald-bench cluster --url ws://127.0.0.1:18500/ws \
//!     --nodes ws://127.0.0.1:18501/ws,ws://127.0.0.1:18502/ws --connections 3000 --rate 20
//! ```

mod codecs;
mod conn;
mod hostile;
mod plan;
mod publish;
mod report;
mod sys;
mod worker;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use clap::{Parser, Subcommand, ValueEnum};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
use tokio::process::{Child, ChildStdin};
use tokio::sync::mpsc;

use crate::plan::{Format, Layout, Plan, Target, Transport};
use crate::publish::{Chooser, PubConfig, PubCounters};
use crate::report::Report;
use crate::worker::{FromWorker, Progress, ToWorker, WorkerResult};

/// Herald's load generator: measures a Herald node (or the reference fan-out server) with
/// thousands of WebSocket (or SSE) subscribers spread over worker processes.
#[derive(Parser, Debug)]
#[command(name = "herald-bench", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// N connections subscribed and held; reports the server's RSS per connection
    /// (VmRSS before opening them, and 2 s after the last is subscribed).
    Idle(Args),
    /// N subscribers on one channel, a publisher at --rate (or as fast as possible):
    /// deliveries/s, loss, end-to-end latency.
    Fanout(Args),
    /// N clients each on --per-client of --channels channels chosen by Zipf(--zipf)
    /// popularity; publications spread over channels with the same weights.
    Spread(Args),
    /// Publications/s accepted through /api/batch (--publish-mode http-batch) or WebSocket `publish`
    /// (--publish-mode ws), over --channels channels; with --connections > 0 each channel gets
    /// connections/channels subscribers and deliveries are counted too.
    Ingest(Args),
    /// N subscribers on one channel spread over the nodes of a cluster (--url and --nodes, one
    /// worker process or more per node), publishers spread over the same nodes' HTTP APIs
    /// (publisher i on node i mod nodes): deliveries/s, loss, end-to-end latency across nodes.
    Cluster(Args),
    /// What one market-tick publication costs in each wire format: frame bytes, the server's
    /// encoding, a client's decoding (no server needed; pin it with taskset). Prints a
    /// markdown table, or JSON lines with --json.
    Codecs {
        /// Rounds measured; the median is reported.
        #[arg(long, default_value_t = 7)]
        rounds: usize,
        /// Calls per round.
        #[arg(long, default_value_t = 200_000)]
        calls: usize,
        /// One JSON line per row instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Internal: one worker process (JSON lines on stdin/stdout).
    #[command(hide = true)]
    Worker,
}

/// How publishers publish (`--publish-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// HTTP, --publishers keep-alive connections, one request at a time on each, one
    /// publication per `POST /api/publish` (the reference server: `/publish`); --batch is
    /// ignored.
    HttpSingle,
    /// As http-single, with --batch publications per `POST /api/batch` (--batch 1:
    /// `/api/publish`).
    #[value(alias = "batch")]
    HttpBatch,
    /// WebSocket `publish` commands, --batch in flight per connection, --publishers
    /// connections. The channels' namespace must allow client publish
    /// (e.g. `--set namespaces.bench.client_publish=true` with the default prefix `bench:`).
    Ws,
}

/// The drain ends when no delivery was reported for this long: a saturated worker reports its
/// progress late, and a server far above saturation holds seconds of deliveries in its queues.
const DRAIN_STALL: Duration = Duration::from_secs(5);

#[derive(clap::Args, Debug, Clone)]
struct Args {
    /// Which server: herald (subscribe through the protocol, publish through /api/batch or
    /// /api/publish) or reference (no protocol: every connection receives every publication;
    /// publish through POST /publish).
    #[arg(long, value_enum, default_value = "herald")]
    target: Target,
    /// WebSocket URL of the server (SSE streams open `/sse` on its host and port).
    #[arg(long, default_value = "ws://127.0.0.1:8080/ws")]
    url: String,
    /// How subscribers connect: WebSocket (`herald.json`) or Server-Sent Events
    /// (`GET /sse?channel=..`, Herald only).
    #[arg(long, value_enum, default_value = "ws")]
    transport: Transport,
    /// The wire format of WebSocket subscribers: `json` (`herald.json`), `proto`
    /// (`herald.proto`: binary frames, each publication's data read from the decoded
    /// protobuf), or `half` (odd-numbered connections protobuf, the others JSON).
    #[arg(long, value_enum, default_value = "json")]
    format: Format,
    /// Fraction of subscriber connections that subscribe and then never read their socket
    /// again (receive buffer 4 KiB). They are left out of deliveries, loss and latency; the
    /// report counts them (`slow_connections`) and those the server closed
    /// (`slow_disconnected`), found by reading them at the end.
    #[arg(long, default_value_t = 0.0)]
    slow_fraction: f64,
    /// HTTP base URL for publishing (default: the host and port of --url).
    #[arg(long)]
    http: Option<String>,
    /// `cluster`: WebSocket URLs of the cluster's other nodes, comma-separated (their HTTP
    /// APIs are on the same host and port).
    #[arg(long, value_delimiter = ',')]
    nodes: Vec<String>,
    /// API key sent as `Authorization: Bearer KEY` on /api/* calls.
    #[arg(long)]
    api_key: Option<String>,
    /// Subscriber connections (default 1000; ingest: 0).
    #[arg(long)]
    connections: Option<usize>,
    /// Channels (default 1; spread: 100). Channel i is named <channel-prefix>i.
    #[arg(long)]
    channels: Option<usize>,
    /// Channels per client in spread (default 3).
    #[arg(long)]
    per_client: Option<usize>,
    /// Zipf exponent of channel popularity in spread (rank k has weight 1/k^s).
    #[arg(long, default_value_t = 1.0)]
    zipf: f64,
    /// Publications per second over all publishers; 0 = as fast as possible.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Seconds of measured publishing (idle: seconds the connections are held after the
    /// memory reading).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds of publishing before measurement starts (not timed, still checked for loss).
    #[arg(long, default_value_t = 0.0)]
    warmup: f64,
    /// Size of each publication's data in bytes (JSON `{"t":..,"s":..,"c":..,"w":..,"p":"xx.."}`).
    #[arg(long, default_value_t = 100)]
    payload: usize,
    /// Publications per HTTP request (batch; 1 = /api/publish), or WebSocket `publish`
    /// commands in flight per connection (ingest --publish-mode ws). At a fixed --rate, the most sent
    /// at once when publications are due.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Concurrent publishers (default: 1 at a fixed rate, 2 as fast as possible, 4 for ingest).
    #[arg(long)]
    publishers: Option<usize>,
    /// Worker processes holding the connections (default ceil(connections / 15000)).
    #[arg(long)]
    workers: Option<usize>,
    /// Source addresses for the connections, used round-robin: a range `127.0.0.1-127.0.0.8`
    /// or a list `127.0.0.1,127.0.0.2` (default: as many 127.0.0.x as needed for at most
    /// 20,000 connections per address).
    #[arg(long)]
    source_ips: Option<String>,
    /// Run the subscriber worker processes at this nice value (0..=19): on a machine where
    /// they share a CPU with this process, the publishers' reply times then measure the
    /// server, not the subscribers' share of that CPU.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=19))]
    worker_nice: u8,
    /// The server's process id, for its RSS (default: the process listening on --url's port,
    /// found through /proc/net/tcp and /proc/*/fd).
    #[arg(long)]
    server_pid: Option<u32>,
    /// How publishers publish (fanout, spread and ingest): over HTTP (`/api/publish` with
    /// --batch 1, `/api/batch` beyond) or WebSocket `publish` commands (--batch in flight).
    #[arg(long = "publish-mode", alias = "mode", value_enum, default_value = "http-batch")]
    mode: Mode,
    /// Prefix of channel names; its namespace (`bench`) must exist on the server, and allow
    /// client publish for ingest --publish-mode ws.
    #[arg(long, default_value = "bench:")]
    channel_prefix: String,
    /// Connections each worker opens at once.
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
    /// Longest wait, in seconds, for in-flight publications after publishing stops (it also
    /// stops once no delivery was reported for 5 s).
    #[arg(long, default_value_t = 15.0)]
    drain: f64,
    /// A free text copied into the results (e.g. the build or the machine).
    #[arg(long, default_value = "")]
    label: String,
    /// Also print the results as a one-row markdown table (with header).
    #[arg(long)]
    markdown: bool,
    /// Append the JSON line of results to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Hostile: WebSocket clients that subscribe the hot channel and never read (fanout).
    #[arg(long, default_value_t = 0)]
    never_ws: usize,
    /// Hostile: SSE streams of the hot channel that are never read (fanout).
    #[arg(long, default_value_t = 0)]
    never_sse: usize,
    /// Hostile: WebSocket subscribers of the hot channel that read for --burst-read-ms, pause
    /// for --burst-pause-ms, and so on (fanout).
    #[arg(long, default_value_t = 0)]
    bursty: usize,
    /// Milliseconds a bursty reader reads.
    #[arg(long, default_value_t = 200)]
    burst_read_ms: u64,
    /// Milliseconds a bursty reader pauses.
    #[arg(long, default_value_t = 1000)]
    burst_pause_ms: u64,
    /// Hostile: SSE streams of --many-channels channels each (the hot channel and long names),
    /// never read (fanout).
    #[arg(long, default_value_t = 0)]
    many_sse: usize,
    /// Channels of each --many-sse stream.
    #[arg(long, default_value_t = 200)]
    many_channels: usize,
    /// Length in bytes of the long channel names of --many-sse streams.
    #[arg(long, default_value_t = 60)]
    many_name_len: usize,
    /// Hostile: WebSocket clients that ask --flood-requests `{"op":"history"}` without `limit`
    /// on --flood-channel and never read (fanout). The channel is filled first through
    /// /api/batch; its namespace needs history (e.g. `--set namespaces.hist.history_size=1000`).
    #[arg(long, default_value_t = 0)]
    history_flood: usize,
    /// The channel the history flood reads.
    #[arg(long, default_value = "hist:flood")]
    flood_channel: String,
    /// Publications put into --flood-channel before the run.
    #[arg(long, default_value_t = 1000)]
    flood_fill: usize,
    /// Bytes of each of those publications.
    #[arg(long, default_value_t = 102400)]
    flood_size: usize,
    /// Fill --flood-channel even without --history-flood clients (a baseline run with the
    /// same node state).
    #[arg(long)]
    fill_history: bool,
    /// `history` commands each flood client sends.
    #[arg(long, default_value_t = 1)]
    flood_requests: usize,
    /// After the run, close every connection and read the idle server's RSS for this many
    /// seconds (`server_rss_idle`: the last reading).
    #[arg(long, default_value_t = 0.0)]
    settle: f64,
}

/// Which scenario runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    Idle,
    Fanout,
    Spread,
    Ingest,
    Cluster,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Idle => "idle",
            Scenario::Fanout => "fanout",
            Scenario::Spread => "spread",
            Scenario::Ingest => "ingest",
            Scenario::Cluster => "cluster",
        }
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let (scenario, args) = match cli.command {
        Command::Worker => return worker::run(),
        Command::Codecs { rounds, calls, json } => {
            let rows = codecs::run(rounds.max(1), calls.max(1))?;
            if json {
                for row in &rows {
                    println!("{}", serde_json::to_string(row)?);
                }
            } else {
                print!("{}", codecs::markdown(&rows));
            }
            return Ok(());
        }
        Command::Idle(a) => (Scenario::Idle, a),
        Command::Fanout(a) => (Scenario::Fanout, a),
        Command::Spread(a) => (Scenario::Spread, a),
        Command::Ingest(a) => (Scenario::Ingest, a),
        Command::Cluster(a) => (Scenario::Cluster, a),
    };
    sys::raise_fd_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let report = runtime.block_on(coordinate(scenario, args.clone()))?;
    let line = serde_json::to_string(&report)?;
    println!("{line}");
    if args.markdown {
        print!("{}", report.markdown());
    }
    if let Some(path) = &args.out {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        writeln!(file, "{line}")?;
    }
    // Workers are killed on drop; don't wait for the runtime's idle tasks.
    runtime.shutdown_timeout(Duration::from_millis(100));
    Ok(())
}

/// Parses `a.b.c.d-a.b.c.e` or `ip,ip,...`.
fn parse_ips(text: &str) -> anyhow::Result<Vec<IpAddr>> {
    if let Some((from, to)) = text.split_once('-') {
        let from: std::net::Ipv4Addr = from.trim().parse().context("--source-ips")?;
        let to: std::net::Ipv4Addr = to.trim().parse().context("--source-ips")?;
        let (a, b) = (u32::from(from), u32::from(to));
        if b < a || b - a > 65536 {
            bail!("--source-ips: bad range {text}");
        }
        return Ok((a..=b).map(|i| IpAddr::V4(i.into())).collect());
    }
    text.split(',').map(|s| s.trim().parse().context("--source-ips")).collect()
}

/// The HTTP base (`http://host:port`) of a node's `ws://host:port/...` URL.
fn http_base(ws_url: &str) -> String {
    let rest = ws_url.split_once("://").map_or(ws_url, |(_, r)| r);
    format!("http://{}", rest.split('/').next().unwrap_or("127.0.0.1:8080"))
}

/// The port of a `ws://host:port/...` URL.
fn url_port(url: &str) -> Option<u16> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next()?;
    authority.rsplit_once(':').and_then(|(_, p)| p.parse().ok()).or(Some(80))
}

/// A worker's messages, or its end.
enum WorkerEvent {
    Message(FromWorker),
    Gone,
}

/// Ready report of one worker.
struct Ready {
    ready: u64,
    failed: u64,
    slow: u64,
    sub_counts: Vec<u64>,
    first_error: Option<String>,
}

/// The worker processes and what they said last.
struct Fleet {
    stdins: Vec<ChildStdin>,
    _children: Vec<Child>,
    rx: mpsc::UnboundedReceiver<(usize, WorkerEvent)>,
    progress: Vec<Progress>,
    ready: Vec<Option<Ready>>,
    results: Vec<Option<WorkerResult>>,
    gone: Vec<bool>,
    connections: usize,
    started: Instant,
    next_print: Instant,
    counters: Option<Arc<PubCounters>>,
    last_delivered: (Instant, u64),
}

impl Fleet {
    async fn spawn(plans: Vec<Plan>, connections: usize, nice: u8) -> anyhow::Result<Fleet> {
        let exe = std::env::current_exe().context("finding this executable")?;
        let (tx, rx) = mpsc::unbounded_channel();
        let mut stdins = Vec::new();
        let mut children = Vec::new();
        let n = plans.len();
        for (i, plan) in plans.into_iter().enumerate() {
            // With a nice value, through nice(1): the workers then yield the shared load CPU
            // to this process, whose publishers time their replies.
            let mut command = if nice > 0 {
                let mut c = tokio::process::Command::new("nice");
                c.arg("-n").arg(nice.to_string()).arg(&exe);
                c
            } else {
                tokio::process::Command::new(&exe)
            };
            let mut child = command
                .arg("worker")
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting worker {i}"))?;
            let mut stdin = child.stdin.take().ok_or_else(|| anyhow!("worker stdin"))?;
            let stdout = child.stdout.take().ok_or_else(|| anyhow!("worker stdout"))?;
            let mut line = serde_json::to_string(&ToWorker::Plan(Box::new(plan)))?;
            line.push('\n');
            stdin.write_all(line.as_bytes()).await?;
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut lines = tokio::io::BufReader::new(stdout).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    match serde_json::from_str::<FromWorker>(&line) {
                        Ok(m) => {
                            let _ = tx.send((i, WorkerEvent::Message(m)));
                        }
                        Err(e) => eprintln!("worker {i}: bad line ({e}): {line}"),
                    }
                }
                let _ = tx.send((i, WorkerEvent::Gone));
            });
            stdins.push(stdin);
            children.push(child);
        }
        let now = Instant::now();
        Ok(Fleet {
            stdins,
            _children: children,
            rx,
            progress: vec![Progress::default(); n],
            ready: (0..n).map(|_| None).collect(),
            results: (0..n).map(|_| None).collect(),
            gone: vec![false; n],
            connections,
            started: now,
            next_print: now + Duration::from_secs(1),
            counters: None,
            last_delivered: (now, 0),
        })
    }

    async fn send(&mut self, msg: &ToWorker) -> anyhow::Result<()> {
        let mut line = serde_json::to_string(msg)?;
        line.push('\n');
        for (i, stdin) in self.stdins.iter_mut().enumerate() {
            if !self.gone[i] {
                stdin.write_all(line.as_bytes()).await.with_context(|| format!("worker {i}"))?;
            }
        }
        Ok(())
    }

    fn delivered(&self) -> u64 {
        self.progress.iter().map(|p| p.delivered).sum()
    }

    fn all_ready(&self) -> bool {
        self.ready.iter().all(Option::is_some)
    }

    fn all_results(&self) -> bool {
        self.results.iter().all(Option::is_some)
    }

    /// Handles worker messages until `until`, printing the progress line every second.
    async fn step(&mut self, until: Instant) -> anyhow::Result<()> {
        loop {
            let now = Instant::now();
            if now >= self.next_print {
                self.print_progress();
            }
            let wake = until.min(self.next_print);
            if now >= until {
                return Ok(());
            }
            match tokio::time::timeout_at(wake.into(), self.rx.recv()).await {
                Err(_) => {}
                // No worker at all (ingest without subscribers): just keep time.
                Ok(None) => tokio::time::sleep_until(wake.into()).await,
                Ok(Some((i, WorkerEvent::Gone))) => {
                    self.gone[i] = true;
                    if self.results[i].is_none() {
                        bail!("worker {i} ended unexpectedly (see its messages above)");
                    }
                }
                Ok(Some((i, WorkerEvent::Message(m)))) => {
                    match m {
                        FromWorker::Progress(p) => self.progress[i] = p,
                        FromWorker::Ready { ready, failed, slow, sub_counts, first_error } => {
                            self.ready[i] =
                                Some(Ready { ready, failed, slow, sub_counts, first_error })
                        }
                        FromWorker::Result(r) => self.results[i] = Some(*r),
                    }
                    // Return as soon as something a caller waits for may have happened.
                    return Ok(());
                }
            }
        }
    }

    fn print_progress(&mut self) {
        let now = Instant::now();
        self.next_print = now + Duration::from_secs(1);
        let ready: u64 = self.progress.iter().map(|p| p.ready).sum();
        let failed: u64 = self.progress.iter().map(|p| p.failed).sum();
        let closed: u64 = self.progress.iter().map(|p| p.closed).sum();
        let delivered = self.delivered();
        let (then, before) = self.last_delivered;
        let rate = (delivered - before.min(delivered)) as f64
            / now.duration_since(then).as_secs_f64().max(1e-3);
        self.last_delivered = (now, delivered);
        let mut line = format!(
            "[{:6.1}s] connections {ready}/{} (failed {failed}, closed {closed})",
            self.started.elapsed().as_secs_f64(),
            self.connections
        );
        if let Some(c) = &self.counters {
            line.push_str(&format!(
                "  published {}  503s {}",
                c.published.load(Ordering::Relaxed),
                c.status_503.load(Ordering::Relaxed)
            ));
        }
        line.push_str(&format!("  delivered {delivered} ({})", report::human_rate(rate)));
        eprintln!("{line}");
    }
}

async fn coordinate(scenario: Scenario, args: Args) -> anyhow::Result<Report> {
    let connections =
        args.connections.unwrap_or(if scenario == Scenario::Ingest { 0 } else { 1000 });
    let channels =
        args.channels.unwrap_or(if scenario == Scenario::Spread { 100 } else { 1 }).max(1);
    let per_client =
        args.per_client.unwrap_or(if scenario == Scenario::Spread { 3 } else { 1 }).max(1);
    if args.target == Target::Reference && matches!(scenario, Scenario::Spread) {
        bail!("the reference server has no channels: spread needs --target herald");
    }
    if args.target == Target::Reference && args.mode == Mode::Ws {
        bail!("the reference server reads no commands: --publish-mode ws needs --target herald");
    }
    if scenario == Scenario::Idle && connections == 0 {
        bail!("idle needs --connections > 0");
    }
    if args.target == Target::Reference && args.transport == Transport::Sse {
        bail!("the reference server has no SSE endpoint: --transport sse needs --target herald");
    }
    if !(0.0..1.0).contains(&args.slow_fraction) {
        bail!("--slow-fraction must be at least 0 and below 1");
    }
    if scenario == Scenario::Cluster && (args.nodes.is_empty() || args.target != Target::Herald) {
        bail!("cluster needs --nodes (the other nodes' WebSocket URLs) and --target herald");
    }
    if scenario != Scenario::Cluster && !args.nodes.is_empty() {
        bail!("--nodes is for the cluster scenario");
    }
    if scenario == Scenario::Cluster && args.http.is_some() {
        bail!("cluster publishes to every node's own HTTP API: leave --http out");
    }
    // Every node's WebSocket URL, --url first (one for the other scenarios).
    let urls: Vec<String> = std::iter::once(args.url.clone()).chain(args.nodes.clone()).collect();
    let hostile_cfg = hostile_config(&args)?;
    if hostile_cfg.any() && (scenario != Scenario::Fanout || args.target != Target::Herald) {
        bail!("hostile clients (--never-ws ...) are for fanout against --target herald");
    }
    if scenario == Scenario::Idle && args.slow_fraction > 0.0 {
        bail!("idle connections read nothing anyway: --slow-fraction is for the other scenarios");
    }
    let ws_port = url_port(&args.url).ok_or_else(|| anyhow!("--url: no port"))?;
    let http = args.http.clone().unwrap_or_else(|| http_base(&args.url));
    let server_pid = args.server_pid.or_else(|| sys::find_listener(ws_port));
    if scenario == Scenario::Idle && server_pid.is_none() {
        bail!("cannot find the process listening on port {ws_port}: pass --server-pid");
    }
    let workers = match args.workers {
        Some(w) => w.max(1).min(connections.max(1)),
        None => connections.div_ceil(15_000),
    };
    // A cluster: at least one worker per node (each worker connects to one node).
    let workers = if scenario == Scenario::Cluster {
        workers.max(urls.len()).min(connections.max(1))
    } else {
        workers
    };
    let workers = if connections == 0 { 0 } else { workers.max(1) };
    let source_ips = match &args.source_ips {
        Some(text) => parse_ips(text)?,
        None => {
            let n = connections.div_ceil(20_000).max(1) as u32;
            (1..=n).map(|i| IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, i as u8))).collect()
        }
    };
    let layout = match (args.target, scenario) {
        (Target::Reference, _) => Layout::One,
        (_, Scenario::Idle | Scenario::Ingest) => Layout::RoundRobin,
        (_, Scenario::Fanout | Scenario::Cluster) => Layout::One,
        (_, Scenario::Spread) => Layout::Zipf,
    };
    let template = Plan {
        worker: 0,
        first: 0,
        count: 0,
        url: args.url.clone(),
        target: args.target,
        transport: args.transport,
        format: args.format,
        slow_fraction: args.slow_fraction,
        source_ips,
        layout,
        channels,
        per_client,
        zipf: args.zipf,
        channel_prefix: args.channel_prefix.clone(),
        connect_concurrency: args.connect_concurrency,
    };
    let plans: Vec<Plan> = (0..workers)
        .map(|w| {
            let first = connections * w / workers;
            let next = connections * (w + 1) / workers;
            let url = urls[w % urls.len()].clone();
            Plan { worker: w, first, count: next - first, url, ..template.clone() }
        })
        .collect();

    let rss_before = server_pid.and_then(sys::rss_bytes);
    eprintln!(
        "herald-bench {}: target {} {} over {}, {connections} connections in {workers} worker(s), server pid {}",
        scenario.name(),
        args.target.name(),
        urls.join(","),
        args.transport.name(),
        server_pid.map_or("unknown".into(), |p| p.to_string())
    );
    let mut fleet = Fleet::spawn(plans, connections, args.worker_nice).await?;
    while !fleet.all_ready() {
        fleet.step(Instant::now() + Duration::from_secs(3600)).await?;
    }
    let mut sub_counts = vec![0u64; channels];
    let (mut ready, mut failed, mut slow, mut first_error) = (0, 0, 0, None);
    for r in fleet.ready.iter().flatten() {
        ready += r.ready;
        failed += r.failed;
        slow += r.slow;
        for (c, n) in r.sub_counts.iter().enumerate() {
            if c < channels {
                sub_counts[c] += n;
            }
        }
        if first_error.is_none() {
            first_error.clone_from(&r.first_error);
        }
    }
    eprintln!(
        "[{:6.1}s] {ready} connections ready{}, {failed} failed{}",
        fleet.started.elapsed().as_secs_f64(),
        if slow > 0 { format!(" ({slow} never reading)") } else { String::new() },
        first_error.as_ref().map_or(String::new(), |e| format!(" (first error: {e})"))
    );
    if connections > 0 && ready == 0 {
        bail!(
            "no subscriber connected ({failed} failed; first error: {})",
            first_error.as_deref().unwrap_or("none")
        );
    }
    if args.target == Target::Reference {
        sub_counts = vec![ready - slow];
    }

    let mut report = Report::new(scenario.name(), args.target.name(), &args.label);
    report.transport = args.transport.name().into();
    report.format = args.format.name().into();
    report.connections = connections as u64;
    report.connections_ready = ready;
    report.slow_fraction = args.slow_fraction;
    report.slow_connections = slow;
    report.connect_failures = failed;
    report.first_error = first_error;
    report.channels = channels as u64;
    report.per_client = per_client as u64;
    report.payload = args.payload as u64;
    report.workers = workers as u64;
    report.server_pid = server_pid;
    report.server_rss_before = rss_before;

    // The server's RSS every 100 ms and its disconnects (from /metrics) every 250 ms, from
    // here on; then the hostile clients, if any.
    let run_start = Instant::now();
    let rss = server_pid.map(|pid| sample_rss(pid, run_start));
    let disconnects = Arc::new(Mutex::new(Disconnects::default()));
    let metrics_task = (scenario != Scenario::Idle && args.target == Target::Herald).then(|| {
        tokio::spawn(sample_disconnects(
            http.clone(),
            args.api_key.clone(),
            run_start,
            Arc::clone(&disconnects),
        ))
    });
    if hostile_cfg.flood > 0 || args.fill_history {
        hostile::fill_history(&hostile_cfg).await?;
    }
    report.server_rss_ready = server_pid.and_then(sys::rss_bytes);
    let hostiles = if hostile_cfg.any() {
        let h = hostile::start(Arc::clone(&hostile_cfg), run_start).await;
        eprintln!("[{:6.1}s] hostile clients connected", fleet.started.elapsed().as_secs_f64());
        Some(h)
    } else {
        None
    };

    let counters = Arc::new(PubCounters::default());
    let mut measured_secs = args.duration;
    let mut measure_start = 0;
    if scenario == Scenario::Idle {
        let settle_end = Instant::now() + Duration::from_secs(2);
        while Instant::now() < settle_end {
            fleet.step(settle_end).await?;
        }
        report.server_rss_after = server_pid.and_then(sys::rss_bytes);
        let hold_end = Instant::now() + Duration::from_secs_f64(args.duration);
        while Instant::now() < hold_end {
            fleet.step(hold_end).await?;
        }
    } else {
        let publishers = args.publishers.unwrap_or(match (scenario, args.rate > 0.0) {
            (_, true) => 1,
            (Scenario::Ingest, false) => 4,
            (_, false) => 2,
        });
        let publishers = publishers.max(1);
        let now = Instant::now();
        measure_start = plan::unix_nanos() + (args.warmup * 1e9) as u64;
        fleet.send(&ToWorker::Measure { start_ns: measure_start }).await?;
        let end = now + Duration::from_secs_f64(args.warmup + args.duration);
        let chooser = match (args.target, scenario) {
            (Target::Reference, _) | (_, Scenario::Fanout | Scenario::Cluster) => Chooser::One,
            (_, Scenario::Spread) => Chooser::Zipf(plan::Zipf::new(channels, args.zipf)),
            _ => Chooser::RoundRobin(channels),
        };
        // One configuration per node; publisher w publishes on node w mod nodes.
        let cfgs: Vec<Arc<PubConfig>> = urls
            .iter()
            .map(|url| {
                Arc::new(PubConfig {
                    target: args.target,
                    http: if urls.len() == 1 { http.clone() } else { http_base(url) },
                    ws_url: url.clone(),
                    api_key: args.api_key.clone(),
                    prefix: args.channel_prefix.clone(),
                    payload: args.payload,
                    batch: if args.mode == Mode::HttpSingle { 1 } else { args.batch.max(1) },
                    rate: args.rate / publishers as f64,
                    chooser: chooser.clone(),
                    channels,
                    sub_counts: sub_counts.clone(),
                    measure_start,
                    end,
                })
            })
            .collect();
        fleet.counters = Some(Arc::clone(&counters));
        let mut tasks = Vec::new();
        for w in 0..publishers {
            let (cfg, counters) = (Arc::clone(&cfgs[w % cfgs.len()]), Arc::clone(&counters));
            tasks.push(if args.mode == Mode::Ws {
                tokio::spawn(publish::ws_publisher(w as u32, cfg, counters))
            } else {
                tokio::spawn(publish::http_publisher(w as u32, cfg, counters))
            });
        }
        while !tasks.iter().all(|t| t.is_finished()) {
            fleet.step(Instant::now() + Duration::from_millis(100)).await?;
        }
        // Measured publications are those stamped within the window of --duration seconds.
        measured_secs = args.duration.max(1e-3);
        // Drain: wait for in-flight publications, while deliveries still progress.
        let expected = counters.expected.load(Ordering::Relaxed);
        let drain_end = Instant::now() + Duration::from_secs_f64(args.drain);
        let mut last = (Instant::now(), fleet.delivered());
        while fleet.delivered() < expected && Instant::now() < drain_end && workers > 0 {
            fleet.step(Instant::now() + Duration::from_millis(50)).await?;
            let d = fleet.delivered();
            if d != last.1 {
                last = (Instant::now(), d);
            } else if last.0.elapsed() > DRAIN_STALL {
                break;
            }
        }
        report.server_rss_after = server_pid.and_then(sys::rss_bytes);
    }

    fleet.send(&ToWorker::Stop).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !fleet.all_results() {
        if Instant::now() > deadline {
            bail!("workers did not report their results within 30 s");
        }
        fleet.step(deadline).await?;
    }
    let results: Vec<WorkerResult> = fleet.results.iter_mut().filter_map(Option::take).collect();
    report.fill(&args_summary(&args), &counters, &results, measured_secs, measure_start)?;
    if let Some(e) = counters.first_error.lock().ok().and_then(|e| e.clone()) {
        report.publish_first_error = Some(e);
    }
    if let Some(h) = hostiles {
        report.hostile = h.finish().await;
    }
    drop(fleet);
    if let Some(task) = metrics_task {
        // One more reading, after the never-readers were read to their end.
        tokio::time::sleep(Duration::from_millis(300)).await;
        task.abort();
        if let Ok(d) = disconnects.lock() {
            report.server_disconnects = d.by_code.clone();
            report.cuts_4008_timeline = d.timeline.clone();
        }
    }
    if args.settle > 0.0 {
        // Every connection of the run is closed: the idle node's memory, once a second.
        let settle_start = Instant::now();
        while settle_start.elapsed().as_secs_f64() < args.settle {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if let Some(b) = server_pid.and_then(sys::rss_bytes) {
                let secs = (settle_start.elapsed().as_secs_f64() * 10.0).round() / 10.0;
                report.server_rss_settle.push((secs, b));
                report.server_rss_idle = Some(b);
            }
        }
    }
    if let Some((samples, task)) = rss {
        task.abort();
        if let Ok(s) = samples.lock() {
            report.server_rss_peak = Some(s.peak);
            report.server_rss_timeline = s.timeline.clone();
        }
    }
    Ok(report)
}

/// The hostile clients asked for by `args`.
fn hostile_config(args: &Args) -> anyhow::Result<Arc<hostile::HostileConfig>> {
    let http = args.http.clone().unwrap_or_else(|| http_base(&args.url));
    Ok(Arc::new(hostile::HostileConfig {
        url: conn::WsUrl::parse(&args.url)?,
        http,
        api_key: args.api_key.clone(),
        hot: format!("{}0", args.channel_prefix),
        prefix: args.channel_prefix.clone(),
        never_ws: args.never_ws,
        never_sse: args.never_sse,
        bursty: args.bursty,
        burst_read: Duration::from_millis(args.burst_read_ms),
        burst_pause: Duration::from_millis(args.burst_pause_ms),
        many_sse: args.many_sse,
        many_channels: args.many_channels,
        many_name_len: args.many_name_len,
        flood: args.history_flood,
        flood_channel: args.flood_channel.clone(),
        flood_fill: args.flood_fill,
        flood_size: args.flood_size,
        flood_requests: args.flood_requests,
    }))
}

/// The server's RSS read every 100 ms: the peak, and a reading about once a second.
#[derive(Debug, Default)]
struct RssSamples {
    peak: u64,
    /// (seconds from the start of the run, bytes).
    timeline: Vec<(f64, u64)>,
}

fn sample_rss(pid: u32, start: Instant) -> (Arc<Mutex<RssSamples>>, tokio::task::JoinHandle<()>) {
    let samples = Arc::new(Mutex::new(RssSamples::default()));
    let out = Arc::clone(&samples);
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut next_kept = 0.0;
        loop {
            tick.tick().await;
            let Some(b) = sys::rss_bytes(pid) else { return };
            let secs = start.elapsed().as_secs_f64();
            if let Ok(mut s) = out.lock() {
                s.peak = s.peak.max(b);
                if secs >= next_kept {
                    s.timeline.push(((secs * 10.0).round() / 10.0, b));
                    next_kept = secs.floor() + 1.0;
                }
            }
        }
    });
    (samples, task)
}

/// The server's disconnects as `/metrics` counts them.
#[derive(Debug, Default)]
struct Disconnects {
    /// `herald_disconnects_total` by close code, at the last reading.
    by_code: BTreeMap<String, u64>,
    /// (seconds from the start of the run, count of 4008) at each change.
    timeline: Vec<(f64, u64)>,
}

/// Reads `/metrics` every 250 ms until aborted.
async fn sample_disconnects(
    http: String,
    api_key: Option<String>,
    start: Instant,
    out: Arc<Mutex<Disconnects>>,
) {
    let Ok(mut api) = herald_client::HttpApi::connect(&http, api_key).await else { return };
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tick.tick().await;
        let Ok((200, _, body)) = api.request("GET", "/metrics", None).await else { continue };
        let by_code = parse_disconnects(&String::from_utf8_lossy(&body));
        let cut = by_code.get("4008").copied().unwrap_or(0);
        if let Ok(mut d) = out.lock() {
            if d.timeline.last().map_or(cut > 0, |&(_, n)| n != cut) {
                let secs = (start.elapsed().as_secs_f64() * 10.0).round() / 10.0;
                d.timeline.push((secs, cut));
            }
            d.by_code = by_code;
        }
    }
}

/// `herald_disconnects_total{code="C"} N` lines of a metrics page.
fn parse_disconnects(text: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("herald_disconnects_total{code=\"") else { continue };
        let Some((code, rest)) = rest.split_once("\"}") else { continue };
        if let Ok(n) = rest.trim().parse::<u64>() {
            out.insert(code.to_owned(), n);
        }
    }
    out
}

/// The offered rate and duration, as the report states them.
fn args_summary(args: &Args) -> report::Offered {
    report::Offered { rate: args.rate, duration: args.duration, warmup: args.warmup }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_disconnects_from_metrics() {
        let page = "# HELP herald_disconnects_total x\n# TYPE herald_disconnects_total counter\nherald_disconnects_total{code=\"4000\"} 0\nherald_disconnects_total{code=\"4008\"} 12\nherald_other{code=\"4008\"} 3\n";
        let d = parse_disconnects(page);
        assert_eq!(d.get("4008"), Some(&12));
        assert_eq!(d.get("4000"), Some(&0));
        assert_eq!(d.len(), 2);
    }
}
