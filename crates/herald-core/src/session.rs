//! One WebSocket connection's command state machine.
//!
//! [`Session::handle_message`] takes one inbound WebSocket message (one or more commands in the
//! connection's [`WireFormat`]), applies each and queues the replies, encoded by the format's
//! codec and framed, into the connection's [`Outbox`].
//! It never touches a socket: the transport reads frames, calls the session and writes whatever
//! the outbox holds. A command that must end the connection returns the close code.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use herald_broker::{HistoryPage, HistoryQuery, PageBounds, PublishOptions};
use herald_protocol::json::DecodeError;
use herald_protocol::push::{PublicationRef, ReplyOk};
use herald_protocol::{
    ws, ChannelName, CloseCode, Command, CommandKind, ErrorCode, StreamPosition, WireFormat,
};

use crate::auth::VerifiedToken;
use crate::hub::Sink;
use crate::metrics::LimitKind;
use crate::node::ConnectionLimit;
use crate::node::Node;
use crate::options::ChannelOptions;
use crate::queue::{Outbox, PushError};

/// A reply ready to frame: ok body or error.
enum Reply {
    /// A complete reply in the connection's format.
    Ok(Vec<u8>),
    Error(ErrorCode, String),
}

/// The state of one WebSocket connection (see the module docs).
#[derive(Debug)]
pub struct Session {
    node: Arc<Node>,
    id: u64,
    client: String,
    outbox: Arc<Outbox>,
    /// The connection's wire format (its subprotocol).
    format: WireFormat,
    user: Option<String>,
    /// When the connection's token expires (closed with 4012 then, unless refreshed).
    expires_at: Option<std::time::SystemTime>,
    /// Some command was handled (a later `connect` is refused).
    started: bool,
    /// The client used op `publish` (the transport may then serve it where publishers are
    /// served).
    published: bool,
    subscriptions: Vec<ChannelName>,
    /// Command rate bucket: tokens left, last refill.
    tokens: f32,
    refilled: std::time::Instant,
    /// Commands refused in a row by the rate limit.
    refused: u32,
}

impl Session {
    /// A session for a new connection speaking `format`, authenticated by `token` when the
    /// upgrade carried one.
    pub fn new(
        node: Arc<Node>,
        outbox: Arc<Outbox>,
        token: Option<VerifiedToken>,
        format: WireFormat,
    ) -> Self {
        let id = node.next_connection_id();
        let client = format!("{}-{}", node.id, id);
        let tokens = node.limits.command_burst as f32;
        Session {
            node,
            id,
            client,
            outbox,
            format,
            expires_at: token.as_ref().and_then(|t| t.expires_at),
            user: token.map(|t| t.user),
            started: false,
            published: false,
            subscriptions: Vec::new(),
            tokens,
            refilled: std::time::Instant::now(),
            refused: 0,
        }
    }

    /// True once the client published (op `publish`, allowed by its namespace).
    pub fn has_published(&self) -> bool {
        self.published
    }

    /// Registers the connection (from `ip`) with the node, enforcing the connection limits;
    /// on `Err` the transport closes with 4029.
    pub fn register(&self, ip: Option<std::net::IpAddr>) -> Result<(), ConnectionLimit> {
        let node = &self.node;
        let sink = Sink::Ws(self.outbox.clone(), self.format);
        node.registry
            .register(self.id, self.user.as_deref(), self.expires_at, ip, sink, &node.limits)
            .inspect_err(|e| {
                node.metrics.limit(e.kind());
            })
    }

    /// Takes one command from the rate bucket: `Ok(true)` to go on, `Ok(false)` to refuse it
    /// with 429, `Err` (4029) when the client keeps sending while refused.
    fn take_token(&mut self) -> Result<bool, CloseCode> {
        let limits = &self.node.limits;
        let now = std::time::Instant::now();
        let elapsed = now.duration_since(self.refilled).as_secs_f32();
        self.refilled = now;
        self.tokens =
            (self.tokens + elapsed * limits.command_rate as f32).min(limits.command_burst as f32);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            self.refused = 0;
            return Ok(true);
        }
        self.node.metrics.limit(LimitKind::CommandRate);
        self.refused += 1;
        if self.refused > limits.command_burst.max(1) {
            return Err(CloseCode::LimitReached);
        }
        Ok(false)
    }

    /// The connection's id within the node.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The client id announced in the `connect` reply.
    pub fn client(&self) -> &str {
        &self.client
    }

    /// Channels this connection subscribes to.
    pub fn subscriptions(&self) -> &[ChannelName] {
        &self.subscriptions
    }

    /// The connection's wire format.
    pub fn format(&self) -> WireFormat {
        self.format
    }

    /// Applies every command of one inbound message (in the connection's format), queueing
    /// replies. Returns the close code when the connection must end.
    pub async fn handle_message(&mut self, message: &[u8]) -> Result<(), CloseCode> {
        for decoded in self.format.codec().decode_commands(message) {
            match decoded {
                Ok(cmd) => self.handle(cmd).await?,
                Err(DecodeError::Reply { id, code, message }) => {
                    // A command it was, if a bad one: a later `connect` is not the first.
                    self.started = true;
                    // Its reply costs what any reply does: the same wait for room and the same
                    // token, so a frame of tiny bad commands cannot queue replies many times its
                    // size past the rate limit.
                    self.outbox.wait_room().await;
                    let reply = if self.take_token()? {
                        Reply::Error(code, message)
                    } else {
                        Reply::Error(ErrorCode::LimitReached, self.rate_message())
                    };
                    self.reply(id, reply)?;
                }
                Err(DecodeError::Fatal { message }) => {
                    tracing::debug!(conn = self.id, %message, "protocol error");
                    return Err(CloseCode::ProtocolError);
                }
            }
        }
        Ok(())
    }

    /// Applies one command.
    pub async fn handle(&mut self, cmd: Command) -> Result<(), CloseCode> {
        if cmd.id.is_some() {
            // A client that asks for more than it reads waits here (its writer drains
            // meanwhile) instead of growing its queue until it is cut.
            self.outbox.wait_room().await;
        }
        let first = !self.started;
        self.started = true;
        let allowed = self.take_token()?;
        let Some(id) = cmd.id else {
            // Only `pong` comes without id; liveness is tracked by the transport.
            return Ok(());
        };
        let needs_auth = !matches!(cmd.kind, CommandKind::Connect { .. });
        if needs_auth && self.user.is_none() && !self.node.auth.allow_anonymous {
            let message = "anonymous connections are not allowed: connect with a token first";
            return self.reply(id, Reply::Error(ErrorCode::Unauthenticated, message.into()));
        }
        if !allowed {
            return self.reply(id, Reply::Error(ErrorCode::LimitReached, self.rate_message()));
        }
        let reply = match cmd.kind {
            CommandKind::Pong => return Ok(()),
            CommandKind::Connect { token } => {
                if !first {
                    Reply::Error(ErrorCode::BadRequest, "connect must be the first command".into())
                } else {
                    self.connect(id, token)?
                }
            }
            CommandKind::Subscribe { channel, since } => {
                match self.subscribe(id, channel, since).await {
                    Ok(()) => return Ok(()),
                    Err(reply) => reply,
                }
            }
            CommandKind::Unsubscribe { channel } => self.unsubscribe(id, &channel).await,
            CommandKind::Publish { channel, data } => self.publish(id, &channel, data).await,
            CommandKind::History { channel, since, limit } => {
                self.history(id, &channel, since, limit).await
            }
            CommandKind::Refresh { token } => self.refresh(id, &token),
        };
        self.reply(id, reply)
    }

    /// The message of a command refused by the rate limit.
    fn rate_message(&self) -> String {
        let limits = &self.node.limits;
        format!(
            "command rate over {} per second (burst {}): slow down",
            limits.command_rate, limits.command_burst
        )
    }

    fn connect(&mut self, id: u32, token: Option<String>) -> Result<Reply, CloseCode> {
        match token {
            Some(token) => {
                let verifier = self.node.auth.verifier.as_ref().ok_or(CloseCode::InvalidToken)?;
                match verifier.verify(&token) {
                    Ok(VerifiedToken { user, expires_at }) => {
                        let node = &self.node;
                        if let Err(e) = node.registry.set_user(self.id, &user, &node.limits) {
                            node.metrics.limit(e.kind());
                            return Err(CloseCode::LimitReached);
                        }
                        node.registry.set_expiry(self.id, expires_at);
                        self.user = Some(user);
                        self.expires_at = expires_at;
                    }
                    Err(e) => {
                        tracing::debug!(conn = self.id, error = %e, "token refused");
                        return Err(CloseCode::InvalidToken);
                    }
                }
            }
            None if self.user.is_none() && !self.node.auth.allow_anonymous => {
                return Ok(Reply::Error(
                    ErrorCode::Unauthenticated,
                    "anonymous connections are not allowed: connect with a token".into(),
                ));
            }
            None => {}
        }
        let ok = ReplyOk::Connect {
            client: &self.client,
            ping_interval_ms: self.node.ping_interval.as_millis() as u64,
        };
        Ok(Reply::Ok(self.encode_ok(id, &ok)))
    }

    fn encode_ok(&self, id: u32, ok: &ReplyOk<'_>) -> Vec<u8> {
        self.format.codec().encode_reply_ok(id, ok)
    }

    /// `refresh`: replaces the connection's token with `token`, a valid token for the same
    /// user, moving its expiry. A bad token, or one for another user, is answered with 401 and
    /// changes nothing; so is a refresh on a connection that has no token.
    fn refresh(&mut self, id: u32, token: &str) -> Reply {
        let Some(user) = self.user.as_deref() else {
            return Reply::Error(
                ErrorCode::Unauthenticated,
                "this connection has no token to refresh: connect with a token".into(),
            );
        };
        let Some(verifier) = self.node.auth.verifier.as_ref() else {
            return Reply::Error(
                ErrorCode::Unauthenticated,
                "token authentication is not configured".into(),
            );
        };
        match verifier.verify(token) {
            Ok(verified) if verified.user == user => {
                self.node.registry.set_expiry(self.id, verified.expires_at);
                self.expires_at = verified.expires_at;
                Reply::Ok(self.encode_ok(id, &ReplyOk::Refresh))
            }
            Ok(_) => Reply::Error(
                ErrorCode::Unauthenticated,
                "the new token is for another user: refresh needs a token for the same user".into(),
            ),
            Err(e) => {
                tracing::debug!(conn = self.id, error = %e, "refresh token refused");
                Reply::Error(ErrorCode::Unauthenticated, e.to_string())
            }
        }
    }

    /// Checks that this connection may read `channel` (subscribe or history).
    fn check_read<'n>(
        &self,
        node: &'n Node,
        channel: &ChannelName,
    ) -> Result<&'n ChannelOptions, Reply> {
        let options = node.options(channel).map_err(|e| Reply::Error(e.code(), e.to_string()))?;
        let anonymous = self.user.is_none();
        if anonymous && (!options.anonymous_subscribe || !node.auth.allow_anonymous) {
            return Err(Reply::Error(
                ErrorCode::Unauthenticated,
                format!("anonymous connections may not subscribe to {channel}"),
            ));
        }
        if !channel.is_user_allowed(self.user.as_deref().unwrap_or("")) {
            return Err(Reply::Error(
                ErrorCode::PermissionDenied,
                format!("{channel} is limited to other users"),
            ));
        }
        Ok(options)
    }

    async fn subscribe(
        &mut self,
        id: u32,
        channel: ChannelName,
        since: Option<StreamPosition>,
    ) -> Result<(), Reply> {
        let node = self.node.clone();
        let options = self.check_read(&node, &channel)?;
        if self.subscriptions.contains(&channel) {
            return Err(Reply::Error(
                ErrorCode::AlreadySubscribed,
                format!("already subscribed to {channel}"),
            ));
        }
        let publish_options = options.publish_options();
        if self.subscriptions.len() >= node.limits.max_subscriptions_per_connection {
            node.metrics.limit(LimitKind::Subscriptions);
            return Err(Reply::Error(
                ErrorCode::LimitReached,
                format!(
                    "this connection holds its maximum of {} subscriptions",
                    node.limits.max_subscriptions_per_connection
                ),
            ));
        }
        let conflate = options.conflate;
        // Every joining subscriber waits until the node receives the channel (the broker call
        // returns at once when it already does).
        let sink = Sink::Ws(self.outbox.clone(), self.format);
        node.hub.subscribe_pending(&channel, self.id, sink, conflate);
        if let Err(e) = node.broker.subscribe(&channel).await {
            self.abandon(&channel).await;
            return Err(Reply::Error(ErrorCode::Unavailable, e.to_string()));
        }
        // With `since`: everything after it that history has; without: only the position.
        let query = HistoryQuery { limit: if since.is_some() { None } else { Some(0) }, since };
        let bounds = self.page_bounds();
        let page = match node.broker.history_page(&channel, &publish_options, &query, bounds).await
        {
            Ok(page) => page,
            Err(e) => {
                self.abandon(&channel).await;
                return Err(Reply::Error(ErrorCode::Unavailable, e.to_string()));
            }
        };
        let activated = match page.position.clone() {
            // More than a page to recover: the reply goes out in parts as the socket drains.
            Some(top) if page.more => {
                let recovery = Recovery { channel: &channel, options: &publish_options, bounds };
                self.stream_recovery(id, recovery, page, top).await
            }
            _ => {
                let recovered = query.since.is_some() && page.complete;
                let refs = publication_refs(&page);
                let position = page.position.as_ref();
                let ok = ReplyOk::Subscribe { position, recovered, publications: &refs };
                let frame = self.reply_frame(id, Reply::Ok(self.encode_ok(id, &ok)));
                let outbox = &self.outbox;
                node.hub.activate(&channel, self.id, position, |_| outbox.push_reply(frame))
            }
        };
        if activated.is_err() {
            // Cut (4008) or closing meanwhile: the subscription never went live.
            self.abandon(&channel).await;
            return Ok(());
        }
        node.metrics.subscriptions.fetch_add(1, Ordering::Relaxed);
        self.subscriptions.push(channel);
        Ok(())
    }

    /// Sends the reply to a `subscribe` whose recovery is larger than one history page: one
    /// message in parts (WebSocket fragments), a page per part, each page read once the parts
    /// before it have mostly drained, up to `top`, the channel's position when the first page
    /// was read. Live publications of the channel meanwhile wait in the hub (the subscription
    /// is pending); everything else queued to the connection waits in its outbox (see
    /// `Outbox::begin_message`). The last part and the subscription going live happen under
    /// the channel's lock, like a reply in one piece. A page that finds history trimmed past
    /// the last one sent, or the channel in another epoch, or the broker failing, ends the
    /// reply with what was sent and `recovered: false`.
    async fn stream_recovery(
        &self,
        id: u32,
        recovery: Recovery<'_>,
        first: HistoryPage,
        top: StreamPosition,
    ) -> Result<(), PushError> {
        let fragment = |opcode, payload: Vec<u8>, fin| {
            ws::encode_fragment(ws::Role::Server, opcode, &payload, fin)
        };
        let codec = self.format.codec();
        let mut recovered = first.complete;
        let mut last = first.publications.last().and_then(|p| p.offset);
        let head = codec.subscribe_head(id, &publication_refs(&first));
        let mut any = !first.publications.is_empty();
        drop(first);
        self.outbox.begin_message(fragment(self.format.opcode(), head, false))?;
        while let Some(after) = last.filter(|&o| o < top.offset) {
            self.outbox.wait_page_room().await;
            let since = StreamPosition { offset: after, epoch: top.epoch.clone() };
            let query = HistoryQuery { since: Some(since), limit: None };
            let node = &self.node;
            let page = match node
                .broker
                .history_page(recovery.channel, recovery.options, &query, recovery.bounds)
                .await
            {
                Ok(page) => page,
                Err(e) => {
                    tracing::debug!(conn = self.id, error = %e, "recovery page failed");
                    recovered = false;
                    break;
                }
            };
            if page.position.as_ref().map(|p| &p.epoch) != Some(&top.epoch) {
                // A new epoch since the first page: its publications are live ones (buffered).
                recovered = false;
                break;
            }
            recovered &= page.complete;
            let refs: Vec<PublicationRef<'_>> = publication_refs(&page)
                .into_iter()
                .filter(|p| p.offset.is_some_and(|o| o <= top.offset))
                .collect();
            let Some(newest) = refs.last().and_then(|p| p.offset) else { break };
            last = Some(newest);
            let part = codec.subscribe_more(id, &refs, !any);
            any = true;
            self.outbox.push_part(fragment(ws::Opcode::Continuation, part, false))?;
        }
        let tail = codec.subscribe_tail(id, Some(&top), recovered);
        let tail = fragment(ws::Opcode::Continuation, tail, true);
        let outbox = &self.outbox;
        self.node.hub.activate(recovery.channel, self.id, Some(&top), |_| outbox.end_message(tail))
    }

    /// The most one history page holds: bounded in count and bytes, and leaving half the queue
    /// for the publications that follow it.
    fn page_bounds(&self) -> PageBounds {
        let limits = &self.node.limits;
        PageBounds {
            max_publications: limits.max_history_page,
            max_bytes: limits.max_history_page_bytes.min(limits.max_queue_bytes / 2),
        }
    }

    /// Removes a subscription that never went live.
    async fn abandon(&self, channel: &ChannelName) {
        if self.node.hub.unsubscribe(channel, self.id) {
            let _ = self.node.broker.unsubscribe(channel).await;
        }
    }

    async fn unsubscribe(&mut self, id: u32, channel: &ChannelName) -> Reply {
        if let Some(i) = self.subscriptions.iter().position(|c| c == channel) {
            self.subscriptions.swap_remove(i);
            self.node.metrics.subscriptions.fetch_sub(1, Ordering::Relaxed);
            self.abandon(channel).await;
            // After leaving the hub: no publication can refill the slot behind the reply.
            self.outbox.drop_conflated(channel);
        }
        Reply::Ok(self.encode_ok(id, &ReplyOk::Unsubscribe))
    }

    async fn publish(&mut self, id: u32, channel: &ChannelName, data: Bytes) -> Reply {
        let options = match self.node.options(channel) {
            Ok(o) => o,
            Err(e) => return Reply::Error(e.code(), e.to_string()),
        };
        if !options.client_publish {
            return Reply::Error(
                ErrorCode::PermissionDenied,
                format!("clients may not publish to {channel}"),
            );
        }
        if !channel.is_user_allowed(self.user.as_deref().unwrap_or("")) {
            return Reply::Error(
                ErrorCode::PermissionDenied,
                format!("{channel} is limited to other users"),
            );
        }
        self.published = true;
        match self.node.publish(channel, data).await {
            Ok(position) => Reply::Ok(
                self.encode_ok(id, &ReplyOk::Publish { offset: position.map(|p| p.offset) }),
            ),
            Err(e) => Reply::Error(e.code(), e.to_string()),
        }
    }

    async fn history(
        &mut self,
        id: u32,
        channel: &ChannelName,
        since: Option<StreamPosition>,
        limit: Option<u64>,
    ) -> Reply {
        let node = self.node.clone();
        let options = match self.check_read(&node, channel) {
            Ok(o) => o,
            Err(reply) => return reply,
        };
        let limit = limit.map(|l| usize::try_from(l).unwrap_or(usize::MAX));
        let query = HistoryQuery { since, limit };
        let bounds = self.page_bounds();
        match node.broker.history_page(channel, &options.publish_options(), &query, bounds).await {
            Ok(page) => {
                let refs = publication_refs(&page);
                let ok = ReplyOk::History {
                    position: page.position.as_ref(),
                    publications: &refs,
                    more: page.more,
                };
                Reply::Ok(self.encode_ok(id, &ok))
            }
            Err(e) => Reply::Error(ErrorCode::Unavailable, e.to_string()),
        }
    }

    fn reply(&self, id: u32, reply: Reply) -> Result<(), CloseCode> {
        if let Reply::Error(code, _) = &reply {
            self.node.metrics.error(*code);
        }
        match self.outbox.push_reply(self.reply_frame(id, reply)) {
            Ok(()) => Ok(()),
            Err(PushError::Overflow) => Err(CloseCode::SlowConsumer),
            // Closing already: the transport is ending the connection.
            Err(PushError::Closed) => Ok(()),
        }
    }

    /// The WebSocket frame of a reply in the connection's format.
    fn reply_frame(&self, id: u32, reply: Reply) -> Bytes {
        let payload = match reply {
            Reply::Ok(payload) => payload,
            Reply::Error(code, message) => {
                self.format.codec().encode_reply_error(id, code, &message)
            }
        };
        ws::encode_frame(ws::Role::Server, self.format.opcode(), &payload)
    }

    /// Ends every subscription; called once when the connection ends.
    pub async fn close(&mut self) {
        self.node.registry.unregister(self.id);
        let channels = std::mem::take(&mut self.subscriptions);
        self.node.metrics.subscriptions.fetch_sub(channels.len() as i64, Ordering::Relaxed);
        for channel in &channels {
            self.abandon(channel).await;
        }
    }
}

/// What a streamed recovery reads its pages from.
struct Recovery<'a> {
    channel: &'a ChannelName,
    options: &'a PublishOptions,
    bounds: PageBounds,
}

/// The publications of a history page as the reply encoder takes them.
fn publication_refs(page: &HistoryPage) -> Vec<PublicationRef<'_>> {
    page.publications.iter().map(|p| PublicationRef { offset: p.offset, data: &p.data }).collect()
}
