//! The fast adversarial scenarios, run by the test command against an in-process
//! server. They assert on what the server reports (connections, bytes held for
//! unfinished messages, records) and on a well-behaved client served meanwhile.
//! The long versions, with the server's RSS sampled, are the `flood` and `soak`
//! binaries (docs/RELIABILITY.md).

use std::time::Duration;

use netswap_hardening::*;
use netswap_server::{RunningServer, ServerConfig};

fn server(tweak: impl FnOnce(&mut ServerConfig)) -> RunningServer {
    let mut c = ServerConfig::new("127.0.0.1:0".parse().unwrap());
    tweak(&mut c);
    netswap_server::spawn(c, 2).unwrap()
}

fn probe_ok(r: &Report) {
    assert_eq!(r.probe.failures, 0, "{r}");
    assert!(r.probe.calls > 0, "{r}");
    assert!(
        r.probe.p99_us < 250_000.0,
        "well-behaved client slowed to {r}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_flood_is_refused_cleanly() {
    let srv = server(|c| c.max_connections_per_ip = 20);
    let r = with_probe(srv.addr(), "connection flood", || {
        connection_flood(srv.addr(), 300)
    })
    .await;
    println!("{r}");
    assert_eq!(r.refused, 280, "{r}");
    probe_ok(&r);
    srv.stop().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_partial_frames_are_cut_off_and_memory_returned() {
    let srv = server(|c| {
        c.stall_timeout = Duration::from_secs(1);
        c.max_total_partial_bytes = 64 << 20;
    });
    let stats = srv.stats().clone();
    let r = with_probe(srv.addr(), "half frames", || {
        half_frames(srv.addr(), 150, 8 << 20, Duration::from_secs(10))
    })
    .await;
    println!("{r}");
    assert_eq!(
        r.refused, r.attempts,
        "every stalled connection is cut off: {r}"
    );
    assert_eq!(stats.partial_bytes(), 0, "nothing held for dead messages");
    probe_ok(&r);
    srv.stop().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_never_read_do_not_stop_others() {
    let srv = server(|c| c.max_output_bytes = 256 * 1024);
    let r = with_probe(srv.addr(), "non-readers", || {
        non_readers(srv.addr(), 10, 1 << 20, 200, Duration::from_secs(1))
    })
    .await;
    println!("{r}");
    probe_ok(&r);
    srv.stop().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_watchers_that_never_read_do_not_stop_others() {
    let srv = server(|c| c.max_output_bytes = 256 * 1024);
    let r = with_probe(srv.addr(), "data-watch non-readers", || {
        data_watch_non_readers(srv.addr(), 10, 1 << 20, 8, Duration::from_secs(1))
    })
    .await;
    println!("{r}");
    probe_ok(&r);
    srv.stop().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_at_high_rate() {
    let srv = server(|c| {
        c.store.max_message_bytes = 4000;
        c.reassembly.max_message_bytes = 4000;
    });
    let r = with_probe(srv.addr(), "garbage", || {
        garbage_rate(srv.addr(), 4, Duration::from_secs(2))
    })
    .await;
    println!("{r}");
    assert!(r.attempts > 1000, "{r}");
    assert_eq!(r.refused, r.attempts, "every bad request answered: {r}");
    probe_ok(&r);
    srv.stop().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_exhaustion_affects_only_that_identity() {
    let srv = server(|c| c.store.quota_records = 500);
    let r = with_probe(srv.addr(), "quota", || quota_exhaustion(srv.addr(), 500)).await;
    println!("{r}");
    assert_eq!(r.refused, 100, "{r}");
    assert!(r.notes[0].ends_with("true"), "{r}");
    probe_ok(&r);
    srv.stop().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_soak_loses_nothing_and_reaps_orphans() {
    let srv = server(|c| {
        c.store.orphan_grace = Duration::from_secs(2);
        // The last check asks about every record once they are reaped.
        c.max_misses_per_second = 0;
    });
    let addrs = [srv.addr()];
    let (mut result, mut mirrors, mut hot) = tokio::join!(
        soak(&addrs, 40, 10, Duration::from_secs(4)),
        mirror_soak(&addrs, 8, Duration::from_secs(4)),
        hot_soak(&addrs, 2, Duration::from_secs(4))
    );
    result.leave();
    mirrors.leave();
    hot.leave();
    result.records.extend(mirrors.pairs.iter().map(|p| p.ptr));
    result.records.extend(&hot.records);
    println!("{}", mirrors.summary());
    assert!(mirrors.ok(), "{}", mirrors.summary());
    println!("{}", hot.summary());
    assert!(
        hot.mismatches.is_empty() && hot.acknowledged > 100,
        "{}",
        hot.summary()
    );
    println!(
        "ops {} reconnects {} checked {} mismatches {:?}",
        result.ops, result.reconnects, result.checked, result.mismatches
    );
    assert!(result.mismatches.is_empty(), "{:?}", result.mismatches);
    assert!(result.ops > 1000 && result.reconnects > 10);
    assert!(result.checked > 0);
    // Every owner has left: within the grace the records live, after it they are gone.
    assert_eq!(
        count_alive(srv.addr(), &result.records).await,
        result.records.len()
    );
    // The grace is 2 s from each owner's last disconnect; the reaper may run a little
    // later on a loaded machine, so poll (with a bound) instead of one fixed moment.
    let left = std::time::Instant::now();
    let mut alive = result.records.len();
    while alive > 0 && left.elapsed() < Duration::from_secs(15) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        alive = count_alive(srv.addr(), &result.records).await;
    }
    assert_eq!(alive, 0, "reaped after the grace");
    assert_eq!(srv.stats().store().records, 0);
    srv.stop().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_soak_with_a_restart_in_the_middle_loses_nothing() {
    // The embedded store with snapshots: stopped cleanly (a snapshot after the last
    // reply) and started again on the same port while the soak runs.
    let dir = std::env::temp_dir().join(format!("netswap-soak-restart-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let data = dir.clone();
    let config = move |listen: std::net::SocketAddr| {
        let mut c = ServerConfig::new(listen);
        c.store.orphan_grace = Duration::from_secs(30);
        c.data_dir = Some(data.clone());
        c.identity_key = netswap_proto::IdentityKey::new(*b"soak restart key");
        c
    };
    let first = netswap_server::spawn(config("127.0.0.1:0".parse().unwrap()), 2).unwrap();
    let addr = first.addr();
    let restart = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(2)).await;
        tokio::task::spawn_blocking(move || {
            first.stop().unwrap();
            netswap_server::spawn(config(addr), 2).unwrap()
        })
        .await
        .unwrap()
    });
    let mut result = soak(&[addr], 40, 10, Duration::from_secs(5)).await;
    result.leave();
    let second = restart.await.unwrap();
    println!(
        "ops {} reconnects {} unknown outcomes {} checked {} mismatches {:?}",
        result.ops, result.reconnects, result.unknown_outcomes, result.checked, result.mismatches
    );
    assert!(result.mismatches.is_empty(), "{:?}", result.mismatches);
    assert!(result.checked > 100, "{}", result.checked);
    assert_eq!(
        count_alive(addr, &result.records).await,
        result.records.len(),
        "every acknowledged record survived the restart"
    );
    second.stop().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_changes_reaches_a_prompt_watcher_whole() {
    let srv = server(|_| {});
    let r = with_probe(srv.addr(), "watch burst", || {
        watch_burst(srv.addr(), 10_000)
    })
    .await;
    println!("{r}");
    assert_eq!(r.refused, 0, "the watcher was disconnected: {r}");
    assert!(r.notes[0].starts_with("10000 NOTIFYs"), "{r}");
    probe_ok(&r);
    srv.stop().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_that_reads_nothing_gets_merged_notifications() {
    let srv = server(|c| c.notify_queue = 64);
    let stats = srv.stats().clone();
    let r = with_probe(srv.addr(), "stuck watcher", || {
        stuck_watcher(srv.addr(), 200_000)
    })
    .await;
    println!("{r}");
    assert!(r.notes[0].contains("still connected"), "{r}");
    assert!(r.notes[0].contains("last version 200001"), "{r}");
    assert!(stats.notifications_merged() > 0, "{r}");
    assert!(stats.notifications_waiting() <= 65);
    probe_ok(&r);
    srv.stop().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalives_do_not_pin_the_partial_budget() {
    let srv = server(|c| {
        c.stall_timeout = Duration::from_secs(2);
        c.max_total_partial_bytes = 4 << 20;
        c.max_partial_bytes_per_ip = 4 << 20;
    });
    let r = with_probe(srv.addr(), "keepalive pinning", || {
        keepalive_pinning(srv.addr(), 2, 1 << 20, Duration::from_secs(2))
    })
    .await;
    println!("{r}");
    assert!(r.notes[0].contains("after the stall timeout: OK"), "{r}");
    assert_eq!(r.refused, 2, "both holders cut off: {r}");
    assert_eq!(srv.stats().partial_bytes(), 0);
    probe_ok(&r);
    srv.stop().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_cycles_leave_no_accounts_behind() {
    let srv = server(|_| {});
    let stats = srv.stats().clone();
    let r = with_probe(srv.addr(), "transfer cycles", || {
        transfer_cycles(srv.addr(), 2_000)
    })
    .await;
    println!("{r}");
    assert_eq!(r.refused, 0, "{r}");
    // The cycling client, the probe: nothing else is remembered.
    assert_eq!(stats.store().accounts, 2, "{:?}", stats.store());
    probe_ok(&r);
    srv.stop().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pointer_scanning_is_throttled() {
    let srv = server(|c| c.max_misses_per_second = 1000);
    let r = with_probe(srv.addr(), "pointer scan", || {
        pointer_scan(srv.addr(), 20_000)
    })
    .await;
    println!("{r}");
    // A burst of 1,000, then 1,000 a second.
    let answered = r.attempts - r.refused;
    assert!(
        answered as f64 <= 1000.0 * (r.seconds + 1.0) + 10.0,
        "{answered} misses answered in {:.1} s: {r}",
        r.seconds
    );
    assert!(r.refused > 10_000, "{r}");
    probe_ok(&r);
    srv.stop().unwrap();
}
