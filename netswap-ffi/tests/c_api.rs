//! Compiles `tests/c/test_netswap.c` with the system C compiler against
//! `include/netswap.h` and the freshly built `libnetswap`, and runs it against a real
//! server — once plainly and once under valgrind (no leaks, no invalid accesses).

use std::path::{Path, PathBuf};
use std::process::Command;

use netswap_server::ServerConfig;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Where the C library is taken from: `target/<profile>/deps`, where this test binary
/// is. Cargo builds this crate's every crate type there, the cdylib too, in the same
/// `rustc` run as the rlib this test links, so that one always has the sources under
/// test. The copy in `target/<profile>` is only refreshed by `cargo build`: a plain
/// `cargo test` after a change would have tested the old one.
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().to_path_buf()
}

/// `target/<profile>`, where the C test programs go.
fn profile_dir() -> PathBuf {
    lib_dir().parent().unwrap().to_path_buf()
}

/// Builds the C library if cargo did not (see [`lib_dir`]).
fn ensure_library() {
    if lib_dir().join("libnetswap.so").exists() {
        return;
    }
    let profile = profile_dir()
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
    build_from("test_netswap.c", name, extra)
}

fn build_from(source: &str, name: &str, extra: &[&str]) -> PathBuf {
    ensure_library();
    let out = profile_dir().join(name);
    let lib = lib_dir();
    let status = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()))
        .arg(root().join("tests/c").join(source))
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

/// A command that runs a C test (or valgrind on one) with the library of
/// [`lib_dir`]: cargo runs tests with an `LD_LIBRARY_PATH` that names
/// `target/<profile>`, and `LD_LIBRARY_PATH` wins over the program's run path.
fn c_command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new(program);
    c.env("LD_LIBRARY_PATH", lib_dir());
    c
}

fn run(prefix: &[&str], exe: &Path) {
    let server =
        netswap_server::spawn(ServerConfig::new("127.0.0.1:0".parse().unwrap()), 1).unwrap();
    let mut cmd = match prefix.split_first() {
        Some((program, args)) => {
            let mut c = c_command(program);
            c.args(args).arg(exe);
            c
        }
        None => c_command(exe),
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

/// A server that answers HELLO on each connection, then reads and never answers.
fn silent_server() -> std::net::SocketAddr {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            std::thread::spawn(move || {
                let mut buf = bytes::BytesMut::new();
                let mut chunk = [0u8; 4096];
                let frame = loop {
                    if let Some(f) = netswap_proto::decode_frame(&mut buf).unwrap() {
                        break f;
                    }
                    match s.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                };
                let hello = netswap_proto::Reply::Hello(netswap_proto::HelloInfo {
                    protocol: 1,
                    max_record_bytes: 1 << 20,
                    max_message_bytes: 1 << 20,
                    orphan_grace_secs: 1,
                    identity: netswap_proto::Identity([1; 32]),
                })
                .encode(frame.header.xid);
                let mut q = netswap_proto::OutQueue::new();
                q.push(hello).unwrap();
                let mut out = bytes::BytesMut::new();
                q.write_to(&mut out, usize::MAX);
                let _ = s.write_all(&out);
                while matches!(s.read(&mut chunk), Ok(n) if n > 0) {}
            });
        }
    });
    addr
}

/// The C resilience program: the harness restarts the server under it (changing the
/// record it watches and mirrors while it is away) and gives it a silent server for
/// deadlines and cancellation.
#[test]
fn c_program_survives_a_server_restart_with_deadlines_and_cancellation() {
    use std::io::{BufRead, BufReader, Write};
    let exe = build_from("test_resilience.c", "test_resilience_c", &[]);
    let dir = std::env::temp_dir().join(format!("netswap-ffi-restart-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = |port: u16| {
        let mut c = ServerConfig::new(format!("127.0.0.1:{port}").parse().unwrap());
        c.data_dir = Some(dir.clone());
        c.snapshot_interval = None;
        c.identity_key = netswap_proto::IdentityKey::new(*b"c resilience test key");
        c
    };
    let server = netswap_server::spawn(config(port), 1).unwrap();
    let silent = silent_server();
    let mut child = c_command(&exe)
        .arg(server.addr().to_string())
        .arg(silent.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let ptr: netswap_client::Pointer = line
        .trim()
        .strip_prefix("ready ")
        .unwrap_or_else(|| panic!("{line:?}"))
        .parse()
        .unwrap();
    // Down (a snapshot is written at the stop); another server on the same data
    // changes the record; then back on the same port.
    server.stop().unwrap();
    let meanwhile = netswap_server::spawn(config(0), 1).unwrap();
    let writer = netswap_client::blocking::Client::connect_with(
        meanwhile.addr(),
        netswap_client::Options {
            local_addr: Some("127.0.0.3".parse().unwrap()),
            ..Default::default()
        },
    )
    .unwrap();
    let version = writer.replace(ptr, &b"changed meanwhile"[..]).unwrap();
    writer.close();
    meanwhile.stop().unwrap();
    let server = netswap_server::spawn(config(port), 1).unwrap();
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "restarted {version}").unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    let status = child.wait().unwrap();
    println!("{rest}");
    assert!(
        status.success(),
        "the C resilience tests failed ({status:?})"
    );
    assert!(rest.contains(" passed, 0 failed"), "{rest}");
    server.stop().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
