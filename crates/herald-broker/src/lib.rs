//! Brokers: how publications reach every node that has subscribers.
//!
//! A [`Broker`] assigns stream positions (offset within an epoch) to publications of channels that
//! keep history, and delivers every publication to the node's [`BrokerHandler`] (the hub), in
//! offset order per channel. One node runs on the [`MemoryBroker`]; a cluster shares channels
//! through a real broker (Redis, NATS) behind the same trait, so transports never change.
//!
//! Ordering and atomicity, which every backend guarantees:
//! - publications of one channel reach the handler in the order of their offsets, one at a time;
//! - [`Broker::publish`] returns only after the publication has a position, and the handler of
//!   this node sees it no earlier than it was assigned;
//! - [`Broker::history`] returns a position no older than every publication the handler has
//!   already been given for that channel, and the retained publications up to that position.
//!
//! Reads never create state: [`Broker::history`] and [`Broker::subscribe`] of a channel nobody
//! published to within its TTL keep nothing, so reading a million fresh names costs nothing
//! after the reads. Such a read reports offset 0 in an epoch of the backend's choosing (the
//! memory broker: a [`history::VoidEpoch`] recording the read's time), and the `complete` rule
//! stays exact for that position: a later read with it as `since` is complete exactly when the
//! backend can prove nothing was published after it and lost (see `docs/architecture.md`,
//! "History").
//!
//! History replies are bounded: [`Broker::history_page`] cuts a read to [`PageBounds`] (a count
//! and a byte budget), keeping at least one publication, and says whether it cut
//! ([`HistoryPage::more`]).

pub mod history;
mod io_thread;
mod lateness;
pub mod memory;
pub mod nats;
pub mod redis;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use herald_protocol::{ChannelName, StreamPosition};

pub use memory::MemoryBroker;
pub use nats::NatsBroker;
pub use redis::{RedisBroker, RedisTls};

/// One publication as the broker delivers it.
#[derive(Debug, Clone)]
pub struct Publication {
    /// Offset within the channel's epoch; `None` in channels without history.
    pub offset: Option<u64>,
    /// The epoch of `offset`; `None` in channels without history.
    pub epoch: Option<Arc<str>>,
    /// The publication's `data`: raw JSON text.
    pub data: Bytes,
}

/// What the broker needs to know about the channel a publication goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishOptions {
    /// Publications kept per channel; 0 = no history, no offsets.
    pub history_size: usize,
    /// A channel idle for longer loses its history; its next publication starts a new epoch.
    pub history_ttl: Duration,
}

/// Which publications a history read wants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HistoryQuery {
    /// Publications after this position (paging forward / recovery); `None`: the newest ones.
    pub since: Option<StreamPosition>,
    /// At most this many (`None`: every retained one; `Some(0)`: only the position).
    pub limit: Option<usize>,
}

/// The answer to a history read.
#[derive(Debug, Clone, Default)]
pub struct HistoryPage {
    /// The channel's current position; `None` where the channel keeps no history.
    pub position: Option<StreamPosition>,
    /// Retained publications, oldest first.
    pub publications: Vec<Publication>,
    /// With `since`: true exactly when nothing after it is missing (same epoch, history reaches
    /// back far enough), whatever `limit` cut. Without `since`: false.
    pub complete: bool,
    /// [`Broker::history_page`] cut the page to its [`PageBounds`]: more publications are due
    /// than it holds (with `since`: after its last one; without: before its first one).
    pub more: bool,
}

/// The most one history page may hold: a reply to op `history` or `GET /api/history`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageBounds {
    /// Publications per page (at least 1 is used).
    pub max_publications: usize,
    /// Sum of the publications' `data` bytes per page; a single publication larger than this
    /// still makes a page of its own.
    pub max_bytes: usize,
}

impl HistoryPage {
    /// Cuts the page to `bounds` (a page holds at least one publication if it had any): with
    /// `from_oldest`, the first publications that fit (paging forward after `since`),
    /// otherwise the newest that fit. Sets [`HistoryPage::more`] when anything was cut.
    pub fn bound(&mut self, from_oldest: bool, bounds: PageBounds) {
        let len = self.publications.len();
        let mut used = 0usize;
        let mut fit = 0usize;
        let max = bounds.max_publications.max(1);
        for i in 0..len {
            let p =
                if from_oldest { &self.publications[i] } else { &self.publications[len - 1 - i] };
            used = used.saturating_add(p.data.len());
            if fit >= max || (fit > 0 && used > bounds.max_bytes) {
                break;
            }
            fit += 1;
        }
        if fit < len {
            self.more = true;
            if from_oldest {
                self.publications.truncate(fit);
            } else {
                self.publications.drain(..len - fit);
            }
        }
    }
}

/// How much history a broker retains (for metrics and sizing).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HistoryStats {
    /// Channels with stream state.
    pub streams: u64,
    /// Publications retained.
    pub publications: u64,
    /// Bytes of `data` retained.
    pub bytes: u64,
}

/// Why a broker call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    /// The broker is not connected or not started.
    #[error("broker unavailable: {0}")]
    Unavailable(&'static str),
    /// The backend answered with an error.
    #[error("broker backend error: {0}")]
    Backend(String),
}

/// Receives control messages from other nodes ([`Broker::send_control`]).
pub type ControlHandler = Arc<dyn Fn(&[u8]) + Send + Sync>;

/// Receives what the broker delivers to this node. Implemented by the hub.
pub trait BrokerHandler: Send + Sync + 'static {
    /// A publication of `channel`. Called in offset order per channel, never concurrently for the
    /// same channel. Must not block: it only queues bytes.
    fn handle_publication(&self, channel: &ChannelName, publication: &Publication);

    /// True while this node has local subscribers of `channel` (live or joining). A broker that
    /// subscribes remotely asks it to bring its subscription in line with the hub's.
    fn has_subscribers(&self, channel: &ChannelName) -> bool;

    /// Publications of `channel` were lost on their way to this node and history cannot fill
    /// the gap: the channel's local subscribers must recover by themselves. Default: nothing
    /// (a backend that cannot lose never calls it).
    fn channel_lost(&self, _channel: &ChannelName) {}

    /// The broker's subscription connection was lost and is back (channels with history were
    /// caught up; those without may have lost publications meanwhile). Default: nothing.
    fn reconnected(&self) {}
}

/// Carries publications between publishers and the nodes that have subscribers.
#[async_trait::async_trait]
pub trait Broker: Send + Sync + 'static {
    /// A short name for logs and `/api/info` (`memory`, `redis`, `redis-cluster`, `nats`).
    fn name(&self) -> &'static str;

    /// Starts delivering to `handler`. Called once, before any other call.
    async fn start(&self, handler: Arc<dyn BrokerHandler>) -> Result<(), BrokerError>;

    /// Publishes `data` (raw JSON text) into `channel`; returns its position where the channel
    /// keeps history (`options.history_size > 0`).
    async fn publish(
        &self,
        channel: &ChannelName,
        data: Bytes,
        options: &PublishOptions,
    ) -> Result<Option<StreamPosition>, BrokerError>;

    /// Publishes several publications, in their order (a batch): the same as [`Broker::publish`]
    /// for each, one result per item. A channel's publications keep their order. The default
    /// hands them all to [`Broker::publish`] at once; a networked backend may group them.
    async fn publish_many(
        &self,
        items: Vec<(ChannelName, Bytes, PublishOptions)>,
    ) -> Vec<Result<Option<StreamPosition>, BrokerError>> {
        let publishes = items.into_iter().map(|(channel, data, options)| async move {
            self.publish(&channel, data, &options).await
        });
        futures_util::future::join_all(publishes).await
    }

    /// A subscriber of `channel` joins this node: returns once every publication of `channel`
    /// from now on reaches this node's handler. Called for every joining subscriber (not only
    /// the first), after the hub registered it, so that its history read cannot miss a
    /// publication that the node's remote subscription, still being set up, would. Creates no
    /// stream state.
    async fn subscribe(&self, channel: &ChannelName) -> Result<(), BrokerError>;

    /// The last local subscriber of `channel` left (the hub says so). A backend that subscribes
    /// remotely reconciles with [`BrokerHandler::has_subscribers`] in the order of the calls,
    /// so a subscribe and an unsubscribe racing each other leave the node subscribed exactly
    /// when the hub has subscribers.
    async fn unsubscribe(&self, channel: &ChannelName) -> Result<(), BrokerError>;

    /// Reads the channel's history: its current position (offset of its newest publication, 0
    /// before the first) and the retained publications `query` asks for, oldest first. Where
    /// the channel keeps no history the page has no position and no publications. Creates no
    /// state: a channel without a stream (nothing published within its TTL) reports offset 0
    /// in an epoch that no stream has, and a later read with that position as `since` is
    /// `complete` only if nothing published since can have been lost.
    async fn history(
        &self,
        channel: &ChannelName,
        options: &PublishOptions,
        query: &HistoryQuery,
    ) -> Result<HistoryPage, BrokerError>;

    /// [`Broker::history`] cut to `bounds`: at most `bounds.max_publications` (and at most
    /// `query.limit`), at most `bounds.max_bytes` of `data` but at least one publication if any
    /// is due; with `since` the first that fit, without the newest. [`HistoryPage::more`] says
    /// whether the bounds (not `query.limit`) cut anything. The default reads one publication
    /// more than the bound to know.
    async fn history_page(
        &self,
        channel: &ChannelName,
        options: &PublishOptions,
        query: &HistoryQuery,
        bounds: PageBounds,
    ) -> Result<HistoryPage, BrokerError> {
        let asked = query.limit.unwrap_or(usize::MAX);
        let max = bounds.max_publications.max(1);
        let read = HistoryQuery {
            since: query.since.clone(),
            limit: Some(asked.min(max.saturating_add(1))),
        };
        let mut page = self.history(channel, options, &read).await?;
        page.bound(query.since.is_some(), bounds);
        Ok(page)
    }

    /// Announces node `id` to the cluster: `info` (a JSON object describing it) is listed by
    /// [`Broker::nodes`] on every node for `ttl`, unless announced again. Default: nothing (a
    /// backend without a cluster).
    async fn announce(&self, _id: &str, _info: Bytes, _ttl: Duration) -> Result<(), BrokerError> {
        Ok(())
    }

    /// Every node announced and still alive, as `(id, info)`; `None` where the backend has no
    /// cluster (the node is alone).
    async fn nodes(&self) -> Result<Option<Vec<(String, Bytes)>>, BrokerError> {
        Ok(None)
    }

    /// Sends `message` to the control handler of every other node of the cluster
    /// ([`Broker::set_control`]); the caller applies it on its own node. Default: nothing (no
    /// other node).
    async fn send_control(&self, _message: Bytes) -> Result<(), BrokerError> {
        Ok(())
    }

    /// Sets the function the control messages of other nodes are given to (cluster-wide
    /// actions such as a disconnect by user). Default: nothing arrives.
    fn set_control(&self, _handler: ControlHandler) {}

    /// What the broker retains, for metrics.
    fn history_stats(&self) -> HistoryStats {
        HistoryStats::default()
    }

    /// True while publications reach this node's hub late: the broker's delivery to this node
    /// lags behind what publishers hand it (its own publications come back late). The node
    /// then slows its publishers as when its own queues are full: through a broker, a publish
    /// returns before any node fanned it out, so the queues alone do not show the load.
    /// Default: never (the memory broker fans out within the publish).
    fn is_behind(&self) -> bool {
        false
    }

    /// True once the broker can deliver (connected).
    fn is_ready(&self) -> bool;
}

impl std::fmt::Debug for dyn Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Broker({})", self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_bounded_by_count_and_bytes_keeping_at_least_one() {
        // (sizes of data, from_oldest, max publications, max bytes, kept offsets, more)
        type Case = (&'static [usize], bool, usize, usize, &'static [u64], bool);
        let cases: [Case; 9] = [
            (&[], true, 10, 100, &[], false),
            (&[10, 10, 10], true, 10, 100, &[1, 2, 3], false),
            (&[10, 10, 10], true, 2, 100, &[1, 2], true),
            (&[10, 10, 10], false, 2, 100, &[2, 3], true),
            (&[40, 40, 40], true, 10, 100, &[1, 2], true),
            (&[40, 40, 40], false, 10, 100, &[2, 3], true),
            (&[500, 10], true, 10, 100, &[1], true),
            (&[10, 500], false, 10, 100, &[2], true),
            (&[10, 10], true, 0, 100, &[1], true),
        ];
        for (sizes, from_oldest, max_publications, max_bytes, kept, more) in cases {
            let mut page = HistoryPage {
                publications: sizes
                    .iter()
                    .enumerate()
                    .map(|(i, &n)| Publication {
                        offset: Some(i as u64 + 1),
                        epoch: None,
                        data: Bytes::from(vec![b'1'; n]),
                    })
                    .collect(),
                ..HistoryPage::default()
            };
            page.bound(from_oldest, PageBounds { max_publications, max_bytes });
            let got: Vec<u64> = page.publications.iter().filter_map(|p| p.offset).collect();
            assert_eq!((got.as_slice(), page.more), (kept, more), "{sizes:?} {from_oldest}");
        }
    }
}
