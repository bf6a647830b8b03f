//! Compiles `tests/c/test_netswap.c` with the system C compiler against
//! `include/netswap.h` and the freshly built `libnetswap`, and runs it against a real
//! server — once plainly and once under valgrind (no leaks, no invalid accesses).

use std::path::{Path, PathBuf};
use std::process::Command;

use netswap_server::ServerConfig;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `target/<profile>`, where cargo put libnetswap.so next to this test's `deps/`.
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

/// `cargo test` builds this crate as an rlib only: build the C library (the cdylib)
/// the C program links against, if it is not there yet.
fn ensure_library() {
    if lib_dir().join("libnetswap.so").exists() {
        return;
    }
    let profile = lib_dir()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(["build", "-p", "netswap-ffi", "--lib"]);
    if profile == "release" {
        cmd.arg("--release");
    }
    let status = cmd.status().expect("cargo runs");
    assert!(status.success(), "cargo build -p netswap-ffi failed");
    assert!(
        lib_dir().join("libnetswap.so").exists(),
        "libnetswap.so not found in {:?}",
        lib_dir()
    );
}

fn build(name: &str, extra: &[&str]) -> PathBuf {
    ensure_library();
    let out = lib_dir().join(name);
    let lib = lib_dir();
    let status = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()))
        .arg(root().join("tests/c/test_netswap.c"))
        .args([
            "-std=c11",
            "-D_POSIX_C_SOURCE=200809L",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-g",
        ])
        .args(extra)
        .arg("-I")
        .arg(root().join("include"))
        .arg("-L")
        .arg(&lib)
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .args(["-lnetswap", "-lpthread", "-o"])
        .arg(&out)
        .status()
        .expect("a C compiler (cc) is installed");
    assert!(status.success(), "the C test does not compile");
    out
}

fn run(prefix: &[&str], exe: &Path) {
    let server =
        netswap_server::spawn(ServerConfig::new("127.0.0.1:0".parse().unwrap()), 1).unwrap();
    let mut cmd = match prefix.split_first() {
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg(exe);
            c
        }
        None => Command::new(exe),
    };
    let out = cmd
        .arg(server.addr().to_string())
        .arg(root().join("tests/vectors/requests.json"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    assert!(out.status.success(), "C tests failed ({:?})", out.status);
    assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
    server.stop().unwrap();
}

#[test]
fn c_program_against_a_real_server() {
    let exe = build("test_netswap_c", &[]);
    run(&[], &exe);
}

#[test]
fn c_program_under_valgrind() {
    if Command::new("valgrind").arg("--version").output().is_err() {
        eprintln!("valgrind is not installed; skipped");
        return;
    }
    let exe = build("test_netswap_c_vg", &["-O0"]);
    run(
        &[
            "valgrind",
            "-q",
            "--leak-check=full",
            "--errors-for-leak-kinds=definite",
            "--error-exitcode=9",
        ],
        &exe,
    );
}
