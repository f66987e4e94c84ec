//! Node counters, kept as relaxed atomics and rendered as Prometheus text by the server.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use herald_protocol::{CloseCode, ErrorCode};

/// A limit that refused something, for `herald_limit_hits_total{kind=...}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    /// `limits.max_connections`.
    Connections = 0,
    /// `limits.max_connections_per_user`.
    ConnectionsPerUser,
    /// `limits.max_connections_per_ip`.
    ConnectionsPerIp,
    /// `limits.max_subscriptions_per_connection`.
    Subscriptions,
    /// `limits.command_rate` / `command_burst`.
    CommandRate,
    /// `limits.max_message_bytes`.
    MessageSize,
    /// `limits.max_publication_bytes`.
    PublicationSize,
    /// `limits.max_body_bytes`.
    BodySize,
    /// `limits.max_batch_publications`.
    BatchSize,
    /// `limits.max_queue_burst_bytes` (a push over a connection's hard cap: slow consumer).
    Queue,
    /// Behind its soft bound for `limits.slow_consumer_grace_ms` without progress (slow consumer).
    SlowConsumer,
    /// A socket that took nothing for `limits.write_timeout_ms` (slow consumer).
    WriteTimeout,
}

impl LimitKind {
    /// Every kind, in index order.
    pub const ALL: [LimitKind; 12] = [
        LimitKind::Connections,
        LimitKind::ConnectionsPerUser,
        LimitKind::ConnectionsPerIp,
        LimitKind::Subscriptions,
        LimitKind::CommandRate,
        LimitKind::MessageSize,
        LimitKind::PublicationSize,
        LimitKind::BodySize,
        LimitKind::BatchSize,
        LimitKind::Queue,
        LimitKind::SlowConsumer,
        LimitKind::WriteTimeout,
    ];

    /// The label value.
    pub fn name(self) -> &'static str {
        match self {
            LimitKind::Connections => "connections",
            LimitKind::ConnectionsPerUser => "connections_per_user",
            LimitKind::ConnectionsPerIp => "connections_per_ip",
            LimitKind::Subscriptions => "subscriptions",
            LimitKind::CommandRate => "command_rate",
            LimitKind::MessageSize => "message_size",
            LimitKind::PublicationSize => "publication_size",
            LimitKind::BodySize => "body_size",
            LimitKind::BatchSize => "batch_size",
            LimitKind::Queue => "queue",
            LimitKind::SlowConsumer => "slow_consumer",
            LimitKind::WriteTimeout => "write_timeout",
        }
    }
}

/// Upper bounds of the queue-depth histogram buckets (messages taken by one writer flush).
pub const QUEUE_DEPTH_BUCKETS: [u64; 10] = [1, 2, 4, 8, 16, 64, 256, 1024, 4096, 16384];

/// Counters and gauges of one node. Every field is updated with relaxed atomics; the publish
/// path adds once per publication, not once per delivery.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Open client connections (every transport).
    pub connections: AtomicI64,
    /// Subscriptions held by connections (every transport).
    pub subscriptions: AtomicI64,
    /// Channels with at least one local subscriber.
    pub channels: AtomicI64,
    /// Connections accepted since start.
    pub connections_total: AtomicU64,
    /// Publications accepted from any source (HTTP API, client publish).
    pub publications_in: AtomicU64,
    /// Publications queued to subscribers (one per subscriber).
    pub deliveries_out: AtomicU64,
    /// Bytes written to client sockets.
    pub bytes_out: AtomicU64,
    /// Bytes queued to connections whose writer could write them but has not run yet: the
    /// node's own backlog (see [`crate::queue`]). Publishers wait while it is too large.
    pub backlog_bytes: AtomicI64,
    /// Publications refused with 503 because the backlog stayed too large.
    pub publish_overloaded: AtomicU64,
    /// Error replies and HTTP errors, by code (index of [`ErrorCode::ALL`]).
    pub errors: [AtomicU64; ErrorCode::ALL.len()],
    /// Server-initiated disconnects, by close code (index of [`CloseCode::ALL`]).
    pub disconnects: [AtomicU64; CloseCode::ALL.len()],
    /// Limit hits, by kind (index of [`LimitKind::ALL`]).
    pub limit_hits: [AtomicU64; 12],
    /// Connections that went behind their soft queue bound and caught up within the grace.
    pub slow_recoveries: AtomicU64,
    /// Times the broker could not fill a gap in a channel's publications from history and the
    /// channel's local subscribers were told to recover (4008).
    pub broker_channels_lost: AtomicU64,
    /// Times the broker's subscription connection came back after being lost.
    pub broker_reconnects: AtomicU64,
    /// Bytes of publication frames alive in connection queues, each shared frame counted once.
    pub shared_frame_bytes: AtomicI64,
    /// Pending publications replaced by a newer one on conflated channels.
    pub conflated_drops: AtomicU64,
    /// Writer flushes by messages taken at once (cumulative buckets are computed at render).
    pub queue_depth: [AtomicU64; 11],
    /// Sum of messages taken by writer flushes.
    pub queue_depth_sum: AtomicU64,
}

impl Metrics {
    /// Counts one error answered with `code`.
    pub fn error(&self, code: ErrorCode) {
        self.errors[code.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one disconnect with `code`.
    pub fn disconnect(&self, code: CloseCode) {
        self.disconnects[code.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one hit of a limit.
    pub fn limit(&self, kind: LimitKind) {
        self.limit_hits[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Records one writer flush that took `messages` messages from its queue.
    pub fn observe_queue_depth(&self, messages: usize) {
        let m = messages as u64;
        let i =
            QUEUE_DEPTH_BUCKETS.iter().position(|b| m <= *b).unwrap_or(QUEUE_DEPTH_BUCKETS.len());
        self.queue_depth[i].fetch_add(1, Ordering::Relaxed);
        self.queue_depth_sum.fetch_add(m, Ordering::Relaxed);
    }

    /// Renders every metric in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut out = String::with_capacity(2048);
        let g = |v: &AtomicI64| v.load(Ordering::Relaxed);
        let c = |v: &AtomicU64| v.load(Ordering::Relaxed);
        let mut metric = |name: &str, kind: &str, help: &str, value: String| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
        };
        metric(
            "herald_connections",
            "gauge",
            "Open client connections.",
            g(&self.connections).to_string(),
        );
        metric(
            "herald_subscriptions",
            "gauge",
            "Subscriptions held by connections.",
            g(&self.subscriptions).to_string(),
        );
        metric(
            "herald_channels",
            "gauge",
            "Channels with local subscribers.",
            g(&self.channels).to_string(),
        );
        metric(
            "herald_connections_total",
            "counter",
            "Connections accepted.",
            c(&self.connections_total).to_string(),
        );
        metric(
            "herald_publications_total",
            "counter",
            "Publications accepted.",
            c(&self.publications_in).to_string(),
        );
        metric(
            "herald_deliveries_total",
            "counter",
            "Publications queued to subscribers.",
            c(&self.deliveries_out).to_string(),
        );
        metric(
            "herald_bytes_out_total",
            "counter",
            "Bytes written to client sockets.",
            c(&self.bytes_out).to_string(),
        );
        metric(
            "herald_backlog_bytes",
            "gauge",
            "Bytes queued for connections whose socket can take them, waiting for CPU.",
            g(&self.backlog_bytes).max(0).to_string(),
        );
        metric(
            "herald_publish_overloaded_total",
            "counter",
            "Publications refused with 503 while the node's backlog stayed above its limit.",
            c(&self.publish_overloaded).to_string(),
        );
        metric(
            "herald_broker_channels_lost_total",
            "counter",
            "Gaps the broker could not fill from history: the channel's subscribers on this node were cut with 4008 to recover.",
            c(&self.broker_channels_lost).to_string(),
        );
        metric(
            "herald_broker_reconnects_total",
            "counter",
            "Times the broker's pub/sub connection came back after being lost (channels without history may have lost publications meanwhile).",
            c(&self.broker_reconnects).to_string(),
        );
        metric(
            "herald_slow_recoveries_total",
            "counter",
            "Connections that fell behind their soft queue bound and caught up within the grace.",
            c(&self.slow_recoveries).to_string(),
        );
        metric(
            "herald_shared_frame_bytes",
            "gauge",
            "Bytes of encoded publications held by connection queues, each counted once per node.",
            g(&self.shared_frame_bytes).max(0).to_string(),
        );
        let _ = writeln!(out, "# HELP herald_errors_total Errors answered, by code.\n# TYPE herald_errors_total counter");
        for code in ErrorCode::ALL {
            let _ = writeln!(
                out,
                "herald_errors_total{{code=\"{code}\"}} {}",
                c(&self.errors[code.index()])
            );
        }
        let _ = writeln!(out, "# HELP herald_disconnects_total Server-initiated disconnects, by close code.\n# TYPE herald_disconnects_total counter");
        for code in CloseCode::ALL {
            let _ = writeln!(
                out,
                "herald_disconnects_total{{code=\"{code}\"}} {}",
                c(&self.disconnects[code.index()])
            );
        }
        let _ = writeln!(out, "# HELP herald_limit_hits_total Requests refused by a limit, by kind.\n# TYPE herald_limit_hits_total counter");
        for kind in LimitKind::ALL {
            let _ = writeln!(
                out,
                "herald_limit_hits_total{{kind=\"{}\"}} {}",
                kind.name(),
                c(&self.limit_hits[kind as usize])
            );
        }
        let _ = writeln!(out, "# HELP herald_conflated_drops_total Pending publications replaced by a newer one on conflated channels.\n# TYPE herald_conflated_drops_total counter\nherald_conflated_drops_total {}", c(&self.conflated_drops));
        let _ = writeln!(out, "# HELP herald_queue_depth Messages a connection writer found queued per flush.\n# TYPE herald_queue_depth histogram");
        let mut cumulative = 0;
        for (i, bound) in QUEUE_DEPTH_BUCKETS.iter().enumerate() {
            cumulative += c(&self.queue_depth[i]);
            let _ = writeln!(out, "herald_queue_depth_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        cumulative += c(&self.queue_depth[QUEUE_DEPTH_BUCKETS.len()]);
        let _ = writeln!(out, "herald_queue_depth_bucket{{le=\"+Inf\"}} {cumulative}");
        let _ = writeln!(
            out,
            "herald_queue_depth_sum {}\nherald_queue_depth_count {cumulative}",
            c(&self.queue_depth_sum)
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters() {
        let m = Metrics::default();
        m.error(ErrorCode::TooLarge);
        m.disconnect(CloseCode::SlowConsumer);
        m.deliveries_out.fetch_add(7, Ordering::Relaxed);
        let text = m.render();
        assert!(text.contains("herald_errors_total{code=\"413\"} 1"));
        assert!(text.contains("herald_disconnects_total{code=\"4008\"} 1"));
        assert!(text.contains("herald_deliveries_total 7"));
        assert!(text.contains("herald_backlog_bytes 0"));
        assert!(text.contains("herald_publish_overloaded_total 0"));
    }
}
