//! The same load, in other servers' protocols, so that one client design measures
//! every server: memcached's binary protocol and Redis's RESP (GET/SET on keys
//! `key:%012d`, preloaded so that every GET hits).

use std::collections::VecDeque;
use std::net::SocketAddr;
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
    let key = format!("key:{key:012}");
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
    let key = format!("key:{key:012}");
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

/// Stores every key once (pipelined SETs) so that GETs hit.
pub(super) async fn resp_preload(
    server: SocketAddr,
    keys: usize,
    value: &[u8],
) -> std::io::Result<()> {
    let mut s = raw_connect(server, None).await?;
    let mut rbuf = BytesMut::with_capacity(64 * 1024);
    for chunk in (0..keys).collect::<Vec<_>>().chunks(1024) {
        let mut out = BytesMut::new();
        for k in chunk {
            resp_request(&mut out, true, *k, value);
        }
        s.write_all(&out).await?;
        let mut seen = 0;
        while seen < chunk.len() {
            match resp_reply(&mut rbuf)? {
                Some(true) => seen += 1,
                Some(false) => return Err(other("a preloading SET failed")),
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
pub(super) async fn drive_resp(spec: Arc<LoadSpec>, conn_no: usize) -> std::io::Result<Tally> {
    let mut stream = raw_connect(spec.server, None).await?;
    let set = spec.op != Op::Read;
    let keys = spec.keys.len();
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
        resp_request(&mut wbuf, set, key_of(counter, keys), &spec.value);
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
                resp_request(&mut wbuf, set, key_of(counter, keys), &spec.value);
                sent_at.push_back(Instant::now());
            }
        }
    }
    Ok(tally)
}
