//! Node counters, kept as relaxed atomics and rendered as Prometheus text by the server.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use herald_protocol::{CloseCode, ErrorCode};

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
    pub errors: [AtomicU64; 9],
    /// Server-initiated disconnects, by close code (index of [`CloseCode::ALL`]).
    pub disconnects: [AtomicU64; 9],
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
    }
}
