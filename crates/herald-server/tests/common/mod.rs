//! Shared helpers of the integration tests: start the real `herald` binary on a free port.
#![allow(dead_code, unreachable_pub, missing_docs, clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use herald_client::{Client, ConnectOptions, Events, HttpApi};

/// A running `herald` process, killed on drop.
pub struct Server {
    pub addr: SocketAddr,
    pub child: Child,
    pub log: Arc<Mutex<String>>,
}

/// A free loopback port (bound, read, released).
pub fn free_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr")
}

pub fn herald_bin() -> &'static str {
    env!("CARGO_BIN_EXE_herald")
}

impl Server {
    /// Starts herald with `config` (TOML text, may be empty) and extra flags; waits until it
    /// listens.
    pub fn start(config: &str, flags: &[&str]) -> Server {
        Self::try_start(config, flags).expect("herald starts")
    }

    pub fn try_start(config: &str, flags: &[&str]) -> Result<Server, String> {
        for _attempt in 0..5 {
            let addr = free_addr();
            let dir = std::env::temp_dir().join(format!(
                "herald-test-{}-{}",
                std::process::id(),
                addr.port()
            ));
            std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
            let path = dir.join("herald.toml");
            std::fs::write(&path, config).map_err(|e| e.to_string())?;
            let mut cmd = Command::new(herald_bin());
            cmd.arg("--config").arg(&path).arg("--listen").arg(addr.to_string());
            cmd.args(flags);
            cmd.env(
                "RUST_LOG",
                "herald=debug,herald_server=debug,herald_core=debug,herald_broker=debug,info",
            );
            for (k, _) in std::env::vars() {
                if k.starts_with("HERALD_") {
                    cmd.env_remove(k);
                }
            }
            cmd.stdout(Stdio::null()).stderr(Stdio::piped());
            let mut child = cmd.spawn().map_err(|e| e.to_string())?;
            let stderr = child.stderr.take().expect("piped stderr");
            let log = Arc::new(Mutex::new(String::new()));
            let (tx, rx) = std::sync::mpsc::channel();
            {
                let log = log.clone();
                std::thread::spawn(move || {
                    let mut tx = Some(tx);
                    for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                        if line.contains("herald listening on") {
                            if let Some(tx) = tx.take() {
                                let _ = tx.send(true);
                            }
                        }
                        let mut l = log.lock().unwrap();
                        l.push_str(&line);
                        l.push('\n');
                    }
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(false);
                    }
                });
            }
            match rx.recv_timeout(Duration::from_secs(20)) {
                Ok(true) => return Ok(Server { addr, child, log }),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let text = log.lock().unwrap().clone();
                    if text.contains("Address already in use") {
                        continue;
                    }
                    return Err(text);
                }
            }
        }
        Err("no free port".into())
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    pub fn http_base(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn client(&self) -> (Client, Events) {
        let (c, e, _) = Client::connect(&self.ws_url(), ConnectOptions::default())
            .await
            .expect("client connects");
        (c, e)
    }

    pub async fn api(&self) -> HttpApi {
        HttpApi::connect(&self.http_base(), None).await.expect("http api connects")
    }

    pub async fn api_with_key(&self, key: &str) -> HttpApi {
        HttpApi::connect(&self.http_base(), Some(key.to_string())).await.expect("http api connects")
    }

    /// Sends SIGTERM and waits for the exit status, at most `limit`.
    pub fn terminate(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `herald` with arguments and returns (exit code, stderr), for start-up failures.
pub fn run_herald(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut cmd = Command::new(herald_bin());
    cmd.args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("HERALD_") {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run herald");
    let mut text = String::from_utf8_lossy(&out.stderr).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stdout));
    (out.status.code(), text)
}

pub const TIMEOUT: Duration = Duration::from_secs(10);

/// A raw WebSocket connection on a blocking socket whose receive buffer is `rcvbuf` bytes: the
/// handshake is done, nothing else is read. For clients that misbehave on purpose.
pub fn raw_ws(server: &Server, rcvbuf: usize) -> std::net::TcpStream {
    use std::io::{Read, Write};
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(rcvbuf).unwrap();
    socket.connect(&server.addr.into()).unwrap();
    let mut stream: std::net::TcpStream = socket.into();
    let key = herald_protocol::ws::client_key();
    write!(
        stream,
        "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    stream
}

/// A raw WebSocket client on a blocking socket with a tiny receive buffer.
pub struct RawWs {
    pub stream: std::net::TcpStream,
    pub decoder: herald_protocol::ws::Decoder,
}

impl RawWs {
    pub fn connect(server: &Server, rcvbuf: usize) -> RawWs {
        RawWs {
            stream: raw_ws(server, rcvbuf),
            decoder: herald_protocol::ws::Decoder::new(herald_protocol::ws::Role::Client, 1 << 24),
        }
    }

    pub fn send(&mut self, text: &str) {
        let frame = herald_protocol::ws::encode_frame(
            herald_protocol::ws::Role::Client,
            herald_protocol::ws::Opcode::Text,
            text.as_bytes(),
        );
        std::io::Write::write_all(&mut self.stream, &frame).unwrap();
    }

    /// Reads messages until `stop` says so or the socket ends; returns the JSON messages and
    /// the close code, if a close frame came.
    pub fn read_until(
        &mut self,
        timeout: Duration,
        mut stop: impl FnMut(&serde_json::Value) -> bool,
    ) -> (Vec<serde_json::Value>, Option<u16>) {
        self.stream.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 65536];
        let mut messages = Vec::new();
        while Instant::now() < deadline {
            let n = match std::io::Read::read(&mut self.stream, &mut buf) {
                Ok(0) => return (out, None),
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    continue
                }
                Err(_) => return (out, None),
            };
            self.decoder.feed(&buf[..n], &mut messages).unwrap();
            for m in messages.drain(..) {
                match m {
                    herald_protocol::ws::Message::Text(t) => {
                        for line in t.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                            let v: serde_json::Value = serde_json::from_slice(line).unwrap();
                            let done = stop(&v);
                            out.push(v);
                            if done {
                                return (out, None);
                            }
                        }
                    }
                    herald_protocol::ws::Message::Close(c) => return (out, c.map(|c| c.code)),
                    _ => {}
                }
            }
        }
        (out, None)
    }
}

/// The value of metric `name` (with its labels, e.g. `herald_disconnects_total{code="4008"}`)
/// in a Prometheus text exposition.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} missing:\n{text}"))
}

/// The server's `/metrics` text.
pub async fn metrics(server: &Server) -> String {
    let (_, _, body) = server.api().await.request("GET", "/metrics", None).await.unwrap();
    String::from_utf8_lossy(&body).into_owned()
}

/// A `redis-server` on a free loopback port, stopped on drop. `None` (with a note) when
/// `redis-server` is not installed, unless `HERALD_REQUIRE_REDIS` is set: then it panics.
pub struct RedisServer {
    pub child: Child,
    pub port: u16,
}

impl RedisServer {
    pub fn start() -> Option<RedisServer> {
        Self::start_with(&[])
    }

    /// A server with `extra` arguments (they win over the defaults: no persistence).
    pub fn start_with(extra: &[&str]) -> Option<RedisServer> {
        if !Self::available() {
            return None;
        }
        let port = free_addr().port();
        Some(RedisServer { child: Self::spawn(port, extra), port })
    }

    /// A server that speaks only TLS on its port, with the certificate and key `tls` names,
    /// and requires clients to present a certificate signed by the CA in it.
    pub fn start_tls(tls: &TestPki) -> Option<RedisServer> {
        if !Self::available() {
            return None;
        }
        let port = free_addr().port();
        let path = |name: &str| tls.path(name).to_str().unwrap().to_string();
        let (cert, key, ca) = (path("server.pem"), path("server.key"), path("ca.pem"));
        let p = port.to_string();
        let args = [
            "--port",
            "0",
            "--tls-port",
            &p,
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
            "--tls-ca-cert-file",
            &ca,
            "--tls-auth-clients",
            "yes",
        ];
        Some(RedisServer { child: Self::spawn(port, &args), port })
    }

    fn available() -> bool {
        if Command::new("redis-server").arg("--version").output().is_ok() {
            return true;
        }
        assert!(
            std::env::var("HERALD_REQUIRE_REDIS").is_err(),
            "redis-server is required (HERALD_REQUIRE_REDIS is set) but not on the PATH"
        );
        eprintln!("redis-server not found: test skipped");
        false
    }

    /// Starts a new process on the same port (after the old one was killed), with `extra`.
    pub fn restart(&mut self, extra: &[&str]) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = Self::spawn(self.port, extra);
    }

    /// Spawns `redis-server` on `port` and waits until it listens.
    fn spawn(port: u16, extra: &[&str]) -> Child {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", "no", "--protected-mode", "no"])
            .args(extra)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        wait_listening(port, "redis-server");
        child
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `GET /readyz` answers 200 (the broker is connected), at most `limit`.
pub async fn wait_ready(server: &Server, limit: Duration) {
    let deadline = Instant::now() + limit;
    let mut api = server.api().await;
    loop {
        let (status, _, _) = api.request("GET", "/readyz", None).await.unwrap();
        if status == 200 {
            return;
        }
        assert!(Instant::now() < deadline, "node {} not ready", server.addr);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A test CA made by the test, with a server certificate for `127.0.0.1` / `localhost` and a
/// client certificate, as PEM files in a temporary directory: `ca.pem`, `server.pem`,
/// `server.key`, `client.pem`, `client.key`, and `other-ca.pem` (a CA that signed nothing here).
pub struct TestPki {
    dir: tempfile::TempDir,
}

impl TestPki {
    pub fn new() -> TestPki {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        };
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: String| std::fs::write(dir.path().join(name), text).unwrap();
        let ca = |name: &str| {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name.push(DnType::CommonName, name);
            let key = KeyPair::generate().unwrap();
            let cert = params.self_signed(&key).unwrap();
            (cert, key)
        };
        let (ca_cert, ca_key) = ca("herald test CA");
        write("ca.pem", ca_cert.pem());
        write("other-ca.pem", ca("another CA").0.pem());
        for (name, sans, usage) in [
            (
                "server",
                vec!["127.0.0.1".to_string(), "localhost".into()],
                ExtendedKeyUsagePurpose::ServerAuth,
            ),
            ("client", vec!["herald-node".to_string()], ExtendedKeyUsagePurpose::ClientAuth),
        ] {
            let mut params = CertificateParams::new(sans).unwrap();
            params.distinguished_name.push(DnType::CommonName, name);
            params.extended_key_usages = vec![usage];
            let key = KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &ca_cert, &ca_key).unwrap();
            write(&format!("{name}.pem"), cert.pem());
            write(&format!("{name}.key"), key.serialize_pem());
        }
        TestPki { dir }
    }

    pub fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }
}

/// A `nats-server` with JetStream on free loopback ports (clients and monitoring), its store in
/// a temporary directory that outlives restarts; killed on drop.
pub struct NatsServer {
    pub child: Child,
    pub port: u16,
    /// The monitoring port (`/connz`, `/subsz`).
    pub monitor: u16,
    dir: tempfile::TempDir,
    exe: &'static str,
    extra: Vec<String>,
}

impl NatsServer {
    pub fn start() -> Option<NatsServer> {
        Self::start_with(&[])
    }

    /// A server with `extra` arguments (kept across restarts), e.g. `--user` and `--pass`.
    pub fn start_with(extra: &[&str]) -> Option<NatsServer> {
        let exe = nats_exe()?;
        let dir = tempfile::tempdir().unwrap();
        let (port, monitor) = (free_addr().port(), free_addr().port());
        let extra: Vec<String> = extra.iter().map(|a| a.to_string()).collect();
        let child = Self::spawn(exe, port, monitor, dir.path(), &extra);
        Some(NatsServer { child, port, monitor, dir, exe, extra })
    }

    fn spawn(exe: &str, port: u16, monitor: u16, dir: &std::path::Path, extra: &[String]) -> Child {
        let child = Command::new(exe)
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-m", &monitor.to_string()])
            .args(extra)
            .arg("-sd")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts");
        wait_listening(port, "nats-server");
        child
    }

    /// Kills the server (SIGKILL) and starts a new one on the same ports and store.
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = Self::spawn(self.exe, self.port, self.monitor, self.dir.path(), &self.extra);
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The subjects of every client subscription, from the monitoring endpoint.
    pub fn subscriptions(&self) -> Vec<String> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.monitor)).unwrap();
        s.write_all(b"GET /connz?subs=1 HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        let mut out = Vec::new();
        for conn in v["connections"].as_array().into_iter().flatten() {
            for sub in conn["subscriptions_list"].as_array().into_iter().flatten() {
                out.push(sub.as_str().unwrap_or_default().to_string());
            }
        }
        out
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Three `nats-server`s with JetStream joined in one cluster (routes between them), each on
/// free loopback ports with a store of its own; killed on drop.
pub struct NatsCluster {
    pub servers: Vec<Child>,
    pub ports: Vec<u16>,
    /// Monitoring ports.
    pub monitors: Vec<u16>,
    _dirs: Vec<tempfile::TempDir>,
}

impl NatsCluster {
    pub fn start() -> Option<NatsCluster> {
        let exe = nats_exe()?;
        let ports: Vec<u16> = (0..3).map(|_| free_addr().port()).collect();
        let monitors: Vec<u16> = (0..3).map(|_| free_addr().port()).collect();
        let routes_ports: Vec<u16> = (0..3).map(|_| free_addr().port()).collect();
        let routes: Vec<String> =
            routes_ports.iter().map(|p| format!("nats://127.0.0.1:{p}")).collect();
        let mut servers = Vec::new();
        let mut dirs = Vec::new();
        for i in 0..3 {
            let dir = tempfile::tempdir().unwrap();
            let child = Command::new(exe)
                .args(["-js", "-a", "127.0.0.1", "-p", &ports[i].to_string()])
                .args(["-m", &monitors[i].to_string()])
                .args(["-n", &format!("n{i}"), "--cluster_name", "herald-test"])
                .args(["--cluster", &routes[i], "--routes", &routes.join(",")])
                .arg("-sd")
                .arg(dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("nats-server starts");
            servers.push(child);
            dirs.push(dir);
        }
        for port in &ports {
            wait_listening(*port, "nats-server");
        }
        Some(NatsCluster { servers, ports, monitors, _dirs: dirs })
    }

    /// The replicas of the `HERALD` stream, from server `i`'s `/jsz` (`None` before it exists
    /// there).
    pub fn stream_replicas(&self, i: usize) -> Option<u64> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.monitors[i])).ok()?;
        s.write_all(b"GET /jsz?streams=true&config=true HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        let body = text.split("\r\n\r\n").nth(1)?;
        let v: serde_json::Value = serde_json::from_str(body).ok()?;
        v["account_details"].as_array()?.iter().find_map(|a| {
            a["stream_detail"].as_array()?.iter().find_map(|st| {
                (st["name"] == "HERALD").then(|| st["config"]["num_replicas"].as_u64()).flatten()
            })
        })
    }

    /// The URL of server `i` alone.
    pub fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.ports[i])
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for child in &mut self.servers {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Waits (at most 10 s) until `what` accepts connections on loopback `port`.
fn wait_listening(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not listen on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The `nats-server` executable (Debian installs it in /usr/sbin, not always on the PATH);
/// `None` (the test is skipped) when there is none, unless `HERALD_REQUIRE_NATS` is set.
fn nats_exe() -> Option<&'static str> {
    let exe = ["nats-server", "/usr/sbin/nats-server"]
        .into_iter()
        .find(|exe| Command::new(exe).arg("--version").output().is_ok());
    if exe.is_none() {
        assert!(
            std::env::var("HERALD_REQUIRE_NATS").is_err(),
            "nats-server is required (HERALD_REQUIRE_NATS is set) but not found"
        );
        eprintln!("nats-server not found: test skipped");
    }
    exe
}

#[path = "../../../herald-broker/tests/support/redis_cluster.rs"]
mod redis_cluster;
#[allow(unused_imports)]
pub use redis_cluster::{ClusterTls, RedisCluster};
