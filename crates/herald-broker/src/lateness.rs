//! What the networked brokers share about time: the wall clock their messages carry, a
//! monotonic clock for deadlines, and the rule that makes a node *behind* when its own
//! publications come back from the broker late ([`crate::Broker::is_behind`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// A node whose own publications come back later than this is behind.
const BEHIND_LAG_MS: u64 = 50;
/// How long one late publication keeps the node behind (renewed by each late one).
const BEHIND_HOLD_MS: u64 = 100;

/// Milliseconds since the Unix epoch (the time a node stamps on what it publishes).
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Milliseconds on a clock that never goes back (counted from its first use in this process):
/// for deadlines that a wall-clock step must not stretch.
pub(crate) fn monotonic_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Whether this node's own publications come back late (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct Lateness {
    /// Until when (on [`monotonic_ms`]) the node counts as behind.
    until: AtomicU64,
}

impl Lateness {
    /// One of this node's own publications, sent at `sent_ms` (its wall clock), is back now.
    pub(crate) fn returned(&self, sent_ms: u64) {
        if now_ms().saturating_sub(sent_ms) > BEHIND_LAG_MS {
            self.until.store(monotonic_ms() + BEHIND_HOLD_MS, Ordering::Relaxed);
        }
    }

    /// True while a late publication came back within the hold.
    pub(crate) fn is_behind(&self) -> bool {
        monotonic_ms() < self.until.load(Ordering::Relaxed)
    }
}

/// A broker URL without its password, for logs.
pub(crate) fn without_password(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}
