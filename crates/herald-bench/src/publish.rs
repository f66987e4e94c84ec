//! Publishers: HTTP (`/api/batch`, `/api/publish`, or the reference server's `/publish`) and
//! WebSocket (`publish` commands, pipelined), paced at a fixed rate or as fast as possible.
//!
//! Each publisher numbers its publications per channel (`s`, from 1) and stamps them with its
//! index (`w`) and the send time (`t`); since a publisher waits for each request's answer
//! before the next (HTTP) or keeps commands in order on one connection (WebSocket), every
//! (channel, publisher) stream reaches the server in sequence order, which is what lets the
//! subscribers count gaps and duplicates.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use herald_client::HttpApi;
use tokio::io::AsyncWriteExt as _;

use crate::conn::{self, FrameReader, WsUrl};
use crate::plan::{self, Rng, Target, Zipf};

/// How a publication's channel is picked.
#[derive(Debug, Clone)]
pub(crate) enum Chooser {
    /// Always channel 0.
    One,
    /// Channels `0..n` in turn.
    RoundRobin(usize),
    /// By Zipf popularity.
    Zipf(Zipf),
}

/// What every publisher of a run shares.
#[derive(Debug)]
pub(crate) struct PubConfig {
    pub(crate) target: Target,
    pub(crate) http: String,
    pub(crate) ws_url: String,
    pub(crate) api_key: Option<String>,
    pub(crate) prefix: String,
    pub(crate) payload: usize,
    pub(crate) batch: usize,
    /// Publications per second for each publisher; 0 = as fast as possible.
    pub(crate) rate: f64,
    pub(crate) chooser: Chooser,
    pub(crate) channels: usize,
    /// Subscribers of each channel, to count expected deliveries.
    pub(crate) sub_counts: Vec<u64>,
    /// Publications sent at or after this time (unix nanos) are measured.
    pub(crate) measure_start: u64,
    /// When publishing stops.
    pub(crate) end: Instant,
}

/// Counters of every publisher of a run.
#[derive(Debug)]
pub(crate) struct PubCounters {
    pub(crate) published: AtomicU64,
    pub(crate) measured: AtomicU64,
    pub(crate) expected: AtomicU64,
    pub(crate) status_503: AtomicU64,
    pub(crate) errors: AtomicU64,
    pub(crate) first_error: Mutex<Option<String>>,
    /// Microseconds from sending a request to its answer, for requests sent after the warmup.
    pub(crate) replies: Mutex<hdrhistogram::Histogram<u64>>,
}

impl Default for PubCounters {
    fn default() -> Self {
        PubCounters {
            published: AtomicU64::new(0),
            measured: AtomicU64::new(0),
            expected: AtomicU64::new(0),
            status_503: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            first_error: Mutex::new(None),
            replies: Mutex::new(crate::worker::new_histogram()),
        }
    }
}

impl PubCounters {
    fn error(&self, n: u64, why: String) {
        self.errors.fetch_add(n, Ordering::Relaxed);
        if let Ok(mut first) = self.first_error.lock() {
            if first.is_none() {
                eprintln!("publish error: {why}");
                *first = Some(why);
            }
        }
    }

    /// Records how long the answer to a request sent at `t` (unix nanos) took.
    fn answered(&self, cfg: &PubConfig, t: u64) {
        if t < cfg.measure_start {
            return;
        }
        let us = (plan::unix_nanos().saturating_sub(t) / 1000)
            .clamp(crate::worker::HIST_LOW, crate::worker::HIST_HIGH);
        if let Ok(mut h) = self.replies.lock() {
            let _ = h.record(us);
        }
    }

    fn accepted(&self, cfg: &PubConfig, t: u64, channels: impl Iterator<Item = u32>) {
        let mut n = 0;
        let mut expected = 0;
        for c in channels {
            n += 1;
            expected += cfg.sub_counts.get(c as usize).copied().unwrap_or(0);
        }
        self.published.fetch_add(n, Ordering::Relaxed);
        self.expected.fetch_add(expected, Ordering::Relaxed);
        if t >= cfg.measure_start {
            self.measured.fetch_add(n, Ordering::Relaxed);
        }
    }
}

/// Picks channels and numbers publications for one publisher.
struct Source {
    w: u32,
    seqs: Vec<u64>,
    rng: Rng,
    next: usize,
}

impl Source {
    fn new(w: u32, channels: usize) -> Source {
        Source {
            w,
            seqs: vec![0; channels.max(1)],
            rng: Rng::new(0xb0b0 + w as u64),
            next: w as usize,
        }
    }

    /// The next publication's channel and sequence number.
    fn next(&mut self, chooser: &Chooser) -> (u32, u64) {
        let c = match chooser {
            Chooser::One => 0,
            Chooser::RoundRobin(n) => {
                self.next = self.next.wrapping_add(1);
                self.next % (*n).max(1)
            }
            Chooser::Zipf(z) => z.sample(&mut self.rng),
        };
        self.seqs[c] += 1;
        (c as u32, self.seqs[c])
    }
}

/// How many publications to send now: `Some(n)`, or `None` after sleeping until one is due.
async fn due(cfg: &PubConfig, start: Instant, sent: u64, window: usize) -> Option<usize> {
    if cfg.rate <= 0.0 {
        return Some(window);
    }
    let owed = (start.elapsed().as_secs_f64() * cfg.rate) as u64;
    if owed > sent {
        return Some(((owed - sent) as usize).min(window));
    }
    let next = start + Duration::from_secs_f64((sent + 1) as f64 / cfg.rate);
    tokio::time::sleep_until(next.min(cfg.end).into()).await;
    None
}

/// One HTTP publisher, until `cfg.end`.
pub(crate) async fn http_publisher(w: u32, cfg: Arc<PubConfig>, counters: Arc<PubCounters>) {
    let mut api = match HttpApi::connect(&cfg.http, cfg.api_key.clone()).await {
        Ok(api) => api,
        Err(e) => return counters.error(0, format!("publisher {w}: connecting {}: {e}", cfg.http)),
    };
    let path = match (cfg.target, cfg.batch) {
        (Target::Reference, _) => "/publish",
        (Target::Herald, 1) => "/api/publish",
        (Target::Herald, _) => "/api/batch",
    };
    let mut source = Source::new(w, cfg.channels);
    let mut body = Vec::with_capacity(cfg.batch * (cfg.payload + 64) + 64);
    let mut chans = Vec::with_capacity(cfg.batch);
    let start = Instant::now();
    let mut sent = 0u64;
    while Instant::now() < cfg.end {
        let Some(n) = due(&cfg, start, sent, cfg.batch.max(1)).await else { continue };
        body.clear();
        chans.clear();
        let t = plan::unix_nanos();
        if path == "/api/batch" {
            body.extend_from_slice(b"{\"publications\":[");
        }
        for i in 0..n {
            let (c, s) = source.next(&cfg.chooser);
            chans.push(c);
            match cfg.target {
                Target::Reference => {
                    if i > 0 {
                        body.push(b'\n');
                    }
                }
                Target::Herald => {
                    if i > 0 {
                        body.push(b',');
                    }
                    body.extend_from_slice(b"{\"channel\":\"");
                    body.extend_from_slice(cfg.prefix.as_bytes());
                    body.extend_from_slice(c.to_string().as_bytes());
                    body.extend_from_slice(b"\",\"data\":");
                }
            }
            plan::write_payload(&mut body, cfg.payload, t, s, c, source.w);
            if cfg.target == Target::Herald {
                body.push(b'}');
            }
        }
        if path == "/api/batch" {
            body.extend_from_slice(b"]}");
        }
        sent += n as u64;
        let give_up = cfg.end + Duration::from_secs(5);
        loop {
            let answer = api.request("POST", path, Some(&body)).await;
            if answer.is_ok() {
                counters.answered(&cfg, t);
            }
            match answer {
                Ok((200..=299, _, answer)) => {
                    if path == "/api/batch" && memchr::memmem::find(&answer, b"\"error\"").is_some()
                    {
                        let failed = batch_failures(&answer, n);
                        let why =
                            String::from_utf8_lossy(&answer[..answer.len().min(300)]).into_owned();
                        counters.error(failed.iter().filter(|&&f| f).count() as u64, why);
                        let ok = chans.iter().zip(&failed).filter(|(_, &f)| !f).map(|(&c, _)| c);
                        counters.accepted(&cfg, t, ok);
                    } else {
                        counters.accepted(&cfg, t, chans.iter().copied());
                    }
                    break;
                }
                Ok((503, headers, _)) => {
                    counters.status_503.fetch_add(1, Ordering::Relaxed);
                    let wait = headers
                        .iter()
                        .find(|(k, _)| k == "retry-after")
                        .and_then(|(_, v)| v.trim().parse::<f64>().ok())
                        .unwrap_or(0.05)
                        .clamp(0.01, 60.0);
                    if Instant::now() + Duration::from_secs_f64(wait) > give_up {
                        counters.error(n as u64, "503 until the end of the run".into());
                        break;
                    }
                    tokio::time::sleep(Duration::from_secs_f64(wait)).await;
                }
                Ok((status, _, answer)) => {
                    let why = format!(
                        "{path}: {status} {}",
                        String::from_utf8_lossy(&answer[..answer.len().min(300)])
                    );
                    counters.error(n as u64, why);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    break;
                }
                Err(e) => {
                    counters.error(n as u64, format!("{path}: {e}"));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    break;
                }
            }
        }
    }
}

/// Which publications of a `/api/batch` answer failed.
fn batch_failures(answer: &[u8], n: usize) -> Vec<bool> {
    let parsed: Option<Vec<bool>> =
        serde_json::from_slice::<serde_json::Value>(answer).ok().and_then(|v| {
            v.get("results")?
                .as_array()
                .map(|r| r.iter().map(|x| x.get("error").is_some()).collect())
        });
    match parsed {
        Some(f) if f.len() == n => f,
        _ => vec![true; n],
    }
}

/// One WebSocket publisher (`publish` commands, at most `cfg.batch` in flight), until `cfg.end`.
pub(crate) async fn ws_publisher(w: u32, cfg: Arc<PubConfig>, counters: Arc<PubCounters>) {
    if let Err(e) = ws_publish(w, &cfg, &counters).await {
        counters.error(0, format!("websocket publisher {w}: {e:#}"));
    }
}

async fn ws_publish(w: u32, cfg: &PubConfig, counters: &PubCounters) -> anyhow::Result<()> {
    let url = WsUrl::parse(&cfg.ws_url)?;
    let (mut stream, early) = conn::open(&url, None, None).await?;
    let window = cfg.batch.max(1);
    let mut source = Source::new(w, cfg.channels);
    let mut reader = FrameReader::default();
    let mut in_flight: HashMap<u32, (u32, u64)> = HashMap::with_capacity(window * 2);
    let mut next_id: u32 = 1;
    let mut out = Vec::new();
    let mut cmd = Vec::with_capacity(cfg.payload + 128);
    let mut buf = vec![0u8; 64 * 1024];
    let start = Instant::now();
    let mut sent = 0u64;
    let mut answers: Vec<(u32, Option<u64>)> = Vec::new();
    let handle = |payload: &[u8], answers: &mut Vec<(u32, Option<u64>)>| {
        for line in payload.split(|&b| b == b'\n') {
            if let Some(rest) = line.strip_prefix(b"{\"id\":") {
                if let Some((id, _)) = conn::digits(rest) {
                    let error = memchr::memmem::find(line, b"\"error\"").map(|i| {
                        conn::digits(line.get(i + 16..).unwrap_or_default()).map_or(0, |d| d.0)
                    });
                    answers.push((id as u32, error));
                }
            }
        }
    };
    reader.feed(&early, &mut |op, p| {
        if op == 1 {
            handle(p, &mut answers)
        }
    })?;
    loop {
        for (id, error) in answers.drain(..) {
            let Some((c, t)) = in_flight.remove(&id) else { continue };
            counters.answered(cfg, t);
            match error {
                None => counters.accepted(cfg, t, std::iter::once(c)),
                Some(code) => {
                    if code == 503 || code == 429 {
                        counters.status_503.fetch_add(1, Ordering::Relaxed);
                    }
                    counters.error(1, format!("publish refused with {code}"));
                }
            }
        }
        let now = Instant::now();
        if now >= cfg.end && (in_flight.is_empty() || now >= cfg.end + Duration::from_secs(5)) {
            return Ok(());
        }
        let room = window - in_flight.len().min(window);
        if now < cfg.end && room > 0 {
            let n = if cfg.rate > 0.0 {
                let owed = (start.elapsed().as_secs_f64() * cfg.rate) as u64;
                (owed.saturating_sub(sent) as usize).min(room)
            } else {
                room
            };
            if n > 0 {
                out.clear();
                let t = plan::unix_nanos();
                for _ in 0..n {
                    let (c, s) = source.next(&cfg.chooser);
                    cmd.clear();
                    cmd.extend_from_slice(b"{\"op\":\"publish\",\"id\":");
                    cmd.extend_from_slice(next_id.to_string().as_bytes());
                    cmd.extend_from_slice(b",\"channel\":\"");
                    cmd.extend_from_slice(cfg.prefix.as_bytes());
                    cmd.extend_from_slice(c.to_string().as_bytes());
                    cmd.extend_from_slice(b"\",\"data\":");
                    plan::write_payload(&mut cmd, cfg.payload, t, s, c, w);
                    cmd.push(b'}');
                    out.extend_from_slice(&conn::text_frame(&cmd));
                    in_flight.insert(next_id, (c, t));
                    next_id = next_id.wrapping_add(1).max(1);
                }
                sent += n as u64;
                stream.write_all(&out).await?;
            }
        }
        // Wait for answers (or, when paced, for the next publication to be due).
        let wait = if cfg.rate > 0.0 { Duration::from_millis(1) } else { Duration::from_secs(1) };
        match tokio::time::timeout(wait, stream.readable()).await {
            Err(_) => continue,
            Ok(r) => r?,
        }
        loop {
            match stream.try_read(&mut buf) {
                Ok(0) => anyhow::bail!("server closed the connection"),
                Ok(n) => {
                    reader.feed(&buf[..n], &mut |op, p| {
                        if op == 1 {
                            handle(p, &mut answers)
                        }
                    })?;
                    if n < buf.len() {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e.into()),
            }
        }
    }
}
