//! [`HttpApi`]: Herald's HTTP API (`/api/*`) over one kept-alive HTTP/1.1 connection, written
//! by hand (no HTTP library): for tests, and for the bench's publishers.
//!
//! ```no_run
//! # async fn run() -> Result<(), herald_client::ClientError> {
//! use herald_client::HttpApi;
//!
//! let mut api = HttpApi::connect("http://127.0.0.1:8080", Some("secret".into())).await?;
//! let answer = api.publish("news", &serde_json::json!({"text": "hi"})).await?;
//! println!("published at {}", answer["offset"]);
//! let (status, _headers, _body) = api.request("GET", "/healthz", None).await?;
//! assert_eq!(status, 200);
//! # Ok(()) }
//! ```

use std::time::Duration;

use herald_protocol::pb;
use prost::Message as _;
use serde_json::Value;
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;

use crate::error::ClientError;
use crate::http::{self, BodyLength, Url};

/// One status, the headers (names in lower case) and the body of a response.
pub type Response = (u16, Vec<(String, String)>, Vec<u8>);

/// A client of Herald's HTTP API over one keep-alive connection.
///
/// Requests go one at a time (`&mut self`). When the server has closed the idle connection,
/// the next request reconnects and is sent again, once.
#[derive(Debug)]
pub struct HttpApi {
    url: Url,
    /// `Authorization` header value, `Bearer <key>`.
    authorization: Option<String>,
    stream: Option<TcpStream>,
    /// Bytes read past the last response (normally none).
    buf: Vec<u8>,
    timeout: Option<Duration>,
}

impl HttpApi {
    /// Connects to `base` (`http://host:port`; a path in it is ignored), sending
    /// `Authorization: Bearer <api_key>` on every request when a key is given.
    pub async fn connect(base: &str, api_key: Option<String>) -> Result<HttpApi, ClientError> {
        let url = http::parse_url(base, "http", 80)?;
        let stream = http::connect_tcp(&url.host, url.port, None).await?;
        Ok(HttpApi {
            url,
            authorization: api_key.map(|key| format!("Bearer {key}")),
            stream: Some(stream),
            buf: Vec::new(),
            timeout: Some(Duration::from_secs(30)),
        })
    }

    /// Limits each request (default 30 s; `None`: no limit); beyond it, [`ClientError::Timeout`].
    pub fn with_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sends `method path` with `body` (as `application/json`) and reads the whole response,
    /// whatever its status. `path` starts with `/` and may hold a query.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<Response, ClientError> {
        self.request_as(JSON, method, path, body).await
    }

    /// [`HttpApi::request`] with a Protocol Buffers body (`Content-Type` and `Accept`:
    /// `application/x-protobuf`, messages of `proto/herald.proto`).
    pub async fn request_protobuf(
        &mut self,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Result<Response, ClientError> {
        self.request_as(PROTOBUF, method, path, Some(body)).await
    }

    async fn request_as(
        &mut self,
        media: &str,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<Response, ClientError> {
        let request = self.encode_request(media, method, path, body);
        let result = match self.timeout {
            Some(limit) => tokio::time::timeout(limit, self.exchange_with_retry(method, &request))
                .await
                .unwrap_or(Err(ClientError::Timeout)),
            None => self.exchange_with_retry(method, &request).await,
        };
        if result.is_err() {
            // The connection's state is unknown: start afresh next time.
            self.stream = None;
        }
        result
    }

    /// `POST /api/publish`; the answer (`{"offset": N, "epoch": "E"}` or `{}`), or
    /// [`ClientError::Reply`] with the status and the error's message.
    pub async fn publish(&mut self, channel: &str, data: &Value) -> Result<Value, ClientError> {
        let mut body = Vec::with_capacity(64);
        write_publication(&mut body, channel, data)?;
        self.json("POST", "/api/publish", Some(&body)).await
    }

    /// `POST /api/publish` of binary `data` as protobuf (`PublishRequest`); the answer
    /// (`PublishResult`), or [`ClientError::Reply`] with the status and the error's message.
    pub async fn publish_protobuf(
        &mut self,
        channel: &str,
        data: &[u8],
    ) -> Result<pb::PublishResult, ClientError> {
        let body =
            pb::PublishRequest { channel: channel.to_owned(), data: Some(data.to_vec().into()) };
        let (status, _, answer) =
            self.request_protobuf("POST", "/api/publish", &body.encode_to_vec()).await?;
        protobuf_answer(status, &answer)
    }

    /// `POST /api/batch` of `(channel, data)` pairs as protobuf (`BatchRequest`); the answer
    /// (`BatchResult`, one result per publication), or [`ClientError::Reply`].
    pub async fn batch_protobuf(
        &mut self,
        publications: &[(String, Vec<u8>)],
    ) -> Result<pb::BatchResult, ClientError> {
        let body = pb::BatchRequest {
            publications: publications
                .iter()
                .map(|(c, d)| pb::PublishRequest {
                    channel: c.clone(),
                    data: Some(d.clone().into()),
                })
                .collect(),
        };
        let (status, _, answer) =
            self.request_protobuf("POST", "/api/batch", &body.encode_to_vec()).await?;
        protobuf_answer(status, &answer)
    }

    /// `POST /api/batch` with `(channel, data)` pairs; the answer
    /// (`{"results": [...]}`, one result or error per publication), or [`ClientError::Reply`].
    pub async fn batch(&mut self, publications: &[(String, Value)]) -> Result<Value, ClientError> {
        let mut body = Vec::with_capacity(32 + 64 * publications.len());
        body.extend_from_slice(b"{\"publications\":[");
        for (i, (channel, data)) in publications.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            write_publication(&mut body, channel, data)?;
        }
        body.extend_from_slice(b"]}");
        self.json("POST", "/api/batch", Some(&body)).await
    }

    /// Any call answering JSON (e.g. `GET /api/history?channel=c`): the parsed body of a 2xx
    /// answer, or [`ClientError::Reply`] with the status and the error's message.
    pub async fn json(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<Value, ClientError> {
        let (status, _, body) = self.request(method, path, body).await?;
        json_answer(status, &body)
    }

    async fn exchange_with_retry(
        &mut self,
        method: &str,
        request: &[u8],
    ) -> Result<Response, ClientError> {
        let reused = self.stream.is_some();
        match self.exchange(method, request).await {
            // A kept-alive connection the server closed meanwhile: nothing of this request
            // was answered, so sending it again on a fresh connection is safe.
            Err(e) if reused && is_stale(&e) => {
                self.stream = None;
                self.exchange(method, request).await
            }
            other => other,
        }
    }

    async fn exchange(&mut self, method: &str, request: &[u8]) -> Result<Response, ClientError> {
        let stream = match &mut self.stream {
            Some(stream) => stream,
            None => {
                self.buf.clear();
                self.stream.insert(http::connect_tcp(&self.url.host, self.url.port, None).await?)
            }
        };
        stream.write_all(request).await?;
        let head = http::read_head(stream, &mut self.buf).await?;
        let length = http::body_length(&head, method)?;
        let body = http::read_body(stream, &mut self.buf, length).await?;
        if length == BodyLength::UntilEof || head.has_token("connection", "close") {
            self.stream = None;
        }
        Ok((head.status, head.headers, body))
    }

    fn encode_request(
        &self,
        media: &str,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Vec<u8> {
        let body_len = body.map_or(0, <[u8]>::len);
        let mut out = Vec::with_capacity(160 + path.len() + body_len);
        out.extend_from_slice(method.as_bytes());
        out.push(b' ');
        out.extend_from_slice(path.as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
        out.extend_from_slice(self.url.authority.as_bytes());
        out.extend_from_slice(b"\r\nAccept: ");
        out.extend_from_slice(media.as_bytes());
        out.extend_from_slice(b"\r\n");
        if let Some(auth) = &self.authorization {
            out.extend_from_slice(b"Authorization: ");
            out.extend_from_slice(auth.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        if let Some(body) = body {
            out.extend_from_slice(b"Content-Type: ");
            out.extend_from_slice(media.as_bytes());
            out.extend_from_slice(b"\r\nContent-Length: ");
            out.extend_from_slice(body.len().to_string().as_bytes());
            out.extend_from_slice(b"\r\n\r\n");
            out.extend_from_slice(body);
        } else {
            out.extend_from_slice(b"\r\n");
        }
        out
    }
}

/// True for the ways a request on a connection the server had already closed fails.
fn is_stale(e: &ClientError) -> bool {
    match e {
        ClientError::Closed => true,
        ClientError::Io(e) => matches!(
            e.kind(),
            std::io::ErrorKind::BrokenPipe
                | std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::ConnectionAborted
        ),
        _ => false,
    }
}

/// `{"channel":C,"data":D}`.
fn write_publication(out: &mut Vec<u8>, channel: &str, data: &Value) -> Result<(), ClientError> {
    let encode = |e: serde_json::Error| ClientError::Protocol(format!("cannot encode: {e}"));
    out.extend_from_slice(b"{\"channel\":");
    serde_json::to_writer(&mut *out, channel).map_err(encode)?;
    out.extend_from_slice(b",\"data\":");
    serde_json::to_writer(&mut *out, data).map_err(encode)?;
    out.push(b'}');
    Ok(())
}

/// The JSON of a 2xx answer, or the error of another.
/// The media type of JSON bodies.
const JSON: &str = "application/json";
/// The media type of Protocol Buffers bodies.
const PROTOBUF: &str = "application/x-protobuf";

/// A 2xx answer's protobuf message, or the error (a JSON body) as [`ClientError::Reply`].
fn protobuf_answer<T: prost::Message + Default>(
    status: u16,
    body: &[u8],
) -> Result<T, ClientError> {
    if (200..300).contains(&status) {
        return T::decode(body)
            .map_err(|e| ClientError::Protocol(format!("answer with status {status}: {e}")));
    }
    json_answer(status, body).map(|_| T::default())
}

fn json_answer(status: u16, body: &[u8]) -> Result<Value, ClientError> {
    if (200..300).contains(&status) {
        if body.is_empty() {
            return Ok(Value::Null);
        }
        return serde_json::from_slice(body)
            .map_err(|e| ClientError::Protocol(format!("answer with status {status}: {e}")));
    }
    let message = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("error")?.get("message")?.as_str().map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
    Err(ClientError::Reply { code: status, message })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;
    use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, BufReader};
    use tokio::net::TcpListener;

    #[test]
    fn maps_answers() {
        assert_eq!(json_answer(200, br#"{"offset":1}"#).unwrap(), json!({"offset": 1}));
        assert_eq!(json_answer(204, b"").unwrap(), Value::Null);
        match json_answer(413, br#"{"error":{"code":413,"message":"too large"}}"#) {
            Err(ClientError::Reply { code: 413, message }) => assert_eq!(message, "too large"),
            other => panic!("{other:?}"),
        }
        match json_answer(502, b"bad gateway") {
            Err(ClientError::Reply { code: 502, message }) => assert_eq!(message, "bad gateway"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(json_answer(200, b"{"), Err(ClientError::Protocol(_))));
    }

    /// Reads one request (head and Content-Length body) from a fake server's side.
    async fn read_request(r: &mut BufReader<TcpStream>) -> Option<(String, Vec<u8>)> {
        let mut head = String::new();
        let mut len = 0;
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).await.unwrap() == 0 {
                return None;
            }
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap();
            }
            head.push_str(&line);
        }
        let mut body = vec![0; len];
        r.read_exact(&mut body).await.unwrap();
        Some((head, body))
    }

    #[tokio::test]
    async fn keeps_alive_and_reconnects() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let mut seen = Vec::new();
            // First connection: two requests, then the server closes it.
            for round in 0..2 {
                let (socket, _) = listener.accept().await.unwrap();
                let mut r = BufReader::new(socket);
                let requests = if round == 0 { 2 } else { 1 };
                for _ in 0..requests {
                    let (head, body) = read_request(&mut r).await.unwrap();
                    seen.push((head, body));
                    let answer = if seen.len() == 2 {
                        let body = r#"{"error":{"code":400,"message":"bad channel"}}"#;
                        format!(
                            "HTTP/1.1 400 Bad Request\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        )
                    } else {
                        "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nc\r\n{\"offset\":1}\r\n0\r\n\r\n".to_owned()
                    };
                    r.get_mut().write_all(answer.as_bytes()).await.unwrap();
                }
            }
            seen
        });
        let mut api = HttpApi::connect(&base, Some("k".into())).await.unwrap();
        assert_eq!(api.publish("c", &json!({"x": 1})).await.unwrap(), json!({"offset": 1}));
        match api.batch(&[("bad name".into(), json!(null))]).await {
            Err(ClientError::Reply { code: 400, message }) => assert_eq!(message, "bad channel"),
            other => panic!("{other:?}"),
        }
        // The server closed the first connection: this one goes over a new one.
        let (status, headers, body) = api.request("GET", "/api/info", None).await.unwrap();
        assert_eq!((status, &body[..]), (200, &br#"{"offset":1}"#[..]));
        assert_eq!(headers, [("transfer-encoding".to_owned(), "chunked".to_owned())]);
        let seen = server.await.unwrap();
        assert!(seen[0].0.starts_with("POST /api/publish HTTP/1.1\r\n"));
        assert!(seen[0].0.contains("Authorization: Bearer k\r\n"));
        assert_eq!(seen[0].1, br#"{"channel":"c","data":{"x":1}}"#);
        assert_eq!(seen[1].1, br#"{"publications":[{"channel":"bad name","data":null}]}"#);
        assert!(seen[2].0.starts_with("GET /api/info HTTP/1.1\r\n"));
    }
}
