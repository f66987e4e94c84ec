//! What every process of a run agrees on: the [`Plan`] a worker receives, which channels each
//! connection subscribes ([`subscriptions`]), the Zipf popularity of channels ([`Zipf`]) and the
//! payload format ([`write_payload`]).
//!
//! Everything here is deterministic (seeded by the connection index), so the main process
//! computes how many subscribers each channel has without asking the workers, and the workers
//! compute their own subscriptions from the plan alone.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// Which server is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Target {
    /// Herald: subscribe through the protocol, publish through `/api/batch` or `/api/publish`.
    Herald,
    /// The reference fan-out server: no protocol, every connection gets every publication,
    /// publish through `POST /publish`.
    Reference,
}

impl Target {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Target::Herald => "herald",
            Target::Reference => "reference",
        }
    }
}

/// How subscribers connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Transport {
    /// WebSocket, `herald.json`: one `subscribe` command per channel.
    Ws,
    /// Server-Sent Events (Herald only): `GET /sse?channel=A&channel=B` on --url's host and
    /// port, all of a connection's channels in one request.
    Sse,
}

impl Transport {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Transport::Ws => "ws",
            Transport::Sse => "sse",
        }
    }
}

/// The wire format of WebSocket subscribers (`--format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Format {
    /// `herald.json` (text frames).
    Json,
    /// `herald.proto` (binary frames, Protocol Buffers).
    Proto,
    /// Half of each: connection `i` speaks `herald.proto` when `i` is odd.
    Half,
}

impl Format {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Proto => "proto",
            Format::Half => "half",
        }
    }

    /// Whether connection `index` speaks `herald.proto`.
    pub(crate) fn is_proto(self, index: usize) -> bool {
        match self {
            Format::Json => false,
            Format::Proto => true,
            Format::Half => index % 2 == 1,
        }
    }
}

/// How subscriptions are laid out over channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Layout {
    /// No subscription at all (idle connections may still be plain connected).
    None,
    /// Every connection subscribes channel 0.
    One,
    /// Connection `i` subscribes channel `i % channels`.
    RoundRobin,
    /// Each connection subscribes `per_client` distinct channels drawn by Zipf popularity.
    Zipf,
}

/// What one worker process is asked to do (sent as the first JSON line on its stdin).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Plan {
    /// The worker's index (for messages).
    pub(crate) worker: usize,
    /// Global indexes of the worker's connections: `first..first + count`.
    pub(crate) first: usize,
    /// How many connections this worker opens.
    pub(crate) count: usize,
    /// WebSocket URL.
    pub(crate) url: String,
    /// Which server.
    pub(crate) target: Target,
    /// How subscribers connect.
    pub(crate) transport: Transport,
    /// The wire format of WebSocket subscribers.
    #[serde(default = "json_format")]
    pub(crate) format: Format,
    /// Fraction of connections that subscribe and then never read again ([`is_slow`]).
    pub(crate) slow_fraction: f64,
    /// Source addresses, used round-robin by global connection index.
    pub(crate) source_ips: Vec<IpAddr>,
    /// Subscription layout.
    pub(crate) layout: Layout,
    /// Number of channels.
    pub(crate) channels: usize,
    /// Channels per connection ([`Layout::Zipf`]).
    pub(crate) per_client: usize,
    /// Zipf exponent.
    pub(crate) zipf: f64,
    /// Channel names are `prefix` + index.
    pub(crate) channel_prefix: String,
    /// Connections opened at once.
    pub(crate) connect_concurrency: usize,
}

fn json_format() -> Format {
    Format::Json
}

/// A small, fast, seeded generator (splitmix64): good enough for sampling, no dependency.
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub(crate) fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Zipf(s) over `0..n`: rank `k` (0-based) has weight `1 / (k + 1)^s`.
#[derive(Debug, Clone)]
pub(crate) struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    pub(crate) fn new(n: usize, s: f64) -> Zipf {
        let mut cdf = Vec::with_capacity(n.max(1));
        let mut total = 0.0;
        for k in 0..n.max(1) {
            total += 1.0 / ((k + 1) as f64).powf(s);
            cdf.push(total);
        }
        for c in &mut cdf {
            *c /= total;
        }
        Zipf { cdf }
    }

    pub(crate) fn sample(&self, rng: &mut Rng) -> usize {
        let u = rng.next_f64();
        self.cdf.partition_point(|&c| c <= u).min(self.cdf.len() - 1)
    }
}

/// The channels connection `index` subscribes, by index (distinct, ascending).
pub(crate) fn subscriptions(plan: &Plan, zipf: Option<&Zipf>, index: usize) -> Vec<u32> {
    match plan.layout {
        Layout::None => Vec::new(),
        Layout::One => vec![0],
        Layout::RoundRobin => vec![(index % plan.channels.max(1)) as u32],
        Layout::Zipf => {
            let k = plan.per_client.min(plan.channels);
            if k == plan.channels {
                return (0..k as u32).collect();
            }
            let mut rng = Rng::new(index as u64 ^ 0x5eed_0000);
            let mut chosen: Vec<u32> = Vec::with_capacity(k);
            let mut tries = 0usize;
            while chosen.len() < k {
                tries += 1;
                // Highly skewed popularity with k near n: fall back to uniform picks.
                let c = match (zipf, tries < 64 * k) {
                    (Some(z), true) => z.sample(&mut rng) as u32,
                    _ => (rng.next_u64() % plan.channels as u64) as u32,
                };
                if !chosen.contains(&c) {
                    chosen.push(c);
                }
            }
            chosen.sort_unstable();
            chosen
        }
    }
}

/// Whether connection `index` is one of the never-reading ones: spread evenly over the
/// indexes, `floor(n * fraction)` of the first `n` connections.
pub(crate) fn is_slow(plan: &Plan, index: usize) -> bool {
    let f = plan.slow_fraction;
    f > 0.0 && ((index + 1) as f64 * f).floor() > (index as f64 * f).floor()
}

/// Unix time in nanoseconds.
pub(crate) fn unix_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Appends the payload `{"t":T,"s":S,"c":C,"w":W,"p":"xx.."}`, padded with `x` to `size` bytes
/// (or longer when the fields alone exceed it).
///
/// `t` is the send time (unix nanos), `s` the sequence number within (channel `c`, publisher
/// `w`), starting at 1.
pub(crate) fn write_payload(out: &mut Vec<u8>, size: usize, t: u64, s: u64, c: u32, w: u32) {
    let start = out.len();
    let mut b = itoa_buf();
    out.extend_from_slice(b"{\"t\":");
    out.extend_from_slice(b.format(t).as_bytes());
    out.extend_from_slice(b",\"s\":");
    out.extend_from_slice(b.format(s).as_bytes());
    out.extend_from_slice(b",\"c\":");
    out.extend_from_slice(b.format(c).as_bytes());
    out.extend_from_slice(b",\"w\":");
    out.extend_from_slice(b.format(w).as_bytes());
    out.extend_from_slice(b",\"p\":\"");
    let used = out.len() - start + 2;
    out.resize(out.len() + size.saturating_sub(used), b'x');
    out.extend_from_slice(b"\"}");
}

fn itoa_buf() -> Itoa {
    Itoa([0; 20])
}

/// A minimal integer formatter (no allocation).
struct Itoa([u8; 20]);

impl Itoa {
    fn format<T: Into<u64>>(&mut self, v: T) -> &str {
        let mut v: u64 = v.into();
        let mut i = self.0.len();
        loop {
            i -= 1;
            self.0[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        std::str::from_utf8(&self.0[i..]).unwrap_or("0")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn payload_has_the_size_asked() {
        let mut out = Vec::new();
        write_payload(&mut out, 100, 1_700_000_000_000_000_000, 42, 3, 1);
        assert_eq!(out.len(), 100);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["s"], 42);
        assert_eq!(v["c"], 3);
    }

    #[test]
    fn zipf_is_skewed() {
        let z = Zipf::new(100, 1.0);
        let mut rng = Rng::new(1);
        let mut hits = [0usize; 100];
        for _ in 0..100_000 {
            hits[z.sample(&mut rng)] += 1;
        }
        assert!(hits[0] > hits[1] && hits[1] > hits[10] && hits[10] > hits[99]);
    }
}
