//! The Herald server: the WebSocket transport, the HTTP API, authentication and configuration.
//!
//! The `herald` binary (`main.rs`) parses flags, loads the [`config::Config`], builds the
//! [`herald_core::Node`] on a broker and runs [`listener::run`] until SIGTERM / SIGINT.

pub mod api;
pub mod app;
pub mod auth;
pub mod config;
pub mod listener;
pub mod socket;
pub mod sse;
pub mod ws;

use std::sync::Arc;

use herald_broker::{Broker, MemoryBroker};
use herald_core::node::AuthSettings;
use herald_core::{Node, TokenVerifier};

use crate::config::Config;

/// Why a node could not be built.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configured broker is not available in this build.
    #[error("config key `broker`: {0:?} is not supported yet (use \"memory\")")]
    UnsupportedBroker(String),
    /// The broker refused to start.
    #[error("broker failed to start: {0}")]
    Broker(#[from] herald_broker::BrokerError),
}

/// Builds and starts the node `config` describes.
pub async fn build_node(config: &Config) -> Result<Arc<Node>, StartError> {
    let broker: Arc<dyn Broker> = match config.broker.as_str() {
        "memory" => {
            let memory = Arc::new(MemoryBroker::new());
            spawn_stream_expiry(memory.clone(), config.namespace_options());
            memory
        }
        other => return Err(StartError::UnsupportedBroker(other.to_string())),
    };
    let verifier = config
        .auth
        .hmac_secret
        .as_ref()
        .map(|s| Arc::new(auth::HmacVerifier::new(s.as_bytes())) as Arc<dyn TokenVerifier>);
    let node_id = config.node_id.clone().unwrap_or_else(random_node_id);
    let node = Arc::new(Node::new(
        node_id,
        broker,
        config.namespace_options(),
        config.limits.clone(),
        config.ping_interval,
        AuthSettings { allow_anonymous: config.auth.allow_anonymous, verifier },
    ));
    node.start().await?;
    Ok(node)
}

/// Drops, every few seconds, the stream state of channels idle for longer than their TTL.
fn spawn_stream_expiry(broker: Arc<MemoryBroker>, namespaces: herald_core::Namespaces) {
    let weak = Arc::downgrade(&broker);
    drop(broker);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            tick.tick().await;
            let Some(broker) = weak.upgrade() else { return };
            broker.expire_idle(|channel| {
                namespaces.resolve(channel).map_or(std::time::Duration::ZERO, |o| o.history_ttl)
            });
        }
    });
}

fn random_node_id() -> String {
    format!("{:08x}", rand::random::<u32>())
}
