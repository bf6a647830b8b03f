//! One TCP connection to a server.
//!
//! Callers put whole messages on a shared fair [`OutQueue`]; a writer task cuts them
//! into frames round-robin (so a large upload does not block a small read issued
//! later) and writes them in batches. A reader task reassembles replies and routes
//! each to its caller by XID; NOTIFYs go to the client's watch table. Many requests in
//! flight at once is the normal case. When the connection ends, every waiting call
//! learns it at once.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use netswap_proto::{
    HelloInfo, Inbound, MAX_MESSAGE, Opcode, OutQueue, Pointer, RESERVED_XID, Reassembler,
    ReassemblyLimits, Receiver, Reply, Request, WatchOptions, WriteBuf,
};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream, lookup_host};
use tokio::sync::{Notify, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::client::Shared;
use crate::error::{Error, Result};
use crate::options::Options;
use crate::raw;

/// Bytes reserved per read.
const READ_CHUNK: usize = 64 * 1024;
/// Requests given up on (timed out, cancelled) after they left, whose replies have not
/// come: past this many, the server is not answering and the connection is replaced.
const MAX_ABANDONED: usize = 65_536;

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

enum Route {
    /// A call waiting for its one reply.
    Call {
        op: Opcode,
        tx: oneshot::Sender<Result<Reply>>,
    },
    /// A watch of the client's watch table (group `id`, record `ptr`): first its
    /// acknowledgement (`ack`), then NOTIFYs.
    Watch {
        id: u64,
        ptr: Pointer,
        ack: Option<AwaitedAck>,
    },
    /// A reply nobody waits for any more (given up on, or an UNWATCH sent on drop);
    /// the XID stays taken until it arrives. `then_free` is a watch XID to free too.
    Discard { then_free: Option<u32> },
}

/// A WATCH whose acknowledgement has not arrived yet.
struct AwaitedAck {
    /// The caller waiting for it; `None` once it gave up (timed out, or its future
    /// was dropped). The acknowledgement is applied all the same when it comes: the
    /// server has moved the record's watch to this XID by then.
    tx: Option<oneshot::Sender<Result<Reply>>>,
    /// What the WATCH asked for (what the server will send once it is applied).
    options: WatchOptions,
    /// The XID of the watch this one replaces on the same record (freed once this
    /// one is acknowledged: the server sends nothing on it any more).
    replaces: Option<u32>,
}

#[derive(Default)]
struct Routes {
    map: HashMap<u32, Route>,
    /// `Discard` routes of requests given up on.
    abandoned: usize,
}

/// One connection. See the module documentation.
pub(crate) struct Conn {
    /// Which connection of its client this is (1, 2, … after reconnects).
    pub generation: u64,
    pub peer: SocketAddr,
    hello: OnceLock<HelloInfo>,
    out: Mutex<OutQueue>,
    wake_writer: Notify,
    routes: Mutex<Routes>,
    next_xid: AtomicU32,
    closed: AtomicBool,
    close_reason: Mutex<Option<String>>,
    ended: watch::Sender<bool>,
    /// When the last bytes came from the server (ms since `born`).
    last_rx_ms: AtomicU64,
    born: Instant,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// Where NOTIFYs and watch acknowledgements go.
    client: Weak<Shared>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("generation", &self.generation)
            .field("peer", &self.peer)
            .finish()
    }
}

impl Conn {
    /// Connects, starts the reader and writer, and asks HELLO, all within the connect
    /// timeout.
    pub async fn open(
        addr: &str,
        options: &Options,
        generation: u64,
        client: Weak<Shared>,
    ) -> Result<Arc<Conn>> {
        let started = Instant::now();
        let timeout = |what: &str| Error::Timeout {
            what: format!("{what} {addr}"),
            waited: started.elapsed(),
            in_flight: 0,
        };
        let stream = tokio::time::timeout(options.connect_timeout, open(addr, options))
            .await
            .map_err(|_| timeout("a connection to"))??;
        let peer = stream.peer_addr()?;
        stream.set_nodelay(true)?;
        #[cfg(target_os = "linux")]
        let _ = socket2::SockRef::from(&stream).set_tcp_notsent_lowat(netswap_proto::NOTSENT_LOWAT);
        let (rd, wr) = stream.into_split();
        let conn = Arc::new(Conn {
            generation,
            peer,
            hello: OnceLock::new(),
            out: Mutex::new(OutQueue::new()),
            wake_writer: Notify::new(),
            routes: Mutex::new(Routes::default()),
            next_xid: AtomicU32::new(1),
            closed: AtomicBool::new(false),
            close_reason: Mutex::new(None),
            ended: watch::channel(false).0,
            last_rx_ms: AtomicU64::new(0),
            born: Instant::now(),
            tasks: Mutex::new(Vec::new()),
            client,
        });
        let reader = tokio::spawn(read_loop(conn.clone(), rd));
        let writer = tokio::spawn(write_loop(conn.clone(), wr));
        lock(&conn.tasks).extend([reader, writer]);
        // HELLO before the connection is shared: the limits it reports size requests.
        let deadline = started + options.connect_timeout;
        let reply = conn
            .start(&Request::Hello)?
            .wait(started, Some(deadline))
            .await;
        match reply {
            Ok(Reply::Hello(h)) => {
                let _ = conn.hello.set(h);
                Ok(conn)
            }
            Ok(r) => {
                conn.kill("bad HELLO".into());
                Err(Error::BadReply(format!("unexpected reply to HELLO: {r:?}")))
            }
            Err(Error::Timeout { .. }) => {
                conn.kill("no answer to HELLO".into());
                Err(timeout("HELLO from"))
            }
            Err(e) => {
                conn.kill(e.to_string());
                Err(e)
            }
        }
    }

    /// What the server said at connect time.
    pub fn hello(&self) -> &HelloInfo {
        self.hello
            .get()
            .expect("set before the connection is shared")
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Why the connection ended, as the error calls get.
    pub fn disconnected(&self) -> Error {
        Error::Disconnected(
            lock(&self.close_reason)
                .clone()
                .unwrap_or_else(|| "the connection is closed".into()),
        )
    }

    /// Resolves when the connection has ended.
    pub async fn ended(&self) {
        let mut rx = self.ended.subscribe();
        let _ = rx.wait_for(|e| *e).await;
    }

    /// How long nothing has come from the server.
    pub fn quiet_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_rx_ms.load(Ordering::Relaxed));
        self.born.elapsed().saturating_sub(last)
    }

    /// Requests waiting for a reply (watches not counted once acknowledged).
    pub fn in_flight(&self) -> usize {
        lock(&self.routes)
            .map
            .values()
            .filter(|r| {
                matches!(
                    r,
                    Route::Call { .. }
                        | Route::Watch {
                            ack: Some(AwaitedAck { tx: Some(_), .. }),
                            ..
                        }
                )
            })
            .count()
    }

    /// Bytes of requests not yet handed to the writer.
    pub fn unsent_bytes(&self) -> usize {
        lock(&self.out).pending_bytes()
    }

    /// Takes a free XID (never the reserved one, never one still in use) and routes
    /// its reply.
    fn register(&self, route: Route) -> Result<u32> {
        let mut routes = lock(&self.routes);
        if self.is_closed() {
            return Err(self.disconnected());
        }
        loop {
            let xid = self.next_xid.fetch_add(1, Ordering::Relaxed);
            if xid != RESERVED_XID && !routes.map.contains_key(&xid) {
                routes.map.insert(xid, route);
                return Ok(xid);
            }
        }
    }

    fn send(&self, request: &Request, xid: u32) {
        let msg = request.encode(xid);
        lock(&self.out)
            .push(msg)
            .expect("request size checked before sending");
        self.wake_writer.notify_one();
    }

    /// Sends a request; its reply comes through the returned [`Pending`].
    pub fn start(self: &Arc<Self>, request: &Request) -> Result<Pending> {
        let (tx, rx) = oneshot::channel();
        let op = request.opcode();
        let xid = self.register(Route::Call { op, tx })?;
        self.send(request, xid);
        Ok(Pending {
            conn: self.clone(),
            xid,
            rx,
            what: describe(op, request.pointer()),
            done: false,
        })
    }

    /// Sends a WATCH for the client's watch `id` (replacing the watch with XID
    /// `replaces` on the same record, if any). Its acknowledgement is handed to the
    /// client's watch table first, then to the returned [`Pending`].
    pub fn start_watch(
        self: &Arc<Self>,
        id: u64,
        request: &Request,
        replaces: Option<u32>,
    ) -> Result<(u32, Pending)> {
        let Request::Watch { ptr, options } = *request else {
            unreachable!("start_watch sends WATCHes only");
        };
        let (tx, rx) = oneshot::channel();
        let xid = self.register(Route::Watch {
            id,
            ptr,
            ack: Some(AwaitedAck {
                tx: Some(tx),
                options,
                replaces,
            }),
        })?;
        self.send(request, xid);
        Ok((
            xid,
            Pending {
                conn: self.clone(),
                xid,
                rx,
                what: describe(Opcode::Watch, request.pointer()),
                done: false,
            },
        ))
    }

    /// Ends watch `xid` on `ptr` without waiting: its XID stays taken until the
    /// UNWATCH's reply arrives, so no late NOTIFY can reach a new call with that XID.
    pub fn unwatch(&self, ptr: Pointer, xid: u32) {
        {
            let mut routes = lock(&self.routes);
            match routes.map.get_mut(&xid) {
                Some(r @ Route::Watch { .. }) => *r = Route::Discard { then_free: None },
                _ => return, // already ended (deleted), or never acknowledged
            }
        }
        if let Ok(x) = self.register(Route::Discard {
            then_free: Some(xid),
        }) {
            self.send(&Request::Unwatch { ptr }, x);
        }
    }

    /// A request nobody waits for any more (timed out, or its future was dropped):
    /// taken back if it has not left yet, else its reply will be discarded.
    fn abandon(&self, xid: u32) {
        let unsent = lock(&self.out).remove_unstarted(xid);
        let mut routes = lock(&self.routes);
        match routes.map.get_mut(&xid) {
            None | Some(Route::Discard { .. }) => return,
            Some(_) if unsent => {
                routes.map.remove(&xid);
                return;
            }
            // A WATCH that left is applied by the server whenever it gets there (and
            // moves the record's watch away from any earlier XID): its late
            // acknowledgement must still reach the watch table, which registers it or
            // ends it. Discarding it left a watch the client never heard again. It
            // counts as given up on until then, as a discarded reply does.
            Some(Route::Watch { ack: Some(ack), .. }) => ack.tx = None,
            // Acknowledged already (the caller went before it looked): the watch
            // table has it, and ends it when its last member goes.
            Some(Route::Watch { ack: None, .. }) => return,
            Some(r) => *r = Route::Discard { then_free: None },
        }
        routes.abandoned += 1;
        let too_many = routes.abandoned > MAX_ABANDONED;
        drop(routes);
        if too_many {
            self.kill(format!(
                "over {MAX_ABANDONED} requests were given up on without a reply: the server is not answering"
            ));
        }
    }

    /// Ends the connection now: every waiting call fails, the tasks stop.
    pub fn kill(&self, reason: String) {
        self.fail_all(reason);
        for t in lock(&self.tasks).drain(..) {
            t.abort();
        }
    }

    /// Every waiting call fails; watches learn through the client.
    fn fail_all(&self, reason: String) {
        {
            let mut r = lock(&self.close_reason);
            if r.is_none() {
                *r = Some(reason);
            }
        }
        self.closed.store(true, Ordering::Release);
        let routes = std::mem::take(&mut lock(&self.routes).map);
        for (_, route) in routes {
            match route {
                Route::Call { tx, .. }
                | Route::Watch {
                    ack: Some(AwaitedAck { tx: Some(tx), .. }),
                    ..
                } => {
                    let _ = tx.send(Err(self.disconnected()));
                }
                _ => {}
            }
        }
        self.wake_writer.notify_one();
        self.ended.send_replace(true);
    }

    fn deliver(&self, xid: u32, status: u8, arg: u8, payload: Bytes) {
        let mut routes = lock(&self.routes);
        let Some(route) = routes.map.remove(&xid) else {
            return; // a reply to no one (e.g. the reserved XID before a close)
        };
        match route {
            Route::Call { op, tx } => {
                drop(routes);
                let reply =
                    Reply::parse(Some(op), status, arg, payload).map_err(|e| Error::BadReply(e.0));
                let _ = tx.send(reply);
            }
            Route::Discard { then_free } => {
                if let Some(w) = then_free {
                    routes.map.remove(&w);
                } else {
                    routes.abandoned = routes.abandoned.saturating_sub(1);
                }
            }
            Route::Watch {
                id,
                ptr: watched,
                ack,
            } => {
                let reply =
                    Reply::parse(ack.is_some().then_some(Opcode::Watch), status, arg, payload)
                        .map_err(|e| Error::BadReply(e.0));
                let Some(client) = self.client.upgrade() else {
                    return;
                };
                let acknowledged = Route::Watch {
                    id,
                    ptr: watched,
                    ack: None,
                };
                match ack {
                    Some(AwaitedAck {
                        tx,
                        options,
                        replaces,
                    }) => {
                        let ok = matches!(reply, Ok(Reply::Done | Reply::Watching(..)));
                        if tx.is_none() {
                            routes.abandoned = routes.abandoned.saturating_sub(1);
                        }
                        if ok {
                            routes.map.insert(xid, acknowledged);
                            if let Some(old) = replaces {
                                routes.map.remove(&old);
                            }
                        }
                        drop(routes);
                        // The watch table learns first, so it knows this XID before
                        // the first NOTIFY on it is delivered. A watch nobody on this
                        // client wants any more (its caller gave up and left) is ended.
                        if let (true, Ok(r)) = (ok, &reply) {
                            client.watch_acknowledged(self, id, watched, xid, options, r);
                        }
                        if let Some(tx) = tx {
                            let _ = tx.send(reply);
                        }
                    }
                    None => {
                        let Ok(Reply::Notify {
                            event,
                            ptr,
                            version,
                            delta,
                        }) = reply
                        else {
                            routes.map.insert(xid, acknowledged);
                            return; // not a NOTIFY: ignored
                        };
                        if event != netswap_proto::Event::Deleted {
                            routes.map.insert(xid, acknowledged);
                        }
                        // Deleted: the watch has ended and its XID is free.
                        drop(routes);
                        client.notified(id, self.generation, xid, event, ptr, version, delta);
                    }
                }
            }
        }
    }
}

/// "READ of 9c1f03e27a4b5d10", for errors.
pub(crate) fn describe(op: Opcode, ptr: Option<Pointer>) -> String {
    match ptr {
        Some(p) => format!("{} of {p}", op.name()),
        None => op.name().to_string(),
    }
}

/// A request in flight. Dropping it before its reply gives the request up: it is
/// taken back if it has not left yet, so cancelled calls leave nothing behind.
pub(crate) struct Pending {
    conn: Arc<Conn>,
    xid: u32,
    rx: oneshot::Receiver<Result<Reply>>,
    what: String,
    done: bool,
}

impl Pending {
    /// Waits for the reply until `deadline` (counted from `started`). Replies that are
    /// errors become [`Error`]s.
    pub async fn wait(mut self, started: Instant, deadline: Option<Instant>) -> Result<Reply> {
        let reply = match deadline {
            None => (&mut self.rx).await,
            Some(d) => match tokio::time::timeout_at(d, &mut self.rx).await {
                Ok(r) => r,
                Err(_) => {
                    let in_flight = self.conn.in_flight();
                    return Err(Error::Timeout {
                        what: std::mem::take(&mut self.what),
                        waited: started.elapsed(),
                        in_flight,
                    });
                }
            },
        };
        self.done = true;
        let reply = reply.map_err(|_| self.conn.disconnected())??;
        match reply {
            Reply::Error { status, reason } => Err(Error::from_status(status, reason.into_owned())),
            Reply::Conflict(current) => Err(Error::Conflict { current }),
            r => Ok(r),
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.done {
            self.conn.abandon(self.xid);
        }
    }
}

async fn open(addr: &str, options: &Options) -> Result<TcpStream> {
    let mut last = None;
    for addr in lookup_host(addr).await? {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if let Some(ip) = options.local_addr {
            if ip.is_ipv4() != addr.is_ipv4() {
                continue;
            }
            socket.bind(SocketAddr::new(ip, 0))?;
        }
        if let Some(bytes) = options.receive_buffer {
            socket.set_recv_buffer_size(bytes)?;
        }
        match socket.connect(addr).await {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(Error::Io(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no address to connect to (or none of the local address's family)",
        )
    })))
}

async fn read_loop(conn: Arc<Conn>, rd: OwnedReadHalf) {
    let reasm = Reassembler::new(ReassemblyLimits {
        max_message_bytes: MAX_MESSAGE,
        max_partial_messages: usize::MAX,
        max_partial_bytes: u64::MAX,
    });
    let mut rx = Receiver::new(reasm, READ_CHUNK);
    let reason = loop {
        let n = match crate::raw::read_frames(rd.as_ref(), &mut rx).await {
            Ok(0) => break "the server closed the connection".to_string(),
            Ok(n) => n,
            Err(e) => break format!("read failed: {e}"),
        };
        conn.last_rx_ms
            .store(conn.born.elapsed().as_millis() as u64, Ordering::Relaxed);
        let mut broken = None;
        loop {
            match rx.next_inbound() {
                Ok(None) => break,
                Ok(Some(Inbound::Message(m))) => {
                    if m.xid == RESERVED_XID {
                        // The server speaks for itself just before closing.
                        let reason = String::from_utf8_lossy(&m.payload).into_owned();
                        *lock(&conn.close_reason) =
                            Some(format!("the server closed the connection: {reason}"));
                    } else if m.op == netswap_proto::Status::ProtocolError as u8 {
                        let reason = String::from_utf8_lossy(&m.payload).into_owned();
                        *lock(&conn.close_reason) =
                            Some(format!("the server reported a protocol error: {reason}"));
                        conn.deliver(m.xid, m.op, m.arg, m.payload);
                    } else {
                        conn.deliver(m.xid, m.op, m.arg, m.payload);
                    }
                }
                Ok(Some(Inbound::Refused { .. })) => {}
                Err(e) => {
                    broken = Some(format!("the server's framing is broken: {}", e.error));
                    break;
                }
            }
        }
        if let Some(b) = broken {
            break b;
        }
        if n >= READ_CHUNK / 2 {
            // A large reply is streaming in: let the tasks it just answered run now,
            // not after tokio's budget of reads (megabytes later).
            tokio::task::yield_now().await;
        }
    };
    conn.fail_all(reason);
}

async fn write_loop(conn: Arc<Conn>, mut wr: OwnedWriteHalf) {
    // Vectored writes: large payloads go to the kernel from the caller's buffers.
    let mut buf = WriteBuf::new();
    loop {
        let written = raw::write_frames(&mut wr, &mut buf, raw::MAX_CLIENT_WRITE, |b| {
            b.fill(&mut lock(&conn.out), raw::WRITE_CHUNK);
        })
        .await;
        if let Err(e) = written {
            conn.fail_all(format!("write failed: {e}"));
            return;
        }
        if conn.is_closed() {
            let _ = wr.shutdown().await;
            return;
        }
        conn.wake_writer.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_receive_buffer_option_sets_the_socket_s() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let size = |s: &TcpStream| socket2::SockRef::from(s).recv_buffer_size().unwrap();
        let default = size(&open(&addr, &Options::default()).await.unwrap());
        let options = Options {
            receive_buffer: Some(40_000),
            ..Options::default()
        };
        // Linux doubles the value for its bookkeeping; the range excludes the kernel's
        // default (tcp_rmem: 128 KiB).
        let set = size(&open(&addr, &options).await.unwrap());
        assert!(
            (40_000..=80_000).contains(&set),
            "SO_RCVBUF {set} (default {default})"
        );
    }
}
