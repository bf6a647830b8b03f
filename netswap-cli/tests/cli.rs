//! The `netswap` command-line client end to end, against a real server.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use netswap_server::{RunningServer, ServerConfig};

fn server() -> RunningServer {
    netswap_server::spawn(ServerConfig::new("127.0.0.1:0".parse().unwrap()), 1).unwrap()
}

fn netswap(srv: &RunningServer, from: u8, args: &[&str]) -> Output {
    netswap_stdin(srv, from, args, None)
}

fn netswap_stdin(srv: &RunningServer, from: u8, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_netswap"))
        .args([
            "--server",
            &srv.addr().to_string(),
            "--bind",
            &format!("127.0.0.{from}"),
        ])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(data) = stdin {
        input.write_all(data).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}: {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone()).unwrap()
}

#[test]
fn create_read_write_info_round_trip() {
    let srv = server();
    let ptr = ok(&netswap(
        &srv,
        2,
        &["create", "--access", "read", "--data", "hello"],
    ))
    .trim()
    .to_string();
    assert_eq!(ptr.len(), 16, "a pointer is 16 hex digits: {ptr}");
    assert_eq!(ok(&netswap(&srv, 3, &["read", &ptr])), "hello");
    assert_eq!(
        ok(&netswap(&srv, 2, &["read", &ptr, "-o", "hex"])),
        "68656c6c6f\n"
    );
    assert_eq!(
        ok(&netswap(
            &srv,
            2,
            &["write", &ptr, "--at", "5", "--data", "!"]
        )),
        "2\n"
    );
    assert_eq!(
        ok(&netswap(
            &srv,
            2,
            &["read", &ptr, "--offset", "4", "--len", "2"]
        )),
        "o!"
    );
    assert_eq!(
        ok(&netswap(&srv, 3, &["info", &ptr])),
        "size: 6\nversion: 2\naccess: read\nowned: no\n"
    );
    let hello = ok(&netswap(&srv, 2, &["hello"]));
    assert!(
        hello.contains("protocol: 1") && hello.contains("identity: "),
        "{hello}"
    );
}

/// The README's 60-second tour, command by command, with the outputs its comments
/// show (keep the two in step).
#[test]
fn the_readme_tour() {
    let srv = server();
    let ptr = ok(&netswap(
        &srv,
        1,
        &["create", "--access", "read,write", "--data", "hello"],
    ))
    .trim()
    .to_string();
    assert_eq!(ptr.len(), 16);
    assert_eq!(ok(&netswap(&srv, 2, &["read", &ptr])), "hello");
    assert_eq!(
        ok(&netswap(
            &srv,
            2,
            &["write", &ptr, "--at", "5", "--data", ", world"]
        )),
        "2\n"
    );
    assert_eq!(
        ok(&netswap(&srv, 1, &["info", &ptr])),
        "size: 12\nversion: 2\naccess: read,write\nowned: yes\n"
    );
    assert_eq!(
        ok(&netswap(&srv, 1, &["info", &ptr, "--json"])),
        "{\"access\":\"read,write\",\"owned\":true,\"size\":12,\"version\":2}\n"
    );
    let mut watch = Command::new(env!("CARGO_BIN_EXE_netswap"))
        .args(["--server", &srv.addr().to_string(), "--bind", "127.0.0.2"])
        .args(["watch", &ptr])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(watch.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(
        ok(&netswap(&srv, 1, &["replace", &ptr, "--data", "bye"])),
        "3\n"
    );
    line.clear();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(line, format!("changed {ptr} version 3\n"));
    watch.kill().unwrap();
    watch.wait().unwrap();
    let o = netswap(&srv, 2, &["delete", &ptr]);
    assert_eq!(o.status.code(), Some(11));
    assert!(String::from_utf8_lossy(&o.stderr).contains("access violation"));
    // Without --access, nobody else can read it.
    let private = ok(&netswap(&srv, 1, &["create", "--data", "mine"]));
    assert_eq!(
        netswap(&srv, 2, &["read", private.trim()]).status.code(),
        Some(11)
    );
    assert!(ok(&netswap(&srv, 1, &["--help"])).starts_with("Command-line client for netswap"));
}

#[test]
fn data_from_stdin_and_files() {
    let srv = server();
    let ptr = ok(&netswap_stdin(
        &srv,
        2,
        &["create"],
        Some(b"\x00\x01binary\xff"),
    ))
    .trim()
    .to_string();
    assert_eq!(
        netswap(&srv, 2, &["read", &ptr]).stdout,
        b"\x00\x01binary\xff"
    );
    let file = std::env::temp_dir().join(format!("netswap-cli-{}", std::process::id()));
    std::fs::write(&file, vec![7u8; 200_000]).unwrap();
    ok(&netswap(
        &srv,
        2,
        &["replace", &ptr, "--data-file", file.to_str().unwrap()],
    ));
    assert_eq!(netswap(&srv, 2, &["read", &ptr]).stdout, vec![7u8; 200_000]);
    std::fs::remove_file(&file).unwrap();
    ok(&netswap(
        &srv,
        2,
        &["replace", &ptr, "--data", "cafe", "--hex-input"],
    ));
    assert_eq!(netswap(&srv, 2, &["read", &ptr]).stdout, vec![0xca, 0xfe]);
}

#[test]
fn refusals_have_clear_messages_and_exit_codes() {
    let srv = server();
    let ptr = ok(&netswap(&srv, 2, &["create", "--data", "x"]))
        .trim()
        .to_string();
    let o = netswap(&srv, 3, &["read", &ptr]);
    assert_eq!(o.status.code(), Some(11), "ACCESS_VIOLATION is 10 + 1");
    assert!(String::from_utf8_lossy(&o.stderr).contains("access violation"));
    let o = netswap(&srv, 2, &["read", "00000000000000ff"]);
    assert_eq!(o.status.code(), Some(12));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no such record"));
    let o = netswap(
        &srv,
        2,
        &["replace", &ptr, "--if-version", "5", "--data", "y"],
    );
    assert_eq!(o.status.code(), Some(17));
    assert!(String::from_utf8_lossy(&o.stderr).contains("version 1"));
    // Usage errors are found before connecting.
    let o = netswap(&srv, 2, &["create", "--access", "reed", "--data", "x"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown access"));
    let o = netswap(&srv, 2, &["read", "nothex"]);
    assert_eq!(o.status.code(), Some(2));
    let o = netswap(&srv, 2, &["transfer", &ptr, "somebody"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn ownership_commands() {
    let srv = server();
    let ptr = ok(&netswap(
        &srv,
        2,
        &["create", "-a", "read,takeover", "-d", "x"],
    ))
    .trim()
    .to_string();
    ok(&netswap(&srv, 3, &["takeover", &ptr]));
    assert!(ok(&netswap(&srv, 3, &["info", &ptr])).contains("owned: yes"));
    ok(&netswap(&srv, 3, &["transfer", &ptr, "127.0.0.4"]));
    assert!(ok(&netswap(&srv, 4, &["info", &ptr])).contains("owned: yes"));
    ok(&netswap(&srv, 4, &["set-access", &ptr, "--access", "none"]));
    assert_eq!(netswap(&srv, 2, &["read", &ptr]).status.code(), Some(11));
    ok(&netswap(&srv, 4, &["delete", &ptr]));
    assert_eq!(netswap(&srv, 4, &["info", &ptr]).status.code(), Some(12));
}

#[test]
fn watch_data_prints_each_delta() {
    let srv = server();
    let ptr = ok(&netswap(
        &srv,
        2,
        &["create", "-a", "read", "-d", "hello world"],
    ))
    .trim()
    .to_string();
    let mut watch = Command::new(env!("CARGO_BIN_EXE_netswap"))
        .args([
            "--server",
            &srv.addr().to_string(),
            "--bind",
            "127.0.0.3",
            "watch",
            "--data",
            &ptr,
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(watch.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(line, format!("watching {ptr} version 1 size 11\n"));
    ok(&netswap(
        &srv,
        2,
        &["write", &ptr, "--at", "6", "-d", "W\u{1}"],
    ));
    ok(&netswap(&srv, 2, &["replace", &ptr, "-d", "bye"]));
    ok(&netswap(&srv, 2, &["delete", &ptr]));
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    assert_eq!(
        rest,
        format!(
            "delta {ptr} version 2 size 11 at 6 len 2: W\\x01\n\
             delta {ptr} version 3 size 3 at 0 len 3: bye\n\
             deleted {ptr}\n"
        )
    );
    assert!(watch.wait().unwrap().success());
}

#[test]
fn watch_prints_events_until_the_record_is_deleted() {
    let srv = server();
    let ptr = ok(&netswap(&srv, 2, &["create", "-a", "read", "-d", "x"]))
        .trim()
        .to_string();
    let mut watch = Command::new(env!("CARGO_BIN_EXE_netswap"))
        .args([
            "--server",
            &srv.addr().to_string(),
            "--bind",
            "127.0.0.3",
            "watch",
            &ptr,
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(watch.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(line, format!("watching {ptr}\n"));
    ok(&netswap(&srv, 2, &["replace", &ptr, "-d", "y"]));
    ok(&netswap(&srv, 2, &["delete", &ptr]));
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    assert_eq!(
        rest,
        format!("changed {ptr} version 2\ndeleted {ptr} version 2\n")
    );
    assert!(watch.wait().unwrap().success());
}

#[test]
fn no_server_is_a_clear_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let o = Command::new(env!("CARGO_BIN_EXE_netswap"))
        .args(["--server", &format!("127.0.0.1:{port}"), "hello"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("refused"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn stats_prints_a_table_or_json() {
    let srv = server();
    let out = netswap(&srv, 2, &["create", "--data", "abc"]);
    assert!(out.status.success());
    let out = netswap(&srv, 2, &["stats"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("requests_create "))
        .expect(&text);
    assert_eq!(line.split_whitespace().nth(1), Some("1"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["your_bytes", "3"]),
        "{text}"
    );
    let out = netswap(&srv, 2, &["stats", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["records"], 1);
    assert_eq!(v["data_bytes"], 3);
}

#[test]
fn top_draws_live_numbers_and_quits_on_q() {
    let srv = server();
    netswap(&srv, 2, &["create", "--data", "abc"]);
    // A pseudo-terminal of 120 × 30 (util-linux `script`), q pressed after 2.5 s.
    let cmd = format!(
        "stty cols 120 rows 30; {} --server {} top --interval 0.5",
        env!("CARGO_BIN_EXE_netswap"),
        srv.addr()
    );
    let mut child = Command::new("script")
        .args(["-qfec", &cmd, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("script (util-linux)");
    let mut input = child.stdin.take().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(2500));
    input.write_all(b"q").unwrap();
    let started = std::time::Instant::now();
    let out = child.wait_with_output().unwrap();
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "q quits at once"
    );
    assert!(out.status.success(), "{out:?}");
    let screen = String::from_utf8_lossy(&out.stdout);
    // What was drawn, without escape sequences and spaces (ratatui moves the cursor
    // over blank cells instead of writing them).
    let mut text = String::new();
    let mut chars = screen.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else if !c.is_whitespace() {
            text.push(c);
        }
    }
    for want in [
        "netswaptop",
        "requestsbyopcode",
        "CREATE",
        "connections_accepted",
    ] {
        assert!(text.contains(want), "{want:?} not drawn in {text}");
    }
    // The terminal is restored (the alternate screen left, the cursor shown again).
    assert!(screen.contains("\x1b[?1049l"), "alternate screen not left");
}
