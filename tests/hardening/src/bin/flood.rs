//! `flood`: every adversarial scenario at scale, each against a fresh release server
//! process whose resident memory is sampled every 100 ms. Bounded: each scenario
//! stops by itself; loopback only. Figures go to docs/RELIABILITY.md.
//!
//! Run: `cargo run --release -p netswap-hardening --bin flood`; against gateways on a
//! Redis Cluster: `... --bin flood -- --store redis-cluster://HOST:PORT,...` (each
//! scenario gets a fresh gateway under a key prefix of its own, and the report adds
//! the keys the scenario left in the cluster and the primaries' memory).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use clap::Parser;
use netswap_hardening::*;

/// Adversarial scenarios against netswap-server, with its RSS sampled.
#[derive(Parser)]
struct Args {
    /// The server binary.
    #[arg(long, default_value = "target/release/netswap-server")]
    server_bin: String,
    /// Scale factor for counts and durations (1 = the documented run).
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// Run each scenario against a gateway on this Redis Cluster
    /// (`redis-cluster://HOST:PORT,...`) instead of the embedded store.
    #[arg(long)]
    store: Option<String>,
    /// Only the scenarios whose name contains this.
    #[arg(long)]
    only: Option<String>,
}

/// Where the scenarios run: the embedded store, or gateways on a cluster.
struct Target {
    bin: String,
    cluster: Option<Cluster>,
    only: Option<String>,
}

async fn run<F, Fut>(t: &Target, args: &[&str], name: &str, attack: F)
where
    F: FnOnce(SocketAddr) -> Fut,
    Fut: std::future::Future<Output = Report>,
{
    if t.only.as_deref().is_some_and(|o| !name.contains(o)) {
        return;
    }
    let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let gateway = t.cluster.as_ref().map(|c| c.gateway_args());
    if let Some((extra, _)) = &gateway {
        args.extend(extra.iter().cloned());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let redis_before = t.cluster.as_ref().map(Cluster::used_memory);
    let srv = ServerProcess::start(&t.bin, &args);
    let pid = srv.pid();
    let before = rss_kib(pid);
    let peak = Arc::new(AtomicU64::new(before));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, stop) = (peak.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let addr = srv.addr;
    let report = with_probe(addr, name, || attack(addr)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kib(pid);
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    print!("{report}");
    println!(
        "  server RSS: {} MiB before, {} MiB peak, {} MiB after; server flags: {}",
        before / 1024,
        peak.load(Ordering::Relaxed) / 1024,
        after / 1024,
        args.join(" ")
    );
    drop(srv);
    if let (Some(c), Some((_, prefix)), Some(mem)) = (&t.cluster, gateway, redis_before) {
        // What the scenario left in the cluster once its gateway is gone (leases
        // expire after their TTL; records of the attack stay until reaped).
        let now = c.used_memory();
        println!(
            "  cluster: {} keys under the scenario's prefix; primaries' used_memory {} -> {} MiB",
            c.keys(&prefix),
            mem >> 20,
            now >> 20
        );
    }
}

/// A Redis Cluster the scenarios' gateways use.
struct Cluster {
    url: String,
    nodes: Vec<(String, String)>,
    key: std::path::PathBuf,
    next: AtomicU64,
}

impl Cluster {
    fn new(url: &str) -> Cluster {
        let nodes = url
            .strip_prefix("redis-cluster://")
            .expect("--store redis-cluster://HOST:PORT,...")
            .split(',')
            .filter_map(|n| n.rsplit_once(':'))
            .map(|(h, p)| (h.to_string(), p.to_string()))
            .collect();
        let key = std::env::temp_dir().join(format!("netswap-flood-key-{}", std::process::id()));
        std::fs::write(&key, rand::random::<[u8; 32]>()).expect("identity key file");
        Cluster {
            url: url.to_string(),
            nodes,
            key,
            next: AtomicU64::new(0),
        }
    }

    /// A gateway's flags, under a prefix of its own (returned).
    fn gateway_args(&self) -> (Vec<String>, String) {
        let prefix = format!(
            "flood{}-{}",
            std::process::id(),
            self.next.fetch_add(1, Ordering::Relaxed)
        );
        let args = vec![
            "--store".into(),
            self.url.clone(),
            "--identity-key".into(),
            self.key.display().to_string(),
            "--redis-prefix".into(),
            prefix.clone(),
        ];
        (args, prefix)
    }

    fn cli(&self, (host, port): &(String, String), args: &[&str]) -> String {
        let out = std::process::Command::new("redis-cli")
            .args(["-h", host, "-p", port])
            .args(args)
            .output()
            .expect("redis-cli (Debian's redis-tools)");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn primaries(&self) -> Vec<&(String, String)> {
        self.nodes
            .iter()
            .filter(|n| self.cli(n, &["ROLE"]).starts_with("master"))
            .collect()
    }

    /// Keys under `prefix` on the primaries.
    fn keys(&self, prefix: &str) -> usize {
        let pattern = format!("{prefix}:*");
        self.primaries()
            .into_iter()
            .map(|n| {
                self.cli(n, &["--scan", "--pattern", &pattern])
                    .lines()
                    .count()
            })
            .sum()
    }

    /// The primaries' `used_memory`, bytes.
    fn used_memory(&self) -> u64 {
        self.primaries()
            .into_iter()
            .filter_map(|n| {
                self.cli(n, &["INFO", "memory"])
                    .lines()
                    .find_map(|l| l.strip_prefix("used_memory:"))
                    .and_then(|v| v.trim().parse::<u64>().ok())
            })
            .sum()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.key);
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let a = Args::parse();
    let s = a.scale;
    let n = |x: f64| (x * s).max(1.0) as u32;
    let bin = &Target {
        bin: a.server_bin.clone(),
        cluster: a.store.as_deref().map(Cluster::new),
        only: a.only.clone(),
    };
    println!(
        "netswap flood scenarios (scale {s}; {})\n",
        a.store.as_deref().unwrap_or("embedded store")
    );
    run(
        bin,
        &[],
        "connection flood past the per-IP limit (256)",
        |addr| connection_flood(addr, n(3000.0)),
    )
    .await;
    let conns = n(3000.0);
    run(
        bin,
        &["--stall-timeout", "3"],
        "half-sent frames and 64 MiB promises, then silence",
        move |addr| half_frames(addr, conns, 64 << 20, Duration::from_secs(30)),
    )
    .await;
    let clients = n(40.0);
    run(
        bin,
        &["--max-output-bytes", "1048576"],
        "clients asking for large reads and reading nothing",
        move |addr| non_readers(addr, clients, 4 << 20, 500, Duration::from_secs(5)),
    )
    .await;
    let records = n(16.0);
    run(
        bin,
        &["--max-output-bytes", "1048576"],
        "clients starting data watches on large records and reading nothing",
        move |addr| data_watch_non_readers(addr, clients, 4 << 20, records, Duration::from_secs(5)),
    )
    .await;
    let secs = 10.0 * s;
    run(
        bin,
        &["--max-message-bytes", "4000", "--max-record-bytes", "3984"],
        "malformed and over-the-limit messages at full rate",
        move |addr| garbage_rate(addr, 8, Duration::from_secs_f64(secs)),
    )
    .await;
    run(
        bin,
        &["--quota-records", "20000"],
        "one identity exhausting its quota",
        |addr| quota_exhaustion(addr, 20000),
    )
    .await;
    let changes = n(10_000.0);
    run(
        bin,
        &[],
        "a burst of changes pipelined in one write, to a watcher that reads",
        move |addr| watch_burst(addr, changes),
    )
    .await;
    let changes = n(1_000_000.0);
    run(
        bin,
        &["--notify-queue", "64"],
        "a watcher that never reads (4 KiB receive buffer) while its record changes",
        move |addr| stuck_watcher(addr, changes),
    )
    .await;
    run(
        bin,
        &[
            "--stall-timeout",
            "2",
            "--max-total-partial-bytes",
            "4194304",
            "--max-partial-bytes-per-ip",
            "4194304",
        ],
        "two clients holding 1 MiB promises open with keepalive HELLOs",
        |addr| keepalive_pinning(addr, 2, 1 << 20, Duration::from_secs(2)),
    )
    .await;
    let cycles = n(60_000.0);
    run(
        bin,
        &[],
        "TRANSFER to made-up identities, TAKEOVER back, SET_ACCESS",
        move |addr| transfer_cycles(addr, cycles),
    )
    .await;
    let guesses = n(2_000_000.0);
    run(
        bin,
        &[],
        "pointer scanning at full rate (default --max-misses-per-second 1000)",
        move |addr| pointer_scan(addr, guesses),
    )
    .await;
    run(
        bin,
        &["--max-misses-per-second", "0"],
        "pointer scanning at full rate, throttle off (for comparison)",
        move |addr| pointer_scan(addr, guesses),
    )
    .await;
}
