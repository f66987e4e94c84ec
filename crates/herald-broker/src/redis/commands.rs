//! The command side of the Redis broker: one multiplexed connection to the Redis, or one to each
//! master of a Redis Cluster, each with the id of the Redis process behind it, and commands
//! routed by hash slot with the cluster's redirects followed.
//!
//! A connection never outlives its Redis process, so the process id read when it was opened is
//! the one every script on it runs in: the scripts get it as an argument instead of asking Redis
//! each time. A connection error drops the connection; the next command opens a new one and
//! reads the id again.
//!
//! In a cluster, the slot map (`CLUSTER SLOTS`) says which master serves a slot. It is read at
//! start, again when a command meets a redirect or a lost connection, and every second by
//! [`Commands::maintain`]. Redirects are followed only where Redis promises the command did not
//! run (`MOVED`, `ASK`, `TRYAGAIN`, `CLUSTERDOWN`): a command whose connection broke is never
//! sent again, since a publication could then be stored twice.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ::redis::{Cmd, ErrorKind, RedisError, ServerErrorKind, Value};
use futures_util::StreamExt;
use parking_lot::{Mutex, RwLock};

use super::slots::SlotMap;
use super::{backend, bad_reply, client_for, within, RedisTls, REDIS_TIMEOUT};
use crate::BrokerError;

/// After a failed connection attempt, commands to that address fail at once for this long
/// rather than queue for attempts of their own.
const RETRY_AFTER_FAILURE: Duration = Duration::from_millis(500);
/// The slot map is read at most this often on demand (redirects, lost masters).
const REFRESH_AT_MOST_EVERY: Duration = Duration::from_millis(100);
/// Wait before retrying a command the cluster asked to retry (`TRYAGAIN`, `CLUSTERDOWN`).
const TRY_AGAIN_AFTER: Duration = Duration::from_millis(25);

/// Where the commands go.
pub(super) enum Target {
    /// One Redis: every slot is there.
    Single(::redis::Client),
    /// A Redis Cluster: one connection per master, found through the slot map.
    Cluster(Cluster),
}

/// What a node knows of a Redis Cluster.
pub(super) struct Cluster {
    /// `redis://[user:pass@]` or `rediss://[user:pass@]`: with `host:port` appended, the URL of
    /// one of the cluster's nodes.
    url_prefix: String,
    tls: RedisTls,
    /// The addresses (`host:port`) the configuration names.
    seeds: Vec<Arc<str>>,
    map: RwLock<Option<Arc<SlotMap>>>,
    /// A command met a redirect or lost a master: read the map before the next command.
    stale: AtomicBool,
    /// Held while the map is read; holds when it was last read.
    refreshing: tokio::sync::Mutex<Option<Instant>>,
    /// A refresh in the background is under way (one at a time).
    refresh_spawned: AtomicBool,
}

impl Cluster {
    /// The cluster of `url_prefix` + each of `seeds`.
    pub(super) fn new(url_prefix: String, tls: RedisTls, seeds: Vec<Arc<str>>) -> Cluster {
        Cluster {
            url_prefix,
            tls,
            seeds,
            map: RwLock::new(None),
            stale: AtomicBool::new(true),
            refreshing: tokio::sync::Mutex::new(None),
            refresh_spawned: AtomicBool::new(false),
        }
    }
}

/// An open command connection and the Redis process behind it.
#[derive(Clone)]
pub(super) struct Link {
    pub(super) conn: ::redis::aio::MultiplexedConnection,
    pub(super) run_id: Arc<str>,
    generation: u64,
    /// The address it is connected to (empty for a single Redis).
    pub(super) addr: Arc<str>,
}

/// Where a command must go again after a redirect.
enum Redirect {
    /// The slot is served elsewhere now: there, and read the map again.
    Moved(Option<Arc<str>>),
    /// The key is being migrated: there, once, after `ASKING`.
    Ask(Arc<str>),
    /// The cluster cannot serve the slot right now (`TRYAGAIN`, `CLUSTERDOWN`).
    Later,
    /// The Redis lost its scripts (`NOSCRIPT`, after `SCRIPT FLUSH`): again on a new
    /// connection, which loads them.
    Reload,
}

/// The command connections (see the module docs).
pub(super) struct Commands {
    target: Target,
    links: RwLock<HashMap<Arc<str>, Link>>,
    /// Held while a connection to an address is opened (one attempt per address at a time;
    /// a frozen master never delays connecting to another).
    connecting: Mutex<HashMap<Arc<str>, Arc<tokio::sync::Mutex<()>>>>,
    /// Loaded (`SCRIPT LOAD`) on every new connection, before any command uses them, so that
    /// a batch's scripts run in order (one that met `NOSCRIPT` after a `SCRIPT FLUSH` is sent
    /// again only when no later script of its channels was stored meanwhile).
    scripts: [&'static str; 2],
    /// When a failed connection attempt was last logged.
    last_warning: Mutex<Option<Instant>>,
    /// When the last connection attempt to each address failed.
    failures: Mutex<HashMap<Arc<str>, Instant>>,
    generation: AtomicU64,
    /// Where the connections' driver tasks run.
    io: tokio::runtime::Handle,
    /// This, for refreshes in the background (set by [`Commands::new`]).
    me: std::sync::OnceLock<std::sync::Weak<Commands>>,
}

impl Commands {
    pub(super) fn new(
        target: Target,
        scripts: [&'static str; 2],
        io: tokio::runtime::Handle,
    ) -> Arc<Commands> {
        let commands = Arc::new(Commands {
            target,
            links: RwLock::new(HashMap::new()),
            connecting: Mutex::new(HashMap::new()),
            scripts,
            last_warning: Mutex::new(None),
            failures: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(0),
            io,
            me: std::sync::OnceLock::new(),
        });
        let _ = commands.me.set(Arc::downgrade(&commands));
        commands
    }

    /// The cluster's slot map as last read (`None` on one Redis, or before the first read).
    pub(super) fn slot_map(&self) -> Option<Arc<SlotMap>> {
        match &self.target {
            Target::Single(_) => None,
            Target::Cluster(cluster) => cluster.map.read().clone(),
        }
    }

    /// Whether the commands go to a Redis Cluster.
    pub(super) fn is_cluster(&self) -> bool {
        matches!(self.target, Target::Cluster(_))
    }

    /// The connection to the Redis serving `slot` (any slot on a single Redis), opened if
    /// needed.
    pub(super) async fn get(&self, slot: u16) -> Result<Link, BrokerError> {
        let addr = self.owner(slot).await?;
        self.link_at(&addr).await
    }

    /// The address serving `slot` (empty for a single Redis).
    async fn owner(&self, slot: u16) -> Result<Arc<str>, BrokerError> {
        let Target::Cluster(cluster) = &self.target else { return Ok(Arc::from("")) };
        if cluster.map.read().is_none() {
            self.refresh().await?;
        } else if cluster.stale.load(Ordering::Acquire) {
            // The map in hand serves meanwhile (a redirect names the new owner itself); a
            // command never waits for a refresh that may ask frozen nodes one by one.
            let me = self.me.get().and_then(std::sync::Weak::upgrade);
            if let Some(me) = me.filter(|_| !cluster.refresh_spawned.swap(true, Ordering::AcqRel)) {
                self.io.spawn(async move {
                    let _ = me.refresh().await;
                    if let Target::Cluster(cluster) = &me.target {
                        cluster.refresh_spawned.store(false, Ordering::Release);
                    }
                });
            }
        }
        let map = cluster.map.read().clone();
        map.and_then(|m| m.owner(slot).cloned())
            .ok_or(BrokerError::Unavailable("no redis cluster master serves the channel's slot"))
    }

    /// Reads the slot map from a node that answers: a master already connected, else one of the
    /// configured addresses; gives up after [`REDIS_TIMEOUT`].
    pub(super) async fn refresh(&self) -> Result<(), BrokerError> {
        match tokio::time::timeout(REDIS_TIMEOUT, self.refresh_now()).await {
            Ok(done) => done,
            Err(_) => Err(BrokerError::Unavailable("no redis cluster node answers")),
        }
    }

    async fn refresh_now(&self) -> Result<(), BrokerError> {
        let Target::Cluster(cluster) = &self.target else { return Ok(()) };
        let mut last = cluster.refreshing.lock().await;
        if last.is_some_and(|t| t.elapsed() < REFRESH_AT_MOST_EVERY) && cluster.map.read().is_some()
        {
            return Ok(());
        }
        let mut candidates: Vec<Arc<str>> = self.links.read().keys().cloned().collect();
        candidates.sort();
        for seed in &cluster.seeds {
            if !candidates.contains(seed) {
                candidates.push(seed.clone());
            }
        }
        // Every candidate at once: a node that hangs delays nothing. The first complete map
        // wins; an incomplete one (a failover under way) serves only when no map is known.
        let mut asked: futures_util::stream::FuturesUnordered<_> =
            candidates.into_iter().map(|addr| self.slots_from(addr)).collect();
        let mut error = BrokerError::Unavailable("no redis cluster node answers");
        let mut partial = None;
        let chosen = loop {
            match asked.next().await {
                Some(Ok(map)) if map.is_complete() => break Some(map),
                Some(Ok(map)) => {
                    error = BrokerError::Unavailable("the redis cluster does not serve every slot");
                    partial.get_or_insert(map);
                }
                Some(Err(e)) => error = e,
                None => break partial.filter(|_| cluster.map.read().is_none()),
            }
        };
        drop(asked);
        *last = Some(Instant::now());
        let Some(map) = chosen else { return Err(error) };
        let masters = map.masters();
        *cluster.map.write() = Some(Arc::new(map));
        // A node that is no longer a master answers MOVED; its connection goes.
        self.links.write().retain(|addr, _| masters.contains(addr));
        cluster.stale.store(false, Ordering::Release);
        Ok(())
    }

    /// The slot map as the node at `addr` sees it (on its open connection, or one of its own).
    async fn slots_from(&self, addr: Arc<str>) -> Result<SlotMap, BrokerError> {
        let host = addr.rsplit_once(':').map_or(&*addr, |(h, _)| h).to_string();
        let open = self.links.read().get(&addr).cloned();
        let reply: Value = match open {
            Some(link) => {
                let mut conn = link.conn.clone();
                let mut ask = ::redis::cmd("CLUSTER");
                ask.arg("SLOTS");
                within(ask.query_async(&mut conn)).await.map_err(|e| self.failed(&link, &e))?
            }
            None => self.ask_once(&addr).await?,
        };
        SlotMap::from_reply(&reply, &host).ok_or_else(|| bad_reply("CLUSTER SLOTS"))
    }

    /// `CLUSTER SLOTS` on a connection of its own to `addr`, closed afterwards.
    async fn ask_once(&self, addr: &str) -> Result<Value, BrokerError> {
        let client = self.client_at(addr)?;
        let opening = self.io.spawn(async move {
            let config = ::redis::AsyncConnectionConfig::new()
                .set_response_timeout(Some(REDIS_TIMEOUT))
                .set_connection_timeout(Some(REDIS_TIMEOUT));
            let mut conn =
                within(client.get_multiplexed_async_connection_with_config(&config)).await?;
            within(::redis::cmd("CLUSTER").arg("SLOTS").query_async::<Value>(&mut conn)).await
        });
        let reply = opening.await.unwrap_or_else(|_| Err(thread_stopped()));
        reply.map_err(|e| self.warn(e))
    }

    /// The client of the node at `addr`.
    fn client_at(&self, addr: &str) -> Result<::redis::Client, BrokerError> {
        match &self.target {
            Target::Single(client) => Ok(client.clone()),
            Target::Cluster(cluster) => {
                client_for(&format!("{}{addr}", cluster.url_prefix), &cluster.tls)
            }
        }
    }

    /// The open connection to `addr`, or a new one.
    async fn link_at(&self, addr: &Arc<str>) -> Result<Link, BrokerError> {
        if let Some(link) = self.links.read().get(addr).cloned() {
            return Ok(link);
        }
        let lock = self.connecting.lock().entry(addr.clone()).or_default().clone();
        let _one = lock.lock().await;
        if let Some(link) = self.links.read().get(addr).cloned() {
            return Ok(link);
        }
        // Callers that queued behind an attempt that just failed fail too, instead of each
        // making its own attempt of up to 2 s in turn (a frozen Redis would make the last of
        // many publishers wait for all of them).
        if self.failures.lock().get(addr).is_some_and(|t| t.elapsed() < RETRY_AFTER_FAILURE) {
            return Err(BrokerError::Unavailable("redis is not reachable"));
        }
        let opened = self.open(addr).await;
        drop(_one);
        {
            // The lock goes with the last waiter: addresses come and go with the cluster.
            let mut locks = self.connecting.lock();
            if locks.get(addr).is_some_and(|l| Arc::strong_count(l) <= 2) {
                locks.remove(addr);
            }
        }
        let mut failures = self.failures.lock();
        match &opened {
            Ok(_) => failures.remove(addr),
            Err(_) => failures.insert(addr.clone(), Instant::now()),
        };
        failures.retain(|_, t| t.elapsed() < RETRY_AFTER_FAILURE);
        if opened.is_err() {
            if let Target::Cluster(cluster) = &self.target {
                cluster.stale.store(true, Ordering::Release);
            }
        }
        opened
    }

    /// Opens a command connection to `addr` (the caller holds `connecting`): connects, reads
    /// the Redis process id, loads the scripts.
    async fn open(&self, addr: &Arc<str>) -> Result<Link, BrokerError> {
        let config = ::redis::AsyncConnectionConfig::new()
            .set_response_timeout(Some(REDIS_TIMEOUT))
            .set_connection_timeout(Some(REDIS_TIMEOUT));
        // Opened on the broker's thread, where redis-rs spawns the connection's driver.
        let client = self.client_at(addr)?;
        let opening = self.io.spawn(async move {
            within(client.get_multiplexed_async_connection_with_config(&config)).await
        });
        let opened = opening.await.unwrap_or_else(|_| Err(thread_stopped()));
        let mut conn = opened.map_err(|e| self.warn(e))?;
        let info: String = within(::redis::cmd("INFO").arg("server").query_async(&mut conn))
            .await
            .map_err(backend)?;
        let run_id = info
            .lines()
            .find_map(|l| l.trim().strip_prefix("run_id:"))
            .filter(|id| id.len() >= 8 && id.bytes().all(|b| b.is_ascii_alphanumeric()))
            .ok_or_else(|| bad_reply("INFO server"))?;
        for script in &self.scripts {
            let _: String =
                within(::redis::cmd("SCRIPT").arg("LOAD").arg(*script).query_async(&mut conn))
                    .await
                    .map_err(backend)?;
        }
        let link = Link {
            conn,
            run_id: Arc::from(run_id.to_ascii_lowercase()),
            generation: self.generation.fetch_add(1, Ordering::Relaxed) + 1,
            addr: addr.clone(),
        };
        self.links.write().insert(addr.clone(), link.clone());
        Ok(link)
    }

    /// Logs why a connection could not be opened (refused, a TLS certificate not trusted, ...)
    /// for the operator, at most every 10 s: every command retries while Redis is away.
    fn warn(&self, e: RedisError) -> BrokerError {
        let mut last = self.last_warning.lock();
        if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
            *last = Some(Instant::now());
            tracing::warn!(error = %e, "cannot connect to redis");
        }
        backend(e)
    }

    /// Notes that a command on `link` failed with `e`: a lost connection is dropped (the next
    /// command opens a new one); in a cluster, the slot map is read again.
    pub(super) fn failed(&self, link: &Link, e: &RedisError) -> BrokerError {
        // NOSCRIPT: Redis lost its scripts (SCRIPT FLUSH); a new connection loads them again.
        let no_script = e.kind() == ErrorKind::Server(ServerErrorKind::NoScript);
        let lost = e.is_io_error()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || e.is_timeout();
        if no_script || lost {
            let mut links = self.links.write();
            if links.get(&link.addr).is_some_and(|l| l.generation == link.generation) {
                links.remove(&link.addr);
            }
        }
        if let Target::Cluster(cluster) = &self.target {
            if lost || redirect(e).is_some() {
                cluster.stale.store(true, Ordering::Release);
            }
        }
        backend(e.clone())
    }

    /// Whether commands can be served: the Redis is connected; in a cluster, every slot has a
    /// master and every master is connected.
    pub(super) fn is_connected(&self) -> bool {
        match &self.target {
            Target::Single(_) => !self.links.read().is_empty(),
            Target::Cluster(cluster) => {
                let Some(map) = cluster.map.read().clone() else { return false };
                let links = self.links.read();
                map.is_complete() && map.masters().iter().all(|m| links.contains_key(m))
            }
        }
    }

    /// Runs the command `build` makes for a connection on the Redis serving `slot`, following
    /// redirects (which promise the command did not run) for up to [`REDIS_TIMEOUT`].
    pub(super) async fn run(
        &self,
        slot: u16,
        build: impl Fn(&Link) -> Cmd,
    ) -> Result<Value, BrokerError> {
        self.run_until(slot, Instant::now() + REDIS_TIMEOUT, build).await
    }

    /// As [`Commands::run`], following redirects until `deadline`.
    pub(super) async fn run_until(
        &self,
        slot: u16,
        deadline: Instant,
        build: impl Fn(&Link) -> Cmd,
    ) -> Result<Value, BrokerError> {
        let mut next: Option<(Arc<str>, bool)> = None;
        loop {
            let (link, asking) = match next.take() {
                Some((addr, asking)) => (self.link_at(&addr).await?, asking),
                None => (self.get(slot).await?, false),
            };
            let mut conn = link.conn.clone();
            let result = if asking {
                let mut pipe = ::redis::pipe();
                pipe.cmd("ASKING").ignore().add_command(build(&link));
                let replies = within(pipe.query_async::<Vec<Value>>(&mut conn)).await;
                replies.and_then(|mut r| {
                    r.pop().ok_or_else(|| RedisError::from((ErrorKind::Parse, "no reply")))
                })
            } else {
                within(build(&link).query_async::<Value>(&mut conn)).await
            };
            let e = match result {
                Ok(value) => return Ok(value),
                Err(e) => e,
            };
            match redirect(&e) {
                Some(r) if Instant::now() < deadline => {
                    if matches!(r, Redirect::Reload) {
                        self.failed(&link, &e);
                    }
                    next = self.follow(r).await;
                }
                _ => return Err(self.failed(&link, &e)),
            }
        }
    }

    /// Prepares the next attempt after a redirect: where it goes (`None`: the slot's owner),
    /// and whether it needs `ASKING`.
    async fn follow(&self, redirect: Redirect) -> Option<(Arc<str>, bool)> {
        match &redirect {
            Redirect::Moved(to) => tracing::debug!(?to, "redis cluster redirect: MOVED"),
            Redirect::Ask(to) => tracing::debug!(%to, "redis cluster redirect: ASK"),
            Redirect::Later => tracing::debug!("redis cluster: try again"),
            Redirect::Reload => tracing::debug!("redis lost its scripts: loading them again"),
        }
        if let Target::Cluster(cluster) = &self.target {
            if !matches!(redirect, Redirect::Ask(_)) {
                cluster.stale.store(true, Ordering::Release);
            }
        }
        match redirect {
            Redirect::Moved(to) => to.map(|addr| (addr, false)),
            Redirect::Ask(addr) => Some((addr, true)),
            Redirect::Later => {
                tokio::time::sleep(TRY_AGAIN_AFTER).await;
                None
            }
            Redirect::Reload => None,
        }
    }

    /// Keeps a cluster's slot map current and a connection open to each master, for as long
    /// as the broker runs; on a single Redis, opens the connection once.
    pub(super) async fn maintain(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(50);
        loop {
            let ok = match &self.target {
                Target::Single(_) => {
                    if self.get(0).await.is_ok() {
                        return;
                    }
                    false
                }
                Target::Cluster(cluster) => {
                    cluster.stale.store(true, Ordering::Release);
                    let mut ok = self.refresh().await.is_ok();
                    let map = cluster.map.read().clone();
                    for master in map.map(|m| m.masters()).unwrap_or_default() {
                        ok &= self.link_at(&master).await.is_ok();
                    }
                    ok
                }
            };
            if ok {
                backoff = Duration::from_secs(1);
            }
            tokio::time::sleep(backoff).await;
            if !ok {
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// Where a command that failed with `e` must go again, when Redis promises it did not run
/// (a redirect, or a script Redis does not have).
fn redirect(e: &RedisError) -> Option<Redirect> {
    // The address (`host:port`) and the slot.
    let to = || e.redirect_node().map(|(addr, _slot)| Arc::from(addr));
    match e.kind() {
        ErrorKind::Server(ServerErrorKind::Moved) => Some(Redirect::Moved(to())),
        ErrorKind::Server(ServerErrorKind::Ask) => to().map(Redirect::Ask),
        ErrorKind::Server(ServerErrorKind::TryAgain | ServerErrorKind::ClusterDown) => {
            Some(Redirect::Later)
        }
        ErrorKind::Server(ServerErrorKind::NoScript) => Some(Redirect::Reload),
        _ => None,
    }
}

/// Whether a command failed with `e` may be sent again (see [`Commands::run`]).
pub(super) fn is_redirect(e: &RedisError) -> bool {
    redirect(e).is_some()
}

fn thread_stopped() -> RedisError {
    RedisError::from((ErrorKind::Io, "the redis thread stopped"))
}
