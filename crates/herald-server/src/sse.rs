//! The Server-Sent Events transport: `GET /sse?channel=A&channel=B[&token=JWT][&last_event_id=ID]`.
//!
//! A stream subscribes to several channels at once. Each publication is one `event: pub`, its
//! bytes encoded once by the hub and shared by every SSE subscriber; the stream's writer puts a
//! per-stream `id:` line in front of each event, holding the stream's position on every channel
//! in a compact form whose size is bounded per channel (see [`herald_protocol::sse`]); a stream
//! holds at most `limits.max_channels_per_stream` channels, so its id line has a known bound,
//! which every queued event counts against the queue bound. The writer renders id lines lazily,
//! one vectored write's worth of events at a time. A browser that reconnects sends that id back as
//! `Last-Event-ID` (or a client passes `last_event_id=`): every channel the id positions is
//! recovered from history, in order and without duplicates; where history does not reach, the
//! stream first sends `event: reset` naming those channels and goes on live for them. A `: ping`
//! comment goes out at least every 25 s.
//!
//! Streams are normally served on the raw socket (the listener recognises `GET /sse` from the
//! first bytes it reads), so an idle stream holds no HTTP buffers; a `/sse` request arriving on a
//! kept-alive HTTP connection is served through hyper with the same session and encoding, its
//! chunks written into a streaming body ([`crate::wire::BodyWire`]). Both paths run on the
//! connection skeleton ([`crate::conn::Conn`]: writer, slow-consumer rule, close sequence); this
//! module adds what is SSE's own ([`EventStream`]). On both paths the `disconnect` event is the
//! last thing written: nothing queued after it is rendered.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use herald_broker::{HistoryQuery, PageBounds, Publication, PublishOptions};
use herald_core::hub::{Sink, SseItem};
use herald_core::queue::Item;
use herald_core::Outbox;
use herald_protocol::sse::{EventId, IdEntry};
use herald_protocol::{sse, ChannelName, CloseCode, StreamPosition};
use http::{header, HeaderMap, Request, StatusCode};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::app::App;
use crate::conn::{Close, Conn, Transport, MAX_IOVECS};
use crate::error::ApiError;
use crate::query::percent_decode;
use crate::socket::PeerAddr;
use crate::wire::{BodyWire, Wire};

/// Longest interval between `: ping` comments (the contract says at least every 30 s).
const MAX_PING_INTERVAL: Duration = Duration::from_secs(25);
/// Largest request head read on the raw path; beyond: 431.
pub(crate) const MAX_HEAD: usize = 16 * 1024;
/// Most events rendered at once (an `id:` line and a body each: one `writev`'s worth).
const RENDER_EVENTS: usize = MAX_IOVECS / 2;
/// Chunks (render batches) of a stream served through hyper that may wait for hyper to write
/// them: that path's "socket buffer".
const BODY_CHUNKS: usize = 4;
/// Reconnection delay advised to browsers (`retry:`), in milliseconds.
const RETRY_MS: u32 = 1000;

/// What a `/sse` request asks for.
#[derive(Debug, Default)]
pub(crate) struct SseRequest {
    channels: Vec<String>,
    token: Option<String>,
    last_event_id: Option<String>,
    /// The `Origin` header, checked against `allowed_origins`.
    origin: Option<String>,
}

impl SseRequest {
    /// Reads the query and the `Last-Event-ID` header (which wins over `last_event_id=`).
    fn parse(
        query: Option<&str>,
        last_event_id_header: Option<String>,
        origin: Option<String>,
    ) -> SseRequest {
        let mut req = SseRequest { origin, ..SseRequest::default() };
        for pair in query.unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode(v).into_owned();
            match k {
                "channel" => req.channels.push(v),
                "token" => req.token = Some(v),
                "last_event_id" => req.last_event_id = Some(v),
                _ => {}
            }
        }
        if let Some(h) = last_event_id_header.filter(|h| !h.is_empty()) {
            req.last_event_id = Some(h);
        }
        req
    }
}

/// A stream's position on one channel that keeps history.
#[derive(Debug, Clone)]
struct Position {
    epoch: Arc<str>,
    offset: u64,
    /// [`sse::position_tag`] of the channel and `epoch`, computed when the epoch changes.
    tag: [u8; sse::TAG_LEN],
}

/// Renders queued [`SseItem`]s into wire chunks, keeping the stream's position per channel for
/// the `id:` lines.
struct Renderer {
    channels: Vec<ChannelName>,
    index: HashMap<ChannelName, usize>,
    /// `None` where the channel keeps no history.
    positions: Vec<Option<Position>>,
    /// The bound of the stream's `id:` line ([`sse::id_line_bound`]).
    id_len: usize,
    /// The `disconnect` event was rendered: nothing after it is.
    ended: bool,
}

impl Renderer {
    fn new(channels: Vec<ChannelName>) -> Renderer {
        Renderer {
            index: channels.iter().cloned().enumerate().map(|(i, c)| (c, i)).collect(),
            positions: vec![None; channels.len()],
            id_len: sse::id_line_bound(channels.len()),
            channels,
            ended: false,
        }
    }

    /// Records that the stream stands at `offset` of `epoch` on channel `i`.
    fn set(&mut self, i: usize, epoch: &Arc<str>, offset: u64) {
        match &mut self.positions[i] {
            Some(p) if *p.epoch == **epoch => p.offset = offset,
            slot => {
                let tag = sse::position_tag(self.channels[i].as_str(), epoch);
                *slot = Some(Position { epoch: epoch.clone(), offset, tag });
            }
        }
    }

    /// Appends the `id:` line (see [`herald_protocol::sse`] for the format).
    fn write_id(&self, out: &mut BytesMut) {
        let mut id = String::with_capacity(self.id_len);
        id.push_str("id: ~");
        for (i, p) in self.positions.iter().enumerate() {
            if i > 0 {
                id.push(';');
            }
            if let Some(p) = p {
                sse::push_entry(&mut id, &p.tag, p.offset);
            }
        }
        id.push('\n');
        out.extend_from_slice(id.as_bytes());
    }

    /// Renders up to [`RENDER_EVENTS`] events from the front of `items` into `out` as
    /// `(bytes, queue bytes accounted once written)`. Once the `disconnect` event is rendered,
    /// every later item is dropped; returns the queue bytes of the dropped items.
    fn render(
        &mut self,
        items: &mut VecDeque<SseItem>,
        out: &mut VecDeque<(Bytes, usize)>,
    ) -> usize {
        let mut dropped = 0;
        // One allocation holds the id lines of the batch (each line is split off it).
        let mut ids = BytesMut::new();
        let batch = items.len().min(RENDER_EVENTS);
        for _ in 0..batch {
            let Some(item) = items.pop_front() else { break };
            if self.ended {
                dropped += item.wire_len();
                continue;
            }
            let accounted = item.wire_len();
            let with_id = item.channel.is_some() || item.body.is_empty();
            if with_id {
                if ids.capacity() - ids.len() < self.id_len + 1 {
                    ids = BytesMut::with_capacity((batch * (self.id_len + 1)).min(256 << 10));
                }
                if let (Some(channel), Some(offset), Some(epoch)) =
                    (&item.channel, item.offset, &item.epoch)
                {
                    if let Some(&i) = self.index.get(channel) {
                        self.set(i, epoch, offset);
                    }
                }
                self.write_id(&mut ids);
                if item.body.is_empty() {
                    // An id-only event: the browser records the position, no event fires.
                    ids.extend_from_slice(b"\n");
                    out.push_back((ids.split().freeze(), accounted));
                    continue;
                }
                out.push_back((ids.split().freeze(), 0));
            } else if is_disconnect(&item) {
                self.ended = true;
            }
            out.push_back((item.body, accounted));
        }
        if self.ended {
            dropped += items.drain(..).map(|i| i.wire_len()).sum::<usize>();
        }
        dropped
    }
}

/// True for the stream's `disconnect` event (the last thing a stream sends).
fn is_disconnect(item: &SseItem) -> bool {
    item.channel.is_none() && item.body.starts_with(b"event: disconnect\n")
}

/// A stream-level event (no channel, no id line).
fn stream_event(body: Bytes) -> SseItem {
    SseItem { channel: None, offset: None, epoch: None, body, id_len: 0 }
}

/// What a resumed id says about one channel: `None` when it does not mention it, `Some(None)`
/// when it mentions it without a usable position (reset), else the position to recover from.
type Mentioned = Option<Option<StreamPosition>>;

/// A channel whose recovery goes on after the stream opened: the publications after `last`,
/// up to `top` (the channel's position when the stream opened), are still to be queued.
struct Rest {
    channel: ChannelName,
    options: PublishOptions,
    top: StreamPosition,
    last: u64,
}

/// The recovered publications of one channel as the stream queues them.
fn recovered_items(
    channel: &ChannelName,
    publications: &[Publication],
    id_len: usize,
) -> Vec<SseItem> {
    publications
        .iter()
        .map(|p| SseItem {
            channel: Some(channel.clone()),
            offset: p.offset,
            epoch: p.epoch.clone(),
            body: Bytes::from(sse::encode_pub_event(channel.as_str(), p.offset, &p.data)),
            id_len,
        })
        .collect()
}

/// Queues the rest of the recoveries larger than a page, channel after channel, a page at a
/// time once the stream's writer has drained most of the previous one; each channel goes live
/// after its last page (its live publications wait in the hub meanwhile, other channels flow).
/// Where a later page finds history trimmed past what was sent, the channel in another epoch,
/// or the broker failing, the stream gets `event: reset` for that channel and it goes live
/// from the position it had when the stream opened. Ends early when the stream closes.
async fn recover_rest(
    node: Arc<herald_core::Node>,
    outbox: Arc<Outbox<SseItem>>,
    id: u64,
    id_len: usize,
    bounds: PageBounds,
    rest: Vec<Rest>,
) {
    for Rest { channel, options, top, mut last } in rest {
        let mut gap = false;
        while last < top.offset {
            outbox.wait_page_room().await;
            let since = StreamPosition { offset: last, epoch: top.epoch.clone() };
            let query = HistoryQuery { since: Some(since), limit: None };
            let page = match node.broker.history_page(&channel, &options, &query, bounds).await {
                Ok(page)
                    if page.complete
                        && page.position.as_ref().map(|p| &p.epoch) == Some(&top.epoch) =>
                {
                    page
                }
                _ => {
                    gap = true;
                    break;
                }
            };
            let due: Vec<Publication> = page
                .publications
                .into_iter()
                .filter(|p| p.offset.is_some_and(|o| o <= top.offset))
                .collect();
            let Some(newest) = due.last().and_then(|p| p.offset) else { break };
            last = newest;
            for item in recovered_items(&channel, &due, id_len) {
                if outbox.push_reply(item).is_err() {
                    return;
                }
            }
        }
        let activated = node.hub.activate(&channel, id, Some(&top), |_| {
            if gap {
                let reset = sse::encode_reset_event(std::iter::once(channel.as_str()));
                outbox.push_reply(stream_event(Bytes::from(reset)))?;
            }
            Ok(())
        });
        if activated.is_err() {
            return;
        }
    }
}

/// An opened stream: subscribed, with its initial events queued.
struct SseStream {
    app: App,
    id: u64,
    outbox: Arc<Outbox<SseItem>>,
    renderer: Renderer,
}

impl SseStream {
    /// Authenticates, validates every channel, subscribes, recovers what `Last-Event-ID` says
    /// was missed, and queues the initial events.
    async fn open(
        app: &App,
        req: SseRequest,
        ip: Option<std::net::IpAddr>,
    ) -> Result<SseStream, ApiError> {
        crate::origin::check(&app.config.allowed_origins, req.origin.as_deref())?;
        let node = app.node.clone();
        let user = match &req.token {
            Some(token) => {
                let verifier =
                    node.auth.verifier.as_ref().ok_or_else(|| {
                        ApiError::new(401, "token authentication is not configured")
                    })?;
                Some(verifier.verify(token).map_err(|e| ApiError::new(401, e.to_string()))?)
            }
            None => None,
        };
        let expires_at = user.as_ref().and_then(|t| t.expires_at);
        let user = user.map(|t| t.user);
        if req.channels.is_empty() {
            return Err(ApiError::bad_request("give at least one `channel=` in the query"));
        }
        let max_channels = app.config.max_channels_per_stream;
        let mut channels: Vec<ChannelName> = Vec::with_capacity(req.channels.len().min(64));
        let mut channel_options = Vec::with_capacity(channels.capacity());
        for name in &req.channels {
            let channel = ChannelName::parse(name)
                .map_err(|e| ApiError::bad_request(format!("bad channel {name:?}: {e}")))?;
            let options = node.options(&channel)?;
            if user.is_none() && (!options.anonymous_subscribe || !node.auth.allow_anonymous) {
                return Err(ApiError::new(
                    401,
                    format!("anonymous streams may not subscribe to {channel}"),
                ));
            }
            if !channel.is_user_allowed(user.as_deref().unwrap_or("")) {
                return Err(ApiError::new(403, format!("{channel} is limited to other users")));
            }
            if !channels.contains(&channel) {
                if channels.len() == max_channels {
                    node.metrics.limit(herald_core::metrics::LimitKind::Subscriptions);
                    return Err(ApiError::new(
                        429,
                        format!(
                            "a stream may hold at most {max_channels} channels \
                             (limits.max_channels_per_stream)"
                        ),
                    ));
                }
                channels.push(channel);
                channel_options.push(options);
            }
        }
        let resume = req
            .last_event_id
            .as_deref()
            .map(|id| sse::parse_event_id(id, channels.len()))
            .unwrap_or_default();

        let limits = &node.limits;
        let outbox = Arc::new(Outbox::with_limits(limits.queue_limits(), node.metrics.clone()));
        let renderer = Renderer::new(channels.clone());
        let id_len = renderer.id_len;
        let sink = || Sink::Sse(outbox.clone(), id_len);
        let id = node.next_connection_id();
        node.registry.register(id, user.as_deref(), expires_at, ip, sink(), &node.limits).map_err(
            |e| {
                node.metrics.limit(e.kind());
                ApiError::new(429, e.to_string())
            },
        )?;
        let mut stream = SseStream { app: app.clone(), id, outbox: outbox.clone(), renderer };

        // Subscribe everything first (pending: live publications are buffered), read the first
        // history page of each, then queue: retry advice, the reset event, recovered
        // publications, live. A recovery larger than a page goes on page by page beside the
        // writer ([`recover_rest`]).
        // A page, with the id line each event gets, fills at most half the queue; so do the
        // first pages queued at open, all channels together (`budget`).
        let half = limits.max_queue_bytes / 2;
        let bounds = PageBounds {
            max_publications: limits.max_history_page.min((half / (id_len + 64)).max(1)),
            max_bytes: limits.max_history_page_bytes.min(half),
        };
        let mut budget = half;
        let mut plans = Vec::with_capacity(channels.len());
        let mut rest = Vec::new();
        let mut reset = Vec::new();
        for (i, channel) in channels.iter().enumerate() {
            let conflate = channel_options[i].conflate;
            let options = channel_options[i].publish_options();
            // Every joining subscriber waits until the node receives the channel (the broker
            // call returns at once when it already does).
            node.hub.subscribe_pending(channel, id, sink(), conflate);
            if let Err(e) = node.broker.subscribe(channel).await {
                stream.abandon_all().await;
                return Err(ApiError::new(503, e.to_string()));
            }
            let mentioned: Mentioned = match &resume {
                EventId::Named(map) => map.get(channel.as_str()).cloned(),
                EventId::Indexed(entries) => match entries.get(i) {
                    None | Some(IdEntry::Unknown) => None,
                    Some(IdEntry::NoHistory) => Some(None),
                    Some(IdEntry::At { tag, offset }) => {
                        // The tag names the channel's epoch: valid only where it is the
                        // channel's current one (another epoch or channel list: reset).
                        let top = HistoryQuery { since: None, limit: Some(0) };
                        match node.broker.history(channel, &options, &top).await {
                            Ok(page) => Some(
                                page.position
                                    .filter(|p| {
                                        sse::position_tag(channel.as_str(), &p.epoch) == *tag
                                    })
                                    .map(|p| StreamPosition { offset: *offset, epoch: p.epoch }),
                            ),
                            Err(e) => {
                                stream.abandon_all().await;
                                return Err(ApiError::new(503, e.to_string()));
                            }
                        }
                    }
                },
            };
            let since = mentioned.clone().flatten();
            let query = HistoryQuery { limit: if since.is_some() { None } else { Some(0) }, since };
            let page = match node.broker.history_page(channel, &options, &query, bounds).await {
                Ok(page) => page,
                Err(e) => {
                    stream.abandon_all().await;
                    return Err(ApiError::new(503, e.to_string()));
                }
            };
            let recovered = query.since.is_some() && page.complete;
            if mentioned.is_some() && !recovered {
                reset.push(channel.as_str().to_string());
            }
            // Where the stream stands before what is queued for this channel.
            match (&query.since, &page.position) {
                (Some(since), Some(_)) if recovered => {
                    stream.renderer.set(i, &Arc::from(since.epoch.as_str()), since.offset)
                }
                (_, Some(p)) => stream.renderer.set(i, &Arc::from(p.epoch.as_str()), p.offset),
                (_, None) => {}
            }
            let mut items = if recovered {
                recovered_items(channel, &page.publications, id_len)
            } else {
                Vec::new()
            };
            let bytes: usize = items.iter().map(|i| i.wire_len()).sum();
            let mut last = page.publications.last().and_then(|p| p.offset);
            if bytes > budget {
                // Queued later, page by page, from the start.
                items.clear();
                last = query.since.as_ref().map(|s| s.offset);
            } else {
                budget -= bytes;
            }
            match (page.position, last) {
                (Some(top), Some(last)) if recovered && (page.more || items.is_empty()) => {
                    if last < top.offset {
                        rest.push(Rest { channel: channel.clone(), options, top, last });
                        plans.push((None, items, false));
                    } else {
                        plans.push((Some(top), items, true));
                    }
                }
                (position, _) => plans.push((position, items, true)),
            }
        }

        outbox.push_final(stream_event(Bytes::from(format!("retry: {RETRY_MS}\n\n"))));
        if !reset.is_empty() {
            outbox.push_final(stream_event(Bytes::from(sse::encode_reset_event(
                reset.iter().map(String::as_str),
            ))));
        }
        for (channel, (position, items, live)) in channels.iter().zip(plans) {
            let queue_items = |_: &Sink| {
                for item in items {
                    outbox.push_reply(item)?;
                }
                Ok(())
            };
            // A channel with more to recover goes live once its last page is queued.
            let queued = if live {
                node.hub.activate(channel, id, position.as_ref(), queue_items)
            } else {
                queue_items(&sink())
            };
            if queued.is_err() {
                stream.abandon_all().await;
                return Err(ApiError::new(503, "the stream overflowed while it was opened"));
            }
        }
        // An event with only an id: the browser records the position without an event firing.
        outbox.push_final(SseItem { id_len, ..stream_event(Bytes::new()) });
        node.metrics.subscriptions.fetch_add(channels.len() as i64, Ordering::Relaxed);
        if !rest.is_empty() {
            tokio::spawn(recover_rest(node, outbox, id, id_len, bounds, rest));
        }
        Ok(stream)
    }

    async fn abandon_all(&self) {
        // Closing the queue also takes what it held out of the node's backlog.
        self.outbox.close();
        self.app.node.registry.unregister(self.id);
        for channel in &self.renderer.channels {
            if self.app.node.hub.unsubscribe(channel, self.id) {
                let _ = self.app.node.broker.unsubscribe(channel).await;
            }
        }
    }

    /// Ends every subscription; called once when the stream ends.
    async fn close(&self) {
        self.outbox.close();
        self.abandon_all().await;
        self.app
            .node
            .metrics
            .subscriptions
            .fetch_sub(self.renderer.channels.len() as i64, Ordering::Relaxed);
    }

    /// Renders the next batch of what is queued into `out` (taking from the outbox once the
    /// writer's own items are all rendered); accounts for dropped items.
    fn render_next(&mut self, items: &mut VecDeque<SseItem>, out: &mut VecDeque<(Bytes, usize)>) {
        if items.is_empty() {
            self.outbox.take(items);
        }
        let dropped = self.renderer.render(items, out);
        if dropped > 0 {
            self.outbox.forget(dropped);
        }
    }
}

/// The response head of a stream.
fn stream_headers(headers: &mut HeaderMap) {
    headers.insert(header::CONTENT_TYPE, http::HeaderValue::from_static("text/event-stream"));
    headers.insert(header::CACHE_CONTROL, http::HeaderValue::from_static("no-cache"));
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, http::HeaderValue::from_static("*"));
    headers.insert("x-accel-buffering", http::HeaderValue::from_static("no"));
}

/// `OPTIONS /sse`: CORS preflight.
pub(crate) async fn preflight() -> Response {
    let mut response = StatusCode::NO_CONTENT.into_response();
    let h = response.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, http::HeaderValue::from_static("*"));
    h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, http::HeaderValue::from_static("GET, OPTIONS"));
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        http::HeaderValue::from_static("Last-Event-ID, Cache-Control"),
    );
    h.insert(header::ACCESS_CONTROL_MAX_AGE, http::HeaderValue::from_static("86400"));
    response
}

fn with_cors(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, http::HeaderValue::from_static("*"));
    response
}

/// `GET /sse` reached through hyper (a kept-alive HTTP connection): the same stream on the same
/// skeleton, written into a streaming body ([`BodyWire`]) instead of the socket.
pub(crate) async fn handler(State(app): State<App>, req: Request<Body>) -> Response {
    let request = {
        let header =
            |name| req.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
        let (last, origin) = (header("last-event-id"), header("origin"));
        SseRequest::parse(req.uri().query(), last, origin)
    };
    let ip = req.extensions().get::<PeerAddr>().map(|p| p.0.ip());
    let stream = match SseStream::open(&app, request, ip).await {
        Ok(s) => s,
        Err(e) => return with_cors(e.into_response()),
    };
    let (wire, body) = BodyWire::new(BODY_CHUNKS);
    tokio::spawn(app.tracker.track_future(serve(&app, stream, wire, None)));
    let mut response = Response::new(Body::from_stream(body));
    stream_headers(response.headers_mut());
    response
}

/// Serves an opened stream on `wire` until it ends, `head` (the response head on the raw path)
/// first, then ends every subscription. Set up outside the returned future and closed in a
/// boxed one, so that neither takes room in an idle stream's task.
fn serve<W: Wire + 'static>(
    app: &App,
    stream: SseStream,
    wire: W,
    head: Option<&'static str>,
) -> impl std::future::Future<Output = ()> + Send {
    let metrics = &app.node.metrics;
    metrics.connections.fetch_add(1, Ordering::Relaxed);
    metrics.connections_total.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(
        stream = stream.id,
        channels = stream.renderer.channels.len(),
        "sse stream opened"
    );
    let interval = app.node.ping_interval.min(MAX_PING_INTERVAL);
    let outbox = stream.outbox.clone();
    let id = stream.id;
    let events = EventStream { stream, items: VecDeque::new(), interval };
    let mut conn = Conn::new(app, id, wire, outbox, events, MAX_IOVECS);
    if let Some(head) = head {
        conn.write_first((Bytes::from_static(head.as_bytes()), 0));
    }
    let first_ping = Instant::now() + interval;
    async move {
        let _ = conn.run(first_ping).await; // SSE never asks to move
        Box::pin(close(conn)).await;
    }
}

/// Ends a stream whose loop ended: its subscriptions, its counts.
async fn close<W: Wire>(conn: Conn<W, EventStream>) {
    let (wire, events) = conn.into_parts();
    events.stream.close().await;
    drop(wire);
    events.stream.app.node.metrics.connections.fetch_sub(1, Ordering::Relaxed);
    tracing::debug!(stream = events.stream.id, "sse stream closed");
}

/// The SSE side of a stream (the writer and the close sequence are [`Conn`]'s): rendering
/// queued items into wire chunks with the stream's `id:` lines, `: ping` comments, the
/// `disconnect` event after which nothing is written.
struct EventStream {
    stream: SseStream,
    /// Items taken from the outbox and not yet rendered.
    items: VecDeque<SseItem>,
    interval: Duration,
}

impl Transport for EventStream {
    type Item = SseItem;
    type Chunk = (Bytes, usize);
    type Event = std::convert::Infallible;

    /// Renders one batch (at most one write's worth of events) at a time.
    fn refill(&mut self, _outbox: &Outbox<SseItem>, out: &mut VecDeque<(Bytes, usize)>) {
        self.stream.render_next(&mut self.items, out);
    }

    /// Queues the `disconnect` event that ends a stream, after what is pending, except for a
    /// slow consumer (4008), whose pending events are dropped (it resumes from its last id).
    fn finish(&mut self, outbox: &Outbox<SseItem>, close: Close, _wire_open: bool) {
        let Close::Server(code) = close else {
            // A client closes an event stream by going away: nothing to tell it.
            outbox.finish([], close.drops_pending());
            return;
        };
        let event = sse::encode_disconnect_event(code.as_u16(), code.reason(), code.reconnect());
        outbox.finish([stream_event(Bytes::from(event))], close.drops_pending());
    }

    fn ping(&mut self, outbox: &Outbox<SseItem>, now: Instant) -> Result<Instant, CloseCode> {
        outbox.push_final(stream_event(Bytes::from_static(sse::PING)));
        Ok(now + self.interval)
    }

    fn drop_taken(&mut self) -> usize {
        self.items.drain(..).map(|i| i.wire_len()).sum()
    }

    fn event(&mut self) -> impl std::future::Future<Output = Self::Event> + Send {
        std::future::pending()
    }

    /// The `disconnect` event is rendered: nothing follows it.
    fn ended(&self) -> bool {
        self.stream.renderer.ended
    }
}

/// True when the first bytes of a request are `GET /sse` followed by `?` or a space.
pub(crate) fn is_sse_request(head: &[u8]) -> bool {
    head.len() >= 9 && head.starts_with(b"GET /sse") && matches!(head[8], b'?' | b' ')
}

/// Reads a request head from the raw socket, after the `read` bytes already read from it:
/// (path-and-query, Last-Event-ID). A head over [`MAX_HEAD`] is refused with 431.
async fn read_head(
    stream: &mut TcpStream,
    mut buf: Vec<u8>,
) -> Result<(String, Option<String>, Option<String>), ApiError> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => {
                let path = req.path.unwrap_or("/").to_string();
                let header = |name: &str| {
                    req.headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case(name))
                        .and_then(|h| std::str::from_utf8(h.value).ok())
                        .map(str::to_string)
                };
                return Ok((path, header("last-event-id"), header("origin")));
            }
            Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => {
                return Err(ApiError::new(
                    431,
                    format!("request head larger than {} KiB", MAX_HEAD / 1024),
                ));
            }
            Ok(httparse::Status::Partial) => {}
            Err(e) => return Err(ApiError::bad_request(format!("malformed request: {e}"))),
        }
        let mut chunk = [0u8; 2048];
        let room = (MAX_HEAD - buf.len()).min(chunk.len());
        let n = stream
            .read(&mut chunk[..room])
            .await
            .map_err(|e| ApiError::bad_request(format!("read failed: {e}")))?;
        if n == 0 {
            return Err(ApiError::bad_request("connection closed before the request head ended"));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Serves one `GET /sse` on the raw socket, whose first bytes `prefix` the listener already
/// read: response head, then events until the client goes. The head must be complete by
/// `head_deadline`. `permit` is the connection's place under the socket cap, held until the
/// stream ends.
pub(crate) fn serve_raw(
    stream: TcpStream,
    prefix: Vec<u8>,
    permit: crate::socket::Permit,
    app: App,
    head_deadline: Instant,
) -> impl std::future::Future<Output = ()> + Send {
    // The set-up is boxed: inline it would sit in every idle stream's task.
    let open = Box::pin(open_raw(stream, prefix, app, head_deadline));
    async move {
        let _permit = permit;
        let Some(run) = open.await else { return };
        run.await;
    }
}

/// Reads the request head from the raw socket and opens the stream: the future serving it, or
/// `None` when the request was refused (and answered) or did not come in time.
async fn open_raw(
    mut stream: TcpStream,
    prefix: Vec<u8>,
    app: App,
    head_deadline: Instant,
) -> Option<impl std::future::Future<Output = ()> + Send> {
    let head = tokio::time::timeout_at(head_deadline, read_head(&mut stream, prefix)).await;
    let (path, last, origin) = match head {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            write_error(&mut stream, e).await;
            return None;
        }
        Err(_) => return None,
    };
    let query = path.split_once('?').map(|(_, q)| q);
    let request = SseRequest::parse(query, last, origin);
    let ip = stream.peer_addr().ok().map(|a| a.ip());
    let sse_stream = match SseStream::open(&app, request, ip).await {
        Ok(s) => s,
        Err(e) => {
            write_error(&mut stream, e).await;
            return None;
        }
    };
    let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n\
                access-control-allow-origin: *\r\nx-accel-buffering: no\r\nconnection: close\r\n\r\n";
    Some(serve(&app, sse_stream, stream, Some(head)))
}

/// Answers a refused raw `/sse` request with the JSON error and closes: the write side first,
/// then what the client still sends is read for a moment (closing with unread bytes would
/// reset the connection and could destroy the answer before the client reads it).
async fn write_error(stream: &mut TcpStream, e: ApiError) {
    use tokio::io::AsyncWriteExt;
    let body = serde_json::json!({"error": {"code": e.code, "message": e.message}}).to_string();
    let reason =
        StatusCode::from_u16(e.code).ok().and_then(|s| s.canonical_reason()).unwrap_or("Error");
    let response = format!(
        "HTTP/1.1 {} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         access-control-allow-origin: *\r\nconnection: close\r\n\r\n{body}",
        e.code,
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
    crate::socket::linger(stream).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_sse_requests() {
        assert!(is_sse_request(b"GET /sse?channel=a HTTP/1.1"));
        assert!(is_sse_request(b"GET /sse HTTP/1.1"));
        assert!(!is_sse_request(b"GET /sse2 HTTP/1.1"));
        assert!(!is_sse_request(b"POST /sse?channel=a"));
        assert!(!is_sse_request(b"GET /ss"));
    }

    fn pub_item(channel: &ChannelName, offset: u64, id_len: usize) -> SseItem {
        SseItem {
            channel: Some(channel.clone()),
            offset: Some(offset),
            epoch: Some(Arc::from("e")),
            body: Bytes::from(sse::encode_pub_event(channel.as_str(), Some(offset), b"1")),
            id_len,
        }
    }

    fn text(out: &VecDeque<(Bytes, usize)>) -> String {
        out.iter().map(|(b, _)| String::from_utf8_lossy(b).into_owned()).collect()
    }

    #[test]
    fn renders_one_batch_at_a_time_with_bounded_ids() {
        let channels: Vec<ChannelName> = (0..3)
            .map(|i| ChannelName::parse(&format!("{i}{}", "n".repeat(250))).unwrap())
            .collect();
        let mut r = Renderer::new(channels.clone());
        let mut items: VecDeque<SseItem> =
            (1..=1000).map(|o| pub_item(&channels[(o % 3) as usize], o, r.id_len)).collect();
        let queued: usize = items.iter().map(Item::wire_len).sum();
        let mut out = VecDeque::new();
        assert_eq!(r.render(&mut items, &mut out), 0);
        assert_eq!(out.len(), 2 * RENDER_EVENTS, "an id line and a body per event");
        assert_eq!(items.len(), 1000 - RENDER_EVENTS, "the rest waits unrendered");
        for (chunk, _) in out.iter().step_by(2) {
            assert!(chunk.starts_with(b"id: ~") && chunk.len() <= r.id_len, "{chunk:?}");
        }
        let mut accounted: usize = out.iter().map(|(_, n)| n).sum();
        while !items.is_empty() {
            out.clear();
            r.render(&mut items, &mut out);
            accounted += out.iter().map(|(_, n)| n).sum::<usize>();
        }
        assert_eq!(accounted, queued, "written chunks account for exactly what was queued");
    }

    #[test]
    fn nothing_is_rendered_after_the_disconnect_event() {
        let c = ChannelName::parse("c").unwrap();
        let mut r = Renderer::new(vec![c.clone()]);
        let disconnect = stream_event(Bytes::from(sse::encode_disconnect_event(4000, "x", true)));
        let late = pub_item(&c, 2, r.id_len);
        let late_len = late.wire_len();
        let mut items = VecDeque::from([pub_item(&c, 1, r.id_len), disconnect, late]);
        let mut out = VecDeque::new();
        assert_eq!(r.render(&mut items, &mut out), late_len);
        assert!(text(&out).ends_with(
            "event: disconnect\ndata: {\"code\":4000,\"reason\":\"x\",\"reconnect\":true}\n\n"
        ));
        let mut more = VecDeque::from([stream_event(Bytes::from_static(sse::PING))]);
        out.clear();
        assert_eq!(r.render(&mut more, &mut out), sse::PING.len());
        assert!(out.is_empty());
    }

    #[test]
    fn request_parsing() {
        let r =
            SseRequest::parse(Some("channel=a&channel=b%3Ax&token=t&last_event_id=q"), None, None);
        assert_eq!(r.channels, ["a", "b:x"]);
        assert_eq!(r.token.as_deref(), Some("t"));
        assert_eq!(r.last_event_id.as_deref(), Some("q"));
        let r = SseRequest::parse(Some("channel=a&last_event_id=q"), Some("h".into()), None);
        assert_eq!(r.last_event_id.as_deref(), Some("h"), "the header wins");
    }
}
