//! The Herald server: the WebSocket transport, the HTTP API, authentication and configuration.
//!
//! The `herald` binary (`main.rs`) parses flags, loads the [`config::Config`], builds the
//! [`herald_core::Node`] on a broker and runs [`listener::run`] until SIGTERM / SIGINT.

pub mod api;
pub mod app;
pub mod auth;
pub mod config;
mod conn;
pub mod error;
pub mod listener;
pub mod origin;
mod query;
pub mod registry;
pub mod socket;
pub mod sse;
mod wire;
pub mod ws;

use std::sync::Arc;

use herald_broker::{Broker, MemoryBroker, NatsBroker, RedisBroker};
use herald_core::node::AuthSettings;
use herald_core::{Node, TokenVerifier};

use crate::config::Config;

/// Why a node could not be built.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configured broker is not available in this build.
    #[error(
        "config key `broker`: {0:?} is not supported (use \"memory\", \"redis://HOST:PORT\", \"rediss://HOST:PORT\", \"redis-cluster://HOST:PORT,...\" or \"nats://HOST:PORT\")"
    )]
    UnsupportedBroker(String),
    /// A file named in the configuration could not be read.
    #[error("config key `{key}`: cannot read {path}: {message}")]
    File {
        /// The key naming the file.
        key: &'static str,
        /// The file.
        path: String,
        /// Why.
        message: String,
    },
    /// The broker refused to start.
    #[error("broker failed to start: {0}")]
    Broker(#[from] herald_broker::BrokerError),
}

/// Reads the PEM files of a `rediss://` broker.
fn redis_tls(config: &config::BrokerTlsConfig) -> Result<herald_broker::RedisTls, StartError> {
    let read = |key: &'static str, path: &Option<String>| -> Result<Option<Vec<u8>>, StartError> {
        path.as_ref()
            .map(|p| {
                std::fs::read(p).map_err(|e| StartError::File {
                    key,
                    path: p.clone(),
                    message: e.to_string(),
                })
            })
            .transpose()
    };
    let ca_pem = read("broker_tls.ca_file", &config.ca_file)?;
    let cert = read("broker_tls.cert_file", &config.cert_file)?;
    let key = read("broker_tls.key_file", &config.key_file)?;
    Ok(herald_broker::RedisTls { ca_pem, client: cert.zip(key) })
}

/// Builds and starts the node `config` describes.
pub async fn build_node(config: &Config) -> Result<Arc<Node>, StartError> {
    let broker: Arc<dyn Broker> = match config.broker.as_str() {
        "memory" => {
            let memory = Arc::new(MemoryBroker::new());
            spawn_stream_expiry(memory.clone(), config.namespace_options());
            memory
        }
        url if ["redis://", "rediss://", "redis-cluster://", "rediss-cluster://"]
            .iter()
            .any(|scheme| url.starts_with(scheme)) =>
        {
            Arc::new(RedisBroker::with_tls(url, &redis_tls(&config.broker_tls)?)?)
        }
        url if url.starts_with("nats://") => Arc::new(NatsBroker::connect(url).await?),
        other => return Err(StartError::UnsupportedBroker(other.to_string())),
    };
    let verifier = config.auth.hmac_secret.as_ref().map(|s| {
        let mut verifier = auth::HmacVerifier::new(s.as_bytes(), config.auth.leeway);
        if let Some(previous) = &config.auth.previous_hmac_secret {
            verifier = verifier.with_previous(previous.as_bytes());
        }
        if let Some(audience) = &config.auth.audience {
            verifier = verifier.with_audience(audience);
        }
        if let Some(issuer) = &config.auth.issuer {
            verifier = verifier.with_issuer(issuer);
        }
        Arc::new(verifier) as Arc<dyn TokenVerifier>
    });
    let node_id = config.node_id.clone().unwrap_or_else(random_node_id);
    let node = Arc::new(Node::new(
        node_id,
        broker,
        config.namespace_options(),
        config.limits.clone(),
        config.ping_interval,
        AuthSettings { allow_anonymous: config.auth.allow_anonymous, verifier },
    ));
    node.broker.set_control(registry::control_handler(Arc::downgrade(&node)));
    node.start().await?;
    spawn_token_expiry(&node);
    Ok(node)
}

/// How often expired tokens are looked for: a live connection is closed at most this long
/// after its token's `exp` plus the leeway.
pub const TOKEN_EXPIRY_TICK: std::time::Duration = std::time::Duration::from_millis(250);

/// Closes, every [`TOKEN_EXPIRY_TICK`], the connections (any transport) whose token expired
/// without a `refresh`, with 4012; ends with the node.
fn spawn_token_expiry(node: &Arc<Node>) {
    let weak = Arc::downgrade(node);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(TOKEN_EXPIRY_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(node) = weak.upgrade() else { return };
            let n = node.registry.expire(std::time::SystemTime::now());
            if n > 0 {
                tracing::debug!(connections = n, "closing connections whose token expired");
            }
        }
    });
}

/// Drops, every few seconds, the stream state of channels idle for longer than their TTL. The
/// sweep is incremental: each step holds one shard's lock for at most
/// [`herald_broker::memory::EXPIRY_STEP`] streams, and the task yields between steps, so
/// publishers never wait for a whole shard's scan.
fn spawn_stream_expiry(broker: Arc<MemoryBroker>, namespaces: herald_core::Namespaces) {
    let weak = Arc::downgrade(&broker);
    drop(broker);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let mut cursor = herald_broker::memory::SweepCursor::default();
            while !cursor.is_done() {
                let Some(broker) = weak.upgrade() else { return };
                broker.expire_step(
                    &mut cursor,
                    herald_broker::memory::EXPIRY_STEP,
                    |channel| {
                        namespaces
                            .resolve(channel)
                            .map_or(std::time::Duration::ZERO, |o| o.history_ttl)
                    },
                    std::time::Instant::now(),
                );
                drop(broker);
                tokio::task::yield_now().await;
            }
        }
    });
}

fn random_node_id() -> String {
    format!("{:08x}", rand::random::<u32>())
}
