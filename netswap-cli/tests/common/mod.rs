//! Helpers shared by the `netswap-bench` tests.

use std::process::{Command, Output};

/// Runs `netswap-bench` with `args` and returns what it did.
pub fn bench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_netswap-bench"))
        .args(args)
        .output()
        .unwrap()
}

/// The JSON object a successful `netswap-bench --json` run printed.
pub fn json(o: &Output) -> serde_json::Value {
    assert!(
        o.status.success(),
        "exit {:?}: {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}
