//! # netswap for Node.js (native layer)
//!
//! A napi-rs addon over the Rust async client ([`netswap_client::Client`]): every
//! method returns a Promise and runs on the addon's tokio runtime, never blocking the
//! event loop. Pointers, versions, offsets and sizes are `bigint`s (they are u64);
//! data is `Buffer` or `Uint8Array`. Errors carry a stable code: the protocol status
//! (`ACCESS_VIOLATION`, `ADDRESS_FAULT`, `CONFLICT`, …) or `IO`, `TIMEOUT`,
//! `DISCONNECTED`, `BAD_REPLY`, `INVALID_ARGUMENT`, `CLOSED`, `ABORTED`.
//!
//! The package's entry modules (`netswap.cjs`, `netswap.mjs`) wrap this layer: they
//! turn codes into `error.code`, `AbortSignal`s into [`Canceller`]s, and connection
//! states and mirror updates into events.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use napi::bindgen_prelude::*;
use napi::threadsafe_function::{ThreadsafeFunction, ThreadsafeFunctionCallMode};
use napi_derive::napi;
use netswap_client::{
    Access, ConnectionState, Error as ClientError, Identity, MirrorEvent, MirrorView, NewOwner,
    Options, Pointer, Reconnect,
};
use tokio::sync::Notify;

// napi's async functions only reject with its own `Status` codes, so the stable code
// travels at the start of the reason, "[ACCESS_VIOLATION] …"; the package's entry
// module (netswap.js) moves it into `error.code`.

fn js_error(code: &str, message: impl Into<String>) -> napi::Error {
    napi::Error::new(
        Status::GenericFailure,
        format!("[{code}] {}", message.into()),
    )
}

fn from_client(e: ClientError) -> napi::Error {
    let message = match &e {
        ClientError::Conflict { current } => {
            format!("conflict: the record is at version {current}")
        }
        other => other.to_string(),
    };
    js_error(e.code(), message)
}

fn pointer(ptr: BigInt) -> Result<Pointer> {
    let (signed, value, lossless) = ptr.get_u64();
    if signed || !lossless {
        return Err(js_error(
            "INVALID_ARGUMENT",
            "a pointer is a non-negative bigint below 2^64",
        ));
    }
    Pointer::new(value).ok_or_else(|| js_error("INVALID_ARGUMENT", "pointer 0 is never valid"))
}

fn u64_arg(v: BigInt, what: &str) -> Result<u64> {
    let (signed, value, lossless) = v.get_u64();
    if signed || !lossless {
        return Err(js_error(
            "INVALID_ARGUMENT",
            format!("{what} must be a non-negative bigint below 2^64"),
        ));
    }
    Ok(value)
}

fn big(v: u64) -> BigInt {
    BigInt::from(v)
}

/// Access flags: what identities other than the owner may do.
#[napi(object)]
#[derive(Clone, Copy, Default)]
pub struct AccessFlags {
    /// Others may read, inspect and watch.
    pub read: Option<bool>,
    /// Others may replace and write.
    pub write: Option<bool>,
    /// Others may take ownership (which clears this flag).
    pub takeover: Option<bool>,
}

impl AccessFlags {
    fn to_access(self) -> Access {
        let mut a = Access::empty();
        if self.read.unwrap_or(false) {
            a |= Access::READ;
        }
        if self.write.unwrap_or(false) {
            a |= Access::WRITE;
        }
        if self.takeover.unwrap_or(false) {
            a |= Access::TAKEOVER;
        }
        a
    }
    fn from_access(a: Access) -> AccessFlags {
        AccessFlags {
            read: Some(a.contains(Access::READ)),
            write: Some(a.contains(Access::WRITE)),
            takeover: Some(a.contains(Access::TAKEOVER)),
        }
    }
}

/// Options for `Client.connect`.
#[napi(object)]
#[derive(Default)]
pub struct ConnectOptions {
    /// Local address to connect from, e.g. "127.0.0.2" (another address is another
    /// identity).
    pub local_address: Option<String>,
    /// Milliseconds to wait for each connection attempt (default 10000).
    pub connect_timeout_ms: Option<u32>,
    /// Milliseconds each call waits for its reply, waiting for a reconnection included
    /// (default 30000; 0 = no limit).
    pub request_timeout_ms: Option<u32>,
    /// Reconnection (on by default).
    pub reconnect: Option<ReconnectOptions>,
    /// Ask the server something after this many ms of silence; no answer within as
    /// long means the connection is dead (default 15000; 0 = never).
    pub keepalive_ms: Option<u32>,
    /// The socket's receive buffer in bytes (SO_RCVBUF; default 0 = the kernel's
    /// autotuning). A small one (e.g. 262144) bounds how long a small reply can wait
    /// behind a large one on a LAN, at the cost of throughput over long round trips.
    pub receive_buffer: Option<u32>,
}

/// Automatic reconnection with exponential backoff and full jitter.
#[napi(object)]
#[derive(Default)]
pub struct ReconnectOptions {
    /// Reconnect at all (default true).
    pub enabled: Option<bool>,
    /// The first backoff window in ms (default 100).
    pub initial_delay_ms: Option<u32>,
    /// The largest backoff window in ms (default 5000).
    pub max_delay_ms: Option<u32>,
    /// Failed attempts in a row before the client closes for good (default: never).
    pub max_attempts: Option<u32>,
}

/// Per-call options (the entry module fills them from `{ timeoutMs, signal }`).
#[napi(object)]
#[derive(Default)]
pub struct CallOptions {
    /// The call's deadline in ms (0 = none), instead of the client's.
    pub timeout_ms: Option<u32>,
    /// The `Canceller` whose `cancel()` aborts the call.
    pub cancel_id: Option<u32>,
}

struct Cancel {
    triggered: AtomicBool,
    notify: Notify,
}

impl Cancel {
    async fn triggered(&self) {
        loop {
            let n = self.notify.notified();
            if self.triggered.load(Ordering::Acquire) {
                return;
            }
            n.await;
        }
    }
}

static CANCELLERS: LazyLock<Mutex<HashMap<u32, Arc<Cancel>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));
static NEXT_CANCELLER: AtomicU32 = AtomicU32::new(1);

/// Aborts the calls it was given to (through `CallOptions.cancelId`): each rejects with
/// code `ABORTED` at once, and its request is taken back if it has not left.
#[napi]
pub struct Canceller {
    id: u32,
    inner: Arc<Cancel>,
}

#[napi]
impl Canceller {
    /// A new canceller.
    #[napi(constructor)]
    pub fn new() -> Canceller {
        let id = NEXT_CANCELLER.fetch_add(1, Ordering::Relaxed);
        let inner = Arc::new(Cancel {
            triggered: AtomicBool::new(false),
            notify: Notify::new(),
        });
        CANCELLERS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, inner.clone());
        Canceller { id, inner }
    }

    /// Its id, for `CallOptions.cancelId`.
    #[napi(getter)]
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Aborts every call given this canceller that has not completed, and every later one.
    #[napi]
    pub fn cancel(&self) {
        self.inner.triggered.store(true, Ordering::Release);
        self.inner.notify.notify_waiters();
    }
}

impl Default for Canceller {
    fn default() -> Self {
        Canceller::new()
    }
}

impl Drop for Canceller {
    fn drop(&mut self) {
        CANCELLERS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

/// Runs a call of `client` with the per-call options: its own deadline, and an abort.
async fn with_options<T, F>(
    client: netswap_client::Client,
    options: Option<CallOptions>,
    call: impl FnOnce(netswap_client::Client) -> F,
) -> Result<T>
where
    F: Future<Output = std::result::Result<T, ClientError>>,
{
    let o = options.unwrap_or_default();
    let client = match o.timeout_ms {
        Some(ms) => client.with_timeout((ms > 0).then(|| Duration::from_millis(ms.into()))),
        None => client,
    };
    let cancel = o.cancel_id.and_then(|id| {
        CANCELLERS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .cloned()
    });
    let work = call(client);
    match cancel {
        None => work.await.map_err(from_client),
        Some(c) => tokio::select! {
            biased;
            _ = c.triggered() => Err(js_error("ABORTED", "the call was aborted")),
            r = work => r.map_err(from_client),
        },
    }
}

/// A change of the connection's state.
#[napi(object)]
pub struct StateChange {
    /// "connected", "reconnecting" or "closed".
    pub state: String,
    /// The reconnection attempt ("reconnecting"; else 0).
    pub attempt: u32,
    /// Why ("" when connected).
    pub reason: String,
}

fn state_change(s: &ConnectionState) -> StateChange {
    match s {
        ConnectionState::Connected => StateChange {
            state: "connected".into(),
            attempt: 0,
            reason: String::new(),
        },
        ConnectionState::Reconnecting { attempt, reason } => StateChange {
            state: "reconnecting".into(),
            attempt: *attempt,
            reason: reason.clone(),
        },
        ConnectionState::Closed { reason } => StateChange {
            state: "closed".into(),
            attempt: 0,
            reason: reason.clone(),
        },
    }
}

/// A byte range that changed in a mirror's copy.
#[napi(object)]
pub struct ChangedRange {
    /// Where.
    pub offset: BigInt,
    /// How many bytes.
    pub length: BigInt,
}

/// One event of a mirror.
#[napi(object)]
pub struct MirrorChange {
    /// "updated", "reloaded", "owner-changed", "access-changed" or "deleted".
    pub kind: String,
    /// The copy's version right after it.
    pub version: BigInt,
    /// The copy's size right after it.
    pub size: BigInt,
    /// "updated": the ranges that changed.
    pub changed: Vec<ChangedRange>,
}

/// A mirror: an exact local copy of a record, kept up to date in the background.
#[napi]
pub struct MirrorHandle {
    view: MirrorView,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

#[napi]
impl MirrorHandle {
    /// A copy of the bytes as they are now.
    #[napi(getter)]
    pub fn data(&self) -> Buffer {
        Buffer::from(self.view.data().to_vec())
    }

    /// The copy's version.
    #[napi(getter)]
    pub fn version(&self) -> BigInt {
        big(self.view.version())
    }

    /// Stops mirroring (the copy keeps its last bytes). Calling it again does nothing.
    #[napi]
    pub fn close(&self) {
        if let Some(t) = self.task.lock().unwrap_or_else(|e| e.into_inner()).take() {
            t.abort();
        }
    }
}

/// What `info` reports.
#[napi(object)]
pub struct RecordInfo {
    /// Data size in bytes.
    pub size: BigInt,
    /// Version: 1 at creation, +1 on every write.
    pub version: BigInt,
    /// What other identities may do.
    pub access: AccessFlags,
    /// True when this client's identity owns the record.
    pub owned: bool,
}

/// What `hello` reports.
#[napi(object)]
pub struct ServerInfo {
    /// Protocol version (1).
    pub protocol: u32,
    /// Largest record the server stores.
    pub max_record_bytes: BigInt,
    /// Largest request message the server accepts.
    pub max_message_bytes: BigInt,
    /// Seconds an orphaned record survives.
    pub orphan_grace_secs: u32,
    /// This client's identity, 64 hex digits.
    pub identity: String,
}

/// One change to a watched record.
#[napi(object)]
pub struct WatchEvent {
    /// "changed", "deleted", "owner-changed" or "access-changed".
    #[napi(ts_type = "'changed' | 'deleted' | 'owner-changed' | 'access-changed'")]
    pub event: String,
    /// The record.
    pub ptr: BigInt,
    /// Its version after the event (the last version when deleted).
    pub version: BigInt,
}

/// A connection to a netswap server. Create it with `Client.connect`.
#[napi]
pub struct Client {
    inner: Arc<Mutex<Option<netswap_client::Client>>>,
}

/// An active watch; `unsubscribe()` ends it.
#[napi]
pub struct Subscription {
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

#[napi]
impl Subscription {
    /// Stops the watch (the server is told). Calling it again does nothing.
    #[napi]
    pub fn unsubscribe(&self) {
        if let Some(t) = self.task.lock().unwrap_or_else(|e| e.into_inner()).take() {
            // Dropping the watch stream inside the task sends UNWATCH.
            t.abort();
        }
    }

    /// True until `unsubscribe()` is called or the record is deleted.
    #[napi(getter)]
    pub fn active(&self) -> bool {
        self.task
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|t| !t.is_finished())
    }
}

impl Client {
    fn client(&self) -> Result<netswap_client::Client> {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| js_error("CLOSED", "the client is closed"))
    }
}

#[napi]
impl Client {
    /// Connects to "host:port" and asks the server for its limits.
    #[napi(factory, writable = true, configurable = true)]
    pub async fn connect(address: String, options: Option<ConnectOptions>) -> Result<Client> {
        let o = options.unwrap_or_default();
        let mut opts = Options::default();
        if let Some(ip) = o.local_address {
            opts.local_addr = Some(ip.parse::<IpAddr>().map_err(|_| {
                js_error(
                    "INVALID_ARGUMENT",
                    format!("localAddress {ip:?} is not an IP address"),
                )
            })?);
        }
        if let Some(ms) = o.connect_timeout_ms {
            opts.connect_timeout = Duration::from_millis(ms.max(1).into());
        }
        if let Some(ms) = o.request_timeout_ms {
            opts.request_timeout = (ms > 0).then(|| Duration::from_millis(ms.into()));
        }
        if let Some(ms) = o.keepalive_ms {
            opts.keepalive = (ms > 0).then(|| Duration::from_millis(ms.into()));
        }
        if let Some(bytes) = o.receive_buffer {
            opts.receive_buffer = (bytes > 0).then_some(bytes);
        }
        if let Some(r) = o.reconnect {
            let d = Reconnect::default();
            opts.reconnect = Reconnect {
                enabled: r.enabled.unwrap_or(true),
                initial_delay: r
                    .initial_delay_ms
                    .map_or(d.initial_delay, |ms| Duration::from_millis(ms.into())),
                max_delay: r
                    .max_delay_ms
                    .map_or(d.max_delay, |ms| Duration::from_millis(ms.into())),
                max_attempts: r.max_attempts.filter(|n| *n > 0),
            };
        }
        let c = netswap_client::Client::connect_with(address.as_str(), opts)
            .await
            .map_err(from_client)?;
        Ok(Client {
            inner: Arc::new(Mutex::new(Some(c))),
        })
    }

    /// Where the connection stands: "connected", "reconnecting" or "closed".
    #[napi(getter, ts_return_type = "'connected' | 'reconnecting' | 'closed'")]
    pub fn state(&self) -> String {
        match &*self.inner.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(c) => state_change(&c.state()).state,
            None => "closed".into(),
        }
    }

    /// Calls `callback(change)` on the event loop for every change of the connection's
    /// state, until the client is closed. It does not keep the process alive.
    #[napi(ts_args_type = "callback: (change: StateChange) => void")]
    pub fn on_state_change(
        &self,
        callback: ThreadsafeFunction<StateChange, (), StateChange, Status, false, true>,
    ) -> Result<()> {
        let mut changes = self.client()?.state_changes();
        // Called from the event loop's thread: onto the addon's runtime.
        napi::bindgen_prelude::spawn(async move {
            while changes.changed().await.is_ok() {
                let change = state_change(&changes.borrow_and_update());
                let closed = change.state == "closed";
                callback.call(change, ThreadsafeFunctionCallMode::NonBlocking);
                if closed {
                    return;
                }
            }
        });
        Ok(())
    }

    /// This client's identity on the server, 64 hex digits.
    #[napi(getter)]
    pub fn identity(&self) -> Result<String> {
        Ok(self.client()?.identity().to_string())
    }

    /// True once `close()` was called, or the client gave up reconnecting.
    #[napi(getter)]
    pub fn closed(&self) -> bool {
        match &*self.inner.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(c) => c.is_closed(),
            None => true,
        }
    }

    /// Closes the connection: pending calls reject with code `DISCONNECTED`, later
    /// calls with `CLOSED`, and watches and mirrors end.
    #[napi]
    pub fn close(&self) {
        if let Some(c) = self.inner.lock().unwrap_or_else(|e| e.into_inner()).take() {
            c.close();
        }
    }

    /// The server's limits and this client's identity.
    #[napi]
    pub async fn hello(&self, options: Option<CallOptions>) -> Result<ServerInfo> {
        let h = with_options(self.client()?, options, async |c| c.hello().await).await?;
        Ok(ServerInfo {
            protocol: h.protocol.into(),
            max_record_bytes: big(h.max_record_bytes),
            max_message_bytes: big(h.max_message_bytes),
            orphan_grace_secs: h.orphan_grace_secs,
            identity: h.identity.to_string(),
        })
    }

    /// Creates a record; resolves to its pointer.
    #[napi]
    pub async fn create(
        &self,
        data: Uint8Array,
        access: Option<AccessFlags>,
        options: Option<CallOptions>,
    ) -> Result<BigInt> {
        let access = access.unwrap_or_default().to_access();
        let data = data.to_vec();
        let p = with_options(self.client()?, options, async |c| {
            c.create(access, data).await
        })
        .await?;
        Ok(big(p.get()))
    }

    /// Reads the whole record.
    #[napi]
    pub async fn read(&self, ptr: BigInt, options: Option<CallOptions>) -> Result<Buffer> {
        let p = pointer(ptr)?;
        let d = with_options(self.client()?, options, async |c| c.read(p).await).await?;
        Ok(Buffer::from(d.to_vec()))
    }

    /// Reads up to `length` bytes from `offset` (cut at the end; past the end is
    /// `ADDRESS_FAULT`).
    #[napi]
    pub async fn read_range(
        &self,
        ptr: BigInt,
        offset: BigInt,
        length: BigInt,
        options: Option<CallOptions>,
    ) -> Result<Buffer> {
        let p = pointer(ptr)?;
        let off = u64_arg(offset, "offset")?;
        let len = u64_arg(length, "length")?.min(u32::MAX as u64) as u32;
        let d = with_options(self.client()?, options, async |c| {
            c.read_range(p, off, len).await
        })
        .await?;
        Ok(Buffer::from(d.to_vec()))
    }

    /// Replaces the data; resolves to the new version.
    #[napi]
    pub async fn replace(
        &self,
        ptr: BigInt,
        data: Uint8Array,
        options: Option<CallOptions>,
    ) -> Result<BigInt> {
        let p = pointer(ptr)?;
        let data = data.to_vec();
        let v = with_options(self.client()?, options, async |c| c.replace(p, data).await).await?;
        Ok(big(v))
    }

    /// Writes at `offset` (at most the current size; the record may grow); resolves to
    /// the new version.
    #[napi]
    pub async fn write_at(
        &self,
        ptr: BigInt,
        offset: BigInt,
        data: Uint8Array,
        options: Option<CallOptions>,
    ) -> Result<BigInt> {
        let p = pointer(ptr)?;
        let off = u64_arg(offset, "offset")?;
        let data = data.to_vec();
        let v = with_options(self.client()?, options, async |c| {
            c.write_at(p, off, data).await
        })
        .await?;
        Ok(big(v))
    }

    /// Replaces the data only at version `expected`; otherwise rejects with code
    /// `CONFLICT` (the message names the current version).
    #[napi]
    pub async fn replace_if(
        &self,
        ptr: BigInt,
        expected: BigInt,
        data: Uint8Array,
        options: Option<CallOptions>,
    ) -> Result<BigInt> {
        let p = pointer(ptr)?;
        let expected = u64_arg(expected, "expected")?;
        let data = data.to_vec();
        let v = with_options(self.client()?, options, async |c| {
            c.replace_if(p, expected, data).await
        })
        .await?;
        Ok(big(v))
    }

    /// Deletes the record (owner only).
    #[napi]
    pub async fn delete(&self, ptr: BigInt, options: Option<CallOptions>) -> Result<()> {
        let p = pointer(ptr)?;
        with_options(self.client()?, options, async |c| c.delete(p).await).await
    }

    /// Sets what other identities may do (owner only).
    #[napi]
    pub async fn set_access(
        &self,
        ptr: BigInt,
        access: AccessFlags,
        options: Option<CallOptions>,
    ) -> Result<()> {
        let p = pointer(ptr)?;
        let a = access.to_access();
        with_options(self.client()?, options, async |c| c.set_access(p, a).await).await
    }

    /// Takes ownership of a record whose takeover flag is set (the flag is cleared).
    #[napi]
    pub async fn takeover(&self, ptr: BigInt, options: Option<CallOptions>) -> Result<()> {
        let p = pointer(ptr)?;
        with_options(self.client()?, options, async |c| c.takeover(p).await).await
    }

    /// Hands the record to another identity: an IP address ("10.0.0.7") or a
    /// 64-hex-digit identity (owner only).
    #[napi]
    pub async fn transfer(
        &self,
        ptr: BigInt,
        to: String,
        options: Option<CallOptions>,
    ) -> Result<()> {
        let p = pointer(ptr)?;
        let owner: NewOwner = if let Ok(ip) = to.parse::<IpAddr>() {
            ip.into()
        } else if let Ok(id) = to.parse::<Identity>() {
            id.into()
        } else {
            return Err(js_error(
                "INVALID_ARGUMENT",
                format!("{to:?} is neither an IP address nor a 64-hex-digit identity"),
            ));
        };
        with_options(self.client()?, options, async |c| {
            c.transfer(p, owner).await
        })
        .await
    }

    /// Size, version, access flags and ownership of the record.
    #[napi]
    pub async fn info(&self, ptr: BigInt, options: Option<CallOptions>) -> Result<RecordInfo> {
        let p = pointer(ptr)?;
        let i = with_options(self.client()?, options, async |c| c.info(p).await).await?;
        Ok(RecordInfo {
            size: big(i.size),
            version: big(i.version),
            access: AccessFlags::from_access(i.access),
            owned: i.owned,
        })
    }

    /// Watches a record: `callback(event)` runs on the event loop for every change, in
    /// order, at most once per `minIntervalMs` (changes in between are merged by the
    /// server). The watch survives reconnects (an event then tells what changed while
    /// the connection was down). Resolves once the server accepted the watch, to a
    /// `Subscription`.
    #[napi(
        ts_args_type = "ptr: bigint, callback: (event: WatchEvent) => void, minIntervalMs?: number | undefined | null"
    )]
    pub async fn watch(
        &self,
        ptr: BigInt,
        callback: ThreadsafeFunction<WatchEvent, (), WatchEvent, Status, false>,
        min_interval_ms: Option<u32>,
    ) -> Result<Subscription> {
        let c = self.client()?;
        let mut w = c
            .watch_with(pointer(ptr)?, min_interval_ms.unwrap_or(0))
            .await
            .map_err(from_client)?;
        let task = tokio::spawn(async move {
            while let Some(e) = w.next().await {
                let event = match e.event {
                    netswap_client::Event::Changed => "changed",
                    netswap_client::Event::Deleted => "deleted",
                    netswap_client::Event::OwnerChanged => "owner-changed",
                    netswap_client::Event::AccessChanged => "access-changed",
                };
                callback.call(
                    WatchEvent {
                        event: event.into(),
                        ptr: big(e.ptr.get()),
                        version: big(e.version),
                    },
                    ThreadsafeFunctionCallMode::NonBlocking,
                );
            }
        });
        Ok(Subscription {
            task: Mutex::new(Some(task)),
        })
    }

    /// Mirrors a record (READ access needed): an exact local copy kept up to date by the
    /// bytes the server pushes for each change, at most once per `minIntervalMs`;
    /// `callback(change)` hears about each update. Resolves once the copy is there.
    #[napi(
        ts_args_type = "ptr: bigint, callback: (change: MirrorChange) => void, minIntervalMs?: number | undefined | null"
    )]
    pub async fn mirror(
        &self,
        ptr: BigInt,
        callback: ThreadsafeFunction<MirrorChange, (), MirrorChange, Status, false>,
        min_interval_ms: Option<u32>,
    ) -> Result<MirrorHandle> {
        let c = self.client()?;
        let mut m = c
            .mirror_with(pointer(ptr)?, min_interval_ms.unwrap_or(0))
            .await
            .map_err(from_client)?;
        let view = m.view();
        let task = tokio::spawn(async move {
            while let Some(e) = m.next().await {
                let (kind, version, size, changed) = match e {
                    MirrorEvent::Updated {
                        version,
                        changed,
                        size,
                    } => ("updated", version, size, changed),
                    MirrorEvent::Reloaded { version, size } => ("reloaded", version, size, vec![]),
                    MirrorEvent::OwnerChanged => ("owner-changed", m.version(), 0, vec![]),
                    MirrorEvent::AccessChanged => ("access-changed", m.version(), 0, vec![]),
                    MirrorEvent::Deleted => ("deleted", m.version(), 0, vec![]),
                };
                let size = if kind == "updated" || kind == "reloaded" {
                    size
                } else {
                    m.with_data(|d, _| d.len() as u64)
                };
                callback.call(
                    MirrorChange {
                        kind: kind.into(),
                        version: big(version),
                        size: big(size),
                        changed: changed
                            .iter()
                            .map(|(off, b)| ChangedRange {
                                offset: big(*off),
                                length: big(b.len() as u64),
                            })
                            .collect(),
                    },
                    ThreadsafeFunctionCallMode::NonBlocking,
                );
            }
        });
        Ok(MirrorHandle {
            view,
            task: Mutex::new(Some(task)),
        })
    }
}

/// Formats a pointer as 16 lowercase hex digits.
#[napi]
pub fn pointer_to_hex(ptr: BigInt) -> Result<String> {
    Ok(pointer(ptr)?.to_string())
}

/// Parses 1 to 16 hex digits (optionally "0x"-prefixed) into a pointer.
#[napi]
pub fn pointer_from_hex(text: String) -> Result<BigInt> {
    text.parse::<Pointer>()
        .map(|p| big(p.get()))
        .map_err(|e| js_error("INVALID_ARGUMENT", format!("{text:?}: {e}")))
}
