//! `netswap-bench load --protocol resp-cluster`: the same load generator that measures
//! a netswap gateway measures the Redis Cluster under it (docs/BENCHMARKS.md). Runs
//! against the cluster `scripts/test.sh` started (`NETSWAP_TEST_REDIS_CLUSTER`), or
//! starts its own with `scripts/redis-cluster.sh`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

mod common;
use common::{bench, json};
use std::sync::{Mutex, MutexGuard};

/// A cluster to measure: the shared one, or one of our own (stopped on drop; one at
/// a time, as clusters created side by side on this machine can fail to form).
struct Cluster {
    nodes: Vec<String>,
    own: Option<(PathBuf, MutexGuard<'static, ()>)>,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/redis-cluster.sh")
}

impl Cluster {
    fn get() -> Cluster {
        if let Ok(nodes) = std::env::var("NETSWAP_TEST_REDIS_CLUSTER") {
            return Cluster {
                nodes: nodes.split(',').map(str::to_string).collect(),
                own: None,
            };
        }
        static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
        let guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let pid = std::process::id();
        let dir = std::env::temp_dir().join(format!("netswap-bench-cluster-{pid}"));
        // Ports 12000-16990 (cluster bus +10000), below the kernel's ephemeral range;
        // another base when a port is taken (a node that cannot bind fails the start).
        let mut failures = String::new();
        for attempt in 0..5u32 {
            let base = 12_000 + (pid.wrapping_add(attempt * 131) % 500) * 10;
            let out = Command::new(script())
                .args(["start", dir.to_str().unwrap(), &base.to_string(), "3"])
                .output()
                .expect("scripts/redis-cluster.sh runs (redis-server installed?)");
            if out.status.success() {
                return Cluster {
                    nodes: String::from_utf8(out.stdout)
                        .unwrap()
                        .trim()
                        .split(',')
                        .map(str::to_string)
                        .collect(),
                    own: Some((dir, guard)),
                };
            }
            failures += &format!(
                "base {base}: {}{}\n",
                String::from_utf8_lossy(&out.stderr),
                std::fs::read_to_string(dir.join("create.log")).unwrap_or_default()
            );
            stop(&dir);
        }
        panic!("no cluster could be started:\n{failures}");
    }
}

/// Stops the nodes of a cluster started in `dir` and removes it.
fn stop(dir: &Path) {
    let _ = Command::new(script())
        .args(["stop", dir.to_str().unwrap()])
        .status();
    let _ = std::fs::remove_dir_all(dir);
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some((dir, _one_at_a_time)) = &self.own {
            stop(dir);
        }
    }
}

#[test]
fn resp_cluster_reaches_every_primary_and_every_reply_is_a_hit() {
    let cluster = Cluster::get();
    // Any node will do as the seed, a replica included.
    let seed = cluster.nodes.last().unwrap();
    for op in ["replace", "read"] {
        let out = json(&bench(&[
            "load",
            "--protocol",
            "resp-cluster",
            "-s",
            seed,
            "-c",
            "6",
            "-P",
            "4",
            "-d",
            "100",
            "--keys",
            "500",
            "-n",
            "3000",
            "--op",
            op,
            "--json",
        ]));
        assert_eq!(out["protocol"], "resp-cluster");
        // A GET that missed, or a MOVED from a node that does not serve the key,
        // counts as an error (and fails the run).
        assert_eq!(out["errors"], 0, "{out}");
        assert_eq!(out["ops"], 3000, "{out}");
        assert_eq!(out["servers"], 3, "one target per primary: {out}");
        assert!(out["p99_us"].as_f64().unwrap() > 0.0, "{out}");
    }
}

/// `--resp-layout versioned-*`: every write the run counts raised its key's version
/// by one (keys preloaded at version 0), and every read of those hashes hit.
#[test]
fn versioned_writes_raise_one_version_each_and_reads_of_them_hit() {
    let cluster = Cluster::get();
    let seed = &cluster.nodes[0];
    let (host, port) = seed.rsplit_once(':').unwrap();
    for layout in ["versioned-multi", "versioned-script"] {
        for (op, n) in [("replace", 3000u64), ("read", 1000)] {
            let out = json(&bench(&[
                "load",
                "--protocol",
                "resp-cluster",
                "--resp-layout",
                layout,
                "-s",
                seed,
                "-c",
                "6",
                "-P",
                "4",
                "--keys",
                "200",
                "-n",
                &n.to_string(),
                "--op",
                op,
                "--json",
            ]));
            assert_eq!(out["errors"], 0, "{layout} {op}: {out}");
            assert_eq!(out["ops"], n, "{layout} {op}: {out}");
            assert_eq!(out["resp_layout"], layout, "{out}");
            if op == "read" {
                continue;
            }
            // The versions of the 200 keys, through redis-cli (which follows MOVED).
            let commands: String = (0..200).map(|k| format!("HGET vkey:{k:012} v\n")).collect();
            let mut cli = Command::new("redis-cli")
                .args(["-c", "-h", host, "-p", port])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("redis-cli is installed");
            cli.stdin
                .take()
                .unwrap()
                .write_all(commands.as_bytes())
                .unwrap();
            let got = cli.wait_with_output().unwrap();
            let versions: Vec<u64> = String::from_utf8_lossy(&got.stdout)
                .lines()
                .filter(|l| !l.starts_with("-> Redirected"))
                .map(|l| {
                    l.trim()
                        .parse()
                        .unwrap_or_else(|_| panic!("a version: {l:?}"))
                })
                .collect();
            assert_eq!(versions.len(), 200);
            assert_eq!(versions.iter().sum::<u64>(), n, "{layout}: {versions:?}");
        }
    }
}

/// `netswap-bench ARGS`, which must fail; its error message.
fn failure(args: &[&str]) -> String {
    let o = bench(args);
    assert!(!o.status.success(), "netswap-bench {args:?} succeeded");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn resp_layouts_other_than_plain_need_a_resp_protocol() {
    let err = failure(&[
        "load",
        "--resp-layout",
        "versioned-multi",
        "-s",
        "127.0.0.1:1",
        "-n",
        "10",
    ]);
    assert!(
        err.contains("--resp-layout goes with --protocol resp"),
        "{err}"
    );
}

#[test]
fn plain_resp_on_a_cluster_node_is_a_clear_error() {
    let cluster = Cluster::get();
    let err = failure(&[
        "load",
        "--protocol",
        "resp",
        "-s",
        &cluster.nodes[0],
        "--keys",
        "100",
        "-n",
        "10",
    ]);
    assert!(err.contains("--protocol resp-cluster"), "{err}");
}

/// `netswap-bench load --protocol resp-cluster -s addr -n 10`, which must fail; its
/// error message.
fn resp_cluster_error(addr: &str) -> String {
    failure(&["load", "--protocol", "resp-cluster", "-s", addr, "-n", "10"])
}

#[test]
fn resp_cluster_on_a_redis_that_is_not_a_cluster_or_not_there_is_a_clear_error() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = free.local_addr().unwrap().port();
    drop(free);
    let addr = format!("127.0.0.1:{port}");
    // Nothing listens there yet.
    let err = resp_cluster_error(&addr);
    assert!(err.contains("cannot read the cluster's slots"), "{err}");
    // A Redis without cluster mode.
    let mut redis = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("redis-server is installed");
    let up = (0..100).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(50));
        std::net::TcpStream::connect(&addr).is_ok()
    });
    let err = if up {
        resp_cluster_error(&addr)
    } else {
        String::new()
    };
    let _ = redis.kill();
    let _ = redis.wait();
    assert!(up, "redis-server did not start on {addr}");
    assert!(err.contains("is this a cluster node?"), "{err}");
}
