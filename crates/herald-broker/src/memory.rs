//! The in-memory broker of a single node.
//!
//! Channel streams (epoch, last offset, retained publications) live in shards keyed by channel
//! hash. A publication takes its shard's lock, gets the next offset, is retained in the stream's
//! ring and handed to the handler under that lock, so publications of one channel reach the hub
//! in offset order, and a history read under the same lock sees exactly the publications the hub
//! has been given. Publications to channels in other shards never contend.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use herald_protocol::{ChannelName, StreamPosition};
use parking_lot::Mutex;

use crate::history::Stream;
use crate::{
    Broker, BrokerError, BrokerHandler, HistoryPage, HistoryQuery, HistoryStats, Publication,
    PublishOptions,
};

const SHARDS: usize = 64;

/// The broker of a node that runs alone: no network, offsets and history kept in memory.
pub struct MemoryBroker {
    shards: Box<[Mutex<HashMap<ChannelName, Stream>>]>,
    hasher: std::collections::hash_map::RandomState,
    handler: OnceLock<Arc<dyn BrokerHandler>>,
    streams: AtomicI64,
    retained: AtomicI64,
    retained_bytes: AtomicI64,
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
            streams: AtomicI64::new(0),
            retained: AtomicI64::new(0),
            retained_bytes: AtomicI64::new(0),
        }
    }

    fn shard(&self, channel: &ChannelName) -> &Mutex<HashMap<ChannelName, Stream>> {
        &self.shards[(self.hasher.hash_one(channel) as usize) % self.shards.len()]
    }

    /// Number of channels whose stream state is held.
    pub fn stream_count(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }

    /// Accounts for a stream's retained entries changing from `before` to `after`.
    fn account(&self, before: (usize, usize), after: (usize, usize)) {
        let dp = after.0 as i64 - before.0 as i64;
        let db = after.1 as i64 - before.1 as i64;
        if dp != 0 {
            self.retained.fetch_add(dp, Ordering::Relaxed);
        }
        if db != 0 {
            self.retained_bytes.fetch_add(db, Ordering::Relaxed);
        }
    }

    /// The live stream of `channel`, replacing an expired one (new epoch).
    fn stream<'a>(
        &self,
        streams: &'a mut HashMap<ChannelName, Stream>,
        channel: &ChannelName,
        ttl: Duration,
        now: Instant,
    ) -> &'a mut Stream {
        let stream = streams.entry(channel.clone()).or_insert_with(|| {
            self.streams.fetch_add(1, Ordering::Relaxed);
            Stream::new(now)
        });
        if stream.is_expired(now, ttl) {
            self.account(stream.retained(), (0, 0));
            *stream = Stream::new(now);
        }
        stream
    }

    /// Drops the stream state (history and epoch) of channels idle for longer than their TTL.
    /// `ttl_of` gives each channel's TTL; called periodically by the server.
    pub fn expire_idle(&self, ttl_of: impl Fn(&ChannelName) -> Duration) {
        let now = Instant::now();
        for shard in self.shards.iter() {
            shard.lock().retain(|c, s| {
                let keep = !s.is_expired(now, ttl_of(c));
                if !keep {
                    self.account(s.retained(), (0, 0));
                    self.streams.fetch_sub(1, Ordering::Relaxed);
                }
                keep
            });
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
        let stream = self.stream(&mut streams, channel, options.history_ttl, now);
        let before = stream.retained();
        let offset = stream.publish(data.clone(), options.history_size, now);
        let after = stream.retained();
        let epoch = stream.epoch().clone();
        self.account(before, after);
        let position = StreamPosition { offset, epoch: epoch.to_string() };
        let publication = Publication { offset: Some(offset), epoch: Some(epoch), data };
        handler.handle_publication(channel, &publication);
        Ok(Some(position))
    }

    /// Reads history synchronously.
    pub fn history_now(
        &self,
        channel: &ChannelName,
        options: &PublishOptions,
        query: &HistoryQuery,
    ) -> HistoryPage {
        if options.history_size == 0 {
            return HistoryPage::default();
        }
        let mut streams = self.shard(channel).lock();
        let stream = self.stream(&mut streams, channel, options.history_ttl, Instant::now());
        let epoch = stream.epoch().clone();
        let (entries, complete) = match &query.since {
            Some(since) => {
                let s = stream.since(since.offset, &since.epoch, query.limit);
                (s.publications, s.complete)
            }
            None => (stream.latest(query.limit), false),
        };
        HistoryPage {
            position: Some(StreamPosition { offset: stream.top(), epoch: epoch.to_string() }),
            publications: entries
                .into_iter()
                .map(|e| Publication {
                    offset: Some(e.offset),
                    epoch: Some(epoch.clone()),
                    data: e.data,
                })
                .collect(),
            complete,
        }
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

    async fn history(
        &self,
        channel: &ChannelName,
        options: &PublishOptions,
        query: &HistoryQuery,
    ) -> Result<HistoryPage, BrokerError> {
        Ok(self.history_now(channel, options, query))
    }

    fn history_stats(&self) -> HistoryStats {
        let get = |v: &AtomicI64| v.load(Ordering::Relaxed).max(0) as u64;
        HistoryStats {
            streams: get(&self.streams),
            publications: get(&self.retained),
            bytes: get(&self.retained_bytes),
        }
    }

    fn is_ready(&self) -> bool {
        self.handler.get().is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn since(offset: u64, epoch: &str) -> HistoryQuery {
        HistoryQuery { since: Some(StreamPosition { offset, epoch: epoch.into() }), limit: None }
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
        let page = broker.history(&a, &opts(10), &HistoryQuery::default()).await.unwrap();
        assert_eq!(page.position, Some(p2.clone()));
        assert_eq!(page.publications.len(), 2);
        let seen = rec.0.lock().clone();
        assert_eq!(seen.len(), 4);
        assert_eq!(seen[3], ("b".to_string(), None, Bytes::from_static(b"4")));
    }

    #[tokio::test]
    async fn history_since_and_stats() {
        let broker = MemoryBroker::new();
        broker.start(Arc::new(Recorder::default())).await.unwrap();
        let a = ChannelName::parse("a").unwrap();
        let mut epoch = String::new();
        for i in 0..5u8 {
            epoch = broker
                .publish(&a, Bytes::from(vec![b'0' + i]), &opts(3))
                .await
                .unwrap()
                .unwrap()
                .epoch;
        }
        // Offsets 3..=5 are retained.
        let page = broker.history(&a, &opts(3), &since(2, &epoch)).await.unwrap();
        assert!(page.complete);
        assert_eq!(
            page.publications.iter().map(|p| p.offset.unwrap()).collect::<Vec<_>>(),
            [3, 4, 5]
        );
        let page = broker.history(&a, &opts(3), &since(1, &epoch)).await.unwrap();
        assert!(!page.complete, "offset 2 was trimmed");
        let page = broker.history(&a, &opts(3), &since(5, "other")).await.unwrap();
        assert!(!page.complete);
        assert_eq!(page.publications.len(), 3);
        let stats = broker.history_stats();
        assert_eq!((stats.streams, stats.publications, stats.bytes), (1, 3, 3));
        broker.expire_idle(|_| Duration::ZERO);
        assert_eq!(broker.history_stats(), HistoryStats::default());
        let empty = broker.history(&a, &opts(0), &HistoryQuery::default()).await.unwrap();
        assert!(empty.position.is_none() && empty.publications.is_empty());
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
        assert_eq!(broker.history_stats().publications, 1);
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
