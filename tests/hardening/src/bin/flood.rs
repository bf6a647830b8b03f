//! `flood`: every adversarial scenario at scale, each against a fresh release server
//! process whose resident memory is sampled every 100 ms. Bounded: each scenario
//! stops by itself; loopback only. Figures go to docs/RELIABILITY.md.
//!
//! Run: `cargo run --release -p netswap-hardening --bin flood`

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
}

async fn run<F, Fut>(bin: &str, args: &[&str], name: &str, attack: F)
where
    F: FnOnce(SocketAddr) -> Fut,
    Fut: std::future::Future<Output = Report>,
{
    let srv = ServerProcess::start(bin, args);
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
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let a = Args::parse();
    let s = a.scale;
    let n = |x: f64| (x * s).max(1.0) as u32;
    let bin = a.server_bin.as_str();
    println!("netswap flood scenarios (scale {s})\n");
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
