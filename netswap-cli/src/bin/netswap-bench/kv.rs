//! The same load, in other servers' protocols, so that one client design measures
//! every server: memcached's binary protocol and Redis's RESP (GET/SET on keys
//! `key:%012d`, preloaded so that every GET hits), on one Redis or on a Redis Cluster
//! (`resp-cluster`: each connection talks to one primary, with the keys whose slots
//! it serves, as `redis-benchmark --cluster` does).

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use bytes::{BufMut, BytesMut};
use clap::ValueEnum;
use redis_protocol::resp2::decode::decode_bytes_mut;
use redis_protocol::resp2::types::BytesFrame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{LoadSpec, Op, Picker, Tally, raw_connect, read_more};

fn other(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// Which key request `n` uses (the same spread as netswap's pointers).
/// memcached binary-protocol request: GET (0x00) or SET (0x01) of key `n`.
fn mc_request(out: &mut BytesMut, set: bool, key: usize, value: &[u8], opaque: u32) {
    let key = key_name(key, RespLayout::Plain);
    let extras = if set { 8 } else { 0 };
    let body = extras + key.len() + if set { value.len() } else { 0 };
    out.put_u8(0x80);
    out.put_u8(if set { 0x01 } else { 0x00 });
    out.put_u16(key.len() as u16);
    out.put_u8(extras as u8);
    out.put_u8(0);
    out.put_u16(0);
    out.put_u32(body as u32);
    out.put_u32(opaque);
    out.put_u64(0);
    if set {
        out.put_u64(0); // flags, expiration
    }
    out.put_slice(key.as_bytes());
    if set {
        out.put_slice(value);
    }
}

/// Stores every key once so that GETs hit.
pub(super) async fn mc_preload(
    server: SocketAddr,
    keys: usize,
    value: &[u8],
) -> std::io::Result<()> {
    let mut s = raw_connect(server, None).await?;
    let mut out = BytesMut::new();
    for k in 0..keys {
        mc_request(&mut out, true, k, value, k as u32);
    }
    s.write_all(&out).await?;
    let mut buf = BytesMut::new();
    let mut seen = 0;
    while seen < keys {
        s.read_buf(&mut buf).await?;
        while buf.len() >= 24 {
            let body = u32::from_be_bytes(buf[8..12].try_into().unwrap()) as usize;
            if buf.len() < 24 + body {
                break;
            }
            let _ = buf.split_to(24 + body);
            seen += 1;
        }
    }
    Ok(())
}

/// One memcached connection keeping `pipeline` requests in flight.
pub(super) async fn drive_memcached(spec: Arc<LoadSpec>, conn_no: usize) -> std::io::Result<Tally> {
    let mut stream = raw_connect(spec.server, None).await?;
    let p = spec.pipeline;
    let set = spec.op != Op::Read;
    let keys = spec.keys.len();
    let mut sent_at = vec![Instant::now(); p];
    let mut wbuf = BytesMut::with_capacity(64 * 1024);
    let mut rbuf = BytesMut::with_capacity(256 * 1024);
    let mut tally = Tally::new();
    let mut counter = (conn_no as u64) << 40;
    let mut inflight = 0usize;
    let picker = Picker::new(keys, spec.zipf);
    let key_of = |n: u64| picker.pick(n);
    for (slot, sent) in sent_at.iter_mut().enumerate() {
        if !spec.take() {
            break;
        }
        counter += 1;
        mc_request(&mut wbuf, set, key_of(counter), &spec.value, slot as u32);
        *sent = Instant::now();
        inflight += 1;
    }
    loop {
        if !wbuf.is_empty() {
            tally.bytes += wbuf.len() as u64;
            stream.write_all(&wbuf).await?;
            wbuf.clear();
        }
        if inflight == 0 {
            break;
        }
        let now = read_more(&mut stream, &mut rbuf, &mut tally, &spec).await?;
        while rbuf.len() >= 24 {
            let body = u32::from_be_bytes(rbuf[8..12].try_into().unwrap()) as usize;
            if rbuf.len() < 24 + body {
                break;
            }
            let status = u16::from_be_bytes(rbuf[6..8].try_into().unwrap());
            let slot = u32::from_be_bytes(rbuf[12..16].try_into().unwrap()) as usize;
            let _ = rbuf.split_to(24 + body);
            inflight -= 1;
            tally.ops += 1;
            if status != 0 {
                tally.errors += 1;
            }
            let _ = tally
                .hist
                .record((now - sent_at[slot]).as_nanos().max(1) as u64);
            if spec.take() {
                counter += 1;
                mc_request(&mut wbuf, set, key_of(counter), &spec.value, slot as u32);
                sent_at[slot] = Instant::now();
                inflight += 1;
            }
        }
    }
    Ok(tally)
}

/// How the RESP keys hold their values, and so what a read and a write are.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub(super) enum RespLayout {
    /// A string per key: `GET`, `SET`.
    Plain,
    /// A hash per key, `{d: value, v: version}`: a read is `HGET key d`; a write
    /// replaces the value and adds one to the version atomically, as a netswap
    /// REPLACE does, with `MULTI`, `HSET key d value`, `HINCRBY key v 1`, `EXEC` in
    /// one round trip.
    VersionedMulti,
    /// The same, with the write as one Lua script (`EVALSHA`): `HGET` of the version,
    /// `HSET` of the value and the version + 1 (the shape of a compare-and-set).
    VersionedScript,
}

/// The Lua script of [`RespLayout::VersionedScript`]'s writes.
const VERSIONED_WRITE: &str = "local v = redis.call('HGET', KEYS[1], 'v') \
redis.call('HSET', KEYS[1], 'd', ARGV[1], 'v', (tonumber(v) or 0) + 1) return 1";

/// One RESP command (an array of bulk strings), encoded as a client library would.
fn resp_command(out: &mut BytesMut, args: &[&[u8]]) {
    out.put_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.put_slice(format!("${}\r\n", a.len()).as_bytes());
        out.put_slice(a);
        out.put_slice(b"\r\n");
    }
}

/// A read or a write of `key` in `layout`; returns how many replies it gets.
fn resp_request(
    out: &mut BytesMut,
    layout: RespLayout,
    sha: &str,
    set: bool,
    key: usize,
    value: &[u8],
) -> usize {
    let key = key_name(key, layout);
    let k = key.as_bytes();
    match (layout, set) {
        (RespLayout::Plain, false) => resp_command(out, &[b"GET", k]),
        (RespLayout::Plain, true) => resp_command(out, &[b"SET", k, value]),
        (_, false) => resp_command(out, &[b"HGET", k, b"d"]),
        (RespLayout::VersionedMulti, true) => {
            resp_command(out, &[b"MULTI"]);
            resp_command(out, &[b"HSET", k, b"d", value]);
            resp_command(out, &[b"HINCRBY", k, b"v", b"1"]);
            resp_command(out, &[b"EXEC"]);
            return 4;
        }
        (RespLayout::VersionedScript, true) => {
            resp_command(out, &[b"EVALSHA", sha.as_bytes(), b"1", k, value])
        }
    }
    1
}

/// What the keys are stored as before a run: a `SET`, or an `HSET` of `d` and `v`.
fn resp_preload_request(out: &mut BytesMut, layout: RespLayout, key: usize, value: &[u8]) {
    let key = key_name(key, layout);
    match layout {
        RespLayout::Plain => resp_command(out, &[b"SET", key.as_bytes(), value]),
        _ => resp_command(out, &[b"HSET", key.as_bytes(), b"d", value, b"v", b"0"]),
    }
}

/// The next complete reply in `rbuf`, decoded by `redis-protocol`: `Some(true)` for a
/// success (a value, or OK), `Some(false)` for an error or a miss.
fn resp_reply(rbuf: &mut BytesMut) -> std::io::Result<Option<bool>> {
    Ok(decode_bytes_mut(rbuf)
        .map_err(other)?
        .map(|(frame, _, _)| !matches!(frame, BytesFrame::Error(_) | BytesFrame::Null)))
}

/// Where RESP connections go: one Redis, or the primaries of a cluster, each with
/// the keys (numbers of `key:%012d`) it serves.
pub(super) struct RespTargets {
    targets: Vec<(SocketAddr, Vec<usize>)>,
    layout: RespLayout,
    /// The SHA1 of [`VERSIONED_WRITE`], once loaded on every server.
    sha: String,
}

impl RespTargets {
    /// One server with every key.
    pub fn single(server: SocketAddr, keys: usize, layout: RespLayout) -> RespTargets {
        RespTargets {
            targets: vec![(server, (0..keys).collect())],
            layout,
            sha: String::new(),
        }
    }

    /// The primaries of the cluster `seed` belongs to (from `CLUSTER SLOTS`), each with
    /// the keys in its slots. Primaries that would get no key are left out.
    pub async fn cluster(
        seed: SocketAddr,
        keys: usize,
        layout: RespLayout,
    ) -> std::io::Result<RespTargets> {
        let mut s = raw_connect(seed, None).await?;
        s.write_all(b"*2\r\n$7\r\nCLUSTER\r\n$5\r\nSLOTS\r\n")
            .await?;
        let mut rbuf = BytesMut::with_capacity(16 * 1024);
        let frame = loop {
            if let Some((frame, _, _)) = decode_bytes_mut(&mut rbuf).map_err(other)? {
                break frame;
            }
            if s.read_buf(&mut rbuf).await? == 0 {
                return Err(other("the server closed the connection"));
            }
        };
        let ranges = slot_ranges(&frame, seed.ip())?;
        let mut targets: Vec<(SocketAddr, Vec<usize>)> = Vec::new();
        for k in 0..keys {
            let slot = redis_protocol::redis_keyslot(key_name(k, layout).as_bytes());
            let addr = ranges
                .iter()
                .find(|(a, b, _)| (*a..=*b).contains(&slot))
                .map(|r| r.2)
                .ok_or_else(|| other(format!("slot {slot} is not served: is the cluster up?")))?;
            match targets.iter_mut().find(|t| t.0 == addr) {
                Some(t) => t.1.push(k),
                None => targets.push((addr, vec![k])),
            }
        }
        targets.sort_by_key(|t| t.0);
        Ok(RespTargets {
            targets,
            layout,
            sha: String::new(),
        })
    }

    /// Connection `conn_no`'s server and keys (connections go round the servers).
    fn of(&self, conn_no: usize) -> (SocketAddr, &[usize]) {
        let (addr, keys) = &self.targets[conn_no % self.targets.len()];
        (*addr, keys)
    }

    /// How many servers.
    pub fn servers(&self) -> usize {
        self.targets.len()
    }
}

/// `(first slot, last slot, primary)` from a `CLUSTER SLOTS` reply (an empty host
/// means the address the question went to).
fn slot_ranges(frame: &BytesFrame, seed: IpAddr) -> std::io::Result<Vec<(u16, u16, SocketAddr)>> {
    let bad = || other("unexpected CLUSTER SLOTS reply (is this a cluster node?)");
    let int = |f: &BytesFrame| match f {
        BytesFrame::Integer(i) => Ok(*i),
        _ => Err(bad()),
    };
    let BytesFrame::Array(ranges) = frame else {
        return Err(bad());
    };
    let mut out = Vec::new();
    for r in ranges {
        let BytesFrame::Array(r) = r else {
            return Err(bad());
        };
        let [start, end, primary, ..] = r.as_slice() else {
            return Err(bad());
        };
        let BytesFrame::Array(node) = primary else {
            return Err(bad());
        };
        let [host, port, ..] = node.as_slice() else {
            return Err(bad());
        };
        let ip = match host {
            BytesFrame::BulkString(h) if h.is_empty() => seed,
            BytesFrame::BulkString(h) => std::str::from_utf8(h)
                .ok()
                .and_then(|h| h.parse().ok())
                .ok_or_else(bad)?,
            _ => return Err(bad()),
        };
        let port = u16::try_from(int(port)?).map_err(|_| bad())?;
        let (start, end) = (int(start)?, int(end)?);
        out.push((start as u16, end as u16, SocketAddr::new(ip, port)));
    }
    Ok(out)
}

/// The name of key number `k`.
fn key_name(k: usize, layout: RespLayout) -> String {
    match layout {
        RespLayout::Plain => format!("key:{k:012}"),
        // Hashes: other names than the strings of plain runs on the same server.
        _ => format!("vkey:{k:012}"),
    }
}

/// Stores every key once (pipelined SETs, each on the server that serves it) so that
/// GETs hit.
/// With [`RespLayout::VersionedScript`], also loads its script on every server.
pub(super) async fn resp_preload(targets: &mut RespTargets, value: &[u8]) -> std::io::Result<()> {
    for (server, keys) in &targets.targets {
        resp_preload_one(*server, keys, targets.layout, value).await?;
        if targets.layout == RespLayout::VersionedScript {
            targets.sha = resp_load_script(*server).await?;
        }
    }
    Ok(())
}

/// `SCRIPT LOAD` of [`VERSIONED_WRITE`]: its SHA1.
async fn resp_load_script(server: SocketAddr) -> std::io::Result<String> {
    let mut s = raw_connect(server, None).await?;
    let mut out = BytesMut::new();
    resp_command(&mut out, &[b"SCRIPT", b"LOAD", VERSIONED_WRITE.as_bytes()]);
    s.write_all(&out).await?;
    let mut rbuf = BytesMut::with_capacity(1024);
    loop {
        if let Some((frame, _, _)) = decode_bytes_mut(&mut rbuf).map_err(other)? {
            return match frame {
                BytesFrame::BulkString(b) => Ok(String::from_utf8_lossy(&b).into_owned()),
                f => Err(other(format!("SCRIPT LOAD on {server}: {f:?}"))),
            };
        }
        if s.read_buf(&mut rbuf).await? == 0 {
            return Err(other("the server closed the connection"));
        }
    }
}

async fn resp_preload_one(
    server: SocketAddr,
    keys: &[usize],
    layout: RespLayout,
    value: &[u8],
) -> std::io::Result<()> {
    let mut s = raw_connect(server, None).await?;
    let mut rbuf = BytesMut::with_capacity(64 * 1024);
    for chunk in keys.chunks(1024) {
        let mut out = BytesMut::new();
        for k in chunk {
            resp_preload_request(&mut out, layout, *k, value);
        }
        s.write_all(&out).await?;
        let mut seen = 0;
        while seen < chunk.len() {
            match resp_reply(&mut rbuf)? {
                Some(true) => seen += 1,
                Some(false) => {
                    return Err(other(format!(
                        "preloading {} on {server} got an error (a Redis Cluster node? use --protocol resp-cluster)",
                        key_name(chunk[0], layout)
                    )));
                }
                None => {
                    if s.read_buf(&mut rbuf).await? == 0 {
                        return Err(other("the server closed the connection"));
                    }
                }
            }
        }
    }
    Ok(())
}

/// One RESP connection keeping `pipeline` requests in flight (replies come in order).
/// A reply that is an error (a MOVED included) counts as a failed request.
pub(super) async fn drive_resp(
    spec: Arc<LoadSpec>,
    targets: Arc<RespTargets>,
    conn_no: usize,
) -> std::io::Result<Tally> {
    let (server, own) = targets.of(conn_no);
    let mut stream = raw_connect(server, None).await?;
    let set = spec.op != Op::Read;
    let keys = own.len();
    let picker = Picker::new(keys, spec.zipf);
    let key_of = |n: u64| own[picker.pick(n)];
    let (layout, sha) = (targets.layout, targets.sha.as_str());
    // Each request's start, replies still to come, and whether all were good so far.
    let mut sent_at: VecDeque<(Instant, usize, bool)> = VecDeque::with_capacity(spec.pipeline);
    let mut wbuf = BytesMut::with_capacity(64 * 1024);
    let mut rbuf = BytesMut::with_capacity(256 * 1024);
    let mut tally = Tally::new();
    let mut counter = (conn_no as u64) << 40;
    for _ in 0..spec.pipeline {
        if !spec.take() {
            break;
        }
        counter += 1;
        let replies = resp_request(&mut wbuf, layout, sha, set, key_of(counter), &spec.value);
        sent_at.push_back((Instant::now(), replies, true));
    }
    loop {
        if !wbuf.is_empty() {
            tally.bytes += wbuf.len() as u64;
            stream.write_all(&wbuf).await?;
            wbuf.clear();
        }
        if sent_at.is_empty() {
            break;
        }
        let now = read_more(&mut stream, &mut rbuf, &mut tally, &spec).await?;
        while let Some(ok) = resp_reply(&mut rbuf)? {
            let front = sent_at
                .front_mut()
                .ok_or_else(|| other("a reply to nothing"))?;
            front.1 -= 1;
            front.2 &= ok;
            if front.1 > 0 {
                continue; // a MULTI's OK and QUEUEDs: the request ends with its EXEC
            }
            let (sent, _, ok) = sent_at.pop_front().expect("looked at above");
            tally.ops += 1;
            if !ok {
                tally.errors += 1;
            }
            let _ = tally.hist.record((now - sent).as_nanos().max(1) as u64);
            if spec.take() {
                counter += 1;
                let replies =
                    resp_request(&mut wbuf, layout, sha, set, key_of(counter), &spec.value);
                sent_at.push_back((Instant::now(), replies, true));
            }
        }
    }
    Ok(tally)
}
