//! # netswap for Node.js
//!
//! A napi-rs addon over the Rust async client ([`netswap_client::Client`]): every
//! method returns a Promise and runs on the addon's tokio runtime, never blocking the
//! event loop. Pointers and versions are `bigint`s (they are u64); data is `Buffer`
//! or `Uint8Array`. Errors are `Error`s whose `code` is a stable string: the protocol
//! status (`ACCESS_VIOLATION`, `ADDRESS_FAULT`, `CONFLICT`, …) or `IO`, `TIMEOUT`,
//! `DISCONNECTED`, `BAD_REPLY`, `INVALID_ARGUMENT`, `CLOSED`.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use napi::bindgen_prelude::*;
use napi::threadsafe_function::{ThreadsafeFunction, ThreadsafeFunctionCallMode};
use napi_derive::napi;
use netswap_client::{Access, Error as ClientError, Identity, NewOwner, Options, Pointer};

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
    /// Milliseconds to wait for the connection (default 10000).
    pub connect_timeout_ms: Option<u32>,
    /// Milliseconds each call waits for its reply (default 30000; 0 = no limit).
    pub request_timeout_ms: Option<u32>,
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
        let c = netswap_client::Client::connect_with(address.as_str(), opts)
            .await
            .map_err(from_client)?;
        Ok(Client {
            inner: Arc::new(Mutex::new(Some(c))),
        })
    }

    /// This client's identity on the server, 64 hex digits.
    #[napi(getter)]
    pub fn identity(&self) -> Result<String> {
        Ok(self.client()?.identity().to_string())
    }

    /// True once `close()` was called or the connection ended.
    #[napi(getter)]
    pub fn closed(&self) -> bool {
        match &*self.inner.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(c) => c.is_closed(),
            None => true,
        }
    }

    /// Closes the connection: pending calls reject with code `DISCONNECTED`, later
    /// calls with `CLOSED`, and watches end.
    #[napi]
    pub fn close(&self) {
        if let Some(c) = self.inner.lock().unwrap_or_else(|e| e.into_inner()).take() {
            c.close();
        }
    }

    /// The server's limits and this client's identity.
    #[napi]
    pub async fn hello(&self) -> Result<ServerInfo> {
        let h = self.client()?.hello().await.map_err(from_client)?;
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
    pub async fn create(&self, data: Uint8Array, access: Option<AccessFlags>) -> Result<BigInt> {
        let c = self.client()?;
        let access = access.unwrap_or_default().to_access();
        let p = c.create(access, data.to_vec()).await.map_err(from_client)?;
        Ok(big(p.get()))
    }

    /// Reads the whole record.
    #[napi]
    pub async fn read(&self, ptr: BigInt) -> Result<Buffer> {
        let c = self.client()?;
        let d = c.read(pointer(ptr)?).await.map_err(from_client)?;
        Ok(Buffer::from(d.to_vec()))
    }

    /// Reads up to `length` bytes from `offset` (cut at the end; past the end is
    /// `ADDRESS_FAULT`).
    #[napi]
    pub async fn read_range(&self, ptr: BigInt, offset: BigInt, length: u32) -> Result<Buffer> {
        let c = self.client()?;
        let off = u64_arg(offset, "offset")?;
        let d = c
            .read_range(pointer(ptr)?, off, length)
            .await
            .map_err(from_client)?;
        Ok(Buffer::from(d.to_vec()))
    }

    /// Replaces the data; resolves to the new version.
    #[napi]
    pub async fn replace(&self, ptr: BigInt, data: Uint8Array) -> Result<BigInt> {
        let c = self.client()?;
        let v = c
            .replace(pointer(ptr)?, data.to_vec())
            .await
            .map_err(from_client)?;
        Ok(big(v))
    }

    /// Writes at `offset` (at most the current size; the record may grow); resolves to
    /// the new version.
    #[napi]
    pub async fn write_at(&self, ptr: BigInt, offset: BigInt, data: Uint8Array) -> Result<BigInt> {
        let c = self.client()?;
        let off = u64_arg(offset, "offset")?;
        let v = c
            .write_at(pointer(ptr)?, off, data.to_vec())
            .await
            .map_err(from_client)?;
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
    ) -> Result<BigInt> {
        let c = self.client()?;
        let expected = u64_arg(expected, "expected")?;
        let v = c
            .replace_if(pointer(ptr)?, expected, data.to_vec())
            .await
            .map_err(from_client)?;
        Ok(big(v))
    }

    /// Deletes the record (owner only).
    #[napi]
    pub async fn delete(&self, ptr: BigInt) -> Result<()> {
        let c = self.client()?;
        c.delete(pointer(ptr)?).await.map_err(from_client)
    }

    /// Sets what other identities may do (owner only).
    #[napi]
    pub async fn set_access(&self, ptr: BigInt, access: AccessFlags) -> Result<()> {
        let c = self.client()?;
        c.set_access(pointer(ptr)?, access.to_access())
            .await
            .map_err(from_client)
    }

    /// Takes ownership of a record whose takeover flag is set (the flag is cleared).
    #[napi]
    pub async fn takeover(&self, ptr: BigInt) -> Result<()> {
        let c = self.client()?;
        c.takeover(pointer(ptr)?).await.map_err(from_client)
    }

    /// Hands the record to another identity: an IP address ("10.0.0.7") or a
    /// 64-hex-digit identity (owner only).
    #[napi]
    pub async fn transfer(&self, ptr: BigInt, to: String) -> Result<()> {
        let c = self.client()?;
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
        c.transfer(pointer(ptr)?, owner).await.map_err(from_client)
    }

    /// Size, version, access flags and ownership of the record.
    #[napi]
    pub async fn info(&self, ptr: BigInt) -> Result<RecordInfo> {
        let c = self.client()?;
        let i = c.info(pointer(ptr)?).await.map_err(from_client)?;
        Ok(RecordInfo {
            size: big(i.size),
            version: big(i.version),
            access: AccessFlags::from_access(i.access),
            owned: i.owned,
        })
    }

    /// Watches a record: `callback(event)` runs on the event loop for every change, in
    /// order. Resolves once the server accepted the watch, to a `Subscription`.
    #[napi(ts_args_type = "ptr: bigint, callback: (event: WatchEvent) => void")]
    pub async fn watch(
        &self,
        ptr: BigInt,
        callback: ThreadsafeFunction<WatchEvent, (), WatchEvent, Status, false>,
    ) -> Result<Subscription> {
        let c = self.client()?;
        let mut w = c.watch(pointer(ptr)?).await.map_err(from_client)?;
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
