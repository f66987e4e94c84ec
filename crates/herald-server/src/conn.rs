//! One connection's writer and close sequence, shared by the transports: [`Conn`] runs a
//! WebSocket connection or an SSE stream on its [`Wire`], and the transport (a [`Transport`])
//! says only what is particular to it.
//!
//! The skeleton, once for every transport:
//! - **Writing.** Chunks come from the connection's [`Outbox`] (through
//!   [`Transport::refill`]) and go out in one vectored write of up to [`MAX_IOVECS`] slices;
//!   each write is accounted ([`Outbox::written`], `herald_bytes_out_total`).
//! - **Waiting.** A write that finds the socket full marks the queue blocked
//!   ([`Outbox::set_blocked`]) and waits for it to drain; otherwise the loop waits for the outbox
//!   ([`Outbox::notified`]), input, the ping timer, the slow-consumer check
//!   ([`Outbox::next_check`], [`Outbox::check_progress`]), shutdown, or the transport's own event.
//! - **Closing.** A close (shutdown, [`Outbox::pending_close`], the transport's) queues the
//!   transport's final frames ([`Transport::finish`]) and bounds the time left to write them
//!   ([`CLOSE_FLUSH`], `shutdown_timeout` on shutdown); a slow consumer's taken but unstarted
//!   chunks are dropped. Once they are written the server half-closes (FIN) and lingers,
//!   reading and dropping what the peer still sends; a peer that does not take them in time
//!   gets a reset. Input that arrives while closing is read and dropped too.
//!
//! ```ignore
//! let mut conn = Conn::new(&app, id, stream, outbox, transport, MAX_IOVECS);
//! conn.run(Instant::now() + ping_interval).await; // until the connection ends
//! let (stream, transport) = conn.into_parts();
//! ```

use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, IoSlice};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes};
use herald_core::metrics::Metrics;
use herald_core::queue::Item;
use herald_core::Outbox;
use herald_protocol::CloseCode;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::wire::Wire;

/// Most iovecs handed to one `writev`.
pub(crate) const MAX_IOVECS: usize = 512;
/// Size of the stack buffer one read lands in.
pub(crate) const READ_CHUNK: usize = 8192;
/// Most reads per wake-up, so one chatty client cannot starve the others on its thread.
pub(crate) const MAX_READS_PER_WAKE: usize = 16;
/// How long a closing connection may take to flush its final frames (except on shutdown).
pub(crate) const CLOSE_FLUSH: Duration = Duration::from_secs(5);
/// How long the server keeps reading (and discarding) after its final frames and FIN went out,
/// so a client still sending is not answered with a reset that destroys what it has not read.
const LINGER: Duration = Duration::from_secs(2);

/// Why a connection closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Close {
    /// The server closes it with this code.
    Server(CloseCode),
    /// The peer asked to close (a WebSocket close frame): answer and end.
    Peer,
}

impl Close {
    /// True when what is pending is dropped rather than written first: a slow consumer
    /// recovers it from history; a peer that closed does not want it.
    pub(crate) fn drops_pending(self) -> bool {
        matches!(self, Close::Server(CloseCode::SlowConsumer) | Close::Peer)
    }
}

/// How [`Conn::run`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RunEnd {
    /// The connection ended (its outbox is closed).
    Closed,
    /// The transport asked to go on elsewhere ([`Transport::wants_move`]): nothing is lost,
    /// [`Conn::run`] may be called again (on another runtime, after [`Conn::map_wire`]).
    Move,
}

/// What reading the peer found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Input {
    /// The connection goes on (something or nothing was read).
    More,
    /// The peer closed its side (or the read failed).
    Eof,
}

/// One piece of what the writer writes, accounted against the queue it came from.
pub(crate) trait Chunk: Send {
    /// The bytes still to write.
    fn bytes(&self) -> &[u8];
    /// Drops the first `n` bytes (written).
    fn advance(&mut self, n: usize);
    /// Queue bytes accounted when `n` bytes of it were written, fewer than its length.
    fn written_part(&self, n: usize) -> usize;
    /// Queue bytes accounted when the rest of it was written (also what dropping it forgets).
    fn written_whole(&self) -> usize;
    /// True when it ends a unit of the stream (a frame, an event): the chunks after it may be
    /// dropped without corrupting the stream.
    fn ends_message(&self) -> bool;
    /// True when, once it is written, the peer is inside a message that only the transport's
    /// control frames may interrupt (a WebSocket message sent in fragments).
    fn leaves_message_open(&self) -> bool {
        false
    }
}

/// A WebSocket frame (each byte written is a queue byte) and whether a fragmented message is
/// open on the wire once it is written.
pub(crate) struct WsFrame {
    /// The frame's bytes still to write.
    pub(crate) bytes: Bytes,
    /// A data message is open after this frame (see [`herald_protocol::ws::message_open_after`]).
    pub(crate) open_after: bool,
}

impl Chunk for WsFrame {
    fn bytes(&self) -> &[u8] {
        &self.bytes
    }
    fn advance(&mut self, n: usize) {
        Buf::advance(&mut self.bytes, n);
    }
    fn written_part(&self, n: usize) -> usize {
        n
    }
    fn written_whole(&self) -> usize {
        self.bytes.len()
    }
    fn ends_message(&self) -> bool {
        true
    }
    fn leaves_message_open(&self) -> bool {
        self.open_after
    }
}

/// A rendered SSE chunk and the queue bytes it accounts for once wholly written (an `id:` line
/// accounts for nothing: its event's body carries the event's queue bytes).
impl Chunk for (Bytes, usize) {
    fn bytes(&self) -> &[u8] {
        &self.0
    }
    fn advance(&mut self, n: usize) {
        Buf::advance(&mut self.0, n);
    }
    fn written_part(&self, _n: usize) -> usize {
        0
    }
    fn written_whole(&self) -> usize {
        self.1
    }
    fn ends_message(&self) -> bool {
        self.1 > 0
    }
}

/// What a transport adds to the skeleton (see the module docs). Hooks that return a
/// [`Close`] ask the skeleton to start closing.
pub(crate) trait Transport: Send {
    /// What the connection's outbox holds.
    type Item: Item;
    /// What the writer writes.
    type Chunk: Chunk;
    /// The outcome of the transport's own event ([`Transport::event`]).
    type Event: Send;

    /// Puts the next chunks to write into `out` (empty), from `outbox`; leaves it empty when
    /// nothing is queued.
    fn refill(&mut self, outbox: &Outbox<Self::Item>, out: &mut VecDeque<Self::Chunk>);

    /// Queues the final frames of `close` ([`Outbox::finish`], dropping what is pending when
    /// [`Close::drops_pending`]). `wire_open`: once the writer has written what it keeps, a
    /// message is open on the wire ([`Chunk::leaves_message_open`]).
    fn finish(&mut self, outbox: &Outbox<Self::Item>, close: Close, wire_open: bool);

    /// The ping timer fired at `now`: returns when it must fire next, or closes.
    fn ping(&mut self, outbox: &Outbox<Self::Item>, now: Instant) -> Result<Instant, CloseCode>;

    /// Drops what the transport took from the outbox and did not hand to the writer yet (a
    /// slow consumer's cut); returns its queue bytes.
    fn drop_taken(&mut self) -> usize {
        0
    }

    /// Called before each flush (`open`: not closing).
    fn prepare(&mut self, _outbox: &Arc<Outbox<Self::Item>>, _open: bool) -> Option<Close> {
        None
    }

    /// True while the transport reads its input (the skeleton reads and drops input while
    /// closing, whatever this says).
    fn wants_input(&self) -> bool {
        true
    }

    /// Reads the peer's input while open (bounded; never waits). By default it is dropped.
    fn read(&mut self, wire: &impl Wire) -> Input {
        discard(wire)
    }

    /// True while [`Transport::event`] may complete.
    fn waiting(&self) -> bool {
        false
    }

    /// The transport's own event (awaited only while [`Transport::waiting`]).
    fn event(&mut self) -> impl Future<Output = Self::Event> + Send;

    /// Handles what [`Transport::event`] returned.
    fn on_event(&mut self, _event: Self::Event) -> Option<Close> {
        None
    }

    /// True while the connection may not end even with everything written (WebSocket: a
    /// command still runs).
    fn busy(&self) -> bool {
        false
    }

    /// True once the last thing the transport sends was handed to the writer: the connection
    /// ends when it is written.
    fn ended(&self) -> bool {
        false
    }

    /// True when the connection should go on on another runtime (checked after each of the
    /// transport's own events, while open and with nothing of the transport's in flight).
    fn wants_move(&self) -> bool {
        false
    }
}

/// What a flush achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flushed {
    /// Everything queued was written.
    All,
    /// The socket's send buffer is full.
    Blocked,
}

/// One connection: its wire, its transport and the writer's state.
pub(crate) struct Conn<W, T: Transport> {
    wire: W,
    transport: T,
    outbox: Arc<Outbox<T::Item>>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    shutdown_timeout: Duration,
    /// For the log.
    id: u64,
    /// Chunks taken from the outbox and not fully written; the first may be partly written.
    out: VecDeque<T::Chunk>,
    /// Most slices per write (1 without write coalescing, a benchmark baseline).
    iovecs: usize,
    /// Why the server closes (`None` while open or when the peer closed first).
    closing: Option<CloseCode>,
    /// Set once closing starts: the final frames must be flushed by then.
    close_by: Option<Instant>,
    /// The peer's side is closed (EOF read).
    peer_done: bool,
    /// A message is open on the wire after the last chunk written whole
    /// ([`Chunk::leaves_message_open`]).
    written_open: bool,
}

impl<W, T: Transport> Conn<W, T> {
    /// The same connection on another wire (the same socket, registered elsewhere), after
    /// [`RunEnd::Move`]. When `f` fails the connection ends: its outbox is closed and the
    /// transport comes back with the error, for the caller to end its session.
    pub(crate) fn map_wire<W2, E>(
        self,
        f: impl FnOnce(W) -> Result<W2, E>,
    ) -> Result<Conn<W2, T>, (E, T)> {
        let wire = match f(self.wire) {
            Ok(w) => w,
            Err(e) => {
                self.outbox.close();
                return Err((e, self.transport));
            }
        };
        Ok(Conn {
            wire,
            transport: self.transport,
            outbox: self.outbox,
            metrics: self.metrics,
            shutdown: self.shutdown,
            shutdown_timeout: self.shutdown_timeout,
            id: self.id,
            out: self.out,
            iovecs: self.iovecs,
            closing: self.closing,
            close_by: self.close_by,
            peer_done: self.peer_done,
            written_open: self.written_open,
        })
    }
}

impl<W: Wire, T: Transport> Conn<W, T> {
    /// A connection `id` of `app` on `wire`, writing what `outbox` holds through `transport`
    /// with at most `iovecs` (up to [`MAX_IOVECS`]) slices per write.
    pub(crate) fn new(
        app: &App,
        id: u64,
        wire: W,
        outbox: Arc<Outbox<T::Item>>,
        transport: T,
        iovecs: usize,
    ) -> Self {
        Conn {
            wire,
            transport,
            outbox,
            metrics: app.node.metrics.clone(),
            shutdown: app.shutdown.clone(),
            shutdown_timeout: app.shutdown_timeout,
            id,
            out: VecDeque::new(),
            iovecs: iovecs.clamp(1, MAX_IOVECS),
            closing: None,
            close_by: None,
            peer_done: false,
            written_open: false,
        }
    }

    /// The transport.
    pub(crate) fn transport_mut(&mut self) -> &mut T {
        &mut self.transport
    }

    /// Queues `chunk` to be written first (a response head), outside the queue's accounting.
    pub(crate) fn write_first(&mut self, chunk: T::Chunk) {
        self.out.push_front(chunk);
    }

    /// The connection's id (for the log).
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// Why the server closed the connection, if it did.
    pub(crate) fn closing(&self) -> Option<CloseCode> {
        self.closing
    }

    /// The wire and the transport, once the connection ended.
    pub(crate) fn into_parts(self) -> (W, T) {
        (self.wire, self.transport)
    }

    /// Starts closing (see the module docs); nothing if it already is.
    pub(crate) fn start_close(&mut self, close: Close) {
        self.close_within(close, CLOSE_FLUSH);
    }

    fn close_within(&mut self, close: Close, flush_for: Duration) {
        if self.close_by.is_some() {
            return;
        }
        if let Close::Server(code) = close {
            self.closing = Some(code);
            self.metrics.disconnect(code);
        }
        if close.drops_pending() {
            // Keep a partly written chunk and the rest of its message (cutting it would corrupt
            // the stream), drop the rest.
            let keep =
                self.out.iter().position(Chunk::ends_message).map_or(self.out.len(), |i| i + 1);
            let dropped: usize = self.out.drain(keep..).map(|c| c.written_whole()).sum();
            self.outbox.forget(dropped + self.transport.drop_taken());
        }
        let wire_open = self.out.back().map_or(self.written_open, Chunk::leaves_message_open);
        self.transport.finish(&self.outbox, close, wire_open);
        self.close_by = Some(Instant::now() + flush_for);
    }

    /// Serves the connection until it ends ([`RunEnd::Closed`]: the outbox is closed) or the
    /// transport asks to move ([`RunEnd::Move`]); the first ping is due at `first_ping`.
    pub(crate) async fn run(&mut self, first_ping: Instant) -> RunEnd {
        let ping = tokio::time::sleep_until(first_ping);
        tokio::pin!(ping);
        let shutdown = self.shutdown.clone();
        loop {
            if let Some(close) = self.transport.prepare(&self.outbox, self.close_by.is_none()) {
                self.start_close(close);
            }
            let flushed = match self.flush() {
                Ok(f) => f,
                Err(e) => {
                    tracing::debug!(conn = self.id, error = %e, "write failed");
                    break;
                }
            };
            if flushed == Flushed::All
                && !self.transport.busy()
                && (self.transport.ended()
                    || (self.close_by.is_some() && self.outbox.pending_bytes() == 0))
            {
                self.linger().await;
                break;
            }
            if self.close_by.is_none() {
                if let Some(code) = self.outbox.pending_close() {
                    self.start_close(Close::Server(code));
                    continue;
                }
            }
            let blocked = flushed == Flushed::Blocked;
            let open = self.close_by.is_none();
            let reading = !self.peer_done && (!open || self.transport.wants_input());
            let waiting = self.transport.waiting();
            let close_by =
                self.close_by.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            // The slow-consumer rule (grace without progress, write timeout): see
            // herald_core::queue.
            let check_at = if open { self.outbox.next_check() } else { None };
            let check_at = check_at.map(Instant::from_std).unwrap_or(close_by);
            tokio::select! {
                biased;
                _ = shutdown.cancelled(), if open => {
                    self.close_within(Close::Server(CloseCode::Shutdown), self.shutdown_timeout);
                }
                event = self.transport.event(), if waiting => {
                    if let Some(close) = self.transport.on_event(event) {
                        self.start_close(close);
                    } else if self.transport.wants_move() && self.close_by.is_none() {
                        return RunEnd::Move;
                    }
                }
                r = self.wire.readable(), if reading => {
                    if r.is_err() { break; }
                    if !open {
                        // Closing: what the peer still sends is read and dropped, so the
                        // kernel does not answer it with a reset that loses the last frames.
                        self.discard_input();
                    } else if self.transport.read(&self.wire) == Input::Eof {
                        break;
                    }
                }
                r = self.wire.writable(), if blocked => {
                    if r.is_err() { break; }
                    self.outbox.set_blocked(false);
                }
                // Also while blocked: an overflow or a close request must wake the writer.
                _ = self.outbox.notified() => {}
                _ = &mut ping, if open => {
                    match self.transport.ping(&self.outbox, Instant::now()) {
                        Ok(next) => ping.as_mut().reset(next),
                        Err(code) => self.start_close(Close::Server(code)),
                    }
                }
                _ = tokio::time::sleep_until(check_at), if open && check_at < close_by => {
                    self.outbox.check_progress(std::time::Instant::now());
                }
                _ = tokio::time::sleep_until(close_by), if !open => {
                    // The peer did not take the final frames in time: a reset tells it the
                    // stream is broken, where a FIN after a partial frame would look clean.
                    tracing::debug!(conn = self.id, "close flush timed out; resetting");
                    self.wire.reset();
                    break;
                }
            }
        }
        self.outbox.close();
        RunEnd::Closed
    }

    /// Writes as much of the queue as the wire takes, in vectored writes.
    fn flush(&mut self) -> io::Result<Flushed> {
        loop {
            if self.out.is_empty() {
                self.transport.refill(&self.outbox, &mut self.out);
                if self.out.is_empty() {
                    if self.out.capacity() > 4 {
                        self.out = VecDeque::new();
                    }
                    return Ok(Flushed::All);
                }
            }
            let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
            let mut count = 0;
            for (slot, chunk) in slices[..self.iovecs].iter_mut().zip(self.out.iter()) {
                *slot = IoSlice::new(chunk.bytes());
                count += 1;
            }
            match self.wire.try_write_vectored(&slices[..count]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(mut n) => {
                    self.metrics.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
                    let mut accounted = 0;
                    while n > 0 {
                        let Some(front) = self.out.front_mut() else { break };
                        let len = front.bytes().len();
                        if n >= len {
                            n -= len;
                            accounted += front.written_whole();
                            self.written_open = front.leaves_message_open();
                            self.out.pop_front();
                        } else {
                            accounted += front.written_part(n);
                            front.advance(n);
                            n = 0;
                        }
                    }
                    self.outbox.written(accounted);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.outbox.set_blocked(true);
                    return Ok(Flushed::Blocked);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// After the final frames: half-close (FIN), then read and drop what the peer still sends
    /// until it closes too or [`LINGER`] passes. Dropping the socket with unread input would
    /// make the kernel send a reset, and a reset makes the peer's kernel throw away what it had
    /// received but the peer had not read yet: the final frames.
    async fn linger(&mut self) {
        if self.peer_done {
            return;
        }
        self.wire.shutdown_write();
        let deadline = Instant::now() + LINGER;
        while !self.peer_done {
            tokio::select! {
                r = self.wire.readable() => {
                    if r.is_err() { return; }
                    self.discard_input();
                }
                _ = tokio::time::sleep_until(deadline) => return,
            }
        }
    }

    /// Reads and drops whatever input is there (bounded per call); notes EOF.
    fn discard_input(&mut self) {
        if discard(&self.wire) == Input::Eof {
            self.peer_done = true;
        }
    }
}

/// Reads and drops whatever input `wire` has (bounded per call).
fn discard(wire: &impl Wire) -> Input {
    let mut buf = [0u8; READ_CHUNK];
    for _ in 0..MAX_READS_PER_WAKE {
        match wire.try_read(&mut buf) {
            Ok(0) => return Input::Eof,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Input::More,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Input::Eof,
        }
    }
    Input::More
}
