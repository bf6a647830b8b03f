//! `netswap-bench load` against a real server: what it reports, including the CPU
//! time per operation of the server (`--server-pid`) and of the load generator, which
//! say which of the two bounds a rate when they share a machine (docs/BENCHMARKS.md).

use netswap_server::ServerConfig;

mod common;
use common::{bench, json};

fn load(server: std::net::SocketAddr, server_pid: Option<u32>) -> serde_json::Value {
    let server = server.to_string();
    let pid = server_pid.map(|p| p.to_string());
    let mut args = vec!["-s", &server, "--json"];
    if let Some(pid) = &pid {
        args.extend(["--server-pid", pid]);
    }
    args.extend([
        "load", "--op", "replace", "-d", "64", "-c", "4", "-P", "8", "--keys", "100", "-n", "40000",
    ]);
    json(&bench(&args))
}

#[test]
fn load_reports_the_cpu_each_side_spent_per_operation() {
    // The server runs in this process, so its process id is ours.
    let srv = netswap_server::spawn(ServerConfig::new("127.0.0.1:0".parse().unwrap()), 1).unwrap();
    let cpus = std::thread::available_parallelism().unwrap().get() as f64;
    let r = load(srv.addr(), Some(std::process::id()));
    assert_eq!(r["ops"], 40_000, "{r}");
    assert_eq!(r["errors"], 0, "{r}");
    for side in ["server", "client"] {
        let us = r[format!("{side}_cpu_us_per_op")].as_f64().unwrap();
        let cores = r[format!("{side}_cores")].as_f64().unwrap();
        // A request costs some CPU on each side, far less than a millisecond, and no
        // side can use more cores than the machine has.
        assert!(us > 0.0 && us < 1_000.0, "{side}: {us} us per op: {r}");
        assert!(
            cores > 0.0 && cores <= cpus + 0.5,
            "{side}: {cores} cores: {r}"
        );
        let seconds = r["seconds"].as_f64().unwrap();
        let ops = r["ops"].as_f64().unwrap();
        assert!(
            (us * ops / 1e6 - cores * seconds).abs() < 1e-6,
            "{side}: per op and cores disagree: {r}"
        );
    }
    // Without the server's process id only the load generator's own CPU is known.
    let r = load(srv.addr(), None);
    assert!(r["server_cpu_us_per_op"].is_null(), "{r}");
    assert!(r["client_cpu_us_per_op"].as_f64().unwrap() > 0.0, "{r}");
}

/// `idle --per-address N` opens its connections from one source address per N, so a
/// server sees as many identities as addresses (1: one identity per connection).
#[test]
fn idle_connections_come_from_one_address_per_as_many_as_asked() {
    for (connections, per_address, identities) in [(120, 1, 120), (120, 50, 3)] {
        let srv =
            netswap_server::spawn(ServerConfig::new("127.0.0.1:0".parse().unwrap()), 1).unwrap();
        let server = srv.addr().to_string();
        let args = [
            "-s".to_string(),
            server,
            "--json".into(),
            "idle".into(),
            "-c".into(),
            connections.to_string(),
            "--per-address".into(),
            per_address.to_string(),
            "--hold".into(),
            "1.5".into(),
        ];
        let run = std::thread::spawn(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            json(&bench(&args))
        });
        let mut most = 0;
        let started = std::time::Instant::now();
        while !run.is_finished() && started.elapsed() < std::time::Duration::from_secs(30) {
            most = most.max(srv.stats().store().accounts);
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let r = run.join().unwrap();
        assert_eq!(r["connections"], connections, "{r}");
        assert_eq!(r["addresses"], identities, "{r}");
        assert!(r["sampled_alive"].as_u64().unwrap() > 0, "{r}");
        assert_eq!(
            most, identities,
            "identities the server saw at once with {per_address} connections per address"
        );
    }
}

/// `load --record PTR` works on an existing record instead of creating its own (so
/// load generators on several gateways can share one): every write lands on it.
#[test]
fn load_writes_the_record_it_is_given() {
    use netswap_client::{Access, blocking::Client};
    let srv = netswap_server::spawn(ServerConfig::new("127.0.0.1:0".parse().unwrap()), 1).unwrap();
    let owner = Client::connect(srv.addr()).unwrap();
    let shared = owner
        .create(Access::READ | Access::WRITE, &b"x"[..])
        .unwrap();
    let (server, ptr) = (srv.addr().to_string(), shared.to_string());
    let args = [
        "-s", &server, "--json", "load", "--op", "replace", "-c", "4", "-P", "4", "--record", &ptr,
        "-n", "2000",
    ];
    let r = json(&bench(&args));
    assert_eq!(r["ops"], 2000, "{r}");
    assert_eq!(r["errors"], 0, "{r}");
    assert_eq!(
        owner.info(shared).unwrap().version,
        2001,
        "every write on it"
    );
    assert_eq!(
        srv.stats().store().records,
        1,
        "no records of its own were made"
    );
    // A pointer that names no record: every request fails, and it says so.
    let o = bench(&[
        "-s", &server, "load", "--op", "read", "--record", "0x1234", "-n", "10",
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("10 requests failed"), "{err}");
}
