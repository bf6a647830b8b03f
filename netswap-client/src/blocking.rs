//! The blocking client: the async client's API without `async`, for simple programs,
//! scripts and the C ABI.
//!
//! It drives an async [`crate::Client`] on its own one-thread runtime and waits for
//! each call on an ordinary channel, so it works from any thread — also from inside
//! another tokio runtime (where it blocks that runtime's thread for the call, as any
//! blocking function would; prefer [`crate::Client`] there). The one place it refuses
//! (with [`Error::InvalidArgument`]) is its own I/O thread, where a blocking call
//! could never complete. It is `Send + Sync`:
//! clones share the connection, and threads may call it at once.

use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use netswap_proto::{Access, HelloInfo, Identity, NewOwner, Pointer, RecordInfo, Version};

use crate::error::{Error, Result};
use crate::options::{ConnectionState, Options};
use crate::watch::{MirrorEvent, WatchEvent};

/// A blocking netswap client. Clones share the connection and the runtime.
///
/// ```no_run
/// use netswap_client::{blocking::Client, Access};
/// let client = Client::connect("127.0.0.1:7420")?;
/// let ptr = client.create(Access::READ | Access::WRITE, &b"hello"[..])?;
/// assert_eq!(&client.read(ptr)?[..], b"hello");
/// # Ok::<(), netswap_client::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Client {
    // Dropped first: the connection closes before its runtime goes.
    inner: crate::Client,
    runtime: Arc<Runtime>,
}

/// The client's runtime. Shut down without waiting when the last handle goes, so
/// dropping a client is fine anywhere (also inside another runtime).
#[derive(Debug)]
struct Runtime(Option<tokio::runtime::Runtime>);

impl std::ops::Deref for Runtime {
    type Target = tokio::runtime::Runtime;
    fn deref(&self) -> &tokio::runtime::Runtime {
        self.0.as_ref().expect("present until dropped")
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

thread_local! {
    /// Set on the I/O threads of blocking clients: a blocking call there (from a watch
    /// or mirror callback of the C ABI, say) would wait for the thread it blocks.
    static IO_THREAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Refuses a blocking call on a client's own I/O thread (it could never complete).
fn not_on_io_thread() -> Result<()> {
    if IO_THREAD.with(|t| t.get()) {
        return Err(Error::InvalidArgument(
            "a blocking call from a netswap I/O thread (a watch, mirror or state callback) would wait for itself: hand the work to another thread".into(),
        ));
    }
    Ok(())
}

/// Runs `f` on `runtime` and waits for it on this thread.
fn run<T: Send + 'static>(
    runtime: &tokio::runtime::Runtime,
    f: impl Future<Output = T> + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    runtime.spawn(async move {
        let _ = tx.send(f.await);
    });
    rx.recv()
        .expect("the client's runtime ends only when the client does")
}

impl Client {
    /// Connects with default [`Options`].
    pub fn connect(addr: impl std::fmt::Display) -> Result<Client> {
        Client::connect_with(addr, Options::default())
    }

    /// Connects with these options.
    pub fn connect_with(addr: impl std::fmt::Display, options: Options) -> Result<Client> {
        not_on_io_thread()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("netswap-client")
            .on_thread_start(|| IO_THREAD.with(|t| t.set(true)))
            .enable_all()
            .build()?;
        let addr = addr.to_string();
        let inner = run(&runtime, async move {
            crate::Client::connect_with(&addr, options).await
        })?;
        Ok(Client {
            inner,
            runtime: Arc::new(Runtime(Some(runtime))),
        })
    }

    /// Runs a call of the async client on the client's runtime.
    fn call<T: Send + 'static, F: Future<Output = Result<T>> + Send + 'static>(
        &self,
        f: impl FnOnce(crate::Client) -> F,
    ) -> Result<T> {
        not_on_io_thread()?;
        run(&self.runtime, f(self.inner.clone()))
    }

    /// The async client underneath (for use on the internal runtime's handle).
    pub fn as_async(&self) -> &crate::Client {
        &self.inner
    }

    /// A handle on the internal runtime.
    pub fn runtime(&self) -> &tokio::runtime::Handle {
        self.runtime.handle()
    }

    /// A handle on the same connection whose calls wait at most `timeout`; see
    /// [`crate::Client::with_timeout`].
    pub fn with_timeout(&self, timeout: impl Into<Option<Duration>>) -> Client {
        Client {
            inner: self.inner.with_timeout(timeout),
            runtime: self.runtime.clone(),
        }
    }

    /// See [`crate::Client::server_info`].
    pub fn server_info(&self) -> HelloInfo {
        self.inner.server_info()
    }
    /// See [`crate::Client::identity`].
    pub fn identity(&self) -> Identity {
        self.inner.identity()
    }
    /// See [`crate::Client::state`].
    pub fn state(&self) -> ConnectionState {
        self.inner.state()
    }
    /// Blocks until the connection state differs from `seen`, or `timeout` passes;
    /// returns the state then.
    pub fn wait_state_change(&self, seen: &ConnectionState, timeout: Duration) -> ConnectionState {
        if not_on_io_thread().is_err() {
            return self.state();
        }
        let mut rx = self.inner.state_changes();
        let seen = seen.clone();
        run(&self.runtime, async move {
            let _ = tokio::time::timeout(timeout, rx.wait_for(|s| *s != seen)).await;
            rx.borrow().clone()
        })
    }
    /// See [`crate::Client::in_flight`].
    pub fn in_flight(&self) -> usize {
        self.inner.in_flight()
    }
    /// See [`crate::Client::is_closed`].
    pub fn is_closed(&self) -> bool {
        self.inner.is_closed()
    }
    /// See [`crate::Client::close`].
    pub fn close(&self) {
        self.inner.close()
    }
    /// See [`crate::Client::hello`].
    pub fn hello(&self) -> Result<HelloInfo> {
        self.call(|c| async move { c.hello().await })
    }
    /// See [`crate::Client::stats`].
    pub fn stats(&self) -> Result<Vec<(String, u64)>> {
        self.call(|c| async move { c.stats().await })
    }
    /// See [`crate::Client::create`].
    pub fn create(&self, access: Access, data: impl Into<Bytes>) -> Result<Pointer> {
        let data = data.into();
        self.call(|c| async move { c.create(access, data).await })
    }
    /// See [`crate::Client::read`].
    pub fn read(&self, ptr: Pointer) -> Result<Bytes> {
        self.call(|c| async move { c.read(ptr).await })
    }
    /// See [`crate::Client::read_range`].
    pub fn read_range(&self, ptr: Pointer, offset: u64, len: u32) -> Result<Bytes> {
        self.call(|c| async move { c.read_range(ptr, offset, len).await })
    }
    /// See [`crate::Client::replace`].
    pub fn replace(&self, ptr: Pointer, data: impl Into<Bytes>) -> Result<Version> {
        let data = data.into();
        self.call(|c| async move { c.replace(ptr, data).await })
    }
    /// See [`crate::Client::write_at`].
    pub fn write_at(&self, ptr: Pointer, offset: u64, data: impl Into<Bytes>) -> Result<Version> {
        let data = data.into();
        self.call(|c| async move { c.write_at(ptr, offset, data).await })
    }
    /// See [`crate::Client::replace_if`].
    pub fn replace_if(
        &self,
        ptr: Pointer,
        expected: Version,
        data: impl Into<Bytes>,
    ) -> Result<Version> {
        let data = data.into();
        self.call(|c| async move { c.replace_if(ptr, expected, data).await })
    }
    /// See [`crate::Client::delete`].
    pub fn delete(&self, ptr: Pointer) -> Result<()> {
        self.call(|c| async move { c.delete(ptr).await })
    }
    /// See [`crate::Client::set_access`].
    pub fn set_access(&self, ptr: Pointer, access: Access) -> Result<()> {
        self.call(|c| async move { c.set_access(ptr, access).await })
    }
    /// See [`crate::Client::takeover`].
    pub fn takeover(&self, ptr: Pointer) -> Result<()> {
        self.call(|c| async move { c.takeover(ptr).await })
    }
    /// See [`crate::Client::transfer`].
    pub fn transfer(&self, ptr: Pointer, to: impl Into<NewOwner>) -> Result<()> {
        let to = to.into();
        self.call(|c| async move { c.transfer(ptr, to).await })
    }
    /// Transfers to the identity of an IP address.
    pub fn transfer_to_ip(&self, ptr: Pointer, ip: IpAddr) -> Result<()> {
        self.transfer(ptr, ip)
    }
    /// See [`crate::Client::info`].
    pub fn info(&self, ptr: Pointer) -> Result<RecordInfo> {
        self.call(|c| async move { c.info(ptr).await })
    }
    /// See [`crate::Client::watch`]. The returned iterator blocks for each event.
    pub fn watch(&self, ptr: Pointer) -> Result<Watch> {
        self.watch_with(ptr, 0)
    }
    /// See [`crate::Client::watch_with`].
    pub fn watch_with(&self, ptr: Pointer, min_interval_ms: u32) -> Result<Watch> {
        let inner = self.call(|c| async move { c.watch_with(ptr, min_interval_ms).await })?;
        Ok(Watch {
            inner: Some(inner),
            runtime: self.runtime.clone(),
        })
    }
    /// See [`crate::Client::mirror`].
    pub fn mirror(&self, ptr: Pointer) -> Result<Mirror> {
        self.mirror_with(ptr, 0)
    }
    /// See [`crate::Client::mirror_with`].
    pub fn mirror_with(&self, ptr: Pointer, min_interval_ms: u32) -> Result<Mirror> {
        let inner = self.call(|c| async move { c.mirror_with(ptr, min_interval_ms).await })?;
        Ok(Mirror {
            inner: Some(inner),
            runtime: self.runtime.clone(),
        })
    }
}

/// A blocking iterator of [`WatchEvent`]s; dropping it unwatches.
#[derive(Debug)]
pub struct Watch {
    inner: Option<crate::Watch>,
    runtime: Arc<Runtime>,
}

impl Watch {
    /// The watched record.
    pub fn pointer(&self) -> Pointer {
        self.inner
            .as_ref()
            .expect("present until dropped")
            .pointer()
    }

    /// The async watch underneath, to be polled on [`Client::runtime`].
    pub fn into_async(mut self) -> crate::Watch {
        self.inner.take().expect("present until dropped")
    }

    /// The next event, waiting at most `timeout`: `Ok(None)` when the watch has
    /// ended, `Err(Error::Timeout { .. })` when nothing came in time.
    pub fn next_timeout(&mut self, timeout: Duration) -> Result<Option<WatchEvent>> {
        not_on_io_thread()?;
        let mut w = self.inner.take().expect("present until dropped");
        let (w, got) = run(&self.runtime, async move {
            let got = tokio::time::timeout(timeout, w.next()).await;
            (w, got)
        });
        self.inner = Some(w);
        got.map_err(|_| Error::Timeout {
            what: "a watch event".into(),
            waited: timeout,
            in_flight: 0,
        })
    }
}

impl Iterator for Watch {
    type Item = WatchEvent;
    fn next(&mut self) -> Option<WatchEvent> {
        not_on_io_thread().ok()?;
        let mut w = self.inner.take()?;
        let (w, got) = run(&self.runtime, async move {
            let got = w.next().await;
            (w, got)
        });
        self.inner = Some(w);
        got
    }
}

/// A blocking [`crate::Mirror`]: the copy is kept up to date in the background; the
/// iterator blocks for each event.
#[derive(Debug)]
pub struct Mirror {
    inner: Option<crate::Mirror>,
    runtime: Arc<Runtime>,
}

impl Mirror {
    fn get(&self) -> &crate::Mirror {
        self.inner.as_ref().expect("present until dropped")
    }
    /// The async mirror underneath, to be polled on [`Client::runtime`].
    pub fn into_async(mut self) -> crate::Mirror {
        self.inner.take().expect("present until dropped")
    }
    /// The mirrored record.
    pub fn pointer(&self) -> Pointer {
        self.get().pointer()
    }
    /// The version of the copy.
    pub fn version(&self) -> Version {
        self.get().version()
    }
    /// A copy of the bytes.
    pub fn data(&self) -> Bytes {
        self.get().data()
    }
    /// Looks at the bytes and their version without copying them.
    pub fn with_data<R>(&self, f: impl FnOnce(&[u8], Version) -> R) -> R {
        self.get().with_data(f)
    }
    /// The next event, waiting at most `timeout` (see [`Watch::next_timeout`]).
    pub fn next_timeout(&mut self, timeout: Duration) -> Result<Option<MirrorEvent>> {
        not_on_io_thread()?;
        let mut m = self.inner.take().expect("present until dropped");
        let (m, got) = run(&self.runtime, async move {
            let got = tokio::time::timeout(timeout, m.next()).await;
            (m, got)
        });
        self.inner = Some(m);
        got.map_err(|_| Error::Timeout {
            what: "a mirror event".into(),
            waited: timeout,
            in_flight: 0,
        })
    }
}

impl Iterator for Mirror {
    type Item = MirrorEvent;
    fn next(&mut self) -> Option<MirrorEvent> {
        not_on_io_thread().ok()?;
        let mut m = self.inner.take()?;
        let (m, got) = run(&self.runtime, async move {
            let got = m.next().await;
            (m, got)
        });
        self.inner = Some(m);
        got
    }
}
