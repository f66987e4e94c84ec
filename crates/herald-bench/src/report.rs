//! The results of a run: one JSON object (one line on stdout, appended to `--out`), and the
//! same as a one-row markdown table. Field names are read by the chart tool: keep them.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use base64::Engine as _;
use hdrhistogram::serialization::Deserializer;
use serde::Serialize;

use crate::publish::PubCounters;
use crate::worker::{new_histogram, WorkerResult};

/// Latency percentiles, microseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Latency {
    pub(crate) p50: u64,
    pub(crate) p90: u64,
    pub(crate) p99: u64,
    pub(crate) p999: u64,
    pub(crate) max: u64,
    pub(crate) mean: f64,
    /// Deliveries timed (those of publications sent after the warmup).
    pub(crate) count: u64,
}

impl Latency {
    /// The percentiles of `hist`.
    pub(crate) fn of(hist: &hdrhistogram::Histogram<u64>) -> Latency {
        Latency {
            p50: hist.value_at_quantile(0.5),
            p90: hist.value_at_quantile(0.9),
            p99: hist.value_at_quantile(0.99),
            p999: hist.value_at_quantile(0.999),
            max: hist.max(),
            mean: (hist.mean() * 10.0).round() / 10.0,
            count: hist.len(),
        }
    }
}

/// What was asked of the run.
#[derive(Debug, Clone)]
pub(crate) struct Offered {
    pub(crate) rate: f64,
    pub(crate) duration: f64,
    pub(crate) warmup: f64,
}

/// The results of one run.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Report {
    pub(crate) scenario: String,
    pub(crate) target: String,
    /// How subscribers connected: `ws` or `sse`.
    pub(crate) transport: String,
    /// The WebSocket subscribers' wire format: `json`, `proto` or `half`.
    pub(crate) format: String,
    pub(crate) label: String,
    pub(crate) connections: u64,
    /// Connections subscribed, never-reading ones included.
    pub(crate) connections_ready: u64,
    pub(crate) connect_failures: u64,
    /// Fraction of connections asked to never read after subscribing.
    pub(crate) slow_fraction: f64,
    /// Never-reading connections subscribed: out of every delivery, loss and latency figure
    /// (and of `disconnects`).
    pub(crate) slow_connections: u64,
    /// Never-reading connections the server had closed by the end of the run.
    pub(crate) slow_disconnected: u64,
    /// Those, by close code (or `eof`, `error: ...`).
    pub(crate) slow_disconnects: BTreeMap<String, u64>,
    pub(crate) channels: u64,
    pub(crate) per_client: u64,
    /// Publications per second asked for; 0 = as fast as possible.
    pub(crate) rate_offered: f64,
    /// Publications per second accepted by the server during the measured window.
    pub(crate) rate_achieved: f64,
    pub(crate) payload: u64,
    pub(crate) duration_secs: f64,
    pub(crate) warmup_secs: f64,
    /// Publications accepted (warmup included).
    pub(crate) published: u64,
    /// Sum over accepted publications of their channel's subscribers.
    pub(crate) expected_deliveries: u64,
    /// Publications received, duplicates excluded (warmup included).
    pub(crate) delivered: u64,
    /// `expected_deliveries - delivered` after the drain.
    pub(crate) lost: i64,
    /// Times a stream's sequence jumped forward.
    pub(crate) gaps: u64,
    /// Publications skipped by those jumps.
    pub(crate) missing: u64,
    pub(crate) duplicates: u64,
    /// Connections that ended during the run, by close code (or `eof`, `error: ...`).
    pub(crate) disconnects: BTreeMap<String, u64>,
    pub(crate) unsubs: u64,
    /// Text lines the bench could not read as a publication or a known push.
    pub(crate) unparsed: u64,
    /// Timed deliveries per second, over `delivery_secs`.
    pub(crate) deliveries_per_sec: f64,
    /// From the start of the measured window to the last timed delivery (at least the window).
    pub(crate) delivery_secs: f64,
    pub(crate) publications_per_sec: f64,
    pub(crate) publish_503s: u64,
    pub(crate) publish_errors: u64,
    pub(crate) latency_us: Latency,
    /// How long a publisher waited for each answer (HTTP response, `publish` reply) of the
    /// publications sent after the warmup; `count` counts requests.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) publish_reply_us: Option<Latency>,
    pub(crate) server_pid: Option<u32>,
    pub(crate) server_rss_before: Option<u64>,
    pub(crate) server_rss_after: Option<u64>,
    pub(crate) rss_per_connection_bytes: Option<f64>,
    /// RSS once the measured subscribers are connected and the flood channel filled, before
    /// the hostile clients connect and publishing starts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) server_rss_ready: Option<u64>,
    /// Highest RSS read (every 100 ms) from the start of the run to its end (settle included).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) server_rss_peak: Option<u64>,
    /// RSS about once a second: (seconds from the start of the run, bytes).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) server_rss_timeline: Vec<(f64, u64)>,
    /// With `--settle`: RSS at its end, every connection closed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) server_rss_idle: Option<u64>,
    /// With `--settle`: (seconds since every connection closed, bytes), once a second.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) server_rss_settle: Vec<(f64, u64)>,
    /// The server's disconnects by close code (`herald_disconnects_total` of `/metrics`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) server_disconnects: BTreeMap<String, u64>,
    /// When the server cut slow consumers: (seconds from the start of the run, 4008 count so
    /// far), at each change.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) cuts_4008_timeline: Vec<(f64, u64)>,
    /// Hostile clients by kind (see the `hostile` module).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) hostile: BTreeMap<String, crate::hostile::KindReport>,
    pub(crate) workers: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) first_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) publish_first_error: Option<String>,
    /// Unix seconds at the end of the run.
    pub(crate) timestamp: u64,
}

impl Report {
    pub(crate) fn new(scenario: &str, target: &str, label: &str) -> Report {
        Report {
            scenario: scenario.into(),
            target: target.into(),
            label: label.into(),
            ..Report::default()
        }
    }

    /// Merges the workers' results and the publishers' counters.
    pub(crate) fn fill(
        &mut self,
        offered: &Offered,
        counters: &PubCounters,
        results: &[WorkerResult],
        measured_secs: f64,
        measure_start: u64,
    ) -> anyhow::Result<()> {
        let mut hist = new_histogram();
        let mut measured = 0;
        let mut last_ns = 0;
        for r in results {
            self.delivered += r.delivered;
            measured += r.measured;
            last_ns = last_ns.max(r.last_measured_ns);
            self.gaps += r.gaps;
            self.missing += r.missing;
            self.duplicates += r.duplicates;
            self.unsubs += r.unsubs;
            self.unparsed += r.unparsed;
            for (k, v) in &r.disconnects {
                *self.disconnects.entry(k.clone()).or_default() += v;
            }
            for (k, v) in &r.slow_disconnects {
                *self.slow_disconnects.entry(k.clone()).or_default() += v;
                self.slow_disconnected += v;
            }
            if !r.histogram.is_empty() {
                let bytes = base64::engine::general_purpose::STANDARD.decode(&r.histogram)?;
                let h: hdrhistogram::Histogram<u64> = Deserializer::new()
                    .deserialize(&mut bytes.as_slice())
                    .map_err(|e| anyhow::anyhow!("worker histogram: {e:?}"))?;
                hist.add(&h).map_err(|e| anyhow::anyhow!("merging histograms: {e:?}"))?;
            }
        }
        self.rate_offered = offered.rate;
        self.warmup_secs = offered.warmup;
        self.duration_secs = if self.scenario == "idle" { offered.duration } else { measured_secs };
        self.published = counters.published.load(Ordering::Relaxed);
        self.expected_deliveries = counters.expected.load(Ordering::Relaxed);
        self.lost = self.expected_deliveries as i64 - self.delivered as i64;
        self.publish_503s = counters.status_503.load(Ordering::Relaxed);
        self.publish_errors = counters.errors.load(Ordering::Relaxed);
        if self.scenario != "idle" {
            self.publications_per_sec =
                counters.measured.load(Ordering::Relaxed) as f64 / measured_secs;
            self.rate_achieved = self.publications_per_sec;
            // Over the window, or until the last timed delivery if that came later (a server
            // that accepts faster than it delivers buffers the difference).
            let span = (last_ns.saturating_sub(measure_start) as f64 / 1e9).max(measured_secs);
            self.delivery_secs = (span * 1000.0).round() / 1000.0;
            self.deliveries_per_sec = measured as f64 / span;
        }
        if !hist.is_empty() {
            self.latency_us = Latency::of(&hist);
        }
        if let Ok(replies) = counters.replies.lock() {
            if !replies.is_empty() {
                self.publish_reply_us = Some(Latency::of(&replies));
            }
        }
        if let (Some(before), Some(after)) = (self.server_rss_before, self.server_rss_after) {
            if self.connections_ready > 0 {
                self.rss_per_connection_bytes =
                    Some(((after as f64 - before as f64) / self.connections_ready as f64).round());
            }
        }
        self.publications_per_sec = round1(self.publications_per_sec);
        self.rate_achieved = round1(self.rate_achieved);
        self.deliveries_per_sec = round1(self.deliveries_per_sec);
        self.duration_secs = (self.duration_secs * 1000.0).round() / 1000.0;
        self.timestamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Ok(())
    }

    /// A one-row markdown table, with its header.
    pub(crate) fn markdown(&self) -> String {
        let mb = |b: Option<u64>| b.map_or("-".into(), |b| format!("{:.1}", b as f64 / 1048576.0));
        let disconnects: u64 = self.disconnects.values().sum();
        format!(
            "| label | scenario | target | transport | conns | slow conns | slow closed | channels | rate offered | pubs/s | deliveries/s | p50 us | p90 us | p99 us | p99.9 us | max us | lost | gaps | dups | disconnects | 503s | RSS before MiB | RSS after MiB | RSS/conn B |\n\
             |---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n\
             | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            self.label,
            self.scenario,
            self.target,
            match self.format.as_str() {
                "" | "json" => self.transport.clone(),
                format => format!("{} ({format})", self.transport),
            },
            self.connections_ready,
            self.slow_connections,
            self.slow_disconnected,
            self.channels,
            match (self.scenario.as_str(), self.rate_offered > 0.0) {
                ("idle", _) => "-".into(),
                (_, true) => format!("{}", self.rate_offered),
                (_, false) => "max".into(),
            },
            human(self.publications_per_sec),
            human(self.deliveries_per_sec),
            self.latency_us.p50,
            self.latency_us.p90,
            self.latency_us.p99,
            self.latency_us.p999,
            self.latency_us.max,
            self.lost,
            self.gaps,
            self.duplicates,
            disconnects,
            self.publish_503s,
            mb(self.server_rss_before),
            mb(self.server_rss_after),
            self.rss_per_connection_bytes.map_or("-".into(), |b| format!("{b:.0}")),
        )
    }
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn human(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if x >= 1e4 {
        format!("{:.1}k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

/// A rate for the progress line.
pub(crate) fn human_rate(x: f64) -> String {
    format!("{}/s", human(x))
}
