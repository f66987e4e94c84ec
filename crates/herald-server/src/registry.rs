//! The cluster as nodes see it: the node registry and cluster-wide actions.
//!
//! - Each node announces itself through the broker every [`ANNOUNCE_EVERY`], valid for three
//!   intervals, so `GET /api/info` on any node lists every live node and a dead one drops out
//!   within three intervals. With the memory broker the node is alone and lists itself.
//! - A disconnect by user (`POST /api/disconnect`) is applied on the node asked and sent to
//!   every other node as a control message ([`Control`]).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use herald_broker::ControlHandler;
use herald_core::node::Target;
use herald_core::Node;
use herald_protocol::CloseCode;

use bytes::Bytes;
use serde_json::{json, Value};

use crate::app::App;

/// How often a node announces itself.
pub const ANNOUNCE_EVERY: Duration = Duration::from_secs(2);

/// What a node says of itself (also its entry in `/api/info`).
pub fn node_info(app: &App) -> Value {
    let m = &app.node.metrics;
    json!({
        "id": app.node.id,
        "address": app.config.listen.to_string(),
        "version": env!("CARGO_PKG_VERSION"),
        "connections": m.connections.load(Ordering::Relaxed),
        "subscriptions": m.subscriptions.load(Ordering::Relaxed),
        "channels": m.channels.load(Ordering::Relaxed),
        "broker": app.node.broker.name(),
        "uptime_secs": app.started.elapsed().as_secs(),
        "publications": m.publications_in.load(Ordering::Relaxed),
        "deliveries": m.deliveries_out.load(Ordering::Relaxed),
    })
}

/// Every live node: this one as it is now, the others as they last announced themselves.
/// Alone (or when the broker cannot answer) the list holds this node only.
pub async fn nodes(app: &App) -> Vec<Value> {
    let own = node_info(app);
    let announced = match app.node.broker.nodes().await {
        Ok(Some(list)) => list,
        Ok(None) => return vec![own],
        Err(e) => {
            tracing::debug!(error = %e, "cannot list the cluster's nodes");
            return vec![own];
        }
    };
    let mut out = vec![own];
    for (id, info) in announced {
        if id == app.node.id {
            continue;
        }
        match serde_json::from_slice::<Value>(&info) {
            Ok(v) => out.push(v),
            Err(_) => out.push(json!({ "id": id })),
        }
    }
    out
}

/// Announces this node until shutdown.
pub async fn announce(app: App) {
    let mut tick = tokio::time::interval(ANNOUNCE_EVERY);
    loop {
        tokio::select! {
            _ = app.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let info = Bytes::from(node_info(&app).to_string());
        if let Err(e) = app.node.broker.announce(&app.node.id, info, ANNOUNCE_EVERY * 3).await {
            tracing::debug!(error = %e, "cannot announce this node");
        }
    }
}

/// A cluster-wide action, as sent between nodes (JSON).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Control {
    /// Close the connections of `user` (every connection when `None`) with `code`.
    Disconnect {
        /// The user; `None`: everyone.
        user: Option<String>,
        /// The close code.
        code: u16,
    },
}

impl Control {
    /// Applies the action on `node`; returns how many connections it closed.
    pub fn apply(&self, node: &Node) -> usize {
        match self {
            Control::Disconnect { user, code } => {
                let target = match user {
                    Some(u) => Target::User(u.clone()),
                    None => Target::All,
                };
                let code = CloseCode::from_u16(*code).unwrap_or(CloseCode::Shutdown);
                node.registry.disconnect(&target, code)
            }
        }
    }

    /// Applies the action here and sends it to every other node; returns how many
    /// connections it closed on this node.
    pub async fn run(&self, node: &Node) -> Result<usize, herald_broker::BrokerError> {
        let here = self.apply(node);
        let message = serde_json::to_vec(self).unwrap_or_default();
        node.broker.send_control(Bytes::from(message)).await?;
        Ok(here)
    }
}

/// The handler of other nodes' control messages for `node`.
pub fn control_handler(node: Weak<Node>) -> ControlHandler {
    Arc::new(move |message: &[u8]| {
        let Some(node) = node.upgrade() else { return };
        match serde_json::from_slice::<Control>(message) {
            Ok(control) => {
                let n = control.apply(&node);
                tracing::info!(?control, closed = n, "cluster control message applied");
            }
            Err(e) => tracing::warn!(error = %e, "undecodable control message"),
        }
    })
}
