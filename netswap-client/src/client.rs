//! The async client: one TCP connection shared by any number of tasks.
//!
//! Callers put whole messages on a shared fair [`OutQueue`]; a writer task cuts them
//! into frames round-robin (so a large upload does not block a small read issued
//! later) and writes them in batches. A reader task reassembles replies and routes
//! each to its caller by XID. Many requests in flight at once is the normal case.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use netswap_proto::{
    Access, Event, HelloInfo, Identity, Inbound, MAX_MESSAGE, NewOwner, Opcode, OutQueue, Pointer,
    RESERVED_XID, Reassembler, ReassemblyLimits, Receiver, RecordInfo, Reply, Request, Version,
    WriteBuf,
};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream, lookup_host};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::error::{Error, Result};

/// Bytes of frames the writer encodes per write.
const WRITE_CHUNK: usize = 64 * 1024;
/// Bytes reserved per read.
const READ_CHUNK: usize = 64 * 1024;
/// Room WRITE_AT needs besides its data (pointer and offset).
const WRITE_AT_HEAD: u64 = 16;

/// Connection options.
#[derive(Clone, Debug)]
pub struct Options {
    /// Local address to bind before connecting (port 0 = any). On one machine,
    /// 127.0.0.2, 127.0.0.3, … act as different identities.
    pub local_addr: Option<IpAddr>,
    /// How long connecting (and the initial HELLO) may take.
    pub connect_timeout: Duration,
    /// How long each call waits for its reply (`None` = no limit).
    pub request_timeout: Option<Duration>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            local_addr: None,
            connect_timeout: Duration::from_secs(10),
            request_timeout: Some(Duration::from_secs(30)),
        }
    }
}

/// A change to a watched record, pushed by the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WatchEvent {
    /// What happened.
    pub event: Event,
    /// The record.
    pub ptr: Pointer,
    /// Its version after the event (the last version when deleted).
    pub version: Version,
}

enum Route {
    /// A call waiting for its one reply.
    Call {
        op: Opcode,
        tx: oneshot::Sender<Result<Reply>>,
    },
    /// A watch: first its acknowledgement, then events.
    Watch {
        ack: Option<oneshot::Sender<Result<Reply>>>,
        events: mpsc::UnboundedSender<WatchEvent>,
    },
    /// A reply nobody waits for any more (timed out, or an UNWATCH sent on drop);
    /// the XID stays taken until it arrives. `then_free` is a watch XID to free too.
    Discard { then_free: Option<u32> },
}

struct Inner {
    out: Mutex<OutQueue>,
    wake_writer: Notify,
    routes: Mutex<HashMap<u32, Route>>,
    next_xid: AtomicU32,
    closed: AtomicBool,
    close_reason: Mutex<Option<String>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Inner {
    fn disconnected(&self) -> Error {
        Error::Disconnected(
            lock(&self.close_reason)
                .clone()
                .unwrap_or_else(|| "the connection is closed".into()),
        )
    }

    /// Takes a free XID (never the reserved one, never one still in use) and routes
    /// its reply.
    fn register(&self, route: Route) -> Result<u32> {
        let mut routes = lock(&self.routes);
        if self.closed.load(Ordering::Acquire) {
            return Err(self.disconnected());
        }
        loop {
            let xid = self.next_xid.fetch_add(1, Ordering::Relaxed);
            if xid != RESERVED_XID && !routes.contains_key(&xid) {
                routes.insert(xid, route);
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

    /// Ends the connection: every waiting call fails, every watch stream ends.
    fn fail_all(&self, reason: String) {
        {
            let mut r = lock(&self.close_reason);
            if r.is_none() {
                *r = Some(reason);
            }
        }
        self.closed.store(true, Ordering::Release);
        let routes = std::mem::take(&mut *lock(&self.routes));
        for (_, route) in routes {
            match route {
                Route::Call { tx, .. } => {
                    let _ = tx.send(Err(self.disconnected()));
                }
                Route::Watch { ack: Some(tx), .. } => {
                    let _ = tx.send(Err(self.disconnected()));
                }
                _ => {}
            }
        }
        self.wake_writer.notify_one();
    }

    fn deliver(&self, xid: u32, status: u8, arg: u8, payload: Bytes) {
        let mut routes = lock(&self.routes);
        let Some(route) = routes.remove(&xid) else {
            return; // a reply to no one (e.g. the reserved XID before a close)
        };
        match route {
            Route::Call { op, tx } => {
                let reply =
                    Reply::parse(Some(op), status, arg, payload).map_err(|e| Error::BadReply(e.0));
                let _ = tx.send(reply);
            }
            Route::Discard { then_free } => {
                if let Some(w) = then_free {
                    routes.remove(&w);
                }
            }
            Route::Watch { mut ack, events } => {
                let reply = Reply::parse(Some(Opcode::Watch), status, arg, payload)
                    .map_err(|e| Error::BadReply(e.0));
                match (ack.take(), reply) {
                    (Some(tx), reply) => {
                        let ok = matches!(reply, Ok(Reply::Done));
                        let _ = tx.send(reply);
                        if ok {
                            routes.insert(xid, Route::Watch { ack: None, events });
                        }
                    }
                    (
                        None,
                        Ok(Reply::Notify {
                            event,
                            ptr,
                            version,
                        }),
                    ) => {
                        let _ = events.send(WatchEvent {
                            event,
                            ptr,
                            version,
                        });
                        if event != Event::Deleted {
                            routes.insert(xid, Route::Watch { ack: None, events });
                        }
                        // Deleted: the watch has ended and its XID is free.
                    }
                    (None, _) => {
                        routes.insert(xid, Route::Watch { ack: None, events });
                    }
                }
            }
        }
    }
}

/// Stops the connection's tasks when the last [`Client`] clone is dropped.
struct Tasks {
    inner: Arc<Inner>,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
}

impl Drop for Tasks {
    fn drop(&mut self) {
        self.inner.fail_all("the client was closed".into());
        self.reader.abort();
        self.writer.abort();
    }
}

/// An async netswap client. Cheap to clone: clones share one connection, and each
/// call may run concurrently with any other.
///
/// ```no_run
/// # async fn demo() -> netswap_client::Result<()> {
/// use netswap_client::{Access, Client};
/// let client = Client::connect("127.0.0.1:7420").await?;
/// let ptr = client.create(Access::READ, "shared state").await?;
/// println!("give this to others: {ptr}");
/// assert_eq!(&client.read(ptr).await?[..], b"shared state");
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
    tasks: Arc<Tasks>,
    hello: HelloInfo,
    options: Options,
    peer: SocketAddr,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("peer", &self.peer)
            .field("identity", &self.hello.identity)
            .finish()
    }
}

impl Client {
    /// Connects with default [`Options`].
    pub async fn connect(addr: impl tokio::net::ToSocketAddrs) -> Result<Client> {
        Client::connect_with(addr, Options::default()).await
    }

    /// Connects, then asks HELLO for the server's limits and this client's identity.
    pub async fn connect_with(
        addr: impl tokio::net::ToSocketAddrs,
        options: Options,
    ) -> Result<Client> {
        let stream = tokio::time::timeout(options.connect_timeout, open(addr, &options))
            .await
            .map_err(|_| Error::Timeout)??;
        let peer = stream.peer_addr()?;
        stream.set_nodelay(true)?;
        #[cfg(target_os = "linux")]
        let _ = socket2::SockRef::from(&stream).set_tcp_notsent_lowat(netswap_proto::NOTSENT_LOWAT);
        let (rd, wr) = stream.into_split();
        let inner = Arc::new(Inner {
            out: Mutex::new(OutQueue::new()),
            wake_writer: Notify::new(),
            routes: Mutex::new(HashMap::new()),
            next_xid: AtomicU32::new(1),
            closed: AtomicBool::new(false),
            close_reason: Mutex::new(None),
        });
        let tasks = Arc::new(Tasks {
            reader: tokio::spawn(read_loop(inner.clone(), rd)),
            writer: tokio::spawn(write_loop(inner.clone(), wr)),
            inner: inner.clone(),
        });
        let mut client = Client {
            inner,
            tasks,
            hello: HelloInfo {
                protocol: 0,
                max_record_bytes: 0,
                max_message_bytes: 0,
                orphan_grace_secs: 0,
                identity: Identity([0; 32]),
            },
            options,
            peer,
        };
        client.hello = tokio::time::timeout(client.options.connect_timeout, client.hello())
            .await
            .map_err(|_| Error::Timeout)??;
        Ok(client)
    }

    /// The server's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    /// What the server said at connect time (limits, protocol version).
    pub fn server_info(&self) -> &HelloInfo {
        &self.hello
    }

    /// This client's identity on the server (the hash of its IP address).
    pub fn identity(&self) -> Identity {
        self.hello.identity
    }

    /// True once the connection has ended (every later call fails with
    /// [`Error::Disconnected`]).
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::Acquire)
    }

    /// Closes the connection now; pending calls fail with [`Error::Disconnected`].
    pub fn close(&self) {
        self.inner.fail_all("the client was closed".into());
        self.tasks.reader.abort();
        self.tasks.writer.abort();
    }

    async fn call(&self, request: Request) -> Result<Reply> {
        let (tx, rx) = oneshot::channel();
        let xid = self.inner.register(Route::Call {
            op: request.opcode(),
            tx,
        })?;
        self.inner.send(&request, xid);
        self.wait(xid, rx).await
    }

    async fn wait(&self, xid: u32, rx: oneshot::Receiver<Result<Reply>>) -> Result<Reply> {
        let reply = match self.options.request_timeout {
            None => rx.await,
            Some(t) => match tokio::time::timeout(t, rx).await {
                Ok(r) => r,
                Err(_) => {
                    // Keep the XID taken until the late reply arrives.
                    if let Some(r) = lock(&self.inner.routes).get_mut(&xid) {
                        *r = Route::Discard { then_free: None };
                    }
                    return Err(Error::Timeout);
                }
            },
        };
        let reply = reply.map_err(|_| self.inner.disconnected())??;
        match reply {
            Reply::Error { status, reason } => Err(Error::from_status(status, reason.into_owned())),
            Reply::Conflict(current) => Err(Error::Conflict { current }),
            r => Ok(r),
        }
    }

    fn unexpected<T>(r: Reply) -> Result<T> {
        Err(Error::BadReply(format!("unexpected reply {r:?}")))
    }

    /// Largest data one request may carry after a `head`-byte header.
    fn room(&self, head: u64) -> u64 {
        self.hello.max_message_bytes.saturating_sub(head).max(1)
    }

    fn check_record_size(&self, len: u64) -> Result<()> {
        if len > self.hello.max_record_bytes {
            return Err(Error::TooLarge(format!(
                "record of {len} bytes is over the server's limit of {} bytes",
                self.hello.max_record_bytes
            )));
        }
        if len > MAX_MESSAGE {
            return Err(Error::InvalidArgument(format!(
                "{len} bytes is over the protocol's largest message"
            )));
        }
        Ok(())
    }

    /// Asks the server for its parameters and this client's identity.
    pub async fn hello(&self) -> Result<HelloInfo> {
        match self.call(Request::Hello).await? {
            Reply::Hello(h) => Ok(h),
            r => Self::unexpected(r),
        }
    }

    /// The server's counters (STATS): server-wide figures (requests, bytes, records,
    /// connections, …) and this client's own quota usage, as `(name, value)` pairs in
    /// the server's order. docs/PROTOCOL.md lists the names.
    pub async fn stats(&self) -> Result<Vec<(String, u64)>> {
        match self.call(Request::Stats).await? {
            Reply::Stats(s) => Ok(s),
            r => Self::unexpected(r),
        }
    }

    /// Creates a record with `access` for other identities and returns its pointer.
    /// Data larger than one message is sent as a CREATE and WRITE_ATs.
    pub async fn create(&self, access: Access, data: impl Into<Bytes>) -> Result<Pointer> {
        let data = data.into();
        self.check_record_size(data.len() as u64)?;
        let first = (data.len() as u64).min(self.room(0)) as usize;
        let ptr = match self
            .call(Request::Create {
                access,
                data: data.slice(..first),
            })
            .await?
        {
            Reply::Created(p) => p,
            r => return Self::unexpected(r),
        };
        if first < data.len() {
            self.write_chunks(ptr, first as u64, data.slice(first..))
                .await?;
        }
        Ok(ptr)
    }

    /// Writes `data` at `offset` in message-sized WRITE_ATs and returns the last
    /// version.
    ///
    /// The server applies requests in the order their last frames arrive, and frames
    /// are sent round-robin, so messages with the same frame count finish in the
    /// order they were queued: the full-size chunks are pipelined together, and a
    /// shorter tail is sent only once they are acknowledged (it would otherwise
    /// overtake them).
    async fn write_chunks(&self, ptr: Pointer, offset: u64, data: Bytes) -> Result<Version> {
        let room = self.room(WRITE_AT_HEAD) as usize;
        let full = data.len() / room;
        let mut version = 0;
        let mut at = 0usize;
        let send_batch = async |count: usize, at: &mut usize| -> Result<Version> {
            let mut pending = Vec::with_capacity(count);
            for _ in 0..count {
                let end = (*at + room).min(data.len());
                let (tx, rx) = oneshot::channel();
                let request = Request::WriteAt {
                    ptr,
                    offset: offset + *at as u64,
                    data: data.slice(*at..end),
                };
                let xid = self.inner.register(Route::Call {
                    op: Opcode::WriteAt,
                    tx,
                })?;
                self.inner.send(&request, xid);
                pending.push((xid, rx));
                *at = end;
            }
            let mut version = 0;
            for (xid, rx) in pending {
                match self.wait(xid, rx).await? {
                    Reply::Written(v) => version = v,
                    r => return Self::unexpected(r),
                }
            }
            Ok(version)
        };
        if full > 0 {
            version = send_batch(full, &mut at).await?;
        }
        if at < data.len() || data.is_empty() {
            version = send_batch(1, &mut at).await?;
        }
        Ok(version)
    }

    /// Reads the whole record.
    pub async fn read(&self, ptr: Pointer) -> Result<Bytes> {
        match self.call(Request::Read { ptr, range: None }).await? {
            Reply::Data(d) => Ok(d),
            r => Self::unexpected(r),
        }
    }

    /// Reads up to `len` bytes from `offset` (cut at the end of the record, like
    /// `pread`; an offset past the end is [`Error::AddressFault`]).
    pub async fn read_range(&self, ptr: Pointer, offset: u64, len: u32) -> Result<Bytes> {
        match self
            .call(Request::Read {
                ptr,
                range: Some((offset, len)),
            })
            .await?
        {
            Reply::Data(d) => Ok(d),
            r => Self::unexpected(r),
        }
    }

    /// Replaces the record's data and returns its new version. Data larger than one
    /// message is sent as a REPLACE and WRITE_ATs: readers may then see it half
    /// written, and the version grows by more than one.
    pub async fn replace(&self, ptr: Pointer, data: impl Into<Bytes>) -> Result<Version> {
        let data = data.into();
        self.check_record_size(data.len() as u64)?;
        let first = (data.len() as u64).min(self.room(8)) as usize;
        let v = match self
            .call(Request::Replace {
                ptr,
                data: data.slice(..first),
            })
            .await?
        {
            Reply::Written(v) => v,
            r => return Self::unexpected(r),
        };
        if first < data.len() {
            return self
                .write_chunks(ptr, first as u64, data.slice(first..))
                .await;
        }
        Ok(v)
    }

    /// Writes `data` at `offset` (at most the current size; writing at the end
    /// appends) and returns the new version. Large data goes in several WRITE_ATs.
    pub async fn write_at(
        &self,
        ptr: Pointer,
        offset: u64,
        data: impl Into<Bytes>,
    ) -> Result<Version> {
        self.write_chunks(ptr, offset, data.into()).await
    }

    /// Replaces the data only if the record is still at version `expected`;
    /// otherwise fails with [`Error::Conflict`] carrying the current version. Must fit
    /// one message (a compare-and-swap cannot be split).
    pub async fn replace_if(
        &self,
        ptr: Pointer,
        expected: Version,
        data: impl Into<Bytes>,
    ) -> Result<Version> {
        let data = data.into();
        if data.len() as u64 > self.room(16) {
            return Err(Error::TooLarge(format!(
                "REPLACE_IF data of {} bytes does not fit one message ({} bytes)",
                data.len(),
                self.room(16)
            )));
        }
        match self
            .call(Request::ReplaceIf {
                ptr,
                expected,
                data,
            })
            .await?
        {
            Reply::Written(v) => Ok(v),
            r => Self::unexpected(r),
        }
    }

    async fn done(&self, request: Request) -> Result<()> {
        match self.call(request).await? {
            Reply::Done => Ok(()),
            r => Self::unexpected(r),
        }
    }

    /// Deletes the record (owner only).
    pub async fn delete(&self, ptr: Pointer) -> Result<()> {
        self.done(Request::Delete { ptr }).await
    }

    /// Sets what other identities may do (owner only).
    pub async fn set_access(&self, ptr: Pointer, access: Access) -> Result<()> {
        self.done(Request::SetAccess { ptr, access }).await
    }

    /// Becomes the owner of a record whose TAKEOVER bit is set (the bit is cleared).
    pub async fn takeover(&self, ptr: Pointer) -> Result<()> {
        self.done(Request::Takeover { ptr }).await
    }

    /// Hands the record to another identity, given as an [`Identity`] or an
    /// [`IpAddr`] (owner only).
    pub async fn transfer(&self, ptr: Pointer, to: impl Into<NewOwner>) -> Result<()> {
        self.done(Request::Transfer { ptr, to: to.into() }).await
    }

    /// Size, version, access bits and whether this client owns the record.
    pub async fn info(&self, ptr: Pointer) -> Result<RecordInfo> {
        match self.call(Request::Info { ptr }).await? {
            Reply::Info(i) => Ok(i),
            r => Self::unexpected(r),
        }
    }

    /// Watches a record: the stream yields an event for every change, deletion or
    /// owner or access change. Dropping the stream unwatches. The stream ends after a
    /// [`Event::Deleted`] or when the connection closes.
    pub async fn watch(&self, ptr: Pointer) -> Result<Watch> {
        let (ack, ack_rx) = oneshot::channel();
        let (events, rx) = mpsc::unbounded_channel();
        let xid = self.inner.register(Route::Watch {
            ack: Some(ack),
            events,
        })?;
        self.inner.send(&Request::Watch { ptr }, xid);
        match self.wait(xid, ack_rx).await? {
            Reply::Done => Ok(Watch {
                inner: self.inner.clone(),
                _tasks: self.tasks.clone(),
                ptr,
                xid,
                rx,
                ended: false,
            }),
            r => Self::unexpected(r),
        }
    }
}

/// A stream of [`WatchEvent`]s for one record; dropping it unwatches.
pub struct Watch {
    inner: Arc<Inner>,
    _tasks: Arc<Tasks>,
    ptr: Pointer,
    xid: u32,
    rx: mpsc::UnboundedReceiver<WatchEvent>,
    ended: bool,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch").field("ptr", &self.ptr).finish()
    }
}

impl Watch {
    /// The watched record.
    pub fn pointer(&self) -> Pointer {
        self.ptr
    }

    /// The next event; `None` once the record is deleted or the connection closed.
    pub async fn next(&mut self) -> Option<WatchEvent> {
        let e = self.rx.recv().await;
        self.note(e)
    }

    /// Like [`Watch::next`], from synchronous code, blocking the thread.
    pub(crate) fn blocking_next(&mut self) -> Option<WatchEvent> {
        let e = self.rx.blocking_recv();
        self.note(e)
    }

    fn note(&mut self, e: Option<WatchEvent>) -> Option<WatchEvent> {
        match e {
            Some(ev) if ev.event == Event::Deleted => self.ended = true,
            None => self.ended = true,
            _ => {}
        }
        e
    }
}

impl futures_core::Stream for Watch {
    type Item = WatchEvent;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<WatchEvent>> {
        let polled = self.rx.poll_recv(cx);
        match polled {
            Poll::Ready(e) => Poll::Ready(self.note(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if self.ended || self.inner.closed.load(Ordering::Acquire) {
            return;
        }
        // Unwatch without waiting: the watch XID stays taken until the UNWATCH's
        // reply arrives, so no late NOTIFY can reach a new call with that XID.
        let mut routes = lock(&self.inner.routes);
        if let Some(r) = routes.get_mut(&self.xid) {
            *r = Route::Discard { then_free: None };
        } else {
            return; // already ended (deleted)
        }
        drop(routes);
        if let Ok(xid) = self.inner.register(Route::Discard {
            then_free: Some(self.xid),
        }) {
            self.inner.send(&Request::Unwatch { ptr: self.ptr }, xid);
        }
    }
}

async fn open(addr: impl tokio::net::ToSocketAddrs, options: &Options) -> Result<TcpStream> {
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

async fn read_loop(inner: Arc<Inner>, rd: OwnedReadHalf) {
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
        let mut broken = None;
        loop {
            match rx.next_inbound() {
                Ok(None) => break,
                Ok(Some(Inbound::Message(m))) => {
                    if m.xid == RESERVED_XID {
                        // The server speaks for itself just before closing.
                        let reason = String::from_utf8_lossy(&m.payload).into_owned();
                        *lock(&inner.close_reason) =
                            Some(format!("the server closed the connection: {reason}"));
                    } else if m.op == netswap_proto::Status::ProtocolError as u8 {
                        let reason = String::from_utf8_lossy(&m.payload).into_owned();
                        *lock(&inner.close_reason) =
                            Some(format!("the server reported a protocol error: {reason}"));
                        inner.deliver(m.xid, m.op, m.arg, m.payload);
                    } else {
                        inner.deliver(m.xid, m.op, m.arg, m.payload);
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
    inner.fail_all(reason);
}

async fn write_loop(inner: Arc<Inner>, mut wr: OwnedWriteHalf) {
    // Vectored writes: large payloads go to the kernel from the caller's buffers.
    let mut buf = WriteBuf::new();
    loop {
        let written = buf.fill(&mut lock(&inner.out), WRITE_CHUNK);
        if written == 0 {
            if inner.closed.load(Ordering::Acquire) {
                let _ = wr.shutdown().await;
                return;
            }
            inner.wake_writer.notified().await;
            continue;
        }
        if let Err(e) = wr.write_all_buf(&mut buf).await {
            inner.fail_all(format!("write failed: {e}"));
            return;
        }
    }
}
