//! `soak`: hundreds of clients doing mixed operations with random disconnects for
//! minutes against a release server process; then every record must hold exactly its
//! last acknowledged bytes and version, and once every owner has gone, all records
//! must be reaped after the grace period and none before. Server RSS is sampled.
//!
//! Run: `cargo run --release -p netswap-hardening --bin soak -- --seconds 180`
//! (add `--restart-after 60` to restart the server from its snapshot mid-way; add
//! `--store redis-cluster://HOST:PORT,...` to run against a gateway on a Redis Cluster,
//! under a key prefix of its own, where a restart is the gateway's; `--gateways 2` runs
//! two gateways on that cluster, each client's connections going to one and the next in
//! turn, and `--kill-gateway-after 38` SIGKILLs one of them mid-round; `--server-arg`
//! passes further options, such as `--redis-wait-replicas 1`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use netswap_hardening::*;

/// Soak test against netswap-server.
#[derive(Parser)]
struct Args {
    /// The server binary.
    #[arg(long, default_value = "target/release/netswap-server")]
    server_bin: String,
    /// Client tasks.
    #[arg(long, default_value_t = 300)]
    clients: u32,
    /// Distinct identities (source addresses) they share.
    #[arg(long, default_value_t = 60)]
    identities: u32,
    /// Seconds of load.
    #[arg(long, default_value_t = 180)]
    seconds: u64,
    /// The server's orphan grace, seconds.
    #[arg(long, default_value_t = 10)]
    grace: u64,
    /// Rounds against the same server (each: load, verify, leave, reap): the server's
    /// memory after the second round shows whether anything accumulates.
    #[arg(long, default_value_t = 2)]
    rounds: u32,
    /// Restart the server (SIGTERM, then start it again on the same port from its
    /// snapshot, `--data-dir`) this many seconds into the first round; 0 = never.
    #[arg(long, default_value_t = 0)]
    restart_after: u64,
    /// Run against a gateway on this Redis Cluster (`redis-cluster://HOST:PORT,...`)
    /// instead of the embedded store.
    #[arg(long)]
    store: Option<String>,
    /// Gateways on the cluster of `--store`, sharing its key prefix and identity key:
    /// the clients' connections go to each in turn.
    #[arg(long, default_value_t = 1)]
    gateways: usize,
    /// SIGKILL the last gateway this many seconds into the first round and start it
    /// again on the same port 3 s later (needs `--gateways 2` or more); 0 = never.
    #[arg(long, default_value_t = 0)]
    kill_gateway_after: u64,
    /// Records written through one gateway and followed through the next (half by
    /// mirrors, half by watches), beside the soak's clients: every follower must reach
    /// its record's last state.
    #[arg(long, default_value_t = 0)]
    mirrors: u32,
    /// Records each written by `HOT_WRITERS` clients at once through every server
    /// (on a gateway, writes of one record that queue together are committed
    /// together): no two writes may get one version, and each record must end with a
    /// write acknowledged at its version.
    #[arg(long, default_value_t = 0)]
    hot: u32,
    /// One more option for the server (repeat for several), e.g.
    /// `--server-arg=--redis-wait-replicas --server-arg=1`.
    #[arg(long, allow_hyphen_values = true)]
    server_arg: Vec<String>,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let a = Args::parse();
    // Removed when dropped: at the end, and when the soak panics.
    let dir_guard = tempfile::Builder::new()
        .prefix("netswap-soak-")
        .tempdir()
        .expect("a data directory");
    let data = dir_guard.path().to_path_buf();
    let grace = a.grace.to_string();
    let dir = data.join("data").display().to_string();
    let key = data.join("identity.key").display().to_string();
    // The final check asks about every record after they are reaped: hundreds of
    // thousands of lookups of pointers that are gone, which the miss throttle would
    // (rightly) slow to 1,000 a second.
    let prefix = format!("soak{}", std::process::id());
    let mut flags = vec![
        "--orphan-grace",
        grace.as_str(),
        "--max-misses-per-second",
        "0",
    ];
    if let Some(url) = &a.store {
        std::fs::write(&key, rand::random::<[u8; 32]>()).expect("identity key file");
        flags.extend([
            "--store",
            url.as_str(),
            "--identity-key",
            &key,
            "--redis-prefix",
            &prefix,
        ]);
    } else if a.restart_after > 0 {
        flags.extend([
            "--data-dir",
            &dir,
            "--identity-key",
            &key,
            "--snapshot-interval",
            "0",
        ]);
    }
    flags.extend(a.server_arg.iter().map(String::as_str));
    let flags: Vec<String> = flags.iter().map(|s| s.to_string()).collect();
    let args: Vec<&str> = flags.iter().map(String::as_str).collect();
    assert!(
        a.gateways == 1 || a.store.is_some(),
        "--gateways needs --store (gateways on one Redis Cluster)"
    );
    assert!(
        a.kill_gateway_after == 0 || a.gateways > 1,
        "--kill-gateway-after needs --gateways 2 or more (its clients move to the others)"
    );
    let servers: Vec<Arc<Mutex<Option<ServerProcess>>>> = (0..a.gateways)
        .map(|_| Arc::new(Mutex::new(Some(ServerProcess::start(&a.server_bin, &args)))))
        .collect();
    let addrs: Vec<SocketAddr> = servers
        .iter()
        .map(|s| s.lock().unwrap().as_ref().expect("started").addr)
        .collect();
    let addr = addrs[0];
    let pid = Arc::new(AtomicU32::new(
        servers[0].lock().unwrap().as_ref().expect("started").pid(),
    ));
    let sampled = pid.clone();
    let done = Arc::new(AtomicBool::new(false));
    let finished = done.clone();
    let sampler = std::thread::spawn(move || {
        let mut samples = Vec::new();
        let start = Instant::now();
        while !finished.load(Ordering::Relaxed) {
            samples.push((
                start.elapsed().as_secs(),
                rss_kib(sampled.load(Ordering::Relaxed)),
            ));
            std::thread::sleep(Duration::from_secs(1));
        }
        samples
    });
    let restart = |slot: Arc<Mutex<Option<ServerProcess>>>,
                   pid: Option<Arc<AtomicU32>>,
                   after: u64,
                   kill: bool| {
        let (flags, bin) = (flags.clone(), a.server_bin.clone());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(after)).await;
            let old = slot.lock().unwrap().take().expect("running");
            let addr = old.addr;
            let t = Instant::now();
            let how = if kill {
                tokio::task::spawn_blocking(move || old.kill())
                    .await
                    .unwrap();
                // Its clients find it gone and connect to the other gateways; it stays
                // away for a moment before it is started again.
                tokio::time::sleep(Duration::from_secs(3)).await;
                "SIGKILLed the gateway on".to_string()
            } else {
                let clean = tokio::task::spawn_blocking(move || old.terminate())
                    .await
                    .unwrap();
                format!("restarted the server (clean exit with a snapshot: {clean}) on")
            };
            let next = tokio::task::spawn_blocking(move || {
                let args: Vec<&str> = flags.iter().map(String::as_str).collect();
                ServerProcess::start_at(&bin, addr, &args)
            })
            .await
            .unwrap();
            if let Some(pid) = pid {
                pid.store(next.pid(), Ordering::Relaxed);
            }
            println!(
                "  {how} {addr} {after} s into round 1; serving again after {:.2} s",
                t.elapsed().as_secs_f64()
            );
            *slot.lock().unwrap() = Some(next);
        });
    };
    if a.restart_after > 0 {
        restart(
            servers[0].clone(),
            Some(pid.clone()),
            a.restart_after,
            false,
        );
    }
    if a.kill_gateway_after > 0 {
        let last = servers.last().expect("gateways").clone();
        restart(last, None, a.kill_gateway_after, true);
    }
    println!(
        "soak: {} clients over {} identities for {} s, orphan grace {} s, {}",
        a.clients,
        a.identities,
        a.seconds,
        a.grace,
        match &a.store {
            Some(store) => format!("{} gateway(s) on {store}", a.gateways),
            None => "embedded store".to_string(),
        }
    );
    let mut ok = true;
    let mut after_rounds = Vec::new();
    for round in 1..=a.rounds {
        let started = Instant::now();
        let dur = Duration::from_secs(a.seconds);
        let (mut result, mut mirrors, mut hot) = tokio::join!(
            soak(&addrs, a.clients, a.identities, dur),
            mirror_soak(&addrs, a.mirrors, dur),
            hot_soak(&addrs, a.hot, dur)
        );
        // Every owner leaves at once.
        result.leave();
        mirrors.leave();
        hot.leave();
        let took = started.elapsed().as_secs_f64();
        println!(
            "round {round}: {} operations ({:.0}/s), {} deliberate disconnects, {} writes of unknown outcome (reply lost in a restart, or BUSY from a gateway; each found old or new), {} records verified, {} mismatches",
            result.ops,
            result.ops as f64 / took,
            result.reconnects,
            result.unknown_outcomes,
            result.checked,
            result.mismatches.len()
        );
        for m in result.mismatches.iter().take(10) {
            println!("  MISMATCH {m}");
        }
        if a.mirrors > 0 {
            println!("  {}", mirrors.summary());
            // Their records are orphans now too: reaped with the others.
            result.records.extend(mirrors.pairs.iter().map(|p| p.ptr));
        }
        if a.hot > 0 {
            println!("  {}", hot.summary());
            result.records.extend(&hot.records);
        }
        let alive = count_alive(addr, &result.records).await;
        println!(
            "  all owners left at once: {alive} of {} records alive within the grace period",
            result.records.len()
        );
        let left = Instant::now();
        tokio::time::sleep(Duration::from_secs(a.grace + 2)).await;
        let mut after = count_alive(addr, &result.records).await;
        println!(
            "  {} s later: {after} records alive (all should be reaped)",
            a.grace + 2
        );
        if a.store.is_some() {
            // A gateway's reaper deletes through Redis, tens of thousands a second:
            // how long after the grace the last one went.
            while after > 0 && left.elapsed() < Duration::from_secs(a.grace + 60) {
                tokio::time::sleep(Duration::from_secs(1)).await;
                after = count_alive(addr, &result.records).await;
            }
            println!(
                "  {after} records alive {:.0} s after the owners left (grace {} s)",
                left.elapsed().as_secs_f64(),
                a.grace
            );
        }
        ok &= mirrors.ok()
            && hot.mismatches.is_empty()
            && result.mismatches.is_empty()
            && alive == result.records.len()
            && after == 0;
        after_rounds.push(rss_kib(pid.load(Ordering::Relaxed)) / 1024);
    }
    let rss_end = rss_kib(pid.load(Ordering::Relaxed));
    // SIGTERM: a gateway logs what it counted as it stops (its read cache's hits).
    for s in &servers {
        if let Some(server) = s.lock().unwrap().take() {
            server.terminate();
        }
    }
    done.store(true, Ordering::Relaxed);
    let samples = sampler.join().unwrap();
    drop(dir_guard);
    let max = samples.iter().map(|s| s.1).max().unwrap_or(0);
    let at = |t: u64| samples.iter().find(|s| s.0 >= t).map_or(0, |s| s.1) / 1024;
    println!(
        "server RSS: {} MiB at 10 s, {} MiB at half of round 1, peak {} MiB; after each round's reaping: {:?} MiB; at the end {} MiB",
        at(10),
        at(a.seconds / 2),
        max / 1024,
        after_rounds,
        rss_end / 1024
    );
    println!(
        "verdict: {}",
        if ok {
            "nothing lost, nothing left behind"
        } else {
            "FAILED"
        }
    );
    std::process::exit(if ok { 0 } else { 1 });
}
