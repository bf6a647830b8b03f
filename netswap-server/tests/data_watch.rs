//! Data watches over real TCP on both backends: the OK carries the state and the
//! whole value, each change comes as the bytes it wrote, rate-limited watches get
//! merged deltas, a watcher that stops reading keeps bounded memory, and bad WATCH
//! arguments are MALFORMED.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use netswap_proto::*;

fn watch(ptr: Pointer, data: bool, state: bool, min_interval_ms: u32) -> Request {
    Request::Watch {
        ptr,
        options: WatchOptions {
            data,
            state,
            min_interval_ms,
        },
    }
}

fn notify(m: Msg) -> (Event, Version, Option<Delta>) {
    match Reply::parse(None, m.status, m.arg, m.payload).unwrap() {
        Reply::Notify {
            event,
            version,
            delta,
            ..
        } => (event, version, delta),
        r => panic!("not a NOTIFY: {r:?}"),
    }
}

async fn write_at(c: &mut Raw, ptr: Pointer, offset: u64, data: &'static [u8]) -> Version {
    match c
        .ask(Request::WriteAt {
            ptr,
            offset,
            data: Bytes::from_static(data),
        })
        .await
    {
        Reply::Written(v) => v,
        r => panic!("{r:?}"),
    }
}

async fn a_data_watch_gets_the_value_then_the_bytes_of_each_change(backend: Backend) {
    let srv = server_on(backend, |_| {});
    let mut owner = Raw::connect(srv.addr(), 2).await;
    let mut watcher = Raw::connect(srv.addr(), 3).await;
    let mut plain = Raw::connect(srv.addr(), 4).await;
    let p = owner
        .create(Access::READ | Access::WRITE, &b"hello world"[..])
        .await;
    // The OK carries INFO's fields and the whole value.
    watcher.send(40, &watch(p, true, false, 0)).await;
    let ok = watcher.reply_to(40).await;
    assert_eq!(
        Reply::parse(Some(Opcode::Watch), ok.status, ok.arg, ok.payload).unwrap(),
        Reply::Watching(
            RecordInfo {
                size: 11,
                version: 1,
                access: Access::READ | Access::WRITE,
                owned: false
            },
            Bytes::from_static(b"hello world")
        )
    );
    // A v1 watch on another connection is exactly v1.
    plain.send(41, &Request::watch(p)).await;
    let ok = plain.reply_to(41).await;
    assert_eq!((ok.status, ok.payload.len()), (0, 0));

    assert_eq!(write_at(&mut owner, p, 6, b"W").await, 2);
    let (event, version, delta) = notify(watcher.reply_to(40).await);
    assert_eq!((event, version), (Event::Changed, 2));
    assert_eq!(
        delta,
        Some(Delta {
            base: 1,
            size: 11,
            ranges: vec![(6, Bytes::from_static(b"W"))]
        })
    );
    let m = plain.reply_to(41).await;
    assert_eq!((m.arg, m.payload.len()), (Event::Changed as u8, 16));

    // REPLACE: the whole new value; a shrink is carried by the size.
    owner
        .ask(Request::Replace {
            ptr: p,
            data: Bytes::from_static(b"bye"),
        })
        .await;
    let (_, version, delta) = notify(watcher.reply_to(40).await);
    assert_eq!(version, 3);
    assert_eq!(
        delta,
        Some(Delta {
            base: 2,
            size: 3,
            ranges: vec![(0, Bytes::from_static(b"bye"))]
        })
    );
    // Owner and access changes come as before; deletion ends the watch.
    owner
        .ask(Request::SetAccess {
            ptr: p,
            access: Access::READ,
        })
        .await;
    assert_eq!(
        notify(watcher.reply_to(40).await),
        (Event::AccessChanged, 3, None)
    );
    owner.ask(Request::Delete { ptr: p }).await;
    assert_eq!(
        notify(watcher.reply_to(40).await),
        (Event::Deleted, 3, None)
    );
    srv.stop().unwrap();
}

async fn a_rate_limited_data_watch_gets_merged_deltas_at_most_once_per_interval(backend: Backend) {
    let srv = server_on(backend, |_| {});
    let mut owner = Raw::connect(srv.addr(), 2).await;
    let mut watcher = Raw::connect(srv.addr(), 3).await;
    let p = owner
        .create(Access::READ | Access::WRITE, vec![b'.'; 64])
        .await;
    watcher.send(50, &watch(p, true, true, 400)).await;
    let ok = watcher.reply_to(50).await;
    let Reply::Watching(info, data) =
        Reply::parse(Some(Opcode::Watch), ok.status, ok.arg, ok.payload).unwrap()
    else {
        panic!()
    };
    let mut copy = data.to_vec();
    let mut version = info.version;
    // 20 writes in a burst, pipelined.
    for i in 0..20u64 {
        owner
            .send(
                100 + i as u32,
                &Request::WriteAt {
                    ptr: p,
                    offset: (i * 7) % 60,
                    data: Bytes::from(vec![b'a' + i as u8; 3]),
                },
            )
            .await;
    }
    for i in 0..20u32 {
        owner.reply_to(100 + i).await;
    }
    let mut received = 0;
    let started = std::time::Instant::now();
    while version < 21 {
        let (event, v, delta) = notify(watcher.reply_to(50).await);
        assert_eq!(event, Event::Changed);
        let d = delta.expect("a data watch's change carries its bytes");
        assert_eq!(d.base, version, "deltas chain from version to version");
        d.apply_to(&mut copy);
        version = v;
        received += 1;
    }
    // The burst took well under the interval: the first change went at once, the
    // rest came merged in one delta after the interval.
    assert_eq!(received, 2, "one at once, one merged");
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(owner.read(p).await, Reply::Data(Bytes::from(copy)));
    srv.stop().unwrap();
}

async fn a_data_watcher_that_stops_reading_keeps_bounded_memory_then_catches_up(backend: Backend) {
    let srv = server_on(backend, |c| {
        c.notify_queue = 16;
        c.notify_queue_bytes = 64 * 1024;
    });
    let mut owner = Raw::connect(srv.addr(), 2).await;
    let mut watcher = Raw::connect_with_recv_buffer(srv.addr(), 3, 4096).await;
    let p = owner
        .create(Access::READ | Access::WRITE, vec![0u8; 8192])
        .await;
    watcher.send(60, &watch(p, true, true, 0)).await;
    let ok = watcher.reply_to(60).await;
    let Reply::Watching(info, data) =
        Reply::parse(Some(Opcode::Watch), ok.status, ok.arg, ok.payload).unwrap()
    else {
        panic!()
    };
    // 3,000 writes of 1 KiB at scattered offsets (3 MB of changes) while the watcher
    // reads nothing.
    for batch in 0..100u32 {
        for i in 0..30u32 {
            let n = batch * 30 + i;
            owner
                .send(
                    1000 + n,
                    &Request::WriteAt {
                        ptr: p,
                        offset: (n as u64 * 1237) % 7168,
                        data: Bytes::from(vec![n as u8; 1024]),
                    },
                )
                .await;
        }
        for i in 0..30u32 {
            assert_eq!(
                owner.reply_to(1000 + batch * 30 + i).await.status(),
                Status::Ok
            );
        }
    }
    // What waits for the watcher is bounded by its queue and byte budget, not by the
    // 3 MB written.
    assert!(
        srv.stats().notifications_waiting() <= 16 + 1,
        "{} waiting",
        srv.stats().notifications_waiting()
    );
    assert!(srv.stats().notifications_merged() > 0);
    // Reading at last, the watcher ends exact (re-reading if a merge lost its bytes).
    let mut copy = data.to_vec();
    let mut version = info.version;
    while version < 3001 {
        let (event, v, delta) = notify(watcher.reply_to(60).await);
        assert_eq!(event, Event::Changed);
        match delta {
            Some(d) if d.base == version => d.apply_to(&mut copy),
            _ if v <= version => continue,
            _ => match owner.read(p).await {
                Reply::Data(d) => copy = d.to_vec(),
                r => panic!("{r:?}"),
            },
        }
        version = v;
    }
    assert_eq!(owner.read(p).await, Reply::Data(Bytes::from(copy)));
    srv.stop().unwrap();
}

async fn bad_watch_arguments_are_malformed_with_a_reason(backend: Backend) {
    let srv = server_on(backend, |_| {});
    let mut c = Raw::connect(srv.addr(), 2).await;
    let p = c.create(Access::empty(), &b"x"[..]).await;
    let raw = |arg: u8, payload: Vec<u8>| {
        Raw::frames(OutMessage {
            xid: 9,
            op: Opcode::Watch as u8,
            arg,
            head: Head::new(),
            body: Bytes::from(payload),
        })
    };
    let mut long = p.to_be_bytes().to_vec();
    long.extend_from_slice(&60_001u32.to_be_bytes());
    for (arg, payload, reason) in [
        (
            0x04,
            p.to_be_bytes().to_vec(),
            "WATCH: reserved bits set in ARG 0x04 (only 0x01 DATA, 0x02 STATE exist)",
        ),
        (
            0x01,
            vec![0; 9],
            "WATCH: payload must be 8 bytes (pointer) or 12 (pointer, minimum interval in ms), got 9",
        ),
        (
            0x01,
            long,
            "WATCH: minimum interval 60001 ms is over the limit of 60000 ms",
        ),
    ] {
        c.send_raw(&raw(arg, payload)).await;
        let m = c.reply_to(9).await;
        assert_eq!(m.status(), Status::Malformed);
        assert_eq!(m.reason(), reason);
    }
    // The connection is still fine.
    assert_eq!(c.read(p).await, data(b"x"));
    srv.stop().unwrap();
}

on_both_backends!(
    a_data_watch_gets_the_value_then_the_bytes_of_each_change,
    a_rate_limited_data_watch_gets_merged_deltas_at_most_once_per_interval,
    a_data_watcher_that_stops_reading_keeps_bounded_memory_then_catches_up,
    bad_watch_arguments_are_malformed_with_a_reason,
);
