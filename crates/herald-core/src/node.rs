//! What every connection of a node shares, and the publish path used by every source.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use herald_broker::{Broker, BrokerError};
use herald_protocol::{ChannelName, ErrorCode, StreamPosition};

use crate::hub::{Hub, Sink};
use crate::metrics::Metrics;
use crate::options::{ChannelOptions, Namespaces};
use crate::session::TokenVerifier;

/// Limits every connection and publication of the node obeys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// One inbound WebSocket message; beyond: close 4009.
    pub max_message_bytes: usize,
    /// `data` of one publication from any source; beyond: 413.
    pub max_publication_bytes: usize,
    /// A connection's pending outbound bytes; beyond: 4008.
    pub max_queue_bytes: usize,
    /// The node's backlog (bytes queued for writers that could write) above which publishers
    /// wait: the node is saturated and slows its publishers instead of queueing without bound.
    pub max_backlog_bytes: usize,
    /// How long a publish waits for the backlog to shrink before failing with 503.
    pub publish_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: 65536,
            max_publication_bytes: 1 << 20,
            max_queue_bytes: 1 << 20,
            max_backlog_bytes: 64 << 20,
            publish_timeout: Duration::from_secs(2),
        }
    }
}

/// Why a publication was refused.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PublishError {
    /// The channel's namespace is not configured.
    #[error("unknown namespace {0:?}")]
    UnknownNamespace(String),
    /// `data` is larger than `limits.max_publication_bytes`.
    #[error("data is {size} bytes, the limit is {limit}")]
    TooLarge {
        /// Size of the refused data.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// The node stayed saturated for the whole publish timeout; retry later.
    #[error("node overloaded: fan-out backlog stayed above the limit; retry later")]
    Overloaded,
    /// The broker could not take it.
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

impl PublishError {
    /// The reply / HTTP code for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            PublishError::UnknownNamespace(_) => ErrorCode::UnknownNamespace,
            PublishError::TooLarge { .. } => ErrorCode::TooLarge,
            PublishError::Overloaded => ErrorCode::Unavailable,
            PublishError::Broker(BrokerError::Unavailable(_)) => ErrorCode::Unavailable,
            PublishError::Broker(BrokerError::Backend(_)) => ErrorCode::Internal,
        }
    }
}

/// Authentication settings of the node.
#[derive(Clone)]
pub struct AuthSettings {
    /// Connections without a token are allowed.
    pub allow_anonymous: bool,
    /// Verifies connection tokens; `None` when no secret is configured (every token is refused).
    pub verifier: Option<Arc<dyn TokenVerifier>>,
}

impl std::fmt::Debug for AuthSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthSettings")
            .field("allow_anonymous", &self.allow_anonymous)
            .field("verifier", &self.verifier.is_some())
            .finish()
    }
}

/// One Herald node: hub, broker, options, limits and metrics, shared by every connection.
#[derive(Debug)]
pub struct Node {
    /// This node's id, in `/api/info` and client ids.
    pub id: String,
    /// Local subscribers and fan-out.
    pub hub: Arc<Hub>,
    /// Where publications go and come from.
    pub broker: Arc<dyn Broker>,
    /// Channel options by namespace.
    pub namespaces: Namespaces,
    /// Limits.
    pub limits: Limits,
    /// Interval of `ping` pushes.
    pub ping_interval: Duration,
    /// Authentication settings.
    pub auth: AuthSettings,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Every open connection, to disconnect them on request.
    pub registry: Registry,
    next_connection: AtomicU64,
}

/// Which connections a disconnect request targets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Every connection.
    All,
    /// The connections authenticated as this user.
    User(String),
}

/// The open connections of a node (any transport), sharded by id.
#[derive(Debug)]
pub struct Registry {
    shards: Box<[parking_lot::Mutex<std::collections::HashMap<u64, (Option<Arc<str>>, Sink)>>]>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry { shards: (0..16).map(|_| Default::default()).collect() }
    }
}

impl Registry {
    fn shard(
        &self,
        id: u64,
    ) -> &parking_lot::Mutex<std::collections::HashMap<u64, (Option<Arc<str>>, Sink)>> {
        &self.shards[(id % self.shards.len() as u64) as usize]
    }

    /// Records connection `id` of `user`, reachable through `sink`.
    pub fn register(&self, id: u64, user: Option<&str>, sink: Sink) {
        self.shard(id).lock().insert(id, (user.map(Arc::from), sink));
    }

    /// Records that connection `id` (re)authenticated as `user`.
    pub fn set_user(&self, id: u64, user: &str) {
        if let Some(entry) = self.shard(id).lock().get_mut(&id) {
            entry.0 = Some(Arc::from(user));
        }
    }

    /// Forgets connection `id`.
    pub fn unregister(&self, id: u64) {
        self.shard(id).lock().remove(&id);
    }

    /// Asks every targeted connection to close with `code`; returns how many.
    pub fn disconnect(&self, target: &Target, code: herald_protocol::CloseCode) -> usize {
        let mut n = 0;
        for shard in self.shards.iter() {
            for (user, sink) in shard.lock().values() {
                let hit = match target {
                    Target::All => true,
                    Target::User(u) => user.as_deref() == Some(u.as_str()),
                };
                if hit {
                    sink.request_close(code);
                    n += 1;
                }
            }
        }
        n
    }
}

impl Node {
    /// A node; call [`Node::start`] before serving.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: String,
        broker: Arc<dyn Broker>,
        namespaces: Namespaces,
        limits: Limits,
        ping_interval: Duration,
        auth: AuthSettings,
    ) -> Self {
        let metrics = Arc::new(Metrics::default());
        Node {
            id,
            hub: Arc::new(Hub::new(metrics.clone())),
            broker,
            namespaces,
            limits,
            ping_interval,
            auth,
            metrics,
            registry: Registry::default(),
            next_connection: AtomicU64::new(1),
        }
    }

    /// Connects the hub to the broker.
    pub async fn start(&self) -> Result<(), BrokerError> {
        self.broker.start(self.hub.clone()).await
    }

    /// A fresh connection id, unique within the node.
    pub fn next_connection_id(&self) -> u64 {
        self.next_connection.fetch_add(1, Ordering::Relaxed)
    }

    /// The options of `channel`, or an error when its namespace is unknown.
    pub fn options(&self, channel: &ChannelName) -> Result<&ChannelOptions, PublishError> {
        self.namespaces.resolve(channel).ok_or_else(|| {
            PublishError::UnknownNamespace(channel.namespace().unwrap_or_default().to_string())
        })
    }

    /// True while the fan-out backlog is above `limits.max_backlog_bytes`.
    pub fn is_saturated(&self) -> bool {
        self.metrics.backlog_bytes.load(Ordering::Relaxed) > self.limits.max_backlog_bytes as i64
    }

    /// Waits, bounded by `limits.publish_timeout`, while the node is saturated.
    async fn wait_for_backlog(&self) -> Result<(), PublishError> {
        if !self.is_saturated() {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + self.limits.publish_timeout;
        while self.is_saturated() {
            if tokio::time::Instant::now() >= deadline {
                self.metrics.publish_overloaded.fetch_add(1, Ordering::Relaxed);
                return Err(PublishError::Overloaded);
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(())
    }

    /// Publishes `data` (raw JSON text) into `channel`, from any source. Returns the position
    /// where the channel keeps history.
    pub async fn publish(
        &self,
        channel: &ChannelName,
        data: Bytes,
    ) -> Result<Option<StreamPosition>, PublishError> {
        let options = self.options(channel)?;
        if data.len() > self.limits.max_publication_bytes {
            return Err(PublishError::TooLarge {
                size: data.len(),
                limit: self.limits.max_publication_bytes,
            });
        }
        self.wait_for_backlog().await?;
        let position = self.broker.publish(channel, data, &options.publish_options()).await?;
        self.metrics.publications_in.fetch_add(1, Ordering::Relaxed);
        Ok(position)
    }
}
