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
    /// WebSocket connections served on the API runtime because their clients publish (at
    /// most [`MAX_MOVED`]).
    pub moved: Arc<std::sync::atomic::AtomicUsize>,
}

/// Most WebSocket connections moved to the API runtime at once: beyond, publishing clients
/// stay where they are, so clients that publish once and then subscribe to busy channels
/// cannot fill the runtime that serves HTTP publishers and `/readyz`.
pub const MAX_MOVED: usize = 256;
