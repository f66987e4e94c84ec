//! `herald-reference`: the reference fan-out server, the ceiling Herald is measured against.
//!
//! It is the simplest fan-out server that is still fast and honest: subscribers connect with a
//! plain WebSocket handshake on `GET /ws`, every `POST /publish` body line is encoded once as a
//! WebSocket text frame (`{"pub":{"channel":"bench","data":LINE}}`) shared by every socket, and
//! each connection writes all its queued frames with one vectored write. There is no protocol,
//! no channels, no history: what Herald does on top costs the difference. The benchmark tool
//! (`herald-bench`) drives Herald and this server the same way in the same run and reports
//! Herald's figures as a ratio to this one's.
//!
//! ```text
//! taskset -c 0 herald-reference --listen 127.0.0.1:8090
//! curl -d '{"n":1}' http://127.0.0.1:8090/publish     # broadcast one frame
//! curl http://127.0.0.1:8090/stats                     # subscribers, publications, bytes queued
//! ```
//!
//! See the library documentation ([`herald_reference`]) for the endpoints.

use std::net::SocketAddr;

use clap::Parser;

/// Command line.
#[derive(Parser, Debug)]
#[command(
    name = "herald-reference",
    version,
    about = "The reference fan-out server Herald's benchmarks are measured against."
)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8090")]
    listen: SocketAddr,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    eprintln!("herald-reference listening on {}", listener.local_addr()?);
    tokio::select! {
        r = herald_reference::run(listener) => r,
        _ = tokio::signal::ctrl_c() => Ok(()),
    }
}
