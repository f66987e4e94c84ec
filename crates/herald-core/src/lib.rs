//! Herald's engine, without sockets.
//!
//! - [`auth`]: connection tokens as the engine sees them ([`TokenVerifier`], [`VerifiedToken`]);
//! - [`options`]: per-channel options resolved from namespaces;
//! - [`queue`]: the bounded outbound queue of one connection ([`Outbox`]);
//! - [`hub`]: channel -> subscribers, sharded; encodes a publication once and queues the same
//!   bytes to every subscriber;
//! - [`node`]: what every connection shares (hub, broker, options, metrics) and the publish path;
//! - [`session`]: one WebSocket connection's command state machine;
//! - [`metrics`]: counters rendered by the server as Prometheus text.

pub mod auth;
pub mod hub;
pub mod metrics;
pub mod node;
pub mod options;
pub mod queue;
pub mod session;

pub use auth::{TokenError, TokenVerifier, VerifiedToken};
pub use hub::Hub;
pub use metrics::Metrics;
pub use node::{Node, PublishError};
pub use options::{ChannelOptions, Namespaces};
pub use queue::{Outbox, PushError, QueueLimits};
pub use session::Session;
