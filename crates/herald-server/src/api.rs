//! The HTTP API (`/api/*`), health, readiness and metrics endpoints.
//!
//! Every error is an [`ApiError`]: a status and `{"error": {"code": C, "message": "..."}}`.
//! Bad input is a 4xx naming the problem, never a 500.

use std::borrow::Cow;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use herald_protocol::{pb, ChannelName, ErrorCode, StreamPosition};
use http::{header, HeaderMap};
use http_body_util::BodyExt;
use prost::Message as _;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::app::App;
pub use crate::error::ApiError;

/// The router of every HTTP endpoint, `/ws` included.
pub fn router(app: App) -> Router {
    let api = Router::new()
        .route("/publish", post(publish))
        .route("/batch", post(batch))
        .route("/channels", get(channels))
        .route("/info", get(info))
        .route("/history", get(history))
        .route("/disconnect", post(disconnect))
        .layer(axum::middleware::from_fn_with_state(app.clone(), require_api_key));
    Router::new()
        .route("/ws", get(crate::ws::upgrade))
        .route("/sse", get(crate::sse::handler).options(crate::sse::preflight))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .nest("/api", api)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(app)
}

async fn not_found(req: Request) -> ApiError {
    ApiError::new(404, format!("no such endpoint: {}", req.uri().path()))
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::new(405, format!("{} is not allowed on {}", req.method(), req.uri().path()))
}

async fn require_api_key(State(app): State<App>, req: Request, next: Next) -> Response {
    let keys = &app.config.api_keys;
    if !keys.is_empty() {
        let given = req.headers().get(header::AUTHORIZATION).map(|v| v.as_bytes());
        if !crate::auth::is_any_api_key_valid(keys, given) {
            app.node.metrics.error(ErrorCode::Unauthenticated);
            return ApiError::new(401, "missing or wrong API key (Authorization: Bearer <key>)")
                .into_response();
        }
    }
    let response = next.run(req).await;
    if !response.status().is_success() {
        if let Some(code) = ErrorCode::ALL.iter().find(|c| c.as_u16() == response.status().as_u16())
        {
            app.node.metrics.error(*code);
        }
    }
    response
}

/// Reads a body of at most `max` bytes; beyond: 413.
async fn read_body(app: &App, body: Body) -> Result<Bytes, ApiError> {
    let max = app.config.max_body_bytes;
    match http_body_util::Limited::new(body, max).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            app.node.metrics.limit(herald_core::metrics::LimitKind::BodySize);
            Err(ApiError::new(413, format!("request body is larger than {max} bytes")))
        }
        Err(e) => Err(ApiError::bad_request(format!("could not read the request body: {e}"))),
    }
}

/// One publication as the API takes it.
#[derive(Deserialize)]
struct PublicationIn<'a> {
    #[serde(borrow)]
    channel: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "present")]
    data: Option<&'a RawValue>,
    /// Binary data, base64 (instead of `data`).
    #[serde(borrow, default)]
    b64data: Option<Cow<'a, str>>,
}

/// Deserializes a field that is present (even as `null`) as `Some`.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue as Deserialize>::deserialize(d).map(Some)
}

#[derive(Deserialize)]
struct BatchIn<'a> {
    /// Each item is parsed on its own, so one bad item fails alone.
    #[serde(borrow)]
    publications: Option<Vec<&'a RawValue>>,
}

fn json_error(e: serde_json::Error) -> ApiError {
    ApiError::bad_request(format!("malformed JSON: {e}"))
}

/// Parses a request body that must be a JSON object.
fn parse_object<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, ApiError> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        return Err(ApiError::bad_request("the body must be a JSON object"));
    }
    serde_json::from_slice(body).map_err(json_error)
}

fn parse_channel(channel: Option<&str>) -> Result<ChannelName, ApiError> {
    let channel = channel
        .filter(|c| !c.is_empty())
        .ok_or_else(|| ApiError::bad_request("`channel` is missing"))?;
    ChannelName::parse(channel).map_err(|e| ApiError::bad_request(format!("bad `channel`: {e}")))
}

/// A JSON publication: its channel and data (`data` as JSON text, or `b64data` decoded).
fn parse_publication(p: &PublicationIn<'_>) -> Result<(ChannelName, Bytes), ApiError> {
    let channel = parse_channel(p.channel.as_deref())?;
    // `b64data` with `data` absent or `null` (the shape the server writes); `data` alone is any
    // JSON value, `null` included.
    let data = match (p.data, p.b64data.as_deref()) {
        (Some(data), None) => Bytes::copy_from_slice(data.get().as_bytes()),
        (None, Some(b64)) => base64_data(b64)?,
        (Some(data), Some(b64)) if data.get() == "null" => base64_data(b64)?,
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request("give one of `data` and `b64data`, not both"))
        }
        (None, None) => return Err(ApiError::bad_request("`data` is missing")),
    };
    Ok((channel, data))
}

/// `b64data`: standard base64, padding optional.
fn base64_data(text: &str) -> Result<Bytes, ApiError> {
    herald_protocol::json::decode_base64(text.as_bytes())
        .map(Bytes::from)
        .map_err(|e| ApiError::bad_request(format!("bad `b64data` (standard base64): {e}")))
}

/// The media type of Protocol Buffers bodies (messages of `proto/herald.proto`).
const PROTOBUF: &str = "application/x-protobuf";

/// True when a header's media type (parameters aside) is protobuf.
fn is_protobuf(value: Option<&http::HeaderValue>) -> bool {
    let Some(value) = value.and_then(|v| v.to_str().ok()) else { return false };
    value.split(',').any(|t| {
        let media = t.split(';').next().unwrap_or("").trim();
        media.eq_ignore_ascii_case(PROTOBUF) || media.eq_ignore_ascii_case("application/protobuf")
    })
}

/// The body is protobuf (`Content-Type: application/x-protobuf`).
fn protobuf_body(headers: &HeaderMap) -> bool {
    is_protobuf(headers.get(header::CONTENT_TYPE))
}

fn protobuf_error(e: prost::DecodeError) -> ApiError {
    ApiError::bad_request(format!("malformed protobuf body: {e}"))
}

/// A protobuf publication: its channel and data.
///
/// The data is copied out: decoded from the body's `Bytes`, it would be a view keeping the
/// whole request body alive for as long as history holds the publication.
fn parse_pb_publication(p: pb::PublishRequest) -> Result<(ChannelName, Bytes), ApiError> {
    let channel = parse_channel(Some(&p.channel))?;
    let data = p.data.ok_or_else(|| ApiError::bad_request("`data` is missing"))?;
    Ok((channel, Bytes::copy_from_slice(&data)))
}

/// The publications a protobuf `BatchRequest` holds, counted without decoding them (field 1
/// occurrences; other fields skipped); `Err` when the body is not a valid message.
fn count_pb_publications(body: &[u8]) -> Result<usize, prost::DecodeError> {
    use prost::encoding::{decode_key, skip_field, DecodeContext};
    let mut buf = body;
    let mut count = 0;
    while !buf.is_empty() {
        let (tag, wire_type) = decode_key(&mut buf)?;
        if tag == 1 {
            count += 1;
        }
        skip_field(wire_type, tag, &mut buf, DecodeContext::default())?;
    }
    Ok(count)
}

/// What one publication became: its position, or why it failed.
type Outcome = Result<Option<StreamPosition>, ApiError>;

/// The answer to a publish: protobuf when the request's `Accept` names it, JSON otherwise
/// (each built only when chosen).
fn answer<T: prost::Message>(
    headers: &HeaderMap,
    json: impl FnOnce() -> serde_json::Value,
    pb: impl FnOnce() -> T,
) -> Response {
    if is_protobuf(headers.get(header::ACCEPT)) {
        ([(header::CONTENT_TYPE, PROTOBUF)], pb().encode_to_vec()).into_response()
    } else {
        axum::Json(json()).into_response()
    }
}

fn outcome_json(outcome: &Outcome) -> serde_json::Value {
    match outcome {
        Ok(Some(p)) => serde_json::json!({"offset": p.offset, "epoch": p.epoch}),
        Ok(None) => serde_json::json!({}),
        Err(e) => e.body(),
    }
}

fn outcome_pb(outcome: Outcome) -> pb::PublishResult {
    match outcome {
        Ok(Some(p)) => {
            pb::PublishResult { offset: Some(p.offset), epoch: Some(p.epoch), error: None }
        }
        Ok(None) => pb::PublishResult::default(),
        Err(e) => pb::PublishResult {
            offset: None,
            epoch: None,
            error: Some(pb::Error { code: u32::from(e.code), message: e.message }),
        },
    }
}

async fn publish(
    State(app): State<App>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let body = read_body(&app, body).await?;
    let (channel, data) = if protobuf_body(&headers) {
        parse_pb_publication(pb::PublishRequest::decode(&body[..]).map_err(protobuf_error)?)?
    } else {
        parse_publication(&parse_object::<PublicationIn<'_>>(&body)?)?
    };
    let outcome: Outcome = Ok(app.node.publish(&channel, data).await?);
    Ok(answer(&headers, || outcome_json(&outcome), || outcome_pb(outcome.clone())))
}

async fn batch(
    State(app): State<App>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let body = read_body(&app, body).await?;
    let max = app.node.limits.max_batch_publications;
    let too_many = |n: usize| {
        app.node.metrics.limit(herald_core::metrics::LimitKind::BatchSize);
        ApiError::new(413, format!("a batch holds at most {max} publications, this one {n}"))
    };
    // Parsed first; the valid ones go to the node together (pipelined to a networked broker).
    let parsed: Vec<Result<(ChannelName, Bytes), ApiError>> = if protobuf_body(&headers) {
        // Counted before decoding: a body of many tiny publications would otherwise grow into
        // a vector many times its size before the bound refuses it.
        let count = count_pb_publications(&body).map_err(protobuf_error)?;
        if count > max {
            return Err(too_many(count));
        }
        let batch = pb::BatchRequest::decode(&body[..]).map_err(protobuf_error)?;
        batch.publications.into_iter().map(parse_pb_publication).collect()
    } else {
        let batch: BatchIn<'_> = parse_object(&body)?;
        let publications =
            batch.publications.ok_or_else(|| ApiError::bad_request("`publications` is missing"))?;
        if publications.len() > max {
            return Err(too_many(publications.len()));
        }
        publications
            .iter()
            .map(|item| {
                let p = serde_json::from_str::<PublicationIn<'_>>(item.get())
                    .map_err(|e| ApiError::bad_request(format!("bad publication: {e}")))?;
                parse_publication(&p)
            })
            .collect()
    };
    let valid: Vec<(ChannelName, Bytes)> =
        parsed.iter().filter_map(|r| r.as_ref().ok().cloned()).collect();
    let mut published = app.node.publish_many(valid).await.into_iter();
    let mut outcomes: Vec<Outcome> = Vec::with_capacity(parsed.len());
    for item in parsed {
        let outcome = match item {
            Ok(_) => match published.next() {
                Some(Ok(position)) => Ok(position),
                Some(Err(e)) => Err(ApiError::from(e)),
                None => Err(ApiError::new(500, "a publication has no result")),
            },
            Err(e) => Err(e),
        };
        if let Err(e) = &outcome {
            app.node.metrics.error(
                ErrorCode::ALL
                    .into_iter()
                    .find(|c| c.as_u16() == e.code)
                    .unwrap_or(ErrorCode::BadRequest),
            );
        }
        outcomes.push(outcome);
    }
    let json =
        || serde_json::json!({ "results": outcomes.iter().map(outcome_json).collect::<Vec<_>>() });
    let pb = || pb::BatchResult { results: outcomes.iter().cloned().map(outcome_pb).collect() };
    Ok(answer(&headers, json, pb))
}

/// Query of `GET /api/history`.
#[derive(Deserialize)]
struct HistoryParams {
    channel: Option<String>,
    since_offset: Option<String>,
    since_epoch: Option<String>,
    limit: Option<String>,
}

async fn history(
    State(app): State<App>,
    query: Result<axum::extract::Query<HistoryParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let axum::extract::Query(q) =
        query.map_err(|e| ApiError::bad_request(format!("bad query: {e}")))?;
    let channel = q.channel.ok_or_else(|| ApiError::bad_request("`channel` is missing"))?;
    let channel = ChannelName::parse(&channel)
        .map_err(|e| ApiError::bad_request(format!("bad `channel`: {e}")))?;
    let options = app.node.options(&channel)?;
    let since = match (q.since_offset, q.since_epoch) {
        (None, None) => None,
        (Some(offset), Some(epoch)) => Some(herald_protocol::StreamPosition {
            offset: offset.parse().map_err(|_| {
                ApiError::bad_request(format!("`since_offset` is not an integer: {offset:?}"))
            })?,
            epoch,
        }),
        _ => {
            return Err(ApiError::bad_request("`since_offset` and `since_epoch` go together"));
        }
    };
    let limit = match q.limit {
        None => None,
        Some(l) => Some(
            l.parse::<usize>()
                .map_err(|_| ApiError::bad_request(format!("`limit` is not an integer: {l:?}")))?,
        ),
    };
    let query = herald_broker::HistoryQuery { since, limit };
    let limits = &app.node.limits;
    let bounds = herald_broker::PageBounds {
        max_publications: limits.max_history_page,
        max_bytes: limits.max_history_page_bytes,
    };
    let page = app
        .node
        .broker
        .history_page(&channel, &options.publish_options(), &query, bounds)
        .await
        .map_err(|e| ApiError::new(503, e.to_string()))?;
    let refs: Vec<herald_protocol::push::PublicationRef<'_>> = page
        .publications
        .iter()
        .map(|p| herald_protocol::push::PublicationRef { offset: p.offset, data: &p.data })
        .collect();
    let body = herald_protocol::push::encode_history_body(page.position.as_ref(), &refs, page.more);
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

#[derive(Deserialize)]
struct DisconnectIn {
    user: Option<String>,
    #[serde(default)]
    all: bool,
    code: Option<u16>,
}

/// `POST /api/disconnect`: `{"user": "U"}` or `{"all": true}`, optional `code` (default 4000).
async fn disconnect(
    State(app): State<App>,
    body: Body,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let body = read_body(&app, body).await?;
    let req: DisconnectIn = parse_object(&body)?;
    let user = match (req.user, req.all) {
        (Some(user), false) => Some(user),
        (None, true) => None,
        _ => return Err(ApiError::bad_request("give either `user` or `\"all\": true`")),
    };
    let code = match req.code {
        None => herald_protocol::CloseCode::Shutdown,
        Some(c) => herald_protocol::CloseCode::from_u16(c).ok_or_else(|| {
            ApiError::bad_request(format!("`code` {c} is not a Herald close code"))
        })?,
    };
    // Here, and on every other node of the cluster.
    let control = crate::registry::Control::Disconnect { user, code: code.as_u16() };
    let n = control.run(&app.node).await.map_err(|e| ApiError::new(503, e.to_string()))?;
    Ok(axum::Json(serde_json::json!({ "disconnected": n })))
}

/// `GET /api/channels`: this node's channels and local subscribers. In a cluster the answer
/// says so (`"scope": "node"` and the node's id); the other nodes answer for themselves.
async fn channels(State(app): State<App>) -> axum::Json<serde_json::Value> {
    let channels: Vec<serde_json::Value> = app
        .node
        .hub
        .channels()
        .into_iter()
        .map(|(c, n)| serde_json::json!({"channel": c.as_str(), "subscribers": n}))
        .collect();
    if app.node.broker.name() == "memory" {
        return axum::Json(serde_json::json!({ "channels": channels }));
    }
    axum::Json(serde_json::json!({ "channels": channels, "scope": "node", "node": app.node.id }))
}

/// This node first, then every other live node of the cluster (see [`crate::registry`]).
async fn info(State(app): State<App>) -> axum::Json<serde_json::Value> {
    let mut info = serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "nodes": crate::registry::nodes(&app).await,
    });
    if app.config.insecure {
        // Said where operators look: the node was started without the secure default.
        info["insecure"] = serde_json::Value::Bool(true);
    }
    axum::Json(info)
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(app): State<App>) -> Response {
    if app.node.broker.is_ready() && !app.shutdown.is_cancelled() {
        "ready\n".into_response()
    } else {
        ApiError::new(503, "broker not connected").into_response()
    }
}

async fn metrics(State(app): State<App>) -> Response {
    let mut text = app.node.metrics.render();
    let h = app.node.broker.history_stats();
    for (name, help, value) in [
        (
            "herald_history_streams",
            "Channels with stream state (epoch, offsets, history).",
            h.streams,
        ),
        ("herald_history_publications", "Publications retained in history.", h.publications),
        ("herald_history_bytes", "Bytes of publication data retained in history.", h.bytes),
    ] {
        text.push_str(&format!("# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}\n"));
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}
