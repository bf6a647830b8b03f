//! The async client: one connection at a time, shared by any number of tasks, and
//! replaced when the network takes it away.
//!
//! A supervisor task waits for the connection to end (or to stop answering its
//! keepalives), then connects again with exponential backoff and full jitter,
//! registers every watch again and tells each watcher what changed while it was away.
//! Calls made meanwhile wait for the new connection up to their deadline; reads in
//! flight when the connection dropped are sent again once, other requests fail with
//! [`Error::Disconnected`] (their outcome is unknown).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use netswap_proto::{
    Access, HelloInfo, Identity, MAX_MESSAGE, NewOwner, Opcode, Pointer, RecordInfo, Reply,
    Request, Version, WatchOptions,
};
use rand::Rng;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::conn::{Conn, Pending, describe, lock};
use crate::error::{Error, Result};
use crate::options::{ConnectionState, Options};
use crate::watch::{Mirror, Watch, Watches};

/// Room WRITE_AT needs besides its data (pointer and offset).
const WRITE_AT_HEAD: u64 = 16;

/// State shared by a client's clones, its supervisor and its watches.
pub(crate) struct Shared {
    addr: String,
    pub(crate) options: Options,
    current: Mutex<Option<Arc<Conn>>>,
    /// The last connection's HELLO and peer (kept while reconnecting).
    last: Mutex<(HelloInfo, SocketAddr)>,
    state: watch::Sender<ConnectionState>,
    pub(crate) watches: Mutex<Watches>,
    pub(crate) next_watch: AtomicU64,
    generation: AtomicU64,
    closed: AtomicBool,
    supervisor: Mutex<Option<JoinHandle<()>>>,
}

/// Closes the client when the last [`Client`] clone (or watch, or mirror) is dropped.
struct Guard(Arc<Shared>);

impl Drop for Guard {
    fn drop(&mut self) {
        self.0.shut("the client was closed".into());
    }
}

/// An async netswap client.
///
/// Cheap to clone, and `Send + Sync`: clones share one connection, and any number of
/// tasks may call it at once (requests are multiplexed over the connection and their
/// frames interleaved fairly, so a large upload does not delay a small read issued
/// after it). The connection is replaced automatically when it drops (see
/// [`Options::reconnect`]); watches survive that.
///
/// ```no_run
/// # async fn demo() -> netswap_client::Result<()> {
/// use netswap_client::{Access, Client};
/// let client = Client::connect("127.0.0.1:7420").await?;
/// let ptr = client.create(Access::READ, "shared state").await?;
/// println!("give this to others: {ptr}");
/// assert_eq!(&client.read(ptr).await?[..], b"shared state");
/// // One call with its own deadline:
/// let quick = client.with_timeout(std::time::Duration::from_millis(200));
/// quick.info(ptr).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Client {
    pub(crate) shared: Arc<Shared>,
    _guard: Arc<Guard>,
    /// Per-clone deadline (`None`: the options' `request_timeout`).
    timeout: Option<Option<Duration>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("peer", &self.peer_addr())
            .field("identity", &self.identity())
            .field("state", &self.state())
            .finish()
    }
}

impl Client {
    /// Connects with default [`Options`]. `addr` is `"host:port"` or a
    /// [`SocketAddr`] (anything that prints as one; host names are looked up again at
    /// each reconnect).
    pub async fn connect(addr: impl std::fmt::Display) -> Result<Client> {
        Client::connect_with(addr, Options::default()).await
    }

    /// Connects, then asks HELLO for the server's limits and this client's identity.
    /// The first connection is not retried: a server that cannot be reached now is
    /// an error here. Later drops are reconnected as `options.reconnect` says.
    pub async fn connect_with(addr: impl std::fmt::Display, options: Options) -> Result<Client> {
        let addr = addr.to_string();
        let shared = Arc::new(Shared {
            addr: addr.clone(),
            options,
            current: Mutex::new(None),
            last: Mutex::new((
                HelloInfo {
                    protocol: 0,
                    max_record_bytes: 0,
                    max_message_bytes: 0,
                    orphan_grace_secs: 0,
                    identity: Identity([0; 32]),
                },
                SocketAddr::from(([0, 0, 0, 0], 0)),
            )),
            state: watch::channel(ConnectionState::Connected).0,
            watches: Mutex::new(Watches::default()),
            next_watch: AtomicU64::new(1),
            generation: AtomicU64::new(1),
            closed: AtomicBool::new(false),
            supervisor: Mutex::new(None),
        });
        let conn = Conn::open(&addr, &shared.options, 1, Arc::downgrade(&shared)).await?;
        shared.install(conn.clone());
        let supervisor = tokio::spawn(shared.clone().supervise(conn));
        *lock(&shared.supervisor) = Some(supervisor);
        Ok(Client {
            _guard: Arc::new(Guard(shared.clone())),
            shared,
            timeout: None,
        })
    }

    /// A handle on the same connection whose calls wait at most `timeout` (`None`: no
    /// limit), instead of [`Options::request_timeout`].
    pub fn with_timeout(&self, timeout: impl Into<Option<Duration>>) -> Client {
        Client {
            timeout: Some(timeout.into()),
            ..self.clone()
        }
    }

    fn deadline(&self, started: Instant) -> Option<Instant> {
        self.timeout
            .unwrap_or(self.shared.options.request_timeout)
            .map(|t| started + t)
    }

    /// The server's address (of the current or last connection).
    pub fn peer_addr(&self) -> SocketAddr {
        lock(&self.shared.last).1
    }

    /// What the server said when the current (or last) connection began: limits,
    /// protocol version, this client's identity.
    pub fn server_info(&self) -> HelloInfo {
        lock(&self.shared.last).0
    }

    /// This client's identity on the server (the hash of its IP address).
    pub fn identity(&self) -> Identity {
        self.server_info().identity
    }

    /// Where the connection stands now.
    pub fn state(&self) -> ConnectionState {
        self.shared.state.borrow().clone()
    }

    /// Every change of [`Client::state`], with its reason (a `tokio::sync::watch`
    /// receiver: `changed().await`, then `borrow()`).
    pub fn state_changes(&self) -> watch::Receiver<ConnectionState> {
        self.shared.state.subscribe()
    }

    /// Requests waiting for their replies on the current connection.
    pub fn in_flight(&self) -> usize {
        self.shared.current_conn().map_or(0, |c| c.in_flight())
    }

    /// Bytes of requests waiting to be written to the current connection (a server
    /// that does not read makes them wait; cancelled calls take theirs back).
    pub fn unsent_bytes(&self) -> usize {
        self.shared.current_conn().map_or(0, |c| c.unsent_bytes())
    }

    /// True once the client is closed for good (every later call fails with
    /// [`Error::Disconnected`]). A connection being replaced is not closed.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Acquire)
    }

    /// Closes the client now: pending calls fail with [`Error::Disconnected`], watches
    /// end, and it does not reconnect.
    pub fn close(&self) {
        self.shared.shut("the client was closed".into());
    }

    /// Sends `request` and waits for its reply. Reads are sent again once if the
    /// connection drops before their reply; other requests then fail with
    /// [`Error::Disconnected`]. Waiting for a connection counts against the deadline.
    async fn call(&self, request: Request) -> Result<Reply> {
        let started = Instant::now();
        let deadline = self.deadline(started);
        let op = request.opcode();
        let idempotent = matches!(
            op,
            Opcode::Read | Opcode::Info | Opcode::Hello | Opcode::Stats
        );
        let mut resent = false;
        loop {
            let conn = self.shared.connection(started, deadline, &request).await?;
            let Ok(pending) = conn.start(&request) else {
                continue; // it closed just now, before this left: wait for the next one
            };
            match pending.wait(started, deadline).await {
                Err(Error::Disconnected(reason)) if conn.is_closed() && !self.is_closed() => {
                    if idempotent && !resent && self.shared.options.reconnect.enabled {
                        resent = true;
                        continue;
                    }
                    return Err(Error::Disconnected(format!(
                        "the connection was lost while {} was in flight ({reason}); its outcome is unknown",
                        describe(op, request.pointer())
                    )));
                }
                r => return r,
            }
        }
    }

    fn unexpected<T>(r: Reply) -> Result<T> {
        Err(Error::BadReply(format!("unexpected reply {r:?}")))
    }

    /// Largest data one request may carry after a `head`-byte header.
    fn room(&self, head: u64) -> u64 {
        self.server_info()
            .max_message_bytes
            .saturating_sub(head)
            .max(1)
    }

    fn check_record_size(&self, len: u64) -> Result<()> {
        let max = self.server_info().max_record_bytes;
        if len > max {
            return Err(Error::TooLarge(format!(
                "record of {len} bytes is over the server's limit of {max} bytes"
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
    /// overtake them). All of them go on one connection.
    async fn write_chunks(&self, ptr: Pointer, offset: u64, data: Bytes) -> Result<Version> {
        let started = Instant::now();
        let deadline = self.deadline(started);
        let room = self.room(WRITE_AT_HEAD) as usize;
        let full = data.len() / room;
        let conn = self
            .shared
            .connection(started, deadline, &Request::Delete { ptr })
            .await?;
        let mut version = 0;
        let mut at = 0usize;
        let send_batch = async |count: usize, at: &mut usize| -> Result<Version> {
            let mut pending: Vec<Pending> = Vec::with_capacity(count);
            for _ in 0..count {
                let end = (*at + room).min(data.len());
                pending.push(conn.start(&Request::WriteAt {
                    ptr,
                    offset: offset + *at as u64,
                    data: data.slice(*at..end),
                })?);
                *at = end;
            }
            let mut version = 0;
            for p in pending {
                match p.wait(started, deadline).await? {
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
        let data = data.into();
        if data.len() as u64 <= self.room(WRITE_AT_HEAD) {
            return match self.call(Request::WriteAt { ptr, offset, data }).await? {
                Reply::Written(v) => Ok(v),
                r => Self::unexpected(r),
            };
        }
        self.write_chunks(ptr, offset, data).await
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
    /// [`std::net::IpAddr`] (owner only).
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
    /// [`netswap_proto::Event::Deleted`] or when the client is closed; a connection
    /// that drops and comes back does not end it (see [`Client::watch_with`]).
    pub async fn watch(&self, ptr: Pointer) -> Result<Watch> {
        self.watch_with(ptr, 0).await
    }

    /// Watches a record, at most one event per `min_interval_ms` (0: every event;
    /// changes in between are merged by the server: the event carries the latest
    /// version). After a reconnect the watch is registered again; if the record
    /// changed (or was deleted, or changed owner or access bits) while the
    /// connection was down, an event says so.
    pub async fn watch_with(&self, ptr: Pointer, min_interval_ms: u32) -> Result<Watch> {
        let options = WatchOptions {
            data: false,
            state: true,
            min_interval_ms,
        };
        let (member, group, rx) = self.shared.add_watch(ptr, options);
        let watch = Watch::new(self.clone(), member, ptr, rx);
        self.register_new(group, ptr, options).await?;
        Ok(watch)
    }

    /// A local copy of a record, kept exact by a data watch: the server pushes the
    /// bytes each change wrote, the mirror applies them in version order, and
    /// repairs itself from a fresh copy whenever a change could not come as bytes (a
    /// gap in the versions, a merge too large, a reconnect). Needs READ access.
    pub async fn mirror(&self, ptr: Pointer) -> Result<Mirror> {
        self.mirror_with(ptr, 0).await
    }

    /// A mirror that receives at most one update per `min_interval_ms` (a game's
    /// tick): changes in between are merged by the server into one delta.
    pub async fn mirror_with(&self, ptr: Pointer, min_interval_ms: u32) -> Result<Mirror> {
        let options = WatchOptions {
            data: true,
            state: true,
            min_interval_ms,
        };
        let (member, group, copy, rx) = self.shared.add_mirror(ptr, options);
        let mirror = Mirror::new(self.clone(), member, ptr, copy, rx);
        self.register_new(group, ptr, options).await?;
        Ok(mirror)
    }

    /// Registers the group a new watch or mirror joined, so that it asks for what
    /// the newcomer needs (a WATCH is a read: sent again once if the connection
    /// drops first). If that fails, the newcomer is dropped by the caller, which
    /// takes it out of the group.
    async fn register_new(&self, group: u64, ptr: Pointer, options: WatchOptions) -> Result<()> {
        let started = Instant::now();
        let deadline = self.deadline(started);
        let mut resent = false;
        // What a wait for the connection is described as.
        let probe = Request::Watch { ptr, options };
        loop {
            let conn = self.shared.connection(started, deadline, &probe).await?;
            match self
                .shared
                .register(group, &conn, false, started, deadline)
                .await
            {
                Err(Error::Disconnected(_)) if conn.is_closed() && !self.is_closed() && !resent => {
                    resent = true;
                }
                r => return r,
            }
        }
    }
}

impl Shared {
    pub(crate) fn current_conn(&self) -> Option<Arc<Conn>> {
        lock(&self.current).clone()
    }

    fn install(&self, conn: Arc<Conn>) {
        *lock(&self.last) = (*conn.hello(), conn.peer);
        *lock(&self.current) = Some(conn);
        self.state.send_replace(ConnectionState::Connected);
    }

    /// The connection to send on: the current one, or the next one (waiting up to
    /// `deadline` while the client reconnects).
    pub(crate) async fn connection(
        &self,
        started: Instant,
        deadline: Option<Instant>,
        request: &Request,
    ) -> Result<Arc<Conn>> {
        let mut rx = self.state.subscribe();
        loop {
            if let ConnectionState::Closed { reason } = &*rx.borrow_and_update() {
                return Err(Error::Disconnected(reason.clone()));
            }
            if let Some(c) = self.current_conn()
                && !c.is_closed()
            {
                return Ok(c);
            }
            let changed = rx.changed();
            let r = match deadline {
                None => changed.await,
                Some(d) => match tokio::time::timeout_at(d, changed).await {
                    Ok(r) => r,
                    Err(_) => {
                        return Err(Error::Timeout {
                            what: format!(
                                "the connection to come back, to send {}",
                                describe(request.opcode(), request.pointer())
                            ),
                            waited: started.elapsed(),
                            in_flight: 0,
                        });
                    }
                },
            };
            if r.is_err() {
                return Err(Error::Disconnected("the client was closed".into()));
            }
        }
    }

    /// Closes the client for good.
    pub(crate) fn shut(&self, reason: String) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Some(s) = lock(&self.supervisor).take() {
            s.abort();
        }
        self.state.send_replace(ConnectionState::Closed {
            reason: reason.clone(),
        });
        if let Some(c) = lock(&self.current).take() {
            c.kill(reason);
        }
        // Every watch stream ends.
        let ended = std::mem::take(&mut *lock(&self.watches));
        drop(ended);
    }

    /// Waits for the connection to end (or to stop answering), then replaces it;
    /// watches are registered again on each new connection.
    async fn supervise(self: Arc<Self>, mut conn: Arc<Conn>) {
        loop {
            tokio::select! {
                _ = conn.ended() => {}
                _ = keepalive(&conn, self.options.keepalive) => {}
            }
            if self.closed.load(Ordering::Acquire) {
                return;
            }
            let mut reason = match conn.disconnected() {
                Error::Disconnected(r) => r,
                e => e.to_string(),
            };
            if !self.options.reconnect.enabled {
                self.shut(reason);
                return;
            }
            let mut attempt = 0;
            conn = loop {
                attempt += 1;
                if self
                    .options
                    .reconnect
                    .max_attempts
                    .is_some_and(|m| attempt > m)
                {
                    self.shut(format!(
                        "gave up reconnecting after {} attempts: {reason}",
                        attempt - 1
                    ));
                    return;
                }
                self.state.send_replace(ConnectionState::Reconnecting {
                    attempt,
                    reason: reason.clone(),
                });
                let window = self.options.reconnect.window(attempt);
                let pause = rand::rng().random_range(Duration::ZERO..=window);
                tokio::time::sleep(pause).await;
                let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
                match Conn::open(&self.addr, &self.options, generation, Arc::downgrade(&self)).await
                {
                    Ok(c) => break c,
                    Err(e) => reason = format!("connecting again failed: {e}"),
                }
            };
            if self.closed.load(Ordering::Acquire) {
                conn.kill("the client was closed".into());
                return;
            }
            self.install(conn.clone());
            // On a task of its own: registering may be retried for as long as the
            // server is busy, while this loop watches the connection (keepalives).
            let (shared, registering) = (self.clone(), conn.clone());
            tokio::spawn(async move { shared.register_all_again(&registering).await });
        }
    }
}

/// Resolves when `conn` did not answer a keepalive (and kills it); never resolves
/// without keepalives.
async fn keepalive(conn: &Arc<Conn>, every: Option<Duration>) {
    let Some(every) = every else {
        return std::future::pending().await;
    };
    loop {
        let quiet = conn.quiet_for();
        if quiet < every {
            tokio::time::sleep(every - quiet).await;
            continue;
        }
        let started = Instant::now();
        let Ok(pending) = conn.start(&Request::Hello) else {
            return std::future::pending().await; // closed: `ended` resolves
        };
        match pending.wait(started, Some(started + every)).await {
            Ok(_) => {}
            Err(Error::Timeout { .. }) => {
                conn.kill(format!(
                    "the server did not answer a keepalive within {} ms",
                    every.as_millis()
                ));
                return;
            }
            Err(_) => return std::future::pending().await,
        }
    }
}
