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
use redis_protocol::resp2::decode::decode_bytes_mut;
use redis_protocol::resp2::types::BytesFrame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{LoadSpec, Op, Tally, raw_connect, read_more};

fn other(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// Which key request `n` uses (the same spread as netswap's pointers).
fn key_of(n: u64, keys: usize) -> usize {
    (n.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 20) as usize % keys
}

/// memcached binary-protocol request: GET (0x00) or SET (0x01) of key `n`.
fn mc_request(out: &mut BytesMut, set: bool, key: usize, value: &[u8], opaque: u32) {
    let key = key_name(key);
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
    let key_of = |n: u64| key_of(n, keys);
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

/// RESP request: `GET key` or `SET key value`, encoded as a client library would.
fn resp_request(out: &mut BytesMut, set: bool, key: usize, value: &[u8]) {
    let key = key_name(key);
    if set {
        out.put_slice(b"*3\r\n$3\r\nSET\r\n");
    } else {
        out.put_slice(b"*2\r\n$3\r\nGET\r\n");
    }
    out.put_slice(format!("${}\r\n", key.len()).as_bytes());
    out.put_slice(key.as_bytes());
    out.put_slice(b"\r\n");
    if set {
        out.put_slice(format!("${}\r\n", value.len()).as_bytes());
        out.put_slice(value);
        out.put_slice(b"\r\n");
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
}

impl RespTargets {
    /// One server with every key.
    pub fn single(server: SocketAddr, keys: usize) -> RespTargets {
        RespTargets {
            targets: vec![(server, (0..keys).collect())],
        }
    }

    /// The primaries of the cluster `seed` belongs to (from `CLUSTER SLOTS`), each with
    /// the keys in its slots. Primaries that would get no key are left out.
    pub async fn cluster(seed: SocketAddr, keys: usize) -> std::io::Result<RespTargets> {
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
            let slot = redis_protocol::redis_keyslot(key_name(k).as_bytes());
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
        Ok(RespTargets { targets })
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
fn key_name(k: usize) -> String {
    format!("key:{k:012}")
}

/// Stores every key once (pipelined SETs, each on the server that serves it) so that
/// GETs hit.
pub(super) async fn resp_preload(targets: &RespTargets, value: &[u8]) -> std::io::Result<()> {
    for (server, keys) in &targets.targets {
        resp_preload_one(*server, keys, value).await?;
    }
    Ok(())
}

async fn resp_preload_one(server: SocketAddr, keys: &[usize], value: &[u8]) -> std::io::Result<()> {
    let mut s = raw_connect(server, None).await?;
    let mut rbuf = BytesMut::with_capacity(64 * 1024);
    for chunk in keys.chunks(1024) {
        let mut out = BytesMut::new();
        for k in chunk {
            resp_request(&mut out, true, *k, value);
        }
        s.write_all(&out).await?;
        let mut seen = 0;
        while seen < chunk.len() {
            match resp_reply(&mut rbuf)? {
                Some(true) => seen += 1,
                Some(false) => {
                    return Err(other(format!(
                        "a preloading SET on {server} got an error (a Redis Cluster node? use --protocol resp-cluster)"
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
    let key_of = |n: u64| own[key_of(n, keys)];
    let mut sent_at: VecDeque<Instant> = VecDeque::with_capacity(spec.pipeline);
    let mut wbuf = BytesMut::with_capacity(64 * 1024);
    let mut rbuf = BytesMut::with_capacity(256 * 1024);
    let mut tally = Tally::new();
    let mut counter = (conn_no as u64) << 40;
    for _ in 0..spec.pipeline {
        if !spec.take() {
            break;
        }
        counter += 1;
        resp_request(&mut wbuf, set, key_of(counter), &spec.value);
        sent_at.push_back(Instant::now());
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
            let sent = sent_at
                .pop_front()
                .ok_or_else(|| other("a reply to nothing"))?;
            tally.ops += 1;
            if !ok {
                tally.errors += 1;
            }
            let _ = tally.hist.record((now - sent).as_nanos().max(1) as u64);
            if spec.take() {
                counter += 1;
                resp_request(&mut wbuf, set, key_of(counter), &spec.value);
                sent_at.push_back(Instant::now());
            }
        }
    }
    Ok(tally)
}
