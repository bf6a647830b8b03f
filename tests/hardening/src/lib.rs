//! # netswap-hardening
//!
//! Adversarial scenarios against a running netswap server, each bounded in count and
//! time and aimed at loopback only. Every scenario runs a well-behaved "probe" client
//! beside the attack and reports its latency, so that "others unaffected" is a figure.
//!
//! The same functions run small as tests (`cargo test -p netswap-hardening`, part of
//! the test command) and large from the `flood` and `soak` binaries, which also
//! sample the server process's resident memory (docs/RELIABILITY.md).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use hdrhistogram::Histogram;
use netswap_client::{Access, Client, Error, Options, Pointer};
use netswap_proto::{FrameHeader, MAX_PAYLOAD, OutQueue, Request, Status, decode_frame};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// 127.0.N.M for attacker/victim number `n` (skipping .0, .1 and .255).
pub fn loopback(n: u32) -> IpAddr {
    IpAddr::from([127, 0, (n / 250 + 10) as u8, (n % 250 + 2) as u8])
}

/// Connects from `from` with a raw socket.
pub async fn raw(addr: SocketAddr, from: IpAddr) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(SocketAddr::new(from, 0))?;
    let stream = s.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Encodes a whole message.
pub fn frames(req: &Request, xid: u32) -> Vec<u8> {
    let mut q = OutQueue::new();
    q.push(req.encode(xid)).expect("fits");
    let mut b = BytesMut::new();
    q.write_to(&mut b, usize::MAX);
    b.to_vec()
}

/// Latency figures of the well-behaved client.
#[derive(Clone, Debug, Default)]
pub struct Probe {
    /// Calls made.
    pub calls: u64,
    /// Calls that failed.
    pub failures: u64,
    /// Median latency, µs.
    pub p50_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// Slowest call, µs.
    pub max_us: f64,
}

/// Runs READs of one record from its own identity until `stop`, every millisecond.
pub async fn probe(addr: SocketAddr, from: IpAddr, stop: Arc<AtomicBool>) -> Probe {
    let opts = Options {
        local_addr: Some(from),
        request_timeout: Some(Duration::from_secs(10)),
        ..Options::default()
    };
    let Ok(c) = Client::connect_with(addr, opts).await else {
        return Probe {
            failures: 1,
            ..Probe::default()
        };
    };
    let p = c
        .create(Access::empty(), "probe")
        .await
        .expect("probe record");
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).unwrap();
    let mut failures = 0;
    while !stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        match c.read(p).await {
            Ok(d) if &d[..] == b"probe" => {
                let _ = h.record(t.elapsed().as_nanos() as u64);
            }
            _ => failures += 1,
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Probe {
        calls: h.len() + failures,
        failures,
        p50_us: h.value_at_quantile(0.5) as f64 / 1000.0,
        p99_us: h.value_at_quantile(0.99) as f64 / 1000.0,
        max_us: h.max() as f64 / 1000.0,
    }
}

/// What an attack did and how the server held.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Scenario name.
    pub name: String,
    /// What the attackers did, in numbers.
    pub attempts: u64,
    /// How many of those the server refused or cut off as it should.
    pub refused: u64,
    /// Seconds the attack ran.
    pub seconds: f64,
    /// The well-behaved client meanwhile.
    pub probe: Probe,
    /// Free-form figures.
    pub notes: Vec<String>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{}: {} attempts, {} refused/cut off, {:.1} s; probe {} calls, {} failed, p50 {:.0} us, p99 {:.0} us, max {:.0} us",
            self.name,
            self.attempts,
            self.refused,
            self.seconds,
            self.probe.calls,
            self.probe.failures,
            self.probe.p50_us,
            self.probe.p99_us,
            self.probe.max_us
        )?;
        for n in &self.notes {
            writeln!(f, "  {n}")?;
        }
        Ok(())
    }
}

/// Runs `attack` beside a probe client and reports both.
pub async fn with_probe<F, Fut>(addr: SocketAddr, name: &str, attack: F) -> Report
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Report>,
{
    let stop = Arc::new(AtomicBool::new(false));
    // The probe has a thread and runtime of its own, so that the attackers' tasks in
    // this process do not delay it: its latency is the server's doing.
    let probe_stop = stop.clone();
    let probe_thread = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(probe(addr, IpAddr::from([127, 0, 0, 200]), probe_stop))
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = Instant::now();
    let mut report = attack().await;
    report.seconds = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    report.probe = tokio::task::spawn_blocking(move || probe_thread.join().expect("probe"))
        .await
        .expect("probe thread");
    report.name = name.to_string();
    report
}

/// Reads whatever the server sends until it closes; returns the statuses seen.
async fn drain(mut s: TcpStream, limit: Duration) -> Vec<u8> {
    let mut buf = BytesMut::new();
    let mut statuses = Vec::new();
    let _ = tokio::time::timeout(limit, async {
        loop {
            match s.read_buf(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    while let Ok(Some(f)) = decode_frame(&mut buf) {
                        statuses.push(f.header.op);
                    }
                }
            }
        }
    })
    .await;
    statuses
}

/// Opens `n` connections from one address, over the per-IP limit: the extra ones
/// must get BUSY on the reserved XID and be closed, the rest keep working.
pub async fn connection_flood(addr: SocketAddr, n: u32) -> Report {
    let from = loopback(7);
    let mut held = Vec::new();
    let mut refused = 0;
    let mut failed_to_connect = 0;
    for _ in 0..n {
        match raw(addr, from).await {
            Ok(s) => held.push(s),
            Err(_) => failed_to_connect += 1,
        }
    }
    // Every connection says HELLO; the refused ones have a BUSY waiting instead.
    let hello = frames(&Request::Hello, 1);
    let mut tasks = Vec::new();
    for mut s in held {
        let hello = hello.clone();
        tasks.push(tokio::spawn(async move {
            let _ = s.write_all(&hello).await;
            let mut header = [0u8; 10];
            match tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut header)).await {
                Ok(Ok(_)) => Some((header[6], s)),
                _ => None,
            }
        }));
    }
    let mut served = 0;
    let mut keep = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Some((op, s)) if op == Status::Busy as u8 => {
                refused += 1;
                drop(s);
            }
            Some((_, s)) => {
                served += 1;
                keep.push(s);
            }
            None => {}
        }
    }
    Report {
        attempts: n as u64,
        refused,
        notes: vec![format!(
            "{served} served (the limit), {refused} refused with BUSY, {failed_to_connect} could not connect"
        )],
        ..Report::default()
    }
}

/// `n` connections that send half a header, and `n` that send the first frame of a
/// message promising `promise` bytes, then go silent: reassembly memory stays within
/// its bounds and the stall timeout cuts them all off.
pub async fn half_frames(addr: SocketAddr, n: u32, promise: usize, wait: Duration) -> Report {
    let mut conns = Vec::new();
    let mut attempts = 0;
    for i in 0..n {
        let from = loopback(100 + i / 100); // 200 connections per address
        if let Ok(mut s) = raw(addr, from).await {
            let _ = s.write_all(&[0, 0, 0, 1, 0]).await;
            conns.push(s);
            attempts += 1;
        }
        if let Ok(mut s) = raw(addr, from).await {
            let remaining = (promise / MAX_PAYLOAD).min(u16::MAX as usize) as u16;
            let mut first = FrameHeader {
                xid: 7,
                remaining,
                op: 3,
                arg: 0,
                len: MAX_PAYLOAD as u16,
            }
            .to_bytes()
            .to_vec();
            first.extend_from_slice(&[0u8; MAX_PAYLOAD]);
            let _ = s.write_all(&first).await;
            conns.push(s);
            attempts += 1;
        }
    }
    let mut tasks = Vec::new();
    for s in conns {
        tasks.push(tokio::spawn(drain(s, wait)));
    }
    let mut cut = 0;
    let mut busy = 0;
    for t in tasks {
        let statuses = t.await.unwrap();
        if statuses.contains(&(Status::ProtocolError as u8)) {
            cut += 1;
        }
        if statuses.contains(&(Status::Busy as u8)) {
            busy += 1;
        }
    }
    Report {
        attempts,
        refused: cut,
        notes: vec![format!(
            "{cut} stalled connections cut off with PROTOCOL_ERROR, {busy} partial messages refused with BUSY (server-wide budget)"
        )],
        ..Report::default()
    }
}

/// Clients that request large reads and never read the replies, holding their
/// connections for `hold`: the server stops reading them (backpressure) instead of
/// queueing without bound, and keeps serving others.
pub async fn non_readers(
    addr: SocketAddr,
    clients: u32,
    record: usize,
    requests: u32,
    hold: Duration,
) -> Report {
    let (_owner, ptrs) = large_records(addr, 1, record).await;
    let mut burst = Vec::new();
    for x in 0..requests {
        burst.extend(frames(
            &Request::Read {
                ptr: ptrs[0],
                range: None,
            },
            x,
        ));
    }
    let sent = send_and_hold(addr, clients, &burst, hold).await;
    Report {
        attempts: clients as u64 * requests as u64,
        refused: 0,
        notes: vec![
            format!(
                "{clients} clients asked for {requests} reads of {record} B each ({} MB of replies) and read none",
                clients as u64 * requests as u64 * record as u64 / 1_000_000
            ),
            format!("requests bytes fully written by the deadline: {sent}"),
        ],
        ..Report::default()
    }
}

/// Clients that start data watches on `records` large records each (a data watch's
/// first reply is the whole record) and never read, holding their connections for
/// `hold`: a gateway, which gets a copy from Redis per reply, must not hold them all
/// (the embedded store shares the records' bytes among the replies).
pub async fn data_watch_non_readers(
    addr: SocketAddr,
    clients: u32,
    record: usize,
    records: u32,
    hold: Duration,
) -> Report {
    let (_owner, ptrs) = large_records(addr, records, record).await;
    let mut burst = Vec::new();
    for (x, &ptr) in ptrs.iter().enumerate() {
        burst.extend(frames(
            &Request::Watch {
                ptr,
                options: netswap_proto::WatchOptions::data(),
            },
            x as u32,
        ));
    }
    let sent = send_and_hold(addr, clients, &burst, hold).await;
    Report {
        attempts: clients as u64 * records as u64,
        refused: 0,
        notes: vec![
            format!(
                "{clients} clients started data watches on {records} records of {record} B each ({} MB of first replies) and read none",
                clients as u64 * records as u64 * record as u64 / 1_000_000
            ),
            format!("request bytes fully written by the deadline: {sent}"),
        ],
        ..Report::default()
    }
}

/// `n` records of `size` bytes anyone may read, and the client that owns them (from
/// `loopback(300)`; they live while it is connected).
async fn large_records(addr: SocketAddr, n: u32, size: usize) -> (Client, Vec<Pointer>) {
    let owner = Client::connect_with(
        addr,
        Options {
            local_addr: Some(loopback(300)),
            ..Options::default()
        },
    )
    .await
    .expect("owner connects");
    let mut ptrs = Vec::new();
    for _ in 0..n {
        ptrs.push(
            owner
                .create(Access::READ, vec![9u8; size])
                .await
                .expect("record"),
        );
    }
    (owner, ptrs)
}

/// `clients` raw connections (100 per address, from `loopback(310)` on) each write
/// what the server accepts of `burst` within a second (a server that stops reading
/// stops it early), read nothing, and are held open for `hold`; the bytes written in
/// all.
async fn send_and_hold(addr: SocketAddr, clients: u32, burst: &[u8], hold: Duration) -> u64 {
    let mut held = Vec::new();
    let mut sent_total = 0u64;
    for i in 0..clients {
        let mut s = raw(addr, loopback(310 + i / 100)).await.expect("connect");
        sent_total += tokio::time::timeout(Duration::from_secs(1), async {
            let mut sent = 0;
            for chunk in burst.chunks(4096) {
                if s.write_all(chunk).await.is_err() {
                    break;
                }
                sent += chunk.len() as u64;
            }
            sent
        })
        .await
        .unwrap_or(0);
        held.push(s);
    }
    tokio::time::sleep(hold).await;
    sent_total
}

/// Malformed requests and over-the-limit messages at a high rate for `dur` (the
/// server's `--max-message-bytes` must be below 5,560): every one gets MALFORMED or
/// TOO_LARGE and the connection stays usable.
pub async fn garbage_rate(addr: SocketAddr, conns: u32, dur: Duration) -> Report {
    let stop = Instant::now() + dur;
    let mut tasks = Vec::new();
    for c in 0..conns {
        tasks.push(tokio::spawn(async move {
            let Ok(s) = raw(addr, loopback(400 + c)).await else {
                return (0u64, 0u64);
            };
            let (mut rd, mut wr) = s.into_split();
            let sent = Arc::new(AtomicU64::new(0));
            let sent2 = sent.clone();
            let writer = tokio::spawn(async move {
                let mut xid = 0u32;
                let mut rng = SmallRng::seed_from_u64(c as u64);
                while Instant::now() < stop {
                    let mut batch = Vec::new();
                    for _ in 0..64 {
                        xid = xid.wrapping_add(1);
                        match rng.random_range(0..4) {
                            0 => batch.extend(frames_raw(xid, 0, 0x7F, 0, &[])), // unknown op
                            1 => batch.extend(frames_raw(xid, 0, 0x05, 0, &[1, 2, 3])), // short
                            2 => batch.extend(frames_raw(xid, 0, 0x00, 0x80, b"x")), // reserved bits
                            _ => {
                                // A 4-frame message over a server limit below 5,560
                                // bytes: TOO_LARGE at its first frame, the rest
                                // discarded unbuffered.
                                for r in (0..4u16).rev() {
                                    batch.extend(frames_raw(xid, r, 0x03, 0, &[0; MAX_PAYLOAD]));
                                }
                            }
                        }
                        sent2.fetch_add(1, Ordering::Relaxed);
                    }
                    if wr.write_all(&batch).await.is_err() {
                        break;
                    }
                }
                let _ = wr.shutdown().await;
            });
            let mut buf = BytesMut::new();
            let mut got = 0u64;
            loop {
                match tokio::time::timeout(Duration::from_secs(5), rd.read_buf(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
                    Ok(Ok(_)) => {
                        while let Ok(Some(f)) = decode_frame(&mut buf) {
                            if f.header.op == Status::Malformed as u8
                                || f.header.op == Status::TooLarge as u8
                            {
                                got += 1;
                            }
                        }
                    }
                }
            }
            let _ = writer.await;
            (sent.load(Ordering::Relaxed), got)
        }));
    }
    let (mut sent, mut answered) = (0, 0);
    for t in tasks {
        let (s, g) = t.await.unwrap();
        sent += s;
        answered += g;
    }
    Report {
        attempts: sent,
        refused: answered,
        notes: vec![format!(
            "{sent} bad requests sent, {answered} answered MALFORMED or TOO_LARGE on connections that stayed open"
        )],
        ..Report::default()
    }
}

fn frames_raw(xid: u32, remaining: u16, op: u8, arg: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = FrameHeader {
        xid,
        remaining,
        op,
        arg,
        len: payload.len() as u16,
    }
    .to_bytes()
    .to_vec();
    v.extend_from_slice(payload);
    v
}

/// One identity creates records until its quota is exhausted; another identity is
/// not affected.
pub async fn quota_exhaustion(addr: SocketAddr, quota_records: u64) -> Report {
    let greedy = Client::connect_with(
        addr,
        Options {
            local_addr: Some(loopback(500)),
            ..Options::default()
        },
    )
    .await
    .expect("connect");
    let mut made = 0;
    let mut refused = 0;
    for _ in 0..quota_records + 100 {
        match greedy.create(Access::empty(), "x").await {
            Ok(_) => made += 1,
            Err(Error::QuotaExceeded(_)) => refused += 1,
            Err(e) => panic!("unexpected {e}"),
        }
    }
    let other = Client::connect_with(
        addr,
        Options {
            local_addr: Some(loopback(501)),
            ..Options::default()
        },
    )
    .await
    .expect("connect");
    let fine = other.create(Access::empty(), "still fine").await.is_ok();
    Report {
        attempts: quota_records + 100,
        refused,
        notes: vec![format!(
            "{made} created up to the quota of {quota_records}, {refused} refused with QUOTA_EXCEEDED; another identity could still create: {fine}"
        )],
        ..Report::default()
    }
}

/// Reads frames from `s` until `want` NOTIFYs have arrived, the connection closes, or
/// `limit` passes; returns the NOTIFY count, the last version seen and whether the
/// server closed the connection.
async fn read_notifies(s: &mut TcpStream, want: u64, limit: Duration) -> (u64, u64, bool) {
    let mut buf = BytesMut::new();
    let (mut count, mut last, mut closed) = (0u64, 0u64, false);
    let _ = tokio::time::timeout(limit, async {
        while count < want {
            match s.read_buf(&mut buf).await {
                Ok(0) | Err(_) => {
                    closed = true;
                    break;
                }
                Ok(_) => {
                    while let Ok(Some(f)) = decode_frame(&mut buf) {
                        if f.header.op == Status::Notify as u8 && f.payload.len() == 16 {
                            count += 1;
                            last = u64::from_be_bytes(f.payload[8..16].try_into().unwrap());
                        }
                    }
                }
            }
        }
    })
    .await;
    (count, last, closed)
}

async fn watch_one(addr: SocketAddr, from: IpAddr, ptr: Pointer, rcvbuf: Option<u32>) -> TcpStream {
    let sock = TcpSocket::new_v4().expect("socket");
    if let Some(n) = rcvbuf {
        sock.set_recv_buffer_size(n).expect("SO_RCVBUF");
    }
    sock.bind(SocketAddr::new(from, 0)).expect("bind");
    let mut s = sock.connect(addr).await.expect("connect");
    s.write_all(&frames(&Request::watch(ptr), 1))
        .await
        .expect("watch");
    let mut header = [0u8; 10];
    s.read_exact(&mut header).await.expect("watch acknowledged");
    assert_eq!(header[6], Status::Ok as u8, "WATCH refused");
    s
}

/// A writer pipelines `n` REPLACEs of one record in a single write while a watcher
/// reads promptly: the watcher must get every notification (in order, the last with
/// the final version) and stay connected.
pub async fn watch_burst(addr: SocketAddr, n: u32) -> Report {
    let owner = Client::connect_with(
        addr,
        Options {
            local_addr: Some(loopback(600)),
            ..Options::default()
        },
    )
    .await
    .expect("connect");
    let ptr = owner.create(Access::READ, "v").await.expect("create");
    let mut watcher = watch_one(addr, loopback(601), ptr, None).await;
    let mut burst = Vec::new();
    for i in 0..n {
        burst.extend_from_slice(&frames(
            &Request::Replace {
                ptr,
                data: i.to_be_bytes().to_vec().into(),
            },
            10 + i,
        ));
    }
    let mut writer = raw(addr, loopback(600)).await.expect("connect");
    let send = tokio::spawn(async move {
        writer.write_all(&burst).await.expect("burst");
        drain_count(writer, n as usize).await
    });
    let (count, last, closed) =
        read_notifies(&mut watcher, n as u64, Duration::from_secs(60)).await;
    let acked = send.await.expect("writer");
    Report {
        attempts: n as u64,
        refused: if closed { 1 } else { 0 },
        notes: vec![format!(
            "{count} NOTIFYs of {n} changes received, last version {last} (final {}), {acked} REPLACEs acknowledged, watcher {}",
            n + 1,
            if closed {
                "DISCONNECTED"
            } else {
                "still connected"
            }
        )],
        ..Report::default()
    }
}

/// Reads replies from `s` until `n` frames arrived or it closes.
async fn drain_count(mut s: TcpStream, n: usize) -> usize {
    let mut buf = BytesMut::new();
    let mut got = 0;
    while got < n {
        match s.read_buf(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                while let Ok(Some(_)) = decode_frame(&mut buf) {
                    got += 1;
                }
            }
        }
    }
    got
}

/// A watcher with a 4 KiB receive buffer that never reads, while `n` REPLACEs in
/// batches of 32 change its record: its notifications must merge (the harness samples
/// the server's memory), the connection stays open, and when it finally reads it
/// catches up to the final version.
pub async fn stuck_watcher(addr: SocketAddr, n: u32) -> Report {
    let owner = Client::connect_with(
        addr,
        Options {
            local_addr: Some(loopback(610)),
            ..Options::default()
        },
    )
    .await
    .expect("connect");
    let ptr = owner.create(Access::READ, "v").await.expect("create");
    let mut watcher = watch_one(addr, loopback(611), ptr, Some(4096)).await;
    let mut writer = raw(addr, loopback(610)).await.expect("connect");
    let mut xid = 10u32;
    let mut sent = 0;
    while sent < n {
        let k = 32.min(n - sent);
        let mut batch = Vec::new();
        for i in 0..k {
            batch.extend_from_slice(&frames(
                &Request::Replace {
                    ptr,
                    data: (sent + i).to_be_bytes().to_vec().into(),
                },
                xid + i,
            ));
        }
        writer.write_all(&batch).await.expect("batch");
        let mut header = [0u8; 10];
        let mut payload = [0u8; 64];
        for _ in 0..k {
            writer.read_exact(&mut header).await.expect("reply");
            let len = u16::from_be_bytes([header[8], header[9]]) as usize;
            writer.read_exact(&mut payload[..len]).await.expect("reply");
        }
        xid += k;
        sent += k;
    }
    // Now it reads: whatever was merged arrives with the final version.
    let final_version = n as u64 + 1;
    let mut buf = BytesMut::new();
    let (mut count, mut last, mut closed) = (0u64, 0u64, false);
    let _ = tokio::time::timeout(Duration::from_secs(60), async {
        while last < final_version {
            match watcher.read_buf(&mut buf).await {
                Ok(0) | Err(_) => {
                    closed = true;
                    break;
                }
                Ok(_) => {
                    while let Ok(Some(f)) = decode_frame(&mut buf) {
                        if f.header.op == Status::Notify as u8 && f.payload.len() == 16 {
                            count += 1;
                            last = u64::from_be_bytes(f.payload[8..16].try_into().unwrap());
                        }
                    }
                }
            }
        }
    })
    .await;
    Report {
        attempts: n as u64,
        refused: n as u64 - count.min(n as u64),
        notes: vec![format!(
            "{n} changes while the watcher read nothing; then it read {count} NOTIFYs ({} merged away), last version {last} of {final_version}, watcher {}",
            n as u64 - count.min(n as u64),
            if closed {
                "DISCONNECTED"
            } else {
                "still connected"
            }
        )],
        ..Report::default()
    }
}

/// `conns` connections each hold two promises of `promise` bytes open and send a
/// HELLO every 400 ms (keepalives); after the stall timeout, another client's
/// multi-frame CREATE must succeed.
pub async fn keepalive_pinning(
    addr: SocketAddr,
    conns: u32,
    promise: usize,
    stall: Duration,
) -> Report {
    let mut holders = Vec::new();
    for i in 0..conns {
        let mut s = raw(addr, loopback(620 + i)).await.expect("connect");
        for xid in [1u32, 2] {
            let remaining = (promise / MAX_PAYLOAD) as u16;
            let mut first = FrameHeader {
                xid,
                remaining,
                op: 0,
                arg: 0,
                len: MAX_PAYLOAD as u16,
            }
            .to_bytes()
            .to_vec();
            first.extend_from_slice(&[0u8; MAX_PAYLOAD]);
            s.write_all(&first).await.expect("first frame");
        }
        holders.push(s);
    }
    let keepalive = tokio::spawn(async move {
        let mut cut = 0;
        for round in 0..((stall.as_millis() / 400) as u32 + 5) {
            for s in holders.iter_mut() {
                if s.write_all(&frames(&Request::Hello, 100 + round))
                    .await
                    .is_err()
                {
                    cut += 1;
                }
            }
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
        let mut closed = 0;
        for s in holders {
            if drain(s, Duration::from_secs(2))
                .await
                .contains(&(Status::ProtocolError as u8))
            {
                closed += 1;
            }
        }
        (cut, closed)
    });
    let other = Client::connect_with(
        addr,
        Options {
            local_addr: Some(loopback(619)),
            ..Options::default()
        },
    )
    .await
    .expect("connect");
    let big = vec![1u8; 3 * MAX_PAYLOAD];
    let during = other.create(Access::empty(), big.clone()).await;
    tokio::time::sleep(stall + Duration::from_secs(1)).await;
    let after = other.create(Access::empty(), big).await;
    let (_, closed) = keepalive.await.expect("keepalive task");
    Report {
        attempts: conns as u64,
        refused: closed as u64,
        notes: vec![format!(
            "{conns} holders × 2 promises of {promise} B with HELLOs every 400 ms; another client's 3-frame CREATE while held: {}; after the stall timeout: {}; {closed} holders cut off with PROTOCOL_ERROR",
            match during {
                Ok(_) => "OK".into(),
                Err(e) => e.to_string(),
            },
            match after {
                Ok(_) => "OK".into(),
                Err(e) => e.to_string(),
            },
        )],
        ..Report::default()
    }
}

/// `cycles` times: TRANSFER a record to a made-up identity, TAKEOVER it back,
/// SET_ACCESS READ|TAKEOVER (the harness compares the server's memory before and after).
pub async fn transfer_cycles(addr: SocketAddr, cycles: u32) -> Report {
    let c = Client::connect_with(
        addr,
        Options {
            local_addr: Some(loopback(630)),
            ..Options::default()
        },
    )
    .await
    .expect("connect");
    let ptr = c
        .create(Access::READ | Access::TAKEOVER, "cycled")
        .await
        .expect("create");
    let mut rng = SmallRng::seed_from_u64(13);
    let mut failed = 0;
    for _ in 0..cycles {
        let mut id = [0u8; 32];
        rng.fill(&mut id[..]);
        let ok = c.transfer(ptr, netswap_client::Identity(id)).await.is_ok()
            && c.takeover(ptr).await.is_ok()
            && c.set_access(ptr, Access::READ | Access::TAKEOVER)
                .await
                .is_ok();
        if !ok {
            failed += 1;
        }
    }
    Report {
        attempts: cycles as u64,
        refused: failed,
        notes: vec![format!(
            "{cycles} TRANSFER/TAKEOVER/SET_ACCESS cycles to distinct made-up identities, {failed} failed"
        )],
        ..Report::default()
    }
}

/// A scanner guesses `n` random pointers as fast as it can (pipelined 1,000 at a
/// time): past the miss rate, its lookups are answered BUSY.
pub async fn pointer_scan(addr: SocketAddr, n: u32) -> Report {
    let mut s = raw(addr, loopback(640)).await.expect("connect");
    let mut rng = SmallRng::seed_from_u64(99);
    let (mut faults, mut busy, mut other) = (0u64, 0u64, 0u64);
    let started = Instant::now();
    let mut xid = 0u32;
    while xid < n {
        let k = 1000.min(n - xid);
        let mut batch = Vec::new();
        for i in 0..k {
            let ptr = Pointer::new(rng.random::<u64>() | 1).expect("non-zero");
            batch.extend_from_slice(&frames(&Request::Read { ptr, range: None }, xid + i));
        }
        s.write_all(&batch).await.expect("guesses");
        let mut buf = BytesMut::new();
        let mut got = 0;
        while got < k {
            if s.read_buf(&mut buf).await.expect("replies") == 0 {
                break;
            }
            while let Ok(Some(f)) = decode_frame(&mut buf) {
                got += 1;
                match Status::from_u8(f.header.op) {
                    Some(Status::AddressFault) => faults += 1,
                    Some(Status::Busy) => busy += 1,
                    _ => other += 1,
                }
            }
        }
        xid += k;
    }
    let secs = started.elapsed().as_secs_f64();
    Report {
        attempts: n as u64,
        refused: busy,
        notes: vec![format!(
            "{n} guesses in {secs:.1} s ({:.0}/s): {faults} answered ADDRESS_FAULT ({:.0}/s), {busy} BUSY, {other} other",
            n as f64 / secs,
            faults as f64 / secs
        )],
        ..Report::default()
    }
}

/// The soak: `clients` tasks from `identities` addresses doing mixed operations with
/// random disconnects for `dur`; every acknowledged write is remembered, and at the
/// end every record must hold exactly its last acknowledged bytes and version.
/// Returns the records checked and any mismatch.
///
/// With several servers in `addrs` (gateways on one Redis Cluster), each connection
/// goes to the next server in turn, starting from a different one for each client of
/// an identity: an identity has connections on several gateways at once, and a record
/// is written through whichever gateway its client is on at the time.
pub async fn soak(
    addrs: &[SocketAddr],
    clients: u32,
    identities: u32,
    dur: Duration,
) -> SoakResult {
    assert!(!addrs.is_empty(), "a server to soak");
    let stop = Instant::now() + dur;
    let mut tasks = Vec::new();
    let ops = Arc::new(AtomicU64::new(0));
    let reconnects = Arc::new(AtomicU64::new(0));
    let unknown = Arc::new(AtomicU64::new(0));
    for c in 0..clients {
        let ops = ops.clone();
        let reconnects = reconnects.clone();
        let unknown = unknown.clone();
        let addrs = addrs.to_vec();
        // The server of this task's next connection (an index into `addrs`).
        let next = Arc::new(AtomicU64::new((c / identities) as u64));
        tasks.push(tokio::spawn(async move {
            let from = loopback(600 + c % identities);
            let mut rng = SmallRng::seed_from_u64(c as u64 * 7919);
            // What this task knows: record -> (bytes, version) as last acknowledged.
            let mut mine: HashMap<Pointer, Known> = HashMap::new();
            let connect = || {
                let (addrs, next) = (addrs.clone(), next.clone());
                async move {
                // The server may be restarting: keep trying for a while (the next
                // server in turn at each attempt).
                let deadline = Instant::now() + Duration::from_secs(60);
                loop {
                    let at = next.fetch_add(1, Ordering::Relaxed) as usize % addrs.len();
                    let c = Client::connect_with(
                        addrs[at],
                        Options {
                            local_addr: Some(from),
                            request_timeout: Some(Duration::from_secs(20)),
                            ..Options::default()
                        },
                    )
                    .await;
                    match c {
                        Ok(c) => return c,
                        Err(e) if Instant::now() > deadline => panic!("cannot reconnect: {e}"),
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
                }
            };
            let mut client = connect().await;
            while Instant::now() < stop {
                ops.fetch_add(1, Ordering::Relaxed);
                let roll: u32 = rng.random_range(0..100);
                let pick = mine
                    .keys()
                    .nth(rng.random_range(0..mine.len().max(1)))
                    .copied();
                // A write whose reply was lost with the connection (a server restart),
                // or answered BUSY by a gateway on a Redis Cluster (it failed over while
                // the change was committed, or did not answer in time: the change may
                // have been applied): the record holds the old state or the new one.
                let mut uncertain: Option<(Pointer, Option<Known>)> = None;
                let lost = |e: &Error| {
                    matches!(
                        e,
                        Error::Disconnected(_)
                            | Error::Io(_)
                            | Error::Timeout { .. }
                            | Error::Busy(_)
                    )
                };
                match (roll, pick) {
                    (0..=14, _) | (_, None) => {
                        let len = rng.random_range(0..2000);
                        let data: Vec<u8> = (0..len).map(|_| rng.random()).collect();
                        // (A CREATE whose reply is lost leaves a record nobody tracks;
                        // it is not one of the acknowledged records checked below.)
                        if let Ok(p) = client.create(Access::READ, data.clone()).await {
                            mine.insert(p, (data, 1));
                        }
                    }
                    (15..=44, Some(p)) => {
                        let data: Vec<u8> = (0..rng.random_range(0..3000))
                            .map(|_| rng.random())
                            .collect();
                        match client.replace(p, data.clone()).await {
                            Ok(v) => {
                                mine.insert(p, (data, v));
                            }
                            Err(e) if lost(&e) => {
                                let v = mine[&p].1 + 1;
                                uncertain = Some((p, Some((data, v))));
                            }
                            Err(_) => {}
                        }
                    }
                    (45..=59, Some(p)) => {
                        let (cur, v) = mine[&p].clone();
                        let off = rng.random_range(0..=cur.len());
                        let patch: Vec<u8> = (0..rng.random_range(1..100))
                            .map(|_| rng.random())
                            .collect();
                        let mut next = cur;
                        if next.len() < off + patch.len() {
                            next.resize(off + patch.len(), 0);
                        }
                        next[off..off + patch.len()].copy_from_slice(&patch);
                        match client.write_at(p, off as u64, patch.clone()).await {
                            Ok(v) => {
                                mine.insert(p, (next, v));
                            }
                            Err(e) if lost(&e) => uncertain = Some((p, Some((next, v + 1)))),
                            Err(_) => {}
                        }
                    }
                    (60..=84, Some(p)) => {
                        if let Ok(d) = client.read(p).await {
                            assert_eq!(&d[..], &mine[&p].0[..], "read returned other bytes");
                        }
                    }
                    (85..=92, Some(p)) => match client.delete(p).await {
                        Ok(()) => {
                            mine.remove(&p);
                        }
                        Err(e) if lost(&e) => uncertain = Some((p, None)),
                        Err(_) => {}
                    },
                    _ => {
                        // Drop the connection mid-flight and come back.
                        client.close();
                        reconnects.fetch_add(1, Ordering::Relaxed);
                        client = connect().await;
                    }
                }
                if client.is_closed() {
                    client = connect().await;
                }
                if let Some((p, new)) = uncertain {
                    // Ask what became of it: exactly the old or the new state is fine.
                    unknown.fetch_add(1, Ordering::Relaxed);
                    let old = mine.get(&p).cloned();
                    let (d, i) = read_settled(&mut client, p, &connect).await;
                    let now = match (&d, &i) {
                        (Ok(d), Ok(i)) => Some((d.to_vec(), i.version)),
                        _ => None,
                    };
                    if now == new {
                        match new {
                            Some(state) => {
                                mine.insert(p, state);
                            }
                            None => {
                                mine.remove(&p);
                            }
                        }
                    } else {
                        assert_eq!(
                            now,
                            old,
                            "record {p} is neither the old nor the new state (read: {:?}, info: {:?})",
                            d.map(|d| d.len()),
                            i
                        );
                    }
                }
            }
            // Every record this task wrote holds exactly what was last acknowledged.
            let mut checked = 0;
            let mut mismatches = Vec::new();
            for (p, (data, version)) in &mine {
                match read_settled(&mut client, *p, &connect).await {
                    (Ok(d), Ok(i)) if d[..] == data[..] && i.version == *version => checked += 1,
                    (d, i) => mismatches.push(format!("{p}: {:?} / {:?}", d.map(|d| d.len()), i)),
                }
            }
            // Stay connected until every task has verified: then all leave at once.
            (
                checked,
                mismatches,
                mine.into_keys().collect::<Vec<_>>(),
                client,
            )
        }));
    }
    let mut result = SoakResult::default();
    for t in tasks {
        let (checked, mismatches, records, client) = t.await.expect("soak task");
        result.checked += checked;
        result.mismatches.extend(mismatches);
        result.records.extend(records);
        result.clients.push(client);
    }
    result.ops = ops.load(Ordering::Relaxed);
    result.reconnects = reconnects.load(Ordering::Relaxed);
    result.unknown_outcomes = unknown.load(Ordering::Relaxed);
    result
}

/// A READ and an INFO of `p`, again (on a new connection from `connect` when the
/// last one was lost) until neither is answered BUSY nor lost: what the record holds
/// once the server can tell. A server that answers BUSY for a minute gets its BUSY
/// judged (a mismatch), so that a gateway that never serves again fails the soak
/// instead of hanging it.
async fn read_settled<F: Future<Output = Client>>(
    client: &mut Client,
    p: Pointer,
    connect: &impl Fn() -> F,
) -> (
    Result<bytes::Bytes, Error>,
    Result<netswap_client::RecordInfo, Error>,
) {
    let give_up = Instant::now() + Duration::from_secs(60);
    loop {
        match (client.read(p).await, client.info(p).await) {
            (Err(Error::Busy(_)), _) | (_, Err(Error::Busy(_))) if Instant::now() < give_up => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            (Err(Error::Disconnected(_) | Error::Io(_) | Error::Timeout { .. }), _)
            | (_, Err(Error::Disconnected(_) | Error::Io(_) | Error::Timeout { .. })) => {
                *client = connect().await
            }
            other => return other,
        }
    }
}

/// Watches across servers: `pairs` records, each written for `dur` by a client on one
/// server (`addrs[i % n]`) and followed by a client of another identity on the next
/// server (`addrs[(i + 1) % n]`): half with a mirror ([`Client::mirror`], a data
/// watch), half with a watch of the state ([`Client::watch`]). What a follower holds
/// may never go back, and once the writes stop, every follower must reach the
/// record's last version (a mirror: with exactly its bytes; read settled) within
/// 30 s. Run beside [`soak`] on gateways of one Redis Cluster, it checks that changes
/// made through one gateway reach watchers on another through failovers, slot moves
/// and a gateway's SIGKILL.
pub async fn mirror_soak(addrs: &[SocketAddr], pairs: u32, dur: Duration) -> MirrorSoakResult {
    assert!(!addrs.is_empty(), "a server to soak");
    let stop = Instant::now() + dur;
    let mut tasks = Vec::new();
    for i in 0..pairs {
        let (writer_at, mirror_at) = (
            addrs[i as usize % addrs.len()],
            addrs[(i as usize + 1) % addrs.len()],
        );
        tasks.push(tokio::spawn(async move {
            let mut rng = SmallRng::seed_from_u64(i as u64 * 104_729);
            let options = |n: u32| Options {
                local_addr: Some(loopback(700 + n)),
                request_timeout: Some(Duration::from_secs(20)),
                ..Options::default()
            };
            let writer = Client::connect_with(writer_at, options(i))
                .await
                .expect("the writer connects");
            let watcher = Client::connect_with(mirror_at, options(pairs + i))
                .await
                .expect("the mirror's client connects");
            let ptr = settled(|| writer.create(Access::READ, vec![0u8; 1500])).await;
            // Half the records are followed by a watch of their state (events without
            // the bytes, on the record's other channel) instead of a mirror; each kind
            // on every server (records 0 and 1 mirrored, 2 and 3 watched, …).
            let mut follower = if i % 4 < 2 {
                Follower::Mirror(settled(|| watcher.mirror(ptr)).await)
            } else {
                Follower::Watch(settled(|| watcher.watch(ptr)).await, 1)
            };
            let mut out = MirrorPair {
                ptr,
                changes: 0,
                unknown: 0,
                went_back: None,
                converged_after: None,
                mismatch: None,
            };
            let mut seen = 0;
            let started = Instant::now();
            let mut advanced = Duration::ZERO;
            while Instant::now() < stop {
                // Records of 1,500 to 3,000 bytes, patched within their first 1,500.
                let written = if rng.random_range(0..3) == 0 {
                    let off = rng.random_range(0..1300u64);
                    let patch: Vec<u8> = (0..rng.random_range(1..200)).map(|_| rng.random()).collect();
                    writer.write_at(ptr, off, patch).await
                } else {
                    let data: Vec<u8> = (0..rng.random_range(1500..3000)).map(|_| rng.random()).collect();
                    writer.replace(ptr, data).await
                };
                match written {
                    Ok(_) => out.changes += 1,
                    // Lost with the connection or answered BUSY: applied or not, the
                    // last state is read once the writes stop.
                    Err(Error::Busy(_) | Error::Disconnected(_) | Error::Io(_) | Error::Timeout { .. }) => {
                        out.unknown += 1
                    }
                    Err(e) => {
                        out.mismatch = Some(format!("{ptr}: a write was refused: {e}"));
                        break;
                    }
                }
                let v = follower.version().await;
                if v < seen {
                    out.went_back = Some((seen, v));
                }
                if v > seen {
                    advanced = started.elapsed();
                }
                seen = seen.max(v);
            }
            // The record's last state (the writes have stopped): asked again while
            // BUSY or lost, like the setup; any other answer fails the run.
            let data = settled(|| writer.read(ptr)).await;
            let version = settled(|| writer.info(ptr)).await.version;
            let waited = Instant::now();
            while waited.elapsed() < Duration::from_secs(30) {
                if follower.holds(version, &data).await {
                    out.converged_after = Some(waited.elapsed());
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if out.converged_after.is_none() && out.mismatch.is_none() {
                out.mismatch = Some(format!(
                    "{ptr}: the {} is at version {} (last changed {:.1} s into the run), the record at version {version} ({} B)",
                    follower.kind(),
                    follower.version().await,
                    advanced.as_secs_f64(),
                    data.len()
                ));
            }
            (out, writer, watcher, follower)
        }));
    }
    let mut result = MirrorSoakResult::default();
    for t in tasks {
        let (pair, writer, watcher, follower) = t.await.expect("mirror task");
        result.pairs.push(pair);
        result.clients.push((writer, watcher, follower));
    }
    result
}

/// How [`mirror_soak`] follows a record: a mirror (a data watch: the bytes), or a
/// watch of its state (events, with the highest version heard).
#[derive(Debug)]
pub enum Follower {
    /// A copy kept by the bytes of each change.
    Mirror(netswap_client::Mirror),
    /// A watch, and the highest version its events told.
    Watch(netswap_client::Watch, u64),
}

impl Follower {
    /// The version it is at (a watch's events read first, without waiting).
    async fn version(&mut self) -> u64 {
        match self {
            Follower::Mirror(m) => {
                // The copy is kept up to date without its events: drop them.
                while m.try_next().is_some() {}
                m.version()
            }
            Follower::Watch(w, seen) => {
                while let Ok(Some(e)) = tokio::time::timeout(Duration::ZERO, w.next()).await {
                    *seen = (*seen).max(e.version);
                }
                *seen
            }
        }
    }

    /// Whether it holds the record's `version` (a mirror: with exactly `data`).
    async fn holds(&mut self, version: u64, data: &[u8]) -> bool {
        self.version().await == version
            && match self {
                Follower::Mirror(m) => m.with_data(|d, _| d == data),
                Follower::Watch(..) => true,
            }
    }

    fn kind(&self) -> &'static str {
        match self {
            Follower::Mirror(_) => "mirror",
            Follower::Watch(..) => "watch",
        }
    }
}

/// `call` again until it is not answered BUSY or lost (within a minute), for a setup
/// step that must succeed.
async fn settled<T, F: Future<Output = Result<T, Error>>>(call: impl Fn() -> F) -> T {
    let give_up = Instant::now() + Duration::from_secs(60);
    loop {
        match call().await {
            Ok(t) => return t,
            Err(e) if Instant::now() > give_up => panic!("still failing after a minute: {e}"),
            Err(Error::Busy(_) | Error::Disconnected(_) | Error::Io(_) | Error::Timeout { .. }) => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("{e}"),
        }
    }
}

/// One record of [`mirror_soak`] and its follower.
#[derive(Debug)]
pub struct MirrorPair {
    /// The record.
    pub ptr: Pointer,
    /// Writes acknowledged.
    pub changes: u64,
    /// Writes whose outcome is unknown (lost reply, BUSY).
    pub unknown: u64,
    /// A follower's version seen after a higher one: (highest seen, then seen).
    pub went_back: Option<(u64, u64)>,
    /// How long after the writes stopped the follower held the record's last state.
    pub converged_after: Option<Duration>,
    /// What the follower held instead, if it never did within 30 s.
    pub mismatch: Option<String>,
}

/// What [`mirror_soak`] found.
#[derive(Debug, Default)]
pub struct MirrorSoakResult {
    /// Each record's outcome.
    pub pairs: Vec<MirrorPair>,
    /// Each record's writer, follower's client and follower, still connected.
    pub clients: Vec<(Client, Client, Follower)>,
}

impl MirrorSoakResult {
    /// Closes every client at once: the records are orphans from now on.
    pub fn leave(&mut self) {
        for (writer, watcher, follower) in self.clients.drain(..) {
            drop(follower);
            writer.close();
            watcher.close();
        }
    }

    /// Whether every follower reached its record's last state and never went back.
    pub fn ok(&self) -> bool {
        self.pairs
            .iter()
            .all(|p| p.mismatch.is_none() && p.went_back.is_none())
    }

    /// One line: writes, unknown outcomes, the slowest convergence, failures.
    pub fn summary(&self) -> String {
        let changes: u64 = self.pairs.iter().map(|p| p.changes).sum();
        let unknown: u64 = self.pairs.iter().map(|p| p.unknown).sum();
        let slowest = self
            .pairs
            .iter()
            .filter_map(|p| p.converged_after)
            .max()
            .unwrap_or_default();
        let failed: Vec<String> = self
            .pairs
            .iter()
            .filter_map(|p| {
                p.mismatch.clone().or(p.went_back.map(|(a, b)| {
                    format!("{}: the follower went from version {a} back to {b}", p.ptr)
                }))
            })
            .collect();
        format!(
            "{} records followed (half by mirrors, half by watches) through other servers: {changes} writes acknowledged, {unknown} of unknown outcome; {} followers reached the record's last state (slowest {:.2} s after the writes stopped); {} failed{}",
            self.pairs.len(),
            self.pairs
                .iter()
                .filter(|p| p.converged_after.is_some())
                .count(),
            slowest.as_secs_f64(),
            failed.len(),
            failed
                .iter()
                .take(5)
                .map(|f| format!("\n  MIRROR {f}"))
                .collect::<String>()
        )
    }
}

/// A record's bytes and version as a soak task last saw them acknowledged.
type Known = (Vec<u8>, u64);

/// What [`soak`] found.
#[derive(Debug, Default)]
pub struct SoakResult {
    /// Operations issued.
    pub ops: u64,
    /// Deliberate disconnects.
    pub reconnects: u64,
    /// Records verified at the end.
    pub checked: u64,
    /// Records whose bytes or version differ from the last acknowledged write.
    pub mismatches: Vec<String>,
    /// Writes whose reply was lost with the connection (a server restart), each then
    /// found in exactly its old or its new state.
    pub unknown_outcomes: u64,
    /// Every record alive at the end; all their owners disconnect at the same moment
    /// at [`SoakResult::leave`].
    pub records: Vec<Pointer>,
    /// The clients, still connected (so that a soak run beside another can leave
    /// with it).
    pub clients: Vec<Client>,
}

impl SoakResult {
    /// Closes every client at once: their records are orphans from now on.
    pub fn leave(&mut self) {
        for c in self.clients.drain(..) {
            c.close();
        }
    }
}

/// Counts how many of `records` still exist, asking from a fresh identity (the soak's
/// records are readable by all).
pub async fn count_alive(addr: SocketAddr, records: &[Pointer]) -> usize {
    let c = Client::connect_with(
        addr,
        Options {
            local_addr: Some(IpAddr::from([127, 0, 0, 201])),
            ..Options::default()
        },
    )
    .await
    .expect("connect");
    // Many requests in flight at once on the one connection.
    let mut tasks = Vec::new();
    for chunk in records.chunks(records.len().div_ceil(64).max(1)) {
        let (c, chunk) = (c.clone(), chunk.to_vec());
        tasks.push(tokio::spawn(async move {
            let mut alive = 0;
            for p in chunk {
                loop {
                    match c.info(p).await {
                        Ok(_) => alive += 1,
                        Err(Error::AddressFault(_)) => {}
                        // Asking for many records that are gone is what a pointer
                        // scanner does: the server throttles it; wait and ask again.
                        Err(Error::Busy(_)) => {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                            continue;
                        }
                        Err(e) => panic!("unexpected {e}"),
                    }
                    break;
                }
            }
            alive
        }));
    }
    let mut alive = 0;
    for t in tasks {
        alive += t.await.expect("count task");
    }
    alive
}

/// A `netswap-server` process started for a long scenario, killed when dropped.
#[derive(Debug)]
pub struct ServerProcess {
    child: std::process::Child,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl ServerProcess {
    /// Starts `bin --listen 127.0.0.1:0 --threads 1 ARGS` and waits for its address.
    pub fn start(bin: &str, args: &[&str]) -> ServerProcess {
        ServerProcess::start_at(bin, "127.0.0.1:0".parse().expect("address"), args)
    }

    /// Like [`ServerProcess::start`] on a given address (a restart on the same port).
    /// Its log goes to the file `NETSWAP_SERVER_LOG` names (appended), if set.
    pub fn start_at(bin: &str, listen: SocketAddr, args: &[&str]) -> ServerProcess {
        let log = match std::env::var_os("NETSWAP_SERVER_LOG") {
            Some(path) => std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .expect("the server's log file")
                .into(),
            None => std::process::Stdio::null(),
        };
        let mut child = std::process::Command::new(bin)
            .args(["--listen", &listen.to_string(), "--threads", "1"])
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("server binary (build it: cargo build --release -p netswap-server)");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().expect("stdout")),
            &mut line,
        )
        .expect("the server prints its address");
        let addr = line
            .trim()
            .rsplit(' ')
            .next()
            .and_then(|a| a.parse().ok())
            .expect("netswap-server listening on ADDR");
        ServerProcess { child, addr }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its resident memory now, KiB (Linux /proc).
    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.pid())
    }

    /// Stops it with SIGKILL (no goodbye: its connections and leases are left as
    /// they are) and waits.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops it with SIGTERM (a clean shutdown: replies flushed, and with
    /// `--data-dir` a snapshot written) and waits; returns whether it exited 0.
    pub fn terminate(mut self) -> bool {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.child.wait().is_ok_and(|s| s.success())
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Resident memory of process `pid` in KiB (0 when it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Records written by many at once ([`hot_soak`]): each acknowledged write's
/// version, and what the record held at the end.
#[derive(Debug, Default)]
pub struct HotSoakResult {
    /// The records.
    pub records: Vec<Pointer>,
    /// Writes acknowledged.
    pub acknowledged: u64,
    /// Writes answered BUSY or lost with a connection (applied or not).
    pub unknown: u64,
    /// What broke a rule: two writes acknowledged with one version, a writer's
    /// versions going back, a last state that is no write's.
    pub mismatches: Vec<String>,
    /// The owners and writers, still connected.
    pub clients: Vec<Client>,
}

impl HotSoakResult {
    /// Closes every client at once: the records are orphans from now on.
    pub fn leave(&mut self) {
        for c in self.clients.drain(..) {
            c.close();
        }
    }

    /// One line: records, writes, unknown outcomes, failures.
    pub fn summary(&self) -> String {
        format!(
            "{} records written by {} writers each through every server: {} writes acknowledged, {} of unknown outcome, {} broken rules{}",
            self.records.len(),
            HOT_WRITERS,
            self.acknowledged,
            self.unknown,
            self.mismatches.len(),
            self.mismatches
                .iter()
                .take(5)
                .map(|m| format!("\n  HOT {m}"))
                .collect::<String>()
        )
    }
}

/// The writes of one record of [`hot_soak`].
#[derive(Default)]
struct HotWrites {
    /// Version -> the bytes acknowledged with it.
    versions: HashMap<u64, Vec<u8>>,
    /// The bytes of writes of unknown outcome.
    lost: Vec<Vec<u8>>,
}

/// Writers of each record in [`hot_soak`].
pub const HOT_WRITERS: u32 = 8;

/// `records` records, each written by [`HOT_WRITERS`] clients of their own
/// identities spread over `addrs` (so that on a gateway their writes queue behind one
/// another and are committed together), with REPLACEs of a few bytes naming the
/// writer and its count, for `dur`. Each record's owner (another identity) stays
/// connected. Then, for each record: no two acknowledged writes got one version, each
/// writer's versions rose, and the record holds the write acknowledged with its
/// version or, past every acknowledged one, a write of unknown outcome.
pub async fn hot_soak(addrs: &[SocketAddr], records: u32, dur: Duration) -> HotSoakResult {
    assert!(!addrs.is_empty(), "a server to soak");
    let stop = Instant::now() + dur;
    let options = |n: u32| Options {
        local_addr: Some(loopback(800 + n)),
        request_timeout: Some(Duration::from_secs(20)),
        ..Options::default()
    };
    let mut result = HotSoakResult::default();
    let mut tasks = Vec::new();
    for r in 0..records {
        let owner = Client::connect_with(addrs[r as usize % addrs.len()], options(r))
            .await
            .expect("the owner connects");
        let ptr = settled(|| owner.create(Access::READ | Access::WRITE, &b"-"[..])).await;
        result.records.push(ptr);
        result.clients.push(owner);
        for w in 0..HOT_WRITERS {
            let at = addrs[(r + w) as usize % addrs.len()];
            let me = records + r * HOT_WRITERS + w;
            tasks.push(tokio::spawn(async move {
                let c = Client::connect_with(at, options(me))
                    .await
                    .expect("a writer connects");
                let (mut acked, mut unknown) = (Vec::new(), Vec::new());
                let mut n = 0u64;
                let mut broken = None;
                while Instant::now() < stop {
                    n += 1;
                    let data = format!("{w}:{n}").into_bytes();
                    match c.replace(ptr, data.clone()).await {
                        Ok(v) => acked.push((v, data)),
                        Err(
                            Error::Busy(_)
                            | Error::Disconnected(_)
                            | Error::Io(_)
                            | Error::Timeout { .. },
                        ) => {
                            unknown.push(data);
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        Err(e) => {
                            broken =
                                Some(format!("{ptr}: writer {w}'s write {n} was refused: {e}"));
                            break;
                        }
                    }
                }
                (r, w, c, acked, unknown, broken)
            }));
        }
    }
    let mut by_record: Vec<HotWrites> = (0..records).map(|_| Default::default()).collect();
    for t in tasks {
        let (r, w, c, acked, unknown, broken) = t.await.expect("a hot writer");
        let ptr = result.records[r as usize];
        result.mismatches.extend(broken);
        result.acknowledged += acked.len() as u64;
        result.unknown += unknown.len() as u64;
        if let Some(pair) = acked.windows(2).find(|p| p[1].0 <= p[0].0) {
            result.mismatches.push(format!(
                "{ptr}: writer {w}'s versions went from {} to {}",
                pair[0].0, pair[1].0
            ));
        }
        let HotWrites { versions, lost } = &mut by_record[r as usize];
        for (v, data) in acked {
            if let Some(other) = versions.insert(v, data.clone()) {
                result.mismatches.push(format!(
                    "{ptr}: version {v} acknowledged to two writes ({} and {})",
                    String::from_utf8_lossy(&other),
                    String::from_utf8_lossy(&data)
                ));
            }
        }
        lost.extend(unknown);
        result.clients.push(c);
    }
    for (r, HotWrites { versions, lost }) in by_record.iter().enumerate() {
        let ptr = result.records[r];
        let reader = &result.clients[r];
        let data = settled(|| reader.read(ptr)).await.to_vec();
        let version = settled(|| reader.info(ptr)).await.version;
        let highest = versions.keys().max().copied().unwrap_or(1);
        let holds = match versions.get(&version) {
            Some(acked) => *acked == data,
            None => version > highest && lost.contains(&data),
        };
        if !holds || version < highest {
            result.mismatches.push(format!(
                "{ptr}: ends at version {version} with {:?}; the highest acknowledged is {highest} with {:?}",
                String::from_utf8_lossy(&data),
                versions.get(&highest).map(|d| String::from_utf8_lossy(d).into_owned())
            ));
        }
    }
    result
}
