//! The async and blocking clients against a real server on loopback.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use netswap_client::{
    Access, Client, Error, Event, Options, Pointer, Reconnect, RecordInfo, blocking,
};
use netswap_proto::{Reply, Request, decode_frame};
use netswap_server::{RunningServer, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn server(tweak: impl FnOnce(&mut ServerConfig)) -> RunningServer {
    let mut c = ServerConfig::new("127.0.0.1:0".parse().unwrap());
    tweak(&mut c);
    netswap_server::spawn(c, 1).unwrap()
}

fn from(n: u8) -> Options {
    Options {
        local_addr: Some(IpAddr::from([127, 0, 0, n])),
        ..Options::default()
    }
}

async fn client(srv: &RunningServer, n: u8) -> Client {
    Client::connect_with(srv.addr(), from(n)).await.unwrap()
}

#[tokio::test]
async fn every_method() {
    let srv = server(|_| {});
    let a = client(&srv, 2).await;
    let h = a.hello().await.unwrap();
    assert_eq!(h.protocol, 1);
    assert_eq!(h.identity, a.identity());
    assert_eq!(a.server_info().max_record_bytes, 64 << 20);

    let p = a.create(Access::READ, "hello world").await.unwrap();
    assert_eq!(&a.read(p).await.unwrap()[..], b"hello world");
    assert_eq!(&a.read_range(p, 6, 5).await.unwrap()[..], b"world");
    assert_eq!(a.write_at(p, 11, "!").await.unwrap(), 2);
    assert_eq!(a.replace(p, "v3").await.unwrap(), 3);
    assert_eq!(a.replace_if(p, 3, "v4").await.unwrap(), 4);
    assert_eq!(
        a.info(p).await.unwrap(),
        RecordInfo {
            size: 2,
            version: 4,
            access: Access::READ,
            owned: true
        }
    );
    a.set_access(p, Access::all()).await.unwrap();
    a.takeover(p).await.unwrap();
    a.transfer(p, a.identity()).await.unwrap();
    a.delete(p).await.unwrap();
    assert!(matches!(a.read(p).await, Err(Error::AddressFault(r)) if r == "no such record"));
}

#[tokio::test]
async fn error_variants_carry_the_servers_reason() {
    let srv = server(|c| {
        c.store.quota_records = 2;
        c.store.max_record_bytes = 1000;
    });
    let a = client(&srv, 2).await;
    let b = client(&srv, 3).await;
    let p = a.create(Access::empty(), "x").await.unwrap();

    let e = b.read(p).await.unwrap_err();
    assert!(
        matches!(&e, Error::AccessViolation(r) if r.contains("READ bit")),
        "{e}"
    );
    assert_eq!(e.code(), "ACCESS_VIOLATION");
    assert_eq!(e.status(), Some(netswap_client::Status::AccessViolation));

    let e = a.read_range(p, 5, 1).await.unwrap_err();
    assert!(
        matches!(&e, Error::AddressFault(r) if r.contains("past the end")),
        "{e}"
    );

    let e = a.replace_if(p, 9, "y").await.unwrap_err();
    assert!(matches!(e, Error::Conflict { current: 1 }), "{e}");
    assert_eq!(e.code(), "CONFLICT");

    // Server-side TOO_LARGE (growth past the record limit) and client-side (CREATE).
    let e = a.write_at(p, 1, vec![0u8; 1000]).await.unwrap_err();
    assert!(
        matches!(&e, Error::TooLarge(r) if r.contains("limit of 1000")),
        "{e}"
    );
    let e = a
        .create(Access::empty(), vec![0u8; 1001])
        .await
        .unwrap_err();
    assert!(matches!(e, Error::TooLarge(_)));

    a.create(Access::empty(), "second").await.unwrap();
    let e = a.create(Access::empty(), "third").await.unwrap_err();
    assert!(
        matches!(&e, Error::QuotaExceeded(r) if r.contains("2 records")),
        "{e}"
    );
    assert_eq!(e.code(), "QUOTA_EXCEEDED");
    // One identity's quota does not affect another's.
    b.create(Access::empty(), "b's").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_tasks_share_one_client() {
    let srv = server(|_| {});
    let c = client(&srv, 2).await;
    let mut tasks = Vec::new();
    for i in 0..64u32 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let p = c
                .create(Access::empty(), i.to_be_bytes().to_vec())
                .await
                .unwrap();
            for round in 0..50u32 {
                let v = (i, round);
                let data = format!("{v:?}");
                c.replace(p, data.clone()).await.unwrap();
                assert_eq!(c.read(p).await.unwrap(), Bytes::from(data));
            }
            p
        }));
    }
    let mut ptrs: Vec<Pointer> = Vec::new();
    for t in tasks {
        ptrs.push(t.await.unwrap());
    }
    ptrs.sort();
    ptrs.dedup();
    assert_eq!(ptrs.len(), 64);
    assert_eq!(srv.stats().store().records, 64);
}

/// Hundreds of multi-frame requests in flight on one connection: the client starts
/// at most `MAX_INTERLEAVED` of them at once, so a server holding at most 64 unfinished
/// messages per connection (its default) answers them all instead of refusing the rest
/// and closing the connection.
#[tokio::test]
async fn hundreds_of_pipelined_multi_frame_writes_are_all_answered() {
    let srv = server(|_| {});
    let c = client(&srv, 2).await;
    let value = |i: u32| Bytes::from(vec![i as u8; 4096]);
    let created =
        futures_util::future::join_all((0..300u32).map(|i| c.create(Access::READ, value(i)))).await;
    let ptrs: Vec<Pointer> = created.into_iter().map(|r| r.unwrap()).collect();
    let replaced = futures_util::future::join_all(
        ptrs.iter()
            .zip(0..)
            .map(|(&p, i)| c.replace(p, value(i + 1))),
    )
    .await;
    assert!(replaced.into_iter().all(|r| r.unwrap() == 2));
    for (&p, i) in ptrs.iter().zip(0..) {
        assert_eq!(c.read(p).await.unwrap(), value(i + 1));
    }
    assert_eq!(srv.stats().store().records, 300);
}

#[tokio::test]
async fn records_larger_than_a_message_go_in_pieces() {
    // Messages of at most ~20 kB; records up to 1 MB.
    let srv = server(|c| {
        c.store.max_record_bytes = 1_000_000;
        c.store.max_message_bytes = 20_000;
        c.reassembly.max_message_bytes = 20_000;
    });
    let c = client(&srv, 2).await;
    assert_eq!(c.server_info().max_message_bytes, 20_000);
    let big: Vec<u8> = (0..1_000_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let p = c.create(Access::empty(), big.clone()).await.unwrap();
    let got = c.read(p).await.unwrap();
    assert!(got[..] == big[..], "read back equal");
    let info = c.info(p).await.unwrap();
    assert_eq!(info.size, 1_000_000);
    assert!(info.version > 1, "written in several operations");
    let reversed: Vec<u8> = big.iter().rev().copied().collect();
    c.replace(p, reversed.clone()).await.unwrap();
    assert!(c.read(p).await.unwrap()[..] == reversed[..]);
    // A compare-and-swap cannot be split.
    assert!(matches!(
        c.replace_if(p, info.version, big).await,
        Err(Error::TooLarge(_))
    ));
}

#[tokio::test]
async fn a_large_upload_does_not_delay_a_small_read() {
    let srv = server(|_| {});
    let c = client(&srv, 2).await;
    let small = c.create(Access::empty(), "small").await.unwrap();
    let big = c.create(Access::empty(), "").await.unwrap();
    let upload = {
        let c = c.clone();
        tokio::spawn(async move { c.replace(big, vec![1u8; 30_000_000]).await })
    };
    tokio::time::sleep(Duration::from_millis(5)).await;
    let read = c.read(small).await.unwrap();
    assert_eq!(&read[..], b"small");
    assert!(
        !upload.is_finished(),
        "the small read was answered while the 30 MB upload was still going"
    );
    upload.await.unwrap().unwrap();
    assert_eq!(c.info(big).await.unwrap().size, 30_000_000);
}

#[tokio::test]
async fn watch_streams_and_unwatch_on_drop() {
    let srv = server(|_| {});
    let owner = client(&srv, 2).await;
    let watcher = client(&srv, 3).await;
    let p = owner
        .create(Access::READ | Access::TAKEOVER, "v1")
        .await
        .unwrap();
    let mut w = watcher.watch(p).await.unwrap();
    owner.replace(p, "v2").await.unwrap();
    let e = w.next().await.unwrap();
    assert_eq!((e.event, e.ptr, e.version), (Event::Changed, p, 2));
    owner.set_access(p, Access::READ).await.unwrap();
    assert_eq!(w.next().await.unwrap().event, Event::AccessChanged);
    drop(w);
    // The UNWATCH is sent on drop; the server forgets the watch.
    for _ in 0..100 {
        if srv.stats().store().watches == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(srv.stats().store().watches, 0);
    // A deletion ends the stream.
    let mut w = watcher.watch(p).await.unwrap();
    owner.delete(p).await.unwrap();
    assert_eq!(w.next().await.unwrap().event, Event::Deleted);
    assert_eq!(w.next().await, None);
    // Watching needs READ permission.
    let private = owner.create(Access::empty(), "").await.unwrap();
    assert!(matches!(
        watcher.watch(private).await,
        Err(Error::AccessViolation(_))
    ));
    // The client still works after all that.
    assert_eq!(watcher.hello().await.unwrap().protocol, 1);
}

/// The server keeps one watch per connection and record; a client's watches and
/// mirrors of one record share it, and each gets its events.
#[tokio::test]
async fn watches_and_mirrors_of_one_record_share_a_registration() {
    let srv = server(|_| {});
    let owner = client(&srv, 2).await;
    let c = client(&srv, 3).await;
    let p = owner.create(Access::READ, "0123456789").await.unwrap();
    let next = async |w: &mut netswap_client::Watch| {
        tokio::time::timeout(Duration::from_secs(5), w.next())
            .await
            .expect("an event in time")
            .expect("the watch is running")
    };
    let mut first = c.watch(p).await.unwrap();
    let mut mirror = c.mirror(p).await.unwrap();
    let mut second = c.watch_with(p, 0).await.unwrap();
    assert_eq!(
        srv.stats().store().watches,
        1,
        "one registration on the server"
    );
    assert_eq!(&mirror.data()[..], b"0123456789");

    owner.write_at(p, 2, "ab").await.unwrap();
    assert_eq!(next(&mut first).await.version, 2);
    assert_eq!(next(&mut second).await.version, 2);
    let m = tokio::time::timeout(Duration::from_secs(5), mirror.next())
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(&m, netswap_client::MirrorEvent::Updated { version: 2, changed, .. }
            if changed == &[(2, Bytes::from_static(b"ab"))]),
        "{m:?}"
    );
    assert_eq!(&mirror.data()[..], b"01ab456789");

    // Dropping some members leaves the others running.
    drop(first);
    drop(mirror);
    owner.write_at(p, 0, "X").await.unwrap();
    let e = next(&mut second).await;
    assert_eq!((e.event, e.version), (Event::Changed, 3));
    assert_eq!(srv.stats().store().watches, 1);
    // A mirror joining a running watch gets its copy.
    let again = c.mirror(p).await.unwrap();
    assert_eq!(
        (&again.data()[..], again.version()),
        (&b"X1ab456789"[..], 3)
    );
    drop(again);
    drop(second);
    for _ in 0..100 {
        if srv.stats().store().watches == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(srv.stats().store().watches, 0, "the last one out unwatched");
}

/// A fake server that answers HELLO, then does `then` with the connection.
async fn fake_server<F, Fut>(then: F) -> SocketAddr
where
    F: FnOnce(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = BytesMut::new();
        let frame = loop {
            s.read_buf(&mut buf).await.unwrap();
            if let Some(f) = decode_frame(&mut buf).unwrap() {
                break f;
            }
        };
        let hello = Reply::Hello(netswap_proto::HelloInfo {
            protocol: 1,
            max_record_bytes: 1000,
            max_message_bytes: 1016,
            orphan_grace_secs: 1,
            identity: netswap_proto::Identity([1; 32]),
        })
        .encode(frame.header.xid);
        let mut out = BytesMut::new();
        netswap_proto::FrameHeader {
            xid: hello.xid,
            remaining: 0,
            op: hello.op,
            arg: 0,
            len: hello.len() as u16,
        }
        .encode(&mut out);
        out.extend_from_slice(&hello.payload());
        s.write_all(&out).await.unwrap();
        then(s).await;
    });
    addr
}

#[tokio::test]
async fn a_silent_server_times_out_the_request() {
    let addr = fake_server(|mut s| async move {
        let mut sink = vec![0u8; 1024];
        while s.read(&mut sink).await.unwrap_or(0) > 0 {}
    })
    .await;
    let c = Client::connect_with(
        addr,
        Options {
            request_timeout: Some(Duration::from_millis(200)),
            ..Options::default()
        },
    )
    .await
    .unwrap();
    assert!(matches!(c.hello().await, Err(Error::Timeout { .. })));
}

#[tokio::test]
async fn a_connection_dying_mid_request_fails_every_pending_call() {
    let addr = fake_server(|mut s| async move {
        // Read part of what comes, then vanish.
        let mut sink = vec![0u8; 10];
        let _ = s.read(&mut sink).await;
        drop(s);
    })
    .await;
    let no_reconnect = Options {
        reconnect: Reconnect::disabled(),
        ..Options::default()
    };
    let c = Client::connect_with(addr, no_reconnect).await.unwrap();
    let p = Pointer::new(5).unwrap();
    let calls: Vec<_> = (0..10)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move { c.read(p).await })
        })
        .collect();
    for call in calls {
        let r = tokio::time::timeout(Duration::from_secs(5), call)
            .await
            .expect("no call hangs")
            .unwrap();
        assert!(matches!(r, Err(Error::Disconnected(_))), "{r:?}");
    }
    assert!(c.is_closed());
    assert!(matches!(c.hello().await, Err(Error::Disconnected(_))));
    assert_eq!(c.state().name(), "CLOSED");
}

#[tokio::test]
async fn server_shutdown_fails_calls_clearly_without_reconnection() {
    let srv = server(|_| {});
    let c = Client::connect_with(
        srv.addr(),
        Options {
            reconnect: Reconnect::disabled(),
            ..from(2)
        },
    )
    .await
    .unwrap();
    c.hello().await.unwrap();
    tokio::task::spawn_blocking(move || srv.stop().unwrap())
        .await
        .unwrap();
    let r = c.hello().await;
    assert!(matches!(r, Err(Error::Disconnected(_))), "{r:?}");
}

#[test]
fn blocking_client_from_several_threads() {
    let srv = server(|_| {});
    let addr = srv.addr().to_string();
    let c = blocking::Client::connect_with(&addr, from(2)).unwrap();
    let p = c.create(Access::READ | Access::WRITE, "0").unwrap();
    std::thread::scope(|s| {
        for t in 0..4 {
            let c = c.clone();
            s.spawn(move || {
                for i in 0..100 {
                    let q = c.create(Access::empty(), format!("{t}-{i}")).unwrap();
                    assert_eq!(c.read(q).unwrap(), Bytes::from(format!("{t}-{i}")));
                    c.write_at(p, 0, "x").unwrap();
                }
            });
        }
    });
    assert_eq!(c.info(p).unwrap().version, 401);
    let other = blocking::Client::connect_with(&addr, from(3)).unwrap();
    let mut w = other.watch(p).unwrap();
    c.replace(p, "done").unwrap();
    assert_eq!(w.next().unwrap().event, Event::Changed);
    drop(w);
    assert!(matches!(other.delete(p), Err(Error::AccessViolation(_))));
    c.close();
    assert!(matches!(c.hello(), Err(Error::Disconnected(_))));
}

#[test]
fn connect_errors_are_clear() {
    // Nothing listens on this port (bound, then dropped).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let e = blocking::Client::connect(format!("127.0.0.1:{port}")).unwrap_err();
    assert!(matches!(e, Error::Io(_)), "{e}");
    assert_eq!(e.code(), "IO");
    let e = blocking::Client::connect("not an address").unwrap_err();
    assert!(matches!(e, Error::Io(_)), "{e}");
}

#[test]
fn requests_round_trip_through_the_same_codec_as_the_server() {
    // The client encodes with netswap-proto: a spot check that nothing is re-implemented.
    let m = Request::Hello.encode(7);
    assert_eq!((m.xid, m.op, m.len()), (7, 0x09, 0));
}

/// The blocking client inside an async runtime (a common mistake that used to panic
/// with "Cannot start a runtime from within a runtime"): it works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_blocking_client_works_inside_a_tokio_runtime() {
    let srv = server(|_| {});
    let c = blocking::Client::connect_with(srv.addr(), from(2)).unwrap();
    let p = c.create(Access::READ, "inside").unwrap();
    assert_eq!(&c.read(p).unwrap()[..], b"inside");
    let mut w = c.watch(p).unwrap();
    c.replace(p, "changed").unwrap();
    assert_eq!(
        w.next_timeout(Duration::from_secs(5))
            .unwrap()
            .unwrap()
            .version,
        2
    );
    drop(w);
    drop(c); // dropping it here is fine too
}

#[test]
fn the_blocking_client_from_a_current_thread_runtime() {
    let srv = server(|_| {});
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let c = blocking::Client::connect_with(srv.addr(), from(3)).unwrap();
        assert_eq!(c.hello().unwrap().protocol, 1);
    });
}

/// The README's example (examples/quickstart.rs), run against a real server.
#[test]
fn the_readme_example_runs() {
    let text = run_example("quickstart");
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with("pointer: ") && lines[0].len() == 25,
        "{text}"
    );
    assert_eq!(lines[1], "conflict: the record is at version 2");
    assert_eq!(lines[2], "watch: Changed version 3");
    assert_eq!(lines[3], "mirror: version 4, 4 bytes changed");
    assert_eq!(lines[4], "mirror: NEXT state");
    assert_eq!(lines[5], "version 4, 10 bytes, connected");
}

#[test]
fn the_readme_sharing_example_runs() {
    let text = run_example("shared");
    assert_eq!(
        text,
        "counts: [100, 100, 100, 100, 100, 100, 100, 100]\nversion: 801\n"
    );
}

/// Builds the example `name` (quick when it is current: a test run of this file alone
/// does not build the examples), runs it against a fresh server and returns what it
/// printed.
fn run_example(name: &str) -> String {
    let srv = server(|_| {});
    let deps = std::env::current_exe().unwrap();
    let exe = deps
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join(name);
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = std::process::Command::new(cargo)
        .args(["build", "-q", "-p", "netswap-client", "--example", name])
        .status()
        .unwrap();
    assert!(status.success());
    let out = std::process::Command::new(&exe)
        .env("NETSWAP_SERVER", srv.addr().to_string())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}
