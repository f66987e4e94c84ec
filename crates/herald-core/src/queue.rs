//! The outbound queue of one connection: complete frames waiting for the socket writer.
//!
//! Publishers (the hub, under a shard lock) and the connection's own command handling push
//! encoded frames ([`Bytes`], usually shared with every other subscriber); the connection's
//! writer takes everything queued at once and writes it with one vectored write.
//!
//! An idle queue holds no allocation.
//!
//! # The slow-consumer rule
//!
//! A connection is cut with 4008 (never skipped silently) when it does not keep up, judged by
//! progress over time rather than by one instant ([`QueueLimits`]):
//!
//! - **Soft bound** (`limits.max_queue_bytes`, `max_queue_messages`): while more is pending, the
//!   connection is *behind*. It is not cut for that: a reader that drains a burst far larger
//!   than the bound survives.
//! - **Grace** (`limits.slow_consumer_grace_ms`): a connection that stays behind for a whole
//!   grace period without net progress (its pending bytes did not shrink over the period) is cut.
//!   One that is behind but draining gets another period.
//! - **Write timeout** (`limits.write_timeout_ms`): a writer whose socket has taken no byte for
//!   this long while it has something to write is cut, however little is pending (a never-reading
//!   client on a quiet channel).
//! - **Hard cap** (`limits.max_queue_burst_bytes`, and 8 x the message bound): a push beyond it is
//!   refused and the connection is cut at once, so a connection's queue is bounded in memory
//!   whatever happens during its grace period.
//!
//! Every byte a connection queues counts in full here (shared publication frames too: the
//! queue cannot know who else holds them); the memory of shared frames, counted once per node,
//! is [`Metrics::shared_frame_bytes`].
//!
//! # Messages in parts
//!
//! A reply too large for one page (a `subscribe` recovering more than a history page) goes out
//! as one message in parts, each part queued as the socket drains the previous ones:
//! [`Outbox::begin_message`], [`Outbox::push_part`], [`Outbox::end_message`]. Nothing else may
//! come between the parts (WebSocket forbids data frames inside a fragmented message), so while
//! a message is open everything else pushed waits in a held queue, counted against the bounds
//! like any pending byte, and follows the last part. What is held cannot drain before the
//! message ends, so while a message is open the grace rule counts the socket taking bytes at
//! all as progress; the hard cap bounds what is held.
//!
//! # Backlog: telling an overloaded node from a slow client
//!
//! Every queue adds the bytes it holds to the node-wide [`Metrics::backlog_bytes`] while its
//! writer is able to write (not [`Outbox::set_blocked`]): that sum is the work waiting for CPU,
//! which grows only when the node itself cannot keep up. Bytes queued to a connection whose
//! socket is full (a slow reader) are not part of it, so one slow client never slows the
//! publishers; it is judged by the rule above.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use herald_protocol::CloseCode;
use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::metrics::{LimitKind, Metrics};
use herald_protocol::ChannelName;

/// Something a connection's writer sends: its size counts against the queue's bound.
pub trait Item: Send + 'static {
    /// Bytes this item puts on the wire.
    fn wire_len(&self) -> usize;
}

impl Item for Bytes {
    fn wire_len(&self) -> usize {
        self.len()
    }
}

/// Why a frame was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    /// The queue's hard cap would be exceeded: the connection is a slow consumer.
    #[error("outbound queue full")]
    Overflow,
    /// The connection is closing; nothing more is queued.
    #[error("connection closed")]
    Closed,
}

/// Where a queue stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutboxState {
    /// Frames are accepted.
    Open,
    /// The connection was found a slow consumer; the writer must disconnect with 4008.
    Overflowed,
    /// The writer is sending its final frames (disconnect, close): nothing more is queued.
    Closing,
    /// The connection is closing.
    Closed,
}

/// The bounds of one connection's queue (see the module docs for the rule).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLimits {
    /// Pending bytes above which the connection is behind.
    pub soft_bytes: usize,
    /// Pending bytes a push may never exceed (at least `soft_bytes`).
    pub hard_bytes: usize,
    /// Queued messages above which the connection is behind.
    pub soft_messages: usize,
    /// Queued messages a push may never exceed.
    pub hard_messages: usize,
    /// How long a connection may stay behind without net progress.
    pub grace: Duration,
    /// How long a writer may find its socket full without writing a byte.
    pub write_timeout: Duration,
}

impl QueueLimits {
    /// Strict limits: the soft bound is also the hard cap (a push over it cuts at once).
    pub fn strict(max_bytes: usize, max_messages: usize) -> Self {
        QueueLimits {
            soft_bytes: max_bytes,
            hard_bytes: max_bytes,
            soft_messages: max_messages,
            hard_messages: max_messages,
            grace: Duration::ZERO,
            write_timeout: Duration::from_secs(3600),
        }
    }
}

#[derive(Debug)]
struct Inner<T> {
    frames: VecDeque<T>,
    /// The newest pending publication of each conflated channel (written after `frames`).
    conflated: Vec<(ChannelName, T)>,
    /// Bytes queued here plus bytes taken by the writer and not yet written.
    pending_bytes: usize,
    /// Bytes in `frames` (not yet taken by the writer).
    queued_bytes: usize,
    /// The writer waits for the socket to drain; `queued_bytes` is then not in the backlog.
    blocked: bool,
    /// Since when the writer has found the socket full without writing a byte.
    blocked_since: Option<Instant>,
    /// The current grace period: when it started, what was pending then and `written_total`
    /// then. `None` while the connection is not behind.
    behind: Option<(Instant, usize, u64)>,
    /// Bytes the writer has written, ever.
    written_total: u64,
    state: OutboxState,
    /// The server asked this connection to close with this code (e.g. `POST /api/disconnect`).
    close_request: Option<CloseCode>,
    /// A message in parts is open: pushes other than its parts wait in `held`.
    message_open: bool,
    /// What was pushed while a message in parts was open, in order (bytes: `held_bytes`, part
    /// of `pending_bytes`, not of `queued_bytes`).
    held: VecDeque<T>,
    held_bytes: usize,
    /// A reply in pages waits in [`Outbox::wait_page_room`].
    page_waiter: bool,
}

impl<T> Inner<T> {
    /// Bytes the writer can drain now: pending, less what waits behind an open message (held
    /// pushes, conflated values).
    fn drainable(&self) -> usize
    where
        T: Item,
    {
        let waiting = if self.message_open {
            self.held_bytes + self.conflated.iter().map(|(_, f)| f.wire_len()).sum::<usize>()
        } else {
            0
        };
        self.pending_bytes.saturating_sub(waiting)
    }
}

impl<T> Inner<T> {
    /// `Ok` while the queue takes frames. A connection asked to close takes nothing more:
    /// it recovers from the position it last received, so a publication queued after the
    /// request (for example the first of a new epoch, after its channel was told lost) would
    /// carry its position past what it missed.
    fn accepts(&self) -> Result<(), PushError> {
        self.state.accepts()?;
        match self.close_request {
            Some(_) => Err(PushError::Closed),
            None => Ok(()),
        }
    }

    fn is_behind(&self, limits: &QueueLimits) -> bool {
        self.pending_bytes > limits.soft_bytes
            || self.frames.len() + self.held.len() > limits.soft_messages
    }
}

impl OutboxState {
    /// `Ok` while frames are accepted, else why not.
    fn accepts(self) -> Result<(), PushError> {
        match self {
            OutboxState::Open => Ok(()),
            OutboxState::Overflowed => Err(PushError::Overflow),
            OutboxState::Closed | OutboxState::Closing => Err(PushError::Closed),
        }
    }
}

/// A connection's bounded outbound queue (see the module docs).
#[derive(Debug)]
pub struct Outbox<T = Bytes> {
    inner: Mutex<Inner<T>>,
    /// Wakes the writer: a frame in an empty queue, a state change, a grace period started.
    notify: Notify,
    /// Wakes a command waiting for room ([`Outbox::wait_room`]).
    drained: Notify,
    limits: QueueLimits,
    metrics: Arc<Metrics>,
}

impl<T: Item> Outbox<T> {
    /// An empty queue with strict bounds: `max_bytes` pending bytes and `max_messages` queued
    /// messages, a push over either cuts at once (see [`Outbox::with_limits`]).
    pub fn new(max_bytes: usize, max_messages: usize, metrics: Arc<Metrics>) -> Self {
        Self::with_limits(QueueLimits::strict(max_bytes, max_messages), metrics)
    }

    /// An empty queue bounded by `limits`, adding to `metrics`' backlog.
    pub fn with_limits(limits: QueueLimits, metrics: Arc<Metrics>) -> Self {
        Outbox {
            inner: Mutex::new(Inner {
                frames: VecDeque::new(),
                conflated: Vec::new(),
                pending_bytes: 0,
                queued_bytes: 0,
                blocked: false,
                blocked_since: None,
                behind: None,
                written_total: 0,
                state: OutboxState::Open,
                close_request: None,
                message_open: false,
                held: VecDeque::new(),
                held_bytes: 0,
                page_waiter: false,
            }),
            notify: Notify::new(),
            drained: Notify::new(),
            limits,
            metrics,
        }
    }

    /// The queue's bounds.
    pub fn limits(&self) -> &QueueLimits {
        &self.limits
    }

    /// Starts a grace period when the queue just went behind (and wakes the writer, which then
    /// times it); returns true when it did.
    fn note_behind(&self, inner: &mut Inner<T>) -> bool {
        if inner.behind.is_none() && inner.is_behind(&self.limits) {
            inner.behind = Some((Instant::now(), inner.pending_bytes, inner.written_total));
            return true;
        }
        false
    }

    /// Ends the grace period once the queue is back under its soft bound; wakes a waiting
    /// command.
    fn note_drained(&self, inner: &mut Inner<T>) {
        if !inner.is_behind(&self.limits) {
            if inner.behind.take().is_some() {
                self.metrics.slow_recoveries.fetch_add(1, Ordering::Relaxed);
            }
            self.drained.notify_one();
        }
    }

    fn add_backlog(&self, bytes: usize) {
        if bytes > 0 {
            self.metrics.backlog_bytes.fetch_add(bytes as i64, Ordering::Relaxed);
        }
    }

    fn sub_backlog(&self, bytes: usize) {
        if bytes > 0 {
            self.metrics.backlog_bytes.fetch_sub(bytes as i64, Ordering::Relaxed);
        }
    }

    /// Queues one frame, or refuses it when the hard cap would be exceeded (the queue then
    /// turns overflowed and wakes the writer) or the connection is closing. A frame larger
    /// than the cap is still accepted into an empty queue.
    pub fn push(&self, frame: T) -> Result<(), PushError> {
        let counted = self.push_shared(frame)?;
        self.add_backlog(counted);
        Ok(())
    }

    /// Queues a reply: accepted whatever its own size while the queue is under its hard cap (a
    /// history page may be large; the session waits for room under the soft bound before each
    /// command, see [`Outbox::wait_room`]).
    pub fn push_reply(&self, frame: T) -> Result<(), PushError> {
        let max = self.limits.hard_bytes;
        let counted = self.enqueue(frame, false, |inner, _| inner.pending_bytes < max)?;
        self.add_backlog(counted);
        Ok(())
    }

    /// [`Outbox::push`] for fan-out: returns the bytes the caller must add to the node backlog
    /// (summed over every subscriber, to touch the shared counter once per publication).
    pub fn push_shared(&self, frame: T) -> Result<usize, PushError> {
        let (max_bytes, max_messages) = (self.limits.hard_bytes, self.limits.hard_messages);
        self.enqueue(frame, false, |inner, len| {
            (inner.pending_bytes == 0 || inner.pending_bytes + len <= max_bytes)
                && inner.frames.len() + inner.held.len() < max_messages
        })
    }

    /// Appends `frame` if the queue is open and `fits` says it may take it, else turns the
    /// queue overflowed; returns the bytes that count towards the node backlog. While a message
    /// in parts is open, a frame that is not one of its parts (`part`) is held.
    fn enqueue(
        &self,
        frame: T,
        part: bool,
        fits: impl FnOnce(&Inner<T>, usize) -> bool,
    ) -> Result<usize, PushError> {
        self.enqueue_part(frame, part, false, fits)
    }

    /// [`Outbox::enqueue`]; with `opens`, the frame opens a message in parts, in the same
    /// critical section (no other push can come between it and the message being open).
    fn enqueue_part(
        &self,
        frame: T,
        part: bool,
        opens: bool,
        fits: impl FnOnce(&Inner<T>, usize) -> bool,
    ) -> Result<usize, PushError> {
        let mut inner = self.inner.lock();
        inner.accepts()?;
        let len = frame.wire_len();
        if !fits(&inner, len) {
            inner.state = OutboxState::Overflowed;
            drop(inner);
            self.metrics.limit(LimitKind::Queue);
            self.notify.notify_one();
            return Err(PushError::Overflow);
        }
        if inner.message_open && !part {
            inner.pending_bytes += len;
            inner.held_bytes += len;
            inner.held.push_back(frame);
            let behind = self.note_behind(&mut inner);
            drop(inner);
            if behind {
                self.notify.notify_one();
            }
            return Ok(0);
        }
        let was_empty = inner.frames.is_empty();
        inner.pending_bytes += len;
        inner.queued_bytes += len;
        inner.frames.push_back(frame);
        inner.message_open |= opens;
        let counted = if inner.blocked { 0 } else { len };
        let behind = self.note_behind(&mut inner);
        drop(inner);
        if was_empty || behind {
            self.notify.notify_one();
        }
        Ok(counted)
    }

    /// Opens a message in parts with its first part (see the module docs): until
    /// [`Outbox::end_message`], only [`Outbox::push_part`] reaches the writer. Accepted like a
    /// reply ([`Outbox::push_reply`]).
    pub fn begin_message(&self, first: T) -> Result<(), PushError> {
        let max = self.limits.hard_bytes;
        let counted = self.enqueue_part(first, true, true, |inner, _| inner.pending_bytes < max)?;
        self.add_backlog(counted);
        Ok(())
    }

    /// Queues the next part of the open message (accepted like a reply).
    pub fn push_part(&self, part: T) -> Result<(), PushError> {
        let max = self.limits.hard_bytes;
        let counted = self.enqueue(part, true, |inner, _| inner.pending_bytes < max)?;
        self.add_backlog(counted);
        Ok(())
    }

    /// Queues the last part of the open message, then everything held meanwhile, in order.
    pub fn end_message(&self, last: T) -> Result<(), PushError> {
        let mut inner = self.inner.lock();
        inner.accepts()?;
        let len = last.wire_len();
        inner.pending_bytes += len;
        inner.queued_bytes += len;
        inner.frames.push_back(last);
        inner.message_open = false;
        let held = std::mem::take(&mut inner.held);
        let held_bytes = std::mem::take(&mut inner.held_bytes);
        inner.frames.extend(held);
        inner.queued_bytes += held_bytes;
        let counted = if inner.blocked { 0 } else { len + held_bytes };
        self.note_behind(&mut inner);
        drop(inner);
        self.add_backlog(counted);
        self.notify.notify_one();
        Ok(())
    }

    /// True while a message in parts is open (its last part not queued): the writer must not
    /// put a data frame of its own (a `disconnect` push) on the wire then.
    pub fn message_open(&self) -> bool {
        self.inner.lock().message_open
    }

    /// Waits until what the writer can drain (not what waits behind an open message) is at
    /// most half the soft bound, or the queue stops being open: a reply sent page by page
    /// reads its next page then, while the socket still has some to drain.
    pub async fn wait_page_room(&self) {
        loop {
            let drained = self.drained.notified();
            {
                let mut inner = self.inner.lock();
                if inner.state != OutboxState::Open
                    || inner.drainable() <= self.limits.soft_bytes / 2
                {
                    inner.page_waiter = false;
                    return;
                }
                inner.page_waiter = true;
            }
            drained.await;
        }
    }

    /// Queues a publication of a conflated channel: it replaces the channel's pending one, if
    /// any (a slow subscriber gets the newest value, never a backlog and never 4008 for it).
    /// Returns the bytes the caller must add to the node backlog (may be negative).
    pub fn push_conflated(&self, channel: &ChannelName, frame: T) -> Result<isize, PushError> {
        let mut inner = self.inner.lock();
        inner.accepts()?;
        let len = frame.wire_len();
        let blocked = inner.blocked;
        let was_empty = inner.frames.is_empty() && inner.conflated.is_empty();
        let old = match inner.conflated.iter_mut().find(|(c, _)| c == channel) {
            Some(slot) => Some(std::mem::replace(&mut slot.1, frame).wire_len()),
            None => {
                inner.conflated.push((channel.clone(), frame));
                None
            }
        };
        let old_len = old.unwrap_or(0);
        inner.pending_bytes = inner.pending_bytes + len - old_len;
        inner.queued_bytes = inner.queued_bytes + len - old_len;
        drop(inner);
        if old.is_some() {
            self.metrics.conflated_drops.fetch_add(1, Ordering::Relaxed);
        } else if was_empty {
            self.notify.notify_one();
        }
        Ok(if blocked { 0 } else { len as isize - old_len as isize })
    }

    /// Drops the pending publication of a conflated channel (on unsubscribe).
    pub fn drop_conflated(&self, channel: &ChannelName) {
        let mut inner = self.inner.lock();
        if let Some(i) = inner.conflated.iter().position(|(c, _)| c == channel) {
            let (_, frame) = inner.conflated.swap_remove(i);
            let len = frame.wire_len();
            inner.pending_bytes -= len;
            inner.queued_bytes -= len;
            let counted = if inner.blocked { 0 } else { len };
            drop(inner);
            self.sub_backlog(counted);
        }
    }

    /// The writer found the socket full (`true`) or writable again (`false`): bytes queued
    /// while blocked are the client's lag, not the node's backlog.
    pub fn set_blocked(&self, blocked: bool) {
        let mut inner = self.inner.lock();
        if blocked && inner.blocked_since.is_none() {
            inner.blocked_since = Some(Instant::now());
        }
        if inner.blocked == blocked {
            return;
        }
        inner.blocked = blocked;
        let queued = inner.queued_bytes;
        drop(inner);
        if blocked {
            self.sub_backlog(queued);
        } else {
            self.add_backlog(queued);
        }
    }

    /// Queues a frame the server must send whatever the bound (a `ping`, a `disconnect` push,
    /// the close frame), unless the queue is closing or closed.
    pub fn push_final(&self, frame: T) {
        let mut inner = self.inner.lock();
        if matches!(inner.state, OutboxState::Closed | OutboxState::Closing) {
            return;
        }
        let len = frame.wire_len();
        inner.pending_bytes += len;
        if inner.message_open {
            inner.held_bytes += len;
            inner.held.push_back(frame);
            self.note_behind(&mut inner);
            return;
        }
        inner.queued_bytes += len;
        inner.frames.push_back(frame);
        let counted = if inner.blocked { 0 } else { len };
        self.note_behind(&mut inner);
        drop(inner);
        self.add_backlog(counted);
        self.notify.notify_one();
    }

    /// Moves every queued frame to the back of `into` and returns the queue's state.
    pub fn take(&self, into: &mut VecDeque<T>) -> OutboxState {
        let mut inner = self.inner.lock();
        let before = into.len();
        if into.is_empty() {
            std::mem::swap(&mut inner.frames, into);
        } else {
            into.extend(inner.frames.drain(..));
        }
        // Conflated values wait for the end of an open message (they are its queued bytes).
        let kept: usize = if inner.message_open {
            inner.conflated.iter().map(|(_, f)| f.wire_len()).sum()
        } else {
            into.extend(inner.conflated.drain(..).map(|(_, frame)| frame));
            0
        };
        let taken_messages = into.len() - before;
        let taken = std::mem::replace(&mut inner.queued_bytes, kept) - kept;
        let counted = if inner.blocked { 0 } else { taken };
        let state = inner.state;
        // Fewer messages queued: a connection behind only by its message count catches up.
        self.note_drained(&mut inner);
        drop(inner);
        self.sub_backlog(counted);
        if taken_messages > 0 {
            self.metrics.observe_queue_depth(taken_messages);
        }
        state
    }

    /// Drops every queued frame (the client will recover from history) and returns how many
    /// bytes were dropped.
    pub fn discard(&self) -> usize {
        let mut inner = self.inner.lock();
        let dropped = std::mem::take(&mut inner.queued_bytes);
        let held = std::mem::take(&mut inner.held_bytes);
        inner.frames = VecDeque::new();
        inner.conflated = Vec::new();
        inner.held = VecDeque::new();
        inner.pending_bytes -= dropped + held;
        let counted = if inner.blocked { 0 } else { dropped };
        drop(inner);
        self.sub_backlog(counted);
        dropped + held
    }

    /// Records that the writer wrote `n` bytes of what it took.
    pub fn written(&self, n: usize) {
        let mut inner = self.inner.lock();
        inner.pending_bytes = inner.pending_bytes.saturating_sub(n);
        inner.written_total += n as u64;
        if n > 0 {
            inner.blocked_since = None;
        }
        if inner.behind.is_some() {
            self.note_drained(&mut inner);
        }
        let page_room = inner.page_waiter && inner.drainable() <= self.limits.soft_bytes / 2;
        if page_room {
            inner.page_waiter = false;
        }
        if inner.pending_bytes == 0 || page_room {
            self.drained.notify_one();
        }
    }

    /// Returns the writer's frames that were taken but not written to the accounting, e.g. when
    /// the writer drops them.
    pub fn forget(&self, n: usize) {
        let mut inner = self.inner.lock();
        inner.pending_bytes = inner.pending_bytes.saturating_sub(n);
        self.note_drained(&mut inner);
    }

    /// Stops accepting frames (pushes fail with [`PushError::Closed`]).
    pub fn close(&self) {
        let mut inner = self.inner.lock();
        inner.state = OutboxState::Closed;
        inner.frames = VecDeque::new();
        inner.conflated = Vec::new();
        inner.held = VecDeque::new();
        let queued = std::mem::take(&mut inner.queued_bytes);
        let held = std::mem::take(&mut inner.held_bytes);
        inner.pending_bytes -= queued + held;
        let counted = if inner.blocked { 0 } else { queued };
        drop(inner);
        self.sub_backlog(counted);
        self.drained.notify_one();
    }

    /// Marks the queue overflowed, as a push over the cap would, and wakes the writer.
    pub fn overflow(&self) {
        let mut inner = self.inner.lock();
        if inner.state == OutboxState::Open {
            inner.state = OutboxState::Overflowed;
        }
        drop(inner);
        self.notify.notify_one();
        self.drained.notify_one();
    }

    /// When the writer must next call [`Outbox::check_progress`]: the end of the current grace
    /// period or of the write timeout, if either runs.
    pub fn next_check(&self) -> Option<Instant> {
        let inner = self.inner.lock();
        if inner.state != OutboxState::Open {
            return None;
        }
        let grace = inner.behind.map(|(since, ..)| since + self.limits.grace);
        let stalled = inner.blocked_since.map(|since| since + self.limits.write_timeout);
        match (grace, stalled) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Applies the slow-consumer rule at `now`: a connection behind for a whole grace period
    /// without net progress, or whose socket took nothing for the write timeout, turns
    /// overflowed (the writer then cuts it with 4008). A connection behind but draining starts
    /// a new grace period. Returns true when the connection was found slow.
    pub fn check_progress(&self, now: Instant) -> bool {
        let mut inner = self.inner.lock();
        if inner.state != OutboxState::Open {
            return false;
        }
        let stalled = inner
            .blocked_since
            .is_some_and(|since| now.duration_since(since) >= self.limits.write_timeout);
        let mut slow = stalled;
        if let Some((since, pending_then, written_then)) = inner.behind {
            if now.duration_since(since) >= self.limits.grace {
                // Inside a message in parts what is held cannot drain before its end: progress
                // is then the socket taking bytes at all (the hard cap bounds what is held).
                let progress = if inner.message_open {
                    inner.written_total > written_then
                } else {
                    inner.pending_bytes < pending_then
                };
                if progress {
                    // Draining, if slowly: judge it again over the next period.
                    inner.behind = Some((now, inner.pending_bytes, inner.written_total));
                } else {
                    slow = true;
                }
            }
        }
        if slow {
            inner.state = OutboxState::Overflowed;
            drop(inner);
            self.metrics.limit(if stalled { LimitKind::WriteTimeout } else { LimitKind::Queue });
            self.notify.notify_one();
            self.drained.notify_one();
        }
        slow
    }

    /// Waits until the queue is under its soft bound (or stops being open): a command waits
    /// here before running, so a client asking for more than it reads slows itself down
    /// instead of growing its queue. The connection's writer keeps draining meanwhile.
    pub async fn wait_room(&self) {
        loop {
            let drained = self.drained.notified();
            {
                let inner = self.inner.lock();
                if inner.state != OutboxState::Open || !inner.is_behind(&self.limits) {
                    return;
                }
            }
            drained.await;
        }
    }

    /// Starts closing: queues `finals` (the disconnect push, the close frame) and refuses
    /// everything pushed afterwards, so the finals are the last frames on the wire. With
    /// `drop_pending` the frames still pending go first (a slow consumer recovers them from
    /// history); without, they are written before the finals (a shutdown drains), pending
    /// conflated values included.
    pub fn finish(&self, finals: impl IntoIterator<Item = T>, drop_pending: bool) {
        if drop_pending {
            self.discard();
        }
        let mut inner = self.inner.lock();
        if inner.state == OutboxState::Closed {
            return;
        }
        inner.state = OutboxState::Closing;
        if inner.message_open {
            // The open message never ends: what waits for its end is dropped (the caller
            // queues control frames only, see [`Outbox::message_open`]).
            let held = std::mem::take(&mut inner.held_bytes);
            let conflated: usize = inner.conflated.iter().map(|(_, f)| f.wire_len()).sum();
            inner.held = VecDeque::new();
            inner.conflated = Vec::new();
            inner.pending_bytes -= held + conflated;
            inner.queued_bytes -= conflated;
            if !inner.blocked {
                self.sub_backlog(conflated);
            }
        }
        // Conflated values are written after the FIFO frames: move them in front of the
        // finals, so nothing follows the close.
        let conflated = std::mem::take(&mut inner.conflated);
        inner.frames.extend(conflated.into_iter().map(|(_, frame)| frame));
        let mut added = 0;
        for frame in finals {
            let len = frame.wire_len();
            inner.pending_bytes += len;
            inner.queued_bytes += len;
            inner.frames.push_back(frame);
            added += len;
        }
        let counted = if inner.blocked { 0 } else { added };
        drop(inner);
        self.add_backlog(counted);
        self.notify.notify_one();
        self.drained.notify_one();
    }

    /// Asks the connection's writer to close with `code` (after the frames already queued).
    pub fn request_close(&self, code: CloseCode) {
        self.inner.lock().close_request.get_or_insert(code);
        self.notify.notify_one();
    }

    /// Why the writer must close the connection now, if it must: 4008 for a slow consumer, or
    /// the code of [`Outbox::request_close`].
    pub fn pending_close(&self) -> Option<CloseCode> {
        let inner = self.inner.lock();
        match inner.state {
            OutboxState::Overflowed => Some(CloseCode::SlowConsumer),
            _ => inner.close_request,
        }
    }

    /// The queue's state.
    pub fn state(&self) -> OutboxState {
        self.inner.lock().state
    }

    /// Bytes pending (queued or taken and not yet written).
    pub fn pending_bytes(&self) -> usize {
        self.inner.lock().pending_bytes
    }

    /// Waits until a frame is pushed into an empty queue or the state changes.
    pub async fn notified(&self) {
        self.notify.notified().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(n: usize) -> Bytes {
        Bytes::from(vec![b'x'; n])
    }

    #[test]
    fn a_queue_asked_to_close_takes_nothing_more() {
        // What was queued before the request still goes out; nothing after it does (the
        // connection recovers from what it last received).
        let q = Outbox::new(100, 100, Arc::new(Metrics::default()));
        assert_eq!(q.push(frame(3)), Ok(()));
        q.request_close(CloseCode::SlowConsumer);
        assert_eq!(q.push(frame(3)), Err(PushError::Closed));
        assert_eq!(q.push_reply(frame(3)), Err(PushError::Closed));
        let c = ChannelName::parse("c").unwrap();
        assert_eq!(q.push_conflated(&c, frame(3)), Err(PushError::Closed));
        assert_eq!(q.pending_close(), Some(CloseCode::SlowConsumer));
        let mut taken = VecDeque::new();
        q.take(&mut taken);
        assert_eq!(taken.len(), 1);
    }

    #[test]
    fn bounded_in_bytes_and_overflow_is_sticky() {
        let q = Outbox::new(10, 100, Arc::new(Metrics::default()));
        assert_eq!(q.push(frame(6)), Ok(()));
        assert_eq!(q.push(frame(4)), Ok(()));
        assert_eq!(q.push(frame(1)), Err(PushError::Overflow));
        assert_eq!(q.state(), OutboxState::Overflowed);
        assert_eq!(q.push(frame(0)), Err(PushError::Overflow));
        let mut taken = VecDeque::new();
        assert_eq!(q.take(&mut taken), OutboxState::Overflowed);
        assert_eq!(taken.len(), 2);
    }

    #[test]
    fn a_message_in_parts_holds_everything_else_until_its_end() {
        let metrics = Arc::new(Metrics::default());
        let q = Outbox::new(100, 100, metrics.clone());
        let c = ChannelName::parse("c").unwrap();
        q.push(frame(1)).unwrap();
        q.begin_message(frame(2)).unwrap();
        assert!(q.message_open());
        q.push(frame(3)).unwrap();
        q.push_final(frame(4));
        // The hub adds what a conflated push returns to the backlog.
        let counted = q.push_conflated(&c, frame(5)).unwrap();
        metrics.backlog_bytes.fetch_add(counted as i64, Ordering::Relaxed);
        q.push_part(frame(6)).unwrap();
        assert_eq!(q.pending_bytes(), 21);
        let mut taken = VecDeque::new();
        q.take(&mut taken);
        let sizes = |t: &VecDeque<Bytes>| t.iter().map(|f| f.len()).collect::<Vec<_>>();
        assert_eq!(sizes(&taken), [1, 2, 6], "only the parts reach the writer");
        q.written(9);
        q.end_message(frame(7)).unwrap();
        assert!(!q.message_open());
        taken.clear();
        q.take(&mut taken);
        assert_eq!(sizes(&taken), [7, 3, 4, 5], "the last part, then what was held, in order");
        q.written(19);
        assert_eq!(q.pending_bytes(), 0);
        assert_eq!(metrics.backlog_bytes.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn closing_inside_a_message_drops_what_was_held() {
        let metrics = Arc::new(Metrics::default());
        let q = Outbox::new(100, 100, metrics.clone());
        let c = ChannelName::parse("c").unwrap();
        q.begin_message(frame(2)).unwrap();
        q.push(frame(3)).unwrap();
        // The hub adds what a conflated push returns to the backlog.
        let counted = q.push_conflated(&c, frame(5)).unwrap();
        metrics.backlog_bytes.fetch_add(counted as i64, Ordering::Relaxed);
        q.finish([frame(8)], false);
        let mut taken = VecDeque::new();
        q.take(&mut taken);
        assert_eq!(taken.iter().map(|f| f.len()).collect::<Vec<_>>(), [2, 8]);
        q.written(10);
        assert_eq!(q.pending_bytes(), 0);
        assert_eq!(q.end_message(frame(1)), Err(PushError::Closed));
        assert_eq!(metrics.backlog_bytes.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn taken_bytes_count_until_written() {
        let q = Outbox::new(10, 100, Arc::new(Metrics::default()));
        q.push(frame(8)).unwrap();
        let mut taken = VecDeque::new();
        q.take(&mut taken);
        assert_eq!(q.pending_bytes(), 8);
        assert_eq!(q.push(frame(3)), Err(PushError::Overflow));
        let q = Outbox::new(10, 100, Arc::new(Metrics::default()));
        q.push(frame(8)).unwrap();
        q.take(&mut taken);
        q.written(8);
        assert_eq!(q.push(frame(3)), Ok(()));
    }

    #[test]
    fn final_frames_bypass_the_bound_but_not_close() {
        let q = Outbox::new(1, 100, Arc::new(Metrics::default()));
        q.push_final(frame(5));
        assert_eq!(q.pending_bytes(), 5);
        q.close();
        q.push_final(frame(5));
        assert_eq!(q.push(frame(0)), Err(PushError::Closed));
        let mut taken = VecDeque::new();
        q.take(&mut taken);
        assert!(taken.is_empty());
    }

    #[test]
    fn oversized_frame_fits_an_empty_queue() {
        let q = Outbox::new(10, 100, Arc::new(Metrics::default()));
        assert_eq!(q.push(frame(50)), Ok(()));
        assert_eq!(q.push(frame(1)), Err(PushError::Overflow));
    }

    #[test]
    fn backlog_counts_only_queues_whose_writer_can_write() {
        let metrics = Arc::new(Metrics::default());
        let backlog = || metrics.backlog_bytes.load(Ordering::Relaxed);
        let q = Outbox::new(100, 100, metrics.clone());
        q.push(frame(10)).unwrap();
        assert_eq!(backlog(), 10);
        q.set_blocked(true);
        assert_eq!(backlog(), 0);
        q.push(frame(5)).unwrap();
        assert_eq!(backlog(), 0);
        q.set_blocked(false);
        assert_eq!(backlog(), 15);
        let mut taken = VecDeque::new();
        q.take(&mut taken);
        assert_eq!(backlog(), 0);
        assert_eq!(q.push_shared(frame(7)), Ok(7));
        metrics.backlog_bytes.fetch_add(7, Ordering::Relaxed);
        q.discard();
        assert_eq!(backlog(), 0);
        q.push(frame(3)).unwrap();
        q.close();
        assert_eq!(backlog(), 0);
    }

    #[test]
    fn bounded_in_messages() {
        let q = Outbox::new(1000, 2, Arc::new(Metrics::default()));
        q.push(frame(1)).unwrap();
        q.push(frame(1)).unwrap();
        assert_eq!(q.push(frame(1)), Err(PushError::Overflow));
    }

    #[test]
    fn conflation_keeps_the_newest_per_channel_after_fifo_frames() {
        let metrics = Arc::new(Metrics::default());
        let q = Outbox::new(10, 100, metrics.clone());
        let a = ChannelName::parse("a").unwrap();
        let b = ChannelName::parse("b").unwrap();
        q.push(Bytes::from_static(b"reply")).unwrap();
        let mut delta = 0;
        for v in [&b"a1"[..], b"a2", b"a3"] {
            delta += q.push_conflated(&a, Bytes::copy_from_slice(v)).unwrap();
        }
        delta += q.push_conflated(&b, Bytes::from_static(b"b1")).unwrap();
        // Far over the byte bound in total offered, never overflowed.
        for _ in 0..100 {
            delta += q.push_conflated(&a, Bytes::from_static(b"a4")).unwrap();
        }
        metrics.backlog_bytes.fetch_add(delta as i64, Ordering::Relaxed);
        assert_eq!(q.state(), OutboxState::Open);
        let mut taken = VecDeque::new();
        q.take(&mut taken);
        let taken: Vec<&[u8]> = taken.iter().map(|f| &f[..]).collect();
        assert_eq!(taken, [&b"reply"[..], b"a4", b"b1"]);
        assert_eq!(metrics.conflated_drops.load(Ordering::Relaxed), 102);
        assert_eq!(metrics.backlog_bytes.load(Ordering::Relaxed), 0);
        let delta = q.push_conflated(&a, Bytes::from_static(b"a5")).unwrap();
        metrics.backlog_bytes.fetch_add(delta as i64, Ordering::Relaxed);
        q.drop_conflated(&a);
        assert_eq!(q.pending_bytes(), 9, "reply + a4 + b1 taken, not yet written");
        assert_eq!(metrics.backlog_bytes.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn push_into_empty_queue_wakes_the_writer() {
        let q = Arc::new(Outbox::new(100, 100, Arc::new(Metrics::default())));
        let q2 = q.clone();
        let waiter = tokio::spawn(async move { q2.notified().await });
        q.push(frame(1)).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter).await.unwrap().unwrap();
    }
    fn part_limits(soft_bytes: usize, grace: Duration) -> QueueLimits {
        QueueLimits {
            soft_bytes,
            hard_bytes: 32 * soft_bytes,
            soft_messages: 100_000,
            hard_messages: 800_000,
            grace,
            write_timeout: Duration::from_secs(30),
        }
    }

    /// A conflated value pushed inside a message waits for its end: it must not count as
    /// drainable, or the next page would wait for ever.
    #[tokio::test]
    async fn conflated_values_inside_a_message_do_not_block_its_pages() {
        let q = Outbox::with_limits(
            part_limits(1000, Duration::from_secs(3)),
            Arc::new(Metrics::default()),
        );
        let c = ChannelName::parse("c").unwrap();
        q.begin_message(frame(100)).unwrap();
        q.push_conflated(&c, frame(600)).unwrap();
        let mut taken = VecDeque::new();
        q.take(&mut taken);
        q.written(100);
        tokio::time::timeout(Duration::from_secs(1), q.wait_page_room())
            .await
            .expect("room for the next page");
    }

    /// Inside a message, held traffic cannot drain before its end: a reader writing every part
    /// as it comes is making progress, not slow.
    #[test]
    fn a_reader_draining_every_part_is_not_cut_while_held_traffic_grows() {
        let grace = Duration::from_millis(1);
        let q = Outbox::with_limits(part_limits(1000, grace), Arc::new(Metrics::default()));
        q.begin_message(frame(400)).unwrap();
        let mut taken = VecDeque::new();
        for _ in 0..100 {
            q.push(frame(100)).unwrap();
            q.push_part(frame(400)).unwrap();
            taken.clear();
            q.take(&mut taken);
            q.written(taken.iter().map(|f| f.len()).sum());
            std::thread::sleep(grace * 2);
            assert!(!q.check_progress(Instant::now()), "cut while draining every part");
        }
        // A reader that stops taking bytes is cut.
        q.push_part(frame(400)).unwrap();
        std::thread::sleep(grace * 2);
        assert!(q.check_progress(Instant::now()), "no byte written for a grace period");
    }

    /// No push from another thread can land between a message's first part and the message
    /// being open.
    #[test]
    fn nothing_comes_between_the_first_part_and_the_open_message() {
        for _round in 0..300 {
            let q = Arc::new(Outbox::new(1 << 30, 1 << 30, Arc::new(Metrics::default())));
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let (q2, s2) = (q.clone(), stop.clone());
            let pusher = std::thread::spawn(move || {
                while !s2.load(Ordering::Relaxed) {
                    let _ = q2.push(frame(1));
                }
            });
            while q.pending_bytes() == 0 {
                std::hint::spin_loop();
            }
            q.begin_message(frame(7)).unwrap();
            stop.store(true, Ordering::Relaxed);
            pusher.join().unwrap();
            let mut taken = VecDeque::new();
            q.take(&mut taken);
            assert_eq!(taken.back().map(|f| f.len()), Some(7), "a frame after the first part");
        }
    }
}
