//! A raw-frame test client: it speaks the protocol through `netswap-proto` only, so
//! tests can also send what no well-behaved client would.
#![allow(dead_code)]

use std::collections::HashMap;
use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use netswap_proto::*;
use netswap_server::{RunningServer, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// A reply as received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Msg {
    pub xid: u32,
    pub status: u8,
    pub arg: u8,
    pub payload: Bytes,
}

impl Msg {
    pub fn status(&self) -> Status {
        Status::from_u8(self.status).expect("known status")
    }
    pub fn reason(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }
}

pub mod cluster;
pub mod proxy;

pub fn server(tweak: impl FnOnce(&mut ServerConfig)) -> RunningServer {
    server_on(Backend::Memory, tweak)
}

/// Where a test server keeps its records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// The embedded store.
    Memory,
    /// A gateway on the shared Redis Cluster ([`cluster::shared`]), with keys of its
    /// own (a random prefix), so tests do not see each other's records.
    Cluster,
    /// The same, with the read cache on (`--redis-read-cache`): every rule must hold
    /// with READs answered from it.
    ClusterReadCache,
}

/// The identity key every test gateway shares.
pub const GATEWAY_KEY: &[u8] = b"netswap test gateways";

/// Options for a gateway on the shared cluster under `prefix`.
pub fn cluster_options(prefix: &str) -> netswap_server::ClusterOptions {
    let nodes = cluster::shared().nodes().join(",");
    let mut o = netswap_server::ClusterOptions::parse(&format!("redis-cluster://{nodes}")).unwrap();
    o.prefix = prefix.to_string();
    o.lease_ttl = Duration::from_secs(2);
    // Without the read cache (the default), so that every READ of these tests goes
    // through a load; the cache's tests turn it on (`Backend::ClusterReadCache`,
    // `read_cached` in tests/cluster.rs).
    o.read_cache = 0;
    o
}

/// A fresh key prefix, so that a test's records are its own.
pub fn fresh_prefix() -> String {
    format!("t{:016x}", rand::random::<u64>())
}

pub fn server_on(backend: Backend, tweak: impl FnOnce(&mut ServerConfig)) -> RunningServer {
    let mut c = ServerConfig::new("127.0.0.1:0".parse().unwrap());
    if backend != Backend::Memory {
        let mut o = cluster_options(&fresh_prefix());
        if backend == Backend::ClusterReadCache {
            o.read_cache = 65_536;
        }
        c.cluster = Some(o);
        c.identity_key = IdentityKey::new(GATEWAY_KEY);
    }
    tweak(&mut c);
    netswap_server::spawn(c, 1).expect("server starts")
}

/// Runs `test` on both backends: `memory::name`, `cluster::name`, and
/// `cluster_read_cache::name` (the cluster with the read cache on).
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::Memory).await
                }
            )*
        }
        mod cluster {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::Cluster).await
                }
            )*
        }
        mod cluster_read_cache {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::ClusterReadCache).await
                }
            )*
        }
    };
}

/// 127.0.0.N as a local address: a different identity per N.
pub fn local(n: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, n])
}

/// The `n`th of many local addresses in 127.`block`.x.y (tests with thousands of
/// identities; `block` 0 is the other tests' 127.0.0.N).
pub fn many(block: u8, n: usize) -> IpAddr {
    IpAddr::from([127, block, (n / 250) as u8, (n % 250 + 1) as u8])
}

pub struct Raw {
    pub stream: TcpStream,
    buf: BytesMut,
    reasm: Reassembler,
    stash: VecDeque<Msg>,
    next_xid: u32,
}

impl Raw {
    pub async fn connect(addr: SocketAddr, from: u8) -> Raw {
        Raw::connect_socket(addr, local(from), TcpSocket::new_v4().unwrap()).await
    }

    /// Connects from any local address (tests with thousands of identities).
    pub async fn connect_from(addr: SocketAddr, from: IpAddr) -> Raw {
        Raw::connect_socket(addr, from, TcpSocket::new_v4().unwrap()).await
    }

    /// Connects with a small receive buffer (a slow or stuck reader fills it soon).
    pub async fn connect_with_recv_buffer(addr: SocketAddr, from: u8, bytes: u32) -> Raw {
        let sock = TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(bytes).unwrap();
        Raw::connect_socket(addr, local(from), sock).await
    }

    async fn connect_socket(addr: SocketAddr, from: IpAddr, sock: TcpSocket) -> Raw {
        sock.bind(SocketAddr::new(from, 0)).unwrap();
        let stream = sock.connect(addr).await.expect("connects");
        stream.set_nodelay(true).unwrap();
        Raw {
            stream,
            buf: BytesMut::new(),
            reasm: Reassembler::new(ReassemblyLimits {
                max_message_bytes: MAX_MESSAGE,
                max_partial_messages: 1000,
                max_partial_bytes: u64::MAX,
            }),
            stash: VecDeque::new(),
            next_xid: 1,
        }
    }

    pub fn xid(&mut self) -> u32 {
        let x = self.next_xid;
        self.next_xid += 1;
        x
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    pub fn frames(msg: OutMessage) -> Vec<u8> {
        let mut q = OutQueue::new();
        q.push(msg).unwrap();
        let mut out = BytesMut::new();
        q.write_to(&mut out, usize::MAX);
        out.to_vec()
    }

    pub async fn send(&mut self, xid: u32, req: &Request) {
        let bytes = Self::frames(req.encode(xid));
        self.send_raw(&bytes).await;
    }

    /// The next message from the server, or `None` when it closed the connection.
    pub async fn recv(&mut self) -> Option<Msg> {
        if let Some(m) = self.stash.pop_front() {
            return Some(m);
        }
        self.recv_wire().await
    }

    async fn recv_wire(&mut self) -> Option<Msg> {
        loop {
            while let Some(f) = decode_frame(&mut self.buf).expect("server framing is valid") {
                match self.reasm.push(f).expect("server framing is valid") {
                    Some(Inbound::Message(m)) => {
                        return Some(Msg {
                            xid: m.xid,
                            status: m.op,
                            arg: m.arg,
                            payload: m.payload,
                        });
                    }
                    Some(r) => panic!("unexpected refusal {r:?}"),
                    None => {}
                }
            }
            let read =
                tokio::time::timeout(Duration::from_secs(20), self.stream.read_buf(&mut self.buf))
                    .await
                    .expect("the server answers within 20 s");
            match read {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    /// The reply with this XID (others are kept for later `recv`s).
    pub async fn reply_to(&mut self, xid: u32) -> Msg {
        if let Some(i) = self.stash.iter().position(|m| m.xid == xid) {
            return self.stash.remove(i).unwrap();
        }
        loop {
            let m = self.recv_wire().await.expect("connection open");
            if m.xid == xid {
                return m;
            }
            self.stash.push_back(m);
        }
    }

    pub async fn call(&mut self, req: Request) -> Msg {
        let xid = self.xid();
        self.send(xid, &req).await;
        self.reply_to(xid).await
    }

    /// Sends and parses the typed reply.
    pub async fn ask(&mut self, req: Request) -> Reply {
        let op = req.opcode();
        let m = self.call(req).await;
        Reply::parse(Some(op), m.status, m.arg, m.payload).expect("well-formed reply")
    }

    pub async fn create(&mut self, access: Access, data: impl Into<Bytes>) -> Pointer {
        match self
            .ask(Request::Create {
                access,
                data: data.into(),
            })
            .await
        {
            Reply::Created(p) => p,
            r => panic!("create: {r:?}"),
        }
    }

    pub async fn read(&mut self, ptr: Pointer) -> Reply {
        self.ask(Request::Read { ptr, range: None }).await
    }

    /// Waits until the server closes the connection, returning what it sent first.
    pub async fn until_closed(&mut self) -> Vec<Msg> {
        let mut got: Vec<Msg> = self.stash.drain(..).collect();
        while let Some(m) = self.recv_wire().await {
            got.push(m);
        }
        got
    }
}

pub fn data(b: &[u8]) -> Reply {
    Reply::Data(Bytes::copy_from_slice(b))
}

/// `GET http://ADDR/PATH` on a server's metrics listener: the status and the body.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    match ureq::get(format!("http://{addr}{path}")).call() {
        Ok(r) => (r.status().as_u16(), r.into_body().read_to_string().unwrap()),
        Err(ureq::Error::StatusCode(code)) => (code, String::new()),
        Err(e) => panic!("GET {path}: {e}"),
    }
}

/// `/metrics`, parsed into `name{labels}` → value.
pub fn scrape(addr: SocketAddr) -> HashMap<String, f64> {
    let (status, body) = http_get(addr, "/metrics");
    assert_eq!(status, 200, "GET /metrics");
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

pub fn metric(m: &HashMap<String, f64>, key: &str) -> f64 {
    *m.get(key).unwrap_or(&0.0)
}
