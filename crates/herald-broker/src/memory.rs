//! The in-memory broker of a single node.
//!
//! Channel streams (epoch and last offset) live in shards keyed by channel hash. A publication
//! takes its shard's lock, gets the next offset and is handed to the handler under that lock,
//! so publications of one channel reach the hub in offset order while publications of channels
//! in other shards never contend.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use bytes::Bytes;
use herald_protocol::{ChannelName, StreamPosition};
use parking_lot::Mutex;

use crate::{Broker, BrokerError, BrokerHandler, Publication, PublishOptions};

const SHARDS: usize = 64;

/// Stream state of one channel with history.
#[derive(Debug)]
struct Stream {
    epoch: Arc<str>,
    offset: u64,
    last_publish: Instant,
}

impl Stream {
    fn new() -> Self {
        Stream { epoch: new_epoch(), offset: 0, last_publish: Instant::now() }
    }
}

/// A fresh epoch: 8 random base-36 characters.
fn new_epoch() -> Arc<str> {
    const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut s = String::with_capacity(8);
    for _ in 0..8 {
        let i = rand::random::<usize>() % ALPHABET.len();
        s.push(ALPHABET[i] as char);
    }
    Arc::from(s)
}

/// The broker of a node that runs alone: no network, offsets assigned in memory.
pub struct MemoryBroker {
    shards: Box<[Mutex<HashMap<ChannelName, Stream>>]>,
    hasher: std::collections::hash_map::RandomState,
    handler: OnceLock<Arc<dyn BrokerHandler>>,
}

impl std::fmt::Debug for MemoryBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBroker").finish_non_exhaustive()
    }
}

impl Default for MemoryBroker {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryBroker {
    /// A broker with no channels.
    pub fn new() -> Self {
        MemoryBroker {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: Default::default(),
            handler: OnceLock::new(),
        }
    }

    fn shard(&self, channel: &ChannelName) -> &Mutex<HashMap<ChannelName, Stream>> {
        &self.shards[(self.hasher.hash_one(channel) as usize) % self.shards.len()]
    }

    /// Number of channels whose stream state is held.
    pub fn stream_count(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }

    /// Drops the stream state of channels idle for longer than their TTL. `ttl_of` gives each
    /// channel's TTL; called periodically by the server.
    pub fn expire_idle(&self, ttl_of: impl Fn(&ChannelName) -> std::time::Duration) {
        let now = Instant::now();
        for shard in self.shards.iter() {
            shard.lock().retain(|c, s| now.duration_since(s.last_publish) <= ttl_of(c));
        }
    }

    /// Publishes synchronously (the memory broker never waits).
    pub fn publish_now(
        &self,
        channel: &ChannelName,
        data: Bytes,
        options: &PublishOptions,
    ) -> Result<Option<StreamPosition>, BrokerError> {
        let handler = self.handler.get().ok_or(BrokerError::Unavailable("not started"))?;
        let mut streams = self.shard(channel).lock();
        if options.history_size == 0 {
            let publication = Publication { offset: None, epoch: None, data };
            handler.handle_publication(channel, &publication);
            return Ok(None);
        }
        let now = Instant::now();
        let stream = streams.entry(channel.clone()).or_insert_with(Stream::new);
        if now.duration_since(stream.last_publish) > options.history_ttl {
            *stream = Stream::new();
        }
        stream.offset += 1;
        stream.last_publish = now;
        let position = StreamPosition { offset: stream.offset, epoch: stream.epoch.to_string() };
        let publication =
            Publication { offset: Some(stream.offset), epoch: Some(stream.epoch.clone()), data };
        handler.handle_publication(channel, &publication);
        Ok(Some(position))
    }
}

#[async_trait::async_trait]
impl Broker for MemoryBroker {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn start(&self, handler: Arc<dyn BrokerHandler>) -> Result<(), BrokerError> {
        self.handler.set(handler).map_err(|_| BrokerError::Backend("already started".into()))
    }

    async fn publish(
        &self,
        channel: &ChannelName,
        data: Bytes,
        options: &PublishOptions,
    ) -> Result<Option<StreamPosition>, BrokerError> {
        self.publish_now(channel, data, options)
    }

    async fn subscribe(&self, _channel: &ChannelName) -> Result<(), BrokerError> {
        Ok(())
    }

    async fn unsubscribe(&self, _channel: &ChannelName) -> Result<(), BrokerError> {
        Ok(())
    }

    async fn position(
        &self,
        channel: &ChannelName,
        options: &PublishOptions,
    ) -> Result<Option<StreamPosition>, BrokerError> {
        if options.history_size == 0 {
            return Ok(None);
        }
        let mut streams = self.shard(channel).lock();
        let now = Instant::now();
        let stream = streams.entry(channel.clone()).or_insert_with(Stream::new);
        if now.duration_since(stream.last_publish) > options.history_ttl {
            *stream = Stream::new();
        }
        Ok(Some(StreamPosition { offset: stream.offset, epoch: stream.epoch.to_string() }))
    }

    fn is_ready(&self) -> bool {
        self.handler.get().is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(String, Option<u64>, Bytes)>>);

    impl BrokerHandler for Recorder {
        fn handle_publication(&self, channel: &ChannelName, p: &Publication) {
            self.0.lock().push((channel.to_string(), p.offset, p.data.clone()));
        }
    }

    fn opts(size: usize) -> PublishOptions {
        PublishOptions { history_size: size, history_ttl: Duration::from_secs(60) }
    }

    #[tokio::test]
    async fn offsets_increase_per_channel_and_only_with_history() {
        let broker = MemoryBroker::new();
        let rec = Arc::new(Recorder::default());
        broker.start(rec.clone()).await.unwrap();
        let a = ChannelName::parse("a").unwrap();
        let b = ChannelName::parse("b").unwrap();
        let p1 = broker.publish(&a, Bytes::from_static(b"1"), &opts(10)).await.unwrap().unwrap();
        let p2 = broker.publish(&a, Bytes::from_static(b"2"), &opts(10)).await.unwrap().unwrap();
        let q1 = broker.publish(&b, Bytes::from_static(b"3"), &opts(10)).await.unwrap().unwrap();
        assert_eq!((p1.offset, p2.offset, q1.offset), (1, 2, 1));
        assert_eq!(p1.epoch, p2.epoch);
        assert_ne!(p1.epoch, q1.epoch);
        assert!(broker.publish(&b, Bytes::from_static(b"4"), &opts(0)).await.unwrap().is_none());
        let pos = broker.position(&a, &opts(10)).await.unwrap().unwrap();
        assert_eq!(pos, p2);
        let seen = rec.0.lock().clone();
        assert_eq!(seen.len(), 4);
        assert_eq!(seen[3], ("b".to_string(), None, Bytes::from_static(b"4")));
    }

    #[tokio::test]
    async fn idle_channel_gets_new_epoch() {
        let broker = MemoryBroker::new();
        broker.start(Arc::new(Recorder::default())).await.unwrap();
        let a = ChannelName::parse("a").unwrap();
        let short = PublishOptions { history_size: 5, history_ttl: Duration::from_millis(20) };
        let p1 = broker.publish(&a, Bytes::from_static(b"1"), &short).await.unwrap().unwrap();
        tokio::time::sleep(Duration::from_millis(40)).await;
        let p2 = broker.publish(&a, Bytes::from_static(b"2"), &short).await.unwrap().unwrap();
        assert_ne!(p1.epoch, p2.epoch);
        assert_eq!(p2.offset, 1);
        broker.expire_idle(|_| Duration::from_millis(0));
        assert_eq!(broker.stream_count(), 0);
    }

    #[tokio::test]
    async fn publish_before_start_is_unavailable() {
        let broker = MemoryBroker::new();
        let a = ChannelName::parse("a").unwrap();
        assert!(matches!(
            broker.publish(&a, Bytes::new(), &opts(0)).await,
            Err(BrokerError::Unavailable(_))
        ));
    }
}
