//! Gateways on Redis Cluster: several gateways are one netswap (pointers, watches,
//! races, quotas and orphans across them), a gateway killed mid-operation or for good
//! is repaired around, and the cluster failing, failing over or vanishing is survived.
//! The cluster is real (Debian's redis-server), started on loopback.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::cluster::RedisCluster;
use common::proxy::Proxy;
use common::*;
use netswap_proto::*;
use netswap_server::{RunningServer, ServerConfig};
use tokio::sync::Barrier;

/// An in-process gateway on the shared cluster, under `prefix`.
fn gateway(prefix: &str, tweak: impl FnOnce(&mut ServerConfig)) -> RunningServer {
    let mut c = ServerConfig::new("127.0.0.1:0".parse().unwrap());
    c.cluster = Some(cluster_options(prefix));
    c.identity_key = IdentityKey::new(GATEWAY_KEY);
    tweak(&mut c);
    logs();
    netswap_server::spawn(c, 2).expect("gateway starts")
}

/// An in-process gateway (one thread) on a cluster of the test's own, under a fresh
/// prefix (returned).
fn gateway_on(
    cluster: &RedisCluster,
    tweak: impl FnOnce(&mut ServerConfig),
) -> (RunningServer, String) {
    let prefix = fresh_prefix();
    (gateway_at(cluster, &prefix, tweak), prefix)
}

/// An in-process gateway (one thread) on a cluster of the test's own, under `prefix`
/// (another gateway of the same netswap).
fn gateway_at(
    cluster: &RedisCluster,
    prefix: &str,
    tweak: impl FnOnce(&mut ServerConfig),
) -> RunningServer {
    let store = format!("redis-cluster://{}", cluster.nodes().join(","));
    gateway_of(&store, prefix, tweak)
}

/// An in-process gateway (one thread) on the cluster of the store URL `store`
/// (with a password, `rediss-cluster://`, …), under `prefix`.
fn gateway_of(store: &str, prefix: &str, tweak: impl FnOnce(&mut ServerConfig)) -> RunningServer {
    let mut o = netswap_server::ClusterOptions::parse(store).unwrap();
    o.prefix = prefix.to_string();
    o.read_cache = 0; // as `common::cluster_options`
    let mut c = ServerConfig::new("127.0.0.1:0".parse().unwrap());
    c.cluster = Some(o);
    c.identity_key = IdentityKey::new(GATEWAY_KEY);
    tweak(&mut c);
    logs();
    netswap_server::spawn(c, 1).expect("gateway starts")
}

/// A gateway process (so that it can be killed with SIGKILL), serving `/metrics`.
struct GatewayProcess {
    child: Child,
    addr: SocketAddr,
    metrics: SocketAddr,
    /// Its standard error (removed when dropped).
    log: std::path::PathBuf,
}

impl GatewayProcess {
    /// A gateway on the shared cluster under `prefix`, with `extra` options, whose
    /// fault point `fault` (`NETSWAP_FAULT_AT`) happens once.
    fn with_fault(prefix: &str, extra: &[&str], fault: &str) -> GatewayProcess {
        let nodes = common::cluster::shared().nodes();
        GatewayProcess::start(&nodes, prefix, extra, &[("NETSWAP_FAULT_AT", fault)])
    }

    fn start(
        nodes: &[String],
        prefix: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> GatewayProcess {
        let store = format!("redis-cluster://{}", nodes.join(","));
        GatewayProcess::start_on(&store, prefix, extra, env)
    }

    /// A gateway on the store URL `store` (`rediss-cluster://…` too).
    fn start_on(store: &str, prefix: &str, extra: &[&str], env: &[(&str, &str)]) -> GatewayProcess {
        static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let key = std::env::temp_dir().join(format!("netswap-gw-key-{}-{n}", std::process::id()));
        std::fs::write(&key, GATEWAY_KEY).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_netswap-server"));
        cmd.args(["--listen", "127.0.0.1:0", "--threads", "1"])
            .args(["--store", store])
            .arg("--identity-key")
            .arg(&key)
            .args(["--redis-prefix", prefix])
            .args(extra)
            .stdout(Stdio::piped());
        // Its log, kept to say why it did not start, or what it did last when its test
        // fails (each gateway has its own; no colours in a file).
        let log = std::env::temp_dir().join(format!("netswap-gw-log-{}-{n}", std::process::id()));
        cmd.stderr(std::fs::File::create(&log).unwrap())
            .env("NO_COLOR", "1");
        if !extra.contains(&"--lease-ttl") {
            cmd.args(["--lease-ttl", "2"]);
        }
        // A free port of its choosing: one probed free here could be taken (as the
        // source port of some connection) before the gateway binds it.
        cmd.args(["--metrics-listen", "127.0.0.1:0"]);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("gateway binary");
        let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
        let mut second = String::new();
        std::io::BufRead::read_line(&mut stdout, &mut second).unwrap();
        // Read at start (each gateway has its own file: tests run in parallel).
        let _ = std::fs::remove_file(&key);
        let addr = line
            .trim()
            .strip_prefix("netswap-server listening on ")
            .unwrap_or_else(|| {
                let _ = child.wait();
                panic!(
                    "unexpected first line {line:?}; the gateway's log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            })
            .parse()
            .unwrap();
        let metrics = second
            .trim()
            .strip_prefix("netswap-server metrics on ")
            .unwrap_or_else(|| panic!("unexpected second line {second:?}"))
            .parse()
            .unwrap();
        GatewayProcess {
            child,
            addr,
            metrics,
            log,
        }
    }

    /// The value of `name` on its `/metrics` now.
    fn metric(&self, name: &str) -> f64 {
        metric(&common::scrape(self.metrics), name)
    }

    /// Its highest resident memory over the next 3 s, MiB, sampled every 100 ms.
    async fn peak_rss_mib(&self) -> u64 {
        let mut peak = self.rss_mib();
        for _ in 0..30 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            peak = peak.max(self.rss_mib());
        }
        peak
    }

    /// Its resident memory, MiB.
    fn rss_mib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap()
            / 1024
    }

    fn kill(mut self) {
        let _ = self.child.kill(); // SIGKILL: no goodbye
        let _ = self.child.wait();
    }

    fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            // The test failed: the end of the gateway's log goes into its output.
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!(
                "the last {} lines of the log of the gateway on {}:\n{}",
                lines.len().min(LOG_LINES_SHOWN),
                self.addr,
                lines[lines.len().saturating_sub(LOG_LINES_SHOWN)..].join("\n")
            );
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Lines of a gateway process's log shown when its test fails.
const LOG_LINES_SHOWN: usize = 100;

/// A loopback address nothing listens on now (for a gateway process's `/metrics`, or
/// a node that is down).
fn unused_address() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// The gateways' warnings and errors in each test's captured output, shown when it
/// fails (`RUST_LOG` picks other levels; `--nocapture` shows them as they come).
/// Called by every helper that starts an in-process gateway: its threads are started
/// from the test's, and print into the test's output. (A failure of CI's run once
/// showed only its assertion, not why the gateway's lease renewals had failed.)
fn logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("netswap_server=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .with_ansi(false)
        .try_init();
}

async fn eventually(what: &str, limit: Duration, mut f: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while !f().await {
        assert!(start.elapsed() < limit, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn status(m: &Msg) -> Status {
    m.status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pointer_made_through_one_gateway_works_through_another() {
    let prefix = fresh_prefix();
    let (a, b) = (gateway(&prefix, |_| {}), gateway(&prefix, |_| {}));
    let mut owner = Raw::connect(a.addr(), 2).await;
    let mut other = Raw::connect(b.addr(), 3).await;
    let p = owner
        .create(
            Access::READ | Access::WRITE | Access::TAKEOVER,
            &b"made on A"[..],
        )
        .await;
    assert_eq!(other.read(p).await, data(b"made on A"));
    // A watch on B sees a change made through A.
    other.send(50, &Request::watch(p)).await;
    assert_eq!(other.reply_to(50).await.status(), Status::Ok);
    assert_eq!(
        owner
            .ask(Request::WriteAt {
                ptr: p,
                offset: 0,
                data: Bytes::from_static(b"MADE"),
            })
            .await,
        Reply::Written(2)
    );
    let n = other.reply_to(50).await;
    assert_eq!(
        Reply::parse(None, n.status, n.arg, n.payload).unwrap(),
        Reply::Notify {
            event: Event::Changed,
            ptr: p,
            version: 2,
            delta: None
        }
    );
    // TAKEOVER through B, then the old owner is refused through A.
    assert_eq!(other.ask(Request::Takeover { ptr: p }).await, Reply::Done);
    let n = other.reply_to(50).await;
    assert_eq!(n.arg, Event::OwnerChanged as u8);
    assert_eq!(
        owner.call(Request::Delete { ptr: p }).await.status(),
        Status::AccessViolation
    );
    assert_eq!(other.ask(Request::Delete { ptr: p }).await, Reply::Done);
    let n = other.reply_to(50).await;
    assert_eq!(n.arg, Event::Deleted as u8);
    assert_eq!(
        owner
            .call(Request::Read {
                ptr: p,
                range: None
            })
            .await
            .status(),
        Status::AddressFault
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_and_replace_if_races_through_two_gateways_have_one_winner() {
    let prefix = fresh_prefix();
    let gws = [gateway(&prefix, |_| {}), gateway(&prefix, |_| {})];
    let mut owner = Raw::connect(gws[0].addr(), 2).await;
    for round in 0..10 {
        let p = owner
            .create(
                Access::READ | Access::WRITE | Access::TAKEOVER,
                &b"race"[..],
            )
            .await;
        let racers = 8usize;
        let barrier = Arc::new(Barrier::new(racers));
        let mut tasks = Vec::new();
        for i in 0..racers {
            let addr = gws[i % 2].addr();
            let barrier = barrier.clone();
            tasks.push(tokio::spawn(async move {
                let mut c = Raw::connect(addr, 10 + i as u8).await;
                barrier.wait().await;
                let take = c.call(Request::Takeover { ptr: p }).await;
                let cas = c
                    .call(Request::ReplaceIf {
                        ptr: p,
                        expected: 1,
                        data: Bytes::from(format!("racer {i}")),
                    })
                    .await;
                (status(&take), status(&cas))
            }));
        }
        let mut takes = 0;
        let mut writes = 0;
        for t in tasks {
            let (take, cas) = t.await.unwrap();
            match take {
                Status::Ok => takes += 1,
                Status::AccessViolation => {}
                s => panic!("takeover: {s:?}"),
            }
            match cas {
                Status::Ok => writes += 1,
                Status::Conflict | Status::AccessViolation => {}
                s => panic!("replace_if: {s:?}"),
            }
        }
        assert_eq!(takes, 1, "round {round}: exactly one TAKEOVER wins");
        assert_eq!(
            writes, 1,
            "round {round}: exactly one REPLACE_IF at version 1 wins"
        );
    }
}

/// A gateway decides a write on the state it last saw of the record and commits it
/// at once; the commit's revision check must catch every way that state can go
/// stale through another gateway, and the request must then be decided again on
/// the record as it is (not answered from the stale state).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_decided_on_a_stale_state_are_decided_again() {
    let prefix = fresh_prefix();
    let (a, b) = (gateway(&prefix, |_| {}), gateway(&prefix, |_| {}));
    let mut owner = Raw::connect(b.addr(), 2).await;
    let mut writer = Raw::connect(a.addr(), 3).await;
    let replace = |ptr, d: &'static [u8]| Request::Replace {
        ptr,
        data: Bytes::from_static(d),
    };
    let p = owner.create(Access::READ | Access::WRITE, &b"v1"[..]).await;
    // Gateway A sees the record at version 2 (its write).
    assert_eq!(writer.ask(replace(p, b"v2")).await, Reply::Written(2));
    // Version 3 through B: A's state is stale, and a REPLACE_IF decided on it would
    // be a conflict.
    assert_eq!(owner.ask(replace(p, b"v3")).await, Reply::Written(3));
    let cas = |expected, d: &'static [u8]| Request::ReplaceIf {
        ptr: p,
        expected,
        data: Bytes::from_static(d),
    };
    assert_eq!(writer.ask(cas(3, b"v4")).await, Reply::Written(4));
    assert_eq!(writer.ask(cas(3, b"no")).await, Reply::Conflict(4));
    // A stale state that would allow the write: B takes WRITE away.
    assert_eq!(
        owner
            .ask(Request::SetAccess {
                ptr: p,
                access: Access::READ
            })
            .await,
        Reply::Done
    );
    assert_eq!(
        writer.call(replace(p, b"refused")).await.status(),
        Status::AccessViolation
    );
    assert_eq!(
        writer
            .call(Request::WriteAt {
                ptr: p,
                offset: 0,
                data: Bytes::from_static(b"X")
            })
            .await
            .status(),
        Status::AccessViolation
    );
    assert_eq!(owner.read(p).await, data(b"v4"));
    // A stale state of a record deleted through B.
    let q = owner.create(Access::READ | Access::WRITE, &b"q1"[..]).await;
    assert_eq!(writer.ask(replace(q, b"q2")).await, Reply::Written(2));
    assert_eq!(owner.ask(Request::Delete { ptr: q }).await, Reply::Done);
    assert_eq!(
        writer.call(replace(q, b"gone")).await.status(),
        Status::AddressFault
    );
    assert_eq!(
        owner
            .call(Request::Read {
                ptr: q,
                range: None
            })
            .await
            .status(),
        Status::AddressFault
    );
    // A takeover through B: the old state names the old owner.
    let r = owner
        .create(Access::READ | Access::WRITE | Access::TAKEOVER, &b"r1"[..])
        .await;
    assert_eq!(owner.ask(replace(r, b"r2")).await, Reply::Written(2));
    assert_eq!(writer.ask(replace(r, b"r3")).await, Reply::Written(3));
    let mut taker = Raw::connect(b.addr(), 4).await;
    assert_eq!(taker.ask(Request::Takeover { ptr: r }).await, Reply::Done);
    assert_eq!(
        taker
            .ask(Request::SetAccess {
                ptr: r,
                access: Access::READ
            })
            .await,
        Reply::Done
    );
    assert_eq!(
        writer.call(replace(r, b"refused")).await.status(),
        Status::AccessViolation
    );
    assert_eq!(owner.read(r).await, data(b"r3"));
}

/// A write on a record the gateway has seen costs one Redis round trip (the commit
/// script), not two (a load, then the commit); with `--redis-state-cache 0` it also
/// loads. A load is plain commands, no script (`HMGET`, then `STRLEN` and
/// `GETRANGE` or a `GET`, then `HGET`; only the `HMGET` when the record's bytes were
/// last seen in its state hash), and so is a READ. A write on a record nobody watches publishes nothing;
/// once a connection (on another gateway) watches it, every write publishes its
/// event. Counted by the cluster's own `INFO commandstats`, on a cluster of this
/// test's own (the shared one serves other tests at the same time).
/// REPLACEs `p`'s bytes with `bytes`, which must make it version `version`.
async fn replace_as(c: &mut Raw, p: Pointer, bytes: &'static [u8], version: u64) {
    assert_eq!(
        c.ask(Request::Replace {
            ptr: p,
            data: Bytes::from_static(bytes),
        })
        .await,
        Reply::Written(version)
    );
}

/// The next message for the watch `xid` is "`p` changed, now version `version`".
async fn changed_event(w: &mut Raw, xid: u32, p: Pointer, version: u64) {
    let n = w.reply_to(xid).await;
    assert_eq!(
        Reply::parse(None, n.status, n.arg, n.payload).unwrap(),
        Reply::Notify {
            event: Event::Changed,
            ptr: p,
            version,
            delta: None
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_on_a_record_seen_before_takes_one_round_trip() {
    let cluster = common::cluster::RedisCluster::start(3, 0, false);
    let start = |prefix: &str, cache: usize| {
        gateway_at(&cluster, prefix, |c| {
            c.cluster.as_mut().expect("a gateway").state_cache = cache;
        })
    };
    const WRITES: u64 = 200;
    let mut per_write = Vec::new();
    for cache in [65_536, 0] {
        let prefix = fresh_prefix();
        let gw = start(&prefix, cache);
        let mut c = Raw::connect(gw.addr(), 2).await;
        let p = c.create(Access::READ | Access::WRITE, &b"0"[..]).await;
        assert_eq!(c.read(p).await, data(b"0"));
        let scripts = || cluster.calls("evalsha") + cluster.calls("eval");
        let loads = || cluster.calls("hmget");
        let data_key = || cluster.calls("strlen") + cluster.calls("get");
        let before = (scripts(), loads(), data_key());
        for _ in 0..WRITES {
            assert_eq!(c.read(p).await, data(b"0"));
        }
        // (The reaper's lock and the record counts for the metrics add a `GET` or
        // a `STRLEN` now and then, and a pass renewing the gateway's leases, every
        // 5 s, an `EVALSHA`: it failed this once in six runs of the server's tests.)
        let (s, l, d) = (
            scripts() - before.0,
            loads() - before.1,
            data_key() - before.2,
        );
        assert!(
            s < 3 && (WRITES..WRITES + 5).contains(&l),
            "{WRITES} READs: {s} script calls, {l} loads; expected none (but a lease renewal), and one each"
        );
        if cache > 0 {
            // Its bytes were seen in its state hash: each load is that one `HMGET`.
            assert!(
                d < 5,
                "{WRITES} READs of a small record: {d} data-key commands"
            );
        } else {
            assert!((WRITES..WRITES + 5).contains(&d), "{d} data-key commands");
        }
        if cache > 0 {
            // A record created through this gateway: its first write is decided on
            // the state the create left, without a load. (Each commit runs one
            // `HMGET` itself: 40 for 20 creates and 20 writes.)
            let before = loads() + 40;
            for i in 0..20u8 {
                let r = c.create(Access::READ | Access::WRITE, vec![i]).await;
                assert_eq!(
                    c.ask(Request::Replace {
                        ptr: r,
                        data: Bytes::from(vec![i, i]),
                    })
                    .await,
                    Reply::Written(2)
                );
            }
            let n = loads().saturating_sub(before);
            assert!(n < 5, "20 first writes after a create loaded {n} times");
            // A big record: its bytes come with the load only for a caller the
            // remembered state allows to read them (else the load stops at 16 KiB and
            // the bytes follow once the loaded state allows them).
            let big = Bytes::from(vec![7u8; 1 << 20]);
            let q = c.create(Access::WRITE, big.clone()).await;
            let mut stranger = Raw::connect(gw.addr(), 4).await;
            let read = Request::Read {
                ptr: q,
                range: None,
            };
            let moved = || cluster.net_output_bytes();
            for _ in 0..3 {
                let before = moved();
                assert_eq!(
                    stranger.call(read.clone()).await.status(),
                    Status::AccessViolation
                );
                // (The INFO replies that count are themselves counted: a few KiB.)
                let n = moved() - before;
                assert!(n < 64 * 1024, "a refused READ of 1 MiB moved {n} bytes");
            }
            assert_eq!(c.read(q).await, data(&big));
            for _ in 0..3 {
                let before = (cluster.calls("getrange"), cluster.calls("get"));
                assert_eq!(c.read(q).await, data(&big));
                let (ranges, gets) = (
                    cluster.calls("getrange") - before.0,
                    cluster.calls("get") - before.1,
                );
                // (A `GET` of the reaper's lock may fall in between.)
                assert!(
                    ranges == 0 && (1..=2).contains(&gets),
                    "an allowed READ of a remembered record gets it all at once: \
                     {ranges} GETRANGE, {gets} GET"
                );
            }
        }
        let before = (scripts(), loads());
        let published = cluster.calls("spublish");
        let looked = || cluster.calls("pubsub|shardnumsub");
        let looked_before = looked();
        for i in 0..WRITES {
            assert_eq!(
                c.ask(Request::Replace {
                    ptr: p,
                    data: Bytes::from(format!("{:08}", i + 1)),
                })
                .await,
                Reply::Written(i + 2)
            );
        }
        // (Each write's commit runs one `HMGET` of its own.)
        per_write.push((
            (scripts() - before.0) as f64 / WRITES as f64,
            (loads() - before.1).saturating_sub(WRITES) as f64 / WRITES as f64,
        ));
        assert_eq!(
            cluster.calls("spublish") - published,
            0,
            "writes on a record nobody watches publish nothing"
        );
        assert_eq!(
            looked() - looked_before,
            0,
            "writes on a record never watched do not look for subscribers"
        );
        assert_eq!(c.read(p).await, data(format!("{WRITES:08}").as_bytes()));
        // Watched through another gateway: each write publishes its event once, and
        // the watcher gets every one.
        let other = start(&prefix, cache);
        let mut w = Raw::connect(other.addr(), 3).await;
        w.send(7, &Request::watch(p)).await;
        assert_eq!(w.reply_to(7).await.status(), Status::Ok);
        let published = cluster.calls("spublish");
        for i in 0..5 {
            let v = WRITES + 2 + i;
            replace_as(&mut c, p, b"watched", v).await;
            changed_event(&mut w, 7, p, v).await;
        }
        assert_eq!(cluster.calls("spublish") - published, 5);
        // The watcher's gateway goes (and its subscription with it): the next write
        // finds nobody subscribed and clears the record's mark, and the writes after
        // it do not look for subscribers any more.
        let meta = format!("{prefix}:{{r:{p}}}:m");
        assert!(cluster.hgetall(&meta).contains_key("w"), "marked watched");
        drop(w);
        drop(other);
        let mut v = WRITES + 7;
        eventually("the mark is cleared", Duration::from_secs(10), async || {
            replace_as(&mut c, p, b"unwatched", v).await;
            v += 1;
            !cluster.hgetall(&meta).contains_key("w")
        })
        .await;
        let (published, looked_before) = (cluster.calls("spublish"), looked());
        for _ in 0..10 {
            replace_as(&mut c, p, b"unwatched", v).await;
            v += 1;
        }
        assert_eq!(
            (
                cluster.calls("spublish") - published,
                looked() - looked_before
            ),
            (0, 0),
            "no longer watched: no look for subscribers, nothing published"
        );
        // Watched again: marked again, and the events come.
        let again = start(&prefix, cache);
        let mut w = Raw::connect(again.addr(), 3).await;
        w.send(8, &Request::watch(p)).await;
        assert_eq!(w.reply_to(8).await.status(), Status::Ok);
        assert!(cluster.hgetall(&meta).contains_key("w"), "marked again");
        replace_as(&mut c, p, b"watched again", v).await;
        changed_event(&mut w, 8, p, v).await;
        drop(w);
        drop(again);
        let v = v + 1;
        // Redis forgets its scripts (a restart, a promoted replica, SCRIPT FLUSH):
        // the gateway loads them again and the write goes through.
        cluster.flush_scripts();
        assert_eq!(
            c.ask(Request::Replace {
                ptr: p,
                data: Bytes::from_static(b"after a flush"),
            })
            .await,
            Reply::Written(v)
        );
        assert_eq!(c.read(p).await, data(b"after a flush"));
    }
    // Leases and the reaper add a few calls of their own while the test runs.
    let (cached, uncached) = (per_write[0], per_write[1]);
    assert!(
        cached.0 < 1.25 && cached.1 < 0.05,
        "with the state cache: {:.2} script calls and {:.2} loads per write",
        cached.0,
        cached.1
    );
    assert!(
        uncached.0 < 1.25 && (1.0..1.05).contains(&uncached.1),
        "without it: {:.2} script calls and {:.2} loads per write",
        uncached.0,
        uncached.1
    );
}

/// The scripts a gateway runs (`scripts::all`).
const SCRIPTS: u64 = 12;

/// A replica of `cluster` is promoted (`CLUSTER FAILOVER`) and has every script
/// within seconds, without a request (`SCRIPT LOAD` is not replicated).
async fn a_promoted_replica_gets_the_scripts(cluster: &RedisCluster) {
    let primaries = cluster.primaries();
    let replica = *cluster
        .ports
        .iter()
        .find(|p| !primaries.contains(p))
        .unwrap();
    assert_eq!(
        cluster.scripts_on(replica),
        0,
        "Redis replicates no SCRIPT LOAD"
    );
    assert!(
        cluster
            .cli(replica, &["CLUSTER", "FAILOVER"])
            .contains("OK")
    );
    eventually(
        "the promoted replica has the scripts without a request",
        Duration::from_secs(10),
        async || cluster.primaries().contains(&replica) && cluster.scripts_on(replica) == SCRIPTS,
    )
    .await;
}

/// A gateway loads its scripts on every primary before its first request, and on a
/// replica promoted by a failover before a request meets it there (`SCRIPT LOAD` is
/// not replicated). When Redis forgets them under a burst of writes (a restart,
/// `SCRIPT FLUSH`), the writes that meet `NOSCRIPT` load them all again, once for
/// those that met it together, and every write goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_are_loaded_before_they_are_needed_and_once_when_forgotten() {
    const WRITES: usize = 64;
    let cluster = common::cluster::RedisCluster::start(3, 1, false);
    let (gw, _) = gateway_on(&cluster, |_| {});
    let primaries = cluster.primaries();
    for &p in &primaries {
        assert_eq!(
            cluster.scripts_on(p),
            SCRIPTS,
            "primary {p} before any request"
        );
    }
    a_promoted_replica_gets_the_scripts(&cluster).await;

    let mut c = Raw::connect(gw.addr(), 2).await;
    let mut records = Vec::new();
    for i in 0..WRITES {
        records.push(c.create(Access::READ | Access::WRITE, vec![i as u8]).await);
    }
    cluster.flush_scripts();
    let primaries = cluster.primaries();
    let loads = || {
        primaries
            .iter()
            .map(|&p| cluster.calls_on(p, "script|load"))
            .collect::<Vec<_>>()
    };
    let before = loads();
    let requests = records
        .iter()
        .map(|&ptr| Request::Replace {
            ptr,
            data: Bytes::from_static(b"after a flush"),
        })
        .collect();
    for (i, reply) in pipelined(&mut c, requests).await.into_iter().enumerate() {
        assert_eq!(reply, Reply::Written(2), "write {i}");
    }
    for (i, &p) in records.iter().enumerate() {
        assert_eq!(c.read(p).await, data(b"after a flush"), "record {i}");
    }
    for ((p, b), a) in primaries.iter().zip(before).zip(loads()) {
        // One load of every script; two if a write met NOSCRIPT again after it.
        assert!(
            a - b <= 2 * SCRIPTS,
            "primary {p}: {} SCRIPT LOADs for {WRITES} writes that met NOSCRIPT",
            a - b
        );
    }
}

/// A gateway's subscriptions are dropped (a network blip): writes in the gap find
/// nobody subscribed and clear the record's watched mark. The gateway subscribes
/// again, marks the record again, tells its watcher what changed meanwhile, and the
/// writes after that are delivered as events again. Its first try at marking and
/// loading the record fails here (`NETSWAP_FAULT_AT=resync-fails`, as when the
/// connection for commands is stuck at that moment): it tries again. It gave up
/// after one failure, and then the mark stayed cleared and the watcher heard
/// nothing more (the soak with watchers under failovers: a mirror stuck from 37 s
/// into the run while its record went on for 1,400 versions).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_outlives_its_subscription_being_dropped() {
    let cluster = RedisCluster::start(3, 0, false);
    let (writer, prefix) = gateway_on(&cluster, |_| {});
    let watcher = GatewayProcess::start(
        &cluster.nodes(),
        &prefix,
        &[],
        &[("NETSWAP_FAULT_AT", "resync-fails")],
    );
    let mut c = Raw::connect(writer.addr(), 2).await;
    let p = c.create(Access::READ | Access::WRITE, &b"0"[..]).await;
    let meta = format!("{prefix}:{{r:{p}}}:m");
    let mut w = Raw::connect(watcher.addr, 3).await;
    w.send(7, &Request::watch(p)).await;
    assert_eq!(w.reply_to(7).await.status(), Status::Ok);
    replace_as(&mut c, p, b"1", 2).await;
    changed_event(&mut w, 7, p, 2).await;
    // The record's primary takes no new connection for a while (the writer's stay):
    // the watcher's gateway cannot subscribe again before the writes in the gap.
    let mut admin = std::net::TcpStream::connect(("127.0.0.1", cluster.primary_of(&meta))).unwrap();
    let mut inline = |command: &str| {
        use std::io::{Read, Write};
        admin
            .write_all(format!("{command}\r\n").as_bytes())
            .unwrap();
        let mut reply = [0u8; 64];
        let n = admin.read(&mut reply).unwrap();
        String::from_utf8_lossy(&reply[..n]).trim().to_string()
    };
    assert_eq!(inline("CONFIG SET maxclients 1"), "+OK");
    // Closed as a network blip would.
    assert_eq!(
        inline("CLIENT KILL TYPE pubsub"),
        ":1",
        "the watcher's gateway subscribed"
    );
    // Each write finds nobody subscribed (the first clears the mark); the watcher
    // learns of them from the resync once it has subscribed again.
    let mut v = 3;
    for _ in 0..3 {
        replace_as(&mut c, p, b"in the gap", v).await;
        v += 1;
    }
    assert_eq!(
        inline(&format!("HEXISTS {meta} w")),
        ":0",
        "nobody subscribed: the mark went"
    );
    assert_eq!(inline(&format!("HEXISTS {meta} r")), ":1");
    assert_eq!(inline("CONFIG SET maxclients 10000"), "+OK");
    let last_in_gap = v - 1;
    let mut seen = 0;
    while seen < last_in_gap {
        seen = tokio::time::timeout(Duration::from_secs(10), next_change(&mut w, 7, p))
            .await
            .expect("the watcher hears what changed in the gap within 10 s")
            .0;
    }
    eventually(
        "marked watched again",
        Duration::from_secs(10),
        async || cluster.hgetall(&meta).contains_key("w"),
    )
    .await;
    // Live events again, each write's own.
    for _ in 0..3 {
        replace_as(&mut c, p, b"after", v).await;
        changed_event(&mut w, 7, p, v).await;
        v += 1;
    }
}

/// A gateway whose connection for subscriptions to a primary drops (a blip, no
/// failover) loses its subscriptions there, and any watch made before that
/// connection is back lands on the primary's replica, where commits do not look
/// for subscribers. Both were silent: the `redis` crate subscribes again with one
/// `SSUBSCRIBE` naming every channel it had on that node, which Redis refuses
/// (`CROSSSLOT`) when they are of more than one slot, and sends a subscription to a
/// replica when the primary's connection is down. Without the gateway's count of its
/// subscriptions on the primaries, neither watch heard of its record again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_made_before_and_during_a_blip_to_their_primary_hear_their_records_after_it() {
    let cluster = RedisCluster::start(3, 1, false);
    watches_hear_their_records_after_a_blip(&cluster).await;
}

/// The test above on `cluster` (its own: the blip changes a primary's settings for a
/// while): two records of one primary, of different slots, watched through another
/// gateway than the writes', one watch made before and one during a blip of the
/// watcher's subscriptions to that primary; both hear every write after it.
async fn watches_hear_their_records_after_a_blip(cluster: &RedisCluster) {
    let (writer, prefix) = gateway_on(cluster, |_| {});
    let watcher = gateway_at(cluster, &prefix, |c| {
        c.metrics_listen = Some("127.0.0.1:0".parse().unwrap())
    });
    let mut c = Raw::connect(writer.addr(), 2).await;
    // Two records of one primary, of different slots.
    let first = c.create(Access::READ | Access::WRITE, &b"0"[..]).await;
    let meta_of = |p: Pointer| format!("{prefix}:{{r:{p}}}:m");
    let primary = cluster.primary_of(&meta_of(first));
    let second = loop {
        let p = c.create(Access::READ | Access::WRITE, &b"0"[..]).await;
        if cluster.primary_of(&meta_of(p)) == primary {
            break p;
        }
    };
    let channel = format!("{prefix}:{{r:{second}}}:e");
    let replica = cluster.replicas_of(primary)[0];
    let mut w = Raw::connect(watcher.addr(), 3).await;
    w.send(7, &Request::watch(first)).await;
    assert_eq!(w.reply_to(7).await.status(), Status::Ok);
    // The primary takes no new connection for a while, and the watcher's gateway's
    // connection for subscriptions to it is closed as a network blip would.
    let mut admin = cluster.primary_connection(&meta_of(first));
    let mut on_primary = |args: &[&str]| -> redis::Value {
        redis::cmd(args[0])
            .arg(&args[1..])
            .query(&mut admin)
            .unwrap()
    };
    on_primary(&["CONFIG", "SET", "maxclients", "1"]);
    assert_eq!(
        on_primary(&["CLIENT", "KILL", "TYPE", "pubsub"]),
        redis::Value::Int(1),
        "the watcher's gateway subscribed"
    );
    // The watch is made as a client would: again after each BUSY. While the
    // primary is out of reach, the crate sends the `SSUBSCRIBE` to another node: a
    // node of another shard answers `MOVED` to the primary (BUSY), the primary's
    // replica takes it.
    let blip = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        w.send(8, &Request::watch(second)).await;
        let r = w.reply_to(8).await;
        match r.status() {
            Status::Ok => break,
            Status::Busy if blip.elapsed() < Duration::from_secs(20) => {}
            s => panic!("the watch during the blip: {s:?} {}", r.reason()),
        }
    }
    assert_eq!(
        cluster.shard_subscribers_on(replica, &channel),
        1,
        "the watch made during the blip subscribed on the replica"
    );
    // Writes during the blip find nobody subscribed on the primary.
    replace_as(&mut c, first, b"in the gap", 2).await;
    replace_as(&mut c, second, b"in the gap", 2).await;
    replace_as(&mut c, second, b"in the gap", 3).await;
    on_primary(&["CONFIG", "SET", "maxclients", "10000"]);
    for (xid, p, v) in [(7, first, 2), (8, second, 3)] {
        let mut seen = 0;
        while seen < v {
            seen = tokio::time::timeout(Duration::from_secs(10), next_change(&mut w, xid, p))
                .await
                .unwrap_or_else(|_| panic!("watch {xid} heard of version {v} within 10 s"))
                .0;
        }
    }
    assert!(
        metric(
            &scrape(watcher.metrics_addr().unwrap()),
            "netswap_redis_subscriptions_missing_total"
        ) >= 1.0,
        "the gateway found subscriptions missing (if the crate subscribes again one channel \
         at a time, as docs/upstream/redis-rs-ssubscribe-crossslot.md proposes, both watches \
         hear without it)"
    );
    // Live events again, each write's own, for both.
    for v in 4..7 {
        replace_as(&mut c, first, b"after", v - 1).await;
        changed_event(&mut w, 7, first, v - 1).await;
        replace_as(&mut c, second, b"after", v).await;
        changed_event(&mut w, 8, second, v).await;
    }
    assert_eq!(cluster.shard_subscribers_on(primary, &channel), 1);
}

/// A cluster whose nodes announce hostnames (`cluster-preferred-endpoint-type
/// hostname`, as deployments with TLS or Kubernetes do): the `redis` crate routes by
/// `CLUSTER SLOTS` and connects to `localhost:PORT`, while `CLUSTER NODES` names
/// `127.0.0.1:PORT`. What a gateway sends to one node it picked from the layout
/// (`WAIT` to the node that applied a commit, the scripts on a promoted replica,
/// `count_records`' scan, the count of its subscriptions after a blip) must reach the
/// node by the crate's name for it: by `CLUSTER NODES`' name, the crate knew no such
/// connection, every acknowledged write failed, and watches stayed deaf after a blip.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_that_announces_hostnames_is_served_in_full() {
    let cluster = RedisCluster::start_announcing_hostnames(3, 1);
    cluster.assert_announces_hostnames();
    // Writes acknowledged when a replica has them too (`WAIT` to the primary).
    let (gw, _) = gateway_on(&cluster, |c| {
        c.cluster.as_mut().expect("a gateway").wait_replicas = 1;
    });
    let mut c = Raw::connect(gw.addr(), 2).await;
    let p = c.create(Access::READ | Access::WRITE, &b"0"[..]).await;
    replace_as(&mut c, p, b"acknowledged", 2).await;
    assert_eq!(c.read(p).await, data(b"acknowledged"));
    assert_eq!(
        gw.stats()
            .count_records()
            .await
            .expect("a scan of every primary"),
        (1, 12)
    );
    a_promoted_replica_gets_the_scripts(&cluster).await;
    tokio::task::block_in_place(|| cluster.wait_healthy());
    watches_hear_their_records_after_a_blip(&cluster).await;
}

/// A measurement, not a check (run it on purpose, in a release build: `cargo test
/// --release -p netswap-server --test cluster -- --ignored --nocapture
/// renewing_every_subscription`): how long a gateway with thousands of watched
/// records takes to have all of them subscribed on the primaries again after a blip
/// of its connection for subscriptions (every primary closes its subscribers'
/// connections; the gateway's count finds them missing and renews them all on a new
/// connection), and what that costs Redis. `NETSWAP_MEASURE_WATCHED` records
/// (default 5,000). docs/BENCHMARKS.md has the figures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: run it on purpose, in a release build"]
async fn renewing_every_subscription_of_thousands_of_watched_records() {
    let n: usize = std::env::var("NETSWAP_MEASURE_WATCHED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000);
    let cluster = RedisCluster::start(3, 0, false);
    let (gw, prefix) = gateway_on(&cluster, |c| {
        c.metrics_listen = Some("127.0.0.1:0".parse().unwrap())
    });
    let mut c = Raw::connect(gw.addr(), 2).await;
    let ptrs = records(&mut c, n).await;
    let mut w = Raw::connect(gw.addr(), 3).await;
    watch_all(&mut w, &ptrs).await;
    let primaries = cluster.primaries();
    let pattern = format!("{prefix}:*");
    let channels = || -> usize {
        primaries
            .iter()
            .map(|&p| {
                cluster
                    .cli(p, &["PUBSUB", "SHARDCHANNELS", &pattern])
                    .lines()
                    .filter(|l| !l.is_empty())
                    .count()
            })
            .sum()
    };
    eventually(
        "every watch subscribed",
        Duration::from_secs(30),
        async || channels() == n,
    )
    .await;
    let calls = |command: &str| -> u64 {
        primaries
            .iter()
            .map(|&p| cluster.calls_on(p, command))
            .sum()
    };
    let before = ["ssubscribe", "evalsha", "hmget", "client|info"].map(calls);
    let blip = Instant::now();
    for &p in &primaries {
        cluster.cli(p, &["CLIENT", "KILL", "TYPE", "pubsub"]);
    }
    let mut lowest = n;
    loop {
        let now = channels();
        lowest = lowest.min(now);
        if now == n && lowest < n {
            break;
        }
        assert!(
            blip.elapsed() < Duration::from_secs(60),
            "{now} of {n} after 60 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let back = blip.elapsed();
    // The resyncs (a mark and a load each) go on after the subscriptions.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = ["ssubscribe", "evalsha", "hmget", "client|info"].map(calls);
    let m = scrape(gw.metrics_addr().unwrap());
    println!(
        "{n} watched records: all {n} subscribed on the primaries again {:.2} s after the blip (lowest {lowest}); renewals for missing subscriptions: {}; Redis calls meanwhile: SSUBSCRIBE {}, EVALSHA {}, HMGET {}, CLIENT INFO {}",
        back.as_secs_f64(),
        metric(&m, "netswap_redis_subscriptions_missing_total"),
        after[0] - before[0],
        after[1] - before[1],
        after[2] - before[2],
        after[3] - before[3],
    );
}

/// A record created through `writer` (by identity 2, the returned writer), watched
/// through `watcher` by a state watch (identity 3, XID 7) and a data watch (identity
/// 4, XID 9), both of which heard of its version 2 (the data watch with the bytes).
async fn watched_both_ways(writer: SocketAddr, watcher: SocketAddr) -> (Raw, Raw, Raw, Pointer) {
    let mut c = Raw::connect(writer, 2).await;
    let mut w = Raw::connect(watcher, 3).await;
    let mut d = Raw::connect(watcher, 4).await;
    let p = c.create(Access::READ | Access::WRITE, &b"0"[..]).await;
    watch_ok(&mut w, 7, p, false).await;
    watch_ok(&mut d, 9, p, true).await;
    replace_as(&mut c, p, b"1", 2).await;
    changed_event(&mut w, 7, p, 2).await;
    assert!(
        next_change(&mut d, 9, p).await.1,
        "a data watch's event has the bytes"
    );
    (c, w, d, p)
}

/// `w` watches `p` with XID `xid` (`data`: a data watch), and the gateway says OK.
async fn watch_ok(w: &mut Raw, xid: u32, p: Pointer, data: bool) {
    let options = if data {
        WatchOptions::data()
    } else {
        WatchOptions::default()
    };
    w.send(xid, &Request::Watch { ptr: p, options }).await;
    assert_eq!(w.reply_to(xid).await.status(), Status::Ok);
}

/// A watched record's slot moves to another primary: Redis drops the shard
/// channel subscriptions of a slot it gives away (an `SUNSUBSCRIBE` the gateway did
/// not ask for). The gateway subscribes again where the slot went, tells its watcher
/// what changed meanwhile, and the writes after that arrive as events again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_follows_its_record_to_another_primary() {
    let cluster = RedisCluster::start(3, 0, false);
    let (gw, prefix) = gateway_on(&cluster, |_| {});
    let (mut c, mut w, mut d, p) = watched_both_ways(gw.addr(), gw.addr()).await;
    let key = format!("{prefix}:{{r:{p}}}:m");
    let from = cluster.primary_of(&key);
    let to = *cluster.ports.iter().find(|&&x| x != from).unwrap();
    cluster.move_slot_of(&key, to);
    // Until the gateway has subscribed again, a write's event may come late, folded
    // into the report of what changed (without the bytes); after that, each write's
    // own event.
    let mut v = 3;
    let mut live = 0;
    let start = Instant::now();
    while live < 3 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the watches never got events again after their record moved"
        );
        replace_as(&mut c, p, b"moved", v).await;
        let mut seen = (0, 0);
        let mut with_bytes = false;
        while seen.0 < v {
            seen.0 = next_change(&mut w, 7, p).await.0;
        }
        while seen.1 < v {
            (seen.1, with_bytes) = next_change(&mut d, 9, p).await;
        }
        live = if with_bytes && cluster.hgetall(&key).contains_key("w") {
            live + 1
        } else {
            0
        };
        v += 1;
    }
}

/// A watched record's primary is SIGKILLed: its replica takes over, and the node comes
/// back as a replica. The subscriptions on the killed node are gone, and Redis says
/// nothing about it (no `SUNSUBSCRIBE`, unlike a slot that moves). The watching
/// gateway subscribes again on the new primary, tells its watchers what changed
/// meanwhile, and the writes after that arrive as events again. Found by the soak
/// under failovers with mirrors (`scripts/chaos-cluster.sh`): 15 of 40 mirrors never
/// heard of their record again after a failover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_survives_its_records_primary_failing_over() {
    let mut cluster = RedisCluster::start(3, 1, false);
    // Acknowledged writes are on the replica too: the record survives the failover.
    let (writer, prefix) = gateway_on(&cluster, |c| {
        c.cluster.as_mut().expect("a gateway").wait_replicas = 1;
    });
    let watcher = gateway_at(&cluster, &prefix, |_| {});
    let (mut c, mut w, mut d, p) = watched_both_ways(writer.addr(), watcher.addr()).await;
    let key = format!("{prefix}:{{r:{p}}}:m");
    let victim = cluster.primary_of(&key);
    tokio::task::block_in_place(|| cluster.kill(victim));
    // Writes through the other gateway go on once the replica has taken over (BUSY
    // until then); the node comes back as a replica 5 s after the kill.
    let killed = Instant::now();
    let mut v = 3;
    let mut live = 0;
    let mut restarted = false;
    while live < 3 {
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "the watches never got events again after their record's primary failed over"
        );
        if !restarted && killed.elapsed() > Duration::from_secs(5) {
            tokio::task::block_in_place(|| cluster.restart_killed(false));
            restarted = true;
        }
        let write = Request::Replace {
            ptr: p,
            data: Bytes::from_static(b"after"),
        };
        match c.ask(write).await {
            Reply::Written(n) => assert_eq!(n, v),
            Reply::Error {
                status: Status::Busy,
                ..
            } => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            r => panic!(
                "{:.1} s after the kill: {r:?}",
                killed.elapsed().as_secs_f64()
            ),
        }
        let mut seen = (0, 0);
        let mut with_bytes = false;
        let late = |what: &str| format!("the {what} watch heard of version {v} within 10 s");
        while seen.0 < v {
            seen.0 = tokio::time::timeout(Duration::from_secs(10), next_change(&mut w, 7, p))
                .await
                .unwrap_or_else(|_| panic!("{}", late("state")))
                .0;
        }
        while seen.1 < v {
            (seen.1, with_bytes) =
                tokio::time::timeout(Duration::from_secs(10), next_change(&mut d, 9, p))
                    .await
                    .unwrap_or_else(|_| panic!("{}", late("data")));
        }
        // Live: the event with its bytes, and the record marked watched on its primary
        // (so each later write publishes).
        live = if restarted && with_bytes && cluster.hgetall(&key).contains_key("w") {
            live + 1
        } else {
            0
        };
        v += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A gateway that has not seen a record loads it with plain commands on its state
/// hash and on its data key, which does not exist while the bytes are in the hash.
/// While the record's slot is migrating and its keys have not moved yet, Redis
/// answers `ASK` for that missing data key only; the crate then reports `ASK` for
/// the whole pipeline, and the gateway sent all of it to the importing node, which
/// does not have the state hash yet: the record read as missing (READ answered
/// ADDRESS_FAULT, a watch told "deleted"). Each command now goes again on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_whose_slot_is_migrating_are_found_before_their_keys_move() {
    let cluster = RedisCluster::start(3, 0, false);
    let prefix = fresh_prefix();
    let writer = gateway_at(&cluster, &prefix, |_| {});
    let mut w = Raw::connect(writer.addr(), 2).await;
    let small = w.create(Access::READ, &b"bytes in the hash"[..]).await;
    let large = Bytes::from(vec![9u8; 3000]);
    let big = w.create(Access::READ, large.clone()).await;
    let mut moves = Vec::new();
    for p in [small, big] {
        let key = format!("{prefix}:{{r:{p}}}:m");
        let from = cluster.primary_of(&key);
        let to = *cluster.ports.iter().find(|&&x| x != from).unwrap();
        moves.push(cluster.begin_move(&key, to));
    }
    // Each READ through a gateway of its own, which has seen neither record.
    for round in 0..2 {
        let fresh = gateway_at(&cluster, &prefix, |_| {});
        let mut r = Raw::connect(fresh.addr(), 3).await;
        assert_eq!(
            r.read(small).await,
            data(b"bytes in the hash"),
            "round {round}: the small record"
        );
        let got = r.read(big).await;
        assert!(got == data(&large), "round {round}: the large record");
        if round == 0 {
            for m in &moves {
                cluster.migrate_keys(m);
            }
        }
    }
    for m in &moves {
        cluster.finish_move(m);
    }
}

/// While a record's slot is being migrated (its keys already on the importing node,
/// the slot still migrating), a commit runs on the importing node, where no gateway
/// subscribes to the record's channel, so its event reaches no watcher then. Once the
/// move ends, the old primary drops the slot's subscriptions, the gateway subscribes
/// where the slot went, loads the record and tells its watchers what changed meanwhile
/// (docs/ARCHITECTURE.md, What fails how). Also for a watch that starts while the
/// record's slot has moved twice since the gateway last looked (its `SSUBSCRIBE`
/// redirected by `MOVED`, its mark and its load by `MOVED` and then `ASK`). Under
/// load it failed 8 times in 20 with "deleted" (the test above).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_learn_what_changed_while_their_records_slot_was_migrating() {
    let cluster = RedisCluster::start(3, 0, false);
    let (gw, prefix) = gateway_on(&cluster, |_| {});
    let mut a = Raw::connect(gw.addr(), 2).await;
    let mut w = Raw::connect(gw.addr(), 3).await;
    let p = a.create(Access::READ | Access::WRITE, &b"0"[..]).await;
    w.send(7, &Request::watch(p)).await;
    assert_eq!(w.reply_to(7).await.status(), Status::Ok);
    let key = format!("{prefix}:{{r:{p}}}:m");
    let first = cluster.primary_of(&key);
    let others: Vec<u16> = cluster
        .ports
        .iter()
        .copied()
        .filter(|&x| x != first)
        .collect();
    let (second, third) = (others[0], others[1]);

    // A write while the slot migrates, its keys moved already.
    let m = cluster.begin_move(&key, second);
    cluster.migrate_keys(&m);
    replace_as(&mut a, p, b"1", 2).await;
    cluster.finish_move(&m);
    assert_eq!(changed_until(&mut w, 7, p, 2).await, 2);
    replace_as(&mut a, p, b"2", 3).await;
    assert_eq!(
        changed_until(&mut w, 7, p, 3).await,
        3,
        "a write after the move"
    );

    // Moved on to a third primary behind the gateway's back, then migrating back to
    // the first: a new watch, a write, the end of the move.
    let asked = cluster.errors("ASK");
    cluster.move_slot_of(&key, third);
    let m = cluster.begin_move(&key, first);
    cluster.migrate_keys(&m);
    let mut x = Raw::connect(gw.addr(), 4).await;
    x.send(9, &Request::watch(p)).await;
    assert_eq!(x.reply_to(9).await.status(), Status::Ok);
    assert!(
        cluster.errors("ASK") > asked,
        "the watch was not redirected to the importing node: the test did not test that"
    );
    replace_as(&mut a, p, b"3", 4).await;
    cluster.finish_move(&m);
    assert_eq!(changed_until(&mut x, 9, p, 4).await, 4, "the new watch");
    assert_eq!(changed_until(&mut w, 7, p, 4).await, 4, "the first watch");
    replace_as(&mut a, p, b"4", 5).await;
    assert_eq!(changed_until(&mut x, 9, p, 5).await, 5, "the new watch");
    assert_eq!(changed_until(&mut w, 7, p, 5).await, 5, "the first watch");
}

/// Reads the "changed" events of the watch `xid` on `p` until one says version
/// `version` or later (20 s at most), and returns that version.
async fn changed_until(w: &mut Raw, xid: u32, p: Pointer, version: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok((v, _)) = tokio::time::timeout(left, next_change(w, xid, p)).await else {
            panic!("no event of version {version} of {p} within 20 s");
        };
        if v >= version {
            return v;
        }
    }
}

/// The version and whether the bytes came with it, of the next "changed" event of
/// the watch `xid` on `p`.
async fn next_change(w: &mut Raw, xid: u32, p: Pointer) -> (u64, bool) {
    let n = w.reply_to(xid).await;
    match Reply::parse(None, n.status, n.arg, n.payload).unwrap() {
        Reply::Notify {
            event: Event::Changed,
            ptr,
            version,
            delta,
        } if ptr == p => (version, delta.is_some()),
        other => panic!("unexpected {other:?}"),
    }
}

/// `reply` is the data `expect` (without printing megabytes when it is not).
fn same_bytes(reply: Reply, expect: &[u8], what: &str) {
    match reply {
        Reply::Data(d) => assert!(
            d == expect,
            "{what}: {} bytes read, not the {} written",
            d.len(),
            expect.len()
        ),
        other => panic!("{what}: {other:?}"),
    }
}

/// While a record's slot is being migrated to another primary (`redis-cli --cluster
/// reshard` in progress: its keys first still on the old primary, then moved, the
/// slot still migrating), reads, writes (also those that change the size) and deletes
/// go through at once: a commit declares only the keys it uses and keeps its quota
/// marker in the record's hash, and Redis refuses a command with several keys there
/// when some of them do not exist (`TRYAGAIN`). Bytes growing out of the state hash
/// go through at once too: into a new data key on the importing node, and on the old
/// node (which refuses new keys of a slot migrating away) into the hash, over 1 KiB,
/// until a later write moves them out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_in_a_slot_being_migrated_are_read_and_written() {
    let cluster = RedisCluster::start(3, 0, false);
    let (gw, prefix) = gateway_on(&cluster, |_| {});
    let mut c = Raw::connect(gw.addr(), 2).await;
    let small = c
        .create(Access::READ | Access::WRITE, &b"small 0"[..])
        .await;
    let big = Bytes::from(vec![1u8; 100_000]);
    let large = c.create(Access::READ | Access::WRITE, big.clone()).await;
    let tries = cluster.errors("TRYAGAIN");
    let asked = cluster.errors("ASK");
    for (p, value) in [(small, Bytes::from_static(b"small 0")), (large, big)] {
        let key = format!("{prefix}:{{r:{p}}}:m");
        let from = cluster.primary_of(&key);
        let to = *cluster.ports.iter().find(|&&x| x != from).unwrap();
        let m = cluster.begin_move(&key, to);
        let mut version = 1;
        let mut expect = value.to_vec();
        for stage in ["keys not moved yet", "keys moved, slot still migrating"] {
            same_bytes(c.read(p).await, &expect, stage);
            version += 1;
            expect[0] ^= 0xff;
            assert_eq!(
                c.ask(Request::Replace {
                    ptr: p,
                    data: Bytes::from(expect.clone()),
                })
                .await,
                Reply::Written(version),
                "REPLACE, {stage}"
            );
            version += 1;
            expect[1] ^= 0xff;
            assert_eq!(
                c.ask(Request::WriteAt {
                    ptr: p,
                    offset: 1,
                    data: Bytes::from(vec![expect[1]]),
                })
                .await,
                Reply::Written(version),
                "WRITE_AT, {stage}"
            );
            same_bytes(c.read(p).await, &expect, stage);
            let data_key = format!("{prefix}:{{r:{p}}}:d");
            if p == small && stage == "keys not moved yet" {
                // Growing out of the hash, by a range write and by a REPLACE: the old
                // node refuses the new data key, the bytes stay in the hash.
                version += 1;
                let tail = vec![3u8; 1500];
                let offset = expect.len() as u64;
                expect.extend_from_slice(&tail);
                let grow = Request::WriteAt {
                    ptr: p,
                    offset,
                    data: Bytes::from(tail),
                };
                assert_eq!(c.ask(grow).await, Reply::Written(version), "WRITE_AT out");
                // Decided on the state the gateway remembers from that commit: it must
                // say the bytes are in the hash.
                version += 1;
                expect[2] ^= 0xff;
                let write = Request::WriteAt {
                    ptr: p,
                    offset: 2,
                    data: Bytes::from(vec![expect[2]]),
                };
                assert_eq!(c.ask(write).await, Reply::Written(version), "then WRITE_AT");
                same_bytes(c.read(p).await, &expect, "grown by WRITE_AT");
                version += 1;
                expect.resize(1800, 4);
                let grow = Request::Replace {
                    ptr: p,
                    data: Bytes::from(expect.clone()),
                };
                assert_eq!(c.ask(grow).await, Reply::Written(version), "REPLACE out");
                same_bytes(c.read(p).await, &expect, "grown by REPLACE");
                let (old_node, new_node) = cluster.keys_of_move(&m);
                assert!(old_node.contains(&key), "{old_node:?}");
                assert!(!old_node.contains(&data_key) && new_node.is_empty());
            } else if p == small {
                // This stage's REPLACE moved the bytes out, on the importing node.
                let (old_node, new_node) = cluster.keys_of_move(&m);
                assert!(old_node.is_empty(), "{old_node:?}");
                assert!(new_node.contains(&data_key), "{new_node:?}");
            }
            cluster.migrate_keys(&m);
        }
        assert_eq!(
            cluster.errors("TRYAGAIN"),
            tries,
            "no command was refused for keys missing during the migration"
        );
        // A write that changes the size moves quota charges and leaves a marker: a
        // field of the state hash, so it goes through at once too. The small record's
        // bytes then go back into the hash and out again into a new data key, on the
        // importing node, at once as well.
        let mut sizes = vec![expect.len() + 1];
        if p == small {
            sizes.extend([100, 2000]);
        }
        for len in sizes {
            version += 1;
            expect.resize(len, 7);
            let write = Request::Replace {
                ptr: p,
                data: Bytes::from(expect.clone()),
            };
            assert_eq!(c.ask(write).await, Reply::Written(version), "to {len} B");
            same_bytes(c.read(p).await, &expect, "resized");
        }
        assert_eq!(
            cluster.errors("TRYAGAIN"),
            tries,
            "a write changing the size was refused"
        );
        if p == small {
            cluster.finish_move(&m);
        } else {
            // A delete leaves its marker in a tombstone of the hash, at once as well.
            assert_eq!(c.ask(Request::Delete { ptr: p }).await, Reply::Done);
            assert_eq!(c.read(p).await.status(), Status::AddressFault);
            assert_eq!(cluster.errors("TRYAGAIN"), tries, "the delete was refused");
            cluster.finish_move(&m);
            eventually(
                "the tombstone goes once the delete's quota is settled",
                Duration::from_secs(10),
                async || !cluster.exists(&key),
            )
            .await;
            continue;
        }
        assert_eq!(cluster.primary_of(&key), to);
        same_bytes(c.read(p).await, &expect, "moved");
    }
    assert!(
        cluster.errors("ASK") > asked,
        "the gateway was never redirected with ASK: the test did not test that"
    );
}

/// Records created in slots being migrated (their keys go to the importing primary,
/// by `ASK`), small ones and large ones (two new keys), are created, read, written and
/// deleted at once, never refused with `TRYAGAIN`, and a deleted one's tombstone goes
/// once its quota is settled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_are_created_and_deleted_in_slots_being_migrated() {
    let cluster = RedisCluster::start(3, 0, false);
    let (gw, prefix) = gateway_on(&cluster, |_| {});
    let mut c = Raw::connect(gw.addr(), 2).await;
    let (from, to) = (cluster.primaries()[0], cluster.primaries()[1]);
    let moving: Vec<u16> = cluster.slots_of(from).into_iter().take(128).collect();
    let moves = cluster.begin_moves(from, to, moving.iter().copied());
    let tries = cluster.errors("TRYAGAIN");
    let key = |p: Pointer| format!("{prefix}:{{r:{p}}}:m");
    // Small records (bytes in the state hash) and large ones (bytes in a data key of
    // their own: a create of two new keys), three of each.
    let large = Bytes::from(vec![b'L'; 3000]);
    let value = |big: bool| {
        if big {
            large.clone()
        } else {
            Bytes::from_static(b"new")
        }
    };
    let mut landed = Vec::new();
    for i in 0..10_000 {
        let big = i % 2 == 1;
        if landed.iter().filter(|&&(_, b)| b == big).count() == 3 {
            continue;
        }
        let p = c.create(Access::READ | Access::WRITE, value(big)).await;
        if moving.contains(&redis_protocol::redis_keyslot(key(p).as_bytes())) {
            landed.push((p, big));
            if landed.len() == 6 {
                break;
            }
        }
    }
    assert_eq!(landed.len(), 6, "too few creates landed in a moving slot");
    for &(p, big) in &landed {
        assert_eq!(c.read(p).await, Reply::Data(value(big)));
        let grown = Bytes::from(vec![b'g'; if big { 2500 } else { 5 }]);
        let replace = Request::Replace {
            ptr: p,
            data: grown.clone(),
        };
        assert_eq!(c.ask(replace).await, Reply::Written(2));
        assert_eq!(c.read(p).await, Reply::Data(grown));
        assert_eq!(c.ask(Request::Delete { ptr: p }).await, Reply::Done);
    }
    let landed: Vec<Pointer> = landed.into_iter().map(|(p, _)| p).collect();
    assert_eq!(
        cluster.errors("TRYAGAIN"),
        tries,
        "a create, write or delete was refused while its slot migrated"
    );
    assert!(
        cluster.errors("ASK") > 0,
        "nothing was redirected: the test did not test that"
    );
    for m in &moves {
        cluster.migrate_keys(m);
        cluster.finish_move(m);
    }
    for &p in &landed {
        assert_eq!(c.read(p).await.status(), Status::AddressFault);
        eventually(
            "the tombstone goes once the delete's quota is settled",
            Duration::from_secs(10),
            async || !cluster.exists(&key(p)),
        )
        .await;
    }
}

/// `redis-cli --cluster reshard` moves all slots of one primary to another while two
/// gateways write (most writes keep a record's size, some change it) and watch
/// records that move: no request fails, every acknowledged write reads back through
/// both gateways, and every watcher sees its record's last version. A third gateway
/// that remembers no record's state reads them all meanwhile, and finds each one
/// (its loads touch the data keys that do not exist; the window in which that read a
/// record as missing is the test `records_whose_slot_is_migrating_are_found_…`'s,
/// which this test did not hit in 3 runs without that fix).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resharding_under_load_needs_nothing_from_the_gateways() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
    let cluster = RedisCluster::start(3, 0, false);
    let (a, prefix) = gateway_on(&cluster, |_| {});
    let b = gateway_at(&cluster, &prefix, |_| {});
    let (from, to) = (cluster.ports[0], cluster.ports[1]);
    let slots = cluster.slot_count(from);
    // A third gateway that remembers no record's state: each of its READs loads
    // with plain commands on the state hash and the data key (which does not exist
    // while the bytes are in the hash), the load a fresh gateway makes.
    let cold = gateway_at(&cluster, &prefix, |c| {
        c.cluster.as_mut().unwrap().state_cache = 0;
    });
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    let mut watchers = Vec::new();
    let mut all = Vec::new();
    for w in 0..6u8 {
        let addr = [a.addr(), b.addr()][w as usize % 2];
        let watch_addr = [a.addr(), b.addr()][(w as usize + 1) % 2];
        let mut c = Raw::connect(addr, 20 + w).await;
        let mut records = Vec::new();
        for i in 0..30 {
            // A few large ones: bytes in their own key (two keys to migrate).
            let size = if i % 10 == 0 { 2000 } else { 60 };
            records.push(c.create(Access::READ, vec![b'0'; size]).await);
        }
        all.extend_from_slice(&records);
        // A record of each writer that moves is watched through the other gateway.
        let moves = |p: &Pointer| cluster.primary_of(&format!("{prefix}:{{r:{p}}}:m")) == from;
        let watched = records.iter().position(moves).expect("a record that moves");
        let seen = Arc::new(AtomicU64::new(0));
        let mut watcher = Raw::connect(watch_addr, 40 + w).await;
        watcher.send(7, &Request::watch(records[watched])).await;
        assert_eq!(watcher.reply_to(7).await.status(), Status::Ok);
        let (s, ptr) = (seen.clone(), records[watched]);
        watchers.push((
            watched,
            seen,
            tokio::spawn(async move {
                loop {
                    let (v, _) = next_change(&mut watcher, 7, ptr).await;
                    s.fetch_max(v, Relaxed);
                }
            }),
        ));
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let mut acked: Vec<(Bytes, u64)> = vec![(Bytes::new(), 1); records.len()];
            let mut n = 0u64;
            while !stop.load(Relaxed) {
                for (i, &p) in records.iter().enumerate() {
                    n += 1;
                    let base = if i % 10 == 0 { 2000 } else { 60 };
                    // Every 7th write changes the record's size.
                    let size = base + usize::from(n.is_multiple_of(7));
                    let mut v = format!("{w}-{i}-{n}-").into_bytes();
                    v.resize(size, b'.');
                    let v = Bytes::from(v);
                    match c
                        .ask(Request::Replace {
                            ptr: p,
                            data: v.clone(),
                        })
                        .await
                    {
                        Reply::Written(version) => acked[i] = (v, version),
                        r => panic!("writer {w}, record {i}: {r:?}"),
                    }
                }
            }
            (records, acked, c)
        }));
    }
    let reader = {
        let stop = stop.clone();
        let mut c = Raw::connect(cold.addr(), 61).await;
        tokio::spawn(async move {
            let mut reads = 0u64;
            while !stop.load(Relaxed) {
                for &p in &all {
                    match c.read(p).await {
                        Reply::Data(_) => reads += 1,
                        r => {
                            panic!("a READ of {p} through a gateway that remembers nothing: {r:?}")
                        }
                    }
                }
            }
            reads
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = Instant::now();
    tokio::task::block_in_place(|| cluster.reshard(from, to, slots));
    let took = started.elapsed();
    assert_eq!(cluster.slot_count(from), 0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Relaxed);
    let reads = reader.await.unwrap();
    assert!(reads > 0);
    let mut c = Raw::connect(b.addr(), 60).await;
    for (w, writer) in writers.into_iter().enumerate() {
        let (records, acked, mut own) = writer.await.unwrap();
        for (i, p) in records.iter().enumerate() {
            let (bytes, _) = &acked[i];
            same_bytes(own.read(*p).await, bytes, "through the writer's gateway");
            same_bytes(c.read(*p).await, bytes, "through the other gateway");
        }
        let (watched, seen, task) = &watchers[w];
        let last = acked[*watched].1;
        let watched_key = format!("{prefix}:{{r:{}}}:m", records[*watched]);
        eventually(
            &format!(
                "watcher {w} sees the last version {last} of {} (primary {}; seen {})",
                records[*watched],
                cluster.primary_of(&watched_key),
                seen.load(Relaxed)
            ),
            Duration::from_secs(10),
            async || seen.load(Relaxed) == last,
        )
        .await;
        task.abort();
    }
    println!(
        "resharding {slots} slots under load took {:.1} s",
        took.as_secs_f64()
    );
}

/// A record's hash slot moves to another primary (resharding) under a gateway that
/// knows the old layout: its loads (plain commands in one pipeline) and commits are
/// answered `MOVED` until it learns the new one, and must still succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_moved_to_another_primary_is_followed() {
    let cluster = common::cluster::RedisCluster::start(3, 0, false);
    let (gw, prefix) = gateway_on(&cluster, |_| {});
    let mut a = Raw::connect(gw.addr(), 2).await;
    let big = Bytes::from(vec![5u8; 100_000]);
    let p = a.create(Access::READ | Access::WRITE, &b"before"[..]).await;
    let q = a.create(Access::READ | Access::WRITE, big.clone()).await;
    assert_eq!(a.read(p).await, data(b"before"));
    assert_eq!(a.read(q).await, data(&big));
    for ptr in [p, q] {
        let key = format!("{prefix}:{{r:{ptr}}}:m");
        let from = cluster.primary_of(&key);
        let to = *cluster.ports.iter().find(|&&x| x != from).unwrap();
        cluster.move_slot_of(&key, to);
        assert_eq!(cluster.primary_of(&key), to);
    }
    let moved = cluster.errors("MOVED");
    let mut b = Raw::connect(gw.addr(), 3).await;
    // Reads: a whole small record, a large one (a load, then the rest), a range.
    assert_eq!(b.read(p).await, data(b"before"));
    assert_eq!(b.read(q).await, data(&big));
    assert_eq!(
        b.ask(Request::Read {
            ptr: q,
            range: Some((99_990, 10))
        })
        .await,
        data(&[5u8; 10])
    );
    assert_eq!(
        a.ask(Request::Replace {
            ptr: p,
            data: Bytes::from_static(b"after"),
        })
        .await,
        Reply::Written(2)
    );
    assert_eq!(b.read(p).await, data(b"after"));
    assert_eq!(a.ask(Request::Delete { ptr: q }).await, Reply::Done);
    assert!(
        cluster.errors("MOVED") > moved,
        "the gateway was never redirected: the test did not test that"
    );
}

/// A record's slot moved on twice behind a gateway's back: moved to a second primary,
/// then half-way to a third (its keys there, the slot still migrating). The `redis`
/// crate's slot map still names the first: it is sent there (`MOVED` to the second),
/// then to the second (`ASK` to the third), then to the third after one `ASKING`,
/// which lets only the first command of a pipeline in (`MOVED` back). With its
/// retries spent the crate returns that `MOVED`: a gateway that answered it as BUSY
/// failed the resharding test once in three runs of the server's tests. Nothing of
/// a command answered `MOVED` ran, so the gateway sends it again once the crate has
/// followed the move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_whose_slot_moved_twice_behind_the_gateways_back_is_still_served() {
    let cluster = common::cluster::RedisCluster::start(3, 0, false);
    // Loads in pipelines with other requests' (a failed one goes again alone), and
    // each on its own (`--redis-batch false`).
    for batch in [true, false] {
        slot_moved_twice(&cluster, batch).await;
    }
}

async fn slot_moved_twice(cluster: &common::cluster::RedisCluster, batch: bool) {
    let (gw, prefix) = gateway_on(cluster, |c| {
        if let Some(o) = c.cluster.as_mut() {
            o.batch = batch;
        }
    });
    let mut a = Raw::connect(gw.addr(), 2).await;
    let large = Bytes::from(vec![7u8; 2000]);
    let p = a.create(Access::READ | Access::WRITE, &b"small"[..]).await;
    let q = a.create(Access::READ | Access::WRITE, large.clone()).await;
    assert_eq!(a.read(p).await, data(b"small"));
    assert_eq!(a.read(q).await, data(&large));
    let moved = cluster.errors("MOVED");
    let asked = cluster.errors("ASK");
    let mut moves = Vec::new();
    for ptr in [p, q] {
        let key = format!("{prefix}:{{r:{ptr}}}:m");
        let first = cluster.primary_of(&key);
        let second = *cluster.ports.iter().find(|&&x| x != first).unwrap();
        let third = *cluster
            .ports
            .iter()
            .find(|&&x| x != first && x != second)
            .unwrap();
        cluster.move_slot_of(&key, second);
        let m = cluster.begin_move(&key, third);
        cluster.migrate_keys(&m);
        moves.push(m);
    }
    let mut b = Raw::connect(gw.addr(), 3).await;
    // (Compared as booleans: a failure would otherwise print 2,000 bytes.)
    let r = b.read(q).await;
    assert!(
        r == data(&large),
        "batch {batch}: the large record: {:.200}",
        format!("{r:?}")
    );
    let r = b.read(p).await;
    assert_eq!(r, data(b"small"), "batch {batch}: the small record");
    assert_eq!(
        a.ask(Request::Replace {
            ptr: q,
            data: Bytes::from_static(b"written while its slot moves"),
        })
        .await,
        Reply::Written(2),
        "batch {batch}"
    );
    assert!(
        cluster.errors("MOVED") > moved && cluster.errors("ASK") > asked,
        "the gateway was not redirected: the test did not test that"
    );
    for m in &moves {
        cluster.finish_move(m);
    }
    assert_eq!(b.read(q).await, data(b"written while its slot moves"));
    assert_eq!(b.read(p).await, data(b"small"));
}

/// Sends `requests` pipelined (all before any reply) and returns the typed replies in
/// the same order.
async fn pipelined(c: &mut Raw, requests: Vec<Request>) -> Vec<Reply> {
    let mut sent = Vec::new();
    for req in requests {
        let xid = c.xid();
        c.send(xid, &req).await;
        sent.push((xid, req.opcode()));
    }
    replies_to(c, sent).await
}

/// The typed replies to the requests `sent` (XID, opcode), in that order.
async fn replies_to(c: &mut Raw, sent: Vec<(u32, Opcode)>) -> Vec<Reply> {
    let mut replies = Vec::new();
    for (xid, op) in sent {
        let m = c.reply_to(xid).await;
        replies.push(Reply::parse(Some(op), m.status, m.arg, m.payload).expect("well-formed"));
    }
    replies
}

/// Loads and commits of requests that arrive together go to Redis in one pipeline per
/// primary, grouped by the layout the gateway last read (`batch.rs`). When a slot moved
/// since (here the gateway never reads the layout again), a pipeline that holds
/// records of both nodes fails as a whole, and each request in it is sent again alone:
/// every answer is still right, a commit re-sent after it was applied is not applied
/// twice, and `/metrics` says it happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_sent_together_survive_a_slot_moved_under_them() {
    let cluster = common::cluster::RedisCluster::start(3, 0, false);
    let (gw, prefix) = gateway_on(&cluster, |c| {
        let o = c.cluster.as_mut().unwrap();
        o.topology_every = Duration::from_secs(3600);
        c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    });
    let m = gw.metrics_addr().expect("serves /metrics");
    let mut a = Raw::connect(gw.addr(), 2).await;
    let key = |p: Pointer| format!("{prefix}:{{r:{p}}}:m");
    let mut ptrs = Vec::new();
    for i in 0..60 {
        ptrs.push(
            a.create(Access::READ | Access::WRITE, format!("v{i}"))
                .await,
        );
    }
    // Of the records of one primary, a third move to each of the two others.
    let from = cluster.primary_of(&key(ptrs[0]));
    let others: Vec<u16> = cluster
        .ports
        .iter()
        .copied()
        .filter(|&x| x != from)
        .collect();
    let on_from: Vec<Pointer> = ptrs
        .iter()
        .copied()
        .filter(|&p| cluster.primary_of(&key(p)) == from)
        .collect();
    assert!(
        on_from.len() >= 6,
        "{} of 60 records on one primary",
        on_from.len()
    );
    for (i, &p) in on_from.iter().enumerate() {
        if i % 3 > 0 {
            cluster.move_slot_of(&key(p), others[i % 3 - 1]);
        }
    }
    let reads = || {
        ptrs.iter()
            .map(|&ptr| Request::Read { ptr, range: None })
            .collect::<Vec<_>>()
    };
    let resent = || metric(&scrape(m), "netswap_redis_batched_resent_total");
    for _ in 0..5 {
        let got = pipelined(&mut a, reads()).await;
        for (i, r) in got.into_iter().enumerate() {
            assert_eq!(r, data(format!("v{i}").as_bytes()), "record {i}");
        }
        if resent() > 0.0 {
            break;
        }
    }
    assert!(
        resent() > 0.0,
        "no pipeline held records of two nodes: the test did not test that"
    );
    // Writes decided on remembered states (of the same size: no quota to reserve
    // first): their commits go together too. Each is applied once (version 2), also
    // the ones applied before their group failed.
    let writes = (0..ptrs.len())
        .map(|i| Request::Replace {
            ptr: ptrs[i],
            data: Bytes::from(format!("w{i}")),
        })
        .collect();
    let before = resent();
    for (i, r) in pipelined(&mut a, writes).await.into_iter().enumerate() {
        assert_eq!(r, Reply::Written(2), "record {i}");
    }
    assert!(
        resent() > before,
        "no pipeline of commits held records of two nodes: the test did not test that"
    );
    let got = pipelined(&mut a, reads()).await;
    for (i, r) in got.into_iter().enumerate() {
        assert_eq!(r, data(format!("w{i}").as_bytes()), "record {i}");
    }
    let mm = scrape(m);
    assert!(metric(&mm, "netswap_redis_batches_total") > 0.0);
    assert!(
        metric(&mm, "netswap_redis_batched_total") > metric(&mm, "netswap_redis_batches_total"),
        "pipelines carried more than one request on average"
    );
}

/// Sends `requests` in one write (so the gateway reads them together) and returns the
/// typed replies in the same order.
async fn in_one_write(c: &mut Raw, requests: &[Request]) -> Vec<Reply> {
    let mut bytes = Vec::new();
    let mut sent = Vec::new();
    for req in requests {
        let xid = c.xid();
        bytes.extend_from_slice(&Raw::frames(req.encode(xid)));
        sent.push((xid, req.opcode()));
    }
    c.send_raw(&bytes).await;
    replies_to(c, sent).await
}

/// Writes of one record that one connection pipelines are handed to the store
/// together once they queued behind its request on the record (`Conn::finish`), and
/// committed as a group: each gets its own version, in the order sent, and a request
/// that may not be grouped between them (a READ) still sees exactly the writes sent
/// before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connections_pipelined_writes_of_one_record_are_committed_together() {
    let prefix = fresh_prefix();
    let gw = gateway(&prefix, |c| {
        c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    });
    let mut c = Raw::connect(gw.addr(), 2).await;
    let p = c.create(Access::empty(), &b"........"[..]).await;
    let write = |n: usize| {
        if n.is_multiple_of(2) {
            Request::Replace {
                ptr: p,
                data: Bytes::from(format!("r{n:03}....")),
            }
        } else {
            Request::WriteAt {
                ptr: p,
                offset: 4,
                data: Bytes::from(format!("w{n:03}")),
            }
        }
    };
    // The record's bytes after the writes up to `n` (a REPLACE, then a WRITE_AT of
    // its second half).
    let after = |n: usize| {
        if n.is_multiple_of(2) {
            format!("r{n:03}....")
        } else {
            format!("r{:03}w{n:03}", n - 1)
        }
    };
    let mut requests: Vec<Request> = (0..16).map(write).collect();
    requests.insert(
        9,
        Request::Read {
            ptr: p,
            range: None,
        },
    );
    requests.extend((16..24).map(write));
    let replies = in_one_write(&mut c, &requests).await;
    let mut version = 1;
    for (i, reply) in replies.into_iter().enumerate() {
        match (i, reply) {
            (9, Reply::Data(d)) => {
                assert_eq!(d, after(8).as_bytes(), "the READ sent after write 8")
            }
            (_, Reply::Written(v)) => {
                version += 1;
                assert_eq!(v, version, "request {i}: versions in the order sent");
            }
            (_, other) => panic!("request {i}: {other:?}"),
        }
    }
    same_bytes(c.read(p).await, after(23).as_bytes(), "the last write");
    let grouped = metric(
        &scrape(gw.metrics_addr().unwrap()),
        "netswap_redis_grouped_writes_total",
    );
    // 9 together (8 grouped), the READ, then 15 together (14 grouped): 22 when the
    // 25 requests come in one read from the socket, as on loopback.
    assert!(
        grouped >= 8.0,
        "the writes that queued were committed together: {grouped} grouped"
    );
    // A burst of writes of an idle record goes as one group from its first write
    // (`Conn::start_first_writes`): 8 writes, 7 grouped. (When only the writes that
    // queued behind one in flight were handed over, the first went alone: 6.)
    let q = c.create(Access::empty(), &b"........"[..]).await;
    let burst: Vec<Request> = (0..8)
        .map(|n| Request::Replace {
            ptr: q,
            data: Bytes::from(format!("b{n:03}....")),
        })
        .collect();
    let replies = in_one_write(&mut c, &burst).await;
    let versions: Vec<Reply> = (2..10).map(Reply::Written).collect();
    assert_eq!(replies, versions, "versions in the order sent");
    same_bytes(c.read(q).await, b"b007....", "the burst's last write");
    let now = metric(
        &scrape(gw.metrics_addr().unwrap()),
        "netswap_redis_grouped_writes_total",
    );
    assert_eq!(now - grouped, 7.0, "the burst committed as one group");
}

/// READs of one record and range that a connection sends together share one load
/// (`Conn::submit`), and each gets the record; a READ after a write of the record
/// in the same batch sees the write, and a READ of another range gets its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_of_one_record_that_arrive_together_share_one_load() {
    let prefix = fresh_prefix();
    let gw = gateway(&prefix, |c| {
        c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    });
    let m = gw.metrics_addr().expect("serves /metrics");
    let loads = || {
        let mm = scrape(m);
        metric(&mm, r#"netswap_redis_loads_total{how="plain"}"#)
            + metric(&mm, r#"netswap_redis_loads_total{how="script"}"#)
    };
    let mut c = Raw::connect(gw.addr(), 2).await;
    let p = c.create(Access::READ | Access::WRITE, &b"first"[..]).await;
    let read = Request::Read {
        ptr: p,
        range: None,
    };
    let before = loads();
    let replies = in_one_write(&mut c, &vec![read.clone(); 16]).await;
    assert!(replies.iter().all(|r| *r == data(b"first")), "{replies:?}");
    assert_eq!(loads() - before, 1.0, "16 READs of one record, one load");

    let replace = Request::Replace {
        ptr: p,
        data: Bytes::from_static(b"second"),
    };
    let part = Request::Read {
        ptr: p,
        range: Some((0, 3)),
    };
    let replies = in_one_write(
        &mut c,
        &[
            read.clone(),
            part.clone(),
            replace,
            read.clone(),
            read,
            part,
        ],
    )
    .await;
    assert_eq!(
        replies,
        vec![
            data(b"first"),
            data(b"fir"),
            Reply::Written(2),
            data(b"second"),
            data(b"second"),
            data(b"sec"),
        ]
    );
}

/// `/metrics` of a gateway says how its loads and its remembered states served it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_counts_its_loads_and_state_cache_on_metrics() {
    let prefix = fresh_prefix();
    let with_metrics =
        |c: &mut ServerConfig| c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let (a, b) = (gateway(&prefix, with_metrics), gateway(&prefix, |_| {}));
    let m = a.metrics_addr().expect("serves /metrics");
    let mut ca = Raw::connect(a.addr(), 2).await;
    let mut cb = Raw::connect(b.addr(), 3).await;
    let p = ca.create(Access::READ | Access::WRITE, &b"0"[..]).await;
    let replace = |d: &'static [u8]| Request::Replace {
        ptr: p,
        data: Bytes::from_static(d),
    };
    for _ in 0..5 {
        assert_eq!(ca.read(p).await, data(b"0"));
    }
    for v in 2..=4 {
        assert_eq!(ca.ask(replace(b"a")).await, Reply::Written(v));
    }
    // Changed through B: A's remembered state is stale once, then fresh again.
    assert_eq!(cb.ask(replace(b"b")).await, Reply::Written(5));
    assert_eq!(ca.ask(replace(b"a")).await, Reply::Written(6));
    assert_eq!(ca.ask(replace(b"a")).await, Reply::Written(7));
    let mm = scrape(m);
    let writes = |r: &str| {
        metric(
            &mm,
            &format!("netswap_redis_state_cache_writes_total{{result=\"{r}\"}}"),
        )
    };
    assert_eq!(
        (writes("hit"), writes("stale"), writes("miss")),
        (5.0, 1.0, 0.0),
        "the create left a state to decide on; B's write made it stale once, and the \
         commit that found it stale brought back the state the retry was decided on"
    );
    // The five READs (plain commands: nothing else wrote in between); none after
    // the stale commit.
    assert_eq!(
        metric(&mm, r#"netswap_redis_loads_total{how="plain"}"#),
        5.0
    );
    assert_eq!(
        metric(&mm, r#"netswap_redis_loads_total{how="script"}"#),
        0.0
    );
    assert_eq!(metric(&mm, "netswap_redis_load_retries_total"), 0.0);
    assert_eq!(metric(&mm, "netswap_redis_unreplicated_writes_total"), 0.0);
    // One race lost (to B), no claim, and nothing waited: one connection, one at a
    // time.
    assert_eq!(metric(&mm, "netswap_redis_commit_races_lost_total"), 1.0);
    assert_eq!(metric(&mm, "netswap_redis_claims_total"), 0.0);
    assert_eq!(metric(&mm, "netswap_redis_queued_changes_total"), 0.0);
}

/// The number a read cache test wrote as a record's 8 bytes.
fn written_number(r: Reply) -> u64 {
    match r {
        Reply::Data(b) if b.len() == 8 => u64::from_be_bytes(b[..].try_into().unwrap()),
        r => panic!("not a number written by the test: {r:?}"),
    }
}

/// A gateway with the read cache on (`--redis-read-cache`), serving `/metrics`.
fn read_cached(c: &mut ServerConfig) {
    c.cluster.as_mut().expect("a gateway").read_cache = 1024;
    c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
}

/// READs a gateway's read cache answered, from its `/metrics` at `m`.
fn read_cache_hits(m: SocketAddr) -> f64 {
    metric(
        &scrape(m),
        r#"netswap_redis_read_cache_loads_total{result="hit"}"#,
    )
}

/// READs of `p` through `gw` (a gateway with the read cache on, serving `/metrics`)
/// get `expect`, and some are answered from the cache within 10 s (its tracking
/// connections work on this cluster).
async fn reads_come_from_the_cache(gw: &RunningServer, p: Pointer, expect: &[u8]) {
    let m = gw.metrics_addr().expect("serves /metrics");
    let hits = || read_cache_hits(m);
    let mut c = Raw::connect(gw.addr(), 40).await;
    eventually(
        "READs answered from the cache",
        Duration::from_secs(10),
        async || {
            for _ in 0..3 {
                assert_eq!(c.read(p).await, data(expect));
            }
            hits() > 0.0
        },
    )
    .await;
}

/// The read cache answers READs without a load; it must never answer one with a
/// state older than a write acknowledged before the READ was sent, through either
/// gateway, while other connections keep its entries hot, and what a reader sees of
/// a record never goes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_cache_answers_no_read_older_than_a_write_acknowledged_before_it() {
    let prefix = fresh_prefix();
    let (a, b) = (gateway(&prefix, read_cached), gateway(&prefix, read_cached));
    let mut owner = Raw::connect(b.addr(), 2).await;
    let mut ptrs = Vec::new();
    for _ in 0..8 {
        ptrs.push(
            owner
                .create(
                    Access::READ | Access::WRITE,
                    Bytes::copy_from_slice(&0u64.to_be_bytes()),
                )
                .await,
        );
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut readers = Vec::new();
    for (i, addr) in [a.addr(), a.addr(), b.addr()].into_iter().enumerate() {
        let (ptrs, stop) = (ptrs.clone(), stop.clone());
        readers.push(tokio::spawn(async move {
            let mut c = Raw::connect(addr, 10 + i as u8).await;
            let mut last = vec![0u64; ptrs.len()];
            let mut reads = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for (j, &p) in ptrs.iter().enumerate() {
                    let v = written_number(c.read(p).await);
                    assert!(
                        v >= last[j],
                        "reader {i} saw record {j} go back from {} to {v}",
                        last[j]
                    );
                    last[j] = v;
                    reads += 1;
                }
            }
            reads
        }));
    }
    let mut writers = [
        Raw::connect(a.addr(), 3).await,
        Raw::connect(b.addr(), 4).await,
    ];
    let mut checkers = [
        Raw::connect(a.addr(), 5).await,
        Raw::connect(b.addr(), 6).await,
    ];
    for n in 1..=300u64 {
        let j = (n as usize * 5) % ptrs.len();
        let w = (n % 2) as usize;
        let write = Request::Replace {
            ptr: ptrs[j],
            data: Bytes::copy_from_slice(&n.to_be_bytes()),
        };
        assert!(matches!(writers[w].ask(write).await, Reply::Written(_)));
        // Read right after the acknowledgement through both gateways (the writer's
        // own too), also while the reader's gateway holds the record.
        for (g, c) in checkers.iter_mut().enumerate() {
            assert_eq!(
                written_number(c.read(ptrs[j]).await),
                n,
                "write {n} acknowledged by gateway {w}, read through gateway {g}"
            );
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut reads = 0;
    for r in readers {
        reads += r.await.unwrap();
    }
    let m = scrape(a.metrics_addr().unwrap());
    let loads = |r: &str| {
        metric(
            &m,
            &format!("netswap_redis_read_cache_loads_total{{result=\"{r}\"}}"),
        )
    };
    // Every write dropped the record from both caches; the hot readers read it
    // again from the cache in between.
    assert!(
        loads("hit") > 300.0,
        "hits {} of {reads} hot reads",
        loads("hit")
    );
    assert!(loads("fill") >= 150.0, "fills {}", loads("fill"));
    assert!(metric(&m, "netswap_redis_read_cache_invalidations_total") >= 150.0);
    assert!(metric(&m, "netswap_redis_read_cache_barriers_total") > 0.0);
}

/// Redis tells a gateway's read cache of the changes of the records it read only (it
/// tracks what each tracking connection read), not of every write to every record:
/// a gateway with the cache costs Redis nothing for records it does not hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_cache_hears_only_of_the_records_it_read() {
    let prefix = fresh_prefix();
    let (a, b) = (gateway(&prefix, |_| {}), gateway(&prefix, read_cached));
    let mut owner = Raw::connect(a.addr(), 2).await;
    let mut ptrs = Vec::new();
    for i in 0..40u64 {
        let bytes = Bytes::copy_from_slice(&i.to_be_bytes());
        ptrs.push(owner.create(Access::READ | Access::WRITE, bytes).await);
    }
    let held = &ptrs[..5];
    reads_come_from_the_cache(&b, held[0], &0u64.to_be_bytes()).await;
    let m = b.metrics_addr().unwrap();
    let mut reader = Raw::connect(b.addr(), 3).await;
    // Each held record read until a READ of it is a hit (the first loads, the next
    // fills on the tracking connection); then a round of READs of all five hits.
    for (i, &p) in held.iter().enumerate() {
        let expect = (i as u64).to_be_bytes();
        eventually("a hit", Duration::from_secs(10), async || {
            let before = read_cache_hits(m);
            assert_eq!(reader.read(p).await, data(&expect));
            read_cache_hits(m) > before
        })
        .await;
    }
    eventually("five hits in a row", Duration::from_secs(10), async || {
        let before = read_cache_hits(m);
        for (i, &p) in held.iter().enumerate() {
            assert_eq!(reader.read(p).await, data(&(i as u64).to_be_bytes()));
        }
        read_cache_hits(m) - before == held.len() as f64
    })
    .await;
    let pushes = || metric(&scrape(m), "netswap_redis_read_cache_pushes_total");
    let before = pushes();
    // Every record written once through the gateway without the cache.
    for (i, &p) in ptrs.iter().enumerate() {
        let write = Request::Replace {
            ptr: p,
            data: Bytes::copy_from_slice(&(100 + i as u64).to_be_bytes()),
        };
        assert!(matches!(owner.ask(write).await, Reply::Written(_)));
    }
    eventually(
        "an invalidation per held record",
        Duration::from_secs(5),
        async || pushes() - before >= held.len() as f64,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        pushes() - before,
        held.len() as f64,
        "40 records written, 5 of them held by the gateway with the cache"
    );
    for (i, &p) in ptrs.iter().enumerate() {
        assert_eq!(reader.read(p).await, data(&(100 + i as u64).to_be_bytes()));
    }
}

/// Reads of `p` through `reader` right after writes through `writer`, for `secs`
/// seconds: each READ answered must hold the last write acknowledged (BUSY is allowed
/// while the cluster fails over). How many writes were read back.
async fn writes_read_back(
    writer: &mut Raw,
    reader: &mut Raw,
    p: Pointer,
    n: &mut u64,
    secs: f64,
    what: &str,
) -> u32 {
    let start = Instant::now();
    let mut read_back = 0;
    while start.elapsed().as_secs_f64() < secs {
        let next = *n + 1;
        let write = Request::Replace {
            ptr: p,
            data: Bytes::copy_from_slice(&next.to_be_bytes()),
        };
        match writer.ask(write).await {
            Reply::Written(_) => *n = next,
            Reply::Error {
                status: Status::Busy,
                ..
            } => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            r => panic!("{what}: write {next}: {r:?}"),
        }
        match reader.read(p).await {
            Reply::Error {
                status: Status::Busy,
                ..
            } => tokio::time::sleep(Duration::from_millis(50)).await,
            r => {
                assert_eq!(written_number(r), *n, "{what}: read after write {n}");
                read_back += 1;
            }
        }
    }
    read_back
}

/// Two gateways on `cluster` under a fresh prefix: one with the read cache (to read
/// through), and one whose writes are acknowledged once a replica has them (to
/// write through: a failover loses none of them).
fn cached_reader_and_careful_writer(
    cluster: &RedisCluster,
) -> (RunningServer, RunningServer, String) {
    let (a, prefix) = gateway_on(cluster, read_cached);
    let b = gateway_at(cluster, &prefix, |c| {
        c.cluster.as_mut().expect("a gateway").wait_replicas = 1;
    });
    (a, b, prefix)
}

/// What the read cache cannot vouch for it drops: the entries of a tracking
/// connection that is closed, and of a primary that a manual failover made a
/// replica (it stays connected, and gets the new primary's writes late), or that
/// was killed. Reads after acknowledged writes stay exact through all three, and the
/// cache serves again after each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_cache_follows_lost_tracking_connections_and_failovers() {
    let mut cluster = RedisCluster::start(3, 1, false);
    // Writes acknowledged once a replica has them: the kill below loses none.
    let (a, b, prefix) = cached_reader_and_careful_writer(&cluster);
    let m = a.metrics_addr().unwrap();
    let hits = || read_cache_hits(m);
    let mut writer = Raw::connect(b.addr(), 2).await;
    let mut reader = Raw::connect(a.addr(), 3).await;
    let p = writer
        .create(
            Access::READ | Access::WRITE,
            Bytes::copy_from_slice(&0u64.to_be_bytes()),
        )
        .await;
    let key = format!("{prefix}:{{r:{p}}}:m");
    let mut n = 0;
    // Served from the cache again: a few READs in a row are hits.
    let served_again = async |reader: &mut Raw, n: u64, what: &str| {
        let before = hits();
        eventually(what, Duration::from_secs(10), async || {
            for _ in 0..3 {
                assert_eq!(written_number(reader.read(p).await), n);
            }
            hits() > before
        })
        .await;
    };
    served_again(&mut reader, n, "hits at first").await;

    // Every tracking connection closed by the primaries.
    for port in cluster.primaries() {
        for line in cluster.cli(port, &["CLIENT", "LIST"]).lines() {
            if line.contains(" flags=tB ") {
                let id = line
                    .split_whitespace()
                    .next()
                    .unwrap()
                    .trim_start_matches("id=");
                cluster.cli(port, &["CLIENT", "KILL", "ID", id]);
            }
        }
    }
    let ok = writes_read_back(&mut writer, &mut reader, p, &mut n, 2.0, "tracking lost").await;
    assert!(ok > 5, "{ok} writes read back");
    served_again(
        &mut reader,
        n,
        "hits after the tracking connections came back",
    )
    .await;

    // A manual failover: the old primary stays up as a replica of the new one.
    let old = cluster.primary_of(&key);
    let replica = cluster.replicas_of(old)[0];
    assert_eq!(cluster.cli(replica, &["CLUSTER", "FAILOVER"]).trim(), "OK");
    let ok = writes_read_back(&mut writer, &mut reader, p, &mut n, 4.0, "manual failover").await;
    assert!(ok > 5, "{ok} writes read back");
    assert_eq!(cluster.primary_of(&key), replica, "the failover happened");
    served_again(&mut reader, n, "hits after the manual failover").await;

    // The new primary killed: its replica (the old primary) takes over.
    tokio::task::block_in_place(|| cluster.kill(replica));
    let ok = writes_read_back(&mut writer, &mut reader, p, &mut n, 12.0, "primary killed").await;
    assert!(ok > 5, "{ok} writes read back");
    served_again(&mut reader, n, "hits after the primary was killed").await;
    tokio::task::block_in_place(|| cluster.restart_killed(false));
}

/// A primary that stops answering (SIGSTOP, as behind a partition) holds up only the
/// READs of its own records, and only until the barrier on its tracking connection
/// times out: the cache goes on answering the records of the other primaries from
/// the start, while the gateway's looks at the layout try to connect to the frozen
/// one again. Through its replica's takeover and its own return as a replica, reads
/// after acknowledged writes stay exact, and the cache serves its records again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_cache_keeps_serving_while_a_primary_does_not_answer() {
    let cluster = RedisCluster::start(3, 1, false);
    let (a, b, prefix) = cached_reader_and_careful_writer(&cluster);
    let m = a.metrics_addr().unwrap();
    let hits = || read_cache_hits(m);
    let mut writer = Raw::connect(b.addr(), 2).await;
    let mut reader = Raw::connect(a.addr(), 3).await;
    // A record on each primary.
    let primaries = cluster.primaries();
    let mut on: Vec<(u16, Pointer)> = Vec::new();
    while on.len() < primaries.len() {
        let p = writer
            .create(
                Access::READ | Access::WRITE,
                Bytes::copy_from_slice(&0u64.to_be_bytes()),
            )
            .await;
        let port = cluster.primary_of(&format!("{prefix}:{{r:{p}}}:m"));
        if !on.iter().any(|(q, _)| *q == port) {
            on.push((port, p));
        }
    }
    for &(_, p) in &on {
        reads_come_from_the_cache(&a, p, &0u64.to_be_bytes()).await;
    }
    let (frozen, p0) = on[0];
    let others: Vec<Pointer> = on[1..].iter().map(|(_, p)| *p).collect();
    // Connected first: a connection's first request takes its identity's lease,
    // which may live on the primary about to be frozen.
    let mut stuck = Raw::connect(a.addr(), 3).await;
    assert_eq!(written_number(stuck.read(p0).await), 0);
    cluster.freeze(frozen, true);
    // A READ of the frozen primary's record waits for its barrier, on a connection of
    // its own.
    let stuck_read = tokio::spawn(async move { stuck.read(p0).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = hits();
    let started = Instant::now();
    let mut reads = 0;
    // Past the frozen primary's barrier timing out (2 s) and the next look at the
    // layout connecting to it again, and through the failover.
    while started.elapsed() < Duration::from_secs(4) {
        for &p in &others {
            let t = Instant::now();
            assert_eq!(written_number(reader.read(p).await), 0);
            assert!(
                t.elapsed() < Duration::from_millis(500),
                "a READ of another primary's record took {:?} while one primary is frozen",
                t.elapsed()
            );
            reads += 1;
        }
    }
    assert!(
        hits() - before >= reads as f64,
        "{} hits for {reads} READs of the other primaries' records while one was frozen",
        hits() - before
    );
    // Its replica takes over; writes acknowledged by it are read back through the
    // cache, on every primary.
    let mut n0 = 0;
    let ok = writes_read_back(
        &mut writer,
        &mut reader,
        p0,
        &mut n0,
        12.0,
        "frozen primary",
    )
    .await;
    assert!(ok > 5, "{ok} writes read back");
    let mut n1 = 0;
    let ok = writes_read_back(
        &mut writer,
        &mut reader,
        others[0],
        &mut n1,
        2.0,
        "another primary",
    )
    .await;
    assert!(ok > 5, "{ok} writes read back");
    // The READ that met the frozen primary was answered (a load, or BUSY), not held.
    match tokio::time::timeout(Duration::from_secs(5), stuck_read).await {
        Ok(Ok(
            Reply::Data(_)
            | Reply::Error {
                status: Status::Busy,
                ..
            },
        )) => {}
        r => panic!("the READ sent while its primary was frozen: {r:?}"),
    }
    // Back, as a replica of the new primary.
    cluster.freeze(frozen, false);
    tokio::task::block_in_place(|| cluster.wait_healthy());
    // (Asked only now: `redis-cli` would wait for ever on the frozen node.)
    assert_ne!(
        cluster.primary_of(&format!("{prefix}:{{r:{p0}}}:m")),
        frozen,
        "the replica took over"
    );
    let ok = writes_read_back(
        &mut writer,
        &mut reader,
        p0,
        &mut n0,
        3.0,
        "old primary back",
    )
    .await;
    assert!(ok > 5, "{ok} writes read back");
    let before = hits();
    eventually(
        "hits of the record whose primary was frozen, from its new primary",
        Duration::from_secs(10),
        async || {
            for _ in 0..3 {
                assert_eq!(written_number(reader.read(p0).await), n0);
            }
            hits() > before
        },
    )
    .await;
}

/// A held record whose slot moves to another primary (resharding): its keys leave the
/// old primary (`MIGRATE` deletes them there, which invalidates the entry), and its
/// writes go to the new one, where the gateway's tracking connection never filled it.
/// Reads right after the move and after writes must hold them, and the cache serves
/// the record again from its new primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_cache_follows_a_record_whose_slot_moved() {
    let cluster = RedisCluster::start(3, 0, false);
    let (a, prefix) = gateway_on(&cluster, read_cached);
    let plain = gateway_at(&cluster, &prefix, |_| {});
    let mut writer = Raw::connect(plain.addr(), 2).await;
    let mut reader = Raw::connect(a.addr(), 3).await;
    let number = |n: u64| Bytes::copy_from_slice(&n.to_be_bytes());
    let p = writer.create(Access::READ | Access::WRITE, number(0)).await;
    let key = format!("{prefix}:{{r:{p}}}:m");
    eventually("the create settled", Duration::from_secs(10), async || {
        !cluster.hgetall(&key).keys().any(|f| f.starts_with("m:"))
    })
    .await;
    let m = a.metrics_addr().unwrap();
    eventually("the record is held", Duration::from_secs(10), async || {
        let before = read_cache_hits(m);
        for _ in 0..3 {
            assert_eq!(written_number(reader.read(p).await), 0);
        }
        read_cache_hits(m) == before + 3.0
    })
    .await;
    let from = cluster.primary_of(&key);
    let to = *cluster.ports.iter().find(|&&x| x != from).unwrap();
    tokio::task::block_in_place(|| cluster.move_slot_of(&key, to));
    for n in 1..=5 {
        assert!(matches!(
            writer
                .ask(Request::Replace {
                    ptr: p,
                    data: number(n),
                })
                .await,
            Reply::Written(_)
        ));
        assert_eq!(
            written_number(reader.read(p).await),
            n,
            "read after write {n}"
        );
    }
    reads_come_from_the_cache(&a, p, &5u64.to_be_bytes()).await;
}

/// A primary that a failover made a replica keeps the read cache's tracking
/// connection, and hears of the new primary's writes only by replication, later. Here
/// the gateway keeps its old layout (it looks once a minute), and the old primary is
/// frozen while a write goes to the new one and a READ of the record (held, filled
/// there) is answered: the READ must wait for a barrier there (which Redis answers
/// `MOVED` from a replica), not serve what it holds. (Without barriers this fails at
/// the first record. A barrier without the `MOVED` check is caught first, by a READ
/// of a record nobody wrote since the failover, counted a hit instead of a miss: the
/// stale READs themselves depend on Redis sending the replicated write's
/// invalidation in another read of the gateway's than the barrier's reply, which it
/// did not in 3 runs.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_cache_stays_exact_while_its_primary_is_made_a_replica() {
    let cluster = RedisCluster::start(3, 1, false);
    let (a, prefix) = gateway_on(&cluster, |c| {
        read_cached(c);
        c.cluster.as_mut().expect("a gateway").topology_every = Duration::from_secs(60);
    });
    let plain = gateway_at(&cluster, &prefix, |_| {});
    let m = a.metrics_addr().unwrap();
    let hits = || read_cache_hits(m);
    let mut writer = Raw::connect(plain.addr(), 2).await;
    let mut reader = Raw::connect(a.addr(), 3).await;
    let key = |p: Pointer| format!("{prefix}:{{r:{p}}}:m");
    let mut ptrs: Vec<Pointer> = Vec::new();
    for _ in 0..12 {
        let zero = Bytes::copy_from_slice(&0u64.to_be_bytes());
        ptrs.push(writer.create(Access::READ | Access::WRITE, zero).await);
    }
    // The records of one primary, two at least: the first one's may have got only
    // it of 12 (1.2% of runs with pointers drawn at random; one full suite failed so),
    // so more are made until it has two.
    let old = cluster.primary_of(&key(ptrs[0]));
    ptrs.retain(|&p| cluster.primary_of(&key(p)) == old);
    for _ in 0..100 {
        if ptrs.len() >= 2 {
            break;
        }
        let zero = Bytes::copy_from_slice(&0u64.to_be_bytes());
        let p = writer.create(Access::READ | Access::WRITE, zero).await;
        if cluster.primary_of(&key(p)) == old {
            ptrs.push(p);
        }
    }
    assert!(
        ptrs.len() >= 2,
        "{} records on the first one's primary",
        ptrs.len()
    );
    // The creates' quota settlements change the records' hashes (they drop the
    // changes' markers), which drops them from the cache.
    eventually("the creates settled", Duration::from_secs(10), async || {
        ptrs.iter()
            .all(|&p| !cluster.hgetall(&key(p)).keys().any(|f| f.starts_with("m:")))
    })
    .await;
    // Held: READs in a row answered from the cache.
    eventually(
        "the records are held",
        Duration::from_secs(10),
        async || {
            let before = hits();
            for &p in &ptrs {
                assert_eq!(written_number(reader.read(p).await), 0);
            }
            hits() == before + ptrs.len() as f64
        },
    )
    .await;
    let new = cluster.replicas_of(old)[0];
    assert_eq!(cluster.cli(new, &["CLUSTER", "FAILOVER"]).trim(), "OK");
    // (Not `primary_of`: a node asked mid-failover may know no primary of the slot.)
    eventually("the failover", Duration::from_secs(10), async || {
        let replication = cluster.cli(old, &["INFO", "replication"]);
        cluster.cli(new, &["ROLE"]).starts_with("master")
            && replication.contains("role:slave")
            && replication.contains("master_link_status:up")
    })
    .await;
    // Every node learns of it by gossip, some a moment after the two nodes above:
    // `primary_of` asks one of them (it once answered the old primary here).
    eventually(
        "the node asked knows the new primary",
        Duration::from_secs(10),
        async || cluster.primary_of(&key(ptrs[0])) == new,
    )
    .await;
    // The old primary, a replica now, answers the barrier `MOVED`: a READ of a record
    // it filled (nothing written since) is a miss, not a hit.
    let (&last, ptrs) = ptrs.split_last().expect("records");
    let m = a.metrics_addr().unwrap();
    let loads = |r: &str| {
        metric(
            &scrape(m),
            &format!("netswap_redis_read_cache_loads_total{{result=\"{r}\"}}"),
        )
    };
    let (hits, missed) = (loads("hit"), loads("missed"));
    assert_eq!(written_number(reader.read(last).await), 0);
    assert_eq!(
        (loads("hit"), loads("missed")),
        (hits, missed + 1.0),
        "a replica's barrier vouched for what it holds"
    );
    for (i, &p) in ptrs.iter().enumerate() {
        let n = i as u64 + 1;
        cluster.freeze(old, true);
        let write = Request::Replace {
            ptr: p,
            data: Bytes::copy_from_slice(&n.to_be_bytes()),
        };
        assert!(matches!(writer.ask(write).await, Reply::Written(_)));
        let thaw = async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            cluster.freeze(old, false);
        };
        let (read, ()) = tokio::join!(reader.read(p), thaw);
        assert_eq!(written_number(read), n, "read after write {n}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_hold_across_gateways() {
    let prefix = fresh_prefix();
    let cfg = |c: &mut ServerConfig| c.store.quota_records = 5;
    let gws = [gateway(&prefix, cfg), gateway(&prefix, cfg)];
    let mut tasks = Vec::new();
    for i in 0..12 {
        let addr = gws[i % 2].addr();
        tasks.push(tokio::spawn(async move {
            let mut c = Raw::connect(addr, 4).await; // one identity on both gateways
            c.call(Request::Create {
                access: Access::empty(),
                data: Bytes::from_static(b"x"),
            })
            .await
            .status()
        }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Status::Ok => ok += 1,
            Status::QuotaExceeded => {}
            s => panic!("{s:?}"),
        }
    }
    assert_eq!(ok, 5, "exactly the quota, through both gateways together");
}

/// A record's bytes up to 1 KiB live in its state hash (field `d`), larger ones in its
/// data key, never both: writes that cross the limit move them (a WRITE_AT on bytes in
/// the hash is applied there), and every read, whole or a range, through the gateway
/// that wrote or another one, sees the same bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_records_keep_their_bytes_in_their_state_hash_and_move_when_they_grow() {
    let cluster = common::cluster::shared();
    let prefix = fresh_prefix();
    let (a, b) = (gateway(&prefix, |_| {}), gateway(&prefix, |_| {}));
    let mut ca = Raw::connect(a.addr(), 2).await;
    let mut cb = Raw::connect(b.addr(), 2).await;
    let p = ca.create(Access::READ | Access::WRITE, &b"abc"[..]).await;
    let (meta, data_key) = (
        format!("{prefix}:{{r:{p}}}:m"),
        format!("{prefix}:{{r:{p}}}:d"),
    );
    let mut want = b"abc".to_vec();
    let in_hash = |want: &[u8]| {
        let h = cluster.hgetall(&meta);
        h.get("d").map(String::as_bytes) == Some(want) && !cluster.exists(&data_key)
    };
    let in_key = || !cluster.hgetall(&meta).contains_key("d") && cluster.exists(&data_key);
    let write_at = |offset: u64, d: &[u8]| Request::WriteAt {
        ptr: p,
        offset,
        data: Bytes::copy_from_slice(d),
    };
    let splice = |want: &mut Vec<u8>, offset: usize, d: &[u8]| {
        if want.len() < offset + d.len() {
            want.resize(offset + d.len(), 0);
        }
        want[offset..offset + d.len()].copy_from_slice(d);
    };
    async fn agree(ca: &mut Raw, cb: &mut Raw, p: Pointer, want: &[u8]) {
        for c in [ca, cb] {
            assert_eq!(c.read(p).await, data(want));
            if want.len() >= 2 {
                let range = Some((2, 7));
                let end = want.len().min(9);
                assert_eq!(
                    c.ask(Request::Read { ptr: p, range }).await,
                    data(&want[2..end])
                );
            }
        }
    }
    assert!(in_hash(&want), "a small record's bytes are in its hash");
    agree(&mut ca, &mut cb, p, &want).await;
    // In the hash: inside, and appended at the end.
    assert_eq!(ca.ask(write_at(1, b"X")).await.status(), Status::Ok);
    splice(&mut want, 1, b"X");
    assert!(in_hash(b"aXc"));
    agree(&mut ca, &mut cb, p, &want).await;
    assert_eq!(ca.ask(write_at(2, b"Y")).await.status(), Status::Ok);
    splice(&mut want, 2, b"Y");
    assert_eq!(ca.ask(write_at(3, b"xy")).await.status(), Status::Ok);
    splice(&mut want, 3, b"xy");
    assert_eq!(want, b"aXYxy");
    assert!(in_hash(&want));
    agree(&mut ca, &mut cb, p, &want).await;
    // Past 1 KiB: moved to the data key.
    let long = vec![9u8; 1100];
    assert_eq!(cb.ask(write_at(4, &long)).await.status(), Status::Ok);
    splice(&mut want, 4, &long);
    assert!(in_key(), "a large record's bytes are in its data key");
    agree(&mut ca, &mut cb, p, &want).await;
    // A WRITE_AT on bytes in the data key stays there.
    assert_eq!(ca.ask(write_at(0, b"Z")).await.status(), Status::Ok);
    splice(&mut want, 0, b"Z");
    assert!(in_key());
    agree(&mut ca, &mut cb, p, &want).await;
    // Small again: back in the hash; large again: out.
    let replace = |d: Vec<u8>| Request::Replace {
        ptr: p,
        data: Bytes::from(d),
    };
    assert_eq!(
        ca.ask(replace(b"small".to_vec())).await.status(),
        Status::Ok
    );
    want = b"small".to_vec();
    assert!(in_hash(&want));
    agree(&mut ca, &mut cb, p, &want).await;
    want = vec![3u8; 2000];
    assert_eq!(cb.ask(replace(want.clone())).await.status(), Status::Ok);
    assert!(in_key());
    agree(&mut ca, &mut cb, p, &want).await;
    assert_eq!(ca.ask(replace(Vec::new())).await.status(), Status::Ok);
    assert!(in_hash(b""), "empty: an empty field, no data key");
    agree(&mut ca, &mut cb, p, b"").await;
    assert_eq!(ca.ask(Request::Delete { ptr: p }).await, Reply::Done);
    assert!(!cluster.exists(&meta) && !cluster.exists(&data_key));
}

/// Records stored by gateways of earlier versions, with their state in the fields
/// `o`, `p`, `a`, `v`, `x`, `g` instead of the packed `s`: read (through the `LOAD`
/// script), decided on as before, and converted by their next change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_of_the_earlier_layout_are_read_and_converted_by_their_next_change() {
    let cluster = common::cluster::shared();
    let prefix = fresh_prefix();
    let a = gateway(&prefix, |_| {});
    let mut owner = Raw::connect(a.addr(), 2).await;
    let p = owner.create(Access::READ, &b"old bytes"[..]).await;
    let q = owner
        .create(Access::READ | Access::WRITE, &b"shared"[..])
        .await;
    let meta = |ptr: Pointer| format!("{prefix}:{{r:{ptr}}}:m");
    // Both rewritten as an earlier gateway stored them.
    for ptr in [p, q] {
        let mut r = cluster.primary_connection(&meta(ptr));
        let s: Vec<u8> = redis::cmd("HGET")
            .arg(meta(ptr))
            .arg("s")
            .query(&mut r)
            .unwrap();
        assert_eq!(
            (s.len(), s[0], s[1]),
            (43, 1, 0),
            "format 1, no payer, no deadline"
        );
        let version = u64::from_be_bytes(s[3..11].try_into().unwrap());
        let () = redis::pipe()
            .cmd("HSET")
            .arg(meta(ptr))
            .arg("o")
            .arg(&s[11..43])
            .arg("a")
            .arg(s[2].to_string())
            .arg("v")
            .arg(version.to_string())
            .ignore()
            .cmd("HDEL")
            .arg(meta(ptr))
            .arg("s")
            .ignore()
            .query(&mut r)
            .unwrap();
    }
    let fields = |ptr: Pointer| {
        let h = cluster.hgetall(&meta(ptr));
        let mut f: Vec<String> = h
            .into_keys()
            .filter(|f| ["s", "o", "p", "a", "v", "x", "g"].contains(&f.as_str()))
            .collect();
        f.sort();
        f
    };
    assert_eq!(fields(p), ["a", "o", "v"]);
    // A gateway that remembers nothing of them, and the one that does.
    let b = gateway(&prefix, |_| {});
    let mut ob = Raw::connect(b.addr(), 2).await;
    let mut xb = Raw::connect(b.addr(), 3).await;
    for c in [&mut owner, &mut ob, &mut xb] {
        assert_eq!(c.read(p).await, data(b"old bytes"));
        assert_eq!(c.read(q).await, data(b"shared"));
    }
    // Decided on the old fields: only the owner writes p; anyone writes q.
    let replace = |ptr, d: &'static [u8]| Request::Replace {
        ptr,
        data: Bytes::from_static(d),
    };
    assert_eq!(
        xb.ask(replace(p, b"not yours")).await.status(),
        Status::AccessViolation
    );
    assert_eq!(fields(p), ["a", "o", "v"], "a refusal changes nothing");
    assert_eq!(ob.ask(replace(p, b"new bytes")).await, Reply::Written(2));
    assert_eq!(fields(p), ["s"], "converted by its next change");
    assert_eq!(xb.ask(replace(q, b"by another")).await, Reply::Written(2));
    assert_eq!(fields(q), ["s"]);
    for c in [&mut owner, &mut ob, &mut xb] {
        assert_eq!(c.read(p).await, data(b"new bytes"));
        assert_eq!(c.read(q).await, data(b"by another"));
    }
    // The converted state is the old one, changed: owner, access and version kept.
    assert_eq!(
        xb.ask(replace(p, b"still not yours")).await.status(),
        Status::AccessViolation
    );
    assert_eq!(owner.ask(replace(p, b"third")).await, Reply::Written(3));
    assert_eq!(owner.ask(Request::Delete { ptr: q }).await, Reply::Done);
    assert_eq!(owner.read(q).await.status(), Status::AddressFault);
}

/// One identity's many concurrent creates and deletes on one gateway: their quota
/// changes queue behind the one being written and go together in the next
/// compare-and-set, each decided on what the ones before it left, so the quota holds
/// exactly; once the deletes are settled the identity's usage is back to zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_identitys_concurrent_quota_changes_are_written_together_and_hold() {
    let cluster = common::cluster::shared();
    let prefix = fresh_prefix();
    let gw = gateway(&prefix, |c| {
        c.store.quota_records = 40;
        c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    });
    let m = gw.metrics_addr().expect("serves /metrics");
    let mut c = Raw::connect(gw.addr(), 5).await;
    let creates = (0..100)
        .map(|i| Request::Create {
            access: Access::empty(),
            data: Bytes::from(format!("r{i}")),
        })
        .collect();
    let mut made = Vec::new();
    for r in pipelined(&mut c, creates).await {
        match r {
            Reply::Created(p) => made.push(p),
            Reply::Error {
                status: Status::QuotaExceeded,
                ..
            } => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(made.len(), 40, "exactly the quota");
    let mm = scrape(m);
    let writes = metric(&mm, "netswap_redis_quota_writes_total");
    let changes = metric(&mm, "netswap_redis_quota_changes_total");
    assert!(
        changes > writes,
        "{changes} quota changes in {writes} writes: none went together"
    );
    let deletes = made.iter().map(|&ptr| Request::Delete { ptr }).collect();
    for r in pipelined(&mut c, deletes).await {
        assert_eq!(r, Reply::Done);
    }
    let id = Identity::derive(&IdentityKey::new(GATEWAY_KEY), local(5));
    let key = format!("{prefix}:{{i:{id}}}:q");
    eventually(
        "the usage is back to zero, nothing pending",
        Duration::from_secs(10),
        async || {
            let h = cluster.hgetall(&key);
            h.get("n").map(String::as_str) == Some("0")
                && h.get("b").map(String::as_str) == Some("0")
                && !h.keys().any(|k| k.starts_with("p:"))
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_on_one_record_keep_their_order_on_a_connection() {
    // With one turn (every request waits for the one before), the default number of
    // turns, and no limit; with the commands of requests sent together (the default)
    // and each on its own (`--redis-batch false`).
    for (turns, batch) in [(1, true), (128, true), (0, true), (128, false), (0, false)] {
        appends_keep_their_order(turns, batch).await;
    }
}

async fn appends_keep_their_order(turns: usize, batch: bool) {
    let prefix = fresh_prefix();
    let gw = gateway(&prefix, |c| {
        let o = c.cluster.as_mut().unwrap();
        o.max_in_flight = turns;
        o.batch = batch;
    });
    let mut c = Raw::connect(gw.addr(), 2).await;
    let p = c.create(Access::empty(), &b""[..]).await;
    // 200 appends pipelined in one write: applied in the order they arrived.
    let mut bytes = Vec::new();
    let mut want = Vec::new();
    for i in 0..200u32 {
        let piece = format!("{i},");
        bytes.extend_from_slice(&Raw::frames(
            Request::WriteAt {
                ptr: p,
                offset: want.len() as u64,
                data: Bytes::from(piece.clone()),
            }
            .encode(1000 + i),
        ));
        want.extend_from_slice(piece.as_bytes());
    }
    c.send_raw(&bytes).await;
    for i in 0..200u32 {
        assert_eq!(
            c.reply_to(1000 + i).await.status(),
            Status::Ok,
            "append {i} with {turns} turns, batch {batch}"
        );
    }
    assert_eq!(c.read(p).await, Reply::Data(Bytes::from(want)));
    gw.stop().unwrap();
}

/// A request held up by a primary that does not answer does not hold up the replies
/// to the same connection's requests on records of other primaries: a connection
/// gathers the replies of requests that finish together for a few passes of the
/// event loop (`GATHER_PASSES` in conn.rs), not until nothing is in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_held_up_by_one_primary_does_not_hold_up_the_connections_other_replies() {
    let cluster = RedisCluster::start(3, 0, false);
    let (gw, prefix) = gateway_on(&cluster, |c| {
        // Long enough that the request on the frozen node is still in flight when
        // the others have been answered.
        c.cluster.as_mut().unwrap().response_timeout = Duration::from_secs(8);
    });
    let mut c = Raw::connect(gw.addr(), 2).await;
    // A record on one primary, `held`, and one on another, `served`.
    let primary = |p: Pointer| cluster.primary_of(&format!("{prefix}:{{r:{p}}}:m"));
    let held = c.create(Access::READ, &b"held"[..]).await;
    let served = loop {
        let p = c.create(Access::READ, &b"served"[..]).await;
        if primary(p) != primary(held) {
            break p;
        }
    };
    assert_eq!(c.read(held).await, data(b"held"));
    assert_eq!(c.read(served).await, data(b"served"));
    let frozen = primary(held);
    cluster.freeze(frozen, true);
    // One write: a READ of `held`, then 16 READs of `served`.
    let mut bytes = Raw::frames(
        Request::Read {
            ptr: held,
            range: None,
        }
        .encode(100),
    );
    for i in 0..16 {
        bytes.extend_from_slice(&Raw::frames(
            Request::Read {
                ptr: served,
                range: None,
            }
            .encode(200 + i),
        ));
    }
    let sent = Instant::now();
    c.send_raw(&bytes).await;
    for i in 0..16 {
        let m = tokio::time::timeout(Duration::from_secs(3), c.reply_to(200 + i))
            .await
            .unwrap_or_else(|_| {
                panic!("READ {i} of the other primary's record held up behind the frozen one")
            });
        assert_eq!(m.status(), Status::Data);
    }
    let answered = sent.elapsed();
    // The frozen node's request was still in flight all along (else this test showed
    // nothing).
    let first = tokio::time::timeout(Duration::from_millis(200), c.reply_to(100)).await;
    assert!(
        first.is_err(),
        "the READ on the frozen node was answered before the others: {:?}",
        first.map(|m| m.status())
    );
    cluster.freeze(frozen, false);
    let m = tokio::time::timeout(Duration::from_secs(30), c.reply_to(100))
        .await
        .expect("the READ on the thawed node is answered");
    assert!(
        matches!(m.status(), Status::Data | Status::Busy),
        "{:?}",
        m.status()
    );
    println!("16 READs answered in {answered:?} while one READ of the same connection was held");
    gw.stop().unwrap();
}

/// A record of `size` patterned bytes that anyone may read, created from
/// 127.0.0.2: its owner's connection, its pointer and its bytes.
async fn large_record(addr: SocketAddr, size: usize) -> (Raw, Pointer, Bytes) {
    let bytes: Bytes = (0..size)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<_>>()
        .into();
    let mut owner = Raw::connect(addr, 2).await;
    let p = owner.create(Access::READ, bytes.clone()).await;
    (owner, p, bytes)
}

/// A connection from 127.0.0.`from` with a 4 KiB receive buffer that has sent `n`
/// READs of `p` and reads nothing yet; with their XIDs.
async fn unread_reads(addr: SocketAddr, from: u8, p: Pointer, n: u32) -> (Raw, Vec<u32>) {
    let mut c = Raw::connect_with_recv_buffer(addr, from, 4096).await;
    let mut xids = Vec::new();
    for _ in 0..n {
        let xid = c.xid();
        c.send(
            xid,
            &Request::Read {
                ptr: p,
                range: None,
            },
        )
        .await;
        xids.push(xid);
    }
    (c, xids)
}

/// A client that pipelines READs of a large record and reads none of the replies
/// cannot make a gateway hold more than its `--max-output-bytes` of them. The
/// embedded store shares one record's bytes among all such replies; a gateway gets a
/// copy from Redis per READ, and without a budget they piled up in the connection's
/// output (3.7 GiB in `flood --store`, docs/RELIABILITY.md). Every reply still
/// arrives, byte-exact, once the client reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_reads_nothing_cannot_make_a_gateway_hold_its_large_replies() {
    const READS: u32 = 100;
    const SIZE: usize = 4 << 20;
    let cluster = common::cluster::shared();
    let gw = GatewayProcess::start(
        &cluster.nodes(),
        &fresh_prefix(),
        &["--max-output-bytes", "1048576"],
        &[],
    );
    let (mut owner, p, bytes) = large_record(gw.addr, SIZE).await;
    let (mut reader, xids) = unread_reads(gw.addr, 3, p, READS).await;
    let before = gw.rss_mib();
    let peak = gw.peak_rss_mib().await;
    assert!(
        peak < before + 64,
        "{READS} unread READs of {SIZE} B: the gateway went from {before} to {peak} MiB"
    );
    // Another client is served meanwhile.
    assert_eq!(owner.read(p).await, Reply::Data(bytes.clone()));
    for (i, xid) in xids.into_iter().enumerate() {
        let m = reader.reply_to(xid).await;
        assert_eq!(m.status(), Status::Data, "read {i}");
        assert!(
            m.payload == bytes,
            "read {i}: {} bytes, not the record's",
            m.payload.len()
        );
    }
}

/// A gateway on the shared cluster whose large replies may hold 8 MiB in all (2 MiB
/// per address), each connection's 16 MiB.
fn gateway_with_a_small_reply_budget() -> GatewayProcess {
    GatewayProcess::start(
        &common::cluster::shared().nodes(),
        &fresh_prefix(),
        &[
            "--max-output-bytes",
            "16777216",
            "--redis-max-reply-bytes",
            "8388608",
        ],
        &[],
    )
}

/// Many connections that read nothing cannot, together, make a gateway hold more
/// than `--redis-max-reply-bytes` of large replies: each holds at most two, and all
/// of them within the gateway's budget. Past it a large READ gets BUSY at once (it
/// cannot wait: the replies holding the budget are sent only if their clients read);
/// once they read, large READs are served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_read_nothing_stay_within_the_gateways_reply_budget() {
    const CONNS: u8 = 16;
    const READS: u32 = 4;
    const SIZE: usize = 4 << 20;
    let gw = gateway_with_a_small_reply_budget();
    let (_owner, p, bytes) = large_record(gw.addr, SIZE).await;
    let before = gw.rss_mib();
    let mut readers = Vec::new();
    for c in 0..CONNS {
        readers.push(unread_reads(gw.addr, 10 + c, p, READS).await);
    }
    let peak = gw.peak_rss_mib().await;
    // Two per connection would be 128 MiB.
    assert!(
        peak < before + 48,
        "{CONNS} connections with unread READs of {SIZE} B: {before} -> {peak} MiB"
    );
    let (mut served, mut busy) = (0, 0);
    let mut readers: Vec<Raw> = readers
        .into_iter()
        .map(|(mut r, xids)| async move {
            let mut got = Vec::new();
            for xid in xids {
                got.push(r.reply_to(xid).await);
            }
            (r, got)
        })
        .collect::<futures_util::future::JoinAll<_>>()
        .await
        .into_iter()
        .map(|(r, got)| {
            for m in got {
                match m.status() {
                    Status::Data => {
                        assert!(m.payload == bytes, "{} bytes", m.payload.len());
                        served += 1;
                    }
                    Status::Busy => busy += 1,
                    s => panic!("a READ answered {s:?}"),
                }
            }
            r
        })
        .collect();
    assert!(served >= 2 && busy > 0, "{served} served, {busy} BUSY");
    // Read, the replies gave the budget back.
    for r in &mut readers {
        assert_eq!(r.read(p).await, Reply::Data(bytes.clone()));
    }
}

/// A data watch's first reply carries the whole record, like a READ's: connections
/// that start data watches on large records and read nothing cannot make a gateway
/// hold more than `--redis-max-reply-bytes` of those replies either (before, each
/// watch's copy from Redis was held in full: 16 connections × 4 records × 4 MiB).
/// Past the budget a watch gets BUSY and is not registered; every watch that was
/// started has its record's bytes, exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_watches_that_are_not_read_stay_within_the_gateways_reply_budget() {
    const CONNS: u8 = 16;
    const RECORDS: usize = 4;
    const SIZE: usize = 4 << 20;
    let gw = gateway_with_a_small_reply_budget();
    let (mut owner, first, bytes) = large_record(gw.addr, SIZE).await;
    let mut records = vec![first];
    while records.len() < RECORDS {
        records.push(owner.create(Access::READ, bytes.clone()).await);
    }
    let before = gw.rss_mib();
    let mut watchers = Vec::new();
    for c in 0..CONNS {
        let mut w = Raw::connect_with_recv_buffer(gw.addr, 50 + c, 4096).await;
        let mut xids = Vec::new();
        for &p in &records {
            let xid = w.xid();
            w.send(
                xid,
                &Request::Watch {
                    ptr: p,
                    options: WatchOptions::data(),
                },
            )
            .await;
            xids.push(xid);
        }
        watchers.push((w, xids));
    }
    let peak = gw.peak_rss_mib().await;
    assert!(
        peak < before + 48,
        "{CONNS} connections with {RECORDS} unread data watches of {SIZE} B each: \
         {before} -> {peak} MiB"
    );
    let (mut started, mut busy) = (0, 0);
    for (w, xids) in &mut watchers {
        for xid in xids.iter() {
            let m = w.reply_to(*xid).await;
            match m.status() {
                Status::Ok => {
                    assert!(
                        m.payload.len() == WATCH_STATE_LEN + SIZE
                            && m.payload[WATCH_STATE_LEN..] == bytes[..],
                        "a data watch started with {} bytes, not the record's",
                        m.payload.len()
                    );
                    started += 1;
                }
                Status::Busy => busy += 1,
                s => panic!("a data WATCH answered {s:?}"),
            }
        }
    }
    assert!(started >= 2 && busy > 0, "{started} started, {busy} BUSY");
}

/// One address that reads none of its large replies holds at most its share (a
/// quarter) of the gateway's reply budget: its further large READs get BUSY, and
/// another address's are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_that_reads_nothing_holds_only_its_share_of_the_reply_budget() {
    const SIZE: usize = 4 << 20;
    let cluster = common::cluster::shared();
    let gw = GatewayProcess::start(
        &cluster.nodes(),
        &fresh_prefix(),
        // A share of 16 MiB: four of these replies.
        &[
            "--max-output-bytes",
            "67108864",
            "--redis-max-reply-bytes",
            "67108864",
        ],
        &[],
    );
    let (_owner, p, bytes) = large_record(gw.addr, SIZE).await;
    let mut hog = Vec::new();
    for _ in 0..3 {
        hog.push(unread_reads(gw.addr, 30, p, 4).await);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Another address is served while the first holds its share.
    let mut other = Raw::connect(gw.addr, 31).await;
    assert_eq!(other.read(p).await, Reply::Data(bytes.clone()));
    let (mut served, mut busy) = (0, 0);
    for (mut c, xids) in hog {
        for xid in xids {
            let m = c.reply_to(xid).await;
            match m.status() {
                Status::Data => served += 1,
                Status::Busy => {
                    assert!(
                        String::from_utf8_lossy(&m.payload).contains("this address"),
                        "{:?}",
                        String::from_utf8_lossy(&m.payload)
                    );
                    busy += 1;
                }
                s => panic!("a READ answered {s:?}"),
            }
        }
    }
    // Four of these replies fill its share (more only if the kernel took a whole
    // reply into its socket buffer, which gives its bytes back).
    assert!(
        served >= 4 && busy >= 4 && served + busy == 12,
        "{served} served, {busy} BUSY"
    );
}

/// `/metrics` tells why large replies were refused (`netswap_redis_replies_refused_total`
/// by what held the budget) and how many bytes unread replies hold
/// (`netswap_redis_reply_bytes_held`), back to 0 once they are read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_tell_what_holds_the_reply_budget() {
    const SIZE: usize = 4 << 20;
    let prefix = fresh_prefix();
    // 4 MiB in all, 1 MiB per address: a 4 MiB reply takes one address's share.
    let gw = gateway(&prefix, |c| {
        c.cluster.as_mut().unwrap().max_reply_bytes = 4 << 20;
        c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    });
    let m = gw.metrics_addr().expect("serves /metrics");
    let (_owner, p, _) = large_record(gw.addr(), SIZE).await;
    let held = || metric(&scrape(m), "netswap_redis_reply_bytes_held");
    let refused = |by: &str| {
        metric(
            &scrape(m),
            &format!("netswap_redis_replies_refused_total{{held=\"{by}\"}}"),
        )
    };
    assert_eq!(held(), 0.0);
    // Four addresses hold a share each (a later READ of each is refused for its
    // address: of three, at most one can have gone to the kernel's socket buffers),
    // so the gateway's budget is taken.
    let mut hogs = Vec::new();
    for from in 70..74 {
        hogs.push(unread_reads(gw.addr(), from, p, 3).await);
    }
    let start = Instant::now();
    while held() < (4 << 20) as f64 || refused("address") < 4.0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "held {} B, {} refused for the address",
            held(),
            refused("address")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(refused("gateway"), 0.0);
    let mut late = Raw::connect(gw.addr(), 75).await;
    assert_eq!(
        late.call(Request::Read {
            ptr: p,
            range: None
        })
        .await
        .status(),
        Status::Busy
    );
    assert_eq!(refused("gateway"), 1.0);
    for (hog, xids) in &mut hogs {
        for xid in xids.iter() {
            hog.reply_to(*xid).await;
        }
    }
    let start = Instant::now();
    while held() > 0.0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{} B still held after the replies were read",
            held()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gw.stop().unwrap();
}

/// A client that reconnects while its gateway answers its watches BUSY (here: another
/// connection of its address holds the address's share of the reply budget, so a data
/// watch of a large record, a mirror, is refused) registers them again once the
/// gateway can serve them, on the same connection. Before, the client gave up on the
/// watch until its next reconnection: the mirror missed every change after the blip.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_comes_back_after_a_reconnection_its_gateway_answered_busy() {
    const SIZE: usize = 4 << 20;
    let cluster = common::cluster::shared();
    // A share of 4 MiB: one of these replies.
    let gw = GatewayProcess::start(
        &cluster.nodes(),
        &fresh_prefix(),
        &["--redis-max-reply-bytes", "16777216"],
        &[],
    );
    let (mut owner, p, bytes) = large_record(gw.addr, SIZE).await;
    let proxy = Proxy::start(gw.addr, 61).await;
    let client = netswap_client::Client::connect_with(
        proxy.addr,
        netswap_client::Options {
            request_timeout: Some(Duration::from_secs(10)),
            reconnect: netswap_client::Reconnect {
                initial_delay: Duration::from_millis(50),
                max_delay: Duration::from_millis(400),
                ..netswap_client::Reconnect::default()
            },
            ..netswap_client::Options::default()
        },
    )
    .await
    .unwrap();
    let mut mirror = client.mirror(p).await.unwrap();
    assert!(mirror.data() == bytes);
    let (mut hog, xids) = unread_reads(gw.addr, 61, p, 4).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut states = client.state_changes();
    proxy.cut();
    tokio::time::timeout(Duration::from_secs(10), states.changed())
        .await
        .expect("the client saw the cut")
        .unwrap();
    tokio::time::timeout(
        Duration::from_secs(10),
        states.wait_for(|s| s.name() == "CONNECTED"),
    )
    .await
    .expect("the client reconnected")
    .unwrap();
    // Its mirror's registration meets BUSY meanwhile; the record changes.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let m = owner
        .call(Request::WriteAt {
            ptr: p,
            offset: 0,
            data: Bytes::from_static(b"changed"),
        })
        .await;
    assert_eq!(m.status(), Status::Ok);
    // The share is given back.
    for xid in xids {
        hog.reply_to(xid).await;
    }
    let start = Instant::now();
    while &mirror.data()[..7] != b"changed" {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "the mirror never came back after the reconnection"
        );
        let _ = tokio::time::timeout(Duration::from_millis(500), mirror.next()).await;
    }
    assert!(mirror.data()[7..] == bytes[7..]);
}

/// A pointer scanner on a gateway costs Redis about the miss rate, not its own rate.
/// A gateway learns of a miss only when Redis answers, and a pipelining scanner has
/// sent its next thousand guesses by then: before probation (`conn::PROBATION`), each
/// throttle window let such a burst through to Redis, to be answered BUSY only
/// afterwards. Now a connection whose lookups were throttled pays for each lookup
/// before it is sent, and another identity's requests are served as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pointer_scanner_costs_redis_the_miss_rate_not_its_own() {
    const GUESSES: u32 = 8_000;
    const BATCH: u32 = 1_000;
    const RATE: u32 = 100;
    let cluster = common::cluster::RedisCluster::start(3, 0, false);
    let (gw, _) = gateway_on(&cluster, |c| c.max_misses_per_second = RATE);
    let mut owner = Raw::connect(gw.addr(), 2).await;
    let p = owner.create(Access::READ, &b"still here"[..]).await;
    let mut scanner = Raw::connect(gw.addr(), 3).await;
    let loads_before = cluster.calls("hmget");
    let started = Instant::now();
    let (mut faults, mut busy) = (0u32, 0u32);
    let mut n = 0u64;
    for _ in 0..GUESSES / BATCH {
        let mut xids = Vec::new();
        for _ in 0..BATCH {
            n += 1;
            let ptr = Pointer::new(n.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1).unwrap();
            let xid = scanner.xid();
            scanner.send(xid, &Request::Read { ptr, range: None }).await;
            xids.push(xid);
        }
        for xid in xids {
            match scanner.reply_to(xid).await.status() {
                Status::AddressFault => faults += 1,
                Status::Busy => busy += 1,
                s => panic!("a guess answered {s:?}"),
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let loads = cluster.calls("hmget") - loads_before;
    // The first batch goes out before any miss is known; then the rate (and its
    // burst), per second of the scan.
    let allowed = u64::from(BATCH + RATE) + (f64::from(RATE) * (secs + 1.0)) as u64;
    assert!(
        loads <= allowed,
        "{GUESSES} guesses in {secs:.2} s: {loads} loads from Redis, more than {allowed} \
         ({faults} ADDRESS_FAULT, {busy} BUSY)"
    );
    assert_eq!(faults + busy, GUESSES);
    assert!(busy > GUESSES / 2, "{busy} BUSY");
    assert_eq!(owner.read(p).await, data(b"still here"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphans_are_reaped_only_when_no_gateway_holds_their_identity() {
    let cluster = common::cluster::shared();
    let prefix = fresh_prefix();
    let grace = ["--orphan-grace", "2"];
    let survivor = GatewayProcess::start(&cluster.nodes(), &prefix, &grace, &[]);
    // Identity 2 only on the gateway that will die; identity 3 on both.
    let doomed = GatewayProcess::start(&cluster.nodes(), &prefix, &grace, &[]);
    let mut lonely = Raw::connect(doomed.addr, 2).await;
    let mut both_a = Raw::connect(doomed.addr, 3).await;
    let _both_b = Raw::connect(survivor.addr, 3).await;
    let lost = lonely
        .create(Access::READ, &b"only on the dead gateway"[..])
        .await;
    let kept = both_a
        .create(Access::READ, &b"also on a live one"[..])
        .await;
    doomed.kill();
    let mut observer = Raw::connect(survivor.addr, 9).await;
    // Alive while the dead gateway's lease runs out (2 s) and during the grace (2 s).
    assert_eq!(observer.read(lost).await, data(b"only on the dead gateway"));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        observer.read(lost).await,
        data(b"only on the dead gateway"),
        "still in its grace period"
    );
    eventually(
        "the orphan is reaped",
        Duration::from_secs(10),
        async || observer.read(lost).await.status() == Status::AddressFault,
    )
    .await;
    assert_eq!(
        observer.read(kept).await,
        data(b"also on a live one"),
        "its owner is still connected through the other gateway"
    );
}

/// Lease TTL `ttl` and, when given, orphan grace `grace`.
fn lease_settings(c: &mut ServerConfig, ttl: Duration, grace: Option<Duration>) {
    c.cluster.as_mut().unwrap().lease_ttl = ttl;
    if let Some(grace) = grace {
        c.store.orphan_grace = grace;
    }
}

/// An in-process gateway on the shared cluster with `lease_settings` and `/metrics`,
/// and where those are served.
fn lease_gateway(ttl: Duration, grace: Option<Duration>) -> (RunningServer, SocketAddr) {
    let g = gateway(&fresh_prefix(), |c| {
        c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
        lease_settings(c, ttl, grace);
    });
    let m = g.metrics_addr().expect("serves /metrics");
    (g, m)
}

/// A primary that stops answering (cut off without a reset, or stalled: SIGSTOP here)
/// holds up the lease renewals of its own identities only. Each renewal sent to it
/// waits for the response timeout (2 s), and such renewals took every one of a pass's
/// places, while each pass waited 2 s more for the reaper's schedule when that
/// primary held it (as here): the identities of the primaries that kept answering
/// were renewed seconds late, and 285 and 402 of their 405 leases ran out for every
/// other gateway in two runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_that_stops_answering_holds_up_only_its_own_leases() {
    const IDENTITIES: usize = 600;
    let cluster = RedisCluster::start(3, 0, false);
    let (g, prefix) = gateway_on(&cluster, |c| {
        c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
        lease_settings(c, Duration::from_secs(3), None);
    });
    let m = g.metrics_addr().expect("serves /metrics");
    let _held = connect_many(g.addr(), 9, IDENTITIES).await;
    eventually(
        "every identity has a lease",
        Duration::from_secs(30),
        async || metric(&scrape(m), "netswap_identities") >= IDENTITIES as f64,
    )
    .await;
    // Each primary's lease keys, and a connection to it.
    let leases_on = |port: u16| {
        let mut c = redis::Client::open(format!("redis://127.0.0.1:{port}"))
            .unwrap()
            .get_connection()
            .unwrap();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}:{{i:*}}:l"))
            .query(&mut c)
            .unwrap();
        (c, keys)
    };
    let primaries = cluster.primaries();
    eventually(
        "every lease is in Redis",
        Duration::from_secs(30),
        async || {
            primaries
                .iter()
                .map(|&p| leases_on(p).1.len())
                .sum::<usize>()
                == IDENTITIES
        },
    )
    .await;
    // The one that holds the reaper's schedule, which every pass writes to.
    let stalled = cluster.primary_of(&format!("{prefix}:{{reap}}"));
    let mut answering: Vec<_> = primaries
        .iter()
        .filter(|&&p| p != stalled)
        .map(|&p| leases_on(p))
        .collect();
    let answering_identities: usize = answering.iter().map(|(_, k)| k.len()).sum();
    // The live leases of a primary's identities, as another gateway would see them.
    let live_leases = |(c, keys): &mut (redis::Connection, Vec<String>)| {
        let (secs, micros): (u64, u64) = redis::cmd("TIME").query(c).unwrap();
        let now = secs * 1000 + micros / 1000;
        let mut each = redis::pipe();
        for k in keys.iter() {
            each.cmd("ZRANGE").arg(k).arg(0).arg(-1).arg("WITHSCORES");
        }
        let leases: Vec<Vec<(String, u64)>> = each.query(c).unwrap();
        leases
            .iter()
            .filter(|l| l.iter().any(|&(_, until)| until > now))
            .count()
    };
    // Two TTLs without an answer from one primary; the leases of the others looked
    // at as another gateway would see them, every 200 ms.
    cluster.freeze(stalled, true);
    let frozen = Instant::now();
    let mut most_run_out = 0;
    while frozen.elapsed() < Duration::from_secs(6) {
        let live: usize = answering.iter_mut().map(live_leases).sum();
        most_run_out = most_run_out.max(answering_identities - live);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    cluster.freeze(stalled, false);
    assert_eq!(
        most_run_out, 0,
        "leases of identities on primaries that answered ran out (at most {most_run_out} of {answering_identities} at once) while another primary did not answer"
    );
    assert!(
        metric(&scrape(m), "netswap_redis_lease_renewals_late_total") > 0.0,
        "renewals to the primary that did not answer went on in the background"
    );
    // Nor was a connection replaced: the others' primaries answered on them.
    assert_eq!(
        metric(&scrape(m), "netswap_redis_connections_replaced_total"),
        0.0
    );
    // Once it answers again, its identities' leases are renewed again too.
    let mut all = leases_on(stalled);
    eventually(
        "every lease is live again",
        Duration::from_secs(15),
        async || {
            live_leases(&mut all) == all.1.len()
                && answering.iter_mut().map(live_leases).sum::<usize>() == answering_identities
        },
    )
    .await;
}

/// A primary that stops answering holds up the writes of its own records only. Every
/// write takes one of the gateway's turns (`--redis-max-in-flight`) for as long as
/// Redis takes to answer it, so under a load of writes over all records those of the
/// stopped primary's held every turn, and a write of a record on a primary that
/// answered waited for one: 15.6–16.3 s in three runs. Now each primary has its turns
/// (`cluster/turns.rs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_that_stops_answering_holds_up_only_the_writes_of_its_records() {
    // Writes in flight: a third of them, ~400, to the primary that stops answering,
    // more than the 256 turns of the whole gateway that there were.
    const WRITERS: usize = 12;
    const IN_FLIGHT: usize = 100;
    let (cluster, g, prefix, m) = cluster_and_gateway();
    let meta_of = |p: Pointer| format!("{prefix}:{{r:{p}}}:m");
    let mut c = Raw::connect(g.addr(), 2).await;
    // The one of the reaper's schedule, which the gateway also asks every second.
    let stalled = cluster.primary_of(&format!("{prefix}:{{reap}}"));
    // Writes that keep the records' size: a size that changes is a change of the
    // quota of the records' owner, which may be on the stopped primary.
    let probe_record = loop {
        let p = c.create(Access::READ | Access::WRITE, &b"0"[..]).await;
        if cluster.primary_of(&meta_of(p)) != stalled {
            break p;
        }
    };
    let mut each = Vec::new();
    for _ in 0..WRITERS {
        each.push(records(&mut c, IN_FLIGHT).await);
    }
    let writers = Writers::start(g.addr(), each, &[b"l"]).await;
    let mut probe = Raw::connect(g.addr(), 3).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let probed = probe_while_stopped(&cluster, stalled, &mut probe, probe_record).await;
    writers.stop().await;
    // No connection was replaced either: the primaries that answered did so on them
    // (a `PING` to a node picked at random, two looks in a row on the stopped one,
    // replaced a connection in 3 of 8 runs of this test and the leases' one).
    probed.assert_unaffected(m);
}

/// A change holds a turn only of the primary it waits on. Writes that change a
/// record's size change its payer's quota, wherever that is: they held their record's
/// primary's turn while they waited on the payer's, so writes of records on primaries
/// that answered, paid for by an identity whose quota was on one that did not, held
/// those primaries' turns, and a write of another record there waited behind them.
/// Now a change's turn moves to the primary it waits on (`cluster/turns.rs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_that_stops_answering_holds_up_only_the_writes_it_is_asked_for() {
    // Writes in flight on the primaries that answer: ~600 each, over their 128 turns.
    const WRITERS: usize = 12;
    const IN_FLIGHT: usize = 100;
    let (cluster, g, prefix, m) = cluster_and_gateway();
    let stalled = cluster.primaries()[0];
    let primary_of_identity = |n: u8| primary_of_identity(&cluster, &prefix, n);
    let primary_of_record = |p: Pointer| cluster.primary_of(&format!("{prefix}:{{r:{p}}}:m"));
    // The owner of the written records: its quota is on the primary that stops.
    let owner_n = (2..=250)
        .find(|&n| primary_of_identity(n) == stalled)
        .unwrap();
    let prober_n = (2..=250)
        .find(|&n| n != owner_n && primary_of_identity(n) != stalled)
        .unwrap();
    let mut owner = Raw::connect(g.addr(), owner_n).await;
    let mut answering = Vec::new();
    while answering.len() < WRITERS * IN_FLIGHT {
        answering.extend(
            records(&mut owner, 300)
                .await
                .into_iter()
                .filter(|&p| primary_of_record(p) != stalled),
        );
    }
    let mut probe = Raw::connect(g.addr(), prober_n).await;
    let probe_record = loop {
        let p = probe.create(Access::READ | Access::WRITE, &b"0"[..]).await;
        if primary_of_record(p) != stalled {
            break p;
        }
    };
    // Each round changes every record's size, by one byte up or down.
    let each = answering.chunks(IN_FLIGHT).take(WRITERS).map(<[_]>::to_vec);
    let writers = Writers::start(g.addr(), each.collect(), &[b"ll", b"l"]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let probed = probe_while_stopped(&cluster, stalled, &mut probe, probe_record).await;
    writers.stop().await;
    probed.assert_unaffected(m);
}

/// A cluster of the test's own (3 primaries, no replicas), and a gateway on it
/// serving `/metrics`: its prefix and metrics address.
fn cluster_and_gateway() -> (RedisCluster, RunningServer, String, SocketAddr) {
    let cluster = RedisCluster::start(3, 0, false);
    let (g, prefix) = gateway_on(&cluster, |c| {
        c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    });
    let m = g.metrics_addr().expect("serves /metrics");
    (cluster, g, prefix, m)
}

/// Connections that keep writing their records until stopped, each from an address
/// of its own (127.10.x.y).
struct Writers {
    stop: Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Writers {
    /// One connection per list of `records`, writing all of its records pipelined,
    /// round after round, each round the next of `values`.
    async fn start(
        addr: SocketAddr,
        records: Vec<Vec<Pointer>>,
        values: &'static [&'static [u8]],
    ) -> Writers {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut tasks = Vec::new();
        for (n, ptrs) in records.into_iter().enumerate() {
            let mut w = Raw::connect_from(addr, many(10, n)).await;
            let stop = stop.clone();
            tasks.push(tokio::spawn(async move {
                for &value in values.iter().cycle() {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        return;
                    }
                    let data = Bytes::from_static(value);
                    let writes = ptrs
                        .iter()
                        .map(|&ptr| Request::Replace {
                            ptr,
                            data: data.clone(),
                        })
                        .collect();
                    pipelined(&mut w, writes).await;
                }
            }));
        }
        Writers { stop, tasks }
    }

    /// Stops them after their round, and waits for them.
    async fn stop(self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
    }
}

/// The primary of the quota of the identity of 127.0.0.`n` under `prefix`.
fn primary_of_identity(cluster: &RedisCluster, prefix: &str, n: u8) -> u16 {
    let id = Identity::derive(&IdentityKey::new(GATEWAY_KEY), local(n));
    cluster.primary_of(&format!("{prefix}:{{i:{id}}}:q"))
}

/// A create picks its record's pointer, so while a primary does not answer it picks
/// one on another (`cluster/silent.rs`). Before, with one of three primaries stopped,
/// a third of the creates drew a pointer there and were answered BUSY after the
/// response timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_go_to_primaries_that_answer() {
    const CREATES: usize = 45;
    let (cluster, g, prefix, m) = cluster_and_gateway();
    // Not the first: `primary_of` asks the first node that runs.
    let stalled = cluster.primaries()[2];
    let n = (2..=250)
        .find(|&n| primary_of_identity(&cluster, &prefix, n) != stalled)
        .unwrap();
    let mut c = Raw::connect(g.addr(), n).await;
    // Slots avoided: the stopped primary's, first as silent, then (the cluster's node
    // timeout is 1.5 s) as marked failing, which the gateway no longer pings.
    let stalled_slots = cluster.slots_of(stalled);
    let avoided = async || metric(&scrape(m), "netswap_redis_slots_avoided");
    eventually(
        "the gateway heard every primary",
        Duration::from_secs(10),
        async || avoided().await == 0.0,
    )
    .await;
    cluster.freeze(stalled, true);
    eventually(
        "the gateway heard that the primary does not answer",
        Duration::from_secs(10),
        async || avoided().await > 0.0,
    )
    .await;
    let mut outcomes = Vec::new();
    let mut made = Vec::new();
    let mut slowest = Duration::ZERO;
    for _ in 0..CREATES {
        let sent = Instant::now();
        let create = c.ask(Request::Create {
            access: Access::READ,
            data: Bytes::from_static(b"new"),
        });
        let r = tokio::time::timeout(Duration::from_secs(10), create).await;
        slowest = slowest.max(sent.elapsed());
        match r {
            Ok(Reply::Created(p)) => made.push(p),
            Ok(other) => outcomes.push(format!("{other:?}")),
            Err(_) => {
                outcomes.push("no answer within 10 s".to_string());
                break;
            }
        }
    }
    cluster.freeze(stalled, false);
    assert!(
        outcomes.is_empty(),
        "creates not answered Created: {outcomes:?}"
    );
    assert!(
        slowest < Duration::from_secs(1),
        "a create took {slowest:?} while a primary did not answer"
    );
    // By slot, asked of a node that ran throughout: the one that was stopped may be
    // marked failing a while longer, and `primary_of` then finds no primary.
    let stalled_slots: std::collections::HashSet<u16> = stalled_slots.into_iter().collect();
    let asked = cluster.primaries()[0];
    let on_stalled = |p: Pointer| {
        let key = format!("{prefix}:{{r:{p}}}:m");
        let slot = cluster.cli(asked, &["CLUSTER", "KEYSLOT", &key]);
        stalled_slots.contains(&slot.trim().parse::<u16>().unwrap())
    };
    assert!(!made.iter().any(|&p| on_stalled(p)));
    // Once it answers again, new records go there too.
    eventually(
        "the gateway heard that the primary answers again",
        Duration::from_secs(10),
        async || avoided().await == 0.0,
    )
    .await;
    let after = records(&mut c, CREATES).await;
    assert!(after.iter().any(|&p| on_stalled(p)));
}

/// What a probe's writes of a record on a primary that answered got while another
/// primary was stopped ([`probe_while_stopped`]).
struct Probed {
    /// Each write's outcome: "OK", its status and reason, or none within 10 s.
    outcomes: Vec<String>,
    slowest: Duration,
}

impl Probed {
    /// Every write answered OK, within a second, and no connection of the gateway
    /// serving `/metrics` on `m` replaced.
    fn assert_unaffected(&self, m: SocketAddr) {
        let (outcomes, slowest) = (&self.outcomes, self.slowest);
        assert!(
            outcomes.iter().all(|s| s == "OK"),
            "writes of a record on a primary that answered: {outcomes:?}"
        );
        assert!(
            slowest < Duration::from_secs(1),
            "a write of a record on a primary that answered took {slowest:?} while another primary did not answer"
        );
        assert_eq!(
            metric(&scrape(m), "netswap_redis_connections_replaced_total"),
            0.0
        );
    }
}

/// Stops the primary on `stalled` for 5 s, and meanwhile writes `ptr` (1 byte, its
/// size: no quota to change) through `probe` every 100 ms, then lets it go on.
async fn probe_while_stopped(
    cluster: &RedisCluster,
    stalled: u16,
    probe: &mut Raw,
    ptr: Pointer,
) -> Probed {
    cluster.freeze(stalled, true);
    let frozen = Instant::now();
    let mut outcomes = Vec::new();
    let mut slowest = Duration::ZERO;
    while frozen.elapsed() < Duration::from_secs(5) {
        let sent = Instant::now();
        let write = probe.call(Request::Replace {
            ptr,
            data: Bytes::from_static(b"p"),
        });
        let r = tokio::time::timeout(Duration::from_secs(10), write).await;
        slowest = slowest.max(sent.elapsed());
        outcomes.push(match &r {
            Ok(r) if r.status() == Status::Ok => "OK".to_string(),
            Ok(r) => format!("{:?}: {}", r.status(), r.reason()),
            Err(_) => "no answer within 10 s".to_string(),
        });
        if r.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.freeze(stalled, false);
    Probed { outcomes, slowest }
}

/// A gateway renews the leases of thousands of identities before they run out, and
/// its watches do not wait for it. Renewed one by one, in the task that also hands out
/// the cluster's events, 3,000 identities made a pass outlast its period (a third of
/// the TTL) on this host, and a watch heard of most changes late by up to a pass (the
/// median 0.47 s, against well under a millisecond now). The TTL is 3 s (a period of
/// 1 s): in a slow phase of this host, passes over 3,000 leases took 0.22–0.38 s alone
/// and 0.46–0.62 s beside two busy loops (2026-12-07), so with a 1-s TTL the bound of
/// its period (0.33 s) failed the full suite at random. (Some leases did run out here,
/// renewed in hash-map order: 238–1,539 of 3,000 in 4 of 6 runs alone with a 1-s TTL,
/// 648 in the full suite with 3 s; docs/RELIABILITY.md. Since they are renewed oldest
/// first, `identities_that_connect_during_long_passes_keep_their_leases` looks for it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_identities_hold_up_neither_their_leases_nor_the_watches() {
    const IDENTITIES: usize = 3000;
    let ttl = Duration::from_secs(3);
    let (g, m) = lease_gateway(ttl, None);
    let held = connect_many(g.addr(), 1, IDENTITIES).await;
    let mut c = Raw::connect(g.addr(), 2).await;
    let mut w = Raw::connect(g.addr(), 3).await;
    eventually(
        "every identity has a lease",
        Duration::from_secs(30),
        async || metric(&scrape(m), "netswap_identities") >= (IDENTITIES + 2) as f64,
    )
    .await;
    let p = c.create(Access::READ | Access::WRITE, &b"0"[..]).await;
    w.send(7, &Request::watch(p)).await;
    assert_eq!(w.reply_to(7).await.status(), Status::Ok);
    // Changes spread over several renewal periods.
    let mut late = Vec::new();
    for v in 2..=41 {
        replace_as(&mut c, p, b"x", v).await;
        let acknowledged = Instant::now();
        changed_event(&mut w, 7, p, v).await;
        late.push(acknowledged.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    late.sort();
    let median = late[late.len() / 2];
    // Well under a millisecond alone; the bound leaves room for the tests around it,
    // and is still under half of what the renewals in the events' task cost.
    assert!(
        median < Duration::from_millis(200),
        "a watch heard of changes {median:?} after they were acknowledged (median of {})",
        late.len()
    );
    // The time of the last pass, for the next three passes: a pass made slow once by
    // the tests around it (two cores for all of them) is not what this looks for,
    // passes that all outlast their period are (one by one, they did).
    let mut passes = Vec::new();
    let mut last = -1.0;
    let renewals = || metric(&scrape(m), "netswap_redis_lease_renewals_total");
    let late = || metric(&scrape(m), "netswap_redis_lease_renewals_late_total");
    let (renewed_before, late_before) = (renewals(), late());
    let sampling = Instant::now();
    while passes.len() < 3 && sampling.elapsed() < Duration::from_secs(10) {
        let now = metric(&scrape(m), "netswap_redis_lease_renewal_seconds");
        if now != last {
            passes.push(now);
            last = now;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let fastest = passes.iter().copied().fold(f64::INFINITY, f64::min);
    assert!(
        fastest > 0.0 && fastest < (ttl / 3).as_secs_f64(),
        "passes over {IDENTITIES} leases took {passes:?} s, their period is {:?}",
        ttl / 3
    );
    // The passes renewed leases, and nearly all of them (not that none failed: the
    // test command's run on a fresh machine once had 6 renewals time out among
    // these tests' load, each tried again at the next pass). A renewal not done
    // within a quarter of the period goes on in the background, counted when done,
    // and the next pass leaves its identity alone meanwhile: counted here as it
    // goes (a run of the suite counted 5,893 renewals over the passes, none failed).
    let failed = metric(&scrape(m), "netswap_redis_lease_renewals_failed_total");
    let (renewed, late) = (renewals() - renewed_before, late() - late_before);
    assert!(
        renewed + late >= (2 * IDENTITIES) as f64 && failed <= renewed / 100.0,
        "{renewed} leases renewed and {late} late in {} passes, {failed} renewals failed in all",
        passes.len()
    );
    drop(held);
}

/// Passes of renewals renew the oldest leases first, so a lease runs out only when a
/// pass takes longer than the TTL, not half of it. In the order of the gateway's hash
/// map of identities, the same from pass to pass only while nobody comes or goes, an
/// identity that connected during one pass, or every identity when the map grew, could
/// be renewed last in the next one: a pass that met a storm of 3,000 connections took
/// a second, and up to half of those leases ran out with a 1-s TTL while their clients
/// stayed connected (docs/RELIABILITY.md). Here every renewal is sent 100 ms late
/// (`NETSWAP_FAULT_AT=renewals-slow`), 64 at a time, so that passes take ~1.8 s of the
/// 3-s TTL, while 256 identities connect one by one over several passes: in hash-map
/// order leases ran out (checked by hand: in each of 3 runs), oldest first none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identities_that_connect_during_long_passes_keep_their_leases() {
    const FIRST: usize = 64 * 13;
    const LATER: usize = 64 * 4;
    const IDENTITIES: usize = FIRST + LATER;
    let g = GatewayProcess::with_fault(&fresh_prefix(), &["--lease-ttl", "3"], "renewals-slow");
    let mut held = connect_many(g.addr, 7, FIRST).await;
    let pass = || g.metric("netswap_redis_lease_renewal_seconds");
    let first = pass();
    eventually(
        "every identity has a lease, and a pass over them all ended",
        Duration::from_secs(30),
        async || g.metric("netswap_identities") >= FIRST as f64 && pass() != first,
    )
    .await;
    // A connection every 15 ms: about two passes' time.
    for n in FIRST..IDENTITIES {
        held.push(Raw::connect_from(g.addr, many(7, n)).await);
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    // Three whole passes once all are connected: from the end of the one under way
    // (it may have started before the last connected).
    let mut last = pass();
    let mut passes = Vec::new();
    let mut renewed = 0.0;
    let sampling = Instant::now();
    while passes.len() < 4 && sampling.elapsed() < Duration::from_secs(20) {
        let now = pass();
        if now != last {
            if passes.is_empty() {
                renewed = g.metric("netswap_redis_lease_renewals_total");
            }
            passes.push(now);
            last = now;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let renewed = g.metric("netswap_redis_lease_renewals_total") - renewed;
    let whole = passes.get(1..).unwrap_or_default();
    assert!(
        whole.len() == 3 && whole.iter().all(|&p| p > 1.5),
        "three passes, each longer than half the TTL (where hash-map order let leases run out): {passes:?} s"
    );
    // A renewal that times out (2 s; 6 did once in another test of the test
    // command's run on a fresh machine, among the other tests' load) leaves its lease
    // unrenewed for that pass, which can run out whatever the order: nothing to judge.
    let failed = g.metric("netswap_redis_lease_renewals_failed_total");
    if failed > 0.0 {
        eprintln!("{failed} renewals failed (timed out under load): lapses not judged");
        return;
    }
    assert!(
        renewed >= (3 * IDENTITIES) as f64,
        "{renewed} leases renewed in three passes over {IDENTITIES}"
    );
    assert_eq!(
        g.metric("netswap_redis_leases_lapsed_total"),
        0.0,
        "no lease ran out (passes took {passes:?} s, the TTL is 3 s)"
    );
    drop(held);
}

/// Subscriptions that outlast their records' last watch by 1 s (30 s by default),
/// and `/metrics`.
fn sweep_settings(c: &mut ServerConfig) {
    c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    c.cluster.as_mut().unwrap().unsubscribe_after = Duration::from_secs(1);
}

/// An in-process gateway on the shared cluster with `sweep_settings`, and where
/// `/metrics` is served.
fn sweeping_gateway() -> (RunningServer, SocketAddr) {
    let g = gateway(&fresh_prefix(), sweep_settings);
    let m = g.metrics_addr().expect("serves /metrics");
    (g, m)
}

/// `n` connections to `addr`, each from its own loopback address (`many(block, i)`):
/// `n` identities.
async fn connect_many(addr: SocketAddr, block: u8, n: usize) -> Vec<Raw> {
    let mut held = Vec::with_capacity(n);
    for i in 0..n {
        held.push(Raw::connect_from(addr, many(block, i)).await);
    }
    held
}

/// `n` records of `c`'s, readable and writable by all.
async fn records(c: &mut Raw, n: usize) -> Vec<Pointer> {
    let create = Request::Create {
        access: Access::READ | Access::WRITE,
        data: Bytes::from_static(b"0"),
    };
    pipelined(c, vec![create; n])
        .await
        .into_iter()
        .map(|r| match r {
            Reply::Created(p) => p,
            other => panic!("CREATE: {other:?}"),
        })
        .collect()
}

/// WATCHes of `ptrs` on `w`, all answered OK: their XIDs, in order.
async fn watch_all(w: &mut Raw, ptrs: &[Pointer]) -> Vec<u32> {
    let mut sent = Vec::new();
    for &p in ptrs {
        let xid = w.xid();
        w.send(xid, &Request::watch(p)).await;
        sent.push(xid);
    }
    for &xid in &sent {
        let m = w.reply_to(xid).await;
        assert_eq!(m.status(), Status::Ok, "WATCH: {}", m.reason());
    }
    sent
}

/// A gateway unsubscribes from the events of records nobody watched for a while
/// (`unsubscribe_after`), and subscribes again when one is watched again. The sweep
/// that does it had no test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_nobody_uses_are_dropped_and_made_again_when_needed() {
    let cluster = common::cluster::shared();
    let (g, m) = sweeping_gateway();
    let mut c = Raw::connect(g.addr(), 2).await;
    let ptrs = records(&mut c, 20).await;
    let mut w = Raw::connect(g.addr(), 3).await;
    watch_all(&mut w, &ptrs).await;
    assert_eq!(metric(&scrape(m), "netswap_redis_subscribed_records"), 20.0);
    let unsubscribed = cluster.calls("sunsubscribe");
    drop(w);
    eventually(
        "the subscriptions are dropped a second after the watches ended",
        Duration::from_secs(10),
        async || metric(&scrape(m), "netswap_redis_subscribed_records") == 0.0,
    )
    .await;
    let sent = cluster.calls("sunsubscribe") - unsubscribed;
    assert!(
        sent >= 20,
        "{sent} SUNSUBSCRIBEs: one per record, both its channels (other tests on the shared cluster count too)"
    );
    // Watched again: subscribed again, and the events come.
    let mut w = Raw::connect(g.addr(), 3).await;
    let xids = watch_all(&mut w, &ptrs[..5]).await;
    assert_eq!(metric(&scrape(m), "netswap_redis_subscribed_records"), 5.0);
    for (&xid, &p) in xids.iter().zip(&ptrs) {
        replace_as(&mut c, p, b"again", 2).await;
        changed_event(&mut w, xid, p, 2).await;
    }
}

/// A WATCH answered BUSY because Redis failed after its subscription leaves that
/// subscription to the sweep, as a refused one does. Only refused WATCHes did: the
/// subscription of one answered BUSY stayed, unused, until the gateway stopped (here
/// `NETSWAP_FAULT_AT=watch-mark-fails`: the first mark of a record watched fails).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_answered_busy_leaves_no_subscription_behind() {
    let g = GatewayProcess::with_fault(
        &fresh_prefix(),
        &["--redis-unsubscribe-after", "1"],
        "watch-mark-fails",
    );
    let mut c = Raw::connect(g.addr, 2).await;
    let p = c.create(Access::READ | Access::WRITE, &b"0"[..]).await;
    let mut w = Raw::connect(g.addr, 3).await;
    let busy = w.call(Request::watch(p)).await;
    assert_eq!(busy.status(), Status::Busy, "{}", busy.reason());
    eventually(
        "the subscription is dropped a second after the WATCH failed",
        Duration::from_secs(10),
        async || g.metric("netswap_redis_subscribed_records") == 0.0,
    )
    .await;
    // Watched again (as a client does after BUSY): subscribed again, and the events come.
    w.send(7, &Request::watch(p)).await;
    assert_eq!(w.reply_to(7).await.status(), Status::Ok);
    assert_eq!(g.metric("netswap_redis_subscribed_records"), 1.0);
    replace_as(&mut c, p, b"heard", 2).await;
    changed_event(&mut w, 7, p, 2).await;
}

/// A sweep's `SUNSUBSCRIBE` that fails is sent again by the next sweep, and not for a
/// record watched again in between. The sweep forgot the record either way, and Redis
/// kept the subscription until the gateway's connection for subscriptions was
/// replaced: publishing every change of the record to a gateway that ignored it (here
/// `NETSWAP_FAULT_AT=unsubscribes-fail`: the first sweep's fail unsent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_unsubscribe_is_sent_again_by_the_next_sweep() {
    let cluster = common::cluster::shared();
    let prefix = fresh_prefix();
    let g = GatewayProcess::with_fault(
        &prefix,
        &["--redis-unsubscribe-after", "1"],
        "unsubscribes-fail",
    );
    let mut c = Raw::connect(g.addr, 2).await;
    let (left, again) = (
        c.create(Access::READ | Access::WRITE, &b"0"[..]).await,
        c.create(Access::READ | Access::WRITE, &b"0"[..]).await,
    );
    let channel = |p: Pointer| format!("{prefix}:{{r:{p}}}:e");
    let subscribers = |p: Pointer| {
        cluster.shard_subscribers_on(
            cluster.primary_of(&format!("{prefix}:{{r:{p}}}:m")),
            &channel(p),
        )
    };
    let mut w = Raw::connect(g.addr, 3).await;
    watch_all(&mut w, &[left, again]).await;
    assert_eq!((subscribers(left), subscribers(again)), (1, 1));
    drop(w);
    // Looked for often: the next sweep comes a third of a second after.
    let swept = Instant::now();
    while g.metric("netswap_redis_subscribed_records") != 0.0 {
        assert!(swept.elapsed() < Duration::from_secs(10), "no sweep");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(g.metric("netswap_redis_unsubscribes_owed") >= 1.0);
    // One is watched again before the next sweep can send its `SUNSUBSCRIBE` again,
    // or while it does (the watch waits for it).
    let mut w = Raw::connect(g.addr, 3).await;
    w.send(7, &Request::watch(again)).await;
    assert_eq!(w.reply_to(7).await.status(), Status::Ok);
    eventually(
        "the other record's subscription is dropped in Redis",
        Duration::from_secs(10),
        async || subscribers(left) == 0,
    )
    .await;
    eventually(
        "no SUNSUBSCRIBE is owed",
        Duration::from_secs(2),
        async || g.metric("netswap_redis_unsubscribes_owed") == 0.0,
    )
    .await;
    assert_eq!(g.metric("netswap_redis_subscribed_records"), 1.0);
    assert_eq!(
        subscribers(again),
        1,
        "the record watched again keeps its subscription"
    );
    replace_as(&mut c, again, b"heard", 2).await;
    changed_event(&mut w, 7, again, 2).await;
}

/// Records watched again while the sweep unsubscribes from them keep their
/// subscriptions, made once. The sweep used to forget the records first and
/// unsubscribe after, one by one: a record watched again in between was subscribed to
/// anew, then unsubscribed by the sweep, and subscribed a third time when Redis's
/// confirmation of that `SUNSUBSCRIBE` showed it watched, with a resync to report what
/// its watchers missed in between (as after a lost connection): 1,899 and 1,935
/// `SSUBSCRIBE`s for these 1,000 watches in two runs. Now a record stays until its
/// `SUNSUBSCRIBE` is answered, and a watch of it waits for that before it subscribes
/// (1,005 in two runs on the shared cluster, where other tests' count too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_watched_again_while_the_sweep_unsubscribes_are_subscribed_once() {
    const RECORDS: usize = 1000;
    let cluster = RedisCluster::start(3, 0, false);
    let (g, _) = gateway_on(&cluster, sweep_settings);
    let m = g.metrics_addr().expect("serves /metrics");
    let mut c = Raw::connect(g.addr(), 2).await;
    let ptrs = records(&mut c, RECORDS).await;
    let mut w = Raw::connect(g.addr(), 3).await;
    watch_all(&mut w, &ptrs).await;
    let subscribed = || metric(&scrape(m), "netswap_redis_subscribed_records");
    assert_eq!(subscribed(), RECORDS as f64);
    drop(w);
    // The sweep has begun (a second after the watches ended).
    let ended = Instant::now();
    while subscribed() == RECORDS as f64 {
        assert!(ended.elapsed() < Duration::from_secs(10), "no sweep");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let before = cluster.calls("ssubscribe");
    let mut w = Raw::connect(g.addr(), 3).await;
    let xids = watch_all(&mut w, &ptrs).await;
    let writes = ptrs
        .iter()
        .map(|&ptr| Request::Replace {
            ptr,
            data: Bytes::from_static(b"after the sweep"),
        })
        .collect();
    for r in pipelined(&mut c, writes).await {
        assert_eq!(r, Reply::Written(2));
    }
    for (&xid, &p) in xids.iter().zip(&ptrs) {
        changed_event(&mut w, xid, p, 2).await;
    }
    // Past two looks at the subscriptions on the primaries (a second apart).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let now = scrape(m);
    assert_eq!(
        (
            metric(&now, "netswap_redis_subscriptions_missing_total"),
            metric(&now, "netswap_redis_subscribed_records"),
        ),
        (0.0, RECORDS as f64),
        "no subscription went missing"
    );
    let made = cluster.calls("ssubscribe") - before;
    assert!(
        made < (RECORDS + RECORDS / 20) as u64,
        "{made} SSUBSCRIBEs for {RECORDS} watches"
    );
}

/// Identities that leave while their gateway renews its leases lose their records
/// when their grace ends, like any others. A renewal sent before an identity's last
/// connection closed could reach Redis after the release (a lease nobody renewed,
/// which, with a grace no longer than the TTL, let the reaper take the identity off
/// its schedule as connected, for good), and a pass's move of the identities it renewed
/// on the reaper's schedule could come after a release and postpone the reaping by a
/// TTL (2,265 of 5,000 identities in a run by hand).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identities_that_leave_during_a_pass_of_renewals_are_reaped_when_their_grace_ends() {
    const IDENTITIES: usize = 1500;
    let ttl = Duration::from_secs(12);
    let (g, m) = lease_gateway(ttl, Some(Duration::from_secs(1)));
    let mut owners = Vec::with_capacity(IDENTITIES);
    let mut records = Vec::with_capacity(IDENTITIES);
    for n in 0..IDENTITIES {
        let mut c = Raw::connect_from(g.addr(), many(2, n)).await;
        records.push(c.create(Access::READ, &b"an orphan soon"[..]).await);
        owners.push(c);
    }
    // They all leave in the middle of a pass. A pass starts every third of the TTL;
    // one has ended when the time it took changes on /metrics.
    let pass = || metric(&scrape(m), "netswap_redis_lease_renewal_seconds");
    let before = pass();
    let took = loop {
        tokio::time::sleep(Duration::from_millis(2)).await;
        let now = pass();
        if now != before {
            break Duration::from_secs_f64(now);
        }
    };
    let next = Instant::now() - took + ttl / 3 + took / 2;
    tokio::time::sleep_until(next.into()).await;
    drop(owners);
    let all_left = Instant::now();
    let mut observer = Raw::connect(g.addr(), 9).await;
    let mut left = records.clone();
    while !left.is_empty() {
        // The grace (1 s), rounds of reaping and slack, well short of the TTL.
        assert!(
            all_left.elapsed() < Duration::from_secs(8),
            "{} of {IDENTITIES} orphans not reaped 8 s after their owners left (grace 1 s, TTL {ttl:?})",
            left.len()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
        let reads = left
            .iter()
            .map(|&ptr| Request::Read { ptr, range: None })
            .collect();
        let replies = pipelined(&mut observer, reads).await;
        left = left
            .into_iter()
            .zip(replies)
            .filter(|(_, r)| {
                !matches!(
                    r,
                    Reply::Error {
                        status: Status::AddressFault,
                        ..
                    }
                )
            })
            .map(|(p, _)| p)
            .collect();
    }
}

/// Identities that leave with nothing stored leave nothing in Redis once their grace
/// has passed. Every identity ever seen kept its quota hash (generation, offline
/// since) for good, so identities made up by the thousand grew the cluster without
/// bound. One still connected, with a record, keeps its keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identities_that_leave_with_nothing_leave_nothing_in_redis() {
    const IDENTITIES: usize = 300;
    let cluster = common::cluster::shared();
    let prefix = fresh_prefix();
    let g = gateway(&prefix, |c| {
        lease_settings(c, Duration::from_secs(1), Some(Duration::from_secs(1)))
    });
    // The identities with keys in Redis (each key carries its identity's tag).
    let identities = || -> std::collections::HashSet<String> {
        cluster
            .primaries()
            .into_iter()
            .flat_map(|port| {
                cluster
                    .cli(port, &["KEYS", &format!("{prefix}:{{i:*")])
                    .lines()
                    .filter_map(|k| Some(k.split_once('{')?.1.split_once('}')?.0.to_string()))
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let mut keeper = Raw::connect(g.addr(), 2).await;
    let kept = keeper.create(Access::READ, &b"kept"[..]).await;
    let leaving = connect_many(g.addr(), 3, IDENTITIES).await;
    eventually(
        "every identity has its keys",
        Duration::from_secs(10),
        async || identities().len() == IDENTITIES + 1,
    )
    .await;
    drop(leaving);
    eventually(
        "only the identity still connected has keys",
        Duration::from_secs(20),
        async || identities().len() == 1,
    )
    .await;
    assert_eq!(keeper.read(kept).await, data(b"kept"));
    // And when it comes back, an identity that was forgotten starts afresh.
    let mut back = Raw::connect_from(g.addr(), many(3, 0)).await;
    let p = back.create(Access::READ, &b"back"[..]).await;
    assert_eq!(back.read(p).await, data(b"back"));
    assert_eq!(identities().len(), 2);
}

/// A record handed to an absent identity gets its own deadline, valid while the
/// identity's generation is the one stored with it: reaped when that passes if the
/// identity stays away, kept once it connects. Also when the identity was forgotten
/// (nothing of it left in Redis) before the record came.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_handed_to_an_absent_identity_keep_their_own_deadline() {
    let (g, _) = lease_gateway(Duration::from_secs(1), Some(Duration::from_secs(1)));
    let b_from = many(4, 0);
    let b_id = {
        let mut b = Raw::connect_from(g.addr(), b_from).await;
        match b.ask(Request::Hello).await {
            Reply::Hello(h) => h.identity,
            other => panic!("HELLO: {other:?}"),
        }
    };
    // B has left; after its grace the reaper forgets it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut a = Raw::connect_from(g.addr(), many(4, 1)).await;
    let hand = async |a: &mut Raw, what: &'static [u8]| {
        let p = a.create(Access::READ, what).await;
        let to = NewOwner::Identity(b_id);
        assert_eq!(a.ask(Request::Transfer { ptr: p, to }).await, Reply::Done);
        p
    };
    let stays = hand(&mut a, b"B never comes").await;
    assert_eq!(a.read(stays).await, data(b"B never comes"));
    eventually(
        "reaped at its own deadline",
        Duration::from_secs(15),
        async || a.read(stays).await.status() == Status::AddressFault,
    )
    .await;
    let kept = hand(&mut a, b"B comes back").await;
    let _b = Raw::connect_from(g.addr(), b_from).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        a.read(kept).await,
        data(b"B comes back"),
        "its owner connected: it follows its owner's lifetime"
    );
}

/// A gateway paused for longer than the lease TTL (SIGSTOP here; a VM frozen, a long
/// GC-like stall) lets its leases run out: for the other gateways its identities are
/// offline, and a record handed to one of them then is parked, charged to its sender.
/// When the gateway wakes, its next renewal finds the lease run out and counts as a
/// new lease (generation raised, parked records claimed). It used to renew as if
/// nothing had happened: the sender paid for the record for as long as the receiver
/// stayed connected, and with a quota of one record could create nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_paused_past_its_leases_claims_what_was_handed_to_its_clients_meanwhile() {
    let prefix = fresh_prefix();
    let paused = GatewayProcess::start(
        &common::cluster::shared().nodes(),
        &prefix,
        &["--quota-records", "1", "--orphan-grace", "60"],
        &[],
    );
    let other = gateway(&prefix, |c| {
        c.store.quota_records = 1;
        lease_settings(c, Duration::from_secs(2), Some(Duration::from_secs(60)));
    });
    let mut receiver = Raw::connect(paused.addr, 2).await;
    let to = match receiver.ask(Request::Hello).await {
        Reply::Hello(h) => NewOwner::Identity(h.identity),
        other => panic!("HELLO: {other:?}"),
    };
    let pid = paused.child.id() as i32;
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    // Past the TTL (2 s) from its last renewal.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut sender = Raw::connect(other.addr(), 3).await;
    let p = sender.create(Access::READ, &b"handed over"[..]).await;
    assert_eq!(
        sender.ask(Request::Transfer { ptr: p, to }).await,
        Reply::Done
    );
    let create = Request::Create {
        access: Access::empty(),
        data: Bytes::new(),
    };
    assert_eq!(
        sender.call(create.clone()).await.status(),
        Status::QuotaExceeded,
        "the receiver is offline for this gateway: the record is parked, charged to its sender"
    );
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    created_once(
        "the woken gateway's renewal claims the parked record for its connected client",
        Duration::from_secs(6),
        &mut sender,
        &create,
    )
    .await;
    assert_eq!(receiver.read(p).await, data(b"handed over"));
    assert!(
        paused.metric("netswap_redis_leases_lapsed_total") >= 1.0,
        "the lapse is counted"
    );
    // The receiver pays for it now: its own create is refused (a quota of one).
    assert_eq!(receiver.call(create).await.status(), Status::QuotaExceeded);
}

/// Writers of one record through one gateway and through another all get their
/// writes in, and an orphan that others keep writing is still reaped. Every change is
/// a compare-and-set: a write that lost a race loads the record and decides again,
/// and the writer that won last (one round trip, on the state it remembers) kept
/// winning, so four connections writing one record got BUSY ("kept changing") within
/// a second. And the reaper, after `MAX_ATTEMPTS` lost races in one look, took the
/// identity off its schedule for good: the orphan outlived its grace for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_of_one_record_all_get_in_and_its_orphan_is_still_reaped() {
    let prefix = fresh_prefix();
    let settings = |c: &mut ServerConfig| {
        c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
        lease_settings(c, Duration::from_secs(1), Some(Duration::from_secs(1)))
    };
    let gateways = [gateway(&prefix, settings), gateway(&prefix, settings)];
    let hot = {
        let mut owner = Raw::connect_from(gateways[0].addr(), many(5, 0)).await;
        owner
            .create(Access::READ | Access::WRITE, &b"hot"[..])
            .await
    };
    // The owner has left: its grace ends in a second, while writers on both gateways
    // keep at it.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..6 {
        let (addr, stop) = (gateways[w % 2].addr(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut c = Raw::connect_from(addr, many(5, 1 + w)).await;
            let (mut written, mut gone) = (0, false);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && !gone {
                let burst = (0..16)
                    .map(|i| Request::Replace {
                        ptr: hot,
                        data: Bytes::from(format!("writer {w}, write {i}")),
                    })
                    .collect();
                for r in pipelined(&mut c, burst).await {
                    match r {
                        Reply::Written(_) => written += 1,
                        r if r.status() == Status::AddressFault => gone = true,
                        other => panic!("REPLACE by writer {w}: {other:?}"),
                    }
                }
            }
            written
        }));
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        assert!(w.await.unwrap() > 0, "every writer got writes in");
    }
    // Both gateways queued their writers' changes, and lost races to each other.
    let mut lost = 0.0;
    for g in &gateways {
        let m = scrape(g.metrics_addr().unwrap());
        assert!(metric(&m, "netswap_redis_queued_changes_total") > 0.0);
        lost += metric(&m, "netswap_redis_commit_races_lost_total");
    }
    assert!(lost > 0.0, "writes through two gateways raced");
    let mut observer = Raw::connect_from(gateways[1].addr(), many(5, 9)).await;
    eventually(
        "the orphan is reaped once it is left alone, if not before",
        Duration::from_secs(8),
        async || observer.read(hot).await.status() == Status::AddressFault,
    )
    .await;
}

/// Writes of one record that queue together on a gateway are committed together
/// (`group.rs`), and nothing a client sees tells them from writes one at a time:
/// every REPLACE and WRITE_AT gets its own version, the versions are 2, 3, … with
/// none twice, a watcher hears every one in order, a data watcher gets each write's
/// bytes with its version, and the record ends with the writes applied in the order
/// of their versions. REPLACE_IFs on one
/// version racing each other: exactly one wins each round, the rest are CONFLICT with
/// the version it made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_of_one_record_that_queue_together_commit_together() {
    const WRITERS: usize = 8;
    const WRITES: usize = 40;
    const ROUNDS: u64 = 20;
    let prefix = fresh_prefix();
    let gw = gateway(&prefix, |c| {
        c.metrics_listen = Some("127.0.0.1:0".parse().unwrap())
    });
    let mut owner = Raw::connect_from(gw.addr(), many(6, 0)).await;
    let hot = owner
        .create(Access::READ | Access::WRITE, vec![b'-'; 16])
        .await;
    let mut w = Raw::connect_from(gw.addr(), many(6, 100)).await;
    watch_ok(&mut w, 7, hot, false).await;
    let mut d = Raw::connect_from(gw.addr(), many(6, 101)).await;
    watch_ok(&mut d, 9, hot, true).await;

    let start = Arc::new(Barrier::new(WRITERS));
    let mut writers = Vec::new();
    for i in 0..WRITERS {
        let (addr, start) = (gw.addr(), start.clone());
        writers.push(tokio::spawn(async move {
            let mut c = Raw::connect_from(addr, many(6, 1 + i)).await;
            start.wait().await;
            // Half REPLACE the whole record, half WRITE_AT their own 4 bytes of it.
            let mut got = Vec::new();
            for n in 0..WRITES {
                let (request, write) = if i < WRITERS / 2 {
                    let data = Bytes::from(format!("writer {i:02} #{n:04}."));
                    let request = Request::Replace {
                        ptr: hot,
                        data: data.clone(),
                    };
                    (request, (None, data))
                } else {
                    let offset = 4 * (i - WRITERS / 2) as u64;
                    let data = Bytes::from(format!("{i}{n:03}"));
                    let request = Request::WriteAt {
                        ptr: hot,
                        offset,
                        data: data.clone(),
                    };
                    (request, (Some(offset), data))
                };
                match c.ask(request).await {
                    Reply::Written(v) => got.push((v, write)),
                    other => panic!("write {n} of writer {i}: {other:?}"),
                }
            }
            got
        }));
    }
    let mut writes = std::collections::BTreeMap::new();
    for wr in writers {
        for (v, write) in wr.await.unwrap() {
            assert!(writes.insert(v, write).is_none(), "version {v} given twice");
        }
    }
    let last = 1 + (WRITERS * WRITES) as u64;
    assert_eq!(
        writes.keys().copied().collect::<Vec<_>>(),
        (2..=last).collect::<Vec<_>>(),
        "one version per write, none skipped"
    );
    // The record's bytes at each version: the writes applied in version order.
    let mut written = std::collections::BTreeMap::new();
    let mut state = vec![b'-'; 16];
    for (&v, (offset, data)) in &writes {
        match offset {
            None => state = data.to_vec(),
            Some(off) => state[*off as usize..*off as usize + data.len()].copy_from_slice(data),
        }
        written.insert(v, state.clone());
    }
    for v in 2..=last {
        changed_event(&mut w, 7, hot, v).await;
    }
    let mut bytes = vec![b'-'; 16];
    for v in 2..=last {
        let n = d.reply_to(9).await;
        match Reply::parse(None, n.status, n.arg, n.payload).unwrap() {
            Reply::Notify {
                event: Event::Changed,
                version,
                delta: Some(delta),
                ..
            } => {
                assert_eq!((version, delta.base), (v, v - 1), "events in order");
                bytes.resize(delta.size as usize, 0);
                for (off, b) in delta.ranges {
                    bytes[off as usize..off as usize + b.len()].copy_from_slice(&b);
                }
                assert_eq!(bytes, written[&v], "the bytes of version {v}");
            }
            other => panic!("data watch: {other:?}"),
        }
    }
    same_bytes(owner.read(hot).await, &written[&last], "the record");
    let grouped = || {
        metric(
            &scrape(gw.metrics_addr().unwrap()),
            "netswap_redis_grouped_writes_total",
        )
    };
    let before = grouped();
    assert!(before > 0.0, "writes that queued together were grouped");

    // WRITE_ATs only, each writer to its own 2 bytes: the record ends with every
    // writer's last bytes (made by the group's script from the record's bytes).
    let mut writers = Vec::new();
    for i in 0..WRITERS {
        let addr = gw.addr();
        writers.push(tokio::spawn(async move {
            let mut c = Raw::connect_from(addr, many(6, 1 + i)).await;
            for n in 0..WRITES {
                let write = Request::WriteAt {
                    ptr: hot,
                    offset: 2 * i as u64,
                    data: Bytes::from(format!("{:02}", n % 100)),
                };
                assert!(matches!(c.ask(write).await, Reply::Written(_)));
            }
        }));
    }
    for wr in writers {
        wr.await.unwrap();
    }
    let each_last = format!("{:02}", (WRITES - 1) % 100).repeat(WRITERS);
    same_bytes(
        owner.read(hot).await,
        each_last.as_bytes(),
        "every writer's last",
    );
    assert!(grouped() > before, "WRITE_ATs were grouped");

    // REPLACE_IF races: one winner per round, whoever it is.
    let mut racers = Vec::new();
    for i in 0..WRITERS {
        racers.push(Raw::connect_from(gw.addr(), many(6, 1 + i)).await);
    }
    for round in 0..ROUNDS {
        let expected = last + (WRITERS * WRITES) as u64 + round;
        let sent: Vec<u32> = {
            let mut sent = Vec::new();
            for r in racers.iter_mut() {
                let xid = r.xid();
                let req = Request::ReplaceIf {
                    ptr: hot,
                    expected,
                    data: Bytes::from(format!("round {round:04}, won.")),
                };
                r.send(xid, &req).await;
                sent.push(xid);
            }
            sent
        };
        let mut won = 0;
        for (r, xid) in racers.iter_mut().zip(sent) {
            let m = r.reply_to(xid).await;
            match Reply::parse(Some(Opcode::ReplaceIf), m.status, m.arg, m.payload).unwrap() {
                Reply::Written(v) => {
                    assert_eq!(v, expected + 1);
                    won += 1;
                }
                Reply::Conflict(v) => assert_eq!(v, expected + 1, "round {round}"),
                other => panic!("REPLACE_IF in round {round}: {other:?}"),
            }
        }
        assert_eq!(won, 1, "round {round}: exactly one REPLACE_IF wins");
    }
    same_bytes(
        owner.read(hot).await,
        format!("round {:04}, won.", ROUNDS - 1).as_bytes(),
        "the last round's winner",
    );
}

/// Room given back through one gateway (a delete) can be used through another that
/// last saw the identity's quota full: a refusal is decided on the quota as it is in
/// Redis, not on what the gateway remembered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_freed_through_one_gateway_is_free_on_another() {
    let prefix = fresh_prefix();
    let a = gateway(&prefix, |c| c.store.quota_records = 1);
    let b = gateway(&prefix, |c| c.store.quota_records = 1);
    let mut on_a = Raw::connect(a.addr(), 2).await;
    let mut on_b = Raw::connect(b.addr(), 2).await;
    let create = || Request::Create {
        access: Access::empty(),
        data: Bytes::new(),
    };
    let p = on_a.create(Access::empty(), Bytes::new()).await;
    assert_eq!(on_a.call(create()).await.status(), Status::QuotaExceeded);
    assert_eq!(on_b.ask(Request::Delete { ptr: p }).await, Reply::Done);
    eventually(
        "the room given back through b is free on a",
        Duration::from_secs(5),
        async || on_a.call(create()).await.status() == Status::Ok,
    )
    .await;
    assert_eq!(on_b.call(create()).await.status(), Status::QuotaExceeded);
}

/// Sends `request` to a gateway process (of `prefix`, started with `args`) that aborts
/// at crash point `point` while it is handled, and checks that it died there.
async fn die_at(
    cluster: &RedisCluster,
    prefix: &str,
    args: &[&str],
    point: &str,
    request: &Request,
) {
    let mut crashing = GatewayProcess::start(
        &cluster.nodes(),
        prefix,
        args,
        &[("NETSWAP_CRASH_AT", point)],
    );
    let mut doomed = Raw::connect(crashing.addr, 2).await;
    doomed.send(1, request).await;
    assert!(
        doomed.until_closed().await.is_empty(),
        "it died mid-request"
    );
    assert!(
        crashing
            .wait_exit(Duration::from_secs(5))
            .is_some_and(|s| !s.success()),
        "the gateway aborted at {point}"
    );
}

/// Creates an empty record, trying again while the quota is exceeded, until a
/// repair pass frees room (20 s after `started` at most).
async fn create_once_repaired(c: &mut Raw, started: Instant) {
    let create = Request::Create {
        access: Access::empty(),
        data: Bytes::new(),
    };
    let limit = Duration::from_secs(20).saturating_sub(started.elapsed());
    created_once("repaired", limit, c, &create).await;
}

/// Sends `create` until it is not refused QUOTA_EXCEEDED, within `limit` (`what`
/// made room); then it must have been answered OK.
async fn created_once(what: &str, limit: Duration, c: &mut Raw, create: &Request) {
    eventually(what, limit, async || {
        match c.call(create.clone()).await.status() {
            Status::Ok => true,
            Status::QuotaExceeded => false,
            s => panic!("CREATE: {s:?}"),
        }
    })
    .await;
}

/// A gateway that dies after a delete's commit and before settling its quota: the
/// delete's marker (kept in the deleted record's tombstone) tells the repair pass it
/// happened, and the owner gets the record's charge back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_killed_between_a_delete_and_its_quota_release_is_repaired() {
    let cluster = common::cluster::shared();
    let prefix = fresh_prefix();
    let gw = gateway(&prefix, |c| c.store.quota_records = 1);
    let mut c = Raw::connect(gw.addr(), 2).await;
    let p = c.create(Access::empty(), Bytes::new()).await;
    die_at(
        cluster,
        &prefix,
        &["--quota-records", "1"],
        "delete-after-commit",
        &Request::Delete { ptr: p },
    )
    .await;
    assert_eq!(
        c.read(p).await.status(),
        Status::AddressFault,
        "the delete was committed"
    );
    // The quota is released once the repair pass sees the delete's marker (after
    // its fence); without it, the one record of quota would stay used for ever.
    create_once_repaired(&mut c, Instant::now()).await;
    // Exactly one record's room came back.
    let again = Request::Create {
        access: Access::empty(),
        data: Bytes::new(),
    };
    assert_eq!(c.call(again).await.status(), Status::QuotaExceeded);
}

/// A gateway that dies after a size-changing write's commit, before settling its
/// quota, and the record deleted through another gateway before the repair: the
/// delete's tombstone keeps the earlier write's marker, so the repair keeps that
/// write's charge and the identity's bytes add up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_keeps_the_markers_of_changes_not_settled_yet() {
    let cluster = common::cluster::shared();
    let prefix = fresh_prefix();
    let gw = gateway(&prefix, |c| c.store.quota_bytes = 300);
    let mut c = Raw::connect(gw.addr(), 2).await;
    c.create(Access::empty(), vec![0u8; 200]).await;
    let p = c.create(Access::READ | Access::WRITE, vec![1u8; 10]).await;
    let grow = Request::Replace {
        ptr: p,
        data: Bytes::from(vec![2u8; 100]),
    };
    die_at(
        cluster,
        &prefix,
        &["--quota-bytes", "300"],
        "resize-after-commit",
        &grow,
    )
    .await;
    assert_eq!(
        c.read(p).await,
        data(&[2u8; 100]),
        "the write was committed"
    );
    // 300 bytes used, the write's +90 still pending; the delete gives back 100.
    assert_eq!(c.ask(Request::Delete { ptr: p }).await, Reply::Done);
    // Past the write's fence the next reservation repairs its entry: committed, by
    // its marker in the tombstone, so its charge stays and 200 bytes are used (a
    // lost marker would undo it: 110).
    tokio::time::sleep(Duration::from_secs(12)).await;
    let create = |n: usize| Request::Create {
        access: Access::empty(),
        data: Bytes::from(vec![3u8; n]),
    };
    assert_eq!(c.call(create(101)).await.status(), Status::QuotaExceeded);
    assert_eq!(c.call(create(100)).await.status(), Status::Ok);
}

/// A create whose commit applied but whose reply was lost (`NETSWAP_FAULT_AT`; a
/// failover longer than the gateway's re-sends does it) is answered BUSY, and the
/// record it made, whose pointer nobody was told, is deleted: its owner does not pay
/// for it while connected. It used to stay until its owner left: with a quota of one
/// record, every later create was refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_whose_reply_was_lost_leaves_no_record() {
    let gw = GatewayProcess::with_fault(
        &fresh_prefix(),
        &["--quota-records", "1"],
        "create-reply-lost",
    );
    let mut c = Raw::connect(gw.addr, 2).await;
    let create = Request::Create {
        access: Access::READ,
        data: Bytes::from_static(b"mine"),
    };
    assert_eq!(c.call(create.clone()).await.status(), Status::Busy);
    // Refused while the lost record's charge and its reservation stand; the
    // reservation is settled past its fence (10 s).
    created_once(
        "the lost create's record is gone and its charge given back",
        Duration::from_secs(20),
        &mut c,
        &create,
    )
    .await;
    assert_eq!(
        c.call(create).await.status(),
        Status::QuotaExceeded,
        "one record: the one just made"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_killed_between_quota_reservation_and_commit_is_repaired() {
    let cluster = common::cluster::shared();
    let prefix = fresh_prefix();
    let create = Request::Create {
        access: Access::empty(),
        data: Bytes::new(),
    };
    let quota = ["--quota-records", "2"];
    die_at(cluster, &prefix, &quota, "create-after-reserve", &create).await;
    // Through another gateway: the dead one's reservation holds one of the two
    // records of quota until its fence has passed, then it is repaired (undone).
    let gw = gateway(&prefix, |c| c.store.quota_records = 2);
    let mut c = Raw::connect(gw.addr(), 2).await;
    let mut created = Vec::new();
    let started = Instant::now();
    while created.len() < 2 {
        create_once_repaired(&mut c, started).await;
        created.push(());
    }
    assert!(
        started.elapsed() > Duration::from_secs(5),
        "the quota was free before the fence: the dead gateway's reservation was ignored"
    );
    // And not one more: the repair undid the reservation, it did not lose a charge.
    assert_eq!(
        c.call(Request::Create {
            access: Access::empty(),
            data: Bytes::new()
        })
        .await
        .status(),
        Status::QuotaExceeded
    );
}

/// Starts the gateway binary on `store` (as `NETSWAP_STORE`) with `flags`, which
/// must refuse to start with exit code 4 (the store unavailable); its stderr.
fn refused_start(store: &str, flags: &[&str]) -> String {
    let key = std::env::temp_dir().join(format!(
        "netswap-refused-key-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::write(&key, GATEWAY_KEY).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_netswap-server"))
        .args(["--listen", "127.0.0.1:0", "--identity-key"])
        .arg(&key)
        .args(flags)
        .env("NETSWAP_STORE", store)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&key);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(4), "{store} {flags:?}: {err}");
    err
}

/// A cluster whose nodes want a password (`requirepass`, as production clusters do):
/// gateways given it in the store URL serve, as the default user and as an ACL user,
/// each of their connections authenticated (commands, watches across gateways,
/// leases). Without it, or with a wrong one, a gateway does not start: exit code 4,
/// a clear reason, and the password nowhere in what it prints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_with_a_password_is_served_with_it_and_refused_without() {
    let cluster = RedisCluster::start_with_password(3, 0, "s3cret@pass");
    let nodes = cluster.nodes().join(",");
    for (store, says) in [
        (format!("redis-cluster://{nodes}"), "wants a password"),
        (
            format!("redis-cluster://:wrong-one@{nodes}"),
            "refused the store URL's user",
        ),
        (
            format!("redis-cluster://someone:s3cret%40pass@{nodes}"),
            "refused the store URL's user",
        ),
    ] {
        let err = refused_start(&store, &[]);
        assert!(err.contains(says), "{store}: {err}");
        assert!(
            !err.contains("wrong-one") && !err.contains("s3cret"),
            "{store}: {err}"
        );
    }
    // An ACL user of its own for the second gateway, on every node (ACLs are not
    // shared by a cluster's nodes), with what docs/ARCHITECTURE.md lists.
    let prefix = fresh_prefix();
    let (keys, channels) = (format!("~{prefix}:*"), format!("&{prefix}:*"));
    for &p in &cluster.ports {
        let mut acl = vec![
            "ACL",
            "SETUSER",
            "netswap-gw",
            "on",
            ">gw pass",
            &keys,
            &channels,
        ];
        acl.extend(ACL_COMMANDS.split_whitespace());
        let ok = cluster.cli(p, &acl);
        assert!(ok.contains("OK"), "{ok}");
        // And one that may not track keys: its gateway has no read cache.
        acl[2] = "netswap-nocache";
        acl.push("-client|tracking");
        let ok = cluster.cli(p, &acl);
        assert!(ok.contains("OK"), "{ok}");
        // The refused starts above are in the log: only what comes next counts.
        cluster.cli(p, &["ACL", "LOG", "RESET"]);
    }
    // The read cache's tracking connections authenticate too.
    let at = |store: String, prefix: &str| gateway_of(&store, prefix, read_cached);
    let writer = at(format!("redis-cluster://:s3cret%40pass@{nodes}"), &prefix);
    let watcher = at(
        format!("redis-cluster://netswap-gw:gw%20pass@{nodes}"),
        &prefix,
    );
    let untracked = at(
        format!("redis-cluster://netswap-nocache:gw%20pass@{nodes}"),
        &prefix,
    );
    let (mut c, mut w, _d, p) = watched_both_ways(writer.addr(), watcher.addr()).await;
    replace_as(&mut c, p, b"authenticated", 3).await;
    changed_event(&mut w, 7, p, 3).await;
    assert_eq!(c.read(p).await, data(b"authenticated"));
    reads_come_from_the_cache(&watcher, p, b"authenticated").await;
    // The gateway whose user may not track serves READs by loads, and asked once:
    // not again at each look at the layout (every second).
    let mut u = Raw::connect(untracked.addr(), 9).await;
    for _ in 0..20 {
        assert_eq!(u.read(p).await, data(b"authenticated"));
    }
    let m = scrape(untracked.metrics_addr().unwrap());
    for r in ["hit", "fill"] {
        let key = format!("netswap_redis_read_cache_loads_total{{result=\"{r}\"}}");
        assert_eq!(metric(&m, &key), 0.0, "{r}");
    }
    let refusals = || {
        cluster
            .ports
            .iter()
            .flat_map(|&port| acl_log(&cluster.cli(port, &["ACL", "LOG"])))
            .map(|(count, object, user)| {
                assert_eq!(
                    (object.as_str(), user.as_str()),
                    ("client|tracking", "netswap-nocache"),
                    "node refused what the gateways need"
                );
                count
            })
            .sum::<u64>()
    };
    eventually(
        "CLIENT TRACKING refused",
        Duration::from_secs(5),
        async || refusals() > 0,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(refusals(), 1, "CLIENT TRACKING asked again after a refusal");
    for &port in &cluster.ports {
        cluster.cli(port, &["ACL", "LOG", "RESET"]);
    }
    // Both gateways hold leases for their clients' identities.
    let leases = || {
        cluster
            .primaries()
            .into_iter()
            .map(|port| {
                let pattern = format!("{prefix}:{{i:*}}:l");
                cluster
                    .cli(port, &["--scan", "--pattern", &pattern])
                    .lines()
                    .count()
            })
            .sum::<usize>()
    };
    eventually("leases taken", Duration::from_secs(5), async || {
        leases() >= 2
    })
    .await;
    // The clients leave (leases released) and the reapers look for a second more:
    // nothing the ACL user's gateway sent was refused.
    drop((c, w, _d));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for &port in &cluster.ports {
        let denied = cluster.cli(port, &["ACL", "LOG"]);
        assert!(
            denied.trim().is_empty(),
            "node {port} refused: {}",
            denied.replace('\n', " ")
        );
    }
}

/// The entries of `redis-cli ACL LOG`'s output: (count, object, username) each.
fn acl_log(out: &str) -> Vec<(u64, String, String)> {
    let lines: Vec<&str> = out.lines().map(str::trim).collect();
    let mut entries: Vec<(u64, String, String)> = Vec::new();
    for pair in lines.windows(2) {
        match pair[0] {
            "count" => entries.push((pair[1].parse().expect("a count"), "".into(), "".into())),
            "object" => {
                if let Some(e) = entries.last_mut() {
                    e.1 = pair[1].to_string();
                }
            }
            "username" => {
                if let Some(e) = entries.last_mut() {
                    e.2 = pair[1].to_string();
                }
            }
            _ => {}
        }
    }
    entries
}

/// The commands an ACL user of a gateway needs (docs/ARCHITECTURE.md, "Credentials").
const ACL_COMMANDS: &str =
    "+@read +@write +@scripting +@pubsub +@connection +cluster +client +wait +info +time";

/// A cluster that speaks TLS only, between its nodes too, and wants a certificate
/// from every client (as clusters with encryption in transit do): gateways given
/// `rediss-cluster://`, the nodes' authority and a client certificate serve, across
/// gateways (a watch), with writes acknowledged by a replica (`WAIT`, to the node
/// that applied each). A gateway that speaks plain TCP to it, does not trust its
/// authority, or has no client certificate does not start: exit code 4 and why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_over_tls_is_served_and_a_gateway_it_cannot_trust_is_refused() {
    let cluster = RedisCluster::start_with_tls(3, 1);
    let tls = cluster.tls_files();
    let nodes = cluster.nodes().join(",");
    let (ca, other_ca) = (
        tls.ca.display().to_string(),
        tls.other_ca.display().to_string(),
    );
    let (cert, cert_key) = (
        tls.client_cert.display().to_string(),
        tls.client_key.display().to_string(),
    );
    let client = ["--redis-tls-cert", &cert, "--redis-tls-key", &cert_key];
    for (store, flags, says) in [
        (format!("redis-cluster://{nodes}"), vec![], "unreachable"),
        (
            format!("rediss-cluster://{nodes}"),
            client.to_vec(),
            "UnknownIssuer",
        ),
        (
            format!("rediss-cluster://{nodes}"),
            [&["--redis-tls-ca", other_ca.as_str()][..], &client].concat(),
            "--redis-tls-ca FILE",
        ),
        (
            format!("rediss-cluster://{nodes}"),
            vec!["--redis-tls-ca", &ca],
            "--redis-tls-cert FILE",
        ),
    ] {
        let err = refused_start(&store, &flags);
        assert!(err.contains(says), "{store} {flags:?}: {err}");
    }
    // A certificate given as the key is refused before any connection (exit code 2,
    // a bad setting), naming the flag and the file.
    let out = Command::new(env!("CARGO_BIN_EXE_netswap-server"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--redis-tls-cert",
            &cert,
            "--redis-tls-key",
            &cert,
        ])
        .env("NETSWAP_STORE", format!("rediss-cluster://{nodes}"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!("--redis-tls-key {cert}: no PEM private key")),
        "{err}"
    );
    tls_gateways_serve(&cluster).await;
}

/// [`a_cluster_over_tls_is_served_and_a_gateway_it_cannot_trust_is_refused`] on a
/// cluster whose nodes announce the hostname their certificate names (`localhost`):
/// the crate connects to and verifies `localhost`, not the IP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_over_tls_that_announces_hostnames_is_served() {
    let cluster = RedisCluster::start_with_tls_announcing_hostnames(3, 1);
    cluster.assert_announces_hostnames();
    tls_gateways_serve(&cluster).await;
}

/// Certificates renewed while a gateway serves (short-lived ones, as cert-manager or
/// Vault hand out): the nodes move to a new authority, and the gateway's files are
/// replaced as Kubernetes replaces a mounted secret (a symbolic link to a new
/// directory, swapped in one rename). The gateway reads them again and makes its
/// connections anew with them; then every connection of the nodes' clients is
/// killed, and the gateway, which can only connect with the new files now (one with
/// the old ones is refused: an invalid peer certificate), serves again, watches
/// included. Files that are no PEM, installed in between, change nothing.
/// Without reading the files again it answered BUSY from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_files_renewed_while_serving_are_read_again() {
    let mut cluster = RedisCluster::start_with_tls(3, 0);
    let old = cluster.tls_files();
    // Removed however the test ends.
    let temp = tempfile::Builder::new()
        .prefix("netswap-tls-renewal-")
        .tempdir()
        .unwrap();
    let dir = temp.path();
    // `dir/now` links to the files in use (`dir/v1`, then `dir/v2`).
    let install = |version: &str, files: &common::cluster::TlsFiles| {
        let v = dir.join(version);
        std::fs::create_dir_all(&v).unwrap();
        std::fs::copy(&files.ca, v.join("ca.crt")).unwrap();
        std::fs::copy(&files.client_cert, v.join("client.crt")).unwrap();
        std::fs::copy(&files.client_key, v.join("client.key")).unwrap();
        let link = dir.join(format!("now-{version}"));
        std::os::unix::fs::symlink(&v, &link).unwrap();
        std::fs::rename(&link, dir.join("now")).unwrap();
    };
    install("v1", &old);
    let now = |name: &str| dir.join("now").join(name).display().to_string();
    let flags = [
        "--redis-tls-ca".to_string(),
        now("ca.crt"),
        "--redis-tls-cert".to_string(),
        now("client.crt"),
        "--redis-tls-key".to_string(),
        now("client.key"),
    ];
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let store = format!("rediss-cluster://{}", cluster.nodes().join(","));
    let gw = GatewayProcess::start_on(&store, &fresh_prefix(), &flags, &[]);
    let (mut c, mut w, _d, p) = watched_both_ways(gw.addr, gw.addr).await;

    let next = cluster.renew_tls();
    // The connections made before go on; a new one with the old files is refused.
    replace_as(&mut c, p, b"renewed nodes", 3).await;
    changed_event(&mut w, 7, p, 3).await;
    let err = refused_start(&store, &flags);
    assert!(err.contains("invalid peer certificate"), "{err}");

    // Files that are no PEM: nothing changes, and the gateway says why.
    let junk = dir.join("junk.crt");
    std::fs::write(&junk, "not a certificate").unwrap();
    install(
        "bad",
        &common::cluster::TlsFiles {
            ca: junk.clone(),
            ..cluster.tls_files()
        },
    );
    eventually(
        "the gateway says why it cannot use the files",
        Duration::from_secs(10),
        async || std::fs::read_to_string(&gw.log).is_ok_and(|l| l.contains("cannot be used")),
    )
    .await;
    replace_as(&mut c, p, b"bad files", 4).await;
    changed_event(&mut w, 7, p, 4).await;
    assert_eq!(gw.metric("netswap_redis_tls_reloads_total"), 0.0);

    // Good files, changed again: read at once, not after the wait for bad ones.
    install("v2", &next);
    eventually(
        "the gateway reads its files again",
        Duration::from_secs(5),
        async || gw.metric("netswap_redis_tls_reloads_total") >= 1.0,
    )
    .await;
    for &port in &cluster.ports {
        cluster.cli(port, &["CLIENT", "KILL", "TYPE", "normal"]);
        cluster.cli(port, &["CLIENT", "KILL", "TYPE", "pubsub"]);
    }
    // (A write answered BUSY may have been applied: the version is the one answered.)
    let mut version = 0;
    eventually(
        "writes after every connection was killed",
        Duration::from_secs(15),
        async || match c
            .ask(Request::Replace {
                ptr: p,
                data: Bytes::from_static(b"new files"),
            })
            .await
        {
            Reply::Written(v) => {
                version = v;
                true
            }
            _ => false,
        },
    )
    .await;
    assert_eq!(c.read(p).await, data(b"new files"));
    while next_change(&mut w, 7, p).await.0 < version {}
    assert_eq!(gw.metric("netswap_redis_tls_reloads_total"), 1.0);
    gw.kill();
}

/// Two gateways with the authority and a client certificate of `cluster` (TLS only):
/// a watch across them, writes acknowledged by a replica, `count_records`' scan, then
/// a replica promoted (the scripts reach it) and both still serve.
async fn tls_gateways_serve(cluster: &RedisCluster) {
    let tls = cluster.tls_files();
    let nodes = cluster.nodes().join(",");
    let prefix = fresh_prefix();
    let gateway = |wait_replicas: u32| {
        gateway_of(&format!("rediss-cluster://{nodes}"), &prefix, |c| {
            let o = c.cluster.as_mut().expect("a gateway");
            o.wait_replicas = wait_replicas;
            o.tls = Some(netswap_server::Tls {
                ca: Some(std::fs::read(&tls.ca).unwrap()),
                client: Some((
                    std::fs::read(&tls.client_cert).unwrap(),
                    std::fs::read(&tls.client_key).unwrap(),
                )),
                files: None,
            });
            // The read cache's tracking connections speak TLS too.
            read_cached(c);
        })
    };
    let (writer, watcher) = (gateway(1), gateway(0));
    let (mut c, mut w, _d, p) = watched_both_ways(writer.addr(), watcher.addr()).await;
    replace_as(&mut c, p, b"encrypted", 3).await;
    changed_event(&mut w, 7, p, 3).await;
    assert_eq!(c.read(p).await, data(b"encrypted"));
    reads_come_from_the_cache(&watcher, p, b"encrypted").await;
    assert_eq!(
        writer
            .stats()
            .count_records()
            .await
            .expect("a scan of every primary"),
        (1, 9)
    );
    a_promoted_replica_gets_the_scripts(cluster).await;
    tokio::task::block_in_place(|| cluster.wait_healthy());
    // (A write answered BUSY may have been applied: the version is the one answered.)
    let mut version = 0;
    eventually(
        "writes after the failover",
        Duration::from_secs(10),
        async || {
            let write = Request::Replace {
                ptr: p,
                data: Bytes::from_static(b"after"),
            };
            match c.ask(write).await {
                Reply::Written(v) => {
                    version = v;
                    true
                }
                _ => false,
            }
        },
    )
    .await;
    while next_change(&mut w, 7, p).await.0 < version {}
    assert_eq!(c.read(p).await, data(b"after"));
}

#[test]
fn a_cluster_that_is_down_at_start_is_a_clear_error() {
    let port = unused_address().port(); // nothing listens there now
    let start = Instant::now();
    // Exit code 4: the store is unavailable.
    let err = refused_start(&format!("redis-cluster://127.0.0.1:{port}"), &[]);
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    assert!(err.contains("unreachable"), "{err}");
    assert!(start.elapsed() < Duration::from_secs(15));
    // And without the shared identity key, gateways are refused outright.
    let out = Command::new(env!("CARGO_BIN_EXE_netswap-server"))
        .args(["--listen", "127.0.0.1:0", "--store"])
        .arg(format!("redis-cluster://127.0.0.1:{port}"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--identity-key"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_that_goes_away_gets_busy_replies_and_is_used_again_when_back() {
    let mut cluster = RedisCluster::start(3, 0, true);
    let prefix = fresh_prefix();
    let gw = {
        let mut c = ServerConfig::new("127.0.0.1:0".parse().unwrap());
        let mut o = netswap_server::ClusterOptions::parse(&format!(
            "redis-cluster://{}",
            cluster.nodes().join(",")
        ))
        .unwrap();
        o.prefix = prefix;
        o.response_timeout = Duration::from_millis(500);
        // With the read cache: a tracking connection that times out is given up, or
        // each queued write would wait for its timeout too, and some would not be
        // answered in time.
        o.read_cache = 16_384;
        c.cluster = Some(o);
        c.identity_key = IdentityKey::new(GATEWAY_KEY);
        c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
        logs();
        netswap_server::spawn(c, 2).unwrap()
    };
    // Ready (for a load balancer's probe) once its periodic work reached the cluster.
    let probe = gw.metrics_addr().unwrap();
    let ready = || http_get(probe, "/readyz").0;
    eventually("ready", Duration::from_secs(5), async || ready() == 200).await;
    let mut c = Raw::connect(gw.addr(), 2).await;
    let p = c.create(Access::READ, &b"survives"[..]).await;
    let shared = c.create(Access::READ | Access::WRITE, &b"w"[..]).await;
    // (Connected, and served once, before: a connection whose identity has no lease
    // yet is refused while the cluster is gone.)
    let mut writers = Vec::new();
    for from in 3..5 {
        let mut w = Raw::connect(gw.addr(), from).await;
        assert_eq!(w.read(shared).await, data(b"w"));
        writers.push(w);
    }
    // A cluster that answers nothing. Writes of one record queue behind each other
    // on a gateway (`serial`), and the first one's commit is sent again for 15 s:
    // every queued write is still answered BUSY, none hangs.
    cluster.freeze_all(true);
    let t = Instant::now();
    let writers: Vec<_> = writers
        .into_iter()
        .map(|mut w| {
            tokio::spawn(async move {
                let burst = (0..8)
                    .map(|_| Request::Replace {
                        ptr: shared,
                        data: Bytes::from_static(b"x"),
                    })
                    .collect();
                pipelined(&mut w, burst).await
            })
        })
        .collect();
    for w in writers {
        let replies = tokio::time::timeout(Duration::from_secs(25), w)
            .await
            .expect("no hang: every queued write answered while the cluster is gone")
            .unwrap();
        for r in replies {
            assert_eq!(r.status(), Status::Busy, "{r:?}");
        }
    }
    println!("16 queued writes answered BUSY within {:?}", t.elapsed());
    cluster.freeze_all(false);
    // Let the append-only file reach the disk, then take the whole cluster away.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    cluster.kill_all();
    let t = Instant::now();
    let m = tokio::time::timeout(
        Duration::from_secs(30),
        c.call(Request::Read {
            ptr: p,
            range: None,
        }),
    )
    .await
    .expect("no hang: an answer while the cluster is gone");
    assert_eq!(m.status(), Status::Busy, "{}", m.reason());
    assert!(m.reason().contains("Redis Cluster"), "{}", m.reason());
    assert!(m.reason().contains("retry later"), "{}", m.reason());
    println!("BUSY after {:?} with the cluster gone", t.elapsed());
    assert_eq!(
        c.call(Request::Hello).await.status(),
        Status::Ok,
        "the gateway itself is fine"
    );
    eventually("not ready", Duration::from_secs(5), async || ready() == 503).await;
    assert_eq!(
        http_get(probe, "/healthz"),
        (200, "ok\n".into()),
        "but alive"
    );
    cluster.restart_killed(true);
    eventually(
        "the gateway uses the cluster again",
        Duration::from_secs(30),
        async || c.read(p).await == data(b"survives"),
    )
    .await;
    eventually("ready again", Duration::from_secs(5), async || {
        ready() == 200
    })
    .await;
    // The first requests to a node whose connection is being made again may still
    // time out (BUSY) after a long outage.
    let mut q = None;
    eventually("creates work again", Duration::from_secs(30), async || {
        let create = Request::Create {
            access: Access::READ,
            data: Bytes::from_static(b"after"),
        };
        match c.ask(create).await {
            Reply::Created(p) => q = Some(p),
            r => assert_eq!(r.status(), Status::Busy, "{r:?}"),
        }
        q.is_some()
    })
    .await;
    let q = q.unwrap();
    assert_eq!(c.read(q).await, data(b"after"));
}

/// With `--redis-wait-replicas`, a write is acknowledged once a replica of the node
/// that applied it has it: also while the record's slot is being migrated and its
/// keys have moved, where the write is applied by the importing primary (`ASK`) and
/// the old primary's replicas know nothing of it. `WAIT` must go where the commit
/// went.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_in_a_migrating_slot_waits_for_the_replica_of_the_node_that_applied_it() {
    let cluster = RedisCluster::start(3, 1, false);
    let (gw, prefix) = gateway_on(&cluster, |c| {
        c.cluster.as_mut().unwrap().wait_replicas = 1;
    });
    let mut c = Raw::connect(gw.addr(), 2).await;
    let primaries = cluster.primaries();
    for (i, value) in [vec![1u8; 10], vec![2u8; 100_000]].into_iter().enumerate() {
        let len = value.len();
        let p = c.create(Access::READ | Access::WRITE, value).await;
        let key = format!("{prefix}:{{r:{p}}}:m");
        let from = cluster.primary_of(&key);
        let to = *primaries.iter().find(|&&p| p != from).unwrap();
        let m = cluster.begin_move(&key, to);
        cluster.migrate_keys(&m);
        let calls = |port| {
            let calls = |cmd| cluster.calls_on(port, cmd);
            (calls("evalsha"), calls("wait"))
        };
        let before = calls(to);
        let write = Request::Replace {
            ptr: p,
            data: Bytes::from(vec![3 + i as u8; len]), // same size: no quota marker
        };
        assert_eq!(c.ask(write).await, Reply::Written(2));
        let after = calls(to);
        assert!(
            after.0 > before.0,
            "the commit ran on the importing primary"
        );
        assert!(
            after.1 > before.1,
            "WAIT ran where the commit did (not only on the old primary, whose replicas \
             do not have the write): {before:?} → {after:?}"
        );
        cluster.finish_move(&m);
        same_bytes(c.read(p).await, &vec![3 + i as u8; len], "after the move");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_failing_over_under_load_loses_no_acknowledged_write() {
    let mut cluster = RedisCluster::start(3, 1, false);
    let prefix = fresh_prefix();
    let opts = |o: &mut netswap_server::ClusterOptions| {
        o.prefix = prefix.clone();
        o.wait_replicas = 1; // acknowledged = on a replica too
        o.response_timeout = Duration::from_millis(1000);
    };
    let mk = || {
        let mut c = ServerConfig::new("127.0.0.1:0".parse().unwrap());
        let mut o = netswap_server::ClusterOptions::parse(&format!(
            "redis-cluster://{}",
            cluster.nodes().join(",")
        ))
        .unwrap();
        opts(&mut o);
        c.cluster = Some(o);
        c.identity_key = IdentityKey::new(GATEWAY_KEY);
        c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
        logs();
        netswap_server::spawn(c, 2).unwrap()
    };
    let gws = [mk(), mk()];
    // One record written by eight connections at once, four through each gateway:
    // their writes queue together and are committed in groups (`group.rs`), through
    // the failover of the record's own primary.
    let mut creator = Raw::connect(gws[0].addr(), 19).await;
    let hot = creator
        .create(Access::READ | Access::WRITE, &b"--:--------"[..])
        .await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut hot_writers = Vec::new();
    for w in 0..8u8 {
        let addr = gws[w as usize % 2].addr();
        let stop = stop.clone();
        hot_writers.push(tokio::spawn(async move {
            let mut c = Raw::connect(addr, 40 + w).await;
            // (version, bytes) of each acknowledged write; the bytes of those
            // answered BUSY (maybe applied).
            let (mut acked, mut maybe) = (Vec::new(), Vec::new());
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let data = Bytes::from(format!("{w:02}:{n:08}"));
                match c
                    .ask(Request::Replace {
                        ptr: hot,
                        data: data.clone(),
                    })
                    .await
                {
                    Reply::Written(v) => acked.push((v, data)),
                    Reply::Error {
                        status: Status::Busy,
                        ..
                    } => {
                        maybe.push(data);
                        tokio::time::sleep(Duration::from_millis(20)).await
                    }
                    r => panic!("hot writer {w}: {r:?}"),
                }
            }
            (acked, maybe)
        }));
    }
    // 16 writers, each with its own record, writing a counter as fast as it can.
    let mut writers = Vec::new();
    for w in 0..16u8 {
        let addr = gws[w as usize % 2].addr();
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let mut c = Raw::connect(addr, 20 + w).await;
            let p = c.create(Access::READ, &b"0"[..]).await;
            let mut acked = 0u64;
            // Writes answered BUSY since the last acknowledged one: not applied, or
            // (a lost reply the gateway could not resolve) maybe applied.
            let mut maybe: Vec<u64> = Vec::new();
            let mut longest = Duration::ZERO;
            let mut last_ok = Instant::now();
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let m = c
                    .call(Request::Replace {
                        ptr: p,
                        data: Bytes::from(n.to_string()),
                    })
                    .await;
                match m.status() {
                    Status::Ok => {
                        acked = n;
                        maybe.clear();
                        longest = longest.max(last_ok.elapsed());
                        last_ok = Instant::now();
                    }
                    Status::Busy => {
                        maybe.push(n);
                        tokio::time::sleep(Duration::from_millis(20)).await
                    }
                    s => panic!("{s:?}: {}", m.reason()),
                }
            }
            // A write stall still open at the end counts too.
            longest = longest.max(last_ok.elapsed());
            (p, acked, maybe, longest, c)
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let victim = cluster.primary_of(&format!("{prefix}:{{r:{hot}}}:m"));
    cluster.kill(victim);
    let killed_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(12)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut worst = Duration::ZERO;
    let mut checked = 0;
    let mut unresolved = 0;
    for w in writers {
        let (p, acked, maybe, longest, mut c) = w.await.unwrap();
        worst = worst.max(longest);
        assert!(acked > 0);
        let got = loop {
            match c.read(p).await {
                Reply::Data(d) => break d,
                Reply::Error {
                    status: Status::Busy,
                    ..
                } => tokio::time::sleep(Duration::from_millis(100)).await,
                r => panic!("{r:?}"),
            }
        };
        // The last acknowledged write, or one of the BUSY ones after it: never an
        // older state.
        let v: u64 = std::str::from_utf8(&got).unwrap().parse().unwrap();
        assert!(
            v == acked || maybe.contains(&v),
            "record {p}: read {v}, last acknowledged {acked}, BUSY after it {maybe:?}"
        );
        unresolved += maybe.len();
        checked += 1;
    }
    // The hot record: every acknowledged write has a version of its own, each
    // writer's rise, and the record holds the highest acknowledged write, or a later
    // one answered BUSY (maybe applied) with a higher version.
    let (mut versions, mut maybe) = (std::collections::BTreeMap::new(), Vec::new());
    for w in hot_writers {
        let (acked, busy) = w.await.unwrap();
        assert!(!acked.is_empty(), "every hot writer got writes in");
        assert!(
            acked.windows(2).all(|a| a[0].0 < a[1].0),
            "a writer's versions rise"
        );
        for (v, data) in acked {
            assert!(
                versions.insert(v, data).is_none(),
                "version {v} acknowledged twice"
            );
        }
        maybe.extend(busy);
    }
    let (&top, top_data) = versions.last_key_value().unwrap();
    let (data, version) = loop {
        let data = creator.read(hot).await;
        let info = creator.ask(Request::Info { ptr: hot }).await;
        match (data, info) {
            (Reply::Data(d), Reply::Info(i)) => break (d, i.version),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    assert!(
        (version == top && data == *top_data) || (version > top && maybe.contains(&data)),
        "the hot record holds {data:?} at version {version}; the highest acknowledged is {top_data:?} at {top}"
    );
    let grouped: f64 = gws
        .iter()
        .map(|g| {
            metric(
                &scrape(g.metrics_addr().unwrap()),
                "netswap_redis_grouped_writes_total",
            )
        })
        .sum();
    assert!(grouped > 0.0, "the hot record's writes were grouped");
    println!(
        "failover: {checked} records checked, longest write stall {:.2} s, {unresolved} BUSY writes after the last acknowledged ones (primary killed {:.1} s before the end); the hot record: {} writes acknowledged, {} BUSY",
        worst.as_secs_f64(),
        killed_at.elapsed().as_secs_f64(),
        versions.len(),
        maybe.len()
    );
    // Failure detection (cluster-node-timeout 1.5 s), the election, and the gateway
    // following the new topology: a few seconds, and well before the end.
    assert!(
        worst < Duration::from_secs(11),
        "writes did not recover: stalled {worst:?}"
    );
}

/// A connection from `from` that creates a record readable by all, then writes and
/// reads it as fast as it is answered (BUSY: again 20 ms later; a request unanswered
/// for 10 s is given up) until `stop`; returns the record, when (since `started`) it
/// was last answered OK, and the connection, still open.
fn load_worker(
    addr: SocketAddr,
    from: std::net::IpAddr,
    started: Instant,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<(Pointer, Duration, Raw)> {
    tokio::spawn(async move {
        let mut c = Raw::connect_from(addr, from).await;
        let p = c.create(Access::READ, &b"0"[..]).await;
        let mut last_ok = Duration::ZERO;
        let mut n = 0u64;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            n += 1;
            let request = if n.is_multiple_of(2) {
                Request::Replace {
                    ptr: p,
                    data: Bytes::from(n.to_string()),
                }
            } else {
                Request::Read {
                    ptr: p,
                    range: None,
                }
            };
            match tokio::time::timeout(Duration::from_secs(10), c.ask(request)).await {
                Ok(Reply::Data(_) | Reply::Written(_)) => last_ok = started.elapsed(),
                Ok(Reply::Error {
                    status: Status::Busy,
                    ..
                }) => tokio::time::sleep(Duration::from_millis(20)).await,
                Ok(r) => panic!("{r:?}"),
                Err(_) => {}
            }
        }
        (p, last_ok, c)
    })
}

/// 200 connections from 40 addresses of `block` load the gateway at `addr`
/// ([`load_worker`]); 3 s in, the first primary is SIGKILLed, and started again 5 s
/// later (it comes back as a replica); the load goes on for `after` more, then stops.
/// Returns when the kill was and when the load stopped (since it started), and each
/// connection's record, when it was last answered OK and the connection, still open.
async fn load_through_a_failover(
    cluster: &mut RedisCluster,
    addr: SocketAddr,
    block: u8,
    after: Duration,
) -> (Duration, Duration, Vec<(Pointer, Duration, Raw)>) {
    let started = Instant::now();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = (0..200usize)
        .map(|w| load_worker(addr, many(block, w % 40), started, stop.clone()))
        .collect();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let killed_at = started.elapsed();
    let victim = cluster.primaries()[0];
    tokio::task::block_in_place(|| cluster.kill(victim));
    tokio::time::sleep(Duration::from_secs(5)).await;
    tokio::task::block_in_place(|| cluster.restart_killed(false));
    tokio::time::sleep(after).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut done = Vec::with_capacity(workers.len());
    for w in workers {
        done.push(w.await.unwrap());
    }
    (killed_at, started.elapsed(), done)
}

/// A gateway under the load of many connections, whose cluster loses a primary to
/// SIGKILL (a replica takes over, the node comes back as a replica), serves again
/// within seconds, on the connection it had. The `redis` crate's cluster connection
/// (1.8.2 as released) stops serving for good there: its recovery (reading the slots
/// again, or connecting to the initial nodes again) never completes, and every
/// command of the gateway times out from then on (the soak under failovers,
/// `scripts/chaos-cluster.sh`, 3 runs of 3; this test: 200 of 200 connections never
/// answered OK again, 2 runs of 2). The crate netswap builds with carries the fix
/// (third_party/README.md), so the gateway's replacement of a connection that stops
/// answering (`ClusterStore::check_connection`) is turned off here
/// (`NETSWAP_FAULT_AT=commands-stay-stuck`): the crate alone must recover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_under_load_serves_again_after_a_primary_fails_over() {
    let mut cluster = RedisCluster::start(3, 1, false);
    let gw = GatewayProcess::start(
        &cluster.nodes(),
        &fresh_prefix(),
        &[],
        &[("NETSWAP_FAULT_AT", "commands-stay-stuck")],
    );
    let (killed_at, ended, workers) =
        load_through_a_failover(&mut cluster, gw.addr, 7, Duration::from_secs(15)).await;
    let serving_again = killed_at + Duration::from_secs(16);
    let stalled = workers
        .iter()
        .filter(|(_, last_ok, _)| *last_ok < serving_again)
        .count();
    println!(
        "{stalled} of 200 connections not answered OK in the last {:.0} s; connections replaced: {}",
        (ended - serving_again).as_secs_f64(),
        gw.metric("netswap_redis_connections_replaced_total")
    );
    assert_eq!(
        stalled, 0,
        "connections not served again within 16 s of the primary's SIGKILL"
    );
    assert_eq!(gw.metric("netswap_redis_connections_replaced_total"), 0.0);
}

/// The gateway replaces its connection for commands when it stops answering
/// (`ClusterStore::check_connection`; forced here once, by
/// `NETSWAP_FAULT_AT=commands-replace`, while 20 connections write): the requests
/// in flight on the old connection are answered there, the next ones go on the new
/// one, and no write is refused or lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_for_commands_replaced_under_load_answers_every_request() {
    let gw = GatewayProcess::with_fault(&fresh_prefix(), &[], "commands-replace");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..20usize)
        .map(|w| {
            let stop = stop.clone();
            let addr = gw.addr;
            tokio::spawn(async move {
                let mut c = Raw::connect_from(addr, many(9, w)).await;
                let p = c.create(Access::READ, &b"0"[..]).await;
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    n += 1;
                    let data = Bytes::from(format!("{w}:{n}"));
                    let reply = c.ask(Request::Replace { ptr: p, data }).await;
                    assert_eq!(reply, Reply::Written(n + 1), "writer {w}, write {n}");
                }
                assert_eq!(
                    c.read(p).await,
                    Reply::Data(Bytes::from(format!("{w}:{n}")))
                );
                n
            })
        })
        .collect();
    let started = Instant::now();
    while gw.metric("netswap_redis_connections_replaced_total") < 1.0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the connection was not replaced"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Writes on the new connection, too.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut writes = 0;
    for w in writers {
        writes += w.await.unwrap();
    }
    println!(
        "{writes} writes, every one answered; connections replaced: {}",
        gw.metric("netswap_redis_connections_replaced_total")
    );
    assert_eq!(gw.metric("netswap_redis_connections_replaced_total"), 1.0);
}

/// The `redis` crate's cluster connection (1.8.2 as released) can stop serving for
/// good while a primary fails over under load (its recovery deadlocks with requests
/// in flight; the gateway replaces it within seconds, which
/// `NETSWAP_FAULT_AT=commands-stay-stuck` turns off here). The leases have a
/// connection of their own: while the command connection is stuck, they are still
/// renewed, and the reaper, on another gateway, leaves alone the records of clients
/// that stayed connected. With the leases on the command connection, their renewals
/// failed with it, the leases ran out, and the reaper took those records (seen in
/// `scripts/chaos-cluster.sh`, where each new command connection got stuck again
/// while the layout kept changing). The crate netswap builds with now carries the
/// fix of that deadlock (third_party/README.md), so here the command connection
/// seldom or never gets stuck: the test then checks that a failover under load with
/// short leases reaps nothing of connected clients, and that the gateway says it is
/// ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_are_renewed_while_the_connection_for_commands_is_stuck() {
    let mut cluster = RedisCluster::start(3, 1, false);
    let prefix = fresh_prefix();
    // The reaper: started first, it takes the reaper's lock.
    let reaper = gateway_at(&cluster, &prefix, |c| {
        lease_settings(c, Duration::from_secs(6), Some(Duration::from_secs(2)))
    });
    let mut others = Raw::connect_from(reaper.addr(), local(2)).await;
    others
        .create(Access::READ, &b"the reaper's first round"[..])
        .await;
    // Without the read cache: the READs of the load must go on the connection for
    // commands, which the `redis` crate leaves stuck after a failover under load.
    let stuck = GatewayProcess::start(
        &cluster.nodes(),
        &prefix,
        &[
            "--lease-ttl",
            "6",
            "--orphan-grace",
            "2",
            "--redis-read-cache",
            "0",
        ],
        &[("NETSWAP_FAULT_AT", "commands-stay-stuck")],
    );
    // Past a lease's TTL and the grace, twice over, after the kill.
    let (killed_at, _, held) =
        load_through_a_failover(&mut cluster, stuck.addr, 8, Duration::from_secs(12)).await;
    let stalled = held
        .iter()
        .filter(|(_, last_ok, _)| *last_ok < killed_at + Duration::from_secs(10))
        .count();
    let mut gone = 0;
    for (p, _, _) in &held {
        match others
            .ask(Request::Read {
                ptr: *p,
                range: None,
            })
            .await
        {
            Reply::Data(_) => {}
            Reply::Error {
                status: Status::AddressFault,
                ..
            } => gone += 1,
            r => panic!("reading a record through the reaper's gateway: {r:?}"),
        }
    }
    println!(
        "{stalled} of 200 connections not answered OK from 10 s after the kill; leases lapsed: {}; renewals failed: {}",
        stuck.metric("netswap_redis_leases_lapsed_total"),
        stuck.metric("netswap_redis_lease_renewals_failed_total"),
    );
    assert_eq!(
        gone, 0,
        "records (of 200) of clients still connected reaped while their gateway's command connection was stuck"
    );
    // Its connection for commands still stuck, the gateway is not ready, and says so
    // on every look (its leases, renewed on their own connection, do not make it
    // look ready between two failed rounds of its reaper). The crate's stuck
    // connection is a race, and does not come in every run (it did not in 2 of 3 runs
    // of the whole suite on 2026-12-07, which loads the host differently; alone, 3 of
    // 3): when every connection was answered again, the gateway must say it is ready.
    let expect = if stalled == 0 { 200 } else { 503 };
    let answers: Vec<u16> = (0..30)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(100));
            http_get(stuck.metrics, "/readyz").0
        })
        .collect();
    assert!(
        answers.iter().all(|&a| a == expect),
        "/readyz with {stalled} of 200 connections stalled: {answers:?}"
    );
    assert_eq!(http_get(stuck.metrics, "/healthz").0, 200);
}

/// A gateway that replaces its connection for subscriptions (because it stopped
/// answering, as the command connection did in the soak under failovers; forced here
/// by `NETSWAP_FAULT_AT=subs-replace` once a record is watched) subscribes again to
/// every watched record on the new one: its watchers hear of later changes, and of
/// those made while no subscription was in place. Without that, the old connection
/// took the subscriptions with it and the watchers heard nothing again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_survive_a_new_connection_for_the_subscriptions() {
    let prefix = fresh_prefix();
    let gw = GatewayProcess::with_fault(&prefix, &[], "subs-replace");
    let writers = gateway(&prefix, |_| {});
    let mut watcher = Raw::connect(gw.addr, 2).await;
    let mut writer = Raw::connect(writers.addr(), 3).await;
    let p = writer
        .create(Access::READ | Access::WRITE, &b"v1"[..])
        .await;
    watcher.send(50, &Request::watch(p)).await;
    assert_eq!(watcher.reply_to(50).await.status(), Status::Ok);
    eventually(
        "the subscriptions' connection is replaced",
        Duration::from_secs(10),
        async || gw.metric("netswap_redis_connections_replaced_total") >= 1.0,
    )
    .await;
    // The first change may come before the new subscription is in place (then the
    // watcher hears of it when the gateway looks at the record again) or after it;
    // the second comes through the new subscription.
    for version in [2, 3] {
        let write = Request::Replace {
            ptr: p,
            data: Bytes::from(format!("v{version}")),
        };
        assert_eq!(writer.ask(write).await, Reply::Written(version));
        tokio::time::timeout(
            Duration::from_secs(10),
            changed_event(&mut watcher, 50, p, version),
        )
        .await
        .unwrap_or_else(|_| panic!("the watcher hears of version {version} within 10 s"));
    }
}

/// A lease runs out while the cluster is unreachable whether or not its gateway is
/// alive. After an outage longer than the lease TTL and the orphan grace, the reaper
/// reaped every record of the clients that had stayed connected through it as soon
/// as the cluster came back (all 20 within a second here). Now an expired lease counts as offline
/// only from a TTL after the gateway is back in touch with the cluster, by which time
/// the gateways of connected identities have renewed their leases; the identities of
/// a gateway that went away during the outage are still reaped, a TTL and the grace
/// after the cluster is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_outage_longer_than_lease_and_grace_reaps_nothing_of_connected_clients() {
    let mut cluster = RedisCluster::start(3, 0, true);
    let ttl = Duration::from_secs(1);
    let grace = Duration::from_secs(1);
    let prefix = fresh_prefix();
    let gw = gateway_at(&cluster, &prefix, |c| lease_settings(c, ttl, Some(grace)));
    let gone = gateway_at(&cluster, &prefix, |c| lease_settings(c, ttl, Some(grace)));
    let mut stays = Raw::connect(gw.addr(), 2).await;
    let mut kept = Vec::new();
    for i in 0..20u8 {
        kept.push(stays.create(Access::READ, vec![i; 10]).await);
    }
    let mut leaves = Raw::connect(gone.addr(), 3).await;
    let mut orphans = Vec::new();
    for i in 0..5u8 {
        orphans.push(leaves.create(Access::READ, vec![i; 10]).await);
    }
    // Leases renewed at least once before the outage.
    tokio::time::sleep(ttl).await;

    cluster.kill_all();
    // The second gateway goes away while the cluster is down: its release fails,
    // its lease runs out like a dead gateway's.
    drop(leaves);
    tokio::task::spawn_blocking(move || gone.stop())
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(2 * (ttl + grace)).await;
    cluster.restart_killed(true);

    let back = Instant::now();
    let mut orphans_left = orphans.len();
    while back.elapsed() < 3 * (ttl + grace) + Duration::from_secs(2) || orphans_left > 0 {
        assert!(
            back.elapsed() < Duration::from_secs(30),
            "{orphans_left} of the records of the gateway that went away were not reaped"
        );
        let mut missing = 0;
        for p in &kept {
            match stays.read(*p).await {
                Reply::Data(_) => {}
                // The first requests after the outage may find a node's connection
                // still being made again.
                Reply::Error {
                    status: Status::Busy,
                    ..
                } => {}
                _ => missing += 1,
            }
        }
        assert_eq!(
            missing,
            0,
            "records of a client connected through the outage were reaped {:?} after it",
            back.elapsed()
        );
        orphans_left = 0;
        for p in &orphans {
            if stays.read(*p).await.status() != Status::AddressFault {
                orphans_left += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The reaper looks at an identity's liveness again before each chunk of its
/// records. With one look for all of them, an identity that came back while its
/// records were being reaped (here: while the reaper pauses after its first chunk,
/// `NETSWAP_FAULT_AT=reap-pause`) lost all of them, although connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_that_comes_back_while_it_is_reaped_keeps_what_is_left() {
    const RECORDS: usize = 600;
    let gw = GatewayProcess::with_fault(&fresh_prefix(), &["--orphan-grace", "1"], "reap-pause");
    let mut owner = Raw::connect(gw.addr, 2).await;
    let creates = (0..RECORDS)
        .map(|i| Request::Create {
            access: Access::READ,
            data: Bytes::from(vec![i as u8; 8]),
        })
        .collect();
    let ptrs: Vec<Pointer> = pipelined(&mut owner, creates)
        .await
        .into_iter()
        .map(|r| match r {
            Reply::Created(p) => p,
            other => panic!("CREATE: {other:?}"),
        })
        .collect();
    drop(owner);
    let mut observer = Raw::connect(gw.addr, 3).await;
    let left = async |o: &mut Raw| {
        let reads = ptrs
            .iter()
            .map(|&ptr| Request::Read { ptr, range: None })
            .collect();
        pipelined(o, reads)
            .await
            .into_iter()
            .filter(|r| matches!(r, Reply::Data(_)))
            .count()
    };
    // Its grace (1 s) passes, the reaper takes the first chunk and pauses: the owner
    // comes back then.
    let mut now_left = RECORDS;
    eventually("the reaper starts", Duration::from_secs(20), async || {
        now_left = left(&mut observer).await;
        now_left < RECORDS
    })
    .await;
    assert!(now_left > 0, "all reaped before the owner could come back");
    // (Served once: its lease is taken.)
    let mut owner = Raw::connect(gw.addr, 2).await;
    let _ = owner.read(ptrs[0]).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    // The reaper finishes the chunk it was in (256 records), then looks again.
    let kept = left(&mut observer).await;
    assert!(
        kept >= RECORDS - 256,
        "{now_left} of {RECORDS} records were left when their owner came back, {kept} a while later"
    );
}

/// A pass of renewals picks the identities still connected, then moves them on the
/// reaper's schedule with `ZADD GT`. An identity whose last connection closed in
/// between had its release's entry (the end of its grace) overtaken by the pass's
/// (a TTL and the grace after the pass): it was reaped a TTL late. Here the pass
/// pauses 4 s in between (`NETSWAP_FAULT_AT=schedule-pause`) and the owner leaves
/// during the pause: reaped within its grace of the pass's end, not a TTL (9 s) later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_that_leaves_while_a_pass_schedules_is_reaped_on_time() {
    let gw = GatewayProcess::with_fault(
        &fresh_prefix(),
        &["--lease-ttl", "9", "--orphan-grace", "1"],
        "schedule-pause",
    );
    let connected = Instant::now();
    let mut owner = Raw::connect(gw.addr, 2).await;
    let p = owner.create(Access::READ, &b"an orphan soon"[..]).await;
    // A pass every 3 s: the first that renews the owner starts within 3 s of its
    // connection and pauses until 4 s after; the owner leaves within that pause.
    tokio::time::sleep_until((connected + Duration::from_millis(3500)).into()).await;
    drop(owner);
    let mut observer = Raw::connect(gw.addr, 3).await;
    eventually(
        "the orphan is reaped within its grace of the pass's end",
        Duration::from_millis(9000 - 3500),
        async || observer.read(p).await.status() == Status::AddressFault,
    )
    .await;
}

/// A reaper that finds an identity connected when its entry on the schedule is due
/// (as after renewals that lagged) keeps it on the schedule. It used to take it off:
/// a release that landed between its look and that removal lost its entry too, and
/// the identity's records stayed until it came and left again. Here the reaper
/// pauses 2 s after its look (`NETSWAP_FAULT_AT=reap-live-pause`) and the owner
/// leaves in the pause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_that_leaves_while_the_reaper_finds_it_connected_is_still_reaped() {
    let cluster = common::cluster::shared();
    let prefix = fresh_prefix();
    // A long TTL: no pass of renewals moves the entry while the test runs.
    let gw = GatewayProcess::with_fault(
        &prefix,
        &["--lease-ttl", "30", "--orphan-grace", "1"],
        "reap-live-pause",
    );
    let mut owner = Raw::connect(gw.addr, 2).await;
    let p = owner.create(Access::READ, &b"an orphan soon"[..]).await;
    let reap = format!("{prefix}:{{reap}}");
    let mut r = cluster.primary_connection(&reap);
    let members: Vec<String> = redis::cmd("ZRANGE")
        .arg(&reap)
        .arg(0)
        .arg(-1)
        .query(&mut r)
        .unwrap();
    assert_eq!(
        members.len(),
        1,
        "the owner alone is on the schedule: {members:?}"
    );
    let _: i64 = redis::cmd("ZADD")
        .arg(&reap)
        .arg(0)
        .arg(&members[0])
        .query(&mut r)
        .unwrap();
    // A round each second: the reaper finds the owner connected within one and
    // pauses 2 s; the owner leaves in the pause.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    drop(owner);
    let mut observer = Raw::connect(gw.addr, 3).await;
    eventually(
        "the orphan is reaped when its grace ends",
        Duration::from_secs(8),
        async || observer.read(p).await.status() == Status::AddressFault,
    )
    .await;
}

/// A gateway stays ready (`/readyz`) while one primary fails over: its other shards
/// serve, and a load balancer that took every gateway out of rotation meanwhile would
/// turn a shard's few seconds into an outage of all. The primary killed is the one
/// of the reaper's lock, whose rounds fail until its replica takes over: readiness by
/// the periodic work's success (as first built) answered 503 for seconds then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_stays_ready_while_one_primary_fails_over() {
    let mut cluster = RedisCluster::start(3, 1, false);
    let (gw, prefix) = gateway_on(&cluster, |c| {
        c.metrics_listen = Some("127.0.0.1:0".parse().unwrap())
    });
    let probe = gw.metrics_addr().unwrap();
    let victim = cluster.primary_of(&format!("{prefix}:{{reap}}"));
    tokio::task::block_in_place(|| cluster.kill(victim));
    let killed = Instant::now();
    let mut looks = Vec::new();
    while killed.elapsed() < Duration::from_secs(10) {
        looks.push(http_get(probe, "/readyz").0);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let not_ready = looks.iter().filter(|&&s| s != 200).count();
    // A `PING` may still meet the dead node before the client library drops it.
    assert!(
        not_ready <= 5,
        "{not_ready} of {} looks not ready: {looks:?}",
        looks.len()
    );
    let mut c = Raw::connect(gw.addr(), 2).await;
    c.create(Access::READ, &b"after the failover"[..]).await;
}
