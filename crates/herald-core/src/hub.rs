//! The hub: which local connections subscribe to which channel, and fan-out.
//!
//! Channels are spread over shards by hash, each behind its own lock, so publications to
//! different channels rarely meet on one lock. A publication is encoded at most once per wire
//! format (and only for formats some subscriber of the channel speaks) into a complete WebSocket
//! frame or SSE event, and the same [`Bytes`] is queued to every subscriber of that format;
//! nothing awaits under a shard lock.
//!
//! A new subscription starts *pending*: publications that arrive while the subscribe reply is
//! being prepared (broker subscribe, position or history lookup) are buffered for it, and
//! [`Hub::activate`] queues the reply followed by the buffered publications newer than the
//! position the reply announced. Live publications therefore follow the reply with no gap and
//! no duplicate, whatever broker sits behind.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use herald_broker::{BrokerHandler, Publication};
use herald_protocol::{sse, ws, ChannelName, StreamPosition, WireFormat};
use parking_lot::Mutex;

use crate::metrics::Metrics;
use crate::queue::{Item, Outbox, PushError};

const SHARDS: usize = 128;

/// Most publications buffered for one pending subscription before it counts as a slow consumer
/// (their bytes are bounded too: by the subscriber queue's hard cap, see [`Sink::hard_bytes`]).
pub const MAX_PENDING_PUBLICATIONS: usize = 16 * 1024;

/// One publication as an SSE stream queues it: the shared event bytes plus the position the
/// stream's writer folds into the per-stream event id.
#[derive(Debug, Clone)]
pub struct SseItem {
    /// The channel of the publication; `None` for stream-level events (ping, reset).
    pub channel: Option<ChannelName>,
    /// Offset of the publication, where the channel keeps history.
    pub offset: Option<u64>,
    /// Epoch of `offset`.
    pub epoch: Option<Arc<str>>,
    /// The event without its `id:` line, shared by every SSE subscriber.
    pub body: Bytes,
    /// Bytes of the `id:` line the stream's writer puts in front of this event (the stream's
    /// bound, see `herald_protocol::sse::id_line_bound`; 0 for events without an id): counted
    /// with the body against the queue bound, since the writer renders it.
    pub id_len: usize,
}

impl Item for SseItem {
    fn wire_len(&self) -> usize {
        self.body.len() + self.id_len
    }
}

/// Where a subscriber's publications go, in the subscriber's wire format.
#[derive(Debug, Clone)]
pub enum Sink {
    /// A WebSocket connection speaking the given format.
    Ws(Arc<Outbox<Bytes>>, WireFormat),
    /// A Server-Sent Events stream, with the bound of its `id:` line (each publication queued
    /// to it counts that much more against its queue bound, see [`SseItem::id_len`]).
    Sse(Arc<Outbox<SseItem>>, usize),
}

impl Sink {
    /// Marks the subscriber's queue overflowed (its writer disconnects it).
    pub fn overflow(&self) {
        match self {
            Sink::Ws(o, _) => o.overflow(),
            Sink::Sse(o, _) => o.overflow(),
        }
    }

    /// The hard cap of the subscriber's queue, in bytes: also the most a pending subscription
    /// buffers in the hub.
    pub fn hard_bytes(&self) -> usize {
        match self {
            Sink::Ws(o, _) => o.limits().hard_bytes,
            Sink::Sse(o, _) => o.limits().hard_bytes,
        }
    }

    /// Asks the subscriber's writer to close the connection with `code`.
    pub fn request_close(&self, code: herald_protocol::CloseCode) {
        match self {
            Sink::Ws(o, _) => o.request_close(code),
            Sink::Sse(o, _) => o.request_close(code),
        }
    }
}

/// An encoded publication shared by many queues: its size is in
/// [`Metrics::shared_frame_bytes`] from encoding until the last queue lets go of it.
struct SharedFrame {
    bytes: Bytes,
    metrics: Arc<Metrics>,
}

impl SharedFrame {
    fn share(bytes: Bytes, metrics: &Arc<Metrics>) -> Bytes {
        metrics.shared_frame_bytes.fetch_add(bytes.len() as i64, Ordering::Relaxed);
        Bytes::from_owner(SharedFrame { bytes, metrics: metrics.clone() })
    }
}

impl AsRef<[u8]> for SharedFrame {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

impl Drop for SharedFrame {
    fn drop(&mut self) {
        self.metrics.shared_frame_bytes.fetch_sub(self.bytes.len() as i64, Ordering::Relaxed);
    }
}

/// A publication encoded for each wire format, each at most once, on first need.
struct Encoded<'a> {
    channel: &'a ChannelName,
    publication: &'a Publication,
    metrics: &'a Arc<Metrics>,
    /// The WebSocket frame, per format.
    ws: [Option<Bytes>; WireFormat::COUNT],
    /// The WebSocket frame that also names the epoch, for subscribers who have not seen it.
    ws_epoch: [Option<Bytes>; WireFormat::COUNT],
    sse: Option<Bytes>,
}

impl<'a> Encoded<'a> {
    fn new(
        channel: &'a ChannelName,
        publication: &'a Publication,
        metrics: &'a Arc<Metrics>,
    ) -> Self {
        Encoded {
            channel,
            publication,
            metrics,
            ws: Default::default(),
            ws_epoch: Default::default(),
            sse: None,
        }
    }

    /// The WebSocket frame in `format`; `with_epoch` names the epoch (for subscribers who have
    /// not seen it).
    fn ws(&mut self, format: WireFormat, with_epoch: bool) -> Bytes {
        let (channel, publication, metrics) = (self.channel, self.publication, self.metrics);
        let slots = if with_epoch { &mut self.ws_epoch } else { &mut self.ws };
        slots[format.index()]
            .get_or_insert_with(|| {
                let frame = encode_pub_frame(channel, publication, with_epoch, format);
                SharedFrame::share(frame, metrics)
            })
            .clone()
    }

    fn sse(&mut self, id_len: usize) -> SseItem {
        let (channel, publication, metrics) = (self.channel, self.publication, self.metrics);
        let body = self
            .sse
            .get_or_insert_with(|| {
                let event =
                    sse::encode_pub_event(channel.as_str(), publication.offset, &publication.data);
                SharedFrame::share(Bytes::from(event), metrics)
            })
            .clone();
        SseItem {
            channel: Some(self.channel.clone()),
            offset: self.publication.offset,
            epoch: self.publication.epoch.clone(),
            body,
            id_len,
        }
    }

    /// Queues the publication to `sub` (replacing the pending one of the channel where it is
    /// conflated); returns the bytes to add to the node backlog. The first publication of an
    /// epoch the subscriber has not seen names that epoch (WebSocket; SSE ids carry it).
    fn push(&mut self, sub: &mut Subscriber, conflate: bool) -> Result<isize, PushError> {
        let new_epoch = match &self.publication.epoch {
            Some(e) => match &sub.epoch {
                Some(seen) => !Arc::ptr_eq(e, seen) && **e != **seen,
                None => true,
            },
            None => false,
        };
        if new_epoch {
            sub.epoch = self.publication.epoch.clone();
        } else if self.publication.offset.is_some_and(|o| o <= sub.after) {
            // Already sent: a networked broker's history read can see a publication before
            // its pub/sub message reaches this node, so the subscribe reply held it.
            return Ok(0);
        }
        if let Some(offset) = self.publication.offset {
            sub.after = offset;
        }
        match (&sub.sink, conflate) {
            (Sink::Ws(o, f), false) => o.push_shared(self.ws(*f, new_epoch)).map(|n| n as isize),
            (Sink::Sse(o, id_len), false) => o.push_shared(self.sse(*id_len)).map(|n| n as isize),
            // A conflated frame may replace the one that named a new epoch: each names it.
            (Sink::Ws(o, f), true) => {
                let with_epoch = self.publication.epoch.is_some();
                o.push_conflated(self.channel, self.ws(*f, with_epoch))
            }
            (Sink::Sse(o, id_len), true) => o.push_conflated(self.channel, self.sse(*id_len)),
        }
    }
}

/// A live subscriber of one channel: the connection's id, its queue, and the position it has
/// (its subscribe reply's, then the newest pushed): publications of that epoch up to that
/// offset are not pushed again.
#[derive(Debug, Clone)]
struct Subscriber {
    id: u64,
    sink: Sink,
    epoch: Option<Arc<str>>,
    /// Offset of the newest publication of `epoch` the subscriber has (0: none).
    after: u64,
}

/// A subscriber whose subscribe reply is not queued yet.
#[derive(Debug)]
struct Pending {
    id: u64,
    sink: Sink,
    buffered: Vec<Publication>,
    /// Bytes of `data` in `buffered`.
    buffered_bytes: usize,
}

#[derive(Debug, Default)]
struct ChannelEntry {
    live: Vec<Subscriber>,
    pending: Vec<Pending>,
    /// Slow subscribers keep only the newest pending publication (namespace `conflate`).
    conflate: bool,
}

impl ChannelEntry {
    fn len(&self) -> usize {
        self.live.len() + self.pending.len()
    }
}

type Shard = Mutex<HashMap<ChannelName, ChannelEntry>>;

/// Channel -> local subscribers, sharded; the node's [`BrokerHandler`].
pub struct Hub {
    shards: Box<[Shard]>,
    hasher: std::collections::hash_map::RandomState,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub").field("shards", &self.shards.len()).finish_non_exhaustive()
    }
}

/// The WebSocket frame of a `pub` push in `format`; with `with_epoch`, naming the
/// publication's epoch.
pub fn encode_pub_frame(
    channel: &ChannelName,
    publication: &Publication,
    with_epoch: bool,
    format: WireFormat,
) -> Bytes {
    let epoch = if with_epoch { publication.epoch.as_deref() } else { None };
    let payload =
        format.codec().encode_pub(channel.as_str(), publication.offset, epoch, &publication.data);
    ws::encode_frame(ws::Role::Server, format.opcode(), &payload)
}

impl Hub {
    /// An empty hub counting into `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Hub {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: Default::default(),
            metrics,
        }
    }

    fn shard(&self, channel: &ChannelName) -> &Shard {
        &self.shards[(self.hasher.hash_one(channel) as usize) % self.shards.len()]
    }

    /// Registers connection `id` as a pending subscriber of `channel`: publications are buffered
    /// for it until [`Hub::activate`]. Returns true when it is the channel's first local
    /// subscriber (the caller then subscribes the node at the broker).
    pub fn subscribe_pending(
        &self,
        channel: &ChannelName,
        id: u64,
        sink: Sink,
        conflate: bool,
    ) -> bool {
        let mut channels = self.shard(channel).lock();
        let entry = channels.entry(channel.clone()).or_default();
        entry.conflate = conflate;
        let first = entry.len() == 0;
        if first {
            self.metrics.channels.fetch_add(1, Ordering::Relaxed);
        }
        entry.pending.push(Pending { id, sink, buffered: Vec::new(), buffered_bytes: 0 });
        first
    }

    /// Calls `prelude` to queue the subscribe reply (or recovered events) to pending subscriber
    /// `id`, then queues every buffered publication newer than `after` (all of them when
    /// `after` is `None`), and makes the subscriber live; all under the channel's lock, so no
    /// publication is missed or doubled in between.
    pub fn activate(
        &self,
        channel: &ChannelName,
        id: u64,
        after: Option<&StreamPosition>,
        prelude: impl FnOnce(&Sink) -> Result<(), PushError>,
    ) -> Result<(), PushError> {
        let mut channels = self.shard(channel).lock();
        let Some(entry) = channels.get_mut(channel) else {
            return Err(PushError::Closed);
        };
        let Some(i) = entry.pending.iter().position(|p| p.id == id) else {
            return Err(PushError::Closed);
        };
        // The reply first; if it cannot be queued the subscriber stays pending, so the
        // caller's unsubscribe finds it (and drops the channel when it was the last).
        prelude(&entry.pending[i].sink)?;
        let pending = entry.pending.swap_remove(i);
        let mut backlog = 0;
        let conflate = entry.conflate;
        let mut sub = Subscriber {
            id,
            sink: pending.sink,
            epoch: after.map(|p| Arc::from(p.epoch.as_str())),
            after: after.map_or(0, |p| p.offset),
        };
        for publication in &pending.buffered {
            let newer = match (after, publication.offset) {
                (Some(pos), Some(offset)) => {
                    offset > pos.offset || publication.epoch.as_deref() != Some(pos.epoch.as_str())
                }
                _ => true,
            };
            if newer {
                // An overflow here marks the queue: the connection is cut with 4008 and its
                // close unsubscribes it like any live subscriber.
                match Encoded::new(channel, publication, &self.metrics).push(&mut sub, conflate) {
                    Ok(counted) => backlog += counted,
                    Err(_) => break,
                }
                self.metrics.deliveries_out.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.metrics.backlog_bytes.fetch_add(backlog as i64, Ordering::Relaxed);
        entry.live.push(sub);
        Ok(())
    }

    /// Removes connection `id` from `channel` (live or pending). Returns true when the channel
    /// has no local subscriber left (the caller then unsubscribes the node at the broker).
    pub fn unsubscribe(&self, channel: &ChannelName, id: u64) -> bool {
        let mut channels = self.shard(channel).lock();
        let Some(entry) = channels.get_mut(channel) else {
            return false;
        };
        if let Some(i) = entry.live.iter().position(|s| s.id == id) {
            entry.live.swap_remove(i);
        } else if let Some(i) = entry.pending.iter().position(|p| p.id == id) {
            entry.pending.swap_remove(i);
        } else {
            return false;
        }
        if entry.len() == 0 {
            channels.remove(channel);
            self.metrics.channels.fetch_sub(1, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// Every channel with local subscribers and how many.
    pub fn channels(&self) -> Vec<(ChannelName, usize)> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            out.extend(shard.lock().iter().map(|(c, e)| (c.clone(), e.len())));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

impl BrokerHandler for Hub {
    fn has_subscribers(&self, channel: &ChannelName) -> bool {
        self.shard(channel).lock().get(channel).is_some_and(|e| e.len() > 0)
    }

    fn reconnected(&self) {
        self.metrics.broker_reconnects.fetch_add(1, Ordering::Relaxed);
    }

    /// Cuts the channel's local subscribers with 4008 (reconnect): each recovers from its own
    /// position, or learns that it cannot (`recovered: false`).
    fn channel_lost(&self, channel: &ChannelName) {
        let channels = self.shard(channel).lock();
        let Some(entry) = channels.get(channel) else { return };
        self.metrics.broker_channels_lost.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%channel, subscribers = entry.len(), "publications lost: subscribers recover");
        for sub in &entry.live {
            sub.sink.request_close(herald_protocol::CloseCode::SlowConsumer);
        }
        for pending in &entry.pending {
            pending.sink.request_close(herald_protocol::CloseCode::SlowConsumer);
        }
    }

    fn handle_publication(&self, channel: &ChannelName, publication: &Publication) {
        let mut channels = self.shard(channel).lock();
        let Some(entry) = channels.get_mut(channel) else {
            return;
        };
        let mut encoded = Encoded::new(channel, publication, &self.metrics);
        let mut backlog = 0;
        let conflate = entry.conflate;
        for sub in &mut entry.live {
            // A refused push marks the queue overflowed; its writer disconnects with 4008.
            if let Ok(counted) = encoded.push(sub, conflate) {
                backlog += counted;
            }
        }
        self.metrics.backlog_bytes.fetch_add(backlog as i64, Ordering::Relaxed);
        self.metrics.deliveries_out.fetch_add(entry.live.len() as u64, Ordering::Relaxed);
        for pending in &mut entry.pending {
            // A subscription pending for long (a large recovery read slowly) buffers a bounded
            // amount; beyond it the connection is a slow consumer (4008) and recovers.
            let bytes = pending.buffered_bytes.saturating_add(publication.data.len());
            if pending.buffered.len() >= MAX_PENDING_PUBLICATIONS
                || bytes > pending.sink.hard_bytes()
            {
                if pending.buffered_bytes != usize::MAX {
                    // Once: the buffer is freed and nothing more is buffered for it.
                    pending.buffered = Vec::new();
                    pending.buffered_bytes = usize::MAX;
                    pending.sink.overflow();
                }
                continue;
            }
            pending.buffered_bytes = bytes;
            pending.buffered.push(publication.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    fn publication(offset: Option<u64>, data: &'static str) -> Publication {
        Publication {
            offset,
            epoch: offset.map(|_| Arc::from("e")),
            data: Bytes::from_static(data.as_bytes()),
        }
    }

    fn drain(outbox: &Outbox) -> Vec<Bytes> {
        let mut q = VecDeque::new();
        outbox.take(&mut q);
        q.into_iter().collect()
    }

    #[test]
    fn fan_out_shares_one_buffer() {
        let hub = Hub::new(Arc::new(Metrics::default()));
        let c = ChannelName::parse("c").unwrap();
        let a = Arc::new(Outbox::new(1 << 20, 1000, Arc::new(Metrics::default())));
        let b = Arc::new(Outbox::new(1 << 20, 1000, Arc::new(Metrics::default())));
        assert!(hub.subscribe_pending(&c, 1, Sink::Ws(a.clone(), WireFormat::Json), false));
        assert!(!hub.subscribe_pending(&c, 2, Sink::Ws(b.clone(), WireFormat::Json), false));
        hub.activate(&c, 1, None, |_| a.push(Bytes::from_static(b"r1"))).unwrap();
        hub.activate(&c, 2, None, |_| b.push(Bytes::from_static(b"r2"))).unwrap();
        hub.handle_publication(&c, &publication(None, "1"));
        let fa = drain(&a);
        let fb = drain(&b);
        assert_eq!(fa.len(), 2);
        assert_eq!(fa[1].as_ptr(), fb[1].as_ptr(), "same bytes for every subscriber");
        assert!(!hub.unsubscribe(&c, 1));
        assert!(hub.unsubscribe(&c, 2));
        assert!(hub.channels().is_empty());
    }

    #[test]
    fn each_format_is_encoded_once_and_only_where_it_has_subscribers() {
        let metrics = Arc::new(Metrics::default());
        let hub = Hub::new(metrics.clone());
        let outbox = || Arc::new(Outbox::new(1 << 20, 1000, Arc::new(Metrics::default())));
        let mixed = ChannelName::parse("mixed").unwrap();
        let json_only = ChannelName::parse("json").unwrap();
        let subs = [
            (&mixed, WireFormat::Json),
            (&mixed, WireFormat::Proto),
            (&mixed, WireFormat::Json),
            (&mixed, WireFormat::Proto),
            (&json_only, WireFormat::Json),
            (&json_only, WireFormat::Json),
        ];
        let boxes: Vec<_> = subs
            .iter()
            .enumerate()
            .map(|(i, (c, f))| {
                let o = outbox();
                hub.subscribe_pending(c, i as u64, Sink::Ws(o.clone(), *f), false);
                hub.activate(c, i as u64, None, |_| Ok(())).unwrap();
                o
            })
            .collect();
        let shared = || metrics.shared_frame_bytes.load(Ordering::Relaxed);

        // Only JSON subscribers: one JSON frame, no protobuf encoding at all.
        hub.handle_publication(&json_only, &publication(None, "[1]"));
        let a = drain(&boxes[4]);
        let b = drain(&boxes[5]);
        assert_eq!(a[0].as_ptr(), b[0].as_ptr());
        assert_eq!(a[0][0], 0x81, "a final text frame");
        assert_eq!(shared(), a[0].len() as i64, "one encoding, counted once");
        drop((a, b));
        assert_eq!(shared(), 0);

        // Both formats: one encoding each, shared by that format's subscribers.
        hub.handle_publication(&mixed, &publication(None, "[1]"));
        let frames: Vec<Bytes> = boxes[..4].iter().map(|o| drain(o).remove(0)).collect();
        assert_eq!(frames[0].as_ptr(), frames[2].as_ptr());
        assert_eq!(frames[1].as_ptr(), frames[3].as_ptr());
        assert_eq!((frames[0][0], frames[1][0]), (0x81, 0x82), "text, then binary");
        assert_eq!(shared(), (frames[0].len() + frames[1].len()) as i64);
        let proto_payload = &frames[1][2..];
        assert_eq!(
            proto_payload,
            &herald_protocol::proto::encode_pub("mixed", None, None, b"[1]")[..]
        );
    }

    #[test]
    fn a_pending_subscription_buffers_at_most_its_queue_cap() {
        let hub = Hub::new(Arc::new(Metrics::default()));
        let c = ChannelName::parse("c").unwrap();
        let a = Arc::new(Outbox::new(1000, 1000, Arc::new(Metrics::default())));
        hub.subscribe_pending(&c, 1, Sink::Ws(a.clone(), WireFormat::Json), false);
        let big = Publication { offset: None, epoch: None, data: Bytes::from(vec![b'1'; 400]) };
        hub.handle_publication(&c, &big);
        hub.handle_publication(&c, &big);
        assert_eq!(a.state(), crate::queue::OutboxState::Open);
        hub.handle_publication(&c, &big);
        assert_eq!(
            a.state(),
            crate::queue::OutboxState::Overflowed,
            "1,200 bytes over a 1,000 cap"
        );
    }

    #[test]
    fn pending_subscriber_gets_reply_then_newer_publications_only() {
        let hub = Hub::new(Arc::new(Metrics::default()));
        let c = ChannelName::parse("c").unwrap();
        let a = Arc::new(Outbox::new(1 << 20, 1000, Arc::new(Metrics::default())));
        hub.subscribe_pending(&c, 1, Sink::Ws(a.clone(), WireFormat::Json), false);
        hub.handle_publication(&c, &publication(Some(5), "5"));
        hub.handle_publication(&c, &publication(Some(6), "6"));
        let pos = StreamPosition { offset: 5, epoch: "e".into() };
        hub.activate(&c, 1, Some(&pos), |_| a.push(Bytes::from_static(b"reply"))).unwrap();
        hub.handle_publication(&c, &publication(Some(7), "7"));
        let frames = drain(&a);
        assert_eq!(frames.len(), 3);
        assert_eq!(&frames[0][..], b"reply");
        let text = |f: &Bytes| String::from_utf8_lossy(f).to_string();
        assert!(text(&frames[1]).contains("\"offset\":6"));
        assert!(text(&frames[2]).contains("\"offset\":7"));
    }

    #[test]
    fn a_publication_the_reply_already_held_is_not_pushed_again() {
        // A networked broker: the history read saw offsets up to 7 before their pub/sub
        // messages reached the node; they arrive after the subscriber went live.
        let hub = Hub::new(Arc::new(Metrics::default()));
        let c = ChannelName::parse("c").unwrap();
        let a = Arc::new(Outbox::new(1 << 20, 1000, Arc::new(Metrics::default())));
        hub.subscribe_pending(&c, 1, Sink::Ws(a.clone(), WireFormat::Json), false);
        hub.handle_publication(&c, &publication(Some(5), "5"));
        let pos = StreamPosition { offset: 7, epoch: "e".into() };
        hub.activate(&c, 1, Some(&pos), |_| a.push(Bytes::from_static(b"reply"))).unwrap();
        for o in [6, 7, 8] {
            hub.handle_publication(&c, &publication(Some(o), "x"));
        }
        let other =
            Publication { offset: Some(1), epoch: Some(Arc::from("f")), data: Bytes::new() };
        hub.handle_publication(&c, &other);
        let text: Vec<String> =
            drain(&a).iter().map(|f| String::from_utf8_lossy(f).to_string()).collect();
        assert_eq!(text.len(), 3, "{text:?}");
        assert!(text[1].contains("\"offset\":8"), "{text:?}");
        assert!(text[2].contains("\"offset\":1"), "a new epoch starts again: {text:?}");
    }

    #[test]
    fn a_conflated_subscriber_learns_a_new_epoch_even_when_its_first_frame_is_replaced() {
        let hub = Hub::new(Arc::new(Metrics::default()));
        let c = ChannelName::parse("c").unwrap();
        let a = Arc::new(Outbox::new(1 << 20, 1000, Arc::new(Metrics::default())));
        hub.subscribe_pending(&c, 1, Sink::Ws(a.clone(), WireFormat::Json), true);
        let pos = StreamPosition { offset: 5, epoch: "e".into() };
        hub.activate(&c, 1, Some(&pos), |_| a.push(Bytes::from_static(b"reply"))).unwrap();
        for o in [1, 2] {
            let p =
                Publication { offset: Some(o), epoch: Some(Arc::from("f")), data: Bytes::new() };
            hub.handle_publication(&c, &p);
        }
        let text: Vec<String> =
            drain(&a).iter().map(|f| String::from_utf8_lossy(f).to_string()).collect();
        assert_eq!(text.len(), 2, "the reply and the newest value: {text:?}");
        assert!(text[1].contains("\"offset\":2"), "{text:?}");
        assert!(text[1].contains("\"epoch\":\"f\""), "the new epoch is named: {text:?}");
    }
}
