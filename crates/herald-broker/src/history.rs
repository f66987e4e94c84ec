//! The per-channel stream of the in-memory broker: epoch, offsets and retained history.
//!
//! A [`Stream`] is plain data: no IO, no async, no locks (the caller holds its shard's lock).
//!
//! - **Offsets.** Every [`Stream::publish`] gets the next offset (`top + 1`, starting at 1), also
//!   when nothing is retained (`size` 0), so offsets strictly increase within the epoch.
//! - **Ring.** The last `size` publications are kept in a `VecDeque`, oldest first. Their offsets
//!   are contiguous and end at `top`, so the entry of offset `o` is at index `o - oldest`: a
//!   position is found by arithmetic, without searching. `size` is passed with every publish (a
//!   namespace's option may change); a lowered size trims the ring on the next publish and
//!   gives back memory the ring no longer needs.
//! - **TTL.** A stream idle (no publish) for longer than its TTL has lost its history:
//!   [`Stream::is_expired`] says so, and the caller then replaces it by a new stream, whose new
//!   epoch tells clients that positions of the old one are meaningless.
//! - **Since.** [`Stream::since`] answers "what came after `(offset, epoch)`". It is `complete`
//!   exactly when nothing after that position is missing: same epoch, a position not in the
//!   future, and history reaching back to `offset + 1`. Otherwise it returns everything retained,
//!   oldest first, and `complete = false`.
//!
//! ```
//! use std::sync::Arc;
//! use std::time::{Duration, Instant};
//! use bytes::Bytes;
//! use herald_broker::history::Stream;
//!
//! let t0 = Instant::now();
//! let mut s = Stream::with_epoch(Arc::from("e1"), t0);
//! for data in ["a", "b", "c", "d"] {
//!     s.publish(Bytes::from(data), 3, t0); // keep the last 3: offsets 2, 3, 4
//! }
//! assert_eq!(s.top(), 4);
//!
//! let after_2 = s.since(2, "e1", None); // offsets 3 and 4, nothing missing
//! assert!(after_2.complete);
//! assert_eq!(after_2.publications.iter().map(|e| e.offset).collect::<Vec<_>>(), [3, 4]);
//!
//! let after_0 = s.since(0, "e1", None); // offset 1 is gone: all retained, incomplete
//! assert!(!after_0.complete);
//! assert_eq!(after_0.publications.len(), 3);
//!
//! assert!(!s.since(4, "other", None).complete); // another epoch
//!
//! let ttl = Duration::from_secs(60);
//! assert!(!s.is_expired(t0 + ttl, ttl));
//! assert!(s.is_expired(t0 + ttl + Duration::from_millis(1), ttl));
//! ```

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::Rng;

/// Capacity the ring may keep beyond `2 * size` before it is shrunk (avoids reallocating for
/// small changes of `size`).
const SLACK: usize = 16;

/// One retained publication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Offset of the publication within its stream's epoch (1 for the first).
    pub offset: u64,
    /// The publication's `data`: raw JSON text.
    pub data: Bytes,
}

/// A channel's stream: epoch, last offset, and the last `size` publications kept for at most
/// `ttl` of idleness.
#[derive(Debug)]
pub struct Stream {
    /// Identifies this incarnation of the channel's stream.
    epoch: Arc<str>,
    /// Offset of the newest publication, 0 before the first.
    top: u64,
    /// Retained publications, oldest first; offsets contiguous, the last one is `top`.
    entries: VecDeque<Entry>,
    /// Sum of `data.len()` over `entries`.
    bytes: usize,
    /// Last publish, or creation before the first one.
    last_publish: Instant,
    /// When the stream was created (its first publish, in the memory broker).
    created: Instant,
}

/// What history holds after a position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Since {
    /// Retained publications after the position (or all retained when the position is not
    /// usable), oldest first, at most the requested limit.
    pub publications: Vec<Entry>,
    /// True exactly when nothing after the position is missing: same epoch, position not in the
    /// future, history reaching back far enough. Independent of the limit.
    pub complete: bool,
}

/// Digits of base 36, as epochs use them.
const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";

/// A fresh epoch: 8 random characters of `[0-9a-z]`.
fn new_epoch() -> Arc<str> {
    let mut rng = rand::thread_rng();
    let epoch: String =
        (0..8).map(|_| char::from(ALPHABET[rng.gen_range(0..ALPHABET.len())])).collect();
    Arc::from(epoch)
}

/// The epoch reported by a read of a channel that has no stream (nothing published within its
/// TTL): `V`, the broker instance's id, then the read's time in milliseconds since the broker
/// started, base 36. Example: `Vk3j9x0aa1b2c`.
///
/// Only `[0-9A-Za-z]`, so it is safe in JSON, SSE ids and any separator Herald uses; generated
/// epochs are 8 characters of `[0-9a-z]` and never start with the upper-case `V`, so the two
/// cannot be confused.
///
/// A read never creates a stream: it reports position `(0, void epoch)`. A later `since` of that
/// position is judged by [`VoidEpoch::covers`]: a stream created after the read that later
/// expired must have been idle for the TTL, so a stream created (or a read made) no later than
/// `at + ttl` is the first since the read, and nothing of an earlier one can be missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VoidEpoch<'a> {
    /// Id of the broker instance that made the read (8 characters of `[0-9a-z]`).
    pub instance: &'a str,
    /// Milliseconds since that broker started, at the read.
    pub at_ms: u64,
}

/// Marks a void epoch; never the first character of a generated one.
const VOID_MARK: char = 'V';
/// Length of a broker instance id.
pub const INSTANCE_LEN: usize = 8;

impl<'a> VoidEpoch<'a> {
    /// The epoch string.
    pub fn encode(&self) -> String {
        let mut digits = Vec::new();
        let mut n = self.at_ms;
        loop {
            digits.push(ALPHABET[(n % 36) as usize]);
            n /= 36;
            if n == 0 {
                break;
            }
        }
        digits.reverse();
        let mut out = String::with_capacity(1 + self.instance.len() + digits.len());
        out.push(VOID_MARK);
        out.push_str(self.instance);
        out.extend(digits.into_iter().map(char::from));
        out
    }

    /// Reads a void epoch; `None` when `epoch` is not one (a generated epoch, or garbage).
    pub fn parse(epoch: &'a str) -> Option<VoidEpoch<'a>> {
        let rest = epoch.strip_prefix(VOID_MARK)?;
        let instance = rest.get(..INSTANCE_LEN)?;
        let time = rest.get(INSTANCE_LEN..)?;
        if time.is_empty() || time.len() > 13 || !is_base36(instance) || !is_base36(time) {
            return None;
        }
        let at_ms = u64::from_str_radix(time, 36).ok()?;
        Some(VoidEpoch { instance, at_ms })
    }

    /// True when a stream created at `moment_ms` (or, for a channel still without a stream, a
    /// read at `moment_ms`) proves that no stream was created and lost since this void read,
    /// given the channel's `ttl`: a stream created after the read and then dropped was idle for
    /// more than `ttl` after its creation, so anything created or read no later than
    /// `at + ttl` comes before any such loss. With millisecond clocks: `moment_ms + 1 <=
    /// at_ms + ttl_ms` (conservative). Also false for a read from the future (`at_ms >
    /// moment_ms`), which this broker never issued.
    pub fn covers(&self, moment_ms: u64, ttl: Duration) -> bool {
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        self.at_ms <= moment_ms && moment_ms.saturating_add(1) <= self.at_ms.saturating_add(ttl_ms)
    }
}

fn is_base36(s: &str) -> bool {
    s.bytes().all(|c| c.is_ascii_digit() || c.is_ascii_lowercase())
}

/// A fresh broker instance id: 8 random characters of `[0-9a-z]`.
pub fn new_instance_id() -> Arc<str> {
    new_epoch()
}

impl Stream {
    /// A new stream with a fresh random epoch (8 characters of `[0-9a-z]`), offset 0, created
    /// at `now` (which counts as its last publish for [`Stream::is_expired`]).
    pub fn new(now: Instant) -> Stream {
        Stream::with_epoch(new_epoch(), now)
    }

    /// A new stream with the given epoch, offset 0, created at `now`.
    pub fn with_epoch(epoch: Arc<str>, now: Instant) -> Stream {
        Stream {
            epoch,
            top: 0,
            entries: VecDeque::new(),
            bytes: 0,
            last_publish: now,
            created: now,
        }
    }

    /// When the stream was created.
    pub fn created(&self) -> Instant {
        self.created
    }

    /// The stream's epoch.
    pub fn epoch(&self) -> &Arc<str> {
        &self.epoch
    }

    /// Offset of the newest publication (0 before the first).
    pub fn top(&self) -> u64 {
        self.top
    }

    /// True when the stream was idle (no publish since creation or the last publish) for longer
    /// than `ttl` at `now`; exactly `ttl` is not expired. The caller then replaces it by a new
    /// [`Stream`] (new epoch).
    pub fn is_expired(&self, now: Instant, ttl: Duration) -> bool {
        now.saturating_duration_since(self.last_publish) > ttl
    }

    /// Appends a publication, assigning offset `top + 1`, and returns that offset. Keeps at most
    /// `size` entries (`size` 0: keeps none, offsets still count). `now` is recorded as the last
    /// publish. O(1) amortized.
    pub fn publish(&mut self, data: Bytes, size: usize, now: Instant) -> u64 {
        self.top += 1;
        self.last_publish = now;
        // Make room first so the ring never grows beyond `size`.
        while !self.entries.is_empty() && self.entries.len() >= size {
            self.pop_oldest();
        }
        if size > 0 {
            self.bytes += data.len();
            self.entries.push_back(Entry { offset: self.top, data });
        }
        if self.entries.capacity() > size.saturating_mul(2).saturating_add(SLACK) {
            self.entries.shrink_to(size);
        }
        self.top
    }

    fn pop_oldest(&mut self) {
        if let Some(entry) = self.entries.pop_front() {
            self.bytes -= entry.data.len();
        }
    }

    /// Offset of the oldest retained entry, if any.
    fn oldest(&self) -> Option<u64> {
        self.entries.front().map(|e| e.offset)
    }

    /// Entries after `(offset, epoch)`, oldest first, at most `limit` of them (`None`: all).
    ///
    /// - Same epoch, `offset <= top`, and history reaching back to `offset + 1` (the oldest
    ///   retained offset is at most `offset + 1`, or nothing is retained and `offset == top`):
    ///   `complete = true`, publications = the entries with offsets above `offset`.
    /// - Same epoch but `offset > top` (a position from the future), another epoch, or a
    ///   position older than history: `complete = false`, publications = all retained.
    ///
    /// `complete` says whether history reaches back far enough, whatever `limit` cuts off.
    /// O(1 + k) for k returned entries.
    pub fn since(&self, offset: u64, epoch: &str, limit: Option<usize>) -> Since {
        let reaches = *self.epoch == *epoch
            && offset <= self.top
            && match self.oldest() {
                // `oldest >= 1`, so `oldest - 1` cannot underflow (and `offset + 1` could overflow).
                Some(oldest) => offset >= oldest - 1,
                None => offset == self.top,
            };
        let start = match (reaches, self.oldest()) {
            // Offsets are contiguous: `offset + 1` sits at index `offset + 1 - oldest`, which is
            // at most `len` because `offset <= top`.
            (true, Some(oldest)) => usize::try_from(offset + 1 - oldest).unwrap_or(usize::MAX),
            _ => 0,
        };
        Since { publications: self.range_from(start, limit), complete: reaches }
    }

    /// Entries after a position `(offset, void epoch)`: a client that read the channel when it
    /// had no stream (offset 0 in a [`VoidEpoch`]) and then received `offset` publications
    /// without learning their epoch. `first`: this stream is the first created since that read
    /// (see [`VoidEpoch::covers`]), so every publication since the read is one of its own and
    /// the position means `(offset, this epoch)`: judged by [`Stream::since`]. Otherwise: all
    /// retained, `complete = false`.
    pub fn since_void(&self, first: bool, offset: u64, limit: Option<usize>) -> Since {
        if first {
            let epoch = self.epoch.clone();
            self.since(offset, &epoch, limit)
        } else {
            Since { publications: self.range_from(0, limit), complete: false }
        }
    }

    /// The newest `limit` entries (all when `None`), oldest first.
    pub fn latest(&self, limit: Option<usize>) -> Vec<Entry> {
        let len = self.entries.len();
        let count = limit.map_or(len, |l| l.min(len));
        self.range_from(len - count, None)
    }

    /// Up to `limit` entries from index `start` (clamped to the ring).
    fn range_from(&self, start: usize, limit: Option<usize>) -> Vec<Entry> {
        let len = self.entries.len();
        let start = start.min(len);
        let end = limit.map_or(len, |l| start.saturating_add(l).min(len));
        self.entries.range(start..end).cloned().collect()
    }

    /// Retained entries and the sum of their data bytes (for metrics).
    pub fn retained(&self) -> (usize, usize) {
        (self.entries.len(), self.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EPOCH: &str = "epoch1";

    fn t0() -> Instant {
        Instant::now()
    }

    fn stream() -> (Stream, Instant) {
        let now = t0();
        (Stream::with_epoch(Arc::from(EPOCH), now), now)
    }

    /// A stream with offsets 1..=n published, keeping `size`.
    fn filled(n: u64, size: usize) -> Stream {
        let (mut s, now) = stream();
        for i in 1..=n {
            assert_eq!(s.publish(Bytes::from(format!("d{i}")), size, now), i);
        }
        s
    }

    fn offsets(entries: &[Entry]) -> Vec<u64> {
        entries.iter().map(|e| e.offset).collect()
    }

    #[test]
    fn new_stream_has_random_base36_epoch_and_offset_zero() {
        let now = t0();
        let a = Stream::new(now);
        let b = Stream::new(now);
        for s in [&a, &b] {
            assert_eq!(s.epoch().len(), 8);
            assert!(s.epoch().bytes().all(|c| c.is_ascii_digit() || c.is_ascii_lowercase()));
            assert_eq!(s.top(), 0);
            assert_eq!(s.retained(), (0, 0));
        }
        assert_ne!(a.epoch(), b.epoch());
    }

    #[test]
    fn publish_assigns_offsets_and_retains_last_size() {
        let s = filled(5, 3);
        assert_eq!(s.top(), 5);
        assert_eq!(offsets(&s.latest(None)), [3, 4, 5]);
        assert_eq!(s.latest(None)[0].data, Bytes::from("d3"));
        assert_eq!(s.retained(), (3, 6));
    }

    #[test]
    fn size_zero_counts_offsets_but_keeps_nothing() {
        let s = filled(4, 0);
        assert_eq!(s.top(), 4);
        assert_eq!(s.retained(), (0, 0));
        assert!(s.latest(None).is_empty());
    }

    #[test]
    fn lowering_size_trims_and_shrinks_on_next_publish() {
        let (mut s, now) = stream();
        for _ in 0..1000 {
            s.publish(Bytes::from_static(b"x"), 1000, now);
        }
        assert!(s.entries.capacity() >= 1000);
        s.publish(Bytes::from_static(b"yy"), 2, now);
        assert_eq!(offsets(&s.latest(None)), [1000, 1001]);
        assert_eq!(s.retained(), (2, 3));
        assert!(s.entries.capacity() <= 2 * 2 + SLACK, "capacity {}", s.entries.capacity());
        s.publish(Bytes::from_static(b"z"), 0, now);
        assert_eq!(s.retained(), (0, 0));
        assert!(s.entries.capacity() <= SLACK);
        assert_eq!(s.top(), 1002);
    }

    #[test]
    fn since_table() {
        const E: &str = EPOCH;
        const O: &str = "other";
        // (case, published, size, since offset, since epoch, limit, wanted offsets, complete)
        type Case =
            (&'static str, u64, usize, u64, &'static str, Option<usize>, &'static [u64], bool);
        let cases: [Case; 25] = [
            ("fresh stream, position 0", 0, 5, 0, E, None, &[], true),
            ("fresh stream, future position", 0, 5, 1, E, None, &[], false),
            ("fresh stream, other epoch", 0, 5, 0, O, None, &[], false),
            ("position 0, all retained", 3, 5, 0, E, None, &[1, 2, 3], true),
            ("middle position", 3, 5, 1, E, None, &[2, 3], true),
            ("position == top", 3, 5, 3, E, None, &[], true),
            ("future position", 3, 5, 4, E, None, &[1, 2, 3], false),
            ("future position, limit", 3, 5, 9, E, Some(2), &[1, 2], false),
            ("far future position", 3, 5, u64::MAX, E, None, &[1, 2, 3], false),
            ("wrong epoch", 3, 5, 1, O, None, &[1, 2, 3], false),
            ("wrong epoch, limit", 3, 5, 1, O, Some(1), &[1], false),
            ("trimmed: just reaches back", 10, 3, 7, E, None, &[8, 9, 10], true),
            ("trimmed: one missing", 10, 3, 6, E, None, &[8, 9, 10], false),
            ("trimmed: position 0", 10, 3, 0, E, None, &[8, 9, 10], false),
            ("trimmed: inside retained", 10, 3, 8, E, None, &[9, 10], true),
            ("trimmed: at top", 10, 3, 10, E, None, &[], true),
            ("limit smaller than what is after", 10, 10, 2, E, Some(3), &[3, 4, 5], true),
            ("limit larger than what is after", 10, 10, 8, E, Some(5), &[9, 10], true),
            ("limit 0, complete", 10, 10, 2, E, Some(0), &[], true),
            ("limit 0, incomplete", 10, 3, 2, E, Some(0), &[], false),
            ("size 0, position == top", 4, 0, 4, E, None, &[], true),
            ("size 0, behind top", 4, 0, 3, E, None, &[], false),
            ("size 0, position 0", 4, 0, 0, E, None, &[], false),
            ("size 0, future", 4, 0, 5, E, None, &[], false),
            ("size 0, wrong epoch", 4, 0, 4, O, None, &[], false),
        ];
        for (name, published, size, offset, epoch, limit, want, complete) in cases {
            let s = filled(published, size);
            let got = s.since(offset, epoch, limit);
            assert_eq!(offsets(&got.publications), want, "{name}");
            assert_eq!(got.complete, complete, "{name}");
            for e in &got.publications {
                assert_eq!(e.data, Bytes::from(format!("d{}", e.offset)), "{name}");
            }
        }
    }

    #[test]
    fn latest_table() {
        let cases: [(u64, usize, Option<usize>, &[u64]); 8] = [
            (0, 5, None, &[]),
            (0, 5, Some(3), &[]),
            (3, 5, None, &[1, 2, 3]),
            (3, 5, Some(2), &[2, 3]),
            (3, 5, Some(10), &[1, 2, 3]),
            (3, 5, Some(0), &[]),
            (10, 4, Some(2), &[9, 10]),
            (10, 0, None, &[]),
        ];
        for (published, size, limit, want) in cases {
            let s = filled(published, size);
            assert_eq!(offsets(&s.latest(limit)), want, "{published} {size} {limit:?}");
        }
    }

    #[test]
    fn expiry_at_exactly_ttl_vs_just_over() {
        let (mut s, now) = stream();
        let ttl = Duration::from_secs(10);
        let tick = Duration::from_nanos(1);
        assert!(!s.is_expired(now, ttl));
        assert!(!s.is_expired(now + ttl, ttl));
        assert!(s.is_expired(now + ttl + tick, ttl));
        // A publish restarts the idle time.
        let later = now + Duration::from_secs(7);
        s.publish(Bytes::from_static(b"x"), 1, later);
        assert!(!s.is_expired(now + ttl + tick, ttl));
        assert!(!s.is_expired(later + ttl, ttl));
        assert!(s.is_expired(later + ttl + tick, ttl));
        // A clock reading before the last publish is not idleness.
        assert!(!s.is_expired(now, ttl));
        // TTL 0: expired as soon as any time passes.
        assert!(!s.is_expired(later, Duration::ZERO));
        assert!(s.is_expired(later + tick, Duration::ZERO));
    }

    mod model {
        use super::*;
        use proptest::prelude::*;

        const TTL_MS: u64 = 1000;
        const OTHER_EPOCH: &str = "not-an-epoch"; // '-' never appears in generated epochs

        #[derive(Debug, Clone)]
        enum Op {
            Publish(Vec<u8>),
            Since { seed: u64, same_epoch: bool, limit: Option<usize> },
            Latest(Option<usize>),
            AdvanceTime(u64),
            ChangeSize(usize),
        }

        fn op() -> impl Strategy<Value = Op> {
            let limit = proptest::option::of(0usize..12);
            prop_oneof![
                5 => proptest::collection::vec(any::<u8>(), 0..4).prop_map(Op::Publish),
                4 => (any::<u64>(), proptest::bool::weighted(0.8), limit.clone())
                    .prop_map(|(seed, same_epoch, limit)| Op::Since { seed, same_epoch, limit }),
                1 => limit.prop_map(Op::Latest),
                2 => prop_oneof![0u64..300, Just(TTL_MS), Just(TTL_MS + 1), 900u64..1200]
                    .prop_map(Op::AdvanceTime),
                1 => (0usize..8).prop_map(Op::ChangeSize),
            ]
        }

        /// What a stream should hold: every publication since the last epoch change, how many of
        /// the newest are retained, and when the last publish happened.
        struct Model {
            published: Vec<Bytes>,
            kept: usize,
            size: usize,
            last_publish_ms: u64,
        }

        impl Model {
            fn top(&self) -> u64 {
                self.published.len() as u64
            }

            /// Retained entries, oldest first.
            fn retained(&self) -> Vec<Entry> {
                let first = self.published.len() - self.kept;
                (first..self.published.len())
                    .map(|i| Entry { offset: i as u64 + 1, data: self.published[i].clone() })
                    .collect()
            }
        }

        fn limited(mut v: Vec<Entry>, limit: Option<usize>) -> Vec<Entry> {
            if let Some(l) = limit {
                v.truncate(l);
            }
            v
        }

        fn check_invariants(s: &Stream, m: &Model) {
            let retained = m.retained();
            assert_eq!(s.top(), m.top());
            assert_eq!(s.latest(None), retained);
            assert_eq!(s.retained(), (m.kept, retained.iter().map(|e| e.data.len()).sum()));
            // Contiguous, strictly increasing, ending at top.
            for w in s.entries.iter().collect::<Vec<_>>().windows(2) {
                assert_eq!(w[0].offset + 1, w[1].offset);
            }
            if let Some(last) = s.entries.back() {
                assert_eq!(last.offset, s.top());
            }
        }

        fn run(initial_size: usize, ops: Vec<Op>) {
            let base = Instant::now();
            let mut now_ms = 0u64;
            let at = |ms: u64| base + Duration::from_millis(ms);
            let ttl = Duration::from_millis(TTL_MS);
            let mut s = Stream::new(at(0));
            let mut m =
                Model { published: Vec::new(), kept: 0, size: initial_size, last_publish_ms: 0 };
            let mut counter = 0u64;
            for op in ops {
                match op {
                    Op::Publish(extra) => {
                        counter += 1;
                        let mut data = counter.to_string().into_bytes();
                        data.push(b':');
                        data.extend_from_slice(&extra);
                        let data = Bytes::from(data);
                        let offset = s.publish(data.clone(), m.size, at(now_ms));
                        m.published.push(data);
                        m.kept = (m.kept + 1).min(m.size);
                        m.last_publish_ms = now_ms;
                        assert_eq!(offset, m.top());
                        assert!(s.entries.len() <= m.size);
                        assert!(s.entries.capacity() <= 2 * m.size + SLACK);
                    }
                    Op::Since { seed, same_epoch, limit } => {
                        let offset = seed % (m.top() + 3);
                        let epoch_owned = s.epoch().to_string();
                        let epoch = if same_epoch { epoch_owned.as_str() } else { OTHER_EPOCH };
                        let got = s.since(offset, epoch, limit);
                        let retained = m.retained();
                        // `complete`: nothing in offset+1..=top is missing from what is retained.
                        let oldest_kept = m.top() + 1 - m.kept as u64;
                        let complete = same_epoch && offset <= m.top() && offset + 1 >= oldest_kept;
                        assert_eq!(got.complete, complete, "offset {offset} same {same_epoch}");
                        let want = if complete {
                            retained.into_iter().filter(|e| e.offset > offset).collect()
                        } else {
                            retained
                        };
                        assert_eq!(got.publications, limited(want, limit));
                        if complete && limit.is_none() {
                            let got_offsets = offsets(&got.publications);
                            let all: Vec<u64> = (offset + 1..=m.top()).collect();
                            assert_eq!(got_offsets, all);
                        }
                    }
                    Op::Latest(limit) => {
                        let retained = m.retained();
                        let skip = limit.map_or(0, |l| retained.len().saturating_sub(l));
                        assert_eq!(s.latest(limit), retained[skip..].to_vec());
                    }
                    Op::AdvanceTime(ms) => {
                        now_ms += ms;
                        let expired = now_ms - m.last_publish_ms > TTL_MS;
                        assert_eq!(s.is_expired(at(now_ms), ttl), expired);
                        if expired {
                            // The caller's rule: replace the stream by a new one.
                            let old_epoch = s.epoch().clone();
                            s = Stream::new(at(now_ms));
                            assert_ne!(*s.epoch(), old_epoch);
                            m.published.clear();
                            m.kept = 0;
                            m.last_publish_ms = now_ms;
                            assert_eq!(s.top(), 0);
                            // Offsets restart at 1 in the new epoch.
                            let data = Bytes::from_static(b"first");
                            assert_eq!(s.publish(data.clone(), m.size, at(now_ms)), 1);
                            m.published.push(data);
                            m.kept = m.size.min(1);
                        }
                    }
                    Op::ChangeSize(size) => m.size = size,
                }
                check_invariants(&s, &m);
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn stream_matches_model(
                initial_size in 0usize..8,
                ops in proptest::collection::vec(op(), 0..200),
            ) {
                run(initial_size, ops);
            }
        }
    }
}
