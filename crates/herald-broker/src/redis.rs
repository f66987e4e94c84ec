//! The Redis broker: several nodes share channels through one Redis (`broker =
//! "redis://[user:pass@]HOST:PORT[/DB]"`, or `rediss://` for TLS, see [`RedisTls`]).
//!
//! What lives in Redis, per channel `C` (every key of a channel carries the hash tag `{C}`, so a
//! channel's keys share one slot):
//! - `herald:{C}:s`, one hash holding the whole stream: its epoch `e`, newest offset `o`,
//!   creation time `c` (Redis `TIME`, milliseconds), ring size `z` (the channel's
//!   `history_size` when the epoch began) and last TTL renewal `x`, and the retained
//!   publications as a ring: the data of offset `n` in field `(n - 1) % z`, so the newest
//!   `min(o, z)` offsets are always there and trimming costs nothing. It expires after
//!   `history_ttl` without a publication (renewed lazily, see [`PUBLISH_MANY_SCRIPT`]); the next
//!   publication then starts a new epoch. A stream keeps the ring size it began with: nodes
//!   configured with another `history_size` share it until the epoch ends.
//! - The stream hash also records the Redis process that wrote it (`run_id`). A stream written by
//!   another process (Redis restarted, a replica took over) is replaced by a new epoch at the
//!   next publication and counts as absent for reads: that Redis may have lost acknowledged
//!   writes, and reusing the epoch would reuse offsets. Void epochs (positions read while a
//!   channel had no stream, see [`crate::history::VoidEpoch`]) carry the process's id too.
//!
//! Publishing a channel with history runs one Lua script ([`PUBLISH_MANY_SCRIPT`], a batch's
//! publications in one call, a single publication as a batch of one): per publication it
//! creates the stream when missing, assigns the next offset, stores the data in the ring,
//! renews the TTL and publishes on the channel's pub/sub channel `herald:{C}`, atomically.
//! Every node therefore sees offsets in order, and a history read ([`READ_SCRIPT`], also one
//! script) is consistent with the pub/sub stream. Channels without history are a plain
//! `PUBLISH`. Scripts are loaded when the connection opens and run with `EVALSHA` on one
//! multiplexed connection, so many publications are in flight at once.
//!
//! Pub/sub: one dedicated connection per node, subscribed only to the channels its clients use.
//! Subscriptions are reconciled by one task in the order they are asked for: each
//! [`Broker::subscribe`] / [`Broker::unsubscribe`] makes the task compare what Redis has with
//! what the hub wants *now* ([`BrokerHandler::has_subscribers`]), so concurrent first-subscribe
//! and last-unsubscribe calls can never leave the node unsubscribed while it has subscribers.
//! A subscribe call returns once Redis confirmed the subscription: publications from then on
//! reach the node, which the subscribe-then-read-history protocol of the hub relies on.
//!
//! Message format on pub/sub: `t<node> <ms> ` (the publishing node's broker id and its clock
//! when it published: a node measures how late its own publications come back, see
//! [`Broker::is_behind`]), then `h<offset> <epoch> <data>` for a channel with history,
//! `n<data>` without. Messages without the `t` part are read too.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ::redis::{Script, Value};
use bytes::Bytes;
use futures_util::StreamExt;
use herald_protocol::{ChannelName, StreamPosition};
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};

use crate::history::{self, VoidEpoch};
use crate::io_thread::IoThread;
use crate::lateness::{now_ms, without_password, Lateness};
use crate::{
    Broker, BrokerError, BrokerHandler, ControlHandler, HistoryPage, HistoryQuery, Publication,
    PublishOptions,
};

/// Publishes publications in one call, in order, each atomically: assigns the channel's next
/// offset, stores the data in the channel's history ring, renews the TTL and publishes on
/// pub/sub. A stream written by another Redis process (`run_id`: Redis restarted, or a replica
/// took over) is replaced by a new epoch: that Redis may have lost acknowledged writes, and
/// reusing the epoch would hand out offsets that clients already hold for other publications.
///
/// The stream is one hash (see the module docs): per publication one `HMGET`, one `HSET` and
/// one `PUBLISH`; the TTL is renewed (`PEXPIRE` to `ttl + ttl / 16`) only when the last renewal
/// is more than `ttl / 16` old, so a stream still lives at least `ttl` after its last
/// publication and at most `ttl + ttl / 16`.
///
/// KEYS are each publication's stream hash; ARGV: the Redis process id, a fresh epoch, the
/// message prefix (the publishing node and time, see the module docs), then per publication
/// its data, history size and TTL (ms). The pub/sub channel is the key without its
/// `:s`. Returns `{offset1, epoch1, offset2, epoch2, ...}`. A batch shares the script call's own
/// cost; a single publication is a batch of one.
pub const PUBLISH_MANY_SCRIPT: &str = r#"
local run, fresh, prefix = ARGV[1], ARGV[2], ARGV[3]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for i = 1, #KEYS do
  local s = KEYS[i]
  local j = 3 * i + 1
  local data, size, ttl = ARGV[j], tonumber(ARGV[j + 1]), tonumber(ARGV[j + 2])
  local m = redis.call('HMGET', s, 'e', 'r', 'o', 'z', 'x')
  local epoch, top, z, x = m[1], tonumber(m[3]), tonumber(m[4]), tonumber(m[5])
  if not epoch or m[2] ~= run or not z then
    redis.call('DEL', s)
    epoch, top, z, x = fresh, 0, size, nil
    redis.call('HSET', s, 'e', epoch, 'r', run, 'c', now, 'z', z, 't', ttl)
  end
  top = top + 1
  local slack = math.floor(ttl / 16)
  local renew = not x or now - x >= slack or now < x
  if z > 0 then
    if renew then
      redis.call('HSET', s, 'o', top, (top - 1) % z, data, 'x', now)
    else
      redis.call('HSET', s, 'o', top, (top - 1) % z, data)
    end
  elseif renew then
    redis.call('HSET', s, 'o', top, 'x', now)
  else
    redis.call('HSET', s, 'o', top)
  end
  if renew then
    redis.call('PEXPIRE', s, ttl + slack)
  end
  redis.call('PUBLISH', string.sub(s, 1, -3), prefix .. 'h' .. top .. ' ' .. epoch .. ' ' .. data)
  out[#out + 1] = top
  out[#out + 1] = epoch
end
return out
"#;

/// Most publications one [`PUBLISH_MANY_SCRIPT`] call carries (Redis runs nothing else
/// meanwhile).
const PUBLISH_MANY_CHUNK: usize = 64;

/// Reads a channel's position and the history a query asks for, atomically.
///
/// KEYS: the stream hash. ARGV: mode (`n` newest, `s` after a position, `v` after a void
/// position), the position's epoch, its offset, the limit (-1: none), for `v` the void read's
/// time (ms) and the TTL (ms) and the instance the void position was read from (another one is
/// judged like any other epoch), and the Redis process id (`run_id`) read when the connection
/// was opened. The instance is that process (the first 8 characters of its id), so a position
/// read before a restart or a failover proves nothing afterwards; a stream written by another
/// process counts as none. Returns `{now, instance}` without a stream, else `{now, instance,
/// epoch, top, complete, first offset, data...}`.
pub const READ_SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local run = ARGV[8]
local instance = string.sub(run, 1, 8)
local m = redis.call('HMGET', KEYS[1], 'e', 'o', 'c', 'r', 'z', 't')
if not m[1] or m[4] ~= run or not m[5] then
  return {now, instance}
end
local epoch, top, created, z = m[1], tonumber(m[2]), tonumber(m[3]), tonumber(m[5])
local len = math.min(top, z)
local oldest = top - len + 1
local limit = tonumber(ARGV[4])
local mode, since_epoch = ARGV[1], ARGV[2]
if mode == 'v' and ARGV[7] ~= instance then
  mode, since_epoch = 's', ''
end
if mode == 'v' then
  local at, ttl = tonumber(ARGV[5]), tonumber(ARGV[6])
  if ttl < 0 then ttl = tonumber(m[6]) or 0 end
  if at <= created and created + 1 <= at + ttl then
    mode, since_epoch = 's', epoch
  else
    mode, since_epoch = 's', ''
  end
end
local start, complete = 0, 0
if mode == 'n' then
  local count = len
  if limit >= 0 and limit < len then count = limit end
  start = len - count
else
  local off = tonumber(ARGV[3])
  local reaches = since_epoch == epoch and off <= top and
    ((len > 0 and off >= oldest - 1) or (len == 0 and off == top))
  if reaches then
    complete = 1
    if len > 0 then start = off + 1 - oldest end
  end
end
local stop = len - 1
if mode ~= 'n' and limit >= 0 then stop = math.min(stop, start + limit - 1) end
local out = {now, instance, epoch, top, complete, oldest + start}
local k = start
while k <= stop do
  local fields = {}
  local last = math.min(stop, k + 999)
  for i = k, last do fields[#fields + 1] = (oldest + i - 1) % z end
  local items = redis.call('HMGET', KEYS[1], unpack(fields))
  for i = 1, #items do out[#out + 1] = items[i] end
  k = last + 1
end
return out
"#;

/// The pub/sub channel of control messages between nodes.
const CONTROL_CHANNEL: &str = "herald:control";
/// The set of announced node ids.
const NODES_KEY: &str = "herald:nodes";
/// Prefix of the key holding one node's announced info.
const NODE_KEY: &str = "herald:node:";
/// After a failed connection attempt, commands fail at once for this long rather than queue
/// for attempts of their own.
const RETRY_AFTER_FAILURE: Duration = Duration::from_millis(500);
/// Longest wait between two attempts to reach Redis.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Longest wait for Redis to answer a command or accept a connection: a frozen Redis makes a
/// publish fail with 503 after this, never hang.
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest wait of a subscriber for its node's subscription in Redis.
const RECONCILE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the pub/sub task sends itself a probe through pub/sub...
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// ...and how long a probe may take to come back before the connection counts as wedged.
const PROBE_DEADLINE: Duration = Duration::from_secs(3);

/// A request to the pub/sub task: reconcile `channel`, then answer.
struct SubOp {
    channel: ChannelName,
    done: oneshot::Sender<Result<(), BrokerError>>,
}

/// The Redis broker (see the module docs).
pub struct RedisBroker {
    client: ::redis::Client,
    /// The thread that runs the connections and the pub/sub task.
    io: Arc<IoThread>,
    /// The URL without its password, for logs.
    display_url: String,
    /// The command connection.
    commands: Arc<Commands>,
    handler: OnceLock<Arc<dyn BrokerHandler>>,
    ops: mpsc::UnboundedSender<SubOp>,
    ops_rx: Mutex<Option<mpsc::UnboundedReceiver<SubOp>>>,
    /// The pub/sub connection is up and subscribed to what the hub wants.
    pubsub_ready: Arc<AtomicBool>,
    publish_many_script: Script,
    reader: Reader,
    control: Arc<OnceLock<ControlHandler>>,
    /// This broker's id in control messages and message origins.
    sender: Arc<str>,
    /// Whether this node's own publications come back late ([`Broker::is_behind`]).
    lateness: Arc<Lateness>,
}

/// Reads positions and history ([`READ_SCRIPT`]) on the command connection.
#[derive(Clone)]
struct Reader {
    commands: Arc<Commands>,
    script: Script,
}

/// The command connection: one multiplexed connection (many commands in flight) and the id of
/// the Redis process it is connected to. A connection never outlives its Redis process, so the
/// id read when it was opened is the one every script on it runs in: the scripts get it as an
/// argument instead of asking Redis each time. A connection error drops it; the next command
/// opens a new one and reads the id again.
struct Commands {
    client: ::redis::Client,
    link: parking_lot::RwLock<Option<Link>>,
    connecting: tokio::sync::Mutex<()>,
    /// Loaded (`SCRIPT LOAD`) on every new connection, before any command uses them: a batch
    /// script must never be retried after a `NOSCRIPT`, which could reorder the batch.
    scripts: [&'static str; 2],
    /// When a failed connection attempt was last logged.
    last_warning: Mutex<Option<std::time::Instant>>,
    /// When the last connection attempt failed.
    last_failure: Mutex<Option<std::time::Instant>>,
    /// Where the connection's driver task runs.
    io: tokio::runtime::Handle,
}

/// An open command connection and the Redis process behind it.
#[derive(Clone)]
struct Link {
    conn: ::redis::aio::MultiplexedConnection,
    run_id: Arc<str>,
    generation: u64,
}

impl Commands {
    /// The open connection, or a new one.
    async fn get(&self) -> Result<Link, BrokerError> {
        if let Some(link) = self.link.read().clone() {
            return Ok(link);
        }
        let _one = self.connecting.lock().await;
        if let Some(link) = self.link.read().clone() {
            return Ok(link);
        }
        // Callers that queued behind an attempt that just failed fail too, instead of each
        // making its own attempt of up to 2 s in turn (a frozen Redis would make the last of
        // many publishers wait for all of them).
        if self.last_failure.lock().is_some_and(|t| t.elapsed() < RETRY_AFTER_FAILURE) {
            return Err(BrokerError::Unavailable("redis is not reachable"));
        }
        let opened = self.open().await;
        *self.last_failure.lock() = opened.is_err().then(std::time::Instant::now);
        opened
    }

    /// Opens a command connection (the caller holds `connecting`): connects, reads the Redis
    /// process id, loads the scripts.
    async fn open(&self) -> Result<Link, BrokerError> {
        let config = ::redis::AsyncConnectionConfig::new()
            .set_response_timeout(Some(REDIS_TIMEOUT))
            .set_connection_timeout(Some(REDIS_TIMEOUT));
        // Opened on the broker's thread, where redis-rs spawns the connection's driver.
        let client = self.client.clone();
        let opening = self.io.spawn(async move {
            within(client.get_multiplexed_async_connection_with_config(&config)).await
        });
        let opened = opening.await.unwrap_or_else(|_| {
            Err(::redis::RedisError::from((::redis::ErrorKind::Io, "the redis thread stopped")))
        });
        let mut conn = opened.map_err(|e| {
            // The cause (refused, a TLS certificate not trusted, ...) for the operator, at
            // most every 10 s: every command retries the connection while Redis is away.
            let mut last = self.last_warning.lock();
            if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                *last = Some(std::time::Instant::now());
                tracing::warn!(error = %e, "cannot connect to redis");
            }
            backend(e)
        })?;
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
        let mut slot = self.link.write();
        let generation = slot.as_ref().map_or(0, |l| l.generation) + 1;
        let link = Link { conn, run_id: Arc::from(run_id.to_ascii_lowercase()), generation };
        *slot = Some(link.clone());
        Ok(link)
    }

    /// Notes that a command on `link` failed with `e`: a lost connection is dropped (the next
    /// command opens a new one).
    fn failed(&self, link: &Link, e: &::redis::RedisError) -> BrokerError {
        // NOSCRIPT: Redis lost its scripts (SCRIPT FLUSH); a new connection loads them again.
        let no_script = e.kind() == ::redis::ErrorKind::Server(::redis::ServerErrorKind::NoScript);
        if no_script
            || e.is_io_error()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || e.is_timeout()
        {
            let mut slot = self.link.write();
            if slot.as_ref().is_some_and(|l| l.generation == link.generation) {
                *slot = None;
            }
        }
        backend(e.clone())
    }

    fn is_connected(&self) -> bool {
        self.link.read().is_some()
    }
}

impl std::fmt::Debug for RedisBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBroker").field("url", &self.display_url).finish()
    }
}

impl RedisBroker {
    /// A broker for the Redis at `url` (`redis://[user:pass@]HOST:PORT[/DB]`); nothing is
    /// connected before [`Broker::start`].
    pub fn new(url: &str) -> Result<RedisBroker, BrokerError> {
        RedisBroker::with_tls(url, &RedisTls::default())
    }

    /// A broker for the Redis at `url`, where a `rediss://` URL is reached over TLS verified
    /// as `tls` says (without a CA file: the system's roots). Certificate verification cannot
    /// be turned off: redis-rs's `#insecure` URL fragment is refused.
    pub fn with_tls(url: &str, tls: &RedisTls) -> Result<RedisBroker, BrokerError> {
        let client = client_for(url, tls)?;
        let (ops, ops_rx) = mpsc::unbounded_channel();
        let io = Arc::new(IoThread::start("herald-redis")?);
        let commands = Arc::new(Commands {
            client: client.clone(),
            link: parking_lot::RwLock::new(None),
            connecting: tokio::sync::Mutex::new(()),
            scripts: [PUBLISH_MANY_SCRIPT, READ_SCRIPT],
            last_warning: Mutex::new(None),
            last_failure: Mutex::new(None),
            io: io.handle.clone(),
        });
        Ok(RedisBroker {
            client,
            io,
            display_url: without_password(url),
            reader: Reader { commands: commands.clone(), script: Script::new(READ_SCRIPT) },
            commands,
            handler: OnceLock::new(),
            ops,
            ops_rx: Mutex::new(Some(ops_rx)),
            pubsub_ready: Arc::new(AtomicBool::new(false)),
            publish_many_script: Script::new(PUBLISH_MANY_SCRIPT),
            control: Arc::new(OnceLock::new()),
            sender: history::new_instance_id(),
            lateness: Arc::new(Lateness::default()),
        })
    }
}

/// How a `rediss://` connection verifies the server and, optionally, proves who the node is.
#[derive(Clone, Default)]
pub struct RedisTls {
    /// PEM certificates of the CAs to trust instead of the system's roots.
    pub ca_pem: Option<Vec<u8>>,
    /// PEM client certificate chain and private key, for a Redis with `tls-auth-clients yes`.
    pub client: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for RedisTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTls")
            .field("ca_pem", &self.ca_pem.is_some())
            .field("client", &self.client.is_some())
            .finish()
    }
}

/// The redis-rs client of `url`: plain for `redis://`, TLS for `rediss://`.
fn client_for(url: &str, tls: &RedisTls) -> Result<::redis::Client, BrokerError> {
    let shown = without_password(url);
    if url.contains('#') {
        return Err(BrokerError::Backend(format!(
            "bad redis URL {shown}: a fragment (`#insecure` turns certificate checks off) is not \
             accepted; trust a private CA with its PEM file instead"
        )));
    }
    let is_tls = url.starts_with("rediss://");
    if !is_tls && (tls.ca_pem.is_some() || tls.client.is_some()) {
        return Err(BrokerError::Backend(format!(
            "TLS files are set for {shown}, which is not a rediss:// URL"
        )));
    }
    let bad = |e: ::redis::RedisError| BrokerError::Backend(format!("bad redis URL {shown}: {e}"));
    if is_tls && (tls.ca_pem.is_some() || tls.client.is_some()) {
        let certificates = ::redis::TlsCertificates {
            client_tls: tls.client.as_ref().map(|(cert, key)| ::redis::ClientTlsConfig {
                client_cert: cert.clone(),
                client_key: key.clone(),
            }),
            root_cert: tls.ca_pem.clone(),
        };
        ::redis::Client::build_with_tls(url, certificates).map_err(bad)
    } else {
        ::redis::Client::open(url).map_err(bad)
    }
}

fn backend(e: ::redis::RedisError) -> BrokerError {
    if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout() {
        BrokerError::Unavailable("redis is not reachable")
    } else {
        BrokerError::Backend(e.to_string())
    }
}

fn stream_key(channel: &ChannelName) -> String {
    format!("herald:{{{channel}}}:s")
}

/// The pub/sub channel of a Herald channel.
fn pubsub_channel(channel: &ChannelName) -> String {
    format!("herald:{{{channel}}}")
}

/// The Herald channel of a pub/sub channel name.
fn channel_of(pubsub: &str) -> Option<ChannelName> {
    let name = pubsub.strip_prefix("herald:{")?.strip_suffix('}')?;
    ChannelName::parse(name).ok()
}

/// The publishing node and its time, if the message names them, and the rest of it.
fn split_origin(payload: &[u8]) -> (Option<(&[u8], u64)>, &[u8]) {
    let origin = || {
        let rest = payload.strip_prefix(b"t")?;
        let sp = rest.iter().position(|&b| b == b' ')?;
        let node = &rest[..sp];
        let rest = &rest[sp + 1..];
        let sp = rest.iter().position(|&b| b == b' ')?;
        let ms: u64 = std::str::from_utf8(&rest[..sp]).ok()?.parse().ok()?;
        Some(((node, ms), &rest[sp + 1..]))
    };
    match origin() {
        Some((o, rest)) => (Some(o), rest),
        None => (None, payload),
    }
}

/// The `t<node> <ms> ` prefix of this node's messages, now.
fn origin_prefix(node: &str) -> String {
    format!("t{node} {} ", now_ms())
}

/// Decodes a pub/sub message (see the module docs), without its origin.
fn decode_message(payload: &[u8]) -> Option<Publication> {
    let (_, payload) = split_origin(payload);
    match payload.split_first()? {
        (b'n', data) => {
            Some(Publication { offset: None, epoch: None, data: Bytes::copy_from_slice(data) })
        }
        (b'h', rest) => {
            let sp = rest.iter().position(|&b| b == b' ')?;
            let offset: u64 = std::str::from_utf8(&rest[..sp]).ok()?.parse().ok()?;
            let rest = &rest[sp + 1..];
            let sp = rest.iter().position(|&b| b == b' ')?;
            let epoch = std::str::from_utf8(&rest[..sp]).ok()?;
            Some(Publication {
                offset: Some(offset),
                epoch: Some(Arc::from(epoch)),
                data: Bytes::copy_from_slice(&rest[sp + 1..]),
            })
        }
        _ => None,
    }
}

fn as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Int(n) => u64::try_from(*n).ok(),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

fn as_string(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(n) => Some(n.to_string()),
        _ => None,
    }
}

fn bad_reply(what: &str) -> BrokerError {
    BrokerError::Backend(format!("unexpected reply from redis to {what}"))
}

/// Opens the command connection in the background at start, retrying until Redis answers.
async fn connect_commands(commands: Arc<Commands>) {
    let mut backoff = Duration::from_millis(50);
    while commands.get().await.is_err() {
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Most publications one catch-up read delivers; a longer gap ends the channel's subscriptions
/// (the clients recover by themselves, page by page).
const MAX_CATCH_UP: usize = 10_000;
/// Publications per history read of a catch-up.
const CATCH_UP_PAGE: usize = 500;
/// Channels whose first catch-up page is read at once after a reconnect (at most this many
/// pages of [`CATCH_UP_PAGE`] are held at a time).
const CATCH_UP_CONCURRENCY: usize = 32;

/// History could not be read (Redis unreachable or loading): retried after a reconnect.
#[derive(Debug)]
struct Unreadable;

/// Why a subscription request failed, and whether the pub/sub connection is gone with it.
#[derive(Debug)]
struct Refused {
    error: BrokerError,
    connection_lost: bool,
}

/// What the pub/sub task knows of each subscribed channel: the position of the newest
/// publication handed to the hub (offset 0 in a void epoch before the first).
type Positions = HashMap<ChannelName, (Arc<str>, u64)>;

/// The pub/sub side of the node: the channels it is subscribed to, the position of each, and
/// what it needs to read the gaps from history.
struct Follower {
    handler: Arc<dyn BrokerHandler>,
    /// Where control messages go; each starts with the sender's id and a space (its own are
    /// skipped).
    control: Arc<OnceLock<ControlHandler>>,
    /// This broker's id in control messages.
    sender: Arc<str>,
    reader: Reader,
    subscribed: HashSet<ChannelName>,
    positions: Positions,
    /// Whether this node's own publications come back late ([`Broker::is_behind`]).
    lateness: Arc<Lateness>,
}

impl Follower {
    /// The channel's current position, read before subscribing: whatever is published between
    /// this read and the subscription's confirmation is then a gap the next message reveals.
    async fn baseline(&mut self, channel: &ChannelName) -> Result<(), BrokerError> {
        let query = HistoryQuery { since: None, limit: Some(0) };
        let page = self.reader.read(channel, Some(Duration::from_secs(1)), &query).await?;
        if let Some(pos) = page.position {
            self.positions.insert(channel.clone(), (Arc::from(pos.epoch.as_str()), pos.offset));
        }
        Ok(())
    }

    /// Hands a message to the hub, first filling any gap before it from history; drops what
    /// was already handed over. `Err`: history could not be read; nothing was handed over and
    /// the position is kept, so a reconnect's catch-up covers this message too.
    async fn deliver(&mut self, channel: ChannelName, p: Publication) -> Result<(), Unreadable> {
        if let (Some(offset), Some(epoch)) = (p.offset, p.epoch.clone()) {
            let from = match self.positions.get(&channel) {
                Some((seen, top)) if **seen == *epoch => {
                    if offset <= *top {
                        return Ok(()); // already handed over by a catch-up read
                    }
                    Some(*top)
                }
                // A new epoch since the last position: it starts at offset 1.
                Some(_) => Some(0),
                None => None,
            };
            if let Some(from) = from.filter(|&from| offset > from + 1) {
                let missing = usize::try_from(offset - 1 - from).unwrap_or(usize::MAX);
                self.catch_up(&channel, &epoch, from, Some(missing), None).await?;
            }
            self.positions.insert(channel.clone(), (epoch, offset));
        }
        self.handler.handle_publication(&channel, &p);
        Ok(())
    }

    /// Reads what the node missed of `channel` after `(from, epoch)` (at most `limit`) and hands
    /// it to the hub; when history cannot fill the gap, the channel's local subscribers are
    /// told to recover by themselves ([`BrokerHandler::channel_lost`]). `Err`: history could
    /// not be read (Redis unreachable, or still loading its data); nothing changed. `first`:
    /// the first page, already read (after a reconnect, see [`Follower::catch_up_all`]).
    async fn catch_up(
        &mut self,
        channel: &ChannelName,
        epoch: &Arc<str>,
        from: u64,
        limit: Option<usize>,
        mut first: Option<HistoryPage>,
    ) -> Result<(), Unreadable> {
        // A gap of known length must be filled exactly; after a reconnect, whatever is there
        // (at most MAX_CATCH_UP). Read page by page: a long gap never comes as one reply.
        let exact = limit.is_some();
        let budget = limit.unwrap_or(MAX_CATCH_UP);
        if budget > MAX_CATCH_UP {
            self.lose(channel, None);
            return Ok(());
        }
        let mut from = from;
        let mut total = 0usize;
        loop {
            let want = if exact { (budget - total).min(CATCH_UP_PAGE) } else { CATCH_UP_PAGE };
            if want == 0 {
                break;
            }
            let query = HistoryQuery {
                since: Some(StreamPosition { offset: from, epoch: epoch.to_string() }),
                limit: Some(want),
            };
            let read = match first.take() {
                Some(page) => Ok(page),
                None => self.reader.read(channel, Some(Duration::from_secs(1)), &query).await,
            };
            let page = match read {
                Ok(page) => page,
                Err(e) => {
                    // What was handed over stays (its positions are kept); the rest is read
                    // again after a reconnect.
                    tracing::warn!(%channel, error = %e, "cannot read the gap from redis; will retry");
                    return Err(Unreadable);
                }
            };
            let n = page.publications.len();
            let short = n < want;
            if !page.complete || (exact && short) || (!exact && total + n > MAX_CATCH_UP) {
                tracing::warn!(%channel, from, "a gap history cannot fill: subscribers must recover");
                // Later gaps are judged from the channel's position now.
                let now = page.position.map(|p| (Arc::from(p.epoch.as_str()), p.offset));
                self.lose(channel, now);
                return Ok(());
            }
            for p in &page.publications {
                if let (Some(offset), Some(e)) = (p.offset, &p.epoch) {
                    self.positions.insert(channel.clone(), (e.clone(), offset));
                    from = offset;
                }
                self.handler.handle_publication(channel, p);
            }
            total += n;
            if short {
                break;
            }
        }
        if total > 0 {
            tracing::info!(%channel, publications = total, "caught up from redis history");
        }
        Ok(())
    }

    /// Catches up every channel in `behind` (channel, epoch, offset handed over last) after a
    /// reconnect: the first page of up to [`CATCH_UP_CONCURRENCY`] channels is read at once
    /// (one round trip for most channels, many in flight), each channel's publications are
    /// then handed over in order as its page arrives, and longer gaps go on page by page.
    /// `Err`: history could not be read; what was handed over stays, the rest is read again
    /// after the next reconnect.
    async fn catch_up_all(
        &mut self,
        behind: Vec<(ChannelName, Arc<str>, u64)>,
    ) -> Result<(), Unreadable> {
        let reader = self.reader.clone();
        let mut firsts = futures_util::stream::iter(behind)
            .map(move |(channel, epoch, from)| {
                let reader = reader.clone();
                async move {
                    let first = first_page(&reader, &channel, epoch, from).await;
                    (channel, first)
                }
            })
            .buffer_unordered(CATCH_UP_CONCURRENCY);
        while let Some((channel, first)) = firsts.next().await {
            match first {
                Ok(Some((epoch, from, page))) => {
                    self.catch_up(&channel, &epoch, from, None, Some(page)).await?;
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(%channel, error = %e, "cannot read the gap from redis; will retry");
                    return Err(Unreadable);
                }
            }
        }
        Ok(())
    }

    /// Notes how late one of this node's own publications came back (see
    /// [`Broker::is_behind`]).
    fn note_lag(&self, payload: &[u8]) {
        let (Some((node, sent)), _) = split_origin(payload) else { return };
        if node != self.sender.as_bytes() {
            return;
        }
        self.lateness.returned(sent);
    }

    /// Hands a control message of another node to the control handler.
    fn control_message(&self, payload: &[u8]) {
        let Some(sp) = payload.iter().position(|&b| b == b' ') else { return };
        if &payload[..sp] == self.sender.as_bytes() {
            return;
        }
        if let Some(handler) = self.control.get() {
            handler(&payload[sp + 1..]);
        }
    }

    /// The channel's gap cannot be filled: its subscribers recover by themselves; later gaps
    /// are judged from `now` (its current position), or from the next message when unknown.
    fn lose(&mut self, channel: &ChannelName, now: Option<(Arc<str>, u64)>) {
        match now {
            Some(position) => self.positions.insert(channel.clone(), position),
            None => self.positions.remove(channel),
        };
        self.handler.channel_lost(channel);
    }

    /// Subscribes or unsubscribes `channel` as the hub wants now.
    async fn reconcile(
        &mut self,
        sink: &mut ::redis::aio::PubSubSink,
        channel: &ChannelName,
    ) -> Result<(), Refused> {
        let want = self.handler.has_subscribers(channel);
        let have = self.subscribed.contains(channel);
        let name = pubsub_channel(channel);
        let lost = |e| Refused { error: backend(e), connection_lost: true };
        match (want, have) {
            (true, false) => {
                // Without it, not subscribed: the caller's subscriber gets 503; the pub/sub
                // connection itself is fine.
                self.baseline(channel)
                    .await
                    .map_err(|error| Refused { error, connection_lost: false })?;
                within(sink.subscribe(&name)).await.map_err(lost)?;
                self.subscribed.insert(channel.clone());
            }
            (false, true) => {
                within(sink.unsubscribe(&name)).await.map_err(lost)?;
                self.subscribed.remove(channel);
                self.positions.remove(channel);
            }
            _ => {}
        }
        Ok(())
    }
}

/// The first catch-up page of a channel the node had handed over up to `(epoch, from)`, with
/// the epoch and offset it follows; `None` when nothing is due (the node had seen nothing yet,
/// a void epoch, and the channel still has no stream).
async fn first_page(
    reader: &Reader,
    channel: &ChannelName,
    epoch: Arc<str>,
    from: u64,
) -> Result<Option<(Arc<str>, u64, HistoryPage)>, BrokerError> {
    let (epoch, from) = if VoidEpoch::parse(&epoch).is_none() {
        (epoch, from)
    } else {
        // Nothing seen yet: what exists now is due from its start, if the void position proves
        // that no earlier stream was created and lost meanwhile (judged with the TTL the stream
        // was created with); if it cannot, the page is incomplete and the subscribers recover.
        let query = HistoryQuery {
            since: Some(StreamPosition { offset: 0, epoch: epoch.to_string() }),
            limit: Some(CATCH_UP_PAGE),
        };
        let page = reader.read(channel, None, &query).await?;
        return Ok(match page.position.clone() {
            Some(pos) if VoidEpoch::parse(&pos.epoch).is_none() => {
                Some((Arc::from(pos.epoch.as_str()), 0, page))
            }
            _ => None,
        });
    };
    let query = HistoryQuery {
        since: Some(StreamPosition { offset: from, epoch: epoch.to_string() }),
        limit: Some(CATCH_UP_PAGE),
    };
    let page = reader.read(channel, Some(Duration::from_secs(1)), &query).await?;
    Ok(Some((epoch, from, page)))
}

/// `call`, or an I/O error once [`REDIS_TIMEOUT`] passed.
async fn within<T>(
    call: impl std::future::Future<Output = Result<T, ::redis::RedisError>>,
) -> Result<T, ::redis::RedisError> {
    match tokio::time::timeout(REDIS_TIMEOUT, call).await {
        Ok(result) => result,
        Err(_) => Err(::redis::RedisError::from((::redis::ErrorKind::Io, "redis did not answer"))),
    }
}

/// The pub/sub task: one connection, subscribed to what the hub wants, handing messages over in
/// order; reconnects when the connection is lost, resubscribes, and catches each channel up
/// from history.
async fn run_pubsub(
    client: ::redis::Client,
    mut follower: Follower,
    mut ops: mpsc::UnboundedReceiver<SubOp>,
    ready: Arc<AtomicBool>,
) {
    let _not_ready_after = crate::io_thread::ClearOnExit(ready.clone());
    // This node's own probe channel (outside the `herald:{C}` space of Herald channels).
    let probe = format!("herald:probe:{}", history::new_instance_id());
    let mut connected_before = false;
    let mut backoff = Duration::from_millis(50);
    loop {
        let pubsub = match within(client.get_async_pubsub()).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "cannot open the redis pub/sub connection; retrying");
                // Answer waiting subscribers: they get 503 and may retry.
                while let Ok(op) = ops.try_recv() {
                    let _ = op.done.send(Err(BrokerError::Unavailable("redis is not reachable")));
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        backoff = Duration::from_millis(50);
        let (mut sink, mut stream) = pubsub.split();
        // Resubscribe what the hub still wants, then catch each channel up: what was
        // published while the connection was down is in history.
        let wanted: Vec<ChannelName> = std::mem::take(&mut follower.subscribed)
            .into_iter()
            .filter(|c| follower.handler.has_subscribers(c))
            .collect();
        // The probe channel first: the liveness of this very connection; then control.
        let mut failed = within(sink.subscribe(&probe)).await.is_err()
            || within(sink.subscribe(CONTROL_CHANNEL)).await.is_err();
        for channel in &wanted {
            if failed || within(sink.subscribe(pubsub_channel(channel))).await.is_err() {
                failed = true;
                break;
            }
            follower.subscribed.insert(channel.clone());
        }
        if failed {
            follower.subscribed.extend(wanted);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
            continue;
        }
        follower.positions.retain(|c, _| follower.subscribed.contains(c));
        let behind: Vec<(ChannelName, Arc<str>, u64)> =
            follower.positions.iter().map(|(c, (e, o))| (c.clone(), e.clone(), *o)).collect();
        let unreadable = follower.catch_up_all(behind).await.is_err();
        if unreadable {
            // Redis answers pub/sub but not reads yet (loading its data): try again, not ready.
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
            continue;
        }
        if connected_before {
            follower.handler.reconnected();
        }
        connected_before = true;
        ready.store(true, Ordering::Release);
        let mut probe_tick = tokio::time::interval(PROBE_EVERY);
        let mut last_probe = tokio::time::Instant::now();
        loop {
            // Unbiased: a flood of messages cannot starve subscription requests or the probe.
            tokio::select! {
                msg = stream.next() => {
                    let Some(msg) = msg else { break };
                    if msg.get_channel_name() == probe {
                        last_probe = tokio::time::Instant::now();
                        continue;
                    }
                    if msg.get_channel_name() == CONTROL_CHANNEL {
                        follower.control_message(msg.get_payload_bytes());
                        continue;
                    }
                    let Some(channel) = channel_of(msg.get_channel_name()) else { continue };
                    follower.note_lag(msg.get_payload_bytes());
                    match decode_message(msg.get_payload_bytes()) {
                        Some(p) => {
                            if follower.deliver(channel, p).await.is_err() {
                                break;
                            }
                        }
                        None => tracing::warn!(%channel, "undecodable message on redis pub/sub"),
                    }
                }
                _ = probe_tick.tick() => {
                    if last_probe.elapsed() > PROBE_DEADLINE {
                        tracing::warn!("redis pub/sub probe did not come back: reconnecting");
                        break;
                    }
                    // Sent on the command connection, received on this one.
                    let commands = follower.reader.commands.clone();
                    let probe = probe.clone();
                    tokio::spawn(async move {
                        let Ok(link) = commands.get().await else { return };
                        let mut conn = link.conn.clone();
                        let sent = ::redis::cmd("PUBLISH").arg(probe).arg("p").exec_async(&mut conn).await;
                        if let Err(e) = sent {
                            commands.failed(&link, &e);
                        }
                    });
                }
                op = ops.recv() => {
                    let Some(op) = op else { return };
                    let result = follower.reconcile(&mut sink, &op.channel).await;
                    let lost = result.as_ref().is_err_and(|r| r.connection_lost);
                    let _ = op.done.send(result.map_err(|r| r.error));
                    if lost {
                        break;
                    }
                }
            }
        }
        ready.store(false, Ordering::Release);
        tracing::warn!("redis pub/sub connection lost; reconnecting");
    }
}

#[async_trait::async_trait]
impl Broker for RedisBroker {
    fn name(&self) -> &'static str {
        "redis"
    }

    /// Connects in the background: the node starts (and answers `/readyz` 503) while Redis is
    /// unreachable.
    async fn start(&self, handler: Arc<dyn BrokerHandler>) -> Result<(), BrokerError> {
        self.handler
            .set(handler.clone())
            .map_err(|_| BrokerError::Backend("already started".into()))?;
        let ops =
            self.ops_rx.lock().take().ok_or(BrokerError::Backend("already started".into()))?;
        tracing::info!(url = %self.display_url, "connecting to redis");
        self.io.handle.spawn(connect_commands(self.commands.clone()));
        let follower = Follower {
            handler,
            control: self.control.clone(),
            sender: self.sender.clone(),
            reader: self.reader.clone(),
            subscribed: HashSet::new(),
            positions: HashMap::new(),
            lateness: self.lateness.clone(),
        };
        let task = run_pubsub(self.client.clone(), follower, ops, self.pubsub_ready.clone());
        self.io.handle.spawn(task);
        Ok(())
    }

    /// One publication is a batch of one (one script for both, see [`PUBLISH_MANY_SCRIPT`]).
    async fn publish(
        &self,
        channel: &ChannelName,
        data: Bytes,
        options: &PublishOptions,
    ) -> Result<Option<StreamPosition>, BrokerError> {
        let item = (channel.clone(), data, *options);
        self.publish_many(vec![item])
            .await
            .pop()
            .unwrap_or(Err(BrokerError::Backend("a publication has no result".into())))
    }

    /// Publications with history go in chunks of [`PUBLISH_MANY_CHUNK`] per script call, the
    /// others as pipelined `PUBLISH`es; every command leaves in item order.
    async fn publish_many(
        &self,
        items: Vec<(ChannelName, Bytes, PublishOptions)>,
    ) -> Vec<Result<Option<StreamPosition>, BrokerError>> {
        let n = items.len();
        let mut results: Vec<Option<Result<Option<StreamPosition>, BrokerError>>> =
            (0..n).map(|_| None).collect();
        let (with, without): (Vec<_>, Vec<_>) =
            items.into_iter().enumerate().partition(|(_, (_, _, o))| o.history_size > 0);
        let link = match self.commands.get().await {
            Ok(link) => link,
            Err(e) => return (0..n).map(|_| Err(e.clone())).collect(),
        };
        // One pipeline, written at once in this order: the plain publishes in item order, then
        // the script calls in chunk order (a channel is all plain or all scripted). Separate
        // futures would each send when first polled, which tokio's budget can reorder.
        let mut pipe = ::redis::pipe();
        pipe.ignore_errors();
        let mut slots: Vec<Vec<usize>> = Vec::new();
        let prefix = origin_prefix(&self.sender);
        for (i, (channel, data, _)) in without {
            let mut message = Vec::with_capacity(prefix.len() + data.len() + 1);
            message.extend_from_slice(prefix.as_bytes());
            message.push(b'n');
            message.extend_from_slice(&data);
            let mut cmd = ::redis::cmd("PUBLISH");
            cmd.arg(pubsub_channel(&channel)).arg(message);
            pipe.add_command(cmd);
            slots.push(vec![i]);
        }
        let plain_count = slots.len();
        let chunks: Vec<Vec<(usize, (ChannelName, Bytes, PublishOptions))>> = {
            let mut chunks = Vec::new();
            let mut it = with.into_iter().peekable();
            while it.peek().is_some() {
                chunks.push(it.by_ref().take(PUBLISH_MANY_CHUNK).collect());
            }
            chunks
        };
        for chunk in chunks {
            // EVALSHA without the automatic load-and-retry: a retried chunk could overtake the
            // next one. The script was loaded when the connection opened.
            let mut call = ::redis::cmd("EVALSHA");
            call.arg(self.publish_many_script.get_hash()).arg(chunk.len());
            // KEYS, then ARGV, written straight into the command (no copy per argument).
            let mut key = String::new();
            for (_, (channel, _, _)) in &chunk {
                key.clear();
                let _ = write!(key, "herald:{{{channel}}}:s");
                call.arg(key.as_str());
            }
            let fresh = history::new_instance_id();
            call.arg(link.run_id.as_ref()).arg(fresh.as_ref()).arg(prefix.as_str());
            let mut order = Vec::with_capacity(chunk.len());
            for (i, (_, data, options)) in &chunk {
                let ttl_ms =
                    u64::try_from(options.history_ttl.as_millis()).unwrap_or(u64::MAX).max(1);
                call.arg(&data[..]).arg(options.history_size).arg(ttl_ms);
                order.push(*i);
            }
            pipe.add_command(call);
            slots.push(order);
        }
        let mut conn = link.conn.clone();
        let replies: Result<Vec<::redis::RedisResult<Value>>, _> =
            pipe.query_async(&mut conn).await;
        let replies = match replies {
            Ok(replies) if replies.len() == slots.len() => replies,
            Ok(_) => return (0..n).map(|_| Err(bad_reply("publish"))).collect(),
            Err(e) => {
                let error = self.commands.failed(&link, &e);
                return (0..n).map(|_| Err(error.clone())).collect();
            }
        };
        for (k, (order, reply)) in slots.into_iter().zip(replies).enumerate() {
            if k < plain_count {
                let r = reply.map(|_| None).map_err(|e| self.commands.failed(&link, &e));
                results[order[0]] = Some(r);
                continue;
            }
            match reply {
                Ok(Value::Array(items)) if items.len() == 2 * order.len() => {
                    for (k, i) in order.into_iter().enumerate() {
                        let position = match (as_u64(&items[2 * k]), as_string(&items[2 * k + 1])) {
                            (Some(offset), Some(epoch)) => {
                                Ok(Some(StreamPosition { offset, epoch }))
                            }
                            _ => Err(bad_reply("publish")),
                        };
                        results[i] = Some(position);
                    }
                }
                Ok(_) => {
                    for i in order {
                        results[i] = Some(Err(bad_reply("publish")));
                    }
                }
                Err(e) => {
                    let error = self.commands.failed(&link, &e);
                    for i in order {
                        results[i] = Some(Err(error.clone()));
                    }
                }
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or(Err(BrokerError::Backend("a publication has no result".into()))))
            .collect()
    }

    async fn subscribe(&self, channel: &ChannelName) -> Result<(), BrokerError> {
        self.reconcile(channel).await
    }

    async fn unsubscribe(&self, channel: &ChannelName) -> Result<(), BrokerError> {
        self.reconcile(channel).await
    }

    async fn history(
        &self,
        channel: &ChannelName,
        options: &PublishOptions,
        query: &HistoryQuery,
    ) -> Result<HistoryPage, BrokerError> {
        if options.history_size == 0 {
            return Ok(HistoryPage::default());
        }
        self.reader.read(channel, Some(options.history_ttl), query).await
    }

    /// `PUBLISH herald:control "<sender> <message>"`.
    async fn send_control(&self, message: Bytes) -> Result<(), BrokerError> {
        let link = self.commands.get().await?;
        let mut conn = link.conn.clone();
        let mut payload = Vec::with_capacity(self.sender.len() + 1 + message.len());
        payload.extend_from_slice(self.sender.as_bytes());
        payload.push(b' ');
        payload.extend_from_slice(&message);
        ::redis::cmd("PUBLISH")
            .arg(CONTROL_CHANNEL)
            .arg(payload)
            .exec_async(&mut conn)
            .await
            .map_err(|e| self.commands.failed(&link, &e))
    }

    fn set_control(&self, handler: ControlHandler) {
        let _ = self.control.set(handler);
    }

    /// `herald:node:<id>` holds the info (expiring after `ttl`), the set `herald:nodes` the ids.
    async fn announce(&self, id: &str, info: Bytes, ttl: Duration) -> Result<(), BrokerError> {
        let link = self.commands.get().await?;
        let mut conn = link.conn.clone();
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        ::redis::pipe()
            .cmd("SET")
            .arg(format!("{NODE_KEY}{id}"))
            .arg(info.as_ref())
            .arg("PX")
            .arg(ttl_ms)
            .ignore()
            .cmd("SADD")
            .arg(NODES_KEY)
            .arg(id)
            .ignore()
            .exec_async(&mut conn)
            .await
            .map_err(|e| self.commands.failed(&link, &e))
    }

    /// The ids in `herald:nodes` whose info has not expired; the others are removed.
    async fn nodes(&self) -> Result<Option<Vec<(String, Bytes)>>, BrokerError> {
        let link = self.commands.get().await?;
        let mut conn = link.conn.clone();
        let ids: Vec<String> = ::redis::cmd("SMEMBERS")
            .arg(NODES_KEY)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.commands.failed(&link, &e))?;
        if ids.is_empty() {
            return Ok(Some(Vec::new()));
        }
        let keys: Vec<String> = ids.iter().map(|id| format!("{NODE_KEY}{id}")).collect();
        let infos: Vec<Option<Vec<u8>>> = ::redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.commands.failed(&link, &e))?;
        let mut alive = Vec::new();
        let mut gone = Vec::new();
        for (id, info) in ids.into_iter().zip(infos) {
            match info {
                Some(info) => alive.push((id, Bytes::from(info))),
                None => gone.push(id),
            }
        }
        if !gone.is_empty() {
            let _: Result<(), _> =
                ::redis::cmd("SREM").arg(NODES_KEY).arg(&gone).exec_async(&mut conn).await;
        }
        alive.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(Some(alive))
    }

    fn is_behind(&self) -> bool {
        self.lateness.is_behind()
    }

    fn is_ready(&self) -> bool {
        self.commands.is_connected() && self.pubsub_ready.load(Ordering::Acquire)
    }
}

impl Reader {
    /// The channel's position and the history `query` asks for (see [`Broker::history`]);
    /// `ttl` is the channel's, for positions read while it had no stream.
    async fn read(
        &self,
        channel: &ChannelName,
        ttl: Option<Duration>,
        query: &HistoryQuery,
    ) -> Result<HistoryPage, BrokerError> {
        let link = self.commands.get().await?;
        let mut conn = link.conn.clone();
        // Unknown (a catch-up of a channel whose TTL this task does not know): the script
        // judges a void position with the TTL the stream was created with.
        let ttl_ms: i64 = ttl.map_or(-1, |t| i64::try_from(t.as_millis()).unwrap_or(i64::MAX));
        let void = query.since.as_ref().and_then(|s| VoidEpoch::parse(&s.epoch));
        let (mode, epoch, offset, at, void_instance) = match (&query.since, &void) {
            (None, _) => ("n", "", 0, 0, ""),
            (Some(s), Some(v)) => ("v", "", s.offset, v.at_ms, v.instance),
            (Some(s), None) => ("s", s.epoch.as_str(), s.offset, 0, ""),
        };
        let limit: i64 = query.limit.map_or(-1, |l| i64::try_from(l).unwrap_or(i64::MAX));
        let reply: Value = self
            .script
            .key(stream_key(channel))
            .arg(mode)
            .arg(epoch)
            .arg(offset)
            .arg(limit)
            .arg(at)
            .arg(ttl_ms)
            .arg(void_instance)
            .arg(link.run_id.as_ref())
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.commands.failed(&link, &e))?;
        let Value::Array(items) = reply else { return Err(bad_reply("history")) };
        let now = items.first().and_then(as_u64).ok_or_else(|| bad_reply("history"))?;
        let instance = items.get(1).and_then(as_string).ok_or_else(|| bad_reply("history"))?;
        // A void position counts only if it was read from this Redis data set.
        let void = void.filter(|v| v.instance == instance);
        if items.len() == 2 {
            // No stream: position 0 of a void epoch of this read.
            let complete = void.is_some_and(|v| ttl.is_some_and(|t| v.covers(now, t)))
                && query.since.as_ref().is_some_and(|s| s.offset == 0);
            let epoch = VoidEpoch { instance: &instance, at_ms: now }.encode();
            return Ok(HistoryPage {
                position: Some(StreamPosition { offset: 0, epoch }),
                publications: Vec::new(),
                complete,
                more: false,
            });
        }
        let field = |i: usize| items.get(i).ok_or_else(|| bad_reply("history"));
        let epoch: Arc<str> = Arc::from(as_string(field(2)?).ok_or_else(|| bad_reply("history"))?);
        let top = as_u64(field(3)?).ok_or_else(|| bad_reply("history"))?;
        let complete = as_u64(field(4)?) == Some(1);
        let first = as_u64(field(5)?).ok_or_else(|| bad_reply("history"))?;
        let mut publications = Vec::with_capacity(items.len().saturating_sub(6));
        for (k, item) in items[6..].iter().enumerate() {
            let Value::BulkString(data) = item else { return Err(bad_reply("history")) };
            publications.push(Publication {
                offset: Some(first + k as u64),
                epoch: Some(epoch.clone()),
                data: Bytes::copy_from_slice(data),
            });
        }
        Ok(HistoryPage {
            position: Some(StreamPosition { offset: top, epoch: epoch.to_string() }),
            publications,
            complete: complete && query.since.is_some(),
            more: false,
        })
    }
}

impl RedisBroker {
    /// This broker's id: in control messages and in the origin (`t<node> <ms>`) of its
    /// publications.
    pub fn node_id(&self) -> &str {
        &self.sender
    }

    /// Asks the pub/sub task to bring `channel`'s subscription in line with the hub and waits
    /// until it has.
    async fn reconcile(&self, channel: &ChannelName) -> Result<(), BrokerError> {
        let (done, answer) = oneshot::channel();
        self.ops
            .send(SubOp { channel: channel.clone(), done })
            .map_err(|_| BrokerError::Unavailable("the redis broker is not started"))?;
        // Bounded: the request stays queued and is still applied in order against the hub (a
        // later one reconciles again), but the subscriber waiting for it gets 503.
        match tokio::time::timeout(RECONCILE_TIMEOUT, answer).await {
            Ok(answer) => {
                answer.map_err(|_| BrokerError::Unavailable("the redis broker stopped"))?
            }
            Err(_) => Err(BrokerError::Unavailable("redis did not confirm the subscription")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_their_format() {
        let p = decode_message(b"h42 abcd1234 {\"a\": 1}").unwrap();
        assert_eq!((p.offset, p.epoch.as_deref()), (Some(42), Some("abcd1234")));
        assert_eq!(&p.data[..], b"{\"a\": 1}");
        let p = decode_message(b"n[1, 2]").unwrap();
        assert_eq!((p.offset, p.epoch), (None, None));
        assert_eq!(&p.data[..], b"[1, 2]");
        for bad in [&b""[..], b"x1", b"h", b"hx e d", b"h1 e"] {
            assert!(decode_message(bad).is_none(), "{bad:?}");
        }
        // With the publishing node and time in front.
        let with = b"tabcd1234 1700000000000 h42 abcd1234 {}";
        let (origin, _) = split_origin(with);
        assert_eq!(origin, Some((&b"abcd1234"[..], 1_700_000_000_000)));
        let p = decode_message(with).unwrap();
        assert_eq!((p.offset, &p.data[..]), (Some(42), &b"{}"[..]));
        assert!(decode_message(b"tnode 12 n[]").is_some_and(|p| p.offset.is_none()));
    }

    #[test]
    fn channel_names_map_to_hash_tagged_keys_and_back() {
        let c = ChannelName::parse("market:btc/usd#u1,u2").unwrap();
        assert_eq!(stream_key(&c), "herald:{market:btc/usd#u1,u2}:s");
        assert_eq!(channel_of(&pubsub_channel(&c)), Some(c));
        assert_eq!(channel_of("other"), None);
    }

    #[test]
    fn passwords_stay_out_of_logs() {
        assert_eq!(without_password("redis://u:secret@h:1/0"), "redis://u:***@h:1/0");
        assert_eq!(without_password("redis://h:1"), "redis://h:1");
        assert_eq!(without_password("redis://u@h:1"), "redis://u@h:1");
    }
}
