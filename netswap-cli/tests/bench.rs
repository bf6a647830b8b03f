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
