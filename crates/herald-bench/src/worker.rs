//! The worker process: holds a share of the subscriber connections on one thread, counts and
//! times every publication they receive, and talks to the main process in JSON lines (plan and
//! commands on stdin, progress and results on stdout).
//!
//! ```text
//! main -> worker   {"plan":{...}}            first line
//! worker -> main   {"progress":{...}}        every 250 ms
//! worker -> main   {"ready":{...}}           once every connection is subscribed (or failed)
//! main -> worker   {"measure":{"start_ns":T}} publications sent at or after T are timed
//! main -> worker   "stop"
//! worker -> main   {"result":{...}}          then the worker exits
//! ```
//!
//! Subscribers speak WebSocket (`herald.json`) or Server-Sent Events, by the plan's transport.
//! With a slow fraction, some connections subscribe and then never read their socket again
//! (with a small receive buffer): they are held apart, out of every delivery figure, and read
//! only at "stop", to tell which ones the server closed meanwhile.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io::Write as _;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use base64::Engine as _;
use hdrhistogram::serialization::{Serializer as _, V2Serializer};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::{watch, Semaphore};

use crate::conn::{self, FrameReader, Scanner, SseEvent, SseReader, Stamp, WsUrl};
use crate::plan::{self, Plan, Target, Transport, Zipf};

/// Receive buffer of the never-reading connections (the kernel doubles it), so that the server
/// holds what they do not take instead of the bench's kernel.
const SLOW_RECV_BUFFER: u32 = 4096;
/// At "stop", a never-reading connection is read until nothing comes for this long...
const SLOW_QUIET: Duration = Duration::from_millis(300);
/// ...or for this long at most.
const SLOW_DRAIN: Duration = Duration::from_secs(5);

/// Lowest and highest latency recorded, in microseconds.
pub(crate) const HIST_LOW: u64 = 1;
pub(crate) const HIST_HIGH: u64 = 60_000_000;

/// A new latency histogram (1 us .. 60 s, 3 significant digits).
pub(crate) fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(HIST_LOW, HIST_HIGH, 3).unwrap_or_else(|_| {
        // Bounds are constants known to be valid.
        Histogram::new(3).unwrap_or_else(|_| unreachable!("3 significant digits is valid"))
    })
}

/// What the main process sends a worker.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum ToWorker {
    Plan(Box<Plan>),
    Measure { start_ns: u64 },
    Stop,
}

/// Counters shown in the progress line.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Progress {
    pub(crate) ready: u64,
    pub(crate) failed: u64,
    pub(crate) delivered: u64,
    pub(crate) closed: u64,
}

/// A worker's final counts.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct WorkerResult {
    /// Connections subscribed, never-reading ones included.
    pub(crate) ready: u64,
    pub(crate) failed: u64,
    /// Never-reading connections subscribed.
    pub(crate) slow: u64,
    /// Never-reading connections the server had closed by the end, by close code (or `eof`,
    /// `error: ...`).
    pub(crate) slow_disconnects: BTreeMap<String, u64>,
    pub(crate) delivered: u64,
    pub(crate) measured: u64,
    pub(crate) gaps: u64,
    pub(crate) missing: u64,
    pub(crate) duplicates: u64,
    pub(crate) unsubs: u64,
    pub(crate) unparsed: u64,
    /// When the last timed publication arrived (unix nanos; 0: none).
    pub(crate) last_measured_ns: u64,
    pub(crate) disconnects: BTreeMap<String, u64>,
    /// The latency histogram, HdrHistogram V2 serialization, base64.
    pub(crate) histogram: String,
}

/// What a worker sends the main process.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum FromWorker {
    Progress(Progress),
    Ready {
        ready: u64,
        failed: u64,
        /// Of `ready`, the never-reading connections (not in `sub_counts`).
        slow: u64,
        /// Successful subscriptions per channel index.
        sub_counts: Vec<u64>,
        first_error: Option<String>,
    },
    Result(Box<WorkerResult>),
}

/// The worker's counters, shared by its connection tasks (one thread).
struct Stats {
    hist: Histogram<u64>,
    progress: Progress,
    measured: u64,
    gaps: u64,
    missing: u64,
    duplicates: u64,
    unsubs: u64,
    unparsed: u64,
    disconnects: BTreeMap<String, u64>,
    sub_counts: Vec<u64>,
    first_error: Option<String>,
    measure_start: u64,
    last_measured_ns: u64,
    slow: u64,
    slow_done: u64,
    slow_disconnects: BTreeMap<String, u64>,
}

struct Ctx {
    plan: Plan,
    url: WsUrl,
    zipf: Option<Zipf>,
    scanner: Scanner,
    stats: RefCell<Stats>,
    /// Set at "stop": the never-reading connections are read.
    drain: watch::Sender<bool>,
}

/// A connection's parser of incoming bytes.
enum Reader {
    Ws(FrameReader),
    Sse(SseReader),
}

/// One connection's view: the last sequence per (channel, publisher) stream, and what the
/// messages read so far ask of it.
#[derive(Default)]
struct ConnState {
    streams: Vec<(u32, u32, u64)>,
    replies_ok: usize,
    reply_error: Option<u64>,
    pongs: usize,
    /// `herald.proto` pings to answer.
    proto_pongs: usize,
    ws_pongs: Vec<Vec<u8>>,
    close: Option<String>,
    disconnect: Option<u64>,
    /// SSE: the id-only event that follows the stream's initial events has been read.
    stream_ready: bool,
}

thread_local! {
    static READ_BUF: RefCell<Vec<u8>> = RefCell::new(vec![0u8; 128 * 1024]);
}

fn send(msg: &FromWorker) {
    let mut out = std::io::stdout().lock();
    if let Ok(line) = serde_json::to_string(msg) {
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}

/// The `worker` subcommand.
pub(crate) fn run() -> anyhow::Result<()> {
    crate::sys::raise_fd_limit();
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).context("reading the plan")?;
    let ToWorker::Plan(plan) = serde_json::from_str(&line).context("parsing the plan")? else {
        anyhow::bail!("the first line must be the plan");
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, serve(*plan))
}

async fn serve(plan: Plan) -> anyhow::Result<()> {
    let url = WsUrl::parse(&plan.url)?;
    let zipf = (plan.layout == plan::Layout::Zipf).then(|| Zipf::new(plan.channels, plan.zipf));
    let stats = Stats {
        hist: new_histogram(),
        progress: Progress::default(),
        measured: 0,
        gaps: 0,
        missing: 0,
        duplicates: 0,
        unsubs: 0,
        unparsed: 0,
        disconnects: BTreeMap::new(),
        sub_counts: vec![0; plan.channels.max(1)],
        first_error: None,
        measure_start: u64::MAX,
        last_measured_ns: 0,
        slow: 0,
        slow_done: 0,
        slow_disconnects: BTreeMap::new(),
    };
    let ctx = Rc::new(Ctx {
        plan,
        url,
        zipf,
        scanner: Scanner::new(),
        stats: RefCell::new(stats),
        drain: watch::Sender::new(false),
    });
    let gate = Rc::new(Semaphore::new(ctx.plan.connect_concurrency.max(1)));
    for i in 0..ctx.plan.count {
        tokio::task::spawn_local(connection(Rc::clone(&ctx), ctx.plan.first + i, Rc::clone(&gate)));
    }

    // Progress, and the ready report once every connection is settled.
    let ticker_ctx = Rc::clone(&ctx);
    tokio::task::spawn_local(async move {
        let mut reported_ready = false;
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tick.tick().await;
            let stats = ticker_ctx.stats.borrow();
            send(&FromWorker::Progress(stats.progress.clone()));
            let settled = stats.progress.ready + stats.progress.failed;
            if !reported_ready && settled >= ticker_ctx.plan.count as u64 {
                reported_ready = true;
                send(&FromWorker::Ready {
                    ready: stats.progress.ready,
                    failed: stats.progress.failed,
                    slow: stats.slow,
                    sub_counts: stats.sub_counts.clone(),
                    first_error: stats.first_error.clone(),
                });
            }
        }
    });

    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        match serde_json::from_str::<ToWorker>(&line) {
            Ok(ToWorker::Measure { start_ns }) => ctx.stats.borrow_mut().measure_start = start_ns,
            Ok(ToWorker::Stop) => {
                // The never-reading connections are read now: which did the server close?
                ctx.drain.send_replace(true);
                let deadline = Instant::now() + SLOW_DRAIN + Duration::from_secs(1);
                loop {
                    let (done, slow) = {
                        let stats = ctx.stats.borrow();
                        (stats.slow_done, stats.slow)
                    };
                    if done >= slow || Instant::now() >= deadline {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let result = finish(&ctx);
                send(&FromWorker::Result(Box::new(result)));
                std::process::exit(0);
            }
            Ok(ToWorker::Plan(_)) | Err(_) => {
                eprintln!("worker {}: ignoring {line:?}", ctx.plan.worker)
            }
        }
    }
    // The main process went away.
    std::process::exit(1);
}

fn finish(ctx: &Ctx) -> WorkerResult {
    let stats = ctx.stats.borrow();
    let mut bytes = Vec::new();
    let histogram = match V2Serializer::new().serialize(&stats.hist, &mut bytes) {
        Ok(_) => base64::engine::general_purpose::STANDARD.encode(&bytes),
        Err(e) => {
            eprintln!("worker {}: cannot serialize the histogram: {e:?}", ctx.plan.worker);
            String::new()
        }
    };
    WorkerResult {
        ready: stats.progress.ready,
        failed: stats.progress.failed,
        slow: stats.slow,
        slow_disconnects: stats.slow_disconnects.clone(),
        delivered: stats.progress.delivered,
        measured: stats.measured,
        gaps: stats.gaps,
        missing: stats.missing,
        duplicates: stats.duplicates,
        unsubs: stats.unsubs,
        unparsed: stats.unparsed,
        last_measured_ns: stats.last_measured_ns,
        disconnects: stats.disconnects.clone(),
        histogram,
    }
}

async fn connection(ctx: Rc<Ctx>, index: usize, gate: Rc<Semaphore>) {
    let subs = plan::subscriptions(&ctx.plan, ctx.zipf.as_ref(), index);
    let ips = &ctx.plan.source_ips;
    let ip = (!ips.is_empty()).then(|| ips[index % ips.len()]);
    let slow = plan::is_slow(&ctx.plan, index);
    let permit = gate.acquire().await;
    let proto = ctx.plan.transport == Transport::Ws && ctx.plan.format.is_proto(index);
    let setup =
        tokio::time::timeout(Duration::from_secs(60), setup(&ctx, ip, &subs, slow, proto)).await;
    drop(permit);
    let (mut stream, mut reader, mut state) = match setup {
        Ok(Ok(ok)) => ok,
        Ok(Err(e)) => return failed(&ctx, format!("connection {index}: {e:#}")),
        Err(_) => return failed(&ctx, format!("connection {index}: setup timed out after 60 s")),
    };
    if slow {
        {
            let mut stats = ctx.stats.borrow_mut();
            stats.progress.ready += 1;
            stats.slow += 1;
        }
        return hold_slow(&ctx, &mut stream, &mut reader, &mut state).await;
    }
    {
        let mut stats = ctx.stats.borrow_mut();
        stats.progress.ready += 1;
        for &c in &subs {
            stats.sub_counts[c as usize] += 1;
        }
    }
    let why = loop {
        match pump(&ctx, &mut stream, &mut reader, &mut state).await {
            Ok(true) => {}
            Ok(false) => break state.close.take().unwrap_or_else(|| "eof".to_owned()),
            Err(e) => break state.close.take().unwrap_or_else(|| format!("error: {e}")),
        }
    };
    let why = match (why.as_str(), state.disconnect) {
        ("eof", Some(code)) => code.to_string(),
        _ => why,
    };
    let mut stats = ctx.stats.borrow_mut();
    stats.progress.closed += 1;
    *stats.disconnects.entry(why).or_default() += 1;
}

fn failed(ctx: &Ctx, why: String) {
    let mut stats = ctx.stats.borrow_mut();
    stats.progress.failed += 1;
    if stats.first_error.is_none() {
        stats.first_error = Some(why);
    }
}

async fn setup(
    ctx: &Ctx,
    ip: Option<std::net::IpAddr>,
    subs: &[u32],
    slow: bool,
    proto: bool,
) -> anyhow::Result<(TcpStream, Reader, ConnState)> {
    let recv_buffer = slow.then_some(SLOW_RECV_BUFFER);
    let prefix = &ctx.plan.channel_prefix;
    let (mut stream, early, mut reader) = match ctx.plan.transport {
        Transport::Ws => {
            let subprotocol = if proto { "herald.proto" } else { "herald.json" };
            let (stream, early) = conn::open_as(&ctx.url, ip, recv_buffer, subprotocol).await?;
            (stream, early, Reader::Ws(FrameReader::default()))
        }
        Transport::Sse => {
            let names = subs.iter().map(|c| format!("{prefix}{c}"));
            let (stream, early) = conn::open_sse(&ctx.url, ip, recv_buffer, names).await?;
            (stream, early, Reader::Sse(SseReader::default()))
        }
    };
    let mut state = ConnState::default();
    if ctx.plan.transport == Transport::Ws && ctx.plan.target == Target::Herald && !subs.is_empty()
    {
        if proto {
            let mut cmds = Vec::new();
            for (i, c) in subs.iter().enumerate() {
                let channel = herald_protocol::ChannelName::parse(&format!("{prefix}{c}"))
                    .map_err(|e| anyhow::anyhow!("channel name: {e}"))?;
                let kind = herald_protocol::CommandKind::Subscribe { channel, since: None };
                let cmd = herald_protocol::Command { id: Some(i as u32 + 1), kind };
                cmds.extend(herald_protocol::proto::encode_command(&cmd));
            }
            stream.write_all(&conn::binary_frame(&cmds)).await?;
        } else {
            let mut cmds = String::new();
            for (i, c) in subs.iter().enumerate() {
                if i > 0 {
                    cmds.push('\n');
                }
                cmds.push_str(&format!(
                    "{{\"op\":\"subscribe\",\"id\":{},\"channel\":\"{prefix}{c}\"}}",
                    i + 1
                ));
            }
            stream.write_all(&conn::text_frame(cmds.as_bytes())).await?;
        }
    }
    if !early.is_empty() {
        let mut stats = ctx.stats.borrow_mut();
        feed(ctx, &mut stats, &mut reader, &mut state, plan::unix_nanos(), &early)?;
    }
    match (ctx.plan.transport, ctx.plan.target) {
        (Transport::Ws, Target::Herald) => {
            while state.replies_ok < subs.len() {
                if let Some(code) = state.reply_error {
                    anyhow::bail!("subscribe refused with {code}");
                }
                if !pump(ctx, &mut stream, &mut reader, &mut state).await? {
                    anyhow::bail!(
                        "closed while subscribing ({})",
                        state.close.as_deref().unwrap_or("eof")
                    );
                }
            }
        }
        // Subscribed once the initial events are through: the id-only event ends them.
        (Transport::Sse, _) => {
            while !state.stream_ready {
                if !pump(ctx, &mut stream, &mut reader, &mut state).await? {
                    anyhow::bail!(
                        "stream closed before its first id ({})",
                        state.disconnect.map_or_else(|| "eof".to_owned(), |c| c.to_string())
                    );
                }
            }
        }
        (Transport::Ws, Target::Reference) => {}
    }
    Ok((stream, reader, state))
}

/// Holds a never-reading connection until "stop", then reads what it has and records whether
/// the server closed it.
async fn hold_slow(ctx: &Ctx, stream: &mut TcpStream, reader: &mut Reader, state: &mut ConnState) {
    let mut drain = ctx.drain.subscribe();
    let _ = drain.wait_for(|&d| d).await;
    let end = drain_slow(ctx, stream, reader, state).await;
    // A close frame or a disconnect push says why; else how the socket ended, if it did.
    let why = state.close.take().or_else(|| state.disconnect.map(|c| c.to_string())).or(end);
    let mut stats = ctx.stats.borrow_mut();
    stats.slow_done += 1;
    if let Some(why) = why {
        *stats.slow_disconnects.entry(why).or_default() += 1;
    }
}

/// Reads a never-reading connection until it ends (`Some("eof")`, `Some("error: ...")`) or
/// stays quiet for [`SLOW_QUIET`] (`None`: still open), noting a close frame or a `disconnect`
/// push or event in `state`; publications are not counted.
async fn drain_slow(
    ctx: &Ctx,
    stream: &mut TcpStream,
    reader: &mut Reader,
    state: &mut ConnState,
) -> Option<String> {
    let deadline = tokio::time::Instant::now() + SLOW_DRAIN;
    loop {
        let quiet = (tokio::time::Instant::now() + SLOW_QUIET).min(deadline);
        match tokio::time::timeout_at(quiet, stream.readable()).await {
            Err(_) => return None,
            Ok(Err(e)) => return Some(format!("error: {e}")),
            Ok(Ok(())) => {}
        }
        let end = READ_BUF.with(|buf| -> Option<String> {
            let mut buf = buf.borrow_mut();
            loop {
                match stream.try_read(&mut buf) {
                    Ok(0) => return Some("eof".to_owned()),
                    Ok(n) => {
                        let fed = match reader {
                            Reader::Ws(r) => r.feed(&buf[..n], &mut |op, p| match op {
                                1 => {
                                    for line in p.split(|&b| b == b'\n') {
                                        if line.starts_with(b"{\"disconnect\"") {
                                            state.disconnect = ctx.scanner.code(line);
                                        }
                                    }
                                }
                                2 => {
                                    for m in proto_messages(p) {
                                        use herald_protocol::pb::server_message::Kind;
                                        if let Some(Kind::Disconnect(d)) = m.kind {
                                            state.disconnect = Some(u64::from(d.code));
                                        }
                                    }
                                }
                                8 => {
                                    let code =
                                        (p.len() >= 2).then(|| u16::from_be_bytes([p[0], p[1]]));
                                    state.close = Some(
                                        code.map_or_else(|| "close".to_owned(), |c| c.to_string()),
                                    );
                                }
                                _ => {}
                            }),
                            Reader::Sse(r) => r.feed(&buf[..n], &mut |e| {
                                if e.event == b"disconnect" {
                                    state.disconnect = ctx.scanner.code(e.data);
                                }
                            }),
                        };
                        if let Err(e) = fed {
                            return Some(format!("error: {e}"));
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return None,
                    Err(e) => return Some(format!("error: {e}")),
                }
            }
        });
        if end.is_some() {
            return end;
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
    }
}

/// Hands bytes read from the socket to the connection's parser.
fn feed(
    ctx: &Ctx,
    stats: &mut Stats,
    reader: &mut Reader,
    state: &mut ConnState,
    now: u64,
    bytes: &[u8],
) -> anyhow::Result<()> {
    match reader {
        Reader::Ws(r) => r.feed(bytes, &mut |op, p| on_message(ctx, stats, state, now, op, p)),
        Reader::Sse(r) => r.feed(bytes, &mut |e| on_event(ctx, stats, state, now, e)),
    }
}

/// Waits for the socket, reads what it has, handles every message; `Ok(false)` at the end of
/// the connection.
async fn pump(
    ctx: &Ctx,
    stream: &mut TcpStream,
    reader: &mut Reader,
    state: &mut ConnState,
) -> anyhow::Result<bool> {
    stream.readable().await?;
    let open = READ_BUF.with(|buf| -> anyhow::Result<bool> {
        let mut buf = buf.borrow_mut();
        for _ in 0..4 {
            match stream.try_read(&mut buf) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    let now = plan::unix_nanos();
                    let mut stats = ctx.stats.borrow_mut();
                    feed(ctx, &mut stats, reader, state, now, &buf[..n])?;
                    if n < buf.len() {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(state.close.is_none())
    })?;
    if state.pongs > 0 || state.proto_pongs > 0 || !state.ws_pongs.is_empty() {
        let mut out = Vec::new();
        for _ in 0..std::mem::take(&mut state.pongs) {
            out.extend_from_slice(&conn::text_frame(b"{\"op\":\"pong\"}"));
        }
        for _ in 0..std::mem::take(&mut state.proto_pongs) {
            out.extend_from_slice(&conn::binary_frame(conn::PROTO_PONG));
        }
        for p in std::mem::take(&mut state.ws_pongs) {
            out.extend_from_slice(&herald_protocol::ws::encode_frame(
                herald_protocol::ws::Role::Client,
                herald_protocol::ws::Opcode::Pong,
                &p,
            ));
        }
        stream.write_all(&out).await?;
    }
    Ok(open)
}

fn on_message(
    ctx: &Ctx,
    stats: &mut Stats,
    state: &mut ConnState,
    now: u64,
    op: u8,
    payload: &[u8],
) {
    match op {
        1 => {
            for line in payload.split(|&b| b == b'\n') {
                on_line(ctx, stats, state, now, line);
            }
        }
        2 => on_proto(ctx, stats, state, now, payload),
        8 => {
            let code = (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
            state.close = Some(code.map_or_else(|| "close".to_owned(), |c| c.to_string()));
        }
        9 => state.ws_pongs.push(payload.iter().take(125).copied().collect()),
        _ => {}
    }
}

/// The `herald.proto` messages of one binary message, decoded with the generated code as a
/// protobuf client would (a message that fails to decode ends the list).
fn proto_messages(payload: &[u8]) -> impl Iterator<Item = herald_protocol::pb::ServerMessage> + '_ {
    use prost::Message as _;
    herald_protocol::proto::delimited(payload)
        .map_while(|m| herald_protocol::pb::ServerMessage::decode(m.ok()?).ok())
}

/// The `data` of a `ServerMessage { pub }`, found by walking the wire format in place (no
/// allocation, as the JSON path scans lines in place); `None` for any other message.
fn pub_data(message: &[u8]) -> Option<&[u8]> {
    /// The next length-delimited field of `buf`: (field number, bytes); other wire types are
    /// skipped.
    fn next_field<'a>(buf: &mut &'a [u8]) -> Option<(u64, Option<&'a [u8]>)> {
        let key = prost::encoding::decode_varint(buf).ok()?;
        match key & 7 {
            0 => {
                prost::encoding::decode_varint(buf).ok()?;
                Some((key >> 3, None))
            }
            2 => {
                let len = prost::encoding::decode_varint(buf).ok()? as usize;
                if len > buf.len() {
                    return None;
                }
                let (field, rest) = buf.split_at(len);
                *buf = rest;
                Some((key >> 3, Some(field)))
            }
            _ => None,
        }
    }
    let mut outer = message;
    let (2, Some(mut inner)) = next_field(&mut outer)? else { return None };
    while !inner.is_empty() {
        if let (4, Some(data)) = next_field(&mut inner)? {
            return Some(data);
        }
    }
    Some(&[])
}

/// One binary message of a `herald.proto` connection: its pushes and replies.
fn on_proto(ctx: &Ctx, stats: &mut Stats, state: &mut ConnState, now: u64, payload: &[u8]) {
    use herald_protocol::pb::{reply, server_message::Kind};
    // Publications, the bulk, walked in place; anything else decoded with the generated code.
    let mut others = Vec::new();
    for message in herald_protocol::proto::delimited(payload) {
        let Ok(message) = message else {
            stats.unparsed += 1;
            break;
        };
        match pub_data(message) {
            Some(data) => match ctx.scanner.stamp(data) {
                Some(stamp) => record(stats, state, now, stamp),
                None => stats.unparsed += 1,
            },
            None => others.push(message),
        }
    }
    for m in others.into_iter().filter_map(|m| {
        use prost::Message as _;
        herald_protocol::pb::ServerMessage::decode(m).ok()
    }) {
        match m.kind {
            Some(Kind::Pub(p)) => match ctx.scanner.stamp(&p.data) {
                Some(stamp) => record(stats, state, now, stamp),
                None => stats.unparsed += 1,
            },
            Some(Kind::Ping(_)) => state.proto_pongs += 1,
            Some(Kind::Reply(r)) => match r.result {
                Some(reply::Result::Error(e)) => state.reply_error = Some(u64::from(e.code)),
                _ => state.replies_ok += 1,
            },
            Some(Kind::Disconnect(d)) => state.disconnect = Some(u64::from(d.code)),
            Some(Kind::Unsub(_)) => stats.unsubs += 1,
            None => stats.unparsed += 1,
        }
    }
}

/// One event of an SSE stream: `pub`, the id-only event that ends the initial events,
/// `disconnect` (the server closes next), `reset` (not expected: no stream resumes).
fn on_event(ctx: &Ctx, stats: &mut Stats, state: &mut ConnState, now: u64, e: SseEvent<'_>) {
    match e.event {
        b"pub" => match ctx.scanner.stamp(e.data) {
            Some(stamp) => record(stats, state, now, stamp),
            None => stats.unparsed += 1,
        },
        b"" if e.id && e.data.is_empty() => state.stream_ready = true,
        b"disconnect" => state.disconnect = ctx.scanner.code(e.data),
        b"reset" => {}
        _ => stats.unparsed += 1,
    }
}

fn on_line(ctx: &Ctx, stats: &mut Stats, state: &mut ConnState, now: u64, line: &[u8]) {
    if line.starts_with(b"{\"pub\"") {
        match ctx.scanner.stamp(line) {
            Some(stamp) => record(stats, state, now, stamp),
            None => stats.unparsed += 1,
        }
    } else if line.starts_with(b"{\"ping\"") {
        state.pongs += 1;
    } else if line.starts_with(b"{\"id\"") {
        if memchr::memmem::find(line, b"\"error\"").is_some() {
            state.reply_error = Some(ctx.scanner.code(line).unwrap_or(0));
        } else {
            state.replies_ok += 1;
        }
    } else if line.starts_with(b"{\"disconnect\"") {
        state.disconnect = ctx.scanner.code(line);
    } else if line.starts_with(b"{\"unsub\"") {
        stats.unsubs += 1;
    } else if !line.is_empty() {
        stats.unparsed += 1;
    }
}

fn record(stats: &mut Stats, state: &mut ConnState, now: u64, stamp: Stamp) {
    let entry = match state.streams.iter().position(|e| e.0 == stamp.c && e.1 == stamp.w) {
        Some(i) => &mut state.streams[i],
        None => {
            state.streams.push((stamp.c, stamp.w, 0));
            let last = state.streams.len() - 1;
            &mut state.streams[last]
        }
    };
    let last = entry.2;
    if stamp.s <= last {
        stats.duplicates += 1;
        return;
    }
    if stamp.s > last + 1 {
        stats.gaps += 1;
        stats.missing += stamp.s - last - 1;
    }
    entry.2 = stamp.s;
    stats.progress.delivered += 1;
    if stamp.t >= stats.measure_start {
        stats.measured += 1;
        stats.last_measured_ns = now;
        let us = (now.saturating_sub(stamp.t) / 1000).clamp(HIST_LOW, HIST_HIGH);
        stats.hist.saturating_record(us);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod proto_tests {
    use herald_protocol::format::WireFormat;

    #[test]
    fn pub_data_is_found_in_place() {
        let codec = WireFormat::Proto.codec();
        for (offset, epoch, data) in [
            (Some(3), Some("e"), &b"{\"t\":1}"[..]),
            (None, None, &b"\x00\x01"[..]),
            (Some(0), None, &b""[..]),
        ] {
            let framed = codec.encode_pub("bench:0", offset, epoch, data);
            let mut rest = &framed[..];
            let len = prost::encoding::decode_varint(&mut rest).unwrap() as usize;
            assert_eq!(len, rest.len());
            assert_eq!(super::pub_data(rest), Some(data));
        }
        let ping = codec.encode_ping();
        assert_eq!(super::pub_data(&ping[1..]), None);
        let reply = codec.encode_reply_error(1, herald_protocol::ErrorCode::BadRequest, "x");
        assert_eq!(super::pub_data(&reply[1..]), None);
    }
}
