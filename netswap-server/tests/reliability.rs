//! Regression tests for defects found by hostile testing (docs/RELIABILITY.md):
//! bursty writers and watchers that read or do not, senders that stall a message
//! while keeping the connection busy, senders that trickle bytes, budgets held by one
//! address, and pointer scanning.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use netswap_proto::*;
use tokio::io::AsyncWriteExt;

fn replace(ptr: Pointer, v: u32) -> Request {
    Request::Replace {
        ptr,
        data: Bytes::copy_from_slice(&v.to_be_bytes()),
    }
}

fn notify(m: &Msg) -> (Event, Version) {
    match Reply::parse(None, m.status, m.arg, m.payload.clone()).unwrap() {
        Reply::Notify { event, version, .. } => (event, version),
        other => panic!("not a NOTIFY: {other:?}"),
    }
}

/// Waits until `cond` holds (the server works on its own thread).
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..500 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting until {what}");
}

#[tokio::test]
async fn a_watcher_that_reads_gets_every_notification_of_a_burst() {
    // Defect 1: 10,000 REPLACEs pipelined in one write used to overflow the watcher's
    // queue before its task ran; it got BUSY and a close instead of its notifications.
    let srv = server(|_| {});
    let mut owner = Raw::connect(srv.addr(), 2).await;
    let mut watcher = Raw::connect(srv.addr(), 3).await;
    let p = owner.create(Access::READ, &b"v"[..]).await;
    watcher.send(1, &Request::watch(p)).await;
    assert_eq!(watcher.reply_to(1).await.status(), Status::Ok);
    const N: u32 = 10_000;
    let mut burst = Vec::new();
    for i in 0..N {
        burst.extend_from_slice(&Raw::frames(replace(p, i).encode(100 + i)));
    }
    owner.send_raw(&burst).await;
    for i in 0..N {
        let m = watcher.recv().await.expect("the watcher stays connected");
        assert_eq!(m.xid, 1);
        assert_eq!(
            notify(&m),
            (Event::Changed, 2 + i as u64),
            "every change, in order"
        );
    }
    for i in 0..N {
        assert_eq!(owner.reply_to(100 + i).await.status(), Status::Ok);
    }
    assert_eq!(watcher.call(Request::Hello).await.status(), Status::Ok);
    assert_eq!(srv.stats().notifications_merged(), 0);
    srv.stop().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_that_never_reads_costs_bounded_memory_and_catches_up() {
    // Defect 2: the bounded queue was drained into the unbounded write queue, so a
    // watcher that never read grew the server by ~25 B per notification, forever.
    let srv = server(|c| {
        c.notify_queue = 64;
        c.max_output_bytes = 64 * 1024;
    });
    let mut owner = Raw::connect(srv.addr(), 2).await;
    let mut watcher = Raw::connect_with_recv_buffer(srv.addr(), 3, 4096).await;
    let p = owner.create(Access::READ, &b"v"[..]).await;
    watcher.send(1, &Request::watch(p)).await;
    assert_eq!(watcher.reply_to(1).await.status(), Status::Ok);
    const N: u32 = 300_000;
    let mut xid = 1000;
    for batch in 0..N / 32 {
        let mut bytes = Vec::new();
        for i in 0..32 {
            bytes.extend_from_slice(&Raw::frames(replace(p, batch * 32 + i).encode(xid + i)));
        }
        owner.send_raw(&bytes).await;
        for i in 0..32 {
            assert_eq!(owner.reply_to(xid + i).await.status(), Status::Ok);
        }
        xid += 32;
    }
    let stats = srv.stats();
    eprintln!(
        "waiting {} merged {}",
        stats.notifications_waiting(),
        stats.notifications_merged()
    );
    assert!(
        stats.notifications_waiting() <= 64 + 1,
        "{} waiting",
        stats.notifications_waiting()
    );
    assert!(stats.notifications_merged() > N as u64 / 2);
    // Now it reads: exact notifications, then one summary with the final version.
    let mut last = 0;
    let mut count = 0;
    while last < N as u64 + 1 {
        let m = watcher.recv().await.expect("still connected");
        let (event, version) = notify(&m);
        assert_eq!(event, Event::Changed);
        assert!(version > last, "versions only grow: {version} after {last}");
        last = version;
        count += 1;
    }
    assert!(count < N / 2, "{count} notifications: merged, not queued");
    assert_eq!(watcher.call(Request::Hello).await.status(), Status::Ok);
    srv.stop().unwrap();
}

#[tokio::test]
async fn a_stalled_message_times_out_although_other_requests_flow() {
    // Defect 3: any byte counted as progress, so keepalives hid a stalled message.
    let srv = server(|c| c.stall_timeout = Duration::from_secs(2));
    let mut a = Raw::connect(srv.addr(), 2).await;
    let p = a.create(Access::empty(), &b"x"[..]).await;
    let big = Raw::frames(
        Request::Replace {
            ptr: p,
            data: Bytes::from(vec![7u8; 3 * MAX_PAYLOAD - 100]),
        }
        .encode(50),
    );
    a.send_raw(&big[..MAX_FRAME]).await;
    let start = Instant::now();
    let mut closed_at = None;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let xid = a.xid();
        if a.stream
            .write_all(&Raw::frames(Request::Hello.encode(xid)))
            .await
            .is_err()
        {
            closed_at = Some(start.elapsed());
            break;
        }
        match a.recv().await {
            Some(m) if m.xid == xid => continue,
            Some(m) => {
                assert_eq!((m.xid, m.status()), (RESERVED_XID, Status::ProtocolError));
                assert!(m.reason().contains("no progress"), "{}", m.reason());
                closed_at = Some(start.elapsed());
                break;
            }
            None => {
                closed_at = Some(start.elapsed());
                break;
            }
        }
    }
    let t = closed_at.expect("the stalled connection is closed");
    assert!(
        t >= Duration::from_millis(1900) && t < Duration::from_secs(4),
        "{t:?}"
    );
    eventually("its promise is released", || {
        srv.stats().partial_bytes() == 0
    })
    .await;
    srv.stop().unwrap();
}

#[tokio::test]
async fn a_frame_trickled_a_byte_at_a_time_times_out() {
    let srv = server(|c| c.stall_timeout = Duration::from_secs(2));
    let mut a = Raw::connect(srv.addr(), 2).await;
    let hello = Raw::frames(Request::Hello.encode(9));
    let big = Raw::frames(
        Request::Create {
            access: Access::empty(),
            data: Bytes::from(vec![1u8; 1000]),
        }
        .encode(10),
    );
    a.send_raw(&hello).await;
    assert_eq!(a.reply_to(9).await.status(), Status::Ok);
    let start = Instant::now();
    let mut sent = 0;
    for b in &big {
        if a.stream.write_all(std::slice::from_ref(b)).await.is_err() {
            break;
        }
        sent += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
        if start.elapsed() > Duration::from_secs(3) {
            break;
        }
    }
    let got = a.until_closed().await;
    assert!(
        got.iter()
            .any(|m| m.xid == RESERVED_XID && m.status() == Status::ProtocolError),
        "{got:?}"
    );
    assert!(sent < big.len(), "cut off before the frame was complete");
    assert!(start.elapsed() < Duration::from_secs(5));
    srv.stop().unwrap();
}

#[tokio::test]
async fn keepalives_do_not_let_one_client_pin_the_partial_budget() {
    // Defect 4: two 1 MiB promises kept open with HELLOs made every other client's
    // multi-frame message BUSY for as long as the holder liked.
    let srv = server(|c| {
        c.stall_timeout = Duration::from_secs(2);
        c.max_total_partial_bytes = 2 << 20;
        c.max_partial_bytes_per_ip = 2 << 20;
    });
    let mut holder = Raw::connect(srv.addr(), 2).await;
    let mut other = Raw::connect(srv.addr(), 3).await;
    let p = holder.create(Access::empty(), &b"x"[..]).await;
    for xid in [60, 61] {
        let m = Raw::frames(
            Request::Replace {
                ptr: p,
                data: Bytes::from(vec![0u8; (1 << 20) - 2000]),
            }
            .encode(xid),
        );
        holder.send_raw(&m[..MAX_FRAME]).await;
    }
    let promised = std::time::Instant::now();
    eventually("both promises are held", || {
        srv.stats().partial_bytes() > (2 << 20) - 4 * MAX_PAYLOAD as u64
    })
    .await;
    let create = |xid| {
        Raw::frames(
            Request::Create {
                access: Access::empty(),
                data: Bytes::from(vec![5u8; 3 * MAX_PAYLOAD - 10]),
            }
            .encode(xid),
        )
    };
    other.send_raw(&create(70)).await;
    assert_eq!(other.reply_to(70).await.status(), Status::Busy);
    // Keepalives every 0.4 s for as long as the test runs; the holder must still be
    // cut off once its promises have not progressed for the stall timeout.
    let keepalive = tokio::spawn(async move {
        for _ in 0..40 {
            let xid = holder.xid();
            if holder
                .stream
                .write_all(&Raw::frames(Request::Hello.encode(xid)))
                .await
                .is_err()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
    });
    let mut xid = 71;
    let status = loop {
        other.send_raw(&create(xid)).await;
        let status = other.reply_to(xid).await.status();
        if status != Status::Busy || promised.elapsed() > Duration::from_secs(12) {
            break status;
        }
        xid += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        status,
        Status::Ok,
        "the stalled holder was cut off and its promises released"
    );
    assert!(
        promised.elapsed() >= Duration::from_millis(1900),
        "not before the stall timeout: {:?}",
        promised.elapsed()
    );
    keepalive.abort();
    srv.stop().unwrap();
}

#[tokio::test]
async fn one_address_gets_only_its_share_of_the_partial_budget() {
    let srv = server(|c| {
        c.max_total_partial_bytes = 40 * MAX_PAYLOAD as u64;
        c.max_partial_bytes_per_ip = 10 * MAX_PAYLOAD as u64;
    });
    let mut a1 = Raw::connect(srv.addr(), 2).await;
    let mut a2 = Raw::connect(srv.addr(), 2).await;
    let mut b = Raw::connect(srv.addr(), 3).await;
    let p = a1.create(Access::WRITE, &b"x"[..]).await;
    let msg = |xid, frames: usize| {
        Raw::frames(
            Request::Replace {
                ptr: p,
                data: Bytes::from(vec![1u8; frames * MAX_PAYLOAD - 100]),
            }
            .encode(xid),
        )
    };
    // a1 holds 6 frames' worth; a2, the same address, may not add 6 more.
    let m1 = msg(10, 6);
    a1.send_raw(&m1[..MAX_FRAME]).await;
    eventually("a1's promise is held", || srv.stats().partial_bytes() > 0).await;
    let m2 = msg(11, 6);
    a2.send_raw(&m2[..MAX_FRAME]).await;
    let r = a2.reply_to(11).await;
    assert_eq!(r.status(), Status::Busy);
    assert!(r.reason().contains("this address"), "{}", r.reason());
    // Another address is not affected.
    let m3 = msg(12, 6);
    b.send_raw(&m3).await;
    assert_eq!(b.reply_to(12).await.status(), Status::Ok);
    a1.send_raw(&m1[MAX_FRAME..]).await;
    assert_eq!(a1.reply_to(10).await.status(), Status::Ok);
    srv.stop().unwrap();
}

#[tokio::test]
async fn pointer_scanning_is_throttled_per_address() {
    let srv = server(|c| c.max_misses_per_second = 200);
    let mut owner = Raw::connect(srv.addr(), 2).await;
    let p = owner.create(Access::READ, &b"secret"[..]).await;
    let mut scanner = Raw::connect(srv.addr(), 3).await;
    // 5,000 guesses as fast as possible.
    const N: u32 = 5_000;
    let mut guesses = Vec::new();
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    for xid in 0..N {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let ptr = Pointer::new(rng | 1).unwrap();
        guesses.extend_from_slice(&Raw::frames(Request::Read { ptr, range: None }.encode(xid)));
    }
    // Right behind the guesses, a pointer that exists: while throttled, it is not
    // looked up either, so a scanner cannot tell hits from misses past the rate.
    guesses.extend_from_slice(&Raw::frames(
        Request::Read {
            ptr: p,
            range: None,
        }
        .encode(N),
    ));
    let start = Instant::now();
    scanner.send_raw(&guesses).await;
    let (mut faults, mut busy) = (0, 0);
    for xid in 0..N {
        let m = scanner.reply_to(xid).await;
        match m.status() {
            Status::AddressFault => faults += 1,
            Status::Busy => {
                assert!(m.reason().contains("retry in"), "{}", m.reason());
                busy += 1
            }
            s => panic!("{s:?}"),
        }
    }
    let secs = start.elapsed().as_secs_f64();
    assert!(
        faults as f64 <= 200.0 + 200.0 * secs + 1.0,
        "{faults} misses answered in {secs:.2} s at 200/s"
    );
    assert!(busy > N / 2, "{busy} BUSY");
    assert_eq!(scanner.reply_to(N).await.status(), Status::Busy);
    // Other addresses are served as usual.
    let mut legit = Raw::connect(srv.addr(), 4).await;
    assert_eq!(legit.read(p).await, data(b"secret"));
    assert_eq!(srv.stats().throttled(), busy as u64 + 1);
    assert!(srv.stats().misses() >= faults as u64);
    // The bucket refills: after a second the scanner's lookups are answered again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(scanner.read(p).await, data(b"secret"));
    srv.stop().unwrap();
}
