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

mod commands;
mod slots;

use self::commands::{is_redirect, Cluster, Commands, Link, Target};
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
/// KEYS are each publication's stream hash (all in one slot on a Redis Cluster); ARGV: the
/// Redis process id, a fresh epoch, the message prefix (the publishing node and time, see the
/// module docs), the publish command (`PUBLISH`, or `SPUBLISH` on a Redis Cluster), then per
/// publication its data, history size and TTL (ms). The pub/sub channel is the key without its
/// `:s`. Returns `{offset1, epoch1, offset2, epoch2, ...}`. A batch shares the script call's own
/// cost; a single publication is a batch of one.
pub const PUBLISH_MANY_SCRIPT: &str = r#"
local run, fresh, prefix, verb = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for i = 1, #KEYS do
  local s = KEYS[i]
  local j = 3 * i + 2
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
  redis.call(verb, string.sub(s, 1, -3), prefix .. 'h' .. top .. ' ' .. epoch .. ' ' .. data)
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

/// The pub/sub channel of control messages between nodes. Its own names, like every name below,
/// lie outside the `herald:{C}` space of channels (a Herald channel may be called `control`);
/// the hash tags put each on one slot of a Redis Cluster.
const CONTROL_CHANNEL: &str = "herald:control:{control}";
/// The set of announced node ids (the registry's keys share one slot).
const NODES_KEY: &str = "herald:nodes:{nodes}";
/// Prefix of the key holding one node's announced info.
const NODE_KEY: &str = "herald:nodes:{nodes}:";
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
    /// Where the pub/sub connection goes.
    subscriptions: SubscriptionTarget,
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

/// Reads positions and history ([`READ_SCRIPT`]) on the command connections.
#[derive(Clone)]
struct Reader {
    commands: Arc<Commands>,
    script: Script,
}

/// Where a node's pub/sub connection goes.
#[derive(Clone)]
enum SubscriptionTarget {
    /// One Redis: `SUBSCRIBE` on a RESP2 pub/sub connection.
    Single(::redis::Client),
    /// A Redis Cluster: sharded pub/sub (`SSUBSCRIBE`) through redis-rs's cluster connection
    /// (RESP3), which sends each subscription to the master of its slot.
    Cluster {
        /// Each configured node's URL.
        urls: Vec<String>,
        /// `redis[s]://[user:pass@]`: with `host:port` appended, a node's URL.
        prefix: String,
        tls: RedisTls,
    },
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
        let (target, subscriptions) =
            if url.starts_with("redis-cluster://") || url.starts_with("rediss-cluster://") {
                cluster_targets(url, tls)?
            } else {
                let client = client_for(url, tls)?;
                (Target::Single(client.clone()), SubscriptionTarget::Single(client))
            };
        let (ops, ops_rx) = mpsc::unbounded_channel();
        let io = Arc::new(IoThread::start("herald-redis")?);
        let commands = Commands::new(target, [PUBLISH_MANY_SCRIPT, READ_SCRIPT], io.handle.clone());
        Ok(RedisBroker {
            subscriptions,
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

/// The command and subscription targets of a `redis-cluster://[user:pass@]H1:P1,H2:P2,...`
/// URL (`rediss-cluster://` for TLS): any reachable node of the list tells where the others
/// are.
fn cluster_targets(url: &str, tls: &RedisTls) -> Result<(Target, SubscriptionTarget), BrokerError> {
    let shown = without_password(url);
    let bad = |why: &str| BrokerError::Backend(format!("bad redis cluster URL {shown}: {why}"));
    let (scheme, rest) = match url.split_once("-cluster://") {
        Some(("redis", rest)) => ("redis", rest),
        Some(("rediss", rest)) => ("rediss", rest),
        _ => return Err(bad("expected redis-cluster:// or rediss-cluster://")),
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let (userinfo, hosts) = match rest.rsplit_once('@') {
        Some((user, hosts)) => (format!("{user}@"), hosts),
        None => (String::new(), rest),
    };
    let mut seeds: Vec<Arc<str>> = Vec::new();
    for host in hosts.split(',').map(str::trim) {
        let port = host.rsplit_once(':').and_then(|(h, p)| (!h.is_empty()).then_some(p));
        if port.and_then(|p| p.parse::<u16>().ok()).is_none_or(|p| p == 0) || host.contains('/') {
            return Err(bad(&format!(
                "{host:?} is not HOST:PORT (a cluster has one database; list nodes with commas)"
            )));
        }
        seeds.push(Arc::from(host));
    }
    let prefix = format!("{scheme}://{userinfo}");
    let urls: Vec<String> = seeds.iter().map(|s| format!("{prefix}{s}")).collect();
    for url in &urls {
        client_for(url, tls)?;
    }
    let target = Target::Cluster(Cluster::new(prefix.clone(), tls.clone(), seeds));
    Ok((target, SubscriptionTarget::Cluster { urls, prefix, tls: tls.clone() }))
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

/// The hash slot of a channel's keys and pub/sub channel on a Redis Cluster (channel names
/// have no braces, so the tag `{C}` is the whole name).
fn channel_slot(channel: &ChannelName) -> u16 {
    slots::slot(channel.as_str().as_bytes())
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
                if !self.catch_up(&channel, &epoch, from, Some(missing), None).await? {
                    // The subscribers were told and recover by themselves; the channel's
                    // position is what history said, which this message may lie behind.
                    return Ok(());
                }
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
    /// `Ok(false)`: the gap could not be filled and the subscribers were told.
    async fn catch_up(
        &mut self,
        channel: &ChannelName,
        epoch: &Arc<str>,
        from: u64,
        limit: Option<usize>,
        mut first: Option<HistoryPage>,
    ) -> Result<bool, Unreadable> {
        // A gap of known length must be filled exactly; after a reconnect, whatever is there
        // (at most MAX_CATCH_UP). Read page by page: a long gap never comes as one reply.
        let exact = limit.is_some();
        let budget = limit.unwrap_or(MAX_CATCH_UP);
        if budget > MAX_CATCH_UP {
            self.lose(channel, None);
            return Ok(false);
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
                return Ok(false);
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
        Ok(true)
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
                    // A gap history cannot fill was told to the subscribers already.
                    let _filled = self.catch_up(&channel, &epoch, from, None, Some(page)).await?;
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
        link: &mut Subscription,
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
                link.subscribe(&name).await.map_err(lost)?;
                self.subscribed.insert(channel.clone());
            }
            (false, true) => {
                link.unsubscribe(&name).await.map_err(lost)?;
                self.subscribed.remove(channel);
                self.positions.remove(channel);
            }
            _ => {}
        }
        Ok(())
    }

    /// Catches `channel` up from its position (after the cluster moved its subscription).
    async fn catch_up_one(&mut self, channel: &ChannelName) -> Result<(), Unreadable> {
        let behind: Vec<(ChannelName, Arc<str>, u64)> = self
            .positions
            .get(channel)
            .map(|(e, o)| (channel.clone(), e.clone(), *o))
            .into_iter()
            .collect();
        self.catch_up_all(behind).await
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

/// A node's open pub/sub connection.
enum Subscription {
    /// To one Redis (RESP2, `SUBSCRIBE`).
    Single { sink: ::redis::aio::PubSubSink, stream: ::redis::aio::PubSubStream },
    /// To a Redis Cluster: redis-rs's cluster connection (RESP3), sharded pub/sub; messages and
    /// subscription changes arrive on `pushes`. `requested` counts the confirmations of this
    /// node's own `SSUBSCRIBE` / `SUNSUBSCRIBE` calls not seen yet: any other is the cluster
    /// moving a subscription by itself.
    Cluster {
        conn: ::redis::cluster_async::ClusterConnection,
        pushes: mpsc::UnboundedReceiver<::redis::PushInfo>,
        requested: HashMap<(bool, Vec<u8>), u32>,
    },
}

/// What the pub/sub connection reports.
enum Event {
    /// A message.
    Message(::redis::Msg),
    /// The cluster dropped the subscription of a channel by itself (its slot moved to another
    /// master): subscribe again, and catch up.
    Dropped(String),
    /// The cluster subscribed a channel again by itself: catch up.
    Resubscribed(String),
}

impl Subscription {
    /// Opens the pub/sub connection of `target`.
    /// Opens the pub/sub connection of `target`; on a cluster, starting from the masters the
    /// command side knows (they answered), else from the configured nodes (redis-rs asks its
    /// initial nodes one by one: a listed node that hangs would take every attempt's time).
    async fn open(
        target: &SubscriptionTarget,
        commands: &Commands,
    ) -> Result<Subscription, ::redis::RedisError> {
        match target {
            SubscriptionTarget::Single(client) => {
                let (sink, stream) = within(client.get_async_pubsub()).await?.split();
                Ok(Subscription::Single { sink, stream })
            }
            SubscriptionTarget::Cluster { urls, prefix, tls } => {
                let known: Vec<String> = match commands.slot_map() {
                    Some(map) => map.masters().iter().map(|m| format!("{prefix}{m}")).collect(),
                    None => Vec::new(),
                };
                let initial = if known.is_empty() { urls.clone() } else { known };
                let (tx, pushes) = mpsc::unbounded_channel();
                let mut builder = ::redis::cluster::ClusterClientBuilder::new(initial)
                    .use_protocol(::redis::ProtocolVersion::RESP3)
                    .push_sender(tx)
                    .connection_timeout(REDIS_TIMEOUT)
                    .response_timeout(REDIS_TIMEOUT)
                    .retries(3)
                    .min_retry_wait(20)
                    .max_retry_wait(200);
                if tls.ca_pem.is_some() || tls.client.is_some() {
                    builder = builder.certs(::redis::TlsCertificates {
                        client_tls: tls.client.as_ref().map(|(cert, key)| {
                            ::redis::ClientTlsConfig {
                                client_cert: cert.clone(),
                                client_key: key.clone(),
                            }
                        }),
                        root_cert: tls.ca_pem.clone(),
                    });
                }
                let conn = within(builder.build()?.get_async_connection()).await?;
                Ok(Subscription::Cluster { conn, pushes, requested: HashMap::new() })
            }
        }
    }

    async fn subscribe(&mut self, name: &str) -> Result<(), ::redis::RedisError> {
        match self {
            Subscription::Single { sink, .. } => within(sink.subscribe(name)).await,
            Subscription::Cluster { conn, requested, .. } => {
                let key = (true, name.as_bytes().to_vec());
                *requested.entry(key.clone()).or_default() += 1;
                let done = within(conn.ssubscribe(name)).await;
                if done.is_err() {
                    // Whether a confirmation comes is unknown: a later one counts as the
                    // cluster's, which costs at most one catch-up read.
                    requested.remove(&key);
                }
                done
            }
        }
    }

    async fn unsubscribe(&mut self, name: &str) -> Result<(), ::redis::RedisError> {
        match self {
            Subscription::Single { sink, .. } => within(sink.unsubscribe(name)).await,
            Subscription::Cluster { conn, requested, .. } => {
                let key = (false, name.as_bytes().to_vec());
                *requested.entry(key.clone()).or_default() += 1;
                let done = within(conn.sunsubscribe(name)).await;
                if done.is_err() {
                    requested.remove(&key);
                }
                done
            }
        }
    }

    /// The next event; `None` when the connection (or, in a cluster, any node's) is lost.
    async fn next(&mut self) -> Option<Event> {
        match self {
            Subscription::Single { stream, .. } => stream.next().await.map(Event::Message),
            Subscription::Cluster { pushes, requested, .. } => loop {
                let push = pushes.recv().await?;
                let name = |push: &::redis::PushInfo| match push.data.first() {
                    Some(Value::BulkString(b)) => b.clone(),
                    _ => Vec::new(),
                };
                let own = |requested: &mut HashMap<(bool, Vec<u8>), u32>, key| {
                    let Some(n) = requested.get_mut(&key) else { return false };
                    *n -= 1;
                    if *n == 0 {
                        requested.remove(&key);
                    }
                    true
                };
                match push.kind {
                    ::redis::PushKind::SMessage => {
                        if let Some(msg) = ::redis::Msg::from_push_info(push) {
                            return Some(Event::Message(msg));
                        }
                    }
                    ::redis::PushKind::Disconnection => return None,
                    ::redis::PushKind::SSubscribe => {
                        let name = name(&push);
                        if !own(requested, (true, name.clone())) {
                            return Some(Event::Resubscribed(lossy(name)));
                        }
                    }
                    ::redis::PushKind::SUnsubscribe => {
                        let name = name(&push);
                        if !own(requested, (false, name.clone())) {
                            return Some(Event::Dropped(lossy(name)));
                        }
                    }
                    _ => {}
                }
            },
        }
    }
}

fn lossy(name: Vec<u8>) -> String {
    String::from_utf8_lossy(&name).into_owned()
}

/// The node's probes of its own pub/sub connection: one probe channel on one Redis; on a
/// cluster, one per master (a channel whose slot that master serves). Every second a message
/// is published on each through the command connections, and each must come back within
/// [`PROBE_DEADLINE`] through the same queue as every message: a connection that died or was
/// replaced without a word, a subscription the cluster dropped, or a backlog in the queue all
/// make the task reconnect and catch up.
struct Probes {
    /// Each probe channel and when its message last came back.
    channels: Vec<(String, tokio::time::Instant)>,
    /// The master each covers, in the same order (empty on one Redis).
    masters: Vec<Arc<str>>,
}

impl Probes {
    /// Probe channels for the Redis or every master the slot map names now.
    fn new(commands: &Commands, node: &str) -> Probes {
        let now = tokio::time::Instant::now();
        let Some(map) = commands.slot_map() else {
            let channel = format!("herald:probe:{{{node}}}");
            return Probes { channels: vec![(channel, now)], masters: Vec::new() };
        };
        let mut channels = Vec::new();
        let mut masters = Vec::new();
        for master in map.masters() {
            // A tag whose slot this master serves: about 16,384 tries for a master of one
            // slot, a few for a master of many.
            let found = (0..2_000_000u32)
                .map(|n| format!("herald:probe:{{{node}.{n}}}"))
                .find(|c| map.owner(slots::slot(c.as_bytes())) == Some(&master));
            if let Some(c) = found {
                channels.push((c, now));
                masters.push(master);
            }
        }
        Probes { channels, masters }
    }

    fn contains(&self, name: &str) -> bool {
        self.channels.iter().any(|(c, _)| c == name)
    }

    /// Notes a probe message that came back.
    fn returned(&mut self, name: &str) -> bool {
        match self.channels.iter_mut().find(|(c, _)| c == name) {
            Some((_, last)) => {
                *last = tokio::time::Instant::now();
                true
            }
            None => false,
        }
    }

    /// Whether every probe came back in time and the probes still cover every master; then
    /// sends the next round.
    fn check_and_send(&self, commands: &Arc<Commands>) -> bool {
        if self.channels.iter().any(|(_, last)| last.elapsed() > PROBE_DEADLINE) {
            return false;
        }
        if commands.is_cluster() {
            // Every master has a probe, each still on a slot of its master (a slot moved or a
            // master replaced makes the probes measure the wrong connections).
            let Some(map) = commands.slot_map() else { return false };
            let covered = self
                .channels
                .iter()
                .zip(&self.masters)
                .all(|((c, _), m)| map.owner(slots::slot(c.as_bytes())) == Some(m));
            if !covered || map.masters() != self.masters {
                tracing::info!("the redis cluster's masters or slots changed: subscribing again");
                return false;
            }
        }
        let verb = if commands.is_cluster() { "SPUBLISH" } else { "PUBLISH" };
        for (channel, _) in &self.channels {
            let sender = commands.clone();
            let channel = channel.clone();
            tokio::spawn(async move {
                let slot = slots::slot(channel.as_bytes());
                let _ = sender
                    .run(slot, |_| {
                        let mut cmd = ::redis::cmd(verb);
                        cmd.arg(&channel).arg("p");
                        cmd
                    })
                    .await;
            });
        }
        true
    }
}

/// The pub/sub task: one connection (on a cluster, redis-rs's connection to every master),
/// subscribed to what the hub wants, handing messages over in order; reconnects when the
/// connection is lost, resubscribes, and catches each channel up from history.
async fn run_pubsub(
    target: SubscriptionTarget,
    mut follower: Follower,
    mut ops: mpsc::UnboundedReceiver<SubOp>,
    ready: Arc<AtomicBool>,
) {
    let _not_ready_after = crate::io_thread::ClearOnExit(ready.clone());
    // This node's own probe channels are `herald:probe:{<id>...}`, outside the `herald:{C}`
    // space of Herald channels.
    let node = history::new_instance_id();
    let commands = follower.reader.commands.clone();
    let mut connected_before = false;
    let mut backoff = Duration::from_millis(50);
    loop {
        if commands.is_cluster() && commands.slot_map().is_none() {
            let _ = commands.refresh().await;
        }
        let mut link = match Subscription::open(&target, &commands).await {
            Ok(link) => link,
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
        // Resubscribe what the hub still wants, then catch each channel up: what was
        // published while the connection was down is in history.
        let wanted: Vec<ChannelName> = std::mem::take(&mut follower.subscribed)
            .into_iter()
            .filter(|c| follower.handler.has_subscribers(c))
            .collect();
        // The probe channels first (the liveness of this very connection); then control.
        if commands.is_cluster() {
            // The masters the probes must cover, as the cluster says now.
            let _ = commands.refresh().await;
        }
        let mut probes = Probes::new(&commands, &node);
        let mut failed = false;
        for (channel, _) in &probes.channels {
            failed = failed || link.subscribe(channel).await.is_err();
        }
        failed = failed || link.subscribe(CONTROL_CHANNEL).await.is_err();
        for channel in &wanted {
            if failed || link.subscribe(&pubsub_channel(channel)).await.is_err() {
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
        for (_, last) in &mut probes.channels {
            *last = tokio::time::Instant::now();
        }
        loop {
            // Unbiased: a flood of messages cannot starve subscription requests or the probe.
            tokio::select! {
                event = link.next() => {
                    let Some(event) = event else { break };
                    let msg = match event {
                        Event::Message(msg) => msg,
                        Event::Dropped(name) => {
                            // The slot moved: subscribe where it is now, then read what was
                            // published meanwhile.
                            let channel = channel_of(&name);
                            let wanted = name == CONTROL_CHANNEL
                                || probes.contains(&name)
                                || channel.as_ref().is_some_and(|c| follower.subscribed.contains(c));
                            if wanted && link.subscribe(&name).await.is_err() {
                                break;
                            }
                            if let Some(channel) = channel.filter(|_| wanted) {
                                if follower.catch_up_one(&channel).await.is_err() {
                                    break;
                                }
                            }
                            continue;
                        }
                        Event::Resubscribed(name) => {
                            if let Some(channel) = channel_of(&name) {
                                if follower.subscribed.contains(&channel)
                                    && follower.catch_up_one(&channel).await.is_err()
                                {
                                    break;
                                }
                            }
                            continue;
                        }
                    };
                    if probes.returned(msg.get_channel_name()) {
                        continue;
                    }
                    if msg.get_channel_name() == CONTROL_CHANNEL {
                        follower.control_message(msg.get_payload_bytes());
                        continue;
                    }
                    let Some(channel) = channel_of(msg.get_channel_name()) else { continue };
                    follower.note_lag(msg.get_payload_bytes());
                    if !follower.subscribed.contains(&channel) {
                        // Sent before an unsubscribe took effect: nobody here wants it (and
                        // its position would outlive the subscription).
                        continue;
                    }
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
                    if !probes.check_and_send(&commands) {
                        tracing::warn!("redis pub/sub probe did not come back: reconnecting");
                        break;
                    }
                }
                op = ops.recv() => {
                    let Some(op) = op else { return };
                    let result = follower.reconcile(&mut link, &op.channel).await;
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

/// Publications of a batch that go as one command: one without history (`PUBLISH`), or up to
/// [`PUBLISH_MANY_CHUNK`] with history, of one slot on a Redis Cluster ([`PUBLISH_MANY_SCRIPT`]).
struct Unit {
    slot: u16,
    scripted: bool,
    /// Each publication's index in the batch, channel, data and options.
    items: Vec<(usize, ChannelName, Bytes, PublishOptions)>,
}

type Results = Vec<Option<Result<Option<StreamPosition>, BrokerError>>>;

impl Unit {
    /// A batch's commands, each channel's in item order. On one Redis a chunk mixes channels
    /// (every slot is 0); on a cluster a chunk holds one channel: a script with keys of
    /// several channels is refused (`TRYAGAIN`) while some of them are migrating and others
    /// not, and the next chunk of one of them could then run first. A channel is all plain or
    /// all scripted, so each channel's publications stay in order.
    fn split(items: Vec<(ChannelName, Bytes, PublishOptions)>, cluster: bool) -> Vec<Unit> {
        let mut units: Vec<Unit> = Vec::new();
        // The chunk still being filled, of each channel (cluster) or of all (one Redis).
        let mut filling: HashMap<Option<ChannelName>, usize> = HashMap::new();
        for (i, (channel, data, options)) in items.into_iter().enumerate() {
            let slot = if cluster { channel_slot(&channel) } else { 0 };
            let group = cluster.then(|| channel.clone());
            let item = (i, channel, data, options);
            if options.history_size == 0 {
                units.push(Unit { slot, scripted: false, items: vec![item] });
                continue;
            }
            match filling.get(&group) {
                Some(&u) if units[u].items.len() < PUBLISH_MANY_CHUNK => units[u].items.push(item),
                _ => {
                    filling.insert(group, units.len());
                    units.push(Unit { slot, scripted: true, items: vec![item] });
                }
            }
        }
        units
    }

    /// The command of this unit on `link` (whose Redis process id the script gets).
    fn command(&self, link: &Link, prefix: &str, verb: &str, broker: &RedisBroker) -> ::redis::Cmd {
        if !self.scripted {
            let (_, channel, data, _) = &self.items[0];
            let mut message = Vec::with_capacity(prefix.len() + data.len() + 1);
            message.extend_from_slice(prefix.as_bytes());
            message.push(b'n');
            message.extend_from_slice(data);
            let mut cmd = ::redis::cmd(verb);
            cmd.arg(pubsub_channel(channel)).arg(message);
            return cmd;
        }
        // EVALSHA without the automatic load-and-retry: a retried chunk could overtake the
        // next one. The script was loaded when the connection opened.
        let mut call = ::redis::cmd("EVALSHA");
        call.arg(broker.publish_many_script.get_hash()).arg(self.items.len());
        // KEYS, then ARGV, written straight into the command (no copy per argument).
        let mut key = String::new();
        for (_, channel, _, _) in &self.items {
            key.clear();
            let _ = write!(key, "herald:{{{channel}}}:s");
            call.arg(key.as_str());
        }
        let fresh = history::new_instance_id();
        call.arg(link.run_id.as_ref()).arg(fresh.as_ref()).arg(prefix).arg(verb);
        for (_, _, data, options) in &self.items {
            let ttl_ms = u64::try_from(options.history_ttl.as_millis()).unwrap_or(u64::MAX).max(1);
            call.arg(&data[..]).arg(options.history_size).arg(ttl_ms);
        }
        call
    }

    /// Records the result of each publication of this unit from the command's `reply`.
    fn settle(&self, reply: Result<Value, BrokerError>, results: &mut Results) {
        let mut put = |k: usize, r| results[self.items[k].0] = Some(r);
        match reply {
            Err(e) => (0..self.items.len()).for_each(|k| put(k, Err(e.clone()))),
            Ok(_) if !self.scripted => put(0, Ok(None)),
            Ok(Value::Array(values)) if values.len() == 2 * self.items.len() => {
                for k in 0..self.items.len() {
                    let position = match (as_u64(&values[2 * k]), as_string(&values[2 * k + 1])) {
                        (Some(offset), Some(epoch)) => Ok(Some(StreamPosition { offset, epoch })),
                        _ => Err(bad_reply("publish")),
                    };
                    put(k, position);
                }
            }
            Ok(_) => (0..self.items.len()).for_each(|k| put(k, Err(bad_reply("publish")))),
        }
    }
}

#[async_trait::async_trait]
impl Broker for RedisBroker {
    fn name(&self) -> &'static str {
        if self.commands.is_cluster() {
            "redis-cluster"
        } else {
            "redis"
        }
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
        self.io.handle.spawn(self.commands.clone().maintain());
        let follower = Follower {
            handler,
            control: self.control.clone(),
            sender: self.sender.clone(),
            reader: self.reader.clone(),
            subscribed: HashSet::new(),
            positions: HashMap::new(),
            lateness: self.lateness.clone(),
        };
        let task = run_pubsub(self.subscriptions.clone(), follower, ops, self.pubsub_ready.clone());
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

    /// Publications with history go in chunks of [`PUBLISH_MANY_CHUNK`] per script call (of
    /// one slot on a Redis Cluster), the others as pipelined `PUBLISH`es; each Redis gets one
    /// pipeline, every command in item order. Commands that met a redirect (they did not run)
    /// go again one by one, in the same order.
    async fn publish_many(
        &self,
        items: Vec<(ChannelName, Bytes, PublishOptions)>,
    ) -> Vec<Result<Option<StreamPosition>, BrokerError>> {
        let n = items.len();
        let mut results: Vec<Option<Result<Option<StreamPosition>, BrokerError>>> =
            (0..n).map(|_| None).collect();
        let units = Unit::split(items, self.commands.is_cluster());
        let prefix = origin_prefix(&self.sender);
        let verb = if self.commands.is_cluster() { "SPUBLISH" } else { "PUBLISH" };
        let command = |unit: &Unit, link: &Link| unit.command(link, &prefix, verb, self);
        // One pipeline per Redis, written at once in unit order. Separate futures would each
        // send when first polled, which tokio's budget can reorder.
        let mut pipelines: Vec<(Link, ::redis::Pipeline, Vec<usize>)> = Vec::new();
        // Each slot's master, looked up once: every unit of a channel goes to one master in
        // one pipeline, in order (a map refreshed between two lookups could split them).
        let mut owners: HashMap<u16, Result<Link, BrokerError>> = HashMap::new();
        for (u, unit) in units.iter().enumerate() {
            if let std::collections::hash_map::Entry::Vacant(owner) = owners.entry(unit.slot) {
                owner.insert(self.commands.get(unit.slot).await);
            }
            let link = match &owners[&unit.slot] {
                Ok(link) => link.clone(),
                Err(e) => {
                    unit.settle(Err(e.clone()), &mut results);
                    continue;
                }
            };
            let k = match pipelines.iter().position(|(l, _, _)| l.addr == link.addr) {
                Some(k) => k,
                None => {
                    let mut pipe = ::redis::pipe();
                    pipe.ignore_errors();
                    pipelines.push((link.clone(), pipe, Vec::new()));
                    pipelines.len() - 1
                }
            };
            let (link, pipe, order) = &mut pipelines[k];
            pipe.add_command(command(unit, link));
            order.push(u);
        }
        let sent = pipelines.into_iter().map(|(link, pipe, order)| async move {
            let mut conn = link.conn.clone();
            let replies: Result<Vec<::redis::RedisResult<Value>>, _> =
                pipe.query_async(&mut conn).await;
            (link, order, replies)
        });
        let mut again = Vec::new();
        for (link, order, replies) in futures_util::future::join_all(sent).await {
            let replies = match replies {
                Ok(replies) if replies.len() == order.len() => replies,
                Ok(_) => {
                    for u in order {
                        units[u].settle(Err(bad_reply("publish")), &mut results);
                    }
                    continue;
                }
                Err(e) => {
                    let error = self.commands.failed(&link, &e);
                    for u in order {
                        units[u].settle(Err(error.clone()), &mut results);
                    }
                    continue;
                }
            };
            // Backwards, so that a unit that met a redirect is sent again only if no later unit
            // of one of its channels was stored meanwhile (that would put the channel out of
            // order); otherwise its publisher gets an error and decides.
            // The set is kept only when some unit met a redirect (never on the usual path).
            let redirected = replies.iter().any(|r| r.as_ref().is_err_and(is_redirect));
            let mut stored_later: HashSet<&ChannelName> = HashSet::new();
            let mut pending = Vec::new();
            for (u, reply) in order.into_iter().zip(replies).rev() {
                let unit = &units[u];
                match reply {
                    Err(e) if is_redirect(&e) => {
                        if unit.items.iter().any(|(_, c, _, _)| stored_later.contains(c)) {
                            let error = BrokerError::Unavailable(
                                "redis moved the channel while a later publication of it was stored",
                            );
                            unit.settle(Err(error), &mut results);
                        } else {
                            pending.push(u);
                        }
                    }
                    Err(e) => unit.settle(Err(self.commands.failed(&link, &e)), &mut results),
                    Ok(value) => {
                        if redirected {
                            stored_later.extend(unit.items.iter().map(|(_, c, _, _)| c));
                        }
                        unit.settle(Ok(value), &mut results);
                    }
                }
            }
            again.extend(pending);
        }
        // One deadline for every retry: a batch of many channels never waits 2 s per channel.
        again.sort_unstable();
        let deadline = std::time::Instant::now() + REDIS_TIMEOUT;
        for u in again {
            let unit = &units[u];
            if std::time::Instant::now() >= deadline {
                unit.settle(
                    Err(BrokerError::Unavailable("redis did not take it in time")),
                    &mut results,
                );
                continue;
            }
            let reply =
                self.commands.run_until(unit.slot, deadline, |link| command(unit, link)).await;
            unit.settle(reply, &mut results);
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

    /// `PUBLISH herald:control:{control} "<sender> <message>"` (`SPUBLISH` on a Redis
    /// Cluster).
    async fn send_control(&self, message: Bytes) -> Result<(), BrokerError> {
        let mut payload = Vec::with_capacity(self.sender.len() + 1 + message.len());
        payload.extend_from_slice(self.sender.as_bytes());
        payload.push(b' ');
        payload.extend_from_slice(&message);
        let verb = if self.commands.is_cluster() { "SPUBLISH" } else { "PUBLISH" };
        let slot = slots::slot(CONTROL_CHANNEL.as_bytes());
        self.commands
            .run(slot, |_| {
                let mut cmd = ::redis::cmd(verb);
                cmd.arg(CONTROL_CHANNEL).arg(&payload[..]);
                cmd
            })
            .await
            .map(|_| ())
    }

    fn set_control(&self, handler: ControlHandler) {
        let _ = self.control.set(handler);
    }

    /// `herald:nodes:{nodes}:<id>` holds the info (expiring after `ttl`), the set
    /// `herald:nodes:{nodes}` the ids (one slot).
    async fn announce(&self, id: &str, info: Bytes, ttl: Duration) -> Result<(), BrokerError> {
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let slot = slots::slot(NODES_KEY.as_bytes());
        self.commands
            .run(slot, |_| {
                let mut cmd = ::redis::cmd("SET");
                cmd.arg(format!("{NODE_KEY}{id}")).arg(info.as_ref()).arg("PX").arg(ttl_ms);
                cmd
            })
            .await?;
        self.commands
            .run(slot, |_| {
                let mut cmd = ::redis::cmd("SADD");
                cmd.arg(NODES_KEY).arg(id);
                cmd
            })
            .await
            .map(|_| ())
    }

    /// The ids in `herald:nodes:{nodes}` whose info has not expired; the others are removed.
    async fn nodes(&self) -> Result<Option<Vec<(String, Bytes)>>, BrokerError> {
        let slot = slots::slot(NODES_KEY.as_bytes());
        let reply = self
            .commands
            .run(slot, |_| {
                let mut cmd = ::redis::cmd("SMEMBERS");
                cmd.arg(NODES_KEY);
                cmd
            })
            .await?;
        let ids: Vec<String> =
            ::redis::from_redis_value(reply).map_err(|_| bad_reply("SMEMBERS"))?;
        if ids.is_empty() {
            return Ok(Some(Vec::new()));
        }
        let keys: Vec<String> = ids.iter().map(|id| format!("{NODE_KEY}{id}")).collect();
        let reply = self
            .commands
            .run(slot, |_| {
                let mut cmd = ::redis::cmd("MGET");
                cmd.arg(&keys);
                cmd
            })
            .await?;
        let infos: Vec<Option<Vec<u8>>> =
            ::redis::from_redis_value(reply).map_err(|_| bad_reply("MGET"))?;
        let mut alive = Vec::new();
        let mut gone = Vec::new();
        for (id, info) in ids.into_iter().zip(infos) {
            match info {
                Some(info) => alive.push((id, Bytes::from(info))),
                None => gone.push(id),
            }
        }
        if !gone.is_empty() {
            let _ = self
                .commands
                .run(slot, |_| {
                    let mut cmd = ::redis::cmd("SREM");
                    cmd.arg(NODES_KEY).arg(&gone);
                    cmd
                })
                .await;
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
        let key = stream_key(channel);
        let reply = self
            .commands
            .run(channel_slot(channel), |link| {
                let mut cmd = ::redis::cmd("EVALSHA");
                cmd.arg(self.script.get_hash()).arg(1).arg(&key);
                cmd.arg(mode).arg(epoch).arg(offset).arg(limit).arg(at).arg(ttl_ms);
                cmd.arg(void_instance).arg(link.run_id.as_ref());
                tracing::debug!(%channel, addr = %link.addr, run = %link.run_id, "history read");
                cmd
            })
            .await?;
        let Value::Array(items) = reply else { return Err(bad_reply("history")) };
        let now = items.first().and_then(as_u64).ok_or_else(|| bad_reply("history"))?;
        let instance = items.get(1).and_then(as_string).ok_or_else(|| bad_reply("history"))?;
        // A void position counts only if it was read from this Redis data set.
        let void = void.filter(|v| v.instance == instance);
        if items.len() == 2 {
            // No stream: position 0 of a void epoch of this read.
            tracing::debug!(%channel, since = ?query.since, "history read result: no stream");
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
        tracing::debug!(%channel, since = ?query.since, %epoch, top, complete, "history read result");
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
        // The node's own channels and keys lie outside the channels' names, even for a
        // channel called `control` or `nodes`.
        for own in [CONTROL_CHANNEL, NODES_KEY, "herald:probe:{abcd1234}"] {
            assert_eq!(channel_of(own), None, "{own}");
        }
        for name in ["control", "nodes"] {
            let c = ChannelName::parse(name).unwrap();
            assert_ne!(pubsub_channel(&c), CONTROL_CHANNEL);
            assert!(!stream_key(&c).starts_with(NODE_KEY) && stream_key(&c) != NODES_KEY);
        }
    }

    #[test]
    fn passwords_stay_out_of_logs() {
        assert_eq!(without_password("redis://u:secret@h:1/0"), "redis://u:***@h:1/0");
        assert_eq!(without_password("redis://h:1"), "redis://h:1");
        assert_eq!(without_password("redis://u@h:1"), "redis://u@h:1");
    }
}
