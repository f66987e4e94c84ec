//! A lean Rust client for Herald: the WebSocket protocol (`herald.json`) and the HTTP API.
//!
//! Used by Herald's integration tests and by `herald-bench`, which opens thousands of
//! connections per process, so each connection costs one tokio task, one socket and small
//! buffers; nothing is allocated per message beyond what decoding needs.
//!
//! - [`Client`] / [`Events`]: one WebSocket connection (hand-written HTTP/1.1 upgrade over a
//!   [`tokio::net::TcpStream`], no TLS); requests matched to replies by id, pushes delivered
//!   in order through a bounded channel (backpressure: see [`ConnectOptions::event_capacity`]).
//! - [`HttpApi`]: `/api/*` calls over one keep-alive connection.
//!
//! ```no_run
//! # async fn run() -> Result<(), herald_client::ClientError> {
//! use herald_client::{Client, ConnectOptions, Event};
//!
//! let options = ConnectOptions { token: Some("jwt".into()), ..ConnectOptions::default() };
//! let (client, mut events, info) = Client::connect("ws://127.0.0.1:8080/ws", options).await?;
//! println!("connected as {}", info.map(|i| i.client).unwrap_or_default());
//! client.subscribe("chat:lobby", None).await?;
//! while let Some(event) = events.recv().await {
//!     match event {
//!         Event::Pub { data, .. } => println!("{data}"),
//!         Event::Closed { code, reason } => println!("closed: {code:?} {reason}"),
//!         _ => {}
//!     }
//! }
//! # Ok(()) }
//! ```

mod api;
mod client;
mod connection;
mod error;
mod http;

pub use api::{HttpApi, Response};
pub use client::{Client, ConnectInfo, ConnectOptions, Event, Events, Subscribed};
pub use error::ClientError;
pub use herald_protocol::json::ReplyError;
pub use herald_protocol::ws::Opcode;
pub use herald_protocol::StreamPosition;
