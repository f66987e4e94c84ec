//! The NATS broker: several nodes share channels through NATS, with history, offsets and epochs
//! in JetStream (`broker = "nats://[user:pass@]HOST:PORT[,HOST:PORT...]"`).
//!
//! Subjects: a Herald channel `C` is one subject token ([`subject_token`]: `.`, the only
//! character of channel names that NATS tokens cannot hold, becomes `~`, which channel names
//! never contain, so the mapping is reversible). Publications with history are stored on
//! `herald.h.<C>` in one JetStream stream (`HERALD`, file storage); the stream republishes each
//! stored message on `herald.l.<C>`, the live subject every interested node subscribes to with
//! a core NATS subscription. Publications without history are plain core publishes on
//! `herald.l.<C>`. A node subscribes only to the live subjects of the channels its clients use.
//!
//! Offsets: JetStream's sequence is per stream, not per channel, and Herald's offsets must be
//! contiguous per channel. Each stored message carries its position in headers (`Herald-Epoch`,
//! `Herald-Offset`, plus `Herald-Created`, `Herald-Time` and `Herald-Prev`, the stream sequence
//! of the channel's previous message), and is appended with `Nats-Expected-Last-Subject-Sequence`
//! set to the sequence of the message it follows: JetStream refuses the append when another
//! publisher got there first, and the publisher reads the new last message and tries again.
//! So offset `n + 1` is stored exactly once, right after offset `n`, whatever the number of
//! publishers and nodes (optimistic concurrency; see docs/architecture.md). Publications of a
//! channel on one node are serialized, so a node competes with other nodes only.
//!
//! Expiry: a channel whose last publication is older than its `history_ttl` has no stream; its
//! next publication starts a new epoch at offset 1 (times are the publishing nodes' clocks).
//! JetStream itself keeps at most the largest `history_size` seen per subject and drops
//! messages older than twice the largest TTL seen (the stream's limits grow as larger values
//! appear).
//!
//! No silent loss: each subscribed channel is followed by its own task, which knows the
//! position it handed over last. A publication whose offset is not the next one is a gap
//! filled from JetStream; a reconnect to NATS makes every task catch up from its position;
//! where history cannot fill a gap, the channel's local subscribers are cut
//! ([`BrokerHandler::channel_lost`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures_util::StreamExt;
use herald_protocol::{ChannelName, StreamPosition};
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot, watch};

use crate::history::{self, VoidEpoch};
use crate::io_thread::IoThread;
use crate::lateness::{now_ms, without_password, Lateness};
use crate::{
    Broker, BrokerError, BrokerHandler, ControlHandler, HistoryPage, HistoryQuery, Publication,
    PublishOptions,
};

/// The JetStream stream holding every channel's history.
const STREAM: &str = "HERALD";
/// Stored subjects: `herald.h.<token>`.
const STORED: &str = "herald.h.";
/// Live subjects: `herald.l.<token>`.
const LIVE: &str = "herald.l.";
/// Control messages between nodes.
const CONTROL_SUBJECT: &str = "herald.control";
/// Node announcements.
const NODES_SUBJECT: &str = "herald.nodes";
/// Announced nodes kept at most, and the longest TTL an announcement gets.
const MAX_NODES: usize = 4096;
const MAX_NODE_TTL_MS: u64 = 60_000;
/// Longest wait for NATS to answer a request.
const NATS_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest a publication may take, queueing behind the channel's others included.
const PUBLISH_DEADLINE: Duration = Duration::from_secs(4);
/// Attempts of one publication against concurrent publishers before it fails.
const MAX_ATTEMPTS: usize = 64;
/// History reads this close to the newest message walk back instead of searching.
const WALK_BACK: u64 = 32;
/// Channels whose last message a node keeps between publications (beyond, the idle ones are
/// dropped: their next publication reads the last message again).
const MAX_CACHED_CHANNELS: usize = 10_000;
/// Most publications one catch-up delivers; a longer gap ends the channel's subscriptions.
const MAX_CATCH_UP: u64 = 10_000;
/// Publications per history read of a catch-up.
const CATCH_UP_PAGE: usize = 500;
/// Allowance for clock differences between nodes in the void-epoch rule.
const CLOCK_ALLOWANCE_MS: u64 = 1000;
/// How often the probe goes out, and how late it may come back.
const PROBE_EVERY: Duration = Duration::from_secs(1);
const PROBE_DEADLINE: Duration = Duration::from_secs(3);

const H_EPOCH: &str = "Herald-Epoch";
const H_OFFSET: &str = "Herald-Offset";
const H_CREATED: &str = "Herald-Created";
const H_TIME: &str = "Herald-Time";
const H_PREV: &str = "Herald-Prev";
const H_RUN: &str = "Herald-Run";
/// The publishing node (its broker's id), to measure how late its own publications return.
const H_NODE: &str = "Herald-Node";

/// The subject token of a channel: `.` becomes `~` (reversible: channel names have no `~`).
pub fn subject_token(channel: &ChannelName) -> String {
    channel.as_str().replace('.', "~")
}

fn ttl_ms(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

fn unavailable() -> BrokerError {
    BrokerError::Unavailable("nats is not reachable")
}

fn backend(what: &str, e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Backend(format!("nats {what}: {e}"))
}

/// A stored message of a channel, as its headers describe it.
#[derive(Debug, Clone)]
struct Stored {
    seq: u64,
    epoch: Arc<str>,
    offset: u64,
    created: u64,
    time: u64,
    prev: u64,
    /// The NATS server process that stored it (single-server deployments, see
    /// [`Shared::run`]).
    run: Option<String>,
    data: Bytes,
}

impl Stored {
    /// The message's position, from its headers; `None` unless every header is well formed:
    /// an epoch of 8 characters of `[0-9a-z]` (what Herald generates), numbers below 2^53.
    fn parse(seq: u64, headers: &HeaderMap, data: Bytes) -> Option<Stored> {
        const MAX: u64 = 1 << 53;
        let get = |name: &str| headers.get(name).map(|v| v.as_str().to_string());
        let num = |name: &str| get(name).and_then(|v| v.parse::<u64>().ok()).filter(|&n| n < MAX);
        let epoch = get(H_EPOCH)?;
        let well_formed = epoch.len() == history::INSTANCE_LEN
            && epoch.bytes().all(|c| c.is_ascii_digit() || c.is_ascii_lowercase());
        let offset = num(H_OFFSET).filter(|&o| o >= 1)?;
        well_formed.then_some(())?;
        Some(Stored {
            seq,
            epoch: Arc::from(epoch.as_str()),
            offset,
            created: num(H_CREATED)?,
            time: num(H_TIME)?,
            prev: num(H_PREV)?,
            run: get(H_RUN),
            data,
        })
    }

    /// A stored message Herald did not write (or cannot read): it ends whatever epoch came
    /// before it, and the next publication appends after it in a new epoch.
    fn foreign(seq: u64) -> Stored {
        Stored {
            seq,
            epoch: Arc::from(""),
            offset: 0,
            created: 0,
            time: 0,
            prev: 0,
            run: None,
            data: Bytes::new(),
        }
    }

    fn read(m: jetstream::message::StreamMessage) -> Stored {
        Stored::parse(m.sequence, &m.headers, m.payload)
            .unwrap_or_else(|| Stored::foreign(m.sequence))
    }

    fn expired(&self, now: u64, ttl: Duration) -> bool {
        now.saturating_sub(self.time) > ttl_ms(ttl)
    }
}

/// The connection, the stream, and what the publishers share.
struct Shared {
    client: async_nats::Client,
    js: jetstream::Context,
    /// The `HERALD` stream, once it exists.
    stream: tokio::sync::RwLock<Option<stream::Stream>>,
    /// The stream's creation time (and server process, see [`Shared::run`]), base 36, 8
    /// characters: the instance of void epochs (a
    /// position read from another incarnation of the stream proves nothing).
    instance: Mutex<Option<Arc<str>>>,
    /// The stream's limits as configured: messages per subject and age (ms).
    max_per_subject: AtomicUsize,
    max_age_ms: AtomicU64,
    /// Serializes stream creation and limit updates.
    configuring: tokio::sync::Mutex<()>,
    /// Per channel publishing on this node: the lock serializes its publications, and holds
    /// the channel's last stored message as this node last saw it (stale when another node
    /// published since: the append is then refused and the message read again). At most
    /// [`MAX_CACHED_CHANNELS`] idle entries.
    publishing: Mutex<HashMap<ChannelName, Arc<tokio::sync::Mutex<Option<Stored>>>>>,
    /// The probe came back recently.
    probe_ok: AtomicBool,
    /// Reconnects so far, and the count when the stream was last looked at: after a reconnect
    /// the stream is looked at again (NATS may have restarted and lost it; its new creation
    /// time then makes every void position read from the old one prove nothing).
    reconnects: watch::Receiver<u64>,
    stream_generation: AtomicU64,
    /// This node's id in `Herald-Node` headers.
    node: Arc<str>,
    /// The stream lives in a JetStream cluster (its info names one): nodes talk to different
    /// servers, whatever the servers advertise (`no_advertise` hides them).
    clustered: AtomicBool,
    /// Whether this node's own publications come back late.
    lateness: Lateness,
}

/// The NATS broker (see the module docs).
pub struct NatsBroker {
    shared: Arc<Shared>,
    /// The thread that runs the connection and the channel tasks (see [`IoThread`]).
    io: Arc<IoThread>,
    display_url: String,
    handler: OnceLock<Arc<dyn BrokerHandler>>,
    ops: mpsc::UnboundedSender<SubOp>,
    ops_rx: Mutex<Option<mpsc::UnboundedReceiver<SubOp>>>,
    /// Bumped on every reconnect: the channel tasks catch up.
    reconnects: watch::Sender<u64>,
    control: Arc<OnceLock<ControlHandler>>,
    sender: Arc<str>,
    /// Announced nodes seen: id -> (info, expiry in ms since the epoch).
    nodes: Arc<Mutex<HashMap<String, (Bytes, u64)>>>,
}

impl std::fmt::Debug for NatsBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsBroker").field("url", &self.display_url).finish()
    }
}

/// A request to bring one channel's subscription in line with the hub.
struct SubOp {
    channel: ChannelName,
    done: oneshot::Sender<Result<(), BrokerError>>,
}

/// A user name and password.
type Credentials = (String, String);

/// Splits `nats://[user:pass@]h1:p1,h2:p2` into server addresses and credentials.
fn parse_url(url: &str) -> Result<(Vec<String>, Option<Credentials>), BrokerError> {
    let rest = url
        .strip_prefix("nats://")
        .ok_or_else(|| BrokerError::Backend("a NATS URL starts with nats://".into()))?;
    let (auth, hosts) = match rest.rsplit_once('@') {
        Some((auth, hosts)) => (Some(auth), hosts),
        None => (None, rest),
    };
    let credentials = match auth {
        Some(a) => {
            let (user, pass) = a.split_once(':').unwrap_or((a, ""));
            Some((user.to_string(), pass.to_string()))
        }
        None => None,
    };
    let servers: Vec<String> = hosts
        .trim_end_matches('/')
        .split(',')
        .filter(|h| !h.is_empty())
        .map(|h| format!("nats://{h}"))
        .collect();
    if servers.is_empty() {
        return Err(BrokerError::Backend("a NATS URL names at least one HOST:PORT".into()));
    }
    Ok((servers, credentials))
}

impl NatsBroker {
    /// Connects to NATS at `url` (in the background: the node starts while NATS is away, and
    /// is not ready until it is connected and the stream exists).
    pub async fn connect(url: &str) -> Result<NatsBroker, BrokerError> {
        let (servers, credentials) = parse_url(url)?;
        let (reconnects, _) = watch::channel(0u64);
        let reconnect_tx = reconnects.clone();
        let was_connected = Arc::new(AtomicBool::new(false));
        let mut options = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connection_timeout(NATS_TIMEOUT)
            .request_timeout(Some(NATS_TIMEOUT))
            .event_callback(move |event| {
                let reconnect_tx = reconnect_tx.clone();
                let was_connected = was_connected.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            if was_connected.swap(true, Ordering::AcqRel) {
                                reconnect_tx.send_modify(|n| *n += 1);
                            }
                            tracing::info!("connected to nats");
                        }
                        async_nats::Event::Disconnected => {
                            tracing::warn!("nats connection lost; reconnecting");
                        }
                        async_nats::Event::SlowConsumer(_) => {
                            // A subscription's buffer overflowed and dropped messages: every
                            // channel catches up from history, as after a reconnect.
                            tracing::warn!("a nats subscription fell behind; catching up");
                            reconnect_tx.send_modify(|n| *n += 1);
                        }
                        other => tracing::debug!(event = %other, "nats event"),
                    }
                }
            });
        if let Some((user, pass)) = credentials {
            options = options.user_and_password(user, pass);
        }
        let addrs: Vec<async_nats::ServerAddr> = servers
            .iter()
            .map(|s| s.parse().map_err(|e| backend("URL", e)))
            .collect::<Result<_, _>>()?;
        // Connected on the broker's thread, where async-nats spawns the connection's task.
        let io = Arc::new(IoThread::start("herald-nats")?);
        let client = io
            .handle
            .spawn(async move { options.connect(addrs).await })
            .await
            .map_err(|e| backend("connect", e))?
            .map_err(|e| backend("connect", e))?;
        let js = jetstream::ContextBuilder::new().timeout(NATS_TIMEOUT).build(client.clone());
        let (ops, ops_rx) = mpsc::unbounded_channel();
        let sender = history::new_instance_id();
        Ok(NatsBroker {
            shared: Arc::new(Shared {
                client,
                js,
                stream: tokio::sync::RwLock::new(None),
                instance: Mutex::new(None),
                max_per_subject: AtomicUsize::new(0),
                max_age_ms: AtomicU64::new(0),
                configuring: tokio::sync::Mutex::new(()),
                publishing: Mutex::new(HashMap::new()),
                probe_ok: AtomicBool::new(false),
                reconnects: reconnects.subscribe(),
                stream_generation: AtomicU64::new(0),
                node: sender.clone(),
                lateness: Lateness::default(),
                clustered: AtomicBool::new(false),
            }),
            io,
            display_url: without_password(url),
            handler: OnceLock::new(),
            ops,
            ops_rx: Mutex::new(Some(ops_rx)),
            reconnects,
            control: Arc::new(OnceLock::new()),
            sender,
            nodes: Arc::new(Mutex::new(HashMap::new())),
        })
    }
}

impl Shared {
    fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// The NATS server process this node is connected to (the first 8 characters of its
    /// `server_id`, new at every start), when NATS is a single server (the stream's info names
    /// no JetStream cluster and the server advertises no others); `None` in a NATS cluster,
    /// where nodes talk to different servers and the stream's replicas carry durability.
    ///
    /// On a single server, a stream written by another process counts as ended, as on Redis:
    /// a restarted server may have lost the newest acknowledged messages (an OS crash before
    /// the sync interval), and continuing the epoch would hand out their offsets again.
    fn run(&self) -> Option<String> {
        if self.clustered.load(Ordering::Acquire) {
            return None;
        }
        let info = self.client.server_info();
        (info.connect_urls.is_empty() && !info.server_id.is_empty())
            .then(|| info.server_id.chars().take(history::INSTANCE_LEN).collect())
    }

    /// Notes how late one of this node's own publications came back (see
    /// [`Broker::is_behind`]).
    fn note_lag(&self, headers: Option<&HeaderMap>) {
        let Some(h) = headers else { return };
        if h.get(H_NODE).map(|v| v.as_str()) != Some(&*self.node) {
            return;
        }
        if let Some(sent) = h.get(H_TIME).and_then(|v| v.as_str().parse::<u64>().ok()) {
            self.lateness.returned(sent);
        }
    }

    /// True when `last` still continues its channel's stream at `now`: not expired, and
    /// written by the server process `run` (the current [`Shared::run`]).
    fn continues(last: &Stored, now: u64, ttl: Duration, run: Option<&str>) -> bool {
        !last.epoch.is_empty()
            && !last.expired(now, ttl)
            && run.is_none_or(|run| last.run.as_deref() == Some(run))
    }

    /// The stream, created when missing; with `raise`, its limits raised so that it keeps that
    /// channel's history (limits only ever grow: the largest `history_size` per subject, twice
    /// the largest TTL).
    async fn stream_for(
        &self,
        raise: Option<&PublishOptions>,
    ) -> Result<stream::Stream, BrokerError> {
        if !self.connected() {
            return Err(unavailable());
        }
        let size = raise.map_or(1, |o| o.history_size.max(1));
        let age = raise.map_or(1000, |o| ttl_ms(o.history_ttl).saturating_mul(2));
        let generation = *self.reconnects.borrow();
        if let Some(s) = self.stream.read().await.as_ref() {
            if self.stream_generation.load(Ordering::Acquire) == generation
                && self.max_per_subject.load(Ordering::Acquire) >= size
                && self.max_age_ms.load(Ordering::Acquire) >= age
            {
                return Ok(s.clone());
            }
        }
        let _one = self.configuring.lock().await;
        let size = size.max(self.max_per_subject.load(Ordering::Acquire));
        let age = age.max(self.max_age_ms.load(Ordering::Acquire));
        let config = stream::Config {
            name: STREAM.into(),
            subjects: vec![format!("{STORED}>")],
            max_messages_per_subject: i64::try_from(size).unwrap_or(i64::MAX),
            max_age: Duration::from_millis(age),
            storage: stream::StorageType::File,
            discard: stream::DiscardPolicy::Old,
            republish: Some(stream::Republish {
                source: format!("{STORED}>"),
                destination: format!("{LIVE}>"),
                headers_only: false,
            }),
            allow_direct: true,
            // Three replicas where the server says there are at least two others: a
            // clustered stream survives the loss of one server (the single-server restart
            // check is off there, see `run`).
            num_replicas: if self.client.server_info().connect_urls.len() >= 2 { 3 } else { 1 },
            ..Default::default()
        };
        // Another node may raise the limits at the same time (the last update wins) or an
        // operator may lower them: update until a fresh read shows at least what is needed.
        let mut s = None;
        for _ in 0..5 {
            let mut current = match self.js.get_stream(STREAM).await {
                Ok(current) => current,
                Err(_) => self
                    .js
                    .get_or_create_stream(config.clone())
                    .await
                    .map_err(|e| self.request_failed("create stream", e))?,
            };
            let info =
                current.info().await.map_err(|e| self.request_failed("stream info", e))?.clone();
            let have_size = usize::try_from(info.config.max_messages_per_subject).unwrap_or(0);
            let have_age = u64::try_from(info.config.max_age.as_millis()).unwrap_or(u64::MAX);
            if have_size >= size && (have_age == 0 || have_age >= age) {
                s = Some(current);
                break;
            }
            let raised = stream::Config {
                max_messages_per_subject: i64::try_from(size.max(have_size)).unwrap_or(i64::MAX),
                max_age: Duration::from_millis(age.max(have_age)),
                ..info.config.clone()
            };
            self.js
                .update_stream(&raised)
                .await
                .map_err(|e| self.request_failed("update stream", e))?;
        }
        let mut s = s.ok_or_else(|| {
            BrokerError::Backend("nats: the HERALD stream's limits could not be raised".into())
        })?;
        let info = s.info().await.map_err(|e| self.request_failed("stream info", e))?.clone();
        self.max_per_subject.store(
            usize::try_from(info.config.max_messages_per_subject).unwrap_or(0),
            Ordering::Release,
        );
        self.max_age_ms.store(
            u64::try_from(info.config.max_age.as_millis()).unwrap_or(u64::MAX),
            Ordering::Release,
        );
        let clustered = info.cluster.as_ref().is_some_and(|c| c.name.is_some());
        self.clustered.store(clustered, Ordering::Release);
        let created = u64::try_from(info.created.unix_timestamp_nanos()).unwrap_or(0);
        let run = self.run().unwrap_or_default();
        let run_bits = run.bytes().fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
        *self.instance.lock() = Some(instance_of(created ^ run_bits));
        self.stream_generation.store(generation, Ordering::Release);
        *self.stream.write().await = Some(s.clone());
        Ok(s)
    }

    /// The instance id of the stream (see [`Shared::instance`]).
    async fn instance(&self) -> Result<Arc<str>, BrokerError> {
        self.stream_for(None).await?;
        self.instance.lock().clone().ok_or_else(unavailable)
    }

    /// The channel's last stored message, if any.
    async fn last(
        &self,
        stream: &stream::Stream,
        channel: &ChannelName,
    ) -> Result<Option<Stored>, BrokerError> {
        let subject = format!("{STORED}{}", subject_token(channel));
        match stream.get_last_raw_message_by_subject(&subject).await {
            Ok(m) => Ok(Some(Stored::read(m))),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(self.request_failed("read", e)),
        }
    }

    /// A stored message by stream sequence (`None`: gone, trimmed or expired).
    async fn by_seq(
        &self,
        stream: &stream::Stream,
        seq: u64,
    ) -> Result<Option<Stored>, BrokerError> {
        match stream.get_raw_message(seq).await {
            Ok(m) => Ok(Some(Stored::read(m))),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(self.request_failed("read", e)),
        }
    }

    /// The first stored message of `subject` at or after stream sequence `seq`.
    async fn first_from(
        &self,
        stream: &stream::Stream,
        subject: &str,
        seq: u64,
    ) -> Result<Option<Stored>, BrokerError> {
        match stream.get_first_raw_message_by_subject(subject, seq).await {
            Ok(m) => Ok(Some(Stored::read(m))),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(self.request_failed("read", e)),
        }
    }

    /// A core publish, within [`NATS_TIMEOUT`] (async-nats waits for room in its command
    /// queue, which does not drain while the server is frozen).
    async fn core_publish(
        &self,
        subject: String,
        headers: Option<HeaderMap>,
        payload: Bytes,
    ) -> Result<(), BrokerError> {
        if !self.connected() {
            return Err(unavailable());
        }
        let publish = async {
            match headers {
                Some(h) => self.client.publish_with_headers(subject, h, payload).await,
                None => self.client.publish(subject, payload).await,
            }
        };
        match tokio::time::timeout(NATS_TIMEOUT, publish).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(self.request_failed("publish", e)),
            Err(_) => Err(BrokerError::Unavailable("nats did not take the publication in time")),
        }
    }

    /// A request that failed: unavailable when NATS is away or did not answer in time (a
    /// frozen server keeps its connection open), a backend error otherwise.
    fn request_failed(&self, what: &str, e: impl std::fmt::Display) -> BrokerError {
        let text = e.to_string();
        if text.contains("no stream found") {
            // The stream is changing leader (a server of a JetStream cluster died), or it was
            // deleted: look it up (or create it) again at the next call.
            self.stream_generation.store(u64::MAX, Ordering::Release);
            return BrokerError::Unavailable("the nats stream is not available");
        }
        if !self.connected() || text.contains("timed out") || text.contains("no responders") {
            unavailable()
        } else {
            backend(what, text)
        }
    }

    /// Publishes one publication with history (see the module docs), within
    /// [`PUBLISH_DEADLINE`] (waiting behind the channel's other publications included).
    async fn publish_stored(
        &self,
        channel: &ChannelName,
        data: Bytes,
        options: &PublishOptions,
    ) -> Result<StreamPosition, BrokerError> {
        match tokio::time::timeout(
            PUBLISH_DEADLINE,
            self.publish_stored_now(channel, data, options),
        )
        .await
        {
            Ok(result) => result,
            Err(_) => Err(BrokerError::Unavailable("nats did not answer in time")),
        }
    }

    async fn publish_stored_now(
        &self,
        channel: &ChannelName,
        data: Bytes,
        options: &PublishOptions,
    ) -> Result<StreamPosition, BrokerError> {
        let stream = self.stream_for(Some(options)).await?;
        let lock = {
            let mut map = self.publishing.lock();
            map.entry(channel.clone()).or_default().clone()
        };
        let result = {
            let mut last = lock.lock().await;
            if self.connected() {
                self.append(&stream, channel, data, options, &mut last).await
            } else {
                Err(unavailable())
            }
        };
        // The entry stays as a cache of the channel's last message (a channel published from
        // one node then costs one round trip); past the bound, every idle entry goes.
        drop(lock);
        let mut map = self.publishing.lock();
        if map.len() > MAX_CACHED_CHANNELS {
            map.retain(|_, entry| Arc::strong_count(entry) > 1);
        }
        result
    }

    async fn append(
        &self,
        stream: &stream::Stream,
        channel: &ChannelName,
        data: Bytes,
        options: &PublishOptions,
        cached: &mut Option<Stored>,
    ) -> Result<StreamPosition, BrokerError> {
        let subject = format!("{STORED}{}", subject_token(channel));
        for _ in 0..MAX_ATTEMPTS {
            let last = match cached.take() {
                Some(l) => Some(l),
                None => self.last(stream, channel).await?,
            };
            let now = now_ms();
            // One reading for the check and the header: both name the same server process.
            let run = self.run();
            let (epoch, offset, created) = match &last {
                Some(l) if Self::continues(l, now, options.history_ttl, run.as_deref()) => {
                    (l.epoch.clone(), l.offset.saturating_add(1), l.created)
                }
                _ => (history::new_instance_id(), 1, now),
            };
            let prev = last.as_ref().map_or(0, |l| l.seq);
            let mut headers = HeaderMap::new();
            headers.insert(H_EPOCH, &*epoch);
            headers.insert(H_OFFSET, offset.to_string());
            headers.insert(H_CREATED, created.to_string());
            headers.insert(H_TIME, now.to_string());
            headers.insert(H_PREV, prev.to_string());
            headers.insert(H_NODE, &*self.node);
            if let Some(run) = &run {
                headers.insert(H_RUN, run.as_str());
            }
            let message = jetstream::message::PublishMessage::build()
                .payload(data.clone())
                .headers(headers)
                .expected_last_subject_sequence(prev);
            let ack = match self.js.send_publish(subject.clone(), message).await {
                Ok(future) => future.await,
                Err(e) => return Err(self.request_failed("publish", e)),
            };
            match ack {
                Ok(ack) => {
                    *cached = Some(Stored {
                        seq: ack.sequence,
                        epoch: epoch.clone(),
                        offset,
                        created,
                        time: now,
                        prev,
                        run,
                        data: Bytes::new(),
                    });
                    return Ok(StreamPosition { offset, epoch: epoch.to_string() });
                }
                Err(e) if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence => {
                    // Another publisher appended first: read the new last message, try again.
                }
                Err(e) => return Err(self.request_failed("publish", e)),
            }
        }
        Err(BrokerError::Backend(format!(
            "nats: {channel}: {MAX_ATTEMPTS} attempts lost to concurrent publishers"
        )))
    }

    /// Reads `channel`'s position and the history `query` asks for (see [`Broker::history`]).
    async fn read(
        &self,
        channel: &ChannelName,
        options: &PublishOptions,
        query: &HistoryQuery,
    ) -> Result<HistoryPage, BrokerError> {
        let stream = self.stream_for(None).await?;
        let instance = self.instance().await?;
        let now = now_ms();
        let last = self.last(&stream, channel).await?;
        let void = query.since.as_ref().and_then(|s| VoidEpoch::parse(&s.epoch));
        let void = void.filter(|v| *v.instance == *instance);
        let ttl = options.history_ttl;
        // Void positions record the read's time minus the clock allowance: a node whose clock
        // is ahead of the others' cannot make a later stream look covered.
        let at = now.saturating_sub(CLOCK_ALLOWANCE_MS);
        let run = self.run();
        let Some(last) = last.filter(|l| Self::continues(l, now, ttl, run.as_deref())) else {
            // No stream: position 0 of a void epoch of this read.
            // Judged at the read's real time (a stricter bound than `at`): a node whose clock
            // is behind the reader's by less than the allowance cannot hide a lost stream.
            let complete = void.is_some_and(|v| v.covers(now, ttl))
                && query.since.as_ref().is_some_and(|s| s.offset == 0);
            let epoch = VoidEpoch { instance: &instance, at_ms: at }.encode();
            return Ok(HistoryPage {
                position: Some(StreamPosition { offset: 0, epoch }),
                publications: Vec::new(),
                complete,
                more: false,
            });
        };
        let top = last.offset;
        let size = options.history_size.max(1) as u64;
        // The oldest offset the channel's history may hold (what JetStream still has is found
        // by reading).
        let oldest = top.saturating_sub(size - 1).max(1);
        // `since` as an offset of this stream, or none.
        let since: Option<u64> = match (&query.since, &void) {
            (Some(s), Some(v)) => v.covers(last.created, ttl).then_some(s.offset),
            (Some(s), None) if *s.epoch == *last.epoch => Some(s.offset),
            _ => None,
        };
        let reaches = since.filter(|&k| k <= top && k + 1 >= oldest);
        let limit = query.limit.unwrap_or(usize::MAX);
        let from = match (query.since.is_some(), reaches) {
            (true, Some(k)) => k + 1,
            (true, None) => oldest,
            (false, _) => {
                let count = u64::try_from(limit).unwrap_or(u64::MAX).min(top);
                (top - count + 1).max(oldest)
            }
        };
        let subject = format!("{STORED}{}", subject_token(channel));
        let (got, lowest) = self.collect(&stream, &subject, &last, from, limit).await?;
        // JetStream may hold less than the channel's history (trimmed by age or count).
        let complete = reaches.is_some() && lowest == from;
        let publications = got
            .into_iter()
            .map(|m| Publication { offset: Some(m.offset), epoch: Some(m.epoch), data: m.data })
            .collect();
        Ok(HistoryPage {
            position: Some(StreamPosition { offset: top, epoch: last.epoch.to_string() }),
            publications,
            complete: complete && query.since.is_some(),
            more: false,
        })
    }
}

impl Shared {
    /// The stored messages of `last`'s epoch from offset `from` on (at most `max`, oldest
    /// first), and the lowest offset JetStream still holds at or after `from` (`from` when
    /// nothing is due). Near the top it walks back along `Herald-Prev`; further back it finds
    /// the first message by a binary search over stream sequences (offsets rise with the
    /// sequence within an epoch) and reads forward: about log2(sequence) + `max` requests,
    /// never more than `max` messages held.
    async fn collect(
        &self,
        stream: &stream::Stream,
        subject: &str,
        last: &Stored,
        from: u64,
        max: usize,
    ) -> Result<(Vec<Stored>, u64), BrokerError> {
        let top = last.offset;
        if from > top || max == 0 {
            return Ok((Vec::new(), from));
        }
        let same = |m: &Stored| *m.epoch == *last.epoch;
        if top - from < WALK_BACK {
            let mut got = vec![last.clone()];
            while let Some(m) = got.last() {
                if m.offset <= from || m.prev == 0 {
                    break;
                }
                let want = m.offset - 1;
                match self.by_seq(stream, m.prev).await? {
                    Some(p) if same(&p) && p.offset == want => got.push(p),
                    _ => break, // trimmed, or the epoch began there
                }
            }
            got.reverse();
            let lowest = got.first().map_or(from, |m| m.offset);
            got.truncate(max);
            return Ok((got, lowest));
        }
        // The smallest sequence whose next message of the channel is in the epoch at or
        // after `from` (the last message qualifies, so the search ends on one).
        let (mut lo, mut hi) = (1u64, last.seq);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.first_from(stream, subject, mid).await? {
                Some(m) if same(&m) && m.offset >= from => hi = mid,
                // Every sequence up to m's leads to m: skip past it.
                Some(m) => lo = m.seq.max(mid).saturating_add(1).min(hi),
                None => hi = mid,
            }
        }
        let Some(mut cur) = self.first_from(stream, subject, lo).await?.filter(same) else {
            return Ok((Vec::new(), top + 1));
        };
        let lowest = cur.offset;
        let mut got = Vec::new();
        loop {
            let (seq, offset) = (cur.seq, cur.offset);
            got.push(cur);
            if offset >= top || got.len() >= max {
                break;
            }
            match self.first_from(stream, subject, seq + 1).await? {
                Some(n) if same(&n) && n.offset == offset + 1 => cur = n,
                _ => break,
            }
        }
        Ok((got, lowest))
    }
}

/// 8 base-36 characters of a stream creation time (nanoseconds).
fn instance_of(created_nanos: u64) -> Arc<str> {
    const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    // Mix, so that two creation times close together differ in every character.
    let mut n = created_nanos.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut out = String::with_capacity(history::INSTANCE_LEN);
    for _ in 0..history::INSTANCE_LEN {
        out.push(char::from(ALPHABET[(n % 36) as usize]));
        n /= 36;
    }
    Arc::from(out)
}

/// What a channel task needs.
struct ChannelTask {
    shared: Arc<Shared>,
    handler: Arc<dyn BrokerHandler>,
    channel: ChannelName,
    options_hint: PublishOptions,
    /// The position handed over last (`None`: nothing known yet).
    position: Option<(Arc<str>, u64)>,
}

impl ChannelTask {
    /// Hands a live message over, first filling any gap before it from history.
    async fn deliver(&mut self, headers: Option<&HeaderMap>, data: Bytes) -> Result<(), ()> {
        self.shared.note_lag(headers);
        let positioned = headers.is_some_and(|h| h.get(H_OFFSET).is_some());
        let stored = headers.and_then(|h| {
            let seq = h.get("Nats-Sequence").and_then(|v| v.as_str().parse().ok()).unwrap_or(0);
            Stored::parse(seq, h, data.clone())
        });
        if positioned && stored.is_none() {
            tracing::warn!(channel = %self.channel, "a malformed message on the live subject: dropped");
            return Ok(());
        }
        let Some(m) = stored else {
            let p = Publication { offset: None, epoch: None, data };
            self.handler.handle_publication(&self.channel, &p);
            return Ok(());
        };
        let from = match &self.position {
            Some((epoch, top)) if **epoch == *m.epoch => {
                if m.offset <= *top {
                    return Ok(()); // handed over already
                }
                Some(*top)
            }
            Some(_) => Some(0),
            None => None,
        };
        if let Some(from) = from.filter(|&from| m.offset > from + 1) {
            self.catch_up(&m.epoch, from, Some(m.offset - 1)).await?;
            if self.position.as_ref().is_some_and(|(e, o)| **e == *m.epoch && *o >= m.offset) {
                return Ok(()); // the catch-up handed it over
            }
        }
        self.position = Some((m.epoch.clone(), m.offset));
        let p = Publication { offset: Some(m.offset), epoch: Some(m.epoch), data: m.data };
        self.handler.handle_publication(&self.channel, &p);
        Ok(())
    }

    /// Reads what this node missed after `(epoch, from)` up to offset `until` (or whatever
    /// there is) and hands it over; a gap history cannot fill ends the channel's subscriptions
    /// on this node. `Err`: history could not be read.
    async fn catch_up(
        &mut self,
        epoch: &Arc<str>,
        from: u64,
        until: Option<u64>,
    ) -> Result<(), ()> {
        if until.is_some_and(|u| u - from > MAX_CATCH_UP) {
            self.lose();
            return Ok(());
        }
        let mut from = from;
        let mut total = 0u64;
        loop {
            let query = HistoryQuery {
                since: Some(StreamPosition { offset: from, epoch: epoch.to_string() }),
                limit: Some(CATCH_UP_PAGE),
            };
            let options = self.options_hint;
            let page = match self.shared.read(&self.channel, &options, &query).await {
                Ok(page) => page,
                Err(e) => {
                    tracing::warn!(channel = %self.channel, error = %e, "cannot read the gap from nats; will retry");
                    return Err(());
                }
            };
            if !page.complete {
                tracing::warn!(channel = %self.channel, from, "a gap history cannot fill: subscribers must recover");
                self.position = page.position.map(|p| (Arc::from(p.epoch.as_str()), p.offset));
                self.lose();
                return Ok(());
            }
            let n = page.publications.len();
            for p in &page.publications {
                if let (Some(offset), Some(e)) = (p.offset, &p.epoch) {
                    if until.is_some_and(|u| offset > u) {
                        break;
                    }
                    self.position = Some((e.clone(), offset));
                    from = offset;
                }
                self.handler.handle_publication(&self.channel, p);
                total += 1;
            }
            if n < CATCH_UP_PAGE || until.is_some_and(|u| from >= u) {
                break;
            }
            if total > MAX_CATCH_UP {
                self.lose();
                return Ok(());
            }
        }
        if total > 0 {
            tracing::info!(channel = %self.channel, publications = total, "caught up from jetstream");
        }
        Ok(())
    }

    fn lose(&mut self) {
        self.handler.channel_lost(&self.channel);
    }

    /// After a reconnect: everything after the position, from history.
    async fn resync(&mut self) -> Result<(), ()> {
        match self.position.clone() {
            Some((epoch, top)) if !epoch.is_empty() && VoidEpoch::parse(&epoch).is_none() => {
                self.catch_up(&epoch, top, None).await
            }
            _ => {
                // Nothing seen yet: a stream that exists now is due whole.
                let newest = HistoryQuery { since: None, limit: Some(0) };
                let options = self.options_hint;
                match self.shared.read(&self.channel, &options, &newest).await {
                    Ok(page) => match page.position {
                        Some(p) if VoidEpoch::parse(&p.epoch).is_none() => {
                            let epoch: Arc<str> = Arc::from(p.epoch.as_str());
                            self.catch_up(&epoch, 0, None).await
                        }
                        _ => Ok(()),
                    },
                    Err(_) => Err(()),
                }
            }
        }
    }
}

/// Follows one subscribed channel until `stop` fires.
async fn run_channel(
    mut task: ChannelTask,
    mut sub: async_nats::Subscriber,
    mut stop: oneshot::Receiver<()>,
    mut reconnects: watch::Receiver<u64>,
) {
    reconnects.borrow_and_update();
    let mut behind = false;
    loop {
        tokio::select! {
            _ = &mut stop => break,
            changed = reconnects.changed() => {
                if changed.is_err() { break; }
                behind = true;
            }
            msg = sub.next() => {
                let Some(msg) = msg else {
                    // The subscription ended (the client closed it): the channel's subscribers
                    // here would hear nothing more; they recover elsewhere or on resubscribing.
                    tracing::warn!(channel = %task.channel, "the nats subscription ended");
                    task.lose();
                    break;
                };
                if task.deliver(msg.headers.as_ref(), msg.payload).await.is_err() {
                    behind = true;
                }
            }
        }
        while behind {
            // Stoppable while it retries: an unsubscribe never waits for NATS to come back.
            tokio::select! {
                _ = &mut stop => {
                    let _ = sub.unsubscribe().await;
                    return;
                }
                ok = task.resync() => {
                    if ok.is_ok() {
                        behind = false;
                    } else {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        }
    }
    let _ = sub.unsubscribe().await;
}

/// Clears the probe's verdict when the task that runs it ends (or panics): `/readyz` then
/// says the node cannot prove its connection.
struct ProbeGone(Arc<Shared>);

impl Drop for ProbeGone {
    fn drop(&mut self) {
        self.0.probe_ok.store(false, Ordering::Release);
    }
}

/// A channel's running task.
struct Running {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

/// The subscription side: one task per subscribed channel, reconciled in order.
async fn run_subscriptions(
    shared: Arc<Shared>,
    handler: Arc<dyn BrokerHandler>,
    mut ops: mpsc::UnboundedReceiver<SubOp>,
    reconnects: watch::Receiver<u64>,
) {
    let mut running: HashMap<ChannelName, Running> = HashMap::new();
    while let Some(op) = ops.recv().await {
        let want = handler.has_subscribers(&op.channel);
        // A task that ended by itself (its subscription closed) is not running.
        if running.get(&op.channel).is_some_and(|r| r.task.is_finished()) {
            running.remove(&op.channel);
        }
        let have = running.contains_key(&op.channel);
        let result = match (want, have) {
            (true, false) => {
                subscribe_channel(&shared, &handler, &op.channel, &reconnects).await.map(|r| {
                    running.insert(op.channel.clone(), r);
                })
            }
            (false, true) => {
                if let Some(r) = running.remove(&op.channel) {
                    let _ = r.stop.send(());
                    // The task ends before another can start for the channel: two would hand
                    // its publications over concurrently.
                    let _ = tokio::time::timeout(Duration::from_secs(5), r.task).await;
                }
                Ok(())
            }
            _ => Ok(()),
        };
        let _ = op.done.send(result);
    }
}

/// Subscribes the live subject of `channel`, then reads its position (a request the server
/// answers after it registered the subscription: from then on every publication reaches the
/// node) and starts the channel's task.
async fn subscribe_channel(
    shared: &Arc<Shared>,
    handler: &Arc<dyn BrokerHandler>,
    channel: &ChannelName,
    reconnects: &watch::Receiver<u64>,
) -> Result<Running, BrokerError> {
    if !shared.connected() {
        return Err(unavailable());
    }
    let subject = format!("{LIVE}{}", subject_token(channel));
    let mut sub = shared.client.subscribe(subject).await.map_err(|e| backend("subscribe", e))?;
    // The position after the subscription; the history TTL is unknown here, so any stored
    // message counts (a stale one only makes the first live message look like a new epoch).
    let options = PublishOptions { history_size: 1, history_ttl: Duration::from_secs(365 * 86400) };
    let position = match shared.stream_for(None).await {
        // No stream yet: any epoch's first publication must be offset 1.
        Ok(stream) => match shared.last(&stream, channel).await {
            Ok(last) => Some(last.map_or((Arc::from(""), 0), |l| (l.epoch, l.offset))),
            Err(e) => {
                let _ = sub.unsubscribe().await;
                return Err(e);
            }
        },
        Err(e) => {
            let _ = sub.unsubscribe().await;
            return Err(e);
        }
    };
    let (stop, stopped) = oneshot::channel();
    let task = ChannelTask {
        shared: shared.clone(),
        handler: handler.clone(),
        channel: channel.clone(),
        options_hint: PublishOptions {
            history_size: usize::try_from(MAX_CATCH_UP).unwrap_or(usize::MAX),
            history_ttl: options.history_ttl,
        },
        position,
    };
    let task = tokio::spawn(run_channel(task, sub, stopped, reconnects.clone()));
    Ok(Running { stop, task })
}

#[async_trait::async_trait]
impl Broker for NatsBroker {
    fn name(&self) -> &'static str {
        "nats"
    }

    async fn start(&self, handler: Arc<dyn BrokerHandler>) -> Result<(), BrokerError> {
        self.handler
            .set(handler.clone())
            .map_err(|_| BrokerError::Backend("already started".into()))?;
        let ops =
            self.ops_rx.lock().take().ok_or(BrokerError::Backend("already started".into()))?;
        tracing::info!(url = %self.display_url, "connecting to nats");
        self.io.handle.spawn(run_subscriptions(
            self.shared.clone(),
            handler.clone(),
            ops,
            self.reconnects.subscribe(),
        ));
        // Control messages and node announcements.
        let shared = self.shared.clone();
        let control = self.control.clone();
        let sender = self.sender.clone();
        let nodes = self.nodes.clone();
        let mut reconnected = self.reconnects.subscribe();
        self.io.handle.spawn(async move {
            // This task proves the connection (the probe): if it ends, the node is not ready.
            let _not_ready_after = ProbeGone(shared.clone());
            let Ok(mut control_sub) = shared.client.subscribe(CONTROL_SUBJECT).await else {
                return;
            };
            let Ok(mut nodes_sub) = shared.client.subscribe(NODES_SUBJECT).await else { return };
            let probe = format!("herald.probe.{sender}");
            let Ok(mut probe_sub) = shared.client.subscribe(probe.clone()).await else { return };
            let mut tick = tokio::time::interval(PROBE_EVERY);
            let mut last_probe = tokio::time::Instant::now();
            loop {
                tokio::select! {
                    Some(m) = control_sub.next() => {
                        let payload = &m.payload[..];
                        let Some(sp) = payload.iter().position(|&b| b == b' ') else { continue };
                        if &payload[..sp] == sender.as_bytes() { continue; }
                        if let Some(h) = control.get() { h(&payload[sp + 1..]); }
                    }
                    Some(m) = nodes_sub.next() => {
                        // "<ttl ms> <id> <info>"
                        let text = String::from_utf8_lossy(&m.payload).to_string();
                        let mut parts = text.splitn(3, ' ');
                        if let (Some(ttl), Some(id), Some(info)) = (parts.next(), parts.next(), parts.next()) {
                            if let Ok(ttl) = ttl.parse::<u64>() {
                                let now = now_ms();
                                let until = now.saturating_add(ttl.min(MAX_NODE_TTL_MS));
                                let mut nodes = nodes.lock();
                                nodes.retain(|_, (_, u)| *u > now);
                                if nodes.len() < MAX_NODES || nodes.contains_key(id) {
                                    nodes.insert(id.to_string(), (Bytes::from(info.to_string()), until));
                                }
                            }
                        }
                    }
                    Some(_) = probe_sub.next() => {
                        last_probe = tokio::time::Instant::now();
                        shared.probe_ok.store(true, Ordering::Release);
                    }
                    changed = reconnected.changed() => {
                        if changed.is_err() { break; }
                        handler.reconnected();
                    }
                    _ = tick.tick() => {
                        if last_probe.elapsed() > PROBE_DEADLINE
                            && shared.probe_ok.swap(false, Ordering::AcqRel)
                        {
                            tracing::warn!("nats probe did not come back: reconnecting");
                            let _ = shared.client.force_reconnect().await;
                        }
                        let _ = shared.core_publish(probe.clone(), None, Bytes::from_static(b"p")).await;
                    }
                }
            }
        });
        // The stream, in the background (NATS may be away at start).
        let shared = self.shared.clone();
        self.io.handle.spawn(async move {
            let mut backoff = Duration::from_millis(50);
            while let Err(e) = shared.stream_for(None).await {
                tracing::debug!(error = %e, "the jetstream stream is not ready; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        });
        Ok(())
    }

    async fn publish(
        &self,
        channel: &ChannelName,
        data: Bytes,
        options: &PublishOptions,
    ) -> Result<Option<StreamPosition>, BrokerError> {
        if options.history_size == 0 {
            let subject = format!("{LIVE}{}", subject_token(channel));
            let mut headers = HeaderMap::new();
            headers.insert(H_NODE, &*self.shared.node);
            headers.insert(H_TIME, now_ms().to_string());
            self.shared.core_publish(subject, Some(headers), data).await?;
            return Ok(None);
        }
        self.shared.publish_stored(channel, data, options).await.map(Some)
    }

    /// Channels run concurrently; each channel's publications in item order.
    async fn publish_many(
        &self,
        items: Vec<(ChannelName, Bytes, PublishOptions)>,
    ) -> Vec<Result<Option<StreamPosition>, BrokerError>> {
        let n = items.len();
        let mut by_channel: Vec<(ChannelName, Vec<(usize, Bytes, PublishOptions)>)> = Vec::new();
        let mut index: HashMap<ChannelName, usize> = HashMap::new();
        for (i, (channel, data, options)) in items.into_iter().enumerate() {
            let k = *index.entry(channel.clone()).or_insert_with(|| {
                by_channel.push((channel.clone(), Vec::new()));
                by_channel.len() - 1
            });
            by_channel[k].1.push((i, data, options));
        }
        let runs = by_channel.into_iter().map(|(channel, list)| async move {
            let mut out = Vec::with_capacity(list.len());
            for (i, data, options) in list {
                out.push((i, self.publish(&channel, data, &options).await));
            }
            out
        });
        let mut results: Vec<Option<Result<Option<StreamPosition>, BrokerError>>> =
            (0..n).map(|_| None).collect();
        for run in futures_util::future::join_all(runs).await {
            for (i, r) in run {
                results[i] = Some(r);
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
        self.shared.read(channel, options, query).await
    }

    async fn send_control(&self, message: Bytes) -> Result<(), BrokerError> {
        let mut payload = Vec::with_capacity(self.sender.len() + 1 + message.len());
        payload.extend_from_slice(self.sender.as_bytes());
        payload.push(b' ');
        payload.extend_from_slice(&message);
        self.shared.core_publish(CONTROL_SUBJECT.into(), None, Bytes::from(payload)).await
    }

    fn set_control(&self, handler: ControlHandler) {
        let _ = self.control.set(handler);
    }

    async fn announce(&self, id: &str, info: Bytes, ttl: Duration) -> Result<(), BrokerError> {
        let ttl = ttl_ms(ttl);
        let mut payload = format!("{ttl} {id} ").into_bytes();
        payload.extend_from_slice(&info);
        // Our own entry at once (our subscription sees it too).
        self.nodes.lock().insert(id.to_string(), (info, now_ms() + ttl));
        self.shared.core_publish(NODES_SUBJECT.into(), None, Bytes::from(payload)).await
    }

    async fn nodes(&self) -> Result<Option<Vec<(String, Bytes)>>, BrokerError> {
        let now = now_ms();
        let mut nodes = self.nodes.lock();
        nodes.retain(|_, (_, until)| *until > now);
        Ok(Some(nodes.iter().map(|(id, (info, _))| (id.clone(), info.clone())).collect()))
    }

    fn is_behind(&self) -> bool {
        self.shared.lateness.is_behind()
    }

    fn is_ready(&self) -> bool {
        self.shared.connected()
            && self.shared.instance.lock().is_some()
            && self.shared.probe_ok.load(Ordering::Acquire)
    }
}

impl NatsBroker {
    /// This broker's id: in control messages, announcements and the `Herald-Node` header of
    /// its publications.
    pub fn node_id(&self) -> &str {
        &self.sender
    }

    async fn reconcile(&self, channel: &ChannelName) -> Result<(), BrokerError> {
        let (done, answer) = oneshot::channel();
        self.ops
            .send(SubOp { channel: channel.clone(), done })
            .map_err(|_| BrokerError::Unavailable("the nats broker is not started"))?;
        match tokio::time::timeout(Duration::from_secs(5), answer).await {
            Ok(answer) => {
                answer.map_err(|_| BrokerError::Unavailable("the nats broker stopped"))?
            }
            Err(_) => Err(BrokerError::Unavailable("nats did not confirm the subscription")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The channel of a subject token.
    fn channel_of_token(token: &str) -> Option<ChannelName> {
        ChannelName::parse(&token.replace('~', ".")).ok()
    }

    #[test]
    fn channel_names_map_to_one_token_and_back() {
        for name in ["market:btc.usd", "a.b.c", "ns:x#u1,u2", "plain", "a..b", ".x."] {
            let c = ChannelName::parse(name).unwrap();
            let token = subject_token(&c);
            assert!(!token.contains('.') && !token.contains('*') && !token.contains('>'));
            assert_eq!(channel_of_token(&token).unwrap(), c, "{name}");
        }
    }

    #[test]
    fn urls_split_into_servers_and_credentials() {
        let (servers, creds) = parse_url("nats://u:p@h1:4222,h2:4223").unwrap();
        assert_eq!(servers, ["nats://h1:4222", "nats://h2:4223"]);
        assert_eq!(creds, Some(("u".into(), "p".into())));
        assert_eq!(without_password("nats://u:secret@h1:4222"), "nats://u:***@h1:4222");
        assert!(parse_url("redis://x").is_err());
        assert!(parse_url("nats://").is_err());
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, *v);
        }
        h
    }

    #[test]
    fn stored_positions_are_read_only_from_well_formed_headers() {
        let good = [
            (H_EPOCH, "abcd1234"),
            (H_OFFSET, "7"),
            (H_CREATED, "1"),
            (H_TIME, "2"),
            (H_PREV, "3"),
        ];
        let m = Stored::parse(9, &headers(&good), Bytes::from("x")).unwrap();
        assert_eq!((m.seq, m.offset, &*m.epoch, m.prev), (9, 7, "abcd1234", 3));
        // Forged or garbled: no position (a live one is dropped, a stored one ends the epoch).
        for (k, v) in [
            (H_OFFSET, "18446744073709551615"),
            (H_OFFSET, "0"),
            (H_OFFSET, "-1"),
            (H_EPOCH, "ABCD1234"),
            (H_EPOCH, "short"),
            (H_EPOCH, "abcd12345"),
            (H_PREV, "x"),
            (H_TIME, "9007199254740993"),
        ] {
            let mut h: Vec<(&str, &str)> = good.iter().filter(|(n, _)| *n != k).copied().collect();
            h.push((k, v));
            assert!(Stored::parse(1, &headers(&h), Bytes::new()).is_none(), "{k}: {v}");
        }
        let missing: Vec<(&str, &str)> = good[1..].to_vec();
        assert!(Stored::parse(1, &headers(&missing), Bytes::new()).is_none());
    }

    #[test]
    fn instances_are_eight_base36_characters() {
        let a = instance_of(1_700_000_000_000_000_000);
        let b = instance_of(1_700_000_000_000_000_001);
        assert_eq!(a.len(), history::INSTANCE_LEN);
        assert_ne!(a, b);
        assert!(a.bytes().all(|c| c.is_ascii_digit() || c.is_ascii_lowercase()));
    }
}
