//! The in-memory broker of a single node.
//!
//! Channel streams (epoch, last offset, retained publications) live in shards keyed by channel
//! hash. A publication takes its shard's lock, gets the next offset, is retained in the stream's
//! ring and handed to the handler under that lock, so publications of one channel reach the hub
//! in offset order, and a history read under the same lock sees exactly the publications the hub
//! has been given. Publications to channels in other shards never contend.
//!
//! Only a publication creates a stream. A read (history, a subscription's position) of a channel
//! without a live stream creates nothing and reports offset 0 in a [`VoidEpoch`] that records
//! when the read was made, so a later `since` of that position is still judged exactly (see
//! [`VoidEpoch::covers`]). Idle streams are dropped by [`MemoryBroker::expire_step`], which
//! examines a bounded number of streams per lock hold, so a sweep over millions of streams
//! never holds a shard's lock for long.
//!
//! ```
//! use std::time::Duration;
//! use herald_broker::{HistoryQuery, MemoryBroker, PublishOptions};
//! use herald_protocol::ChannelName;
//!
//! let broker = MemoryBroker::new();
//! let options = PublishOptions { history_size: 10, history_ttl: Duration::from_secs(60) };
//! let channel = ChannelName::parse("news").unwrap();
//! let page = broker.history_now(&channel, &options, &HistoryQuery::default());
//! let position = page.position.unwrap();
//! assert_eq!(position.offset, 0); // no stream: nothing was created by this read
//! assert!(position.epoch.starts_with('V'));
//! assert_eq!(broker.stream_count(), 0);
//! ```

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use herald_protocol::{ChannelName, StreamPosition};
use indexmap::IndexMap;
use parking_lot::Mutex;

use crate::history::{new_instance_id, Since, Stream, VoidEpoch};
use crate::{
    Broker, BrokerError, BrokerHandler, HistoryPage, HistoryQuery, HistoryStats, Publication,
    PublishOptions,
};

const SHARDS: usize = 64;

/// Streams examined per lock hold by [`MemoryBroker::expire_step`] in the server's sweep.
pub const EXPIRY_STEP: usize = 512;

/// One shard: channel -> stream, in an index map so a sweep can resume at an index after
/// releasing the lock.
type Shard = IndexMap<ChannelName, Stream>;

/// Where an incremental expiry sweep stands: the next shard and index to examine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepCursor {
    shard: usize,
    index: usize,
}

impl SweepCursor {
    /// True once the sweep has examined every shard; a new sweep starts from
    /// `SweepCursor::default()`.
    pub fn is_done(&self) -> bool {
        self.shard >= SHARDS
    }
}

/// What one [`MemoryBroker::expire_step`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepStep {
    /// Streams examined under the lock (at most the step's budget).
    pub examined: usize,
    /// Expired streams dropped.
    pub dropped: usize,
}

/// The broker of a node that runs alone: no network, offsets and history kept in memory.
pub struct MemoryBroker {
    shards: Box<[Mutex<Shard>]>,
    hasher: std::collections::hash_map::RandomState,
    handler: OnceLock<Arc<dyn BrokerHandler>>,
    /// This instance's id, part of every [`VoidEpoch`] it reports: a void position from another
    /// instance (a restart) is never taken as complete.
    instance: Arc<str>,
    /// Time 0 of the void epochs' clock.
    started: Instant,
    streams: AtomicI64,
    retained: AtomicI64,
    retained_bytes: AtomicI64,
}

impl std::fmt::Debug for MemoryBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBroker").field("instance", &self.instance).finish_non_exhaustive()
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
            shards: (0..SHARDS).map(|_| Mutex::new(IndexMap::new())).collect(),
            hasher: Default::default(),
            handler: OnceLock::new(),
            instance: new_instance_id(),
            started: Instant::now(),
            streams: AtomicI64::new(0),
            retained: AtomicI64::new(0),
            retained_bytes: AtomicI64::new(0),
        }
    }

    fn shard(&self, channel: &ChannelName) -> &Mutex<Shard> {
        &self.shards[(self.hasher.hash_one(channel) as usize) % self.shards.len()]
    }

    /// Number of channels whose stream state is held.
    pub fn stream_count(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }

    /// Milliseconds since this broker started, at `now` (the void epochs' clock).
    fn ms(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.started).as_millis()).unwrap_or(u64::MAX)
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

    /// Accounts for a dropped stream.
    fn forget(&self, stream: &Stream) {
        self.account(stream.retained(), (0, 0));
        self.streams.fetch_sub(1, Ordering::Relaxed);
    }

    /// The live stream of `channel`, created (new epoch) when absent or expired. Only publish
    /// calls this.
    fn stream_for_publish<'a>(
        &self,
        streams: &'a mut Shard,
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

    /// The live stream of `channel` for a read: `None` when there is none. An expired stream
    /// found here is dropped (a read never keeps or creates state).
    fn stream_for_read<'a>(
        &self,
        streams: &'a mut Shard,
        channel: &ChannelName,
        ttl: Duration,
        now: Instant,
    ) -> Option<&'a Stream> {
        let index = streams.get_index_of(channel)?;
        if streams[index].is_expired(now, ttl) {
            if let Some((_, stream)) = streams.swap_remove_index(index) {
                self.forget(&stream);
            }
            return None;
        }
        Some(&streams[index])
    }

    /// Drops the stream state (history and epoch) of every channel idle for longer than its
    /// TTL, one bounded step at a time. `ttl_of` gives each channel's TTL. Tests and tools use
    /// this; the server runs [`MemoryBroker::expire_step`] with pauses between steps.
    pub fn expire_idle(&self, ttl_of: impl Fn(&ChannelName) -> Duration) {
        let mut cursor = SweepCursor::default();
        while !cursor.is_done() {
            self.expire_step(&mut cursor, EXPIRY_STEP, &ttl_of, Instant::now());
        }
    }

    /// One step of an expiry sweep: under one shard's lock, examines at most `budget` streams
    /// from `cursor` on and drops those idle for longer than `ttl_of(channel)` at `now`, then
    /// advances `cursor` (to the next shard when this one is finished). The lock is held for at
    /// most `budget` examinations (plus, when a finished shard holds less than a quarter of its
    /// capacity, one shrink proportional to what it still holds), so publishers of the shard
    /// wait at most that long. Streams added or moved during a sweep may be examined only by
    /// the next sweep.
    pub fn expire_step(
        &self,
        cursor: &mut SweepCursor,
        budget: usize,
        ttl_of: impl Fn(&ChannelName) -> Duration,
        now: Instant,
    ) -> SweepStep {
        let mut step = SweepStep::default();
        let Some(shard) = self.shards.get(cursor.shard) else {
            return step;
        };
        let mut streams = shard.lock();
        let mut index = cursor.index;
        while step.examined < budget && index < streams.len() {
            step.examined += 1;
            let (channel, stream) = streams.get_index(index).expect("index < len");
            if stream.is_expired(now, ttl_of(channel)) {
                // The last stream moves into `index`: examine that index again.
                if let Some((_, stream)) = streams.swap_remove_index(index) {
                    self.forget(&stream);
                    step.dropped += 1;
                }
            } else {
                index += 1;
            }
        }
        if index >= streams.len() {
            if streams.capacity() > 4 * streams.len() + 64 {
                streams.shrink_to_fit();
            }
            *cursor = SweepCursor { shard: cursor.shard + 1, index: 0 };
        } else {
            cursor.index = index;
        }
        step
    }

    /// Publishes synchronously (the memory broker never waits).
    pub fn publish_now(
        &self,
        channel: &ChannelName,
        data: Bytes,
        options: &PublishOptions,
    ) -> Result<Option<StreamPosition>, BrokerError> {
        self.publish_at(channel, data, options, Instant::now())
    }

    /// [`MemoryBroker::publish_now`] with the clock reading `now` (not earlier than any previous
    /// call's).
    pub fn publish_at(
        &self,
        channel: &ChannelName,
        data: Bytes,
        options: &PublishOptions,
        now: Instant,
    ) -> Result<Option<StreamPosition>, BrokerError> {
        let handler = self.handler.get().ok_or(BrokerError::Unavailable("not started"))?;
        let mut streams = self.shard(channel).lock();
        if options.history_size == 0 {
            let publication = Publication { offset: None, epoch: None, data };
            handler.handle_publication(channel, &publication);
            return Ok(None);
        }
        let stream = self.stream_for_publish(&mut streams, channel, options.history_ttl, now);
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

    /// Reads history synchronously. Creates no state: a channel without a live stream reports
    /// offset 0 in a [`VoidEpoch`] of this read.
    pub fn history_now(
        &self,
        channel: &ChannelName,
        options: &PublishOptions,
        query: &HistoryQuery,
    ) -> HistoryPage {
        self.history_at(channel, options, query, Instant::now())
    }

    /// [`MemoryBroker::history_now`] with the clock reading `now` (not earlier than any previous
    /// call's).
    pub fn history_at(
        &self,
        channel: &ChannelName,
        options: &PublishOptions,
        query: &HistoryQuery,
        now: Instant,
    ) -> HistoryPage {
        if options.history_size == 0 {
            return HistoryPage::default();
        }
        let ttl = options.history_ttl;
        let mut streams = self.shard(channel).lock();
        let now_ms = self.ms(now);
        // A void position of this instance.
        let void_since = query.since.as_ref().and_then(|since| {
            let void = VoidEpoch::parse(&since.epoch)?;
            (void.instance == &*self.instance).then_some(void)
        });
        let Some(stream) = self.stream_for_read(&mut streams, channel, ttl, now) else {
            // Nothing published within the TTL: position 0 of a void epoch of this read. A void
            // `since` is complete if no stream can have come and gone since it was read (and
            // its holder saw no publication: offset 0).
            let complete = void_since.is_some_and(|void| void.covers(now_ms, ttl))
                && query.since.as_ref().is_some_and(|since| since.offset == 0);
            let epoch = VoidEpoch { instance: &self.instance, at_ms: now_ms }.encode();
            return HistoryPage {
                position: Some(StreamPosition { offset: 0, epoch }),
                publications: Vec::new(),
                complete,
                more: false,
            };
        };
        let epoch = stream.epoch().clone();
        let (entries, complete) = match (&query.since, void_since) {
            (Some(since), Some(void)) => {
                let first = void.covers(self.ms(stream.created()), ttl);
                let Since { publications, complete } =
                    stream.since_void(first, since.offset, query.limit);
                (publications, complete)
            }
            (Some(since), None) => {
                let s = stream.since(since.offset, &since.epoch, query.limit);
                (s.publications, s.complete)
            }
            (None, _) => (stream.latest(query.limit), false),
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
            more: false,
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
        fn has_subscribers(&self, _: &ChannelName) -> bool {
            true
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

#[cfg(test)]
mod void_tests {
    use super::*;

    #[derive(Default)]
    struct Sink;

    impl BrokerHandler for Sink {
        fn handle_publication(&self, _: &ChannelName, _: &Publication) {}
        fn has_subscribers(&self, _: &ChannelName) -> bool {
            true
        }
    }

    const TTL: Duration = Duration::from_millis(1000);

    fn started() -> (MemoryBroker, Instant) {
        let mut broker = MemoryBroker::new();
        let base = Instant::now();
        broker.started = base;
        broker.handler.set(Arc::new(Sink)).map_err(|_| ()).expect("fresh broker");
        (broker, base)
    }

    fn opts(size: usize) -> PublishOptions {
        PublishOptions { history_size: size, history_ttl: TTL }
    }

    fn ms(base: Instant, ms: u64) -> Instant {
        base + Duration::from_millis(ms)
    }

    fn read(
        broker: &MemoryBroker,
        channel: &ChannelName,
        size: usize,
        since: Option<&StreamPosition>,
        at: Instant,
    ) -> HistoryPage {
        let query = HistoryQuery { since: since.cloned(), limit: None };
        broker.history_at(channel, &opts(size), &query, at)
    }

    fn offsets(page: &HistoryPage) -> Vec<u64> {
        page.publications.iter().filter_map(|p| p.offset).collect()
    }

    #[test]
    fn reads_create_no_stream() {
        let (broker, base) = started();
        for i in 0..1000 {
            let c = ChannelName::parse(&format!("fresh{i}")).expect("valid");
            let page = read(&broker, &c, 10, None, ms(base, 5));
            let position = page.position.expect("history channel has a position");
            assert_eq!(position.offset, 0);
            let void = VoidEpoch::parse(&position.epoch).expect("void epoch");
            assert_eq!((void.instance, void.at_ms), (&*broker.instance, 5));
            let since = StreamPosition { offset: 0, epoch: position.epoch.clone() };
            assert!(read(&broker, &c, 10, Some(&since), ms(base, 6)).complete);
        }
        assert_eq!(broker.stream_count(), 0);
        assert_eq!(broker.history_stats(), HistoryStats::default());
    }

    #[test]
    fn void_position_table() {
        // (case, steps before the final read, final read time, complete, offsets)
        // Steps: ('p', t) publish at t; ('r', t) void read at t (the position used); ('s', t)
        // sweep at t.
        type Case = (&'static str, &'static [(char, u64)], u64, bool, &'static [u64]);
        let cases: [Case; 9] = [
            ("still absent, within ttl", &[('r', 100)], 1099, true, &[]),
            ("still absent, at ttl (ms rounding: conservative)", &[('r', 100)], 1100, false, &[]),
            ("still absent, after ttl", &[('r', 100)], 5000, false, &[]),
            (
                "created after the read, read after ttl",
                &[('r', 100), ('p', 200), ('p', 300)],
                1250,
                true,
                &[1, 2],
            ),
            ("created after, read soon", &[('r', 100), ('p', 200), ('p', 300)], 400, true, &[1, 2]),
            ("created just before ttl", &[('r', 100), ('p', 1099)], 1500, true, &[1]),
            (
                "created at ttl: may follow a lost one",
                &[('r', 100), ('p', 1100)],
                1500,
                false,
                &[1],
            ),
            (
                "created, expired, swept: absent again",
                &[('r', 100), ('p', 200), ('s', 1300)],
                1300,
                false,
                &[],
            ),
            (
                "created, expired, re-created",
                &[('r', 100), ('p', 200), ('p', 1300)],
                1400,
                false,
                &[1],
            ),
        ];
        let c = ChannelName::parse("c").expect("valid");
        for (name, steps, at, complete, want) in cases {
            let (broker, base) = started();
            let mut since = None;
            for &(kind, t) in steps {
                match kind {
                    'p' => {
                        broker
                            .publish_at(&c, Bytes::from_static(b"1"), &opts(10), ms(base, t))
                            .expect("started");
                    }
                    'r' => since = read(&broker, &c, 10, None, ms(base, t)).position,
                    's' => {
                        let mut cursor = SweepCursor::default();
                        while !cursor.is_done() {
                            broker.expire_step(&mut cursor, 8, |_| TTL, ms(base, t));
                        }
                    }
                    _ => unreachable!(),
                }
            }
            let page = read(&broker, &c, 10, since.as_ref(), ms(base, at));
            assert_eq!(page.complete, complete, "{name}");
            assert_eq!(offsets(&page), want, "{name}");
        }
    }

    #[test]
    fn void_positions_of_another_kind_are_incomplete() {
        let (broker, base) = started();
        let (other, _) = started();
        let c = ChannelName::parse("c").expect("valid");
        let theirs = read(&other, &c, 10, None, ms(base, 10)).position.expect("position");
        assert!(!read(&broker, &c, 10, Some(&theirs), ms(base, 20)).complete, "other instance");
        let ours = read(&broker, &c, 10, None, ms(base, 10)).position.expect("position");
        let future = StreamPosition {
            offset: 0,
            epoch: VoidEpoch { instance: &broker.instance, at_ms: 50 }.encode(),
        };
        assert!(!read(&broker, &c, 10, Some(&future), ms(base, 20)).complete, "from the future");
        let ahead = StreamPosition { offset: 1, epoch: ours.epoch.clone() };
        assert!(!read(&broker, &c, 10, Some(&ahead), ms(base, 20)).complete, "offset 1 of a void");
        // Trimmed: offset 1 is gone.
        for t in 0..3 {
            broker
                .publish_at(&c, Bytes::from_static(b"x"), &opts(2), ms(base, 30 + t))
                .expect("ok");
        }
        let page = read(&broker, &c, 2, Some(&ours), ms(base, 40));
        assert!(!page.complete);
        assert_eq!(offsets(&page), [2, 3]);
    }

    #[test]
    fn void_position_followed_by_publications_means_the_first_stream() {
        // A client that subscribed before the first publication and received offsets 1 and 2
        // without learning their epoch holds (2, void): the first stream's offset 2.
        let (broker, base) = started();
        let c = ChannelName::parse("c").expect("valid");
        let void = read(&broker, &c, 10, None, ms(base, 10)).position.expect("position");
        for t in 0..3 {
            broker
                .publish_at(&c, Bytes::from_static(b"x"), &opts(10), ms(base, 20 + t))
                .expect("ok");
        }
        let held = StreamPosition { offset: 2, epoch: void.epoch.clone() };
        let page = read(&broker, &c, 10, Some(&held), ms(base, 30));
        assert!(page.complete);
        assert_eq!(offsets(&page), [3]);
        let ahead = StreamPosition { offset: 4, epoch: void.epoch };
        assert!(!read(&broker, &c, 10, Some(&ahead), ms(base, 30)).complete, "offset beyond top");
    }

    #[test]
    fn expired_stream_read_is_dropped_not_kept() {
        let (broker, base) = started();
        let c = ChannelName::parse("c").expect("valid");
        broker.publish_at(&c, Bytes::from_static(b"x"), &opts(5), ms(base, 0)).expect("ok");
        assert_eq!(broker.stream_count(), 1);
        let page = read(&broker, &c, 5, None, ms(base, 1001));
        assert_eq!(page.position.map(|p| p.offset), Some(0));
        assert_eq!(broker.stream_count(), 0);
        assert_eq!(broker.history_stats(), HistoryStats::default());
    }

    #[test]
    fn sweep_steps_do_bounded_work_and_drop_every_idle_stream() {
        let (broker, base) = started();
        let n = 20_000;
        for i in 0..n {
            let c = ChannelName::parse(&format!("c{i}")).expect("valid");
            let at = ms(base, if i % 2 == 0 { 0 } else { 900 });
            broker.publish_at(&c, Bytes::from_static(b"x"), &opts(1), at).expect("ok");
        }
        let mut cursor = SweepCursor::default();
        let (mut steps, mut dropped) = (0, 0);
        let probe = ChannelName::parse("probe").expect("valid");
        while !cursor.is_done() {
            let step = broker.expire_step(&mut cursor, 64, |_| TTL, ms(base, 1500));
            assert!(step.examined <= 64, "{step:?}");
            dropped += step.dropped;
            steps += 1;
            // Publishing between steps works and is never lost by the sweep.
            broker
                .publish_at(&probe, Bytes::from_static(b"p"), &opts(1), ms(base, 1500))
                .expect("ok");
        }
        assert_eq!(dropped, n / 2);
        assert!(steps >= n / 64, "{steps} steps");
        assert_eq!(broker.stream_count(), n / 2 + 1);
        assert_eq!(broker.history_stats().streams as usize, n / 2 + 1);
        assert_eq!(broker.history_stats().publications as usize, n / 2 + 1);
    }

    mod model {
        use super::*;
        use proptest::prelude::*;

        const TTL_MS: u64 = 1000;

        #[derive(Debug, Clone)]
        enum Op {
            Publish,
            /// A read with no `since`, or with the position a client holds after seeing a reply
            /// (`pick`) and then `follow` more live publications, learning their epoch from the
            /// first `pub` of a new epoch (`learns`) or not (an older client).
            Read {
                pick: Option<(usize, usize, bool)>,
                limit: Option<usize>,
            },
            Advance(u64),
            Sweep,
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                4 => Just(Op::Publish),
                4 => (
                    proptest::option::weighted(0.8, (any::<usize>(), prop_oneof![Just(0usize), any::<usize>()], any::<bool>())),
                    proptest::option::of(0usize..6),
                )
                    .prop_map(|(pick, limit)| Op::Read { pick, limit }),
                3 => prop_oneof![0u64..50, 0u64..400, Just(TTL_MS - 1), Just(TTL_MS), Just(TTL_MS + 1), 900u64..2500]
                    .prop_map(Op::Advance),
                1 => Just(Op::Sweep),
            ]
        }

        /// The channel's stream as the model sees it.
        struct ModelStream {
            epoch: String,
            created_ms: u64,
            last_publish_ms: u64,
            /// Index in the log of this stream's offset 1.
            first: usize,
            top: u64,
        }

        /// A position some reply reported, and how many publications the log held then.
        struct Seen {
            position: StreamPosition,
            log_len: usize,
        }

        fn run(size: usize, ops: Vec<Op>) {
            let (broker, base) = started();
            let c = ChannelName::parse("ch").expect("valid");
            let options = opts(size);
            let mut now = 0u64;
            // Every publication: data and its position.
            let mut log: Vec<Bytes> = Vec::new();
            let mut positions: Vec<StreamPosition> = Vec::new();
            let mut stream: Option<ModelStream> = None;
            let mut epochs: Vec<String> = Vec::new();
            let mut seen: Vec<Seen> = Vec::new();
            let live = |s: &Option<ModelStream>, now: u64| {
                s.as_ref().filter(|s| now - s.last_publish_ms <= TTL_MS).is_some()
            };
            for op in ops {
                match op {
                    Op::Publish => {
                        let data = Bytes::from(log.len().to_string());
                        let position = broker
                            .publish_at(&c, data.clone(), &options, ms(base, now))
                            .expect("started")
                            .expect("history");
                        log.push(data);
                        positions.push(position.clone());
                        if live(&stream, now) {
                            let s = stream.as_mut().expect("live");
                            s.top += 1;
                            s.last_publish_ms = now;
                            assert_eq!(position.epoch, s.epoch);
                        } else {
                            assert!(!epochs.contains(&position.epoch), "epochs never repeat");
                            assert!(VoidEpoch::parse(&position.epoch).is_none());
                            epochs.push(position.epoch.clone());
                            stream = Some(ModelStream {
                                epoch: position.epoch.clone(),
                                created_ms: now,
                                last_publish_ms: now,
                                first: log.len() - 1,
                                top: 1,
                            });
                        }
                        assert_eq!(position.offset, stream.as_ref().expect("live").top);
                        seen.push(Seen { position, log_len: log.len() });
                    }
                    Op::Read { pick, limit } => {
                        let since = pick.filter(|_| !seen.is_empty()).map(|(i, follow, learns)| {
                            let from = &seen[i % seen.len()];
                            let k = follow % (log.len() - from.log_len + 1);
                            if k == 0 {
                                return Seen {
                                    position: from.position.clone(),
                                    log_len: from.log_len,
                                };
                            }
                            let last = &positions[from.log_len + k - 1];
                            let epoch = if learns {
                                last.epoch.clone()
                            } else {
                                from.position.epoch.clone()
                            };
                            Seen {
                                position: StreamPosition { offset: last.offset, epoch },
                                log_len: from.log_len + k,
                            }
                        });
                        let since = since.as_ref();
                        let query =
                            HistoryQuery { since: since.map(|s| s.position.clone()), limit };
                        let page = broker.history_at(&c, &options, &query, ms(base, now));
                        let position = page.position.clone().expect("history channel");
                        if !live(&stream, now) {
                            stream = None;
                        }
                        // Model: what is retained now, oldest first, as log indices.
                        let retained: Vec<usize> = match &stream {
                            Some(s) => {
                                let kept = (s.top as usize).min(size);
                                (s.first + s.top as usize - kept..s.first + s.top as usize)
                                    .collect()
                            }
                            None => Vec::new(),
                        };
                        match &stream {
                            Some(s) => {
                                assert_eq!((position.offset, &position.epoch), (s.top, &s.epoch))
                            }
                            None => {
                                assert_eq!(position.offset, 0);
                                let void = VoidEpoch::parse(&position.epoch).expect("void");
                                assert_eq!(void.at_ms, now);
                            }
                        }
                        let got: Vec<Bytes> =
                            page.publications.iter().map(|p| p.data.clone()).collect();
                        let cut = |v: Vec<Bytes>| match limit {
                            Some(l) => v.into_iter().take(l).collect::<Vec<_>>(),
                            None => v,
                        };
                        match since {
                            None => {
                                assert!(!page.complete);
                                let skip = limit.map_or(0, |l| retained.len().saturating_sub(l));
                                let want: Vec<Bytes> =
                                    retained[skip..].iter().map(|&i| log[i].clone()).collect();
                                assert_eq!(got, want);
                            }
                            Some(since) => {
                                // The model's rule, computed independently of the broker.
                                let expected =
                                    match (VoidEpoch::parse(&since.position.epoch), &stream) {
                                        (Some(void), Some(s)) => {
                                            // The first stream since the void read: the
                                            // offset is one of its own.
                                            let n = since.position.offset;
                                            void.at_ms <= s.created_ms
                                                && s.created_ms < void.at_ms + TTL_MS
                                                && n <= s.top
                                                && (n == s.top
                                                    || retained.first().is_some_and(|&f| {
                                                        (f - s.first) as u64 <= n
                                                    }))
                                        }
                                        (Some(void), None) => {
                                            since.position.offset == 0 && now < void.at_ms + TTL_MS
                                        }
                                        (None, Some(s)) => {
                                            let n = since.position.offset;
                                            since.position.epoch == s.epoch
                                                && n <= s.top
                                                && (n == s.top
                                                    || retained.first().is_some_and(|&f| {
                                                        (f - s.first) as u64 <= n
                                                    }))
                                        }
                                        (None, None) => false,
                                    };
                                // The truth: complete means the page is everything published
                                // after the position, in order (up to the limit).
                                let after: Vec<Bytes> = log[since.log_len..].to_vec();
                                if page.complete {
                                    assert_eq!(
                                        got,
                                        cut(after.clone()),
                                        "complete but not all of the log after it"
                                    );
                                } else {
                                    let all: Vec<Bytes> =
                                        retained.iter().map(|&i| log[i].clone()).collect();
                                    assert_eq!(got, cut(all));
                                }
                                assert_eq!(
                                    page.complete, expected,
                                    "since {:?} at {now}",
                                    since.position
                                );
                            }
                        }
                        seen.push(Seen { position, log_len: log.len() });
                    }
                    Op::Advance(d) => now += d,
                    Op::Sweep => {
                        let mut cursor = SweepCursor::default();
                        while !cursor.is_done() {
                            broker.expire_step(&mut cursor, 2, |_| TTL, ms(base, now));
                        }
                        if !live(&stream, now) {
                            stream = None;
                        }
                    }
                }
                assert_eq!(broker.stream_count(), usize::from(stream.is_some()));
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn broker_matches_model(size in 1usize..6, ops in proptest::collection::vec(op(), 0..120)) {
                run(size, ops);
            }
        }
    }
}
