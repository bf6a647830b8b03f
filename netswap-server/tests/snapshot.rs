//! Snapshots of the embedded store, through the real binary: a restart loses nothing,
//! owners get their grace period after it, a crash mid-write leaves the previous
//! snapshot, and a damaged snapshot is refused with its file and offset, untouched.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use netswap_proto::*;

/// A test's directory (its data directory and identity key), removed however the
/// test ends.
struct Dir(tempfile::TempDir);

impl Dir {
    fn new(name: &str) -> Dir {
        Dir(tempfile::Builder::new()
            .prefix(&format!("netswap-snap-{name}-"))
            .tempdir()
            .unwrap())
    }
    fn data(&self) -> PathBuf {
        self.0.path().join("data")
    }
    fn key(&self) -> PathBuf {
        self.0.path().join("identity.key")
    }
    fn snapshot(&self) -> PathBuf {
        self.data().join("netswap.snapshot")
    }
}

fn command(dir: &Dir, extra: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_netswap-server"));
    cmd.args(["--listen", "127.0.0.1:0", "--threads", "1"])
        .arg("--data-dir")
        .arg(dir.data())
        .arg("--identity-key")
        .arg(dir.key())
        .args(extra);
    cmd
}

fn start(dir: &Dir, extra: &[&str]) -> (Child, SocketAddr) {
    let mut child = command(dir, extra)
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

/// Runs the server expecting it to refuse to start: its exit code and stderr.
fn refused(dir: &Dir, extra: &[&str]) -> (i32, String) {
    let out = command(dir, extra).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn signal(child: &Child, sig: &str) {
    assert!(
        Command::new("kill")
            .args([sig, &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
}

fn wait(child: &mut Child) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stop(mut child: Child) {
    signal(&child, "-TERM");
    assert!(wait(&mut child).success());
}

fn digest(path: &Path) -> Vec<u8> {
    let mut f = std::fs::File::open(path).unwrap();
    let mut all = Vec::new();
    f.read_to_end(&mut all).unwrap();
    all
}

fn info(r: Reply) -> RecordInfo {
    match r {
        Reply::Info(i) => i,
        other => panic!("{other:?}"),
    }
}

#[derive(Debug, PartialEq)]
struct Seen {
    data: Reply,
    info: RecordInfo,
}

async fn look(c: &mut Raw, p: Pointer) -> Seen {
    Seen {
        data: c.read(p).await,
        info: info(c.ask(Request::Info { ptr: p }).await),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_every_record_byte_and_metadata_exact() {
    let dir = Dir::new("roundtrip");
    let (child, addr) = start(&dir, &[]);
    let mut a = Raw::connect(addr, 2).await;
    let mut b = Raw::connect(addr, 3).await;
    let mut records = Vec::new();
    // Every size class (empty, inline, just past inline, multi-frame, 64 MiB), every
    // access combination, two owners, several versions.
    let sizes = [0usize, 1, 64, 65, 1390, 3000, 200_000, 64 << 20];
    for (i, &len) in sizes.iter().enumerate() {
        for bits in 0..8u8 {
            if len == 64 << 20 && bits > 0 {
                continue;
            }
            let data: Vec<u8> = (0..len)
                .map(|j| (j * 13 + i + bits as usize) as u8)
                .collect();
            let owner = if bits % 2 == 0 { &mut a } else { &mut b };
            let p = owner
                .create(Access::from_bits(bits).unwrap(), Bytes::from(data))
                .await;
            for v in 0..(bits as usize % 3) {
                let r = owner
                    .ask(Request::WriteAt {
                        ptr: p,
                        offset: 0,
                        data: Bytes::from(vec![v as u8; len.min(10)]),
                    })
                    .await;
                assert!(matches!(r, Reply::Written(_)), "{r:?}");
            }
            records.push((p, bits % 2 == 0));
        }
    }
    // A record handed to an identity that never connected (still charged to b).
    let gift = b.create(Access::READ, &b"gift"[..]).await;
    assert_eq!(
        b.ask(Request::Transfer {
            ptr: gift,
            to: NewOwner::Ip(local(9))
        })
        .await,
        Reply::Done
    );
    let mut before = Vec::new();
    for &(p, by_a) in &records {
        before.push(look(if by_a { &mut a } else { &mut b }, p).await);
    }
    drop((a, b));
    stop(child);
    assert!(dir.snapshot().exists());

    let (child, addr) = start(&dir, &[]);
    let mut a = Raw::connect(addr, 2).await;
    let mut b = Raw::connect(addr, 3).await;
    for (&(p, by_a), want) in records.iter().zip(&before) {
        let got = look(if by_a { &mut a } else { &mut b }, p).await;
        assert_eq!(&got, want, "record {p} after the restart");
    }
    let mut nine = Raw::connect(addr, 9).await;
    assert_eq!(nine.read(gift).await, data(b"gift"));
    assert!(info(nine.ask(Request::Info { ptr: gift }).await).owned);
    stop(child);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_owners_have_their_grace_period() {
    let dir = Dir::new("grace");
    let (child, addr) = start(&dir, &["--orphan-grace", "3"]);
    let mut a = Raw::connect(addr, 2).await;
    let mut b = Raw::connect(addr, 3).await;
    let kept = a.create(Access::READ, &b"a returns"[..]).await;
    let lost = b.create(Access::READ, &b"b does not"[..]).await;
    drop((a, b));
    stop(child);
    let loaded = std::time::Instant::now();
    let (child, addr) = start(&dir, &["--orphan-grace", "3"]);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let mut a = Raw::connect(addr, 2).await; // within the grace
    let mut other = Raw::connect(addr, 4).await;
    assert_eq!(
        other.read(lost).await,
        data(b"b does not"),
        "alive during the grace"
    );
    // Reaped once the grace (3 s from the load) is over: polled, with a bound, since
    // the reaper may run a little late on a loaded machine.
    let reaped = loop {
        let status = other
            .call(Request::Read {
                ptr: lost,
                range: None,
            })
            .await
            .status();
        if status != Status::Data || loaded.elapsed() > Duration::from_secs(15) {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        reaped,
        Status::AddressFault,
        "reaped: its owner did not come back in time"
    );
    assert!(
        loaded.elapsed() >= Duration::from_millis(2500),
        "not before the grace"
    );
    assert_eq!(a.read(kept).await, data(b"a returns"));
    stop(child);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_while_writing_a_snapshot_leaves_the_previous_one() {
    let dir = Dir::new("crash");
    let (child, addr) = start(&dir, &["--snapshot-interval", "0"]);
    let mut a = Raw::connect(addr, 2).await;
    let small = a.create(Access::READ, &b"version one"[..]).await;
    // Enough data that writing a snapshot takes a while.
    let mut big = Vec::new();
    for i in 0..12u8 {
        big.push(
            a.create(Access::empty(), Bytes::from(vec![i; 32 << 20]))
                .await,
        );
    }
    signal(&child, "-USR1");
    let first = loop {
        if let Ok(m) = std::fs::metadata(dir.snapshot()) {
            break m.modified().unwrap();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let good = {
        // The rename happens after the fsync: wait until the temporary file is gone.
        while dir.data().join("netswap.snapshot.tmp").exists() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        digest(&dir.snapshot())
    };
    a.ask(Request::Replace {
        ptr: small,
        data: Bytes::from_static(b"version two"),
    })
    .await;
    signal(&child, "-USR1");
    let tmp = dir.data().join("netswap.snapshot.tmp");
    let t = Instant::now();
    while !tmp.exists() {
        assert!(t.elapsed() < Duration::from_secs(10), "no snapshot started");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let mut child = child;
    signal(&child, "-KILL");
    wait(&mut child);
    assert_eq!(
        std::fs::metadata(dir.snapshot())
            .unwrap()
            .modified()
            .unwrap(),
        first,
        "the killed write did not replace the snapshot"
    );
    assert_eq!(digest(&dir.snapshot()), good);
    let (child, addr) = start(&dir, &["--snapshot-interval", "0"]);
    assert!(!tmp.exists(), "the unfinished write is discarded at start");
    let mut a = Raw::connect(addr, 2).await;
    assert_eq!(
        a.read(small).await,
        data(b"version one"),
        "the previous snapshot's state"
    );
    let Reply::Data(d) = a.read(big[11]).await else {
        panic!()
    };
    assert!(d.len() == 32 << 20 && d.iter().all(|&b| b == 11));
    stop(child);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_snapshot_is_refused_with_its_offset_and_left_alone() {
    let dir = Dir::new("corrupt");
    let (child, addr) = start(&dir, &[]);
    let mut a = Raw::connect(addr, 2).await;
    for i in 0..50u32 {
        a.create(
            Access::READ,
            Bytes::from(vec![i as u8; 100 + i as usize * 50]),
        )
        .await;
    }
    a.create(Access::READ, Bytes::from(vec![7u8; 5 << 20]))
        .await;
    drop(a);
    stop(child);
    let good = digest(&dir.snapshot());
    let path = dir.snapshot().display().to_string();
    let check = |damage: &dyn Fn(&mut Vec<u8>), extra: &[&str], expect: &str| {
        let mut bad = good.clone();
        damage(&mut bad);
        std::fs::write(dir.snapshot(), &bad).unwrap();
        let (code, err) = refused(&dir, extra);
        assert_eq!(code, 3, "exit code 3 for an unusable snapshot: {err}");
        assert!(err.contains(&path), "names the file: {err}");
        assert!(err.contains("at byte "), "names the offset: {err}");
        assert!(err.contains(expect), "says why ({expect}): {err}");
        assert_eq!(digest(&dir.snapshot()), bad, "the file is left as it was");
    };
    check(&|f| f[5000] ^= 0x40, &[], "checksum");
    check(&|f| f.truncate(f.len() - 100), &[], "ends inside");
    check(&|f| f.truncate(3000), &[], "ends inside");
    check(
        &|f| {
            f[9] = 9;
            let crc = crc32(&f[..60]);
            f[60..64].copy_from_slice(&crc);
        },
        &[],
        "format version 9",
    );
    check(
        &|_| {},
        &["--max-record-bytes", "1000000"],
        "over --max-record-bytes",
    );
    // A different identity key: refused too (every address would map elsewhere).
    std::fs::write(dir.snapshot(), &good).unwrap();
    std::fs::write(dir.key(), b"another key").unwrap();
    let (code, err) = refused(&dir, &[]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("another identity key"), "{err}");
}

/// The header checksum, to forge a well-formed header with another version number.
fn crc32(b: &[u8]) -> [u8; 4] {
    crc32fast::hash(b).to_be_bytes()
}

#[test]
fn a_data_dir_needs_the_identity_key_and_one_server() {
    let dir = Dir::new("flags");
    let out = Command::new(env!("CARGO_BIN_EXE_netswap-server"))
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.data())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--data-dir needs --identity-key"), "{err}");
    let (first, _) = start(&dir, &[]);
    let (code, err) = refused(&dir, &[]);
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("another netswap-server is using this data directory"),
        "{err}"
    );
    stop(first);
}
