//! One broker conformance suite, run against every backend: the memory broker, Redis (a real
//! `redis-server` started on a free loopback port), a Redis Cluster of three masters (started
//! by `redis-cli --cluster create`) and NATS (a real `nats-server` with
//! JetStream, likewise). Each case states a guarantee of the
//! `Broker` trait (offsets, ordering, history, void positions, expiry, subscriptions) and checks
//! it the same way on every backend.
//!
//! Redis cases need `redis-server` on the PATH, NATS cases `nats-server` (`scripts/test` installs
//! both); without them they are skipped with a note, unless `HERALD_REQUIRE_REDIS=1` /
//! `HERALD_REQUIRE_NATS=1`, which make them fail.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::HashSet;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use herald_broker::{
    Broker, BrokerHandler, HistoryQuery, MemoryBroker, NatsBroker, Publication, PublishOptions,
    RedisBroker,
};
use herald_protocol::{ChannelName, StreamPosition};
use parking_lot::Mutex;

#[path = "support/redis_cluster.rs"]
mod redis_cluster;
use redis_cluster::RedisCluster;

/// One delivery: channel, offset, epoch, data.
type Delivery = (String, Option<u64>, Option<String>, Bytes);

/// A started backend: its name, the broker, its recorder, and the server process it uses.
type Backend = (&'static str, Arc<dyn Broker>, Arc<Recorder>, Option<ServerProcess>);

/// Records what the broker delivers; says it has subscribers of the channels in `wanted`.
#[derive(Default)]
struct Recorder {
    got: Mutex<Vec<Delivery>>,
    wanted: Mutex<HashSet<String>>,
    /// Channels the broker said it lost publications of.
    lost: Mutex<Vec<String>>,
}

impl BrokerHandler for Recorder {
    fn handle_publication(&self, channel: &ChannelName, p: &Publication) {
        self.got.lock().push((
            channel.to_string(),
            p.offset,
            p.epoch.as_deref().map(str::to_string),
            p.data.clone(),
        ));
    }
    fn has_subscribers(&self, channel: &ChannelName) -> bool {
        self.wanted.lock().contains(channel.as_str())
    }
    fn channel_lost(&self, channel: &ChannelName) {
        self.lost.lock().push(channel.to_string());
    }
}

impl Recorder {
    fn of(&self, channel: &str) -> Vec<(Option<u64>, Bytes)> {
        self.got.lock().iter().filter(|g| g.0 == channel).map(|g| (g.1, g.3.clone())).collect()
    }

    /// Waits until `channel` has `n` deliveries (or 5 s passed).
    async fn wait_for(&self, channel: &str, n: usize) -> Vec<(Option<u64>, Bytes)> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let got = self.of(channel);
            if got.len() >= n || Instant::now() > deadline {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// A `redis-server` or `nats-server` on a free port, or a Redis Cluster, stopped on drop.
struct ServerProcess {
    child: Option<Child>,
    port: u16,
    /// The NATS store directory.
    _dir: Option<tempfile::TempDir>,
    _cluster: Option<RedisCluster>,
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn wait_listening(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not listen on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A `nats-server` with JetStream (a fresh store) on a free port.
fn nats_server() -> Option<ServerProcess> {
    let exe = ["nats-server", "/usr/sbin/nats-server"]
        .into_iter()
        .find(|exe| Command::new(exe).arg("--version").output().is_ok());
    let Some(exe) = exe else {
        assert!(
            std::env::var("HERALD_REQUIRE_NATS").is_err(),
            "nats-server is required (HERALD_REQUIRE_NATS is set) but not found"
        );
        eprintln!("nats-server not found: NATS conformance cases skipped");
        return None;
    };
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let child = Command::new(exe)
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string()])
        .arg("-sd")
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nats-server starts");
    wait_listening(port, "nats-server");
    Some(ServerProcess { child: Some(child), port, _dir: Some(dir), _cluster: None })
}

fn redis_server() -> Option<ServerProcess> {
    let found = Command::new("redis-server").arg("--version").output().is_ok();
    if !found {
        assert!(
            std::env::var("HERALD_REQUIRE_REDIS").is_err(),
            "redis-server is required (HERALD_REQUIRE_REDIS is set) but not on the PATH"
        );
        eprintln!("redis-server not found: Redis conformance cases skipped");
        return None;
    }
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", ""])
        .args(["--appendonly", "no", "--protected-mode", "no"])
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server starts");
    wait_listening(port, "redis-server");
    Some(ServerProcess { child: Some(child), port, _dir: None, _cluster: None })
}

/// `broker` started with a recorder of its own, once ready (at most 10 s).
async fn start(name: &str, broker: Arc<dyn Broker>) -> (Arc<dyn Broker>, Arc<Recorder>) {
    let rec = Arc::new(Recorder::default());
    broker.start(rec.clone()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !broker.is_ready() {
        assert!(Instant::now() < deadline, "the {name} broker did not get ready");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (broker, rec)
}

/// A started broker of each backend, with its recorder (and the Redis process it uses).
async fn backends() -> Vec<Backend> {
    let mut out: Vec<Backend> = Vec::new();
    let (memory, rec) = start("memory", Arc::new(MemoryBroker::new())).await;
    out.push(("memory", memory, rec, None));
    if let Some(server) = redis_server() {
        let url = format!("redis://127.0.0.1:{}", server.port);
        let (broker, rec) = start("redis", Arc::new(RedisBroker::new(&url).unwrap())).await;
        out.push(("redis", broker, rec, Some(server)));
    }
    if let Some(cluster) = RedisCluster::start(3, 0) {
        let broker = Arc::new(RedisBroker::new(&cluster.url()).unwrap());
        let (broker, rec) = start("redis cluster", broker).await;
        let port = cluster.ports[0];
        let held = ServerProcess { child: None, port, _dir: None, _cluster: Some(cluster) };
        out.push(("redis-cluster", broker, rec, Some(held)));
    }
    if let Some(server) = nats_server() {
        let url = format!("nats://127.0.0.1:{}", server.port);
        let (broker, rec) = start("nats", Arc::new(NatsBroker::connect(&url).await.unwrap())).await;
        out.push(("nats", broker, rec, Some(server)));
    }
    out
}

fn ch(name: &str) -> ChannelName {
    ChannelName::parse(name).unwrap()
}

fn opts(size: usize) -> PublishOptions {
    PublishOptions { history_size: size, history_ttl: Duration::from_secs(60) }
}

fn since(offset: u64, epoch: &str, limit: Option<usize>) -> HistoryQuery {
    HistoryQuery { since: Some(StreamPosition { offset, epoch: epoch.into() }), limit }
}

async fn subscribe(broker: &Arc<dyn Broker>, rec: &Recorder, channel: &str) {
    rec.wanted.lock().insert(channel.to_string());
    broker.subscribe(&ch(channel)).await.unwrap();
}

fn offsets(page: &herald_broker::HistoryPage) -> Vec<u64> {
    page.publications.iter().filter_map(|p| p.offset).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_are_contiguous_per_channel_and_delivered_in_order() {
    for (name, broker, rec, _server) in backends().await {
        subscribe(&broker, &rec, "c:a").await;
        subscribe(&broker, &rec, "c:n").await;
        let mut epoch = None;
        for i in 1..=50u64 {
            let p = broker.publish(&ch("c:a"), Bytes::from(format!("{i}")), &opts(10)).await;
            let p = p.unwrap().unwrap();
            assert_eq!(p.offset, i, "{name}");
            assert_eq!(epoch.get_or_insert(p.epoch.clone()), &p.epoch, "{name}: one epoch");
        }
        let other = broker.publish(&ch("c:b"), Bytes::from("x"), &opts(10)).await.unwrap();
        assert_eq!(other.unwrap().offset, 1, "{name}: offsets are per channel");
        for i in 0..5 {
            let p = broker.publish(&ch("c:n"), Bytes::from(format!("{i}")), &opts(0)).await;
            assert_eq!(p.unwrap(), None, "{name}: no history, no offset");
        }
        let got = rec.wait_for("c:a", 50).await;
        let want: Vec<(Option<u64>, Bytes)> =
            (1..=50u64).map(|i| (Some(i), Bytes::from(format!("{i}")))).collect();
        assert_eq!(got, want, "{name}: every publication, in offset order");
        let got = rec.wait_for("c:n", 5).await;
        assert_eq!(got.len(), 5, "{name}");
        assert!(got.iter().all(|g| g.0.is_none()), "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishers_get_distinct_contiguous_offsets() {
    for (name, broker, rec, _server) in backends().await {
        subscribe(&broker, &rec, "c:race").await;
        let mut tasks = Vec::new();
        for w in 0..4 {
            let broker = broker.clone();
            tasks.push(tokio::spawn(async move {
                let mut mine = Vec::new();
                for i in 0..100 {
                    let data = Bytes::from(format!("{w}-{i}"));
                    let p = broker.publish(&ch("c:race"), data, &opts(1000)).await.unwrap();
                    mine.push(p.unwrap().offset);
                }
                mine
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            let mine = t.await.unwrap();
            assert!(mine.windows(2).all(|w| w[0] < w[1]), "{name}: a publisher's own increase");
            all.extend(mine);
        }
        all.sort_unstable();
        assert_eq!(all, (1..=400).collect::<Vec<u64>>(), "{name}: no gap, no duplicate");
        let got = rec.wait_for("c:race", 400).await;
        let delivered: Vec<u64> = got.iter().filter_map(|g| g.0).collect();
        assert_eq!(delivered, (1..=400).collect::<Vec<u64>>(), "{name}: delivered in order");
        let page = broker.history(&ch("c:race"), &opts(1000), &HistoryQuery::default()).await;
        assert_eq!(offsets(&page.unwrap()), (1..=400).collect::<Vec<u64>>(), "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_answers_newest_since_and_limits_and_says_when_it_is_complete() {
    for (name, broker, _rec, _server) in backends().await {
        let c = ch("h:a");
        let mut epoch = String::new();
        for i in 1..=8u64 {
            epoch = broker
                .publish(&c, Bytes::from(format!("{i}")), &opts(5))
                .await
                .unwrap()
                .unwrap()
                .epoch;
        }
        let o = opts(5);
        let page = broker.history(&c, &o, &HistoryQuery::default()).await.unwrap();
        assert_eq!(page.position, Some(StreamPosition { offset: 8, epoch: epoch.clone() }));
        assert_eq!(offsets(&page), [4, 5, 6, 7, 8], "{name}: what history keeps");
        assert_eq!(&page.publications[0].data[..], b"4", "{name}");
        assert!(!page.complete, "{name}: without since, never complete");
        let q = HistoryQuery { since: None, limit: Some(2) };
        assert_eq!(offsets(&broker.history(&c, &o, &q).await.unwrap()), [7, 8], "{name}");
        let q = HistoryQuery { since: None, limit: Some(0) };
        let page = broker.history(&c, &o, &q).await.unwrap();
        assert!(page.publications.is_empty() && page.position.unwrap().offset == 8, "{name}");
        // After a position history reaches: complete, limit from the oldest.
        let page = broker.history(&c, &o, &since(5, &epoch, None)).await.unwrap();
        assert_eq!((offsets(&page), page.complete), (vec![6, 7, 8], true), "{name}");
        let page = broker.history(&c, &o, &since(3, &epoch, Some(2))).await.unwrap();
        assert_eq!((offsets(&page), page.complete), (vec![4, 5], true), "{name}: 3 is the edge");
        let page = broker.history(&c, &o, &since(8, &epoch, None)).await.unwrap();
        assert_eq!((offsets(&page), page.complete), (vec![], true), "{name}: up to date");
        // Trimmed, another epoch, or ahead of the stream: what history has, not complete.
        for (q, what) in [
            (since(2, &epoch, None), "trimmed"),
            (since(5, "another", None), "another epoch"),
            (since(9, &epoch, None), "ahead"),
        ] {
            let page = broker.history(&c, &o, &q).await.unwrap();
            assert_eq!(
                (offsets(&page), page.complete),
                (vec![4, 5, 6, 7, 8], false),
                "{name}: {what}"
            );
        }
        let page = broker.history(&c, &o, &since(2, "another", Some(2))).await.unwrap();
        assert_eq!(offsets(&page), [4, 5], "{name}: the oldest first, limited");
        // A channel without history has no position.
        let page = broker.history(&c, &opts(0), &HistoryQuery::default()).await.unwrap();
        assert!(page.position.is_none() && page.publications.is_empty(), "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_position_read_before_the_first_publication_recovers_exactly() {
    for (name, broker, _rec, _server) in backends().await {
        let c = ch("v:a");
        let o = opts(100);
        let read = broker.history(&c, &o, &HistoryQuery::default()).await.unwrap();
        let void = read.position.clone().unwrap();
        assert_eq!(void.offset, 0, "{name}");
        // Reads create no stream: a second read is void too, with a time of its own.
        let again = broker.history(&c, &o, &HistoryQuery::default()).await.unwrap();
        assert_eq!(again.position.unwrap().offset, 0, "{name}");
        let page = broker.history(&c, &o, &since(0, &void.epoch, None)).await.unwrap();
        assert!(page.complete && page.publications.is_empty(), "{name}: nothing since");
        for i in 1..=3 {
            broker.publish(&c, Bytes::from(format!("{i}")), &o).await.unwrap();
        }
        let page = broker.history(&c, &o, &since(0, &void.epoch, None)).await.unwrap();
        assert_eq!((offsets(&page), page.complete), (vec![1, 2, 3], true), "{name}: all since");
        let page = broker.history(&c, &o, &since(2, &void.epoch, None)).await.unwrap();
        assert_eq!((offsets(&page), page.complete), (vec![3], true), "{name}: seen two");
        // A void position of another instance proves nothing.
        let forged = format!("V{}{}", "zzzzzzzz", &void.epoch[9..]);
        let page = broker.history(&c, &o, &since(0, &forged, None)).await.unwrap();
        assert_eq!((offsets(&page), page.complete), (vec![1, 2, 3], false), "{name}: forged");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_channel_expires_and_starts_a_new_epoch() {
    for (name, broker, _rec, _server) in backends().await {
        let c = ch("t:a");
        let o = PublishOptions { history_size: 10, history_ttl: Duration::from_millis(300) };
        let first = broker.publish(&c, Bytes::from("1"), &o).await.unwrap().unwrap();
        broker.publish(&c, Bytes::from("2"), &o).await.unwrap();
        tokio::time::sleep(Duration::from_millis(700)).await;
        let next = broker.publish(&c, Bytes::from("3"), &o).await.unwrap().unwrap();
        assert_eq!(next.offset, 1, "{name}: offsets restart");
        assert_ne!(next.epoch, first.epoch, "{name}: in a new epoch");
        let page = broker.history(&c, &o, &since(2, &first.epoch, None)).await.unwrap();
        assert_eq!((offsets(&page), page.complete), (vec![1], false), "{name}: the old is gone");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_receives_exactly_the_channels_it_has_subscribers_of() {
    for (name, broker, rec, _server) in backends().await {
        if name == "memory" {
            // One node: every publication reaches its hub, which drops channels nobody holds.
            continue;
        }
        broker.publish(&ch("s:a"), Bytes::from("before"), &opts(0)).await.unwrap();
        subscribe(&broker, &rec, "s:a").await;
        broker.publish(&ch("s:a"), Bytes::from("during"), &opts(0)).await.unwrap();
        broker.publish(&ch("s:b"), Bytes::from("never"), &opts(0)).await.unwrap();
        assert_eq!(rec.wait_for("s:a", 1).await.len(), 1, "{name}");
        rec.wanted.lock().remove("s:a");
        broker.unsubscribe(&ch("s:a")).await.unwrap();
        broker.publish(&ch("s:a"), Bytes::from("after"), &opts(0)).await.unwrap();
        // A subscription of another channel, confirmed after the last publish: by then "after"
        // would have arrived if the node still were subscribed.
        subscribe(&broker, &rec, "s:c").await;
        broker.publish(&ch("s:c"), Bytes::from("marker"), &opts(0)).await.unwrap();
        rec.wait_for("s:c", 1).await;
        let got: Vec<Bytes> = rec.of("s:a").into_iter().map(|g| g.1).collect();
        assert_eq!(got, [Bytes::from("during")], "{name}");
        assert!(rec.of("s:b").is_empty(), "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_subscribes_and_unsubscribes_end_as_the_hub_wants() {
    for (name, broker, rec, _server) in backends().await {
        if name == "memory" {
            continue;
        }
        // Many concurrent join/leave calls, the hub's wish flipping between them; the last wish
        // (set before the last call) is "subscribed" for even rounds and "not" for odd ones.
        for round in 0..20u32 {
            let channel = format!("r:{round}");
            let mut calls = Vec::new();
            for k in 0..10u32 {
                let want = if k == 9 { round % 2 == 0 } else { k % 2 == 0 };
                if want {
                    rec.wanted.lock().insert(channel.clone());
                } else {
                    rec.wanted.lock().remove(&channel);
                }
                let broker = broker.clone();
                let c = ch(&channel);
                calls.push(tokio::spawn(async move {
                    if k % 2 == 0 {
                        broker.subscribe(&c).await
                    } else {
                        broker.unsubscribe(&c).await
                    }
                }));
            }
            for c in calls {
                c.await.unwrap().unwrap();
            }
        }
        let marker = ch("r:marker");
        subscribe(&broker, &rec, "r:marker").await;
        for round in 0..20u32 {
            broker.publish(&ch(&format!("r:{round}")), Bytes::from("p"), &opts(0)).await.unwrap();
        }
        broker.publish(&marker, Bytes::from("end"), &opts(0)).await.unwrap();
        rec.wait_for("r:marker", 1).await;
        for round in 0..20u32 {
            let got = rec.of(&format!("r:{round}")).len();
            assert_eq!(got, usize::from(round % 2 == 0), "{name}: round {round}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_keeps_each_channels_order_and_answers_each_item() {
    for (name, broker, rec, _server) in backends().await {
        subscribe(&broker, &rec, "b:h").await;
        subscribe(&broker, &rec, "b:n").await;
        // 150 items over two channels, one with history, one without: more than one script
        // call's worth for the Redis broker.
        let items: Vec<(ChannelName, Bytes, PublishOptions)> = (0..150)
            .map(|i| {
                if i % 3 == 0 {
                    (ch("b:n"), Bytes::from(format!("{i}")), opts(0))
                } else {
                    (ch("b:h"), Bytes::from(format!("{i}")), opts(1000))
                }
            })
            .collect();
        let results = broker.publish_many(items).await;
        assert_eq!(results.len(), 150, "{name}");
        for (i, r) in results.iter().enumerate() {
            let r = r.as_ref().unwrap();
            assert_eq!(
                r.is_none(),
                i % 3 == 0,
                "{name}: item {i} has an offset iff it has history"
            );
        }
        let got: Vec<(u64, String)> = results
            .iter()
            .filter_map(|r| r.as_ref().unwrap().as_ref())
            .map(|p| (p.offset, p.epoch.clone()))
            .collect();
        let epoch = got[0].1.clone();
        let want: Vec<(u64, String)> = (1..=100).map(|o| (o, epoch.clone())).collect();
        assert_eq!(got, want, "{name}: offsets in item order, one epoch");
        let got = rec.wait_for("b:h", 100).await;
        let want: Vec<(Option<u64>, Bytes)> = (0..150)
            .filter(|i| i % 3 != 0)
            .enumerate()
            .map(|(k, i)| (Some(k as u64 + 1), Bytes::from(format!("{i}"))))
            .collect();
        assert_eq!(got, want, "{name}: delivered in the batch's order");
        let got: Vec<Bytes> = rec.wait_for("b:n", 50).await.into_iter().map(|g| g.1).collect();
        let want: Vec<Bytes> =
            (0..150).filter(|i| i % 3 == 0).map(|i| Bytes::from(format!("{i}"))).collect();
        assert_eq!(got, want, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_published_to_more_often_than_its_ttl_never_expires() {
    for (name, broker, _rec, _server) in backends().await {
        let c = ch("t:busy");
        let o = PublishOptions { history_size: 3, history_ttl: Duration::from_millis(200) };
        let first = broker.publish(&c, Bytes::from("0"), &o).await.unwrap().unwrap();
        // 1.2 s of publications 50 ms apart: six TTLs, never one TTL idle.
        for i in 1..=24u64 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let p = broker.publish(&c, Bytes::from(format!("{i}")), &o).await.unwrap().unwrap();
            assert_eq!((p.offset, &p.epoch), (i + 1, &first.epoch), "{name}: publication {i}");
        }
        let page = broker.history(&c, &o, &since(22, &first.epoch, None)).await.unwrap();
        assert_eq!((offsets(&page), page.complete), (vec![23, 24, 25], true), "{name}");
    }
}

/// A small deterministic generator (xorshift), so a failure names its seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0.wrapping_shl(13);
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0.wrapping_shl(17);
        self.0 % n.max(1)
    }
}

/// Every backend answers history queries exactly as the memory broker does, for random history
/// sizes, publication counts (including ring wrap-around many times over), positions and
/// limits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_answers_agree_with_the_memory_broker_on_random_streams() {
    let all = backends().await;
    let (reference, others) = all.split_first().unwrap();
    for seed in 1..=40u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let c = ch(&format!("q:{seed}"));
        let o = opts(1 + rng.below(12) as usize);
        let n = rng.below(60);
        let mut epochs = Vec::new();
        for b in std::iter::once(reference).chain(others) {
            let mut epoch = None;
            for i in 0..n {
                let p = b.1.publish(&c, Bytes::from(format!("{seed}.{i}")), &o).await.unwrap();
                epoch = p.map(|p| p.epoch);
            }
            epochs.push(epoch.unwrap_or_default());
        }
        for _ in 0..25 {
            let limit = match rng.below(3) {
                0 => None,
                _ => Some(rng.below(15) as usize),
            };
            let kind = rng.below(4);
            let offset = rng.below(n + 3);
            let mut answers = Vec::new();
            for (b, epoch) in std::iter::once(reference).chain(others).zip(&epochs) {
                let q = match kind {
                    0 => HistoryQuery { since: None, limit },
                    1 => since(offset, "another", limit),
                    _ => since(offset, epoch, limit),
                };
                let page = b.1.history(&c, &o, &q).await.unwrap();
                let data: Vec<Bytes> = page.publications.iter().map(|p| p.data.clone()).collect();
                let top = page.position.as_ref().map(|p| p.offset);
                answers.push((b.0, (offsets(&page), data, page.complete, top)));
            }
            for (name, answer) in &answers[1..] {
                assert_eq!(
                    answer, &answers[0].1,
                    "{name} vs memory: seed {seed}, size {}, {n} publications, query kind {kind}, \
                     offset {offset}, limit {limit:?}",
                    o.history_size
                );
            }
        }
    }
}

/// Long histories, interleaved with another channel's publications (so a channel's messages
/// are not contiguous in a shared log), read far from the newest publication: every backend
/// answers as the memory broker does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_histories_read_far_back_answer_as_the_memory_broker() {
    let all = backends().await;
    let (reference, others) = all.split_first().unwrap();
    let (c, other) = (ch("long:a"), ch("long:b"));
    let o = opts(200);
    let mut epochs = Vec::new();
    for b in std::iter::once(reference).chain(others) {
        let items: Vec<(ChannelName, Bytes, PublishOptions)> = (1..=250u64)
            .flat_map(|i| {
                [(c.clone(), Bytes::from(format!("a{i}")), o), (other.clone(), Bytes::from("b"), o)]
            })
            .collect();
        let results = b.1.publish_many(items).await;
        epochs.push(results[0].as_ref().unwrap().as_ref().unwrap().epoch.clone());
    }
    let queries = |epoch: &str| {
        vec![
            since(60, epoch, Some(10)),
            since(51, epoch, None),
            since(50, epoch, Some(3)),
            since(49, epoch, Some(5)),
            since(120, epoch, Some(100)),
            since(10, epoch, Some(7)),
            since(10, "another", Some(7)),
            HistoryQuery { since: None, limit: Some(150) },
            HistoryQuery { since: None, limit: None },
        ]
    };
    for (k, b) in others.iter().enumerate() {
        for (q, reference_q) in queries(&epochs[k + 1]).into_iter().zip(queries(&epochs[0])) {
            let page = b.1.history(&c, &o, &q).await.unwrap();
            let want = reference.1.history(&c, &o, &reference_q).await.unwrap();
            let data = |p: &herald_broker::HistoryPage| -> Vec<Bytes> {
                p.publications.iter().map(|p| p.data.clone()).collect()
            };
            assert_eq!(
                (offsets(&page), data(&page), page.complete),
                (offsets(&want), data(&want), want.complete),
                "{} vs memory: {q:?}",
                b.0
            );
        }
    }
}

/// A node whose own publications come back from the broker late is behind
/// (`Broker::is_behind`) for a moment, and not otherwise: a message naming this node with a
/// send time a second old is put on the channel's live path by a plain client of the same
/// server, as a node too slow to fan out would see its own publications arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_own_publications_come_back_late_is_behind() {
    let old = || {
        let ms =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()
                as u64;
        ms - 1000
    };
    if let Some(server) = redis_server() {
        let redis = RedisBroker::new(&format!("redis://127.0.0.1:{}", server.port)).unwrap();
        let id = redis.node_id().to_string();
        let rec = Arc::new(Recorder::default());
        redis.start(rec.clone()).await.unwrap();
        let broker: Arc<dyn Broker> = Arc::new(redis);
        wait_ready(&broker).await;
        subscribe(&broker, &rec, "late:r").await;
        broker.publish(&ch("late:r"), Bytes::from("1"), &opts(0)).await.unwrap();
        rec.wait_for("late:r", 1).await;
        assert!(!broker.is_behind(), "redis: on time");
        let client = ::redis::Client::open(format!("redis://127.0.0.1:{}", server.port)).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let message = format!("t{id} {} n2", old());
        let _: i64 = ::redis::cmd("PUBLISH")
            .arg("herald:{late:r}")
            .arg(message)
            .query_async(&mut conn)
            .await
            .unwrap();
        rec.wait_for("late:r", 2).await;
        assert!(broker.is_behind(), "redis: its own publication came back a second late");
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(!broker.is_behind(), "redis: not behind once nothing late arrives");
    }
    if let Some(server) = nats_server() {
        let url = format!("nats://127.0.0.1:{}", server.port);
        let nats = NatsBroker::connect(&url).await.unwrap();
        let id = nats.node_id().to_string();
        let rec = Arc::new(Recorder::default());
        nats.start(rec.clone()).await.unwrap();
        let broker: Arc<dyn Broker> = Arc::new(nats);
        wait_ready(&broker).await;
        subscribe(&broker, &rec, "late:n").await;
        broker.publish(&ch("late:n"), Bytes::from("1"), &opts(0)).await.unwrap();
        rec.wait_for("late:n", 1).await;
        assert!(!broker.is_behind(), "nats: on time");
        let client = async_nats::connect(url.as_str()).await.unwrap();
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Herald-Node", id.as_str());
        headers.insert("Herald-Time", old().to_string().as_str());
        client.publish_with_headers("herald.l.late:n", headers, Bytes::from("2")).await.unwrap();
        client.flush().await.unwrap();
        rec.wait_for("late:n", 2).await;
        assert!(broker.is_behind(), "nats: its own publication came back a second late");
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(!broker.is_behind(), "nats: not behind once nothing late arrives");
    }
}

async fn wait_ready(broker: &Arc<dyn Broker>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !broker.is_ready() {
        assert!(Instant::now() < deadline, "the broker did not get ready");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A batch as large as the default `max_batch_publications` (10,000 items over a channel with
/// history and one without) keeps each channel's order: offsets follow item order, and both
/// channels are delivered in item order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_batch_keeps_each_channels_order() {
    for (name, broker, rec, _server) in backends().await {
        subscribe(&broker, &rec, "big:h").await;
        subscribe(&broker, &rec, "big:n").await;
        let items: Vec<(ChannelName, Bytes, PublishOptions)> = (0..10_000)
            .map(|i| {
                if i % 2 == 0 {
                    (ch("big:n"), Bytes::from(format!("{i}")), opts(0))
                } else {
                    (ch("big:h"), Bytes::from(format!("{i}")), opts(10_000))
                }
            })
            .collect();
        let results = broker.publish_many(items).await;
        let offsets: Vec<u64> =
            results.iter().filter_map(|r| r.as_ref().unwrap().as_ref().map(|p| p.offset)).collect();
        assert_eq!(offsets, (1..=5_000).collect::<Vec<u64>>(), "{name}: offsets in item order");
        let got: Vec<Bytes> = rec.wait_for("big:h", 5_000).await.into_iter().map(|g| g.1).collect();
        let want: Vec<Bytes> =
            (0..10_000).filter(|i| i % 2 == 1).map(|i| Bytes::from(format!("{i}"))).collect();
        assert_eq!(got, want, "{name}: the history channel in item order");
        let got: Vec<Bytes> = rec.wait_for("big:n", 5_000).await.into_iter().map(|g| g.1).collect();
        let want: Vec<Bytes> =
            (0..10_000).filter(|i| i % 2 == 0).map(|i| Bytes::from(format!("{i}"))).collect();
        assert_eq!(got, want, "{name}: the plain channel in item order");
    }
}

/// Redis: a node subscribed to a channel that had no stream loses its pub/sub connection and
/// cannot reconnect for a while (Redis starts requiring a password); meanwhile a stream is
/// created, expires, and a second one starts. When the node is back it cannot prove that
/// the second stream is the first since its position, so it says the channel lost
/// publications (its subscribers recover) instead of handing over the second stream as if
/// it were everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_created_and_lost_while_a_node_was_away_is_told() {
    let Some(server) = redis_server() else { return };
    let url = format!("redis://127.0.0.1:{}", server.port);
    let broker = Arc::new(RedisBroker::new(&url).unwrap());
    let rec = Arc::new(Recorder::default());
    broker.start(rec.clone()).await.unwrap();
    let broker: Arc<dyn Broker> = broker;
    wait_ready(&broker).await;
    subscribe(&broker, &rec, "away:a").await;
    // An admin connection, authenticated before the password exists.
    let admin = ::redis::Client::open(url.as_str()).unwrap();
    let mut admin = admin.get_multiplexed_async_connection().await.unwrap();
    let _: () = ::redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg("pw")
        .query_async(&mut admin)
        .await
        .unwrap();
    let _: i64 = ::redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut admin)
        .await
        .unwrap();
    let o = PublishOptions { history_size: 10, history_ttl: Duration::from_millis(300) };
    for i in 1..=3 {
        broker.publish(&ch("away:a"), Bytes::from(format!("e1.{i}")), &o).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    for i in 1..=2 {
        broker.publish(&ch("away:a"), Bytes::from(format!("e2.{i}")), &o).await.unwrap();
    }
    let _: () = ::redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg("")
        .query_async(&mut admin)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while rec.lost.lock().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the lost stream was never told: got {:?}",
            rec.of("away:a")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let got: Vec<Bytes> = rec.of("away:a").into_iter().map(|g| g.1).collect();
    assert!(!got.contains(&Bytes::from("e2.1")), "the second stream was not handed over as whole");
}
