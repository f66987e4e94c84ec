//! Hostile clients, run by the main process beside the measured subscribers of `fanout`: the
//! misbehaviours of issue 9, each a few real sockets, so that a run shows what they cost the
//! good clients (deliveries/s, latency, loss) and the node (memory), and whether the node cut
//! them (4008) and when.
//!
//! | kind | flag | what it does |
//! |---|---|---|
//! | `never_ws` | `--never-ws N` | WebSocket, subscribes the hot channel, never reads (4 KiB receive buffer) |
//! | `never_sse` | `--never-sse N` | SSE stream of the hot channel, never read (4 KiB receive buffer) |
//! | `bursty` | `--bursty N` | WebSocket on the hot channel, reads for `--burst-read-ms`, pauses for `--burst-pause-ms`, again |
//! | `many_sse` | `--many-sse N` | one SSE stream of `--many-channels` channels (the hot one and long names of `--many-name-len` bytes), never read |
//! | `history_flood` | `--history-flood N` | WebSocket, sends `--flood-requests` `{"op":"history"}` without `limit` on `--flood-channel` (filled first with `--flood-fill` publications of `--flood-size` bytes), never reads |
//!
//! Never-reading sockets cannot see their end without reading: they poll the socket's pending
//! error every 100 ms (a reset shows there), and at the end of the run read what they hold to
//! find a `disconnect` push, a close frame or the end of the stream. When the server cut them,
//! the main process also sees it in `herald_disconnects_total{code="4008"}` of `/metrics`,
//! sampled every 250 ms (`cuts_4008_timeline` in the report).
//!
//! ```text
//! herald --set namespaces.bench.client_publish=true --set namespaces.hist.history_size=1000 &
//! herald-bench fanout --connections 1000 --rate 200 --payload 1000 --duration 20 \
//!     --never-ws 5 --never-sse 5 --bursty 5 --many-sse 2 --history-flood 4
//! ```

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use serde::Serialize;
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::conn::{self, FrameReader, Scanner, SseReader, WsUrl};

/// Receive buffer of never-reading sockets (the kernel doubles it).
const TINY_RECV_BUFFER: u32 = 4096;
/// How often a never-reading socket checks for a pending error (a reset).
const ERROR_POLL: Duration = Duration::from_millis(100);
/// At the end, a never-reading socket is read until nothing comes for this long...
const DRAIN_QUIET: Duration = Duration::from_millis(300);
/// ...or for this long at most.
const DRAIN_MAX: Duration = Duration::from_secs(5);

/// The kinds of hostile clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Kind {
    NeverWs,
    NeverSse,
    Bursty,
    ManySse,
    HistoryFlood,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::NeverWs => "never_ws",
            Kind::NeverSse => "never_sse",
            Kind::Bursty => "bursty",
            Kind::ManySse => "many_sse",
            Kind::HistoryFlood => "history_flood",
        }
    }
}

/// What the hostile clients of a run are asked to do.
#[derive(Debug, Clone)]
pub(crate) struct HostileConfig {
    pub(crate) url: WsUrl,
    pub(crate) http: String,
    pub(crate) api_key: Option<String>,
    /// The hot channel (the one `fanout` publishes to).
    pub(crate) hot: String,
    /// Prefix of the long channel names of `many_sse` streams.
    pub(crate) prefix: String,
    pub(crate) never_ws: usize,
    pub(crate) never_sse: usize,
    pub(crate) bursty: usize,
    pub(crate) burst_read: Duration,
    pub(crate) burst_pause: Duration,
    pub(crate) many_sse: usize,
    pub(crate) many_channels: usize,
    pub(crate) many_name_len: usize,
    pub(crate) flood: usize,
    pub(crate) flood_channel: String,
    pub(crate) flood_fill: usize,
    pub(crate) flood_size: usize,
    pub(crate) flood_requests: usize,
}

impl HostileConfig {
    /// Whether any hostile client is asked for.
    pub(crate) fn any(&self) -> bool {
        self.never_ws + self.never_sse + self.bursty + self.many_sse + self.flood > 0
    }
}

/// One hostile client's end.
#[derive(Debug, Clone, Default)]
struct Outcome {
    connected: bool,
    error: Option<String>,
    /// How it ended: a close code (`4008`), `eof`, `reset`, `error: ...`; `None`: still open.
    ended: Option<String>,
    /// Seconds from the start of the run to when the client saw its end.
    ended_secs: Option<f64>,
    delivered: u64,
    gaps: u64,
    missing: u64,
}

/// What the report says about one kind of hostile client.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct KindReport {
    pub(crate) clients: u64,
    pub(crate) connected: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) first_error: Option<String>,
    /// Clients that got a 4008 (`disconnect` push, close frame or SSE `disconnect` event).
    pub(crate) cut_4008: u64,
    /// How they ended (close code, `eof`, `reset`, `error: ...`, `open`: still open at the end).
    pub(crate) endings: BTreeMap<String, u64>,
    /// When the clients saw their end, seconds from the start of publishing (sorted; those
    /// that ended before the final read).
    pub(crate) ended_secs: Vec<f64>,
    /// Bursty readers: publications received, and sequence gaps / publications skipped.
    pub(crate) delivered: u64,
    pub(crate) gaps: u64,
    pub(crate) missing: u64,
}

/// The hostile clients of a run, running.
pub(crate) struct Hostiles {
    outcomes: Arc<Mutex<Vec<(Kind, Outcome)>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    stop: watch::Sender<bool>,
}

/// Fills the flood channel's history: `flood_fill` publications of `flood_size` bytes.
pub(crate) async fn fill_history(cfg: &HostileConfig) -> anyhow::Result<()> {
    if cfg.flood_fill == 0 {
        return Ok(());
    }
    let mut api = herald_client::HttpApi::connect(&cfg.http, cfg.api_key.clone())
        .await
        .map_err(|e| anyhow!("connecting {}: {e}", cfg.http))?;
    let per_request = ((6 << 20) / (cfg.flood_size + 64)).clamp(1, 1000);
    let data = format!("{{\"p\":\"{}\"}}", "x".repeat(cfg.flood_size.saturating_sub(8)));
    let mut left = cfg.flood_fill;
    while left > 0 {
        let n = left.min(per_request);
        let mut body = String::from("{\"publications\":[");
        for i in 0..n {
            if i > 0 {
                body.push(',');
            }
            body.push_str(&format!("{{\"channel\":\"{}\",\"data\":{data}}}", cfg.flood_channel));
        }
        body.push_str("]}");
        match api.request("POST", "/api/batch", Some(body.as_bytes())).await {
            Ok((200..=299, _, answer)) if memchr::memmem::find(&answer, b"\"error\"").is_none() => {
            }
            Ok((status, _, answer)) => bail!(
                "filling {}: {status} {}",
                cfg.flood_channel,
                String::from_utf8_lossy(&answer[..answer.len().min(300)])
            ),
            Err(e) => bail!("filling {}: {e}", cfg.flood_channel),
        }
        left -= n;
    }
    Ok(())
}

/// Connects every hostile client (returns once each is set up or failed); `start` is the
/// instant the run's times are counted from.
pub(crate) async fn start(cfg: Arc<HostileConfig>, start: Instant) -> Hostiles {
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let (stop, _) = watch::channel(false);
    let mut kinds = Vec::new();
    for (kind, n) in [
        (Kind::NeverWs, cfg.never_ws),
        (Kind::NeverSse, cfg.never_sse),
        (Kind::Bursty, cfg.bursty),
        (Kind::ManySse, cfg.many_sse),
        (Kind::HistoryFlood, cfg.flood),
    ] {
        kinds.extend((0..n).map(|i| (kind, i)));
    }
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(kinds.len().max(1));
    let mut tasks = Vec::new();
    for (kind, i) in kinds.iter().copied() {
        let (cfg, outcomes, stop, ready) =
            (Arc::clone(&cfg), Arc::clone(&outcomes), stop.subscribe(), ready_tx.clone());
        tasks.push(tokio::spawn(async move {
            let mut outcome = Outcome::default();
            run_one(&cfg, kind, i, start, stop, ready, &mut outcome).await;
            if let Ok(mut o) = outcomes.lock() {
                o.push((kind, outcome));
            }
        }));
    }
    drop(ready_tx);
    for _ in 0..kinds.len() {
        if ready_rx.recv().await.is_none() {
            break;
        }
    }
    Hostiles { outcomes, tasks, stop }
}

impl Hostiles {
    /// Stops every hostile client (never-readers first read what they hold) and reports them.
    pub(crate) async fn finish(self) -> BTreeMap<String, KindReport> {
        self.stop.send_replace(true);
        for t in self.tasks {
            let _ = tokio::time::timeout(DRAIN_MAX + Duration::from_secs(2), t).await;
        }
        let outcomes = self.outcomes.lock().map(|o| o.clone()).unwrap_or_default();
        let mut out: BTreeMap<String, KindReport> = BTreeMap::new();
        for (kind, o) in outcomes {
            let r = out.entry(kind.name().to_owned()).or_default();
            r.clients += 1;
            r.connected += u64::from(o.connected);
            if r.first_error.is_none() {
                r.first_error.clone_from(&o.error);
            }
            let ended = o.ended.clone().unwrap_or_else(|| "open".to_owned());
            if ended == "4008" {
                r.cut_4008 += 1;
            }
            *r.endings.entry(ended).or_default() += 1;
            if let Some(s) = o.ended_secs {
                r.ended_secs.push((s * 10.0).round() / 10.0);
            }
            r.delivered += o.delivered;
            r.gaps += o.gaps;
            r.missing += o.missing;
        }
        for r in out.values_mut() {
            r.ended_secs.sort_by(f64::total_cmp);
        }
        out
    }
}

/// A long channel name of exactly `len` bytes (at least the prefix and the indexes).
fn long_name(prefix: &str, client: usize, i: usize, len: usize) -> String {
    let mut name = format!("{prefix}m{client}-{i}-");
    while name.len() < len {
        name.push('x');
    }
    name
}

async fn run_one(
    cfg: &HostileConfig,
    kind: Kind,
    index: usize,
    start: Instant,
    mut stop: watch::Receiver<bool>,
    ready: tokio::sync::mpsc::Sender<()>,
    outcome: &mut Outcome,
) {
    let setup = tokio::time::timeout(Duration::from_secs(30), setup(cfg, kind, index)).await;
    let _ = ready.send(()).await;
    drop(ready);
    let (mut stream, mut reader) = match setup {
        Ok(Ok(ok)) => ok,
        Ok(Err(e)) => {
            outcome.error = Some(format!("{}: {e:#}", kind.name()));
            return;
        }
        Err(_) => {
            outcome.error = Some(format!("{}: setup timed out", kind.name()));
            return;
        }
    };
    outcome.connected = true;
    if kind == Kind::Bursty {
        bursty(cfg, &mut stream, &mut reader, start, &mut stop, outcome).await;
        return;
    }
    // Never read: watch for a reset until the end of the run, then read what is there.
    loop {
        tokio::select! {
            _ = stop.wait_for(|&s| s) => break,
            _ = tokio::time::sleep(ERROR_POLL) => {}
        }
        if let Ok(Some(e)) = stream.take_error() {
            outcome.ended = Some(if e.kind() == std::io::ErrorKind::ConnectionReset {
                "reset".to_owned()
            } else {
                format!("error: {e}")
            });
            outcome.ended_secs = Some(start.elapsed().as_secs_f64());
            break;
        }
    }
    let (code, end) = drain(&mut stream, &mut reader).await;
    // A close code read at the end says more than the reset seen before it.
    if let Some(code) = code {
        outcome.ended = Some(code);
    } else if outcome.ended.is_none() {
        outcome.ended = end;
    }
}

/// The parser of a hostile connection's bytes.
enum Reader {
    Ws(FrameReader),
    Sse(SseReader),
}

async fn setup(
    cfg: &HostileConfig,
    kind: Kind,
    index: usize,
) -> anyhow::Result<(TcpStream, Reader)> {
    let subscribe = |channel: &str| {
        conn::text_frame(
            format!("{{\"op\":\"subscribe\",\"id\":1,\"channel\":\"{channel}\"}}").as_bytes(),
        )
    };
    match kind {
        Kind::NeverWs => {
            let (mut stream, _) = conn::open(&cfg.url, None, Some(TINY_RECV_BUFFER)).await?;
            stream.write_all(&subscribe(&cfg.hot)).await?;
            Ok((stream, Reader::Ws(FrameReader::default())))
        }
        Kind::Bursty => {
            let (mut stream, _) = conn::open(&cfg.url, None, None).await?;
            stream.write_all(&subscribe(&cfg.hot)).await?;
            Ok((stream, Reader::Ws(FrameReader::default())))
        }
        Kind::NeverSse => {
            let names = std::iter::once(cfg.hot.clone());
            let (stream, _) = conn::open_sse(&cfg.url, None, Some(TINY_RECV_BUFFER), names).await?;
            Ok((stream, Reader::Sse(SseReader::default())))
        }
        Kind::ManySse => {
            let names = std::iter::once(cfg.hot.clone()).chain(
                (1..cfg.many_channels.max(1))
                    .map(|i| long_name(&cfg.prefix, index, i, cfg.many_name_len)),
            );
            let (stream, _) = conn::open_sse(&cfg.url, None, Some(TINY_RECV_BUFFER), names).await?;
            Ok((stream, Reader::Sse(SseReader::default())))
        }
        Kind::HistoryFlood => {
            let (mut stream, _) = conn::open(&cfg.url, None, Some(TINY_RECV_BUFFER)).await?;
            for id in 1..=cfg.flood_requests.max(1) {
                let cmd = format!(
                    "{{\"op\":\"history\",\"id\":{id},\"channel\":\"{}\"}}",
                    cfg.flood_channel
                );
                // The server may stop reading once its replies fill the socket: send what it
                // takes within a second each, and go on never reading.
                let frame = conn::text_frame(cmd.as_bytes());
                let write = stream.write_all(&frame);
                if tokio::time::timeout(Duration::from_secs(1), write).await.is_err() {
                    break;
                }
            }
            Ok((stream, Reader::Ws(FrameReader::default())))
        }
    }
}

/// What a hostile socket's bytes said: a close code (`disconnect` push or event, close frame).
#[derive(Default)]
struct Seen {
    code: Option<String>,
    pongs: usize,
    ws_pongs: Vec<Vec<u8>>,
    stamps: Vec<(u64, u64)>,
}

fn feed(
    reader: &mut Reader,
    scanner: &Scanner,
    bytes: &[u8],
    seen: &mut Seen,
) -> anyhow::Result<()> {
    match reader {
        Reader::Ws(r) => r.feed(bytes, &mut |op, p| match op {
            1 => {
                for line in p.split(|&b| b == b'\n') {
                    if line.starts_with(b"{\"pub\"") {
                        if let Some(s) = scanner.stamp(line) {
                            seen.stamps.push((s.w as u64, s.s));
                        }
                    } else if line.starts_with(b"{\"disconnect\"") {
                        seen.code = scanner.code(line).map(|c| c.to_string());
                    } else if line.starts_with(b"{\"ping\"") {
                        seen.pongs += 1;
                    }
                }
            }
            8 => {
                let code = (p.len() >= 2).then(|| u16::from_be_bytes([p[0], p[1]]));
                if seen.code.is_none() {
                    seen.code = Some(code.map_or_else(|| "close".to_owned(), |c| c.to_string()));
                }
            }
            9 => seen.ws_pongs.push(p.iter().take(125).copied().collect()),
            _ => {}
        }),
        Reader::Sse(r) => r.feed(bytes, &mut |e| {
            if e.event == b"disconnect" {
                seen.code = scanner.code(e.data).map(|c| c.to_string());
            }
        }),
    }
}

/// Reads a never-reading socket at the end: (close code seen, how the socket ended).
async fn drain(stream: &mut TcpStream, reader: &mut Reader) -> (Option<String>, Option<String>) {
    let scanner = Scanner::new();
    let mut seen = Seen::default();
    let mut buf = vec![0u8; 64 * 1024];
    let deadline = tokio::time::Instant::now() + DRAIN_MAX;
    loop {
        let quiet = (tokio::time::Instant::now() + DRAIN_QUIET).min(deadline);
        match tokio::time::timeout_at(quiet, stream.readable()).await {
            Err(_) => return (seen.code, None),
            Ok(Err(e)) => return (seen.code, Some(format!("error: {e}"))),
            Ok(Ok(())) => {}
        }
        loop {
            match stream.try_read(&mut buf) {
                Ok(0) => return (seen.code, Some("eof".to_owned())),
                Ok(n) => {
                    seen.stamps.clear();
                    if let Err(e) = feed(reader, &scanner, &buf[..n], &mut seen) {
                        return (seen.code, Some(format!("error: {e}")));
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    return (seen.code, Some("reset".to_owned()))
                }
                Err(e) => return (seen.code, Some(format!("error: {e}"))),
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return (seen.code, None);
        }
    }
}

/// A bursty reader: reads for `burst_read`, pauses for `burst_pause`, until the end of the run
/// or of its connection; counts publications and sequence gaps (per publisher).
async fn bursty(
    cfg: &HostileConfig,
    stream: &mut TcpStream,
    reader: &mut Reader,
    start: Instant,
    stop: &mut watch::Receiver<bool>,
    outcome: &mut Outcome,
) {
    let scanner = Scanner::new();
    let mut seen = Seen::default();
    let mut last: BTreeMap<u64, u64> = BTreeMap::new();
    let mut buf = vec![0u8; 128 * 1024];
    let end = |outcome: &mut Outcome, why: String| {
        outcome.ended = Some(why);
        outcome.ended_secs = Some(start.elapsed().as_secs_f64());
    };
    loop {
        let read_until = tokio::time::Instant::now() + cfg.burst_read;
        while tokio::time::Instant::now() < read_until {
            let readable = tokio::select! {
                _ = stop.wait_for(|&s| s) => return,
                r = tokio::time::timeout_at(read_until, stream.readable()) => r,
            };
            match readable {
                Err(_) => break,
                Ok(Err(e)) => return end(outcome, format!("error: {e}")),
                Ok(Ok(())) => {}
            }
            loop {
                match stream.try_read(&mut buf) {
                    Ok(0) => {
                        let why = seen.code.clone().unwrap_or_else(|| "eof".to_owned());
                        return end(outcome, why);
                    }
                    Ok(n) => {
                        if let Err(e) = feed(reader, &scanner, &buf[..n], &mut seen) {
                            return end(outcome, format!("error: {e}"));
                        }
                        for (w, s) in seen.stamps.drain(..) {
                            let l = last.entry(w).or_insert(0);
                            // The first publication seen from a publisher starts its count.
                            if *l > 0 && s > *l + 1 {
                                outcome.gaps += 1;
                                outcome.missing += s - *l - 1;
                            }
                            if s > *l {
                                *l = s;
                                outcome.delivered += 1;
                            }
                        }
                        if let Some(code) = &seen.code {
                            let code = code.clone();
                            return end(outcome, code);
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                        return end(outcome, "reset".to_owned())
                    }
                    Err(e) => return end(outcome, format!("error: {e}")),
                }
            }
            if seen.pongs > 0 || !seen.ws_pongs.is_empty() {
                let mut out = Vec::new();
                for _ in 0..std::mem::take(&mut seen.pongs) {
                    out.extend_from_slice(&conn::text_frame(b"{\"op\":\"pong\"}"));
                }
                for p in std::mem::take(&mut seen.ws_pongs) {
                    out.extend_from_slice(&herald_protocol::ws::encode_frame(
                        herald_protocol::ws::Role::Client,
                        herald_protocol::ws::Opcode::Pong,
                        &p,
                    ));
                }
                if let Err(e) = stream.write_all(&out).await {
                    return end(outcome, format!("error: {e}"));
                }
            }
        }
        tokio::select! {
            _ = stop.wait_for(|&s| s) => return,
            _ = tokio::time::sleep(cfg.burst_pause) => {}
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn long_names_have_the_length_asked() {
        let n = long_name("bench:", 3, 17, 120);
        assert_eq!(n.len(), 120);
        assert!(n.starts_with("bench:m3-17-"));
        herald_protocol::channel::ChannelName::parse(&n).unwrap();
        assert_eq!(long_name("bench:", 1, 2, 3), "bench:m1-2-");
    }
}
