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

pub mod history;
pub mod memory;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use herald_protocol::{ChannelName, StreamPosition};

pub use memory::MemoryBroker;

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

/// Receives what the broker delivers to this node. Implemented by the hub.
pub trait BrokerHandler: Send + Sync + 'static {
    /// A publication of `channel`. Called in offset order per channel, never concurrently for the
    /// same channel. Must not block: it only queues bytes.
    fn handle_publication(&self, channel: &ChannelName, publication: &Publication);
}

/// Carries publications between publishers and the nodes that have subscribers.
#[async_trait::async_trait]
pub trait Broker: Send + Sync + 'static {
    /// A short name for logs and `/api/info` (`memory`, `redis`, `nats`).
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

    /// This node now has subscribers of `channel`: deliver its publications here.
    async fn subscribe(&self, channel: &ChannelName) -> Result<(), BrokerError>;

    /// This node no longer has subscribers of `channel`.
    async fn unsubscribe(&self, channel: &ChannelName) -> Result<(), BrokerError>;

    /// Reads the channel's history: its current position (offset of its newest publication, 0
    /// before the first) and the retained publications `query` asks for, oldest first. Where
    /// the channel keeps no history the page has no position and no publications.
    async fn history(
        &self,
        channel: &ChannelName,
        options: &PublishOptions,
        query: &HistoryQuery,
    ) -> Result<HistoryPage, BrokerError>;

    /// What the broker retains, for metrics.
    fn history_stats(&self) -> HistoryStats {
        HistoryStats::default()
    }

    /// True once the broker can deliver (connected).
    fn is_ready(&self) -> bool;
}

impl std::fmt::Debug for dyn Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Broker({})", self.name())
    }
}
