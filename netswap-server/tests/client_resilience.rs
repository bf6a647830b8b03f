//! The Rust client against servers that die, restart, go silent or come back to a
//! crowd: it reconnects by itself, its watches and mirrors come back and say what
//! changed while it was away, no call hangs, and cancelled calls leave nothing behind.
//! (Here because it needs the server binary, to kill it with SIGKILL.)

mod common;

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use common::proxy::Proxy;
use netswap_client::{
    Access, Client, ConnectionState, Error, Event, MirrorEvent, Options, Pointer, Reconnect,
};
use netswap_proto::{Reply, decode_frame};
use netswap_server::ServerConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A test's directory (data directory and identity key), removed however the test
/// ends.
struct Dir(tempfile::TempDir);

impl Dir {
    fn new(name: &str) -> Dir {
        Dir(tempfile::Builder::new()
            .prefix(&format!("netswap-{name}-"))
            .tempdir()
            .unwrap())
    }
}

/// A server process on `port` with a data directory and identity key in `dir`. Its
/// log lines are forwarded to a channel (to wait for "snapshot written").
struct Process {
    child: Child,
    log: std::sync::mpsc::Receiver<String>,
    /// The port it listens on.
    port: u16,
}

impl Process {
    /// Port 0: where the OS says (a port picked by the test and bound later could be
    /// taken in between); a restart passes the port of the run before.
    fn start(dir: &Dir, port: u16) -> Process {
        let mut child = Command::new(env!("CARGO_BIN_EXE_netswap-server"))
            .args(["--listen", &format!("127.0.0.1:{port}"), "--threads", "1"])
            .args(["--snapshot-interval", "0", "--orphan-grace", "60"])
            .arg("--data-dir")
            .arg(dir.0.path().join("data"))
            .arg("--identity-key")
            .arg(dir.0.path().join("identity.key"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the binary starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .trim()
            .strip_prefix("netswap-server listening on ")
            .and_then(|a| a.parse::<SocketAddr>().ok())
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .port();
        let (tx, log) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for l in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        Process { child, log, port }
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }

    /// Asks for a snapshot and waits until it is written.
    fn snapshot(&self) {
        self.signal("-USR1");
        self.wait_log("snapshot written");
    }

    fn wait_log(&self, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.log.recv_timeout(left) {
                Ok(l) if l.contains(what) => return,
                Ok(_) => {}
                Err(e) => panic!("no {what:?} in the server's log: {e}"),
            }
        }
    }

    fn kill(mut self) {
        self.signal("-KILL");
        let _ = self.child.wait();
    }

    /// SIGTERM: a snapshot is written after the last reply, then it exits.
    fn stop(mut self) {
        self.signal("-TERM");
        assert!(self.child.wait().unwrap().success());
    }
}

fn from(n: u8) -> Options {
    Options {
        local_addr: Some(IpAddr::from([127, 0, 0, n])),
        request_timeout: Some(Duration::from_secs(10)),
        reconnect: Reconnect {
            initial_delay: Duration::from_millis(50),
            max_delay: Duration::from_millis(400),
            ..Reconnect::default()
        },
        ..Options::default()
    }
}

async fn state_becomes(c: &Client, name: &str) {
    let mut rx = c.state_changes();
    tokio::time::timeout(Duration::from_secs(20), rx.wait_for(|s| s.name() == name))
        .await
        .unwrap_or_else(|_| panic!("the client never became {name}: {}", c.state()))
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_sigkill_and_a_restart_the_client_comes_back_with_its_records_and_watches() {
    let dir = Dir::new("client-restart");
    let server = Process::start(&dir, 0);
    let port = server.port;
    let addr = format!("127.0.0.1:{port}");
    let c = Client::connect_with(&addr, from(2)).await.unwrap();
    let shared = c
        .create(Access::READ | Access::WRITE, "version 1")
        .await
        .unwrap();
    let mirrored = c
        .create(Access::READ | Access::WRITE, vec![b'.'; 100])
        .await
        .unwrap();
    let mut watch = c.watch(shared).await.unwrap();
    let mut mirror = c.mirror(mirrored).await.unwrap();
    c.write_at(mirrored, 0, "seen live").await.unwrap();
    assert!(matches!(
        mirror.next().await,
        Some(MirrorEvent::Updated { version: 2, .. })
    ));
    assert_eq!(&mirror.data()[..9], b"seen live");

    // Requests in a loop from other tasks the whole time: none may hang.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let looper = {
        let (c, stop, ok, failed) = (c.clone(), stop.clone(), ok.clone(), failed.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                match c.read(shared).await {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
                assert!(started.elapsed() < Duration::from_secs(11), "a call hung");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };

    // The records are in a snapshot; then the server dies without a word.
    server.snapshot();
    server.kill();
    state_becomes(&c, "RECONNECTING").await;
    let ConnectionState::Reconnecting { reason, .. } = c.state() else {
        unreachable!()
    };
    assert!(!reason.is_empty());

    // While the client is away, another server on the same data changes both records
    // (and writes a snapshot when it stops).
    let meanwhile = Process::start(&dir, 0);
    let other_port = meanwhile.port;
    let writer = Client::connect_with(format!("127.0.0.1:{other_port}"), from(3))
        .await
        .unwrap();
    let changed_to = writer.replace(shared, "changed while away").await.unwrap();
    writer.write_at(mirrored, 10, "while away").await.unwrap();
    writer.close();
    meanwhile.stop();

    // Back on the same port, with the same key: the client reconnects by itself.
    let server = Process::start(&dir, port);
    state_becomes(&c, "CONNECTED").await;
    let event = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("the watch tells what changed while it was away")
        .unwrap();
    assert_eq!(
        (event.event, event.ptr, event.version),
        (Event::Changed, shared, changed_to)
    );
    let reloaded = tokio::time::timeout(Duration::from_secs(10), mirror.next())
        .await
        .expect("the mirror reloads")
        .unwrap();
    assert!(
        matches!(
            reloaded,
            MirrorEvent::Reloaded {
                version: 3,
                size: 100
            }
        ),
        "{reloaded:?}"
    );
    assert_eq!(&mirror.data()[..20], b"seen live.while away");
    assert_eq!(&c.read(shared).await.unwrap()[..], b"changed while away");

    // The loop's reads go through again.
    let before = ok.load(Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(10);
    while ok.load(Ordering::Relaxed) < before + 20 {
        assert!(Instant::now() < deadline, "reads do not go through again");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // And live changes flow again.
    c.write_at(shared, 0, "C").await.unwrap();
    let e = watch.next().await.unwrap();
    assert_eq!((e.event, e.version), (Event::Changed, changed_to + 1));

    stop.store(true, Ordering::Relaxed);
    looper.await.unwrap();
    assert!(ok.load(Ordering::Relaxed) > 0);
    eprintln!(
        "reads during the test: {} ok, {} failed",
        ok.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed)
    );
    drop((watch, mirror));
    c.close();
    server.stop();
}

/// A server that answers HELLO on each connection, then reads everything and says
/// nothing (or, with `read: false`, does not even read).
async fn silent_server(read: bool) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = BytesMut::new();
                let frame = loop {
                    if s.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                        return;
                    }
                    if let Some(f) = decode_frame(&mut buf).unwrap() {
                        break f;
                    }
                };
                let hello = Reply::Hello(netswap_proto::HelloInfo {
                    protocol: 1,
                    max_record_bytes: 1 << 20,
                    max_message_bytes: 1 << 20,
                    orphan_grace_secs: 1,
                    identity: netswap_proto::Identity([1; 32]),
                })
                .encode(frame.header.xid);
                let mut q = netswap_proto::OutQueue::new();
                q.push(hello).unwrap();
                let mut out = BytesMut::new();
                q.write_to(&mut out, usize::MAX);
                s.write_all(&out).await.unwrap();
                if read {
                    let mut sink = vec![0u8; 65536];
                    while s.read(&mut sink).await.unwrap_or(0) > 0 {}
                } else {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_never_answers_fails_every_call_by_its_deadline() {
    let addr = silent_server(true).await;
    let c = Client::connect_with(
        addr,
        Options {
            request_timeout: Some(Duration::from_millis(1000)),
            keepalive: None,
            ..Options::default()
        },
    )
    .await
    .unwrap();
    let p = Pointer::new(7).unwrap();
    let started = Instant::now();
    match c.read(p).await {
        Err(Error::Timeout {
            what,
            waited,
            in_flight,
        }) => {
            assert_eq!(what, "READ of 0000000000000007");
            assert!(waited >= Duration::from_millis(1000), "{waited:?}");
            assert_eq!(in_flight, 1);
        }
        r => panic!("{r:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    // A per-call deadline overrides the default (the margins allow for a loaded CI
    // machine: 50 ms against a default of 1 s).
    let quick = c.with_timeout(Duration::from_millis(50));
    let started = Instant::now();
    assert!(matches!(quick.info(p).await, Err(Error::Timeout { .. })));
    assert!(started.elapsed() < Duration::from_millis(900));
    // Every one of many concurrent calls fails by its deadline, and their slots are
    // freed.
    let calls: Vec<_> = (0..200)
        .map(|i| {
            let c = c.clone();
            tokio::spawn(async move { c.write_at(p, i, "x").await })
        })
        .collect();
    for call in calls {
        assert!(matches!(call.await.unwrap(), Err(Error::Timeout { .. })));
    }
    assert_eq!(c.in_flight(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_calls_free_their_slots_and_leave_no_growth() {
    // A server that does not read: requests pile up unsent behind a full socket.
    let addr = silent_server(false).await;
    let c = Client::connect_with(
        addr,
        Options {
            request_timeout: None,
            keepalive: None,
            ..Options::default()
        },
    )
    .await
    .unwrap();
    let p = Pointer::new(7).unwrap();
    for round in 0..5 {
        // 20,000 calls of 1 KiB each (20 MB: far more than the sockets hold), each
        // dropped (cancelled) after 20 ms.
        let calls: Vec<_> = (0..20_000)
            .map(|_| {
                let c = c.clone();
                tokio::spawn(async move {
                    let call = c.write_at(p, 0, Bytes::from(vec![0u8; 1024]));
                    tokio::time::timeout(Duration::from_millis(20), call).await
                })
            })
            .collect();
        for call in calls {
            assert!(call.await.unwrap().is_err(), "cancelled by the timeout");
        }
        assert_eq!(c.in_flight(), 0, "round {round}: every slot is free");
        assert!(
            c.unsent_bytes() == 0,
            "round {round}: {} bytes of cancelled requests still queued",
            c.unsent_bytes()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_is_detected_by_keepalives_and_replaced() {
    let addr = silent_server(true).await;
    let c = Client::connect_with(
        addr,
        Options {
            keepalive: Some(Duration::from_millis(200)),
            request_timeout: Some(Duration::from_secs(5)),
            ..Options::default()
        },
    )
    .await
    .unwrap();
    let mut states = c.state_changes();
    let seen = tokio::time::timeout(
        Duration::from_secs(5),
        states.wait_for(|s| matches!(s, ConnectionState::Reconnecting { .. })),
    )
    .await
    .expect("the dead connection is noticed")
    .unwrap()
    .clone();
    assert!(seen.reason().unwrap().contains("keepalive"), "{seen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_clients_reconnect_spread_over_the_backoff_window() {
    let config = |listen: SocketAddr| {
        let mut c = ServerConfig::new(listen);
        c.max_connections_per_ip = 1000;
        c
    };
    // Port 0 first; the restart takes the same port again.
    let srv = netswap_server::spawn(config("127.0.0.1:0".parse().unwrap()), 1).unwrap();
    let listen = srv.addr();
    let options = Options {
        request_timeout: Some(Duration::from_secs(30)),
        reconnect: Reconnect {
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
            max_attempts: None,
            enabled: true,
        },
        ..Options::default()
    };
    let mut clients = Vec::new();
    for _ in 0..500 {
        clients.push(Client::connect_with(listen, options.clone()).await.unwrap());
    }
    srv.stop().unwrap();
    for c in &clients {
        state_becomes(c, "RECONNECTING").await;
    }
    // Down for a second, then back on the same port.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let back = Instant::now();
    let srv = netswap_server::spawn(config(listen), 1).unwrap();
    let waits: Vec<_> = clients
        .iter()
        .map(|c| {
            let c = c.clone();
            tokio::spawn(async move {
                state_becomes(&c, "CONNECTED").await;
                back.elapsed()
            })
        })
        .collect();
    let mut after = Vec::new();
    for w in waits {
        after.push(w.await.unwrap());
    }
    after.sort();
    let pct = |p: usize| after[(after.len() - 1) * p / 100];
    eprintln!(
        "500 clients reconnected after the server came back: first {:?}, p10 {:?}, p50 {:?}, p90 {:?}, last {:?}",
        after[0],
        pct(10),
        pct(50),
        pct(90),
        after[after.len() - 1]
    );
    // Spread out, not in one burst; and none gave up.
    assert!(pct(90) - pct(10) >= Duration::from_millis(150), "{after:?}");
    assert!(after[after.len() - 1] < Duration::from_secs(10));
    for c in &clients {
        c.hello().await.unwrap();
    }
    srv.stop().unwrap();
}

/// A watcher through a proxy that can hold the server's replies, and its record
/// (made by another identity, straight to the server).
async fn watcher_behind_a_proxy(
    timeout: Duration,
) -> (
    netswap_server::RunningServer,
    Client,
    Proxy,
    Client,
    Pointer,
) {
    let srv = netswap_server::spawn(ServerConfig::new("127.0.0.1:0".parse().unwrap()), 1).unwrap();
    let owner = Client::connect_with(srv.addr(), from(2)).await.unwrap();
    let p = owner
        .create(Access::READ | Access::WRITE, "version 1")
        .await
        .unwrap();
    let proxy = Proxy::start(srv.addr(), 3).await;
    let watcher = Client::connect_with(
        proxy.addr,
        Options {
            request_timeout: Some(timeout),
            keepalive: None,
            ..Options::default()
        },
    )
    .await
    .unwrap();
    (srv, owner, proxy, watcher, p)
}

/// `owner` changes `p`; watch `w` hears it (within 5 s), with the new version.
async fn change_is_heard(owner: &Client, p: Pointer, w: &mut netswap_client::Watch) {
    let v = owner.replace(p, "version 2").await.unwrap();
    let e = tokio::time::timeout(Duration::from_secs(5), w.next())
        .await
        .expect("the change is heard")
        .unwrap();
    assert_eq!((e.event, e.version), (Event::Changed, v));
}

/// The server's count of registered watches, once it is `want` (within 5 s).
async fn server_watches_become(c: &Client, want: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let stats = c.stats().await.unwrap();
        let n = stats.iter().find(|(k, _)| k == "watches").unwrap().1;
        if n == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the server has {n} watches, not {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A mirror joins a record's watch, and its WATCH (now with bytes) is acknowledged
/// only after the call's deadline. The server moved the record's watch to that WATCH
/// all the same; the client used to discard the late acknowledgement and kept
/// listening on the earlier XID, on which nothing comes any more: the watch that was
/// running went deaf until the next reconnection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_still_hears_changes_after_a_late_acknowledgement_its_caller_gave_up_on() {
    let (srv, owner, proxy, watcher, p) = watcher_behind_a_proxy(Duration::from_millis(500)).await;
    let mut w = watcher.watch(p).await.unwrap();
    proxy.hold();
    let m = watcher.mirror(p).await;
    assert!(matches!(m, Err(Error::Timeout { .. })), "{m:?}");
    proxy.release();
    // Replies on one connection come in order: this one follows the late acknowledgement.
    watcher.stats().await.unwrap();
    change_is_heard(&owner, p, &mut w).await;
    server_watches_become(&owner, 1).await;
    drop(w);
    server_watches_become(&owner, 0).await;
    srv.stop().unwrap();
}

/// A watch whose caller gave up before its acknowledgement came (the server applied
/// it late) is ended on the server once the acknowledgement arrives: nobody on the
/// client listens to it. It used to stay registered, and the server kept sending its
/// events (with the bytes, for a data watch) until the connection closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_given_up_before_its_acknowledgement_is_ended_on_the_server() {
    let (srv, owner, proxy, watcher, p) = watcher_behind_a_proxy(Duration::from_millis(500)).await;
    proxy.hold();
    let m = watcher.mirror(p).await;
    assert!(matches!(m, Err(Error::Timeout { .. })), "{m:?}");
    server_watches_become(&owner, 1).await;
    proxy.release();
    server_watches_become(&owner, 0).await;
    // The client still watches what it is asked to.
    let mut w = watcher.watch(p).await.unwrap();
    change_is_heard(&owner, p, &mut w).await;
    srv.stop().unwrap();
}

/// A mirror that joins a record's watch while the watch's first WATCH (without
/// bytes) is on its way is registered with bytes once that one is acknowledged. The
/// client used to take the acknowledgement for what the members wanted by then (the
/// bytes, too), so the mirror was never registered, and its copy was empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_that_joins_while_the_watch_is_being_registered_gets_the_bytes() {
    let (srv, owner, proxy, watcher, p) = watcher_behind_a_proxy(Duration::from_secs(10)).await;
    proxy.hold();
    let watching = {
        let watcher = watcher.clone();
        tokio::spawn(async move { watcher.watch(p).await })
    };
    server_watches_become(&owner, 1).await;
    let mirroring = {
        let watcher = watcher.clone();
        tokio::spawn(async move { watcher.mirror(p).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    proxy.release();
    let _w = watching.await.unwrap().unwrap();
    let mut m = mirroring.await.unwrap().unwrap();
    assert_eq!(&m.data()[..], b"version 1");
    let v = owner.replace(p, "version 2").await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), async {
        while m.version() < v {
            m.next().await.expect("the mirror runs");
        }
    })
    .await
    .expect("the mirror follows the change");
    assert_eq!(&m.data()[..], b"version 2");
    srv.stop().unwrap();
}
