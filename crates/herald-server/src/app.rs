//! The state every handler and connection task shares.

use std::sync::Arc;
use std::time::{Duration, Instant};

use herald_core::Node;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;

/// Shared state of a running server; cheap to clone.
#[derive(Clone, Debug)]
pub struct App {
    /// The engine.
    pub node: Arc<Node>,
    /// The validated configuration.
    pub config: Arc<Config>,
    /// Cancelled when the server shuts down: connections say `disconnect` 4000 and close.
    pub shutdown: CancellationToken,
    /// Tracks connection tasks so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// How long shutdown waits for connections to flush.
    pub shutdown_timeout: Duration,
    /// When the server started.
    pub started: Instant,
    /// The runtime serving HTTP requests (see [`crate::config::Config::api_threads`]); `None`:
    /// they are served on the current runtime.
    pub api: Option<tokio::runtime::Handle>,
}
