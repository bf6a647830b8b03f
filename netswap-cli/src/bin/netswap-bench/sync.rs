//! `netswap-bench sync`: many players keeping an exact copy of one shared state record
//! while a writer changes a few bytes of it at a game's tick rate.
//!
//! Three ways, measured by the same code:
//! - `notify-read`: a v1 watch; on each NOTIFY the watcher READs the whole record.
//! - `delta`: a data watch; each NOTIFY carries the bytes that changed.
//! - `redis`: the usual Redis pattern: the writer does SETRANGE then PUBLISH, each
//!   subscriber GETs the key on each message (a second connection, as a subscribed
//!   RESP2 connection cannot send GET).
//!
//! Reported: bytes on the wire per update per watcher (both directions, every byte the
//! watchers' and the writer's sockets carried while the writer ran), and the time from the write's
//! acknowledgement to each watcher holding the new bytes (0 when a watcher had them
//! before the writer had its acknowledgement). At the end every copy is compared
//! with the record, byte for byte.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use clap::ValueEnum;
use hdrhistogram::Histogram;
use netswap_proto::{
    Access, Inbound, MAX_MESSAGE, Opcode, OutQueue, Pointer, Reassembler, ReassemblyLimits,
    Receiver, Reply, Request, Version, WatchOptions,
};
use rand::{Rng, SeedableRng};
use redis_protocol::resp2::decode::decode_bytes_mut;
use redis_protocol::resp2::encode::extend_encode;
use redis_protocol::resp2::types::BytesFrame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Barrier, watch};

use crate::{loopback, raw_connect};

/// How the watchers keep their copies.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum How {
    /// netswap v1 watch, then READ the whole record on each NOTIFY.
    NotifyRead,
    /// netswap data watch: the NOTIFY carries the changed bytes.
    Delta,
    /// Redis: SETRANGE + PUBLISH; subscribers GET.
    Redis,
}

/// What to run.
pub struct Spec {
    pub server: SocketAddr,
    pub redis: SocketAddr,
    pub how: How,
    pub watchers: usize,
    pub size: usize,
    pub change: usize,
    pub rate: f64,
    pub updates: u64,
    pub interval_ms: u32,
}

/// Watcher connections per source address (the server's per-IP limit is 256).
const PER_ADDRESS: usize = 200;

/// State every task shares.
struct Run {
    /// When each update (by version or sequence number) was acknowledged.
    acks: Mutex<Vec<Option<Instant>>>,
    /// Bytes are counted while this is set (the writer's run).
    measuring: AtomicBool,
    bytes: AtomicU64,
    /// Copies that had to be read again (a gap or a change without bytes).
    rereads: AtomicU64,
    stop: watch::Sender<bool>,
    ready: Barrier,
}

impl Run {
    fn count(&self, n: usize) {
        if self.measuring.load(Ordering::Relaxed) {
            self.bytes.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}

/// What one watcher ended with: when it held which version, and its copy.
struct Held {
    holds: Vec<(u64, Instant)>,
    copy: Vec<u8>,
}

/// Resolves when the run is told to stop.
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

fn other(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// A netswap connection speaking raw frames (so its bytes can be counted).
struct Wire {
    stream: TcpStream,
    rx: Receiver,
    out: BytesMut,
}

impl Wire {
    async fn connect(server: SocketAddr, from: usize) -> std::io::Result<Wire> {
        Ok(Wire {
            stream: raw_connect(server, Some(loopback(from))).await?,
            rx: Receiver::new(
                Reassembler::new(ReassemblyLimits {
                    max_message_bytes: MAX_MESSAGE,
                    max_partial_messages: usize::MAX,
                    max_partial_bytes: u64::MAX,
                }),
                64 * 1024,
            ),
            out: BytesMut::new(),
        })
    }

    async fn send(&mut self, xid: u32, req: &Request, run: &Run) -> std::io::Result<()> {
        let mut q = OutQueue::new();
        q.push(req.encode(xid)).map_err(other)?;
        self.out.clear();
        q.write_to(&mut self.out, usize::MAX);
        run.count(self.out.len());
        self.stream.write_all(&self.out).await
    }

    /// The next message: (xid, reply parsed as an answer to `op`, or as a NOTIFY).
    async fn next(
        &mut self,
        op_of: impl Fn(u32) -> Option<Opcode>,
        run: &Run,
    ) -> std::io::Result<(u32, Reply)> {
        loop {
            match self.rx.next_inbound().map_err(|e| other(e.error))? {
                Some(Inbound::Message(m)) => {
                    let reply = Reply::parse(op_of(m.xid), m.op, m.arg, m.payload)
                        .map_err(|e| other(e.0))?;
                    return Ok((m.xid, reply));
                }
                Some(Inbound::Refused { reason, .. }) => return Err(other(reason)),
                None => {}
            }
            let n = netswap_client::raw::read_frames(&self.stream, &mut self.rx).await?;
            if n == 0 {
                return Err(other("the server closed the connection"));
            }
            run.count(n);
        }
    }
}

async fn netswap_writer(
    spec: &Spec,
    run: &Run,
    ptr_tx: &watch::Sender<Option<Pointer>>,
) -> std::io::Result<()> {
    let mut w = Wire::connect(spec.server, 0).await?;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
    let initial: Vec<u8> = (0..spec.size).map(|_| rng.random()).collect();
    w.send(
        1,
        &Request::Create {
            access: Access::READ | Access::WRITE,
            data: initial.into(),
        },
        run,
    )
    .await?;
    let ptr = match w.next(|_| Some(Opcode::Create), run).await?.1 {
        Reply::Created(p) => p,
        r => return Err(other(format!("create: {r:?}"))),
    };
    ptr_tx.send_replace(Some(ptr));
    run.ready.wait().await;
    run.measuring.store(true, Ordering::Relaxed);
    let start = tokio::time::Instant::now();
    for k in 0..spec.updates {
        tokio::time::sleep_until(start + Duration::from_secs_f64(k as f64 / spec.rate)).await;
        let offset = rng.random_range(0..=(spec.size - spec.change)) as u64;
        let data: Vec<u8> = (0..spec.change).map(|_| rng.random()).collect();
        w.send(
            2,
            &Request::WriteAt {
                ptr,
                offset,
                data: data.into(),
            },
            run,
        )
        .await?;
        match w.next(|_| Some(Opcode::WriteAt), run).await?.1 {
            Reply::Written(v) => {
                let mut acks = run.acks.lock().unwrap();
                if acks.len() <= v as usize {
                    acks.resize(v as usize + 1, None);
                }
                acks[v as usize] = Some(Instant::now());
            }
            r => return Err(other(format!("write: {r:?}"))),
        }
    }
    Ok(())
}

async fn netswap_watcher(spec: &Spec, run: &Run, n: usize, ptr: Pointer) -> std::io::Result<Held> {
    let mut w = Wire::connect(spec.server, 1 + n / PER_ADDRESS).await?;
    let data = spec.how == How::Delta;
    let options = WatchOptions {
        data,
        state: true,
        min_interval_ms: spec.interval_ms,
    };
    let watch = Request::Watch { ptr, options };
    let mut watch_xid = 1;
    w.send(watch_xid, &watch, run).await?;
    let mut held = Held {
        holds: Vec::new(),
        copy: Vec::new(),
    };
    let mut version: Version = 0;
    let mut next_xid = 10u32;
    // READs in flight: xid -> the version the NOTIFY announced.
    let mut reads: std::collections::HashMap<u32, Version> = Default::default();
    let mut stop = run.stop.subscribe();
    let mut ready = false;
    loop {
        let (xid, reply) = tokio::select! {
            r = w.next(|x| Some(if reads.contains_key(&x) { Opcode::Read } else { Opcode::Watch }), run) => r?,
            _ = stopped(&mut stop) => return Ok(held),
        };
        match reply {
            // The watch's OK (the first, or after a re-read): the whole state.
            Reply::Watching(info, bytes) if xid == watch_xid => {
                if data {
                    held.copy = bytes.to_vec();
                    version = info.version;
                    held.holds.push((version, Instant::now()));
                } else {
                    // v1: read the record once to start from.
                    reads.insert(next_xid, info.version);
                    w.send(next_xid, &Request::Read { ptr, range: None }, run)
                        .await?;
                    next_xid += 1;
                }
                if !ready {
                    ready = true;
                    run.ready.wait().await;
                }
            }
            Reply::Data(bytes) => {
                if let Some(v) = reads.remove(&xid) {
                    held.copy = bytes.to_vec();
                    version = version.max(v);
                    held.holds.push((version, Instant::now()));
                }
            }
            Reply::Notify {
                event: netswap_proto::Event::Changed,
                version: v,
                delta,
                ..
            } if xid == watch_xid => match delta {
                Some(d) if d.base == version => {
                    d.apply_to(&mut held.copy);
                    version = v;
                    held.holds.push((version, Instant::now()));
                }
                _ if v <= version => {}
                _ if data => {
                    // A gap, or a change without its bytes: watch again for a copy.
                    run.rereads.fetch_add(1, Ordering::Relaxed);
                    watch_xid = next_xid;
                    next_xid += 1;
                    w.send(watch_xid, &watch, run).await?;
                }
                _ => {
                    reads.insert(next_xid, v);
                    w.send(next_xid, &Request::Read { ptr, range: None }, run)
                        .await?;
                    next_xid += 1;
                }
            },
            _ => {}
        }
    }
}

/// Sends RESP commands and reads their replies (counting every byte).
struct Resp {
    stream: TcpStream,
    rbuf: BytesMut,
    wbuf: BytesMut,
}

fn command(args: &[&[u8]]) -> BytesFrame {
    BytesFrame::Array(
        args.iter()
            .map(|a| BytesFrame::BulkString(Bytes::copy_from_slice(a)))
            .collect(),
    )
}

impl Resp {
    async fn connect(server: SocketAddr, from: usize) -> std::io::Result<Resp> {
        Ok(Resp {
            stream: raw_connect(server, Some(loopback(from))).await?,
            rbuf: BytesMut::with_capacity(64 * 1024),
            wbuf: BytesMut::new(),
        })
    }

    async fn send(&mut self, commands: &[BytesFrame], run: &Run) -> std::io::Result<()> {
        self.wbuf.clear();
        for c in commands {
            extend_encode(&mut self.wbuf, c, false).map_err(other)?;
        }
        run.count(self.wbuf.len());
        self.stream.write_all(&self.wbuf).await
    }

    async fn next(&mut self, run: &Run) -> std::io::Result<BytesFrame> {
        loop {
            if let Some((frame, _, _)) = decode_bytes_mut(&mut self.rbuf).map_err(other)? {
                if let BytesFrame::Error(e) = &frame {
                    return Err(other(format!("Redis: {e}")));
                }
                return Ok(frame);
            }
            if self.rbuf.capacity() - self.rbuf.len() < 16 * 1024 {
                self.rbuf.reserve(64 * 1024);
            }
            let n = self.stream.read_buf(&mut self.rbuf).await?;
            if n == 0 {
                return Err(other("Redis closed the connection"));
            }
            run.count(n);
        }
    }
}

const KEY: &[u8] = b"netswap-bench:sync";
const CHANNEL: &[u8] = b"netswap-bench:sync:changes";

async fn redis_writer(spec: &Spec, run: &Run) -> std::io::Result<()> {
    let mut r = Resp::connect(spec.redis, 0).await?;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
    let initial: Vec<u8> = (0..spec.size).map(|_| rng.random()).collect();
    r.send(&[command(&[b"SET", KEY, &initial])], run).await?;
    r.next(run).await?;
    run.ready.wait().await;
    run.measuring.store(true, Ordering::Relaxed);
    let start = tokio::time::Instant::now();
    for k in 0..spec.updates {
        tokio::time::sleep_until(start + Duration::from_secs_f64(k as f64 / spec.rate)).await;
        let offset = rng.random_range(0..=(spec.size - spec.change));
        let data: Vec<u8> = (0..spec.change).map(|_| rng.random()).collect();
        let seq = (k + 2).to_string(); // the same numbering as netswap's versions
        r.send(
            &[
                command(&[b"SETRANGE", KEY, offset.to_string().as_bytes(), &data]),
                command(&[b"PUBLISH", CHANNEL, seq.as_bytes()]),
            ],
            run,
        )
        .await?;
        r.next(run).await?; // SETRANGE: the write is acknowledged
        let v = k + 2;
        {
            let mut acks = run.acks.lock().unwrap();
            if acks.len() <= v as usize {
                acks.resize(v as usize + 1, None);
            }
            acks[v as usize] = Some(Instant::now());
        }
        r.next(run).await?; // PUBLISH
    }
    Ok(())
}

async fn redis_watcher(spec: &Spec, run: &Run, n: usize) -> std::io::Result<Held> {
    let from = 1 + n / PER_ADDRESS;
    let mut sub = Resp::connect(spec.redis, from).await?;
    let mut cmd = Resp::connect(spec.redis, from).await?;
    sub.send(&[command(&[b"SUBSCRIBE", CHANNEL])], run).await?;
    sub.next(run).await?;
    cmd.send(&[command(&[b"GET", KEY])], run).await?;
    let mut held = Held {
        holds: Vec::new(),
        copy: Vec::new(),
    };
    // GETs in flight, with the sequence number that asked for each (FIFO).
    let mut gets: std::collections::VecDeque<u64> = [1].into();
    let mut stop = run.stop.subscribe();
    let mut ready = false;
    loop {
        tokio::select! {
            m = sub.next(run) => {
                if let BytesFrame::Array(parts) = m?
                    && let Some(BytesFrame::BulkString(seq)) = parts.get(2)
                {
                    let seq: u64 = std::str::from_utf8(seq).ok().and_then(|s| s.parse().ok()).unwrap_or(0);
                    gets.push_back(seq);
                    cmd.send(&[command(&[b"GET", KEY])], run).await?;
                }
            }
            v = cmd.next(run) => {
                if let BytesFrame::BulkString(bytes) = v? {
                    let seq = gets.pop_front().unwrap_or(0);
                    held.copy = bytes.to_vec();
                    held.holds.push((seq, Instant::now()));
                    if !ready {
                        ready = true;
                        run.ready.wait().await;
                    }
                }
            }
            _ = stopped(&mut stop) => return Ok(held),
        }
    }
}

/// The record's bytes at the end, read by a connection of its own.
async fn truth(spec: &Spec, ptr: Option<Pointer>, run: &Run) -> std::io::Result<Vec<u8>> {
    match (spec.how, ptr) {
        (How::Redis, _) => {
            let mut r = Resp::connect(spec.redis, 0).await?;
            r.send(&[command(&[b"GET", KEY])], run).await?;
            match r.next(run).await? {
                BytesFrame::BulkString(b) => Ok(b.to_vec()),
                f => Err(other(format!("GET: {f:?}"))),
            }
        }
        (_, Some(ptr)) => {
            let mut w = Wire::connect(spec.server, 0).await?;
            w.send(1, &Request::Read { ptr, range: None }, run).await?;
            match w.next(|_| Some(Opcode::Read), run).await?.1 {
                Reply::Data(d) => Ok(d.to_vec()),
                r => Err(other(format!("read: {r:?}"))),
            }
        }
        _ => Err(other("no record")),
    }
}

/// Runs the scenario and prints (or returns as JSON) what it measured.
pub fn sync(spec: Spec, json: bool) -> Result<(), String> {
    if spec.change > spec.size || spec.size == 0 {
        return Err("--change must be at most --size, which must not be 0".into());
    }
    let rt = crate::runtime()?;
    let spec = Arc::new(spec);
    let run = Arc::new(Run {
        acks: Mutex::new(Vec::new()),
        measuring: AtomicBool::new(false),
        bytes: AtomicU64::new(0),
        rereads: AtomicU64::new(0),
        stop: watch::channel(false).0,
        ready: Barrier::new(spec.watchers + 1),
    });
    let result = rt.block_on(async {
        let (ptr_tx, mut ptr_rx) = watch::channel(None);
        let writer = {
            let (spec, run) = (spec.clone(), run.clone());
            tokio::spawn(async move {
                match spec.how {
                    How::Redis => redis_writer(&spec, &run).await,
                    _ => netswap_writer(&spec, &run, &ptr_tx).await,
                }
            })
        };
        let ptr = if spec.how == How::Redis {
            None
        } else {
            let p = ptr_rx.wait_for(|p| p.is_some()).await.map_err(other)?;
            *p
        };
        let mut watchers = Vec::new();
        for n in 0..spec.watchers {
            let (spec, run) = (spec.clone(), run.clone());
            watchers.push(tokio::spawn(async move {
                match (spec.how, ptr) {
                    (How::Redis, _) => redis_watcher(&spec, &run, n).await,
                    (_, Some(p)) => netswap_watcher(&spec, &run, n, p).await,
                    _ => unreachable!("netswap modes have a record"),
                }
            }));
        }
        let started = Instant::now();
        writer.await.map_err(other)??;
        let wrote_for = started.elapsed();
        // Let the last notifications arrive, then stop counting and collect.
        tokio::time::sleep(Duration::from_millis(500)).await;
        run.measuring.store(false, Ordering::Relaxed);
        run.stop.send_replace(true);
        let mut held = Vec::new();
        for w in watchers {
            held.push(w.await.map_err(other)??);
        }
        let want = truth(&spec, ptr, &run).await?;
        Ok::<_, std::io::Error>((held, want, wrote_for))
    });
    let (held, want, wrote_for) = result.map_err(|e| e.to_string())?;
    let acks = run.acks.lock().unwrap().clone();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("histogram");
    let mut missing = 0u64;
    let mut exact = 0usize;
    for h in &held {
        if h.copy == want {
            exact += 1;
        }
        let mut i = 0;
        for (v, ack) in acks.iter().enumerate() {
            let Some(ack) = ack else { continue };
            while i < h.holds.len() && h.holds[i].0 < v as u64 {
                i += 1;
            }
            match h.holds.get(i) {
                Some((_, t)) => {
                    let ns = t.saturating_duration_since(*ack).as_nanos() as u64;
                    hist.record(ns.max(1)).expect("in range");
                }
                None => missing += 1,
            }
        }
    }
    let updates = spec.updates;
    let per = run.bytes.load(Ordering::Relaxed) as f64 / (updates as f64 * spec.watchers as f64);
    let q = |p| hist.value_at_quantile(p) as f64 / 1000.0;
    let how = match spec.how {
        How::NotifyRead => "notify-read",
        How::Delta => "delta",
        How::Redis => "redis",
    };
    if json {
        println!(
            "{}",
            serde_json::json!({
                "mode": "sync", "how": how, "watchers": spec.watchers, "size": spec.size,
                "change": spec.change, "rate": spec.rate, "updates": updates,
                "interval_ms": spec.interval_ms,
                "bytes_per_update_per_watcher": per,
                "p50_us": q(0.5), "p99_us": q(0.99), "max_us": hist.max() as f64 / 1000.0,
                "samples": hist.len(), "missing": missing,
                "copies_exact": exact, "rereads": run.rereads.load(Ordering::Relaxed),
                "seconds": wrote_for.as_secs_f64(),
            })
        );
    } else {
        println!(
            "sync {how}: {} watchers, {}-byte record, {} bytes changed {} times a second, {updates} updates in {:.1} s",
            spec.watchers,
            spec.size,
            spec.change,
            spec.rate,
            wrote_for.as_secs_f64()
        );
        println!("  {per:.1} bytes on the wire per update per watcher (both directions)");
        println!(
            "  write acknowledged -> watcher holds the bytes: p50 {:.1} us, p99 {:.1} us, max {:.1} us ({} samples, {missing} missing)",
            q(0.5),
            q(0.99),
            hist.max() as f64 / 1000.0,
            hist.len()
        );
        println!(
            "  {exact} of {} copies byte-identical to the record at the end ({} re-reads)",
            held.len(),
            run.rereads.load(Ordering::Relaxed)
        );
    }
    if exact != held.len() {
        return Err(format!(
            "{} of {} copies differ from the record",
            held.len() - exact,
            held.len()
        ));
    }
    Ok(())
}
