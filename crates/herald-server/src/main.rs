//! The `herald` binary: a real-time push server.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use herald_server::app::App;
use herald_server::config::{Config, Sources};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Herald: a real-time push server (WebSocket, HTTP publish API).
///
/// Configuration is read from a TOML file (--config), then HERALD_<KEY> environment variables
/// (HERALD_<TABLE>__<KEY> for keys in tables), then these flags; later sources win.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Cli {
    /// TOML configuration file.
    #[arg(long, value_name = "FILE")]
    config: Option<std::path::PathBuf>,
    /// Address to listen on (key `listen`, default 127.0.0.1:8080).
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Option<String>,
    /// API key required on /api/* (key `api_key`).
    #[arg(long, value_name = "KEY")]
    api_key: Option<String>,
    /// Broker: "memory", or "redis://[user:pass@]HOST:PORT" for a cluster (key `broker`).
    #[arg(long, value_name = "URL")]
    broker: Option<String>,
    /// Log filter used when RUST_LOG is not set (key `log_level`, default "info"); an invalid
    /// filter in either stops start-up.
    #[arg(long, value_name = "FILTER")]
    log_level: Option<String>,
    /// Seconds between ping pushes (key `ping_interval_secs`, default 25).
    #[arg(long, value_name = "SECS")]
    ping_interval_secs: Option<u64>,
    /// This node's id (key `node_id`, default random).
    #[arg(long, value_name = "ID")]
    node_id: Option<String>,
    /// Sets any configuration key, e.g. `--set limits.max_queue_bytes=65536` or
    /// `--set namespaces.market.history_size=1000`. May be repeated.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

impl Cli {
    fn flags(&self) -> anyhow::Result<Vec<(String, String)>> {
        let mut flags = Vec::new();
        let mut add = |k: &str, v: Option<String>| {
            if let Some(v) = v {
                flags.push((k.to_string(), v));
            }
        };
        add("listen", self.listen.clone());
        add("api_key", self.api_key.clone());
        add("broker", self.broker.clone());
        add("log_level", self.log_level.clone());
        add("ping_interval_secs", self.ping_interval_secs.map(|v| v.to_string()));
        add("node_id", self.node_id.clone());
        for s in &self.set {
            let (k, v) =
                s.split_once('=').with_context(|| format!("--set {s:?}: expected KEY=VALUE"))?;
            flags.push((k.trim().to_string(), v.to_string()));
        }
        Ok(flags)
    }
}

fn load_config(cli: &Cli) -> anyhow::Result<Config> {
    let (file, file_path) = match &cli.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read config file {}", path.display()))?;
            (Some(text), Some(path.display().to_string()))
        }
        None => (None, None),
    };
    let sources = Sources { file, file_path, env: std::env::vars().collect(), flags: cli.flags()? };
    Ok(Config::load(&sources)?)
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// The allocator: jemalloc with background threads, which give freed memory back to the system
/// while the node is idle (see docs/architecture.md, "Memory", and BENCHMARKS.md).
#[cfg(all(feature = "jemalloc", not(feature = "mimalloc"), not(target_env = "msvc")))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
/// The allocator: mimalloc (`--no-default-features --features mimalloc`).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = match load_config(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("herald: {e:#}");
            std::process::exit(2);
        }
    };
    // `RUST_LOG` (when set) or `log_level`, both checked by `Config::load`.
    let filter = match herald_server::config::log_filter(&config.log_filter) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("herald: log filter: {e}");
            std::process::exit(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    if config.insecure
        && !config.listen.ip().is_loopback()
        && (config.api_key.is_none() || config.auth.hmac_secret.is_none())
    {
        tracing::warn!(
            listen = %config.listen,
            api_key = config.api_key.is_some(),
            token_auth = config.auth.hmac_secret.is_some(),
            "insecure = true: reachable beyond loopback without an API key and token \
             verification; anyone who reaches this port may publish or subscribe"
        );
    }
    if config.auth.hmac_secret.as_ref().is_some_and(|s| s.len() < 32) {
        tracing::warn!("auth.hmac_secret is shorter than 32 bytes: tokens are easier to forge");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    runtime.block_on(serve(config))
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let node = match herald_server::build_node(&config).await {
        Ok(n) => n,
        Err(e) => {
            eprintln!("herald: {e}");
            std::process::exit(2);
        }
    };
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let local = listener.local_addr()?;
    // Plain HTTP requests get their own runtime (see `herald_server::listener`).
    let api_runtime = match config.api_threads {
        0 => None,
        n => Some(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(n)
                .thread_name("herald-api")
                .enable_all()
                .build()
                .context("cannot start the API runtime")?,
        ),
    };
    let app = App {
        moved: Default::default(),
        api: api_runtime.as_ref().map(|r| r.handle().clone()),
        node: node.clone(),
        shutdown_timeout: config.shutdown_timeout,
        config: Arc::new(config),
        shutdown: CancellationToken::new(),
        tracker: TaskTracker::new(),
        started: Instant::now(),
    };
    tracing::info!(
        listen = %local,
        node = %node.id,
        broker = node.broker.name(),
        version = env!("CARGO_PKG_VERSION"),
        "herald listening on {local}"
    );
    let accept = tokio::spawn(herald_server::listener::run(listener, app.clone()));
    tokio::spawn(herald_server::registry::announce(app.clone()));
    shutdown_signal().await;
    tracing::info!("shutting down: telling clients to reconnect");
    app.shutdown.cancel();
    let _ = accept.await;
    app.tracker.close();
    let deadline = app.shutdown_timeout + Duration::from_secs(1);
    if tokio::time::timeout(deadline, app.tracker.wait()).await.is_err() {
        tracing::warn!("some connections did not close within {deadline:?}");
    }
    if let Some(runtime) = api_runtime {
        runtime.shutdown_background();
    }
    tracing::info!("stopped");
    Ok(())
}
