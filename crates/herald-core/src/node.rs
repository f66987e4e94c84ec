//! What every connection of a node shares, and the publish path used by every source.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use herald_broker::{Broker, BrokerError};
use herald_protocol::{ChannelName, ErrorCode, StreamPosition};

use crate::auth::TokenVerifier;
use crate::hub::{Hub, Sink};
use crate::metrics::{LimitKind, Metrics};
use crate::options::{ChannelOptions, Namespaces};

/// Limits every connection and publication of the node obeys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// One inbound WebSocket message; beyond: close 4009.
    pub max_message_bytes: usize,
    /// `data` of one publication from any source; beyond: 413.
    pub max_publication_bytes: usize,
    /// A connection's pending outbound bytes above which it is behind: it is cut with 4008 when
    /// it stays behind for `slow_consumer_grace` without draining (see [`crate::queue`]).
    pub max_queue_bytes: usize,
    /// A connection's pending outbound bytes that no push may exceed; beyond: 4008 at once.
    pub max_queue_burst_bytes: usize,
    /// How long a connection may stay behind its queue bound without net progress.
    pub slow_consumer_grace: Duration,
    /// How long a connection's socket may take no byte while there is something to write.
    pub write_timeout: Duration,
    /// The node's backlog (bytes queued for writers that could write) above which publishers
    /// wait: the node is saturated and slows its publishers instead of queueing without bound.
    pub max_backlog_bytes: usize,
    /// How long a publish waits for the backlog to shrink before failing with 503.
    pub publish_timeout: Duration,
    /// A connection's queued outbound messages above which it is behind (8 times as many are
    /// never exceeded).
    pub max_queue_messages: usize,
    /// Subscriptions one connection may hold (SSE: channels per stream); beyond: 429.
    pub max_subscriptions_per_connection: usize,
    /// Open connections on the node (every transport); beyond: 4029 (SSE: HTTP 429).
    pub max_connections: usize,
    /// Open connections of one user; 0 = no limit; beyond: 4029.
    pub max_connections_per_user: usize,
    /// Open connections from one IP address; 0 = no limit; beyond: 4029.
    pub max_connections_per_ip: usize,
    /// Commands per second one connection may send (sustained); beyond: 429 replies.
    pub command_rate: u32,
    /// Commands one connection may send in a burst above the rate.
    pub command_burst: u32,
    /// Publications in one `POST /api/batch`; beyond: 413.
    pub max_batch_publications: usize,
    /// Publications in one history page (op `history`, `GET /api/history`); a larger `limit`
    /// gets this many and `more: true`.
    pub max_history_page: usize,
    /// `data` bytes in one history page (at least one publication is always returned); over
    /// WebSocket also at most half of `max_queue_bytes`, so a page leaves room in the queue.
    pub max_history_page_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: 65536,
            max_publication_bytes: 1 << 20,
            max_queue_bytes: 1 << 20,
            max_queue_burst_bytes: 32 << 20,
            slow_consumer_grace: Duration::from_secs(3),
            write_timeout: Duration::from_secs(30),
            max_backlog_bytes: 256 << 20,
            publish_timeout: Duration::from_secs(2),
            max_queue_messages: 16384,
            max_subscriptions_per_connection: 1024,
            max_connections: 1_000_000,
            max_connections_per_user: 0,
            max_connections_per_ip: 0,
            command_rate: 1000,
            command_burst: 2000,
            max_batch_publications: 10_000,
            max_history_page: 1000,
            max_history_page_bytes: 512 << 10,
        }
    }
}

impl Limits {
    /// The bounds of one connection's outbound queue.
    pub fn queue_limits(&self) -> crate::queue::QueueLimits {
        crate::queue::QueueLimits {
            soft_bytes: self.max_queue_bytes,
            hard_bytes: self.max_queue_burst_bytes.max(self.max_queue_bytes),
            soft_messages: self.max_queue_messages,
            hard_messages: self.max_queue_messages.saturating_mul(8),
            grace: self.slow_consumer_grace,
            write_timeout: self.write_timeout,
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

/// Why a connection was refused by a connection limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConnectionLimit {
    /// `limits.max_connections` on the node.
    #[error("the node holds its maximum of connections")]
    Node,
    /// `limits.max_connections_per_user`.
    #[error("this user holds its maximum of connections")]
    User,
    /// `limits.max_connections_per_ip`.
    #[error("this address holds its maximum of connections")]
    Ip,
}

impl ConnectionLimit {
    /// The limit as the metrics count it.
    pub fn kind(self) -> LimitKind {
        match self {
            ConnectionLimit::Node => LimitKind::Connections,
            ConnectionLimit::User => LimitKind::ConnectionsPerUser,
            ConnectionLimit::Ip => LimitKind::ConnectionsPerIp,
        }
    }
}

struct Registered {
    user: Option<Arc<str>>,
    ip: Option<std::net::IpAddr>,
    sink: Sink,
    /// When the connection's token stops being valid (see
    /// [`VerifiedToken::expires_at`](crate::auth::VerifiedToken::expires_at)).
    expires_at: Option<SystemTime>,
}

impl std::fmt::Debug for Registered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registered").field("user", &self.user).field("ip", &self.ip).finish()
    }
}

/// The open connections of a node (any transport), sharded by id, with the per-user and per-IP
/// counts the connection limits need and the expiry of each connection's token.
///
/// Token expiry is enforced here, for every transport alike: the expiries are kept ordered by
/// `(instant, id)`, and [`Registry::expire`] (called every few hundred milliseconds by a task of
/// the server) asks each connection whose token has expired to close with 4012. A `refresh`
/// moves the connection's entry ([`Registry::set_expiry`]). Lock order: a shard, then the
/// expiries; [`Registry::expire`] never holds both.
#[derive(Debug)]
pub struct Registry {
    shards: Box<[parking_lot::Mutex<std::collections::HashMap<u64, Registered>>]>,
    counts: parking_lot::Mutex<Counts>,
    expiries: parking_lot::Mutex<BTreeSet<(SystemTime, u64)>>,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    users: std::collections::HashMap<Arc<str>, usize>,
    ips: std::collections::HashMap<std::net::IpAddr, usize>,
}

fn dec<K: std::hash::Hash + Eq>(map: &mut std::collections::HashMap<K, usize>, key: &K) {
    if let Some(n) = map.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            map.remove(key);
        }
    }
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            shards: (0..16).map(|_| Default::default()).collect(),
            counts: Default::default(),
            expiries: Default::default(),
        }
    }
}

impl Registry {
    fn shard(&self, id: u64) -> &parking_lot::Mutex<std::collections::HashMap<u64, Registered>> {
        &self.shards[(id % self.shards.len() as u64) as usize]
    }

    /// Records connection `id` of `user` from `ip`, reachable through `sink`, unless a
    /// connection limit of `limits` refuses it. `expires_at` is when its token expires (the
    /// connection is then closed with 4012); `None` for anonymous connections and tokens
    /// without `exp`.
    pub fn register(
        &self,
        id: u64,
        user: Option<&str>,
        expires_at: Option<SystemTime>,
        ip: Option<std::net::IpAddr>,
        sink: Sink,
        limits: &Limits,
    ) -> Result<(), ConnectionLimit> {
        let user: Option<Arc<str>> = user.map(Arc::from);
        {
            let mut counts = self.counts.lock();
            if counts.total >= limits.max_connections {
                return Err(ConnectionLimit::Node);
            }
            if let (Some(u), n) = (&user, limits.max_connections_per_user) {
                if n > 0 && counts.users.get(u).copied().unwrap_or(0) >= n {
                    return Err(ConnectionLimit::User);
                }
            }
            if let (Some(ip), n) = (ip, limits.max_connections_per_ip) {
                if n > 0 && counts.ips.get(&ip).copied().unwrap_or(0) >= n {
                    return Err(ConnectionLimit::Ip);
                }
            }
            counts.total += 1;
            if let Some(u) = &user {
                *counts.users.entry(u.clone()).or_default() += 1;
            }
            if let Some(ip) = ip {
                *counts.ips.entry(ip).or_default() += 1;
            }
        }
        let mut shard = self.shard(id).lock();
        if let Some(at) = expires_at {
            self.expiries.lock().insert((at, id));
        }
        shard.insert(id, Registered { user, ip, sink, expires_at });
        Ok(())
    }

    /// Sets when the token of connection `id` expires (`None`: never), after a `connect` or a
    /// `refresh`; the connection is closed with 4012 at that instant.
    pub fn set_expiry(&self, id: u64, expires_at: Option<SystemTime>) {
        let mut shard = self.shard(id).lock();
        let Some(entry) = shard.get_mut(&id) else { return };
        if entry.expires_at == expires_at {
            return;
        }
        let mut expiries = self.expiries.lock();
        if let Some(old) = entry.expires_at {
            expiries.remove(&(old, id));
        }
        if let Some(at) = expires_at {
            expiries.insert((at, id));
        }
        entry.expires_at = expires_at;
    }

    /// Asks every connection whose token expired at or before `now` to close with 4012
    /// ([`CloseCode::TokenExpired`](herald_protocol::CloseCode::TokenExpired)); returns how
    /// many. Costs one lock and one look at the earliest expiry when none is due.
    pub fn expire(&self, now: SystemTime) -> usize {
        let due = {
            let mut expiries = self.expiries.lock();
            match expiries.first() {
                Some((at, _)) if *at <= now => {}
                _ => return 0,
            }
            let later = expiries.split_off(&(now, u64::MAX));
            std::mem::replace(&mut *expiries, later)
        };
        let mut n = 0;
        for (at, id) in due {
            let mut shard = self.shard(id).lock();
            // A `refresh` may have moved the entry since it was taken out: only the expiry
            // still recorded for the connection counts.
            if let Some(entry) = shard.get_mut(&id) {
                if entry.expires_at == Some(at) {
                    entry.expires_at = None;
                    entry.sink.request_close(herald_protocol::CloseCode::TokenExpired);
                    n += 1;
                }
            }
        }
        n
    }

    /// Records that connection `id` authenticated as `user`, unless the user's connection
    /// limit refuses it.
    pub fn set_user(&self, id: u64, user: &str, limits: &Limits) -> Result<(), ConnectionLimit> {
        let mut shard = self.shard(id).lock();
        let Some(entry) = shard.get_mut(&id) else { return Ok(()) };
        let mut counts = self.counts.lock();
        let user: Arc<str> = Arc::from(user);
        if entry.user.as_deref() == Some(&*user) {
            return Ok(());
        }
        let n = limits.max_connections_per_user;
        if n > 0 && counts.users.get(&user).copied().unwrap_or(0) >= n {
            return Err(ConnectionLimit::User);
        }
        if let Some(old) = entry.user.take() {
            dec(&mut counts.users, &old);
        }
        *counts.users.entry(user.clone()).or_default() += 1;
        entry.user = Some(user);
        Ok(())
    }

    /// Forgets connection `id`.
    pub fn unregister(&self, id: u64) {
        let removed = self.shard(id).lock().remove(&id);
        if let Some(r) = removed {
            if let Some(at) = r.expires_at {
                self.expiries.lock().remove(&(at, id));
            }
            let mut counts = self.counts.lock();
            counts.total -= 1;
            if let Some(u) = &r.user {
                dec(&mut counts.users, u);
            }
            if let Some(ip) = &r.ip {
                dec(&mut counts.ips, ip);
            }
        }
    }

    /// Asks every targeted connection to close with `code`; returns how many.
    pub fn disconnect(&self, target: &Target, code: herald_protocol::CloseCode) -> usize {
        let mut n = 0;
        for shard in self.shards.iter() {
            for r in shard.lock().values() {
                let hit = match target {
                    Target::All => true,
                    Target::User(u) => r.user.as_deref() == Some(u.as_str()),
                };
                if hit {
                    r.sink.request_close(code);
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

    /// True while the fan-out backlog is above `limits.max_backlog_bytes`, or the broker
    /// delivers to this node late ([`Broker::is_behind`]).
    pub fn is_saturated(&self) -> bool {
        self.metrics.backlog_bytes.load(Ordering::Relaxed) > self.limits.max_backlog_bytes as i64
            || self.broker.is_behind()
    }

    /// Waits, bounded by `limits.publish_timeout`, while the node is saturated: its own backlog
    /// (bytes queued for writers that can write) is too large. Slow subscribers never make
    /// publishers wait, however many they are: they are judged by the slow-consumer rule.
    async fn wait_for_capacity(&self) -> Result<(), PublishError> {
        if !self.is_saturated() {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + self.limits.publish_timeout;
        let mut delay = Duration::from_micros(200);
        loop {
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(5));
            if !self.is_saturated() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                self.metrics.publish_overloaded.fetch_add(1, Ordering::Relaxed);
                return Err(PublishError::Overloaded);
            }
        }
    }

    /// Publishes several publications (a batch), in their order: one wait for capacity, then
    /// every publication handed to the broker at once, so a networked broker pipelines them
    /// (their commands leave in order, so a channel's publications keep the batch's order).
    /// One result per publication.
    pub async fn publish_many(
        &self,
        items: Vec<(ChannelName, Bytes)>,
    ) -> Vec<Result<Option<StreamPosition>, PublishError>> {
        let mut checked = Vec::with_capacity(items.len());
        for (channel, data) in items {
            let options = self.options(&channel).and_then(|o| {
                if data.len() > self.limits.max_publication_bytes {
                    self.metrics.limit(crate::metrics::LimitKind::PublicationSize);
                    return Err(PublishError::TooLarge {
                        size: data.len(),
                        limit: self.limits.max_publication_bytes,
                    });
                }
                Ok(o.publish_options())
            });
            checked.push((channel, data, options));
        }
        if checked.iter().any(|c| c.2.is_ok()) {
            if let Err(e) = self.wait_for_capacity().await {
                return checked
                    .into_iter()
                    .map(|(_, _, o)| o.and_then(|_| Err(e.clone())))
                    .collect();
            }
        }
        // The valid ones go to the broker together; the results are put back in item order.
        let mut valid = Vec::new();
        let mut results: Vec<Option<Result<Option<StreamPosition>, PublishError>>> = Vec::new();
        for (channel, data, options) in checked {
            match options {
                Ok(options) => {
                    valid.push((channel, data, options));
                    results.push(None);
                }
                Err(e) => results.push(Some(Err(e))),
            }
        }
        let mut published = self.broker.publish_many(valid).await.into_iter();
        results
            .into_iter()
            .map(|r| match r {
                Some(refused) => refused,
                None => {
                    let outcome = published
                        .next()
                        .unwrap_or(Err(BrokerError::Backend("a publication has no result".into())));
                    if outcome.is_ok() {
                        self.metrics.publications_in.fetch_add(1, Ordering::Relaxed);
                    }
                    outcome.map_err(PublishError::from)
                }
            })
            .collect()
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
            self.metrics.limit(crate::metrics::LimitKind::PublicationSize);
            return Err(PublishError::TooLarge {
                size: data.len(),
                limit: self.limits.max_publication_bytes,
            });
        }
        self.wait_for_capacity().await?;
        let position = self.broker.publish(channel, data, &options.publish_options()).await?;
        self.metrics.publications_in.fetch_add(1, Ordering::Relaxed);
        Ok(position)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod saturation_tests {
    use super::*;
    use crate::queue::Outbox;
    use herald_broker::MemoryBroker;

    fn node(limits: Limits) -> Node {
        let namespaces = Namespaces::new(ChannelOptions::default(), Default::default());
        let auth = AuthSettings { allow_anonymous: true, verifier: None };
        Node::new(
            "n".into(),
            Arc::new(MemoryBroker::new()),
            namespaces,
            limits,
            Duration::from_secs(25),
            auth,
        )
    }

    #[tokio::test]
    async fn publishers_wait_only_while_the_node_backlog_is_over_its_limit() {
        let limits = Limits {
            max_backlog_bytes: 1000,
            publish_timeout: Duration::from_millis(200),
            ..Limits::default()
        };
        let node = Arc::new(node(limits));
        node.start().await.unwrap();
        let c = ChannelName::parse("c").unwrap();
        assert!(node.publish(&c, Bytes::from_static(b"1")).await.is_ok());

        // A queue whose writer could write holds more than the limit: the node is saturated.
        let outbox = Outbox::new(1 << 20, 1000, node.metrics.clone());
        outbox.push(Bytes::from(vec![b'x'; 2000])).unwrap();
        let started = tokio::time::Instant::now();
        let refused = node.publish(&c, Bytes::from_static(b"2")).await;
        assert!(matches!(refused, Err(PublishError::Overloaded)), "{refused:?}");
        assert!(started.elapsed() >= Duration::from_millis(200), "it waited first");
        assert_eq!(node.metrics.publish_overloaded.load(Ordering::Relaxed), 1);

        // The same bytes queued to a writer whose socket is full are the client's lag, not the
        // node's backlog: publishers go on.
        outbox.set_blocked(true);
        assert!(node.publish(&c, Bytes::from_static(b"3")).await.is_ok());

        // A publish waiting while the backlog drains goes through.
        outbox.set_blocked(false);
        let waiting = {
            let node = node.clone();
            tokio::spawn(async move {
                let c = ChannelName::parse("c").unwrap();
                node.publish(&c, Bytes::from_static(b"4")).await
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut taken = std::collections::VecDeque::new();
        outbox.take(&mut taken);
        assert!(waiting.await.unwrap().is_ok());
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::queue::Outbox;
    use herald_protocol::CloseCode;

    fn sink() -> (Sink, Arc<Outbox>) {
        let outbox = Arc::new(Outbox::new(1 << 20, 1024, Arc::new(Metrics::default())));
        (Sink::Ws(outbox.clone(), herald_protocol::WireFormat::Json), outbox)
    }

    #[test]
    fn expired_connections_are_asked_to_close_with_4012_once() {
        let registry = Registry::default();
        let limits = Limits::default();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let s = Duration::from_secs(1);
        let (early, early_box) = sink();
        let (late, late_box) = sink();
        let (anonymous, anonymous_box) = sink();
        registry.register(1, Some("a"), Some(t0 + s), None, early, &limits).unwrap();
        registry.register(2, Some("b"), Some(t0 + 3 * s), None, late, &limits).unwrap();
        registry.register(3, None, None, None, anonymous, &limits).unwrap();

        assert_eq!(registry.expire(t0), 0);
        assert_eq!(early_box.pending_close(), None);
        assert_eq!(registry.expire(t0 + s), 1, "due at its expiry instant");
        assert_eq!(early_box.pending_close(), Some(CloseCode::TokenExpired));
        assert_eq!(late_box.pending_close(), None);
        assert_eq!(registry.expire(t0 + 2 * s), 0, "asked once");
        assert_eq!(registry.expire(t0 + 100 * s), 1);
        assert_eq!(late_box.pending_close(), Some(CloseCode::TokenExpired));
        assert_eq!(anonymous_box.pending_close(), None, "anonymous connections never expire");
    }

    #[test]
    fn set_expiry_moves_or_removes_the_entry() {
        let registry = Registry::default();
        let limits = Limits::default();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let s = Duration::from_secs(1);
        let (a, a_box) = sink();
        let (b, b_box) = sink();
        registry.register(1, Some("a"), Some(t0 + s), None, a, &limits).unwrap();
        registry.register(2, Some("b"), Some(t0 + s), None, b, &limits).unwrap();
        registry.set_expiry(1, Some(t0 + 10 * s));
        registry.set_expiry(2, None);
        assert_eq!(registry.expire(t0 + 5 * s), 0);
        assert_eq!(a_box.pending_close(), None);
        assert_eq!(registry.expire(t0 + 10 * s), 1);
        assert_eq!(a_box.pending_close(), Some(CloseCode::TokenExpired));
        assert_eq!(b_box.pending_close(), None);
        // Unregistered connections leave nothing behind; unknown ids are ignored.
        let (c, c_box) = sink();
        registry.register(3, Some("c"), Some(t0 + s), None, c, &limits).unwrap();
        registry.unregister(3);
        registry.set_expiry(3, Some(t0));
        assert!(registry.expiries.lock().is_empty());
        assert_eq!(registry.expire(t0 + 100 * s), 0);
        assert_eq!(c_box.pending_close(), None);
    }
}
