//! Several nodes on one Redis Cluster (`broker = "redis-cluster://..."`) behave as one server,
//! as on one Redis (the cases of `cluster/mod.rs`), and more: each node subscribes with sharded
//! pub/sub only on the master serving a channel, and when a master is killed (SIGKILL) while a
//! publisher runs, its replica takes over and every subscriber ends with every acknowledged
//! publication or was told (4008, then `recovered: false`) and recovered; channels of the other
//! masters lose nothing and are never told. Real processes: a Redis Cluster started by
//! `redis-cli --cluster create`, and `herald` nodes.

#![allow(clippy::unwrap_used)]

mod cluster;
mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{RedisCluster, Server, TIMEOUT};
use herald_client::StreamPosition;
use parking_lot::Mutex;
use serde_json::{json, Value};

fn config(redis: &RedisCluster) -> String {
    format!("broker = \"{}\"\n[namespaces.h]\nhistory_size = 1000\n", redis.url())
}

async fn nodes(redis: &RedisCluster, n: usize) -> Vec<Server> {
    cluster::nodes(&config(redis), n).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publication_on_any_node_reaches_every_subscriber_on_every_node_in_order() {
    let Some(redis) = RedisCluster::start(3, 0) else { return };
    cluster::a_publication_on_any_node_reaches_every_subscriber_on_every_node_in_order(&config(
        &redis,
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_recovers_on_another_node_what_it_missed() {
    let Some(redis) = RedisCluster::start(3, 0) else { return };
    cluster::a_client_recovers_on_another_node_what_it_missed(&config(&redis)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_joining_other_nodes_while_one_publishes_miss_nothing() {
    let Some(redis) = RedisCluster::start(3, 0) else { return };
    cluster::subscribers_joining_other_nodes_while_one_publishes_miss_nothing(&config(&redis))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_lists_the_live_nodes_and_a_dead_one_drops_out() {
    let Some(redis) = RedisCluster::start(3, 0) else { return };
    cluster::every_node_lists_the_live_nodes_and_a_dead_one_drops_out(&config(&redis)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnect_by_user_acts_on_every_node() {
    let Some(redis) = RedisCluster::start(3, 0) else { return };
    cluster::a_disconnect_by_user_acts_on_every_node(&config(&redis)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishers_on_several_nodes_get_contiguous_offsets() {
    let Some(redis) = RedisCluster::start(3, 0) else { return };
    cluster::concurrent_publishers_on_several_nodes_get_contiguous_offsets(&config(&redis)).await;
}

/// The shard channels each master has subscribers of (`PUBSUB SHARDCHANNELS`), by port.
fn shard_channels(redis: &RedisCluster) -> HashMap<u16, Vec<String>> {
    redis
        .live_ports()
        .into_iter()
        .map(|port| {
            let out = redis.cli(port, &["pubsub", "shardchannels", "herald:{h:*"]);
            let mut names: Vec<String> =
                out.lines().filter(|l| !l.is_empty()).map(str::to_string).collect();
            names.sort();
            (port, names)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_subscribe_only_on_the_master_of_each_channel_they_use() {
    let Some(redis) = RedisCluster::start(3, 0) else { return };
    let nodes = nodes(&redis, 2).await;
    let channels = ["h:s0", "h:s1", "h:s2", "h:s3", "h:s4", "h:s5"];
    let (client, mut events) = nodes[1].client().await;
    for c in &channels[..4] {
        client.subscribe(c, None).await.unwrap();
    }
    let mut expected: HashMap<u16, Vec<String>> =
        redis.live_ports().into_iter().map(|p| (p, Vec::new())).collect();
    for c in &channels[..4] {
        expected.get_mut(&redis.master_of(c)).unwrap().push(format!("herald:{{{c}}}"));
    }
    for names in expected.values_mut() {
        names.sort();
    }
    assert_eq!(shard_channels(&redis), expected, "each channel on its master only");
    // Publications through the other node reach the subscriber, from every master.
    let mut api = nodes[0].api().await;
    for c in &channels[..4] {
        api.publish(c, &json!(c)).await.unwrap();
        let (channel, offset, data) = events.next_pub(TIMEOUT).await.unwrap();
        assert_eq!((channel.as_str(), offset, data), (*c, Some(1), json!(c)));
    }
    for c in &channels[..4] {
        client.unsubscribe(c).await.unwrap();
    }
    let deadline = Instant::now() + TIMEOUT;
    while shard_channels(&redis).values().any(|names| !names.is_empty()) {
        assert!(Instant::now() < deadline, "still subscribed: {:?}", shard_channels(&redis));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What one subscriber saw of its channel: each publication with the epoch it belongs to, the
/// epochs it was told it lost publications of, and how often it was disconnected with 4008.
#[derive(Default)]
struct Seen {
    publications: Vec<(String, u64, Value)>,
    told_epochs: HashSet<String>,
    cut: u32,
    /// Each subscribe: since, and the reply's recovered, epoch, offset and publication count.
    replies: Vec<String>,
}

/// Follows `channel` on `node` until `stop`: subscribes (again after each disconnection, from
/// the last position seen) and records what arrives.
async fn follow(base: String, channel: String, seen: Arc<Mutex<Seen>>, stop: Arc<Mutex<bool>>) {
    let mut position: Option<StreamPosition> = None;
    while !*stop.lock() {
        let opened =
            herald_client::Client::connect(&base, herald_client::ConnectOptions::default()).await;
        let Ok((client, mut events, _)) = opened else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let sub = match client.subscribe(&channel, position.clone()).await {
            Ok(sub) => sub,
            Err(_) => {
                // The node is not ready (its broker is failing over): try again.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let mut epoch = sub.epoch.clone().unwrap();
        {
            let mut seen = seen.lock();
            seen.replies.push(format!(
                "since {:?}: recovered {} at {:?}/{:?}, {} publications",
                position.as_ref().map(|p| (&p.epoch, p.offset)),
                sub.recovered,
                sub.epoch,
                sub.offset,
                sub.publications.len()
            ));
            if let Some(p) = &position {
                if !sub.recovered {
                    seen.told_epochs.insert(p.epoch.clone());
                }
            }
            for (offset, data) in &sub.publications {
                seen.publications.push((epoch.clone(), offset.unwrap(), data.clone()));
            }
        }
        if let Some((offset, _)) = sub.publications.last() {
            position = Some(StreamPosition { offset: offset.unwrap(), epoch: epoch.clone() });
        } else if let Some(offset) = sub.offset {
            position = Some(StreamPosition { offset, epoch: epoch.clone() });
        }
        loop {
            if *stop.lock() {
                return;
            }
            match tokio::time::timeout(Duration::from_millis(200), events.recv()).await {
                Ok(Some(herald_client::Event::Pub { offset, epoch: new, data, .. })) => {
                    // The first publication of a new epoch names it.
                    if let Some(new) = new {
                        epoch = new;
                    }
                    let offset = offset.unwrap();
                    seen.lock().publications.push((epoch.clone(), offset, data));
                    position = Some(StreamPosition { offset, epoch: epoch.clone() });
                }
                Ok(Some(herald_client::Event::Ping)) | Err(_) => {}
                Ok(_) => {
                    seen.lock().cut += 1;
                    break;
                }
            }
        }
    }
}

/// What every subscriber of `c` must show: no publication twice; every acknowledged one
/// received, or its epoch told lost; within an epoch, offsets in order, each with the data it
/// was acknowledged with. `log`: the subscriber node's log, for the message.
fn assert_received_or_told(c: &str, s: &Seen, acked: &[(String, u64, Value)], log: &str) {
    let got: HashSet<&(String, u64, Value)> = s.publications.iter().collect();
    assert_eq!(
        got.len(),
        s.publications.len(),
        "{c}: a publication arrived twice: {:?} (told {:?}, cut {})",
        s.publications,
        s.told_epochs,
        s.cut
    );
    for p in acked {
        assert!(
            got.contains(p) || s.told_epochs.contains(&p.0),
            "{c}: {p:?} was neither received nor told lost: received {:?}, told {:?}, cut {}, \
             replies {:?}; subscriber node's log: {log}",
            s.publications,
            s.told_epochs,
            s.cut,
            s.replies
        );
    }
    let by_position: HashMap<(&str, u64), &Value> =
        acked.iter().map(|(e, o, d)| ((e.as_str(), *o), d)).collect();
    for w in s.publications.windows(2) {
        if w[0].0 == w[1].0 {
            assert!(w[0].1 < w[1].1, "{c}: out of order: {w:?}");
        }
    }
    for (e, o, d) in &s.publications {
        if let Some(acked) = by_position.get(&(e.as_str(), *o)) {
            assert_eq!(*acked, d, "{c}: offset {o} carries other data");
        }
    }
}

/// The node's log without per-connection and registry lines.
fn broker_log(node: &Server) -> String {
    let log = node.log();
    let lines: Vec<&str> =
        log.lines().filter(|l| !l.contains("websocket") && !l.contains("registry")).collect();
    lines.join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_master_fails_over_and_every_subscriber_has_everything_or_was_told() {
    let Some(mut redis) = RedisCluster::start(3, 1) else { return };
    let nodes = nodes(&redis, 2).await;
    let channels: Vec<String> = (0..6).map(|i| format!("h:f{i}")).collect();
    let victim = redis.master_of(&channels[0]);
    let on_victim: HashSet<&String> =
        channels.iter().filter(|c| redis.master_of(c) == victim).collect();
    assert!(on_victim.len() < channels.len(), "some channels live on the other masters");
    let stop = Arc::new(Mutex::new(false));
    let mut followers = Vec::new();
    let mut seen: Vec<(String, Arc<Mutex<Seen>>)> = Vec::new();
    for node in &nodes {
        for c in &channels {
            let s = Arc::new(Mutex::new(Seen::default()));
            seen.push((c.clone(), s.clone()));
            followers.push(tokio::spawn(follow(node.ws_url(), c.clone(), s, stop.clone())));
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Publish rounds through node 0 (every channel once per round, retried while the cluster
    // fails over); the master of channel 0 is killed after round 40.
    let mut api = nodes[0].api().await;
    let mut acked: HashMap<String, Vec<(String, u64, Value)>> = HashMap::new();
    const ROUNDS: u64 = 120;
    for round in 1..=ROUNDS {
        if round == 41 {
            redis.kill(victim);
        }
        for c in &channels {
            let data = json!(format!("{c}.{round}"));
            let body = serde_json::to_vec(&json!({"channel": c, "data": data})).unwrap();
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let (status, _, answer) =
                    api.request("POST", "/api/publish", Some(&body)).await.unwrap();
                if status == 200 {
                    let v: Value = serde_json::from_slice(&answer).unwrap();
                    let epoch = v["epoch"].as_str().unwrap().to_string();
                    let offset = v["offset"].as_u64().unwrap();
                    acked.entry(c.clone()).or_default().push((epoch, offset, data.clone()));
                    break;
                }
                assert_eq!(status, 503, "a publish answered {status}");
                assert!(
                    Instant::now() < deadline,
                    "the cluster did not take publishes again: {}",
                    nodes[0].log()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Every subscriber gets (or was told about) everything; wait until each has the last.
    let deadline = Instant::now() + Duration::from_secs(30);
    for (k, (c, s)) in seen.iter().enumerate() {
        let last = acked[c].last().unwrap().clone();
        while !s.lock().publications.contains(&last) {
            if Instant::now() >= deadline {
                let s = s.lock();
                panic!(
                    "{c}: the last publication did not arrive at subscriber {k} (on the killed \
                     master: {}): {} received, last {:?}, told {:?}, cut {}; acked {}, last \
                     {last:?}; node log: {}",
                    on_victim.contains(c),
                    s.publications.len(),
                    s.publications.last(),
                    s.told_epochs,
                    s.cut,
                    acked[c].len(),
                    nodes[k / channels.len()].log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    *stop.lock() = true;
    for f in followers {
        f.await.unwrap();
    }
    let logs: Vec<String> = nodes.iter().map(broker_log).collect();
    for (k, (c, s)) in seen.iter().enumerate() {
        let s = s.lock();
        assert_received_or_told(c, &s, &acked[c], &logs[k / channels.len()]);
        if !on_victim.contains(c) {
            assert!(s.told_epochs.is_empty() && s.cut == 0, "{c} lives elsewhere: never told");
        }
    }
    // The channels of the killed master were told (its replica may lack acknowledged writes)
    // and continue in a new epoch.
    for c in &on_victim {
        let epochs: HashSet<&str> = acked[*c].iter().map(|p| p.0.as_str()).collect();
        assert_eq!(epochs.len(), 2, "{c}: a new epoch after the failover");
    }
}

/// Moves `slot` from the master on `from` to the master on `to` the way `redis-cli --cluster
/// reshard` does: importing and migrating states, the keys moved with `MIGRATE` (`pause`
/// between each step, so commands meet `ASK` and `MOVED`), then the new owner told to every
/// master.
async fn move_slot(redis: &RedisCluster, slot: u16, from: u16, to: u16, pause: Duration) {
    let id = |port: u16| redis.cli(port, &["cluster", "myid"]).trim().to_string();
    let (from_id, to_id) = (id(from), id(to));
    let slot = slot.to_string();
    let ok = |out: String| assert!(out.contains("OK") || out.contains("NOKEY"), "{out}");
    ok(redis.cli(to, &["cluster", "setslot", &slot, "importing", &from_id]));
    ok(redis.cli(from, &["cluster", "setslot", &slot, "migrating", &to_id]));
    tokio::time::sleep(pause).await;
    let keys = redis.cli(from, &["cluster", "getkeysinslot", &slot, "1000"]);
    let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
    if !keys.is_empty() {
        let port = to.to_string();
        let mut args = vec!["migrate", "127.0.0.1", &port, "", "0", "5000", "keys"];
        args.extend(keys.iter().copied());
        ok(redis.cli(from, &args));
    }
    tokio::time::sleep(pause).await;
    for port in redis.live_ports() {
        if redis.cli(port, &["info", "replication"]).contains("role:master") {
            redis.cli(port, &["cluster", "setslot", &slot, "node", &to_id]);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_moved_to_another_master_while_publishing_loses_nothing_silently() {
    // The slot of one channel moves to another master while a publisher runs on another node:
    // publishes keep succeeding (ASK during the move, MOVED after), the subscriber follows
    // the channel to its new master, and ends with every acknowledged publication or was
    // told. A channel of an untouched slot loses nothing and is never told.
    let Some(redis) = RedisCluster::start(3, 0) else { return };
    let nodes = nodes(&redis, 2).await;
    let (moved, still) = ("h:m0".to_string(), "h:m1".to_string());
    let from = redis.master_of(&moved);
    let to = *redis.live_ports().iter().find(|p| **p != from).unwrap();
    let slot: u16 = redis.cli(from, &["cluster", "keyslot", &moved]).trim().parse().unwrap();
    let stop = Arc::new(Mutex::new(false));
    let mut followers = Vec::new();
    let mut seen = Vec::new();
    for c in [&moved, &still] {
        let s = Arc::new(Mutex::new(Seen::default()));
        seen.push((c.clone(), s.clone()));
        followers.push(tokio::spawn(follow(nodes[1].ws_url(), c.clone(), s, stop.clone())));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let publisher = {
        let base = nodes[0].http_base();
        let channels = [moved.clone(), still.clone()];
        tokio::spawn(async move {
            let mut api = herald_client::HttpApi::connect(&base, None).await.unwrap();
            let mut acked: HashMap<String, Vec<(String, u64, Value)>> = HashMap::new();
            for round in 1..=300u64 {
                for c in &channels {
                    let data = json!(format!("{c}.{round}"));
                    let v = api.publish(c, &data).await.expect("every publish succeeds");
                    let epoch = v["epoch"].as_str().unwrap().to_string();
                    let offset = v["offset"].as_u64().unwrap();
                    acked.entry(c.clone()).or_default().push((epoch, offset, data));
                }
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            acked
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    move_slot(&redis, slot, from, to, Duration::from_millis(300)).await;
    let acked = publisher.await.unwrap();
    assert_eq!(redis.master_of(&moved), to, "the slot moved");
    let log = nodes[0].log();
    for redirect in ["redis cluster redirect: ASK", "redis cluster redirect: MOVED"] {
        assert!(log.contains(redirect), "the publisher's node followed {redirect}");
    }
    let deadline = Instant::now() + TIMEOUT * 2;
    for (c, s) in &seen {
        let last = acked[c].last().unwrap().clone();
        while !s.lock().publications.contains(&last) {
            assert!(Instant::now() < deadline, "{c}: the last publication did not arrive");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    *stop.lock() = true;
    for f in followers {
        f.await.unwrap();
    }
    let log = broker_log(&nodes[1]);
    for (c, s) in &seen {
        let s = s.lock();
        assert_received_or_told(c, &s, &acked[c], &log);
        if *c == still {
            assert!(s.told_epochs.is_empty() && s.cut == 0, "{c} did not move: never told");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_on_a_tls_only_cluster_fan_out_and_recover() {
    // Every master speaks only TLS and requires a client certificate (`rediss-cluster://`
    // with `[broker_tls]`): nodes fan out and recover across nodes over it; a node without
    // the client certificate never gets ready.
    let pki = common::TestPki::new();
    let p = |name: &str| pki.path(name).to_str().unwrap().to_string();
    let tls = common::ClusterTls {
        ca: p("ca.pem"),
        server: (p("server.pem"), p("server.key")),
        client: (p("client.pem"), p("client.key")),
    };
    let Some(redis) = RedisCluster::start_tls(3, 0, tls) else { return };
    assert!(redis.url().starts_with("rediss-cluster://"));
    let broker = |client: bool| {
        let mut c =
            format!("broker = \"{}\"\n[broker_tls]\nca_file = \"{}\"\n", redis.url(), p("ca.pem"));
        if client {
            c += &format!(
                "cert_file = \"{}\"\nkey_file = \"{}\"\n",
                p("client.pem"),
                p("client.key")
            );
        }
        c + "[namespaces.h]\nhistory_size = 1000\n"
    };
    cluster::a_client_recovers_on_another_node_what_it_missed(&broker(true)).await;
    let anonymous = Server::start(&broker(false), &[]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (status, _, _) = anonymous.api().await.request("GET", "/readyz", None).await.unwrap();
    assert_eq!(status, 503, "no client certificate, never ready");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_pubsub_connections_to_the_masters_are_caught_up_from_history() {
    // Every master drops the nodes' pub/sub connections three times while a publisher runs
    // into channels of every master: each subscriber gets its whole sequence, in order, once,
    // and no channel is told it lost anything.
    let Some(redis) = RedisCluster::start(3, 0) else { return };
    let nodes = nodes(&redis, 2).await;
    let channels: Vec<String> = (0..6).map(|i| format!("h:k{i}")).collect();
    let masters: HashSet<u16> = channels.iter().map(|c| redis.master_of(c)).collect();
    assert!(masters.len() >= 2, "the channels spread over masters");
    let (client, mut events) = nodes[1].client().await;
    for c in &channels {
        client.subscribe(c, None).await.unwrap();
    }
    const ROUNDS: u64 = 150;
    let pump = {
        let base = nodes[0].http_base();
        let channels = channels.clone();
        tokio::spawn(async move {
            let mut api = herald_client::HttpApi::connect(&base, None).await.unwrap();
            for i in 1..=ROUNDS {
                for c in &channels {
                    api.publish(c, &json!(i)).await.unwrap();
                }
                if i % 20 == 0 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        })
    };
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        for port in redis.live_ports() {
            redis.cli(port, &["client", "kill", "type", "pubsub"]);
        }
    }
    pump.await.unwrap();
    let mut next: HashMap<String, u64> = channels.iter().map(|c| (c.clone(), 1)).collect();
    for _ in 0..ROUNDS * channels.len() as u64 {
        let (channel, offset, data) = events.next_pub(TIMEOUT).await.unwrap();
        let want = next.get_mut(&channel).unwrap();
        assert_eq!((offset, data), (Some(*want), json!(*want)), "{channel}: in order, once");
        *want += 1;
    }
    assert!(events.next_pub(Duration::from_millis(300)).await.is_err(), "no duplicate");
    let m = common::metrics(&nodes[1]).await;
    assert_eq!(common::metric(&m, "herald_broker_channels_lost_total"), 0.0);
    assert!(common::metric(&m, "herald_broker_reconnects_total") >= 1.0, "counted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_gets_ready_while_the_first_listed_address_hangs() {
    // The first address of the URL accepts connections and never answers (a frozen or
    // unreachable host): the node reads the slot map from the others and gets ready.
    let Some(redis) = RedisCluster::start(3, 0) else { return };
    let hang = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hang_addr = hang.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in hang.incoming().flatten() {
            held.push(stream);
        }
    });
    let url = redis.url().replacen("://", &format!("://{hang_addr},"), 1);
    let node =
        Server::start(&format!("broker = \"{url}\"\n[namespaces.h]\nhistory_size = 10\n"), &[]);
    common::wait_ready(&node, TIMEOUT).await;
    let (client, mut events) = node.client().await;
    client.subscribe("h:x", None).await.unwrap();
    node.api().await.publish("h:x", &json!(1)).await.unwrap();
    assert_eq!(events.next_pub(TIMEOUT).await.unwrap().1, Some(1));
}
