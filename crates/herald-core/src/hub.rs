//! The hub: which local connections subscribe to which channel, and fan-out.
//!
//! Channels are spread over shards by hash, each behind its own lock, so publications to
//! different channels rarely meet on one lock. A publication is encoded once into a complete
//! WebSocket frame and the same [`Bytes`] is queued to every subscriber; nothing awaits under a
//! shard lock.
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
use herald_protocol::{push, ws, ChannelName, StreamPosition};
use parking_lot::Mutex;

use crate::metrics::Metrics;
use crate::queue::{Outbox, PushError};

const SHARDS: usize = 128;

/// Most publications buffered for one pending subscription before it counts as a slow consumer.
const MAX_PENDING_PUBLICATIONS: usize = 16 * 1024;

/// A live subscriber of one channel: the connection's id and its queue.
#[derive(Debug, Clone)]
struct Subscriber {
    id: u64,
    outbox: Arc<Outbox>,
}

/// A subscriber whose subscribe reply is not queued yet.
#[derive(Debug)]
struct Pending {
    id: u64,
    outbox: Arc<Outbox>,
    buffered: Vec<(Option<u64>, Option<Arc<str>>, Bytes)>,
}

#[derive(Debug, Default)]
struct ChannelEntry {
    live: Vec<Subscriber>,
    pending: Vec<Pending>,
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

/// The WebSocket text frame of a `pub` push.
pub fn encode_pub_frame(channel: &ChannelName, publication: &Publication) -> Bytes {
    let json = push::encode_pub(channel.as_str(), publication.offset, &publication.data);
    ws::encode_frame(ws::Role::Server, ws::Opcode::Text, &json)
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
    pub fn subscribe_pending(&self, channel: &ChannelName, id: u64, outbox: Arc<Outbox>) -> bool {
        let mut channels = self.shard(channel).lock();
        let entry = channels.entry(channel.clone()).or_default();
        let first = entry.len() == 0;
        if first {
            self.metrics.channels.fetch_add(1, Ordering::Relaxed);
        }
        entry.pending.push(Pending { id, outbox, buffered: Vec::new() });
        first
    }

    /// Queues `reply` to pending subscriber `id`, then every buffered publication newer than
    /// `after` (all of them when `after` is `None`), and makes the subscriber live.
    pub fn activate(
        &self,
        channel: &ChannelName,
        id: u64,
        reply: Bytes,
        after: Option<&StreamPosition>,
    ) -> Result<(), PushError> {
        let mut channels = self.shard(channel).lock();
        let Some(entry) = channels.get_mut(channel) else {
            return Err(PushError::Closed);
        };
        let Some(i) = entry.pending.iter().position(|p| p.id == id) else {
            return Err(PushError::Closed);
        };
        let pending = entry.pending.swap_remove(i);
        pending.outbox.push(reply)?;
        for (offset, epoch, frame) in pending.buffered {
            let newer = match (after, offset) {
                (Some(pos), Some(offset)) => {
                    offset > pos.offset || epoch.as_deref() != Some(pos.epoch.as_str())
                }
                _ => true,
            };
            if newer {
                pending.outbox.push(frame)?;
                self.metrics.deliveries_out.fetch_add(1, Ordering::Relaxed);
            }
        }
        entry.live.push(Subscriber { id, outbox: pending.outbox });
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

    /// Local subscribers of `channel`.
    pub fn subscriber_count(&self, channel: &ChannelName) -> usize {
        self.shard(channel).lock().get(channel).map_or(0, ChannelEntry::len)
    }
}

impl BrokerHandler for Hub {
    fn handle_publication(&self, channel: &ChannelName, publication: &Publication) {
        let mut channels = self.shard(channel).lock();
        let Some(entry) = channels.get_mut(channel) else {
            return;
        };
        let frame = encode_pub_frame(channel, publication);
        let mut backlog = 0;
        for sub in &entry.live {
            // A refused push marks the queue overflowed; its writer disconnects with 4008.
            if let Ok(counted) = sub.outbox.push_shared(frame.clone()) {
                backlog += counted;
            }
        }
        Outbox::add_to_backlog(&self.metrics, backlog);
        self.metrics.deliveries_out.fetch_add(entry.live.len() as u64, Ordering::Relaxed);
        for pending in &mut entry.pending {
            if pending.buffered.len() >= MAX_PENDING_PUBLICATIONS {
                pending.outbox.overflow();
                continue;
            }
            pending.buffered.push((publication.offset, publication.epoch.clone(), frame.clone()));
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
        let a = Arc::new(Outbox::new(1 << 20, Arc::new(Metrics::default())));
        let b = Arc::new(Outbox::new(1 << 20, Arc::new(Metrics::default())));
        assert!(hub.subscribe_pending(&c, 1, a.clone()));
        assert!(!hub.subscribe_pending(&c, 2, b.clone()));
        hub.activate(&c, 1, Bytes::from_static(b"r1"), None).unwrap();
        hub.activate(&c, 2, Bytes::from_static(b"r2"), None).unwrap();
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
    fn pending_subscriber_gets_reply_then_newer_publications_only() {
        let hub = Hub::new(Arc::new(Metrics::default()));
        let c = ChannelName::parse("c").unwrap();
        let a = Arc::new(Outbox::new(1 << 20, Arc::new(Metrics::default())));
        hub.subscribe_pending(&c, 1, a.clone());
        hub.handle_publication(&c, &publication(Some(5), "5"));
        hub.handle_publication(&c, &publication(Some(6), "6"));
        let pos = StreamPosition { offset: 5, epoch: "e".into() };
        hub.activate(&c, 1, Bytes::from_static(b"reply"), Some(&pos)).unwrap();
        hub.handle_publication(&c, &publication(Some(7), "7"));
        let frames = drain(&a);
        assert_eq!(frames.len(), 3);
        assert_eq!(&frames[0][..], b"reply");
        let text = |f: &Bytes| String::from_utf8_lossy(f).to_string();
        assert!(text(&frames[1]).contains("\"offset\":6"));
        assert!(text(&frames[2]).contains("\"offset\":7"));
    }
}
