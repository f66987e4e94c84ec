//! A real Redis Cluster for tests: `redis-server --cluster-enabled yes` processes on free
//! loopback ports, joined by `redis-cli --cluster create`, killed on drop. Shared by the broker
//! conformance suite and the server's cluster tests (included with `#[path]`).

#![allow(dead_code, unreachable_pub)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A Redis Cluster of masters and replicas (see the module docs).
pub struct RedisCluster {
    /// One process per node, `None` once killed.
    pub nodes: Vec<Option<Child>>,
    /// Each node's port (its cluster bus is port + 10000).
    pub ports: Vec<u16>,
    /// Set when the nodes speak only TLS.
    tls: Option<ClusterTls>,
    _dir: tempfile::TempDir,
}

/// PEM files of a TLS-only cluster: the CA that signed both certificates, the nodes' server
/// certificate and key, and the client certificate and key that the nodes' cluster bus,
/// `redis-cli` and Herald present (the nodes require one).
#[derive(Clone)]
pub struct ClusterTls {
    pub ca: String,
    pub server: (String, String),
    pub client: (String, String),
}

/// A free loopback port whose cluster bus port (+10000) is free too.
fn free_cluster_port() -> u16 {
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        if port < 55_000 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

impl RedisCluster {
    /// `masters` masters with `replicas` replicas each, every slot served; `None` (with a note)
    /// when `redis-server` or `redis-cli` is missing, unless `HERALD_REQUIRE_REDIS` is set.
    pub fn start(masters: usize, replicas: usize) -> Option<RedisCluster> {
        Self::start_with(masters, replicas, None)
    }

    /// As [`RedisCluster::start`], every node speaking only TLS (clients and cluster bus).
    pub fn start_tls(masters: usize, replicas: usize, tls: ClusterTls) -> Option<RedisCluster> {
        Self::start_with(masters, replicas, Some(tls))
    }

    fn start_with(
        masters: usize,
        replicas: usize,
        tls: Option<ClusterTls>,
    ) -> Option<RedisCluster> {
        let found = Command::new("redis-server").arg("--version").output().is_ok()
            && Command::new("redis-cli").arg("--version").output().is_ok();
        if !found {
            assert!(
                std::env::var("HERALD_REQUIRE_REDIS").is_err(),
                "redis-server and redis-cli are required (HERALD_REQUIRE_REDIS is set)"
            );
            eprintln!("redis-server or redis-cli not found: Redis Cluster cases skipped");
            return None;
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let n = masters * (1 + replicas);
        let ports: Vec<u16> = (0..n).map(|_| free_cluster_port()).collect();
        let mut nodes = Vec::new();
        for port in &ports {
            let node_dir = dir.path().join(port.to_string());
            std::fs::create_dir_all(&node_dir).expect("node dir");
            let mut cmd = Command::new("redis-server");
            match &tls {
                None => cmd.args(["--port", &port.to_string()]),
                Some(t) => cmd
                    .args(["--port", "0", "--tls-port", &port.to_string()])
                    .args(["--tls-cluster", "yes", "--tls-replication", "yes"])
                    .args(["--tls-ca-cert-file", &t.ca, "--tls-auth-clients", "yes"])
                    .args(["--tls-cert-file", &t.server.0, "--tls-key-file", &t.server.1])
                    .args(["--tls-client-cert-file", &t.client.0])
                    .args(["--tls-client-key-file", &t.client.1]),
            };
            let child = cmd
                .args(["--bind", "127.0.0.1"])
                .args(["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"])
                .args(["--cluster-node-timeout", "1000", "--save", "", "--appendonly", "no"])
                .args(["--cluster-replica-validity-factor", "0"])
                .arg("--dir")
                .arg(&node_dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server starts");
            nodes.push(Some(child));
        }
        for port in &ports {
            let deadline = Instant::now() + Duration::from_secs(10);
            while std::net::TcpStream::connect(("127.0.0.1", *port)).is_err() {
                assert!(Instant::now() < deadline, "redis-server did not listen on {port}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let created = Command::new("redis-cli")
            .args(tls_args(tls.as_ref()))
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("redis-cli runs");
        assert!(created.success(), "redis-cli --cluster create failed");
        let cluster = RedisCluster { nodes, ports, tls, _dir: dir };
        cluster.wait_ok(Duration::from_secs(30));
        // Every replica has synced with its master before a test kills one (a replica that
        // never synced cannot take over).
        let deadline = Instant::now() + Duration::from_secs(30);
        while cluster.synced_replicas() < masters * replicas {
            assert!(Instant::now() < deadline, "the replicas did not sync");
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(cluster)
    }

    /// `redis-cluster://` with every node (`rediss-cluster://` for a TLS cluster).
    pub fn url(&self) -> String {
        let addrs: Vec<String> = self.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let scheme = if self.tls.is_some() { "rediss" } else { "redis" };
        format!("{scheme}-cluster://{}", addrs.join(","))
    }

    /// Runs `redis-cli -p port args...` and returns its output.
    pub fn cli(&self, port: u16, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(tls_args(self.tls.as_ref()))
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The ports of the nodes still running.
    pub fn live_ports(&self) -> Vec<u16> {
        self.ports.iter().zip(&self.nodes).filter(|(_, c)| c.is_some()).map(|(p, _)| *p).collect()
    }

    /// Waits until every live node says `cluster_state:ok` and knows every slot is served.
    pub fn wait_ok(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let ok = self.live_ports().iter().all(|p| {
                let info = self.cli(*p, &["cluster", "info"]);
                info.contains("cluster_state:ok") && info.contains("cluster_slots_ok:16384")
            });
            if ok {
                return;
            }
            assert!(Instant::now() < deadline, "the redis cluster did not get ok");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// How many live nodes are replicas with their link to the master up.
    pub fn synced_replicas(&self) -> usize {
        self.live_ports()
            .iter()
            .filter(|p| {
                let info = self.cli(**p, &["info", "replication"]);
                info.contains("role:slave") && info.contains("master_link_status:up")
            })
            .count()
    }

    /// The port of the master serving `key` now, asked of any live node.
    pub fn master_of(&self, key: &str) -> u16 {
        let port = self.live_ports()[0];
        let slot: u16 =
            self.cli(port, &["cluster", "keyslot", key]).trim().parse().expect("a slot");
        // `<id> <ip:port@bus> <flags> <master> <ping> <pong> <epoch> <link> <slots...>`
        let nodes = self.cli(port, &["cluster", "nodes"]);
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 9 || !fields[2].contains("master") || fields[2].contains("fail") {
                continue;
            }
            let serves = fields[8..].iter().any(|range| {
                let (first, last) = range.split_once('-').unwrap_or((range, range));
                matches!((first.parse::<u16>(), last.parse::<u16>()),
                    (Ok(f), Ok(l)) if f <= slot && slot <= l)
            });
            if serves {
                let addr = fields[1].split('@').next().expect("an address");
                return addr.rsplit(':').next().expect("a port").parse().expect("a port");
            }
        }
        panic!("no master serves slot {slot}: {nodes}");
    }

    /// Kills the node on `port` with SIGKILL.
    pub fn kill(&mut self, port: u16) {
        let i = self.ports.iter().position(|p| *p == port).expect("a node of this cluster");
        if let Some(mut child) = self.nodes[i].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for child in self.nodes.iter_mut().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `redis-cli`'s TLS options for a TLS cluster.
fn tls_args(tls: Option<&ClusterTls>) -> Vec<String> {
    match tls {
        None => Vec::new(),
        Some(t) => ["--tls", "--cacert", &t.ca, "--cert", &t.client.0, "--key", &t.client.1]
            .iter()
            .map(|s| s.to_string())
            .collect(),
    }
}
