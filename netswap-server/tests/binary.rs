//! The `netswap-server` binary: it prints where it listens, takes its settings from
//! flags or environment variables, refuses bad ones, and exits cleanly on SIGTERM and
//! SIGINT.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::Raw;
use netswap_proto::{Reply, Request};

fn start(args: &[&str], env: &[(&str, &str)]) -> (Child, SocketAddr) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_netswap-server"));
    cmd.args(["--listen", "127.0.0.1:0"]).args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the binary starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("netswap-server listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .parse()
        .unwrap();
    (child, addr)
}

fn signal_and_wait(child: &mut Child, signal: &str) -> std::process::ExitStatus {
    let status = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn prints_its_address_serves_and_stops_on_sigterm() {
    let (mut child, addr) = start(&[], &[("NETSWAP_ORPHAN_GRACE", "7")]);
    let mut c = Raw::connect(addr, 2).await;
    let Reply::Hello(h) = c.ask(Request::Hello).await else {
        panic!()
    };
    assert_eq!(
        h.orphan_grace_secs, 7,
        "settings come from the environment too"
    );
    let status = signal_and_wait(&mut child, "-TERM");
    assert!(status.success(), "{status:?}");
    assert!(
        c.until_closed().await.is_empty(),
        "the connection is closed"
    );
}

#[tokio::test]
async fn stops_on_sigint() {
    let (mut child, addr) = start(&["--orphan-grace", "9", "--threads", "1"], &[]);
    let mut c = Raw::connect(addr, 2).await;
    let Reply::Hello(h) = c.ask(Request::Hello).await else {
        panic!()
    };
    assert_eq!(h.orphan_grace_secs, 9);
    assert!(signal_and_wait(&mut child, "-INT").success());
}

#[test]
fn refuses_bad_settings_with_a_clear_message() {
    let out = Command::new(env!("CARGO_BIN_EXE_netswap-server"))
        .args(["--max-record-bytes", "100000000"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--max-record-bytes"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_netswap-server"))
        .args(["--quota-records", "lots"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

/// A supervisor may stop the server the moment it says it listens: the signal
/// handlers are in place by then, so SIGTERM is a clean stop (exit 0), never the
/// signal's default action. Sent from this process at once (no `kill` command in
/// between), many times, as the window before was a few microseconds wide.
#[cfg(target_os = "linux")]
#[test]
fn a_sigterm_right_after_the_listening_line_is_a_clean_stop() {
    for round in 0..40 {
        let (mut child, _) = start(&[], &[]);
        // SAFETY: kill takes a pid and a signal number, no pointers.
        assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
        let status = child.wait().unwrap();
        assert!(status.success(), "round {round}: {status:?}");
    }
}

/// The `THP_enabled` line of a process's status (Linux 5.0 and later), if any.
fn thp_enabled(pid: u32) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("THP_enabled:"))
        .map(|v| v.trim().to_string())
}

#[test]
fn turns_transparent_huge_pages_off_for_itself_unless_told_not_to() {
    let (mut child, _) = start(&[], &[]);
    let pid = child.id();
    let Some(default) = thp_enabled(pid) else {
        // Not Linux, or a kernel without the field: nothing to check.
        child.kill().unwrap();
        child.wait().unwrap();
        return;
    };
    assert!(signal_and_wait(&mut child, "-TERM").success());
    assert_eq!(default, "0", "off by default (PR_SET_THP_DISABLE)");
    for (args, env) in [
        (&["--disable-thp", "false"][..], &[][..]),
        (&[][..], &[("NETSWAP_DISABLE_THP", "false")][..]),
    ] {
        let (mut child, _) = start(args, env);
        let enabled = thp_enabled(child.id());
        assert!(signal_and_wait(&mut child, "-TERM").success());
        // As this process has it (1 unless something above it turned THP off).
        assert_eq!(
            enabled,
            thp_enabled(std::process::id()),
            "left to the system with {args:?} {env:?}"
        );
    }
    // "The system's setting" includes a parent's choice (the flag is inherited): with
    // THP already off for this process, `false` leaves it off in the server. (The
    // other tests of this binary do not look at THP.)
    let before = netswap_server::set_transparent_huge_pages_disabled(true).unwrap();
    let (mut child, _) = start(&["--disable-thp", "false"], &[]);
    let inherited = thp_enabled(child.id());
    netswap_server::set_transparent_huge_pages_disabled(before).unwrap();
    // Stopped before the check, so that a failure leaves no server behind.
    assert!(signal_and_wait(&mut child, "-TERM").success());
    assert_eq!(inherited.as_deref(), Some("0"), "a parent's choice is kept");
}

#[test]
fn help_states_every_flag_and_its_default() {
    let out = Command::new(env!("CARGO_BIN_EXE_netswap-server"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--listen",
        "--orphan-grace",
        "--max-record-bytes",
        "--max-message-bytes",
        "--max-connections-per-ip",
        "--quota-records",
        "--quota-bytes",
        "--idle-timeout",
        "--identity-key",
        "--disable-thp",
        "NETSWAP_LISTEN",
        "[default: 127.0.0.1:7420]",
        "[default: 300]",
        "[default: 256]",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
}

#[tokio::test]
async fn an_identity_key_file_keeps_identities_across_restarts() {
    let path = std::env::temp_dir().join(format!("netswap-test-key-{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let key = path.to_str().unwrap();
    let mut ids = Vec::new();
    for _ in 0..2 {
        let (mut child, addr) = start(&["--identity-key", key], &[]);
        let mut c = Raw::connect(addr, 2).await;
        let Reply::Hello(h) = c.ask(Request::Hello).await else {
            panic!()
        };
        ids.push(h.identity);
        assert!(signal_and_wait(&mut child, "-TERM").success());
    }
    assert_eq!(ids[0], ids[1]);
    assert_eq!(std::fs::read(&path).unwrap().len(), 32);
    std::fs::remove_file(&path).unwrap();
    // Without a key file, each start has its own key.
    let (mut child, addr) = start(&[], &[]);
    let Reply::Hello(h) = Raw::connect(addr, 2).await.ask(Request::Hello).await else {
        panic!()
    };
    assert_ne!(h.identity, ids[0]);
    signal_and_wait(&mut child, "-TERM");
}
