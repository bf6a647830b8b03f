//! The blocking client: the async client's API without `async`, for simple programs,
//! scripts and the C ABI. It drives an async [`crate::Client`] on an internal
//! one-thread runtime; it is `Send + Sync` and may be shared by threads.
//!
//! Do not call it from inside an async runtime (use [`crate::Client`] there).

use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use netswap_proto::{Access, HelloInfo, Identity, NewOwner, Pointer, RecordInfo, Version};

use crate::client::{Options, WatchEvent};
use crate::error::Result;

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
    runtime: Arc<tokio::runtime::Runtime>,
    inner: crate::Client,
}

impl Client {
    /// Connects with default [`Options`].
    pub fn connect(addr: &str) -> Result<Client> {
        Client::connect_with(addr, Options::default())
    }

    /// Connects with these options.
    pub fn connect_with(addr: &str, options: Options) -> Result<Client> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("netswap-client")
            .enable_all()
            .build()?;
        let inner = runtime.block_on(crate::Client::connect_with(addr, options))?;
        Ok(Client {
            runtime: Arc::new(runtime),
            inner,
        })
    }

    /// The async client underneath (for use on the internal runtime's handle).
    pub fn as_async(&self) -> &crate::Client {
        &self.inner
    }

    /// A handle on the internal runtime.
    pub fn runtime(&self) -> &tokio::runtime::Handle {
        self.runtime.handle()
    }

    /// See [`crate::Client::server_info`].
    pub fn server_info(&self) -> &HelloInfo {
        self.inner.server_info()
    }
    /// See [`crate::Client::identity`].
    pub fn identity(&self) -> Identity {
        self.inner.identity()
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
        self.runtime.block_on(self.inner.hello())
    }
    /// See [`crate::Client::stats`].
    pub fn stats(&self) -> Result<Vec<(String, u64)>> {
        self.runtime.block_on(self.inner.stats())
    }
    /// See [`crate::Client::create`].
    pub fn create(&self, access: Access, data: impl Into<Bytes>) -> Result<Pointer> {
        self.runtime.block_on(self.inner.create(access, data))
    }
    /// See [`crate::Client::read`].
    pub fn read(&self, ptr: Pointer) -> Result<Bytes> {
        self.runtime.block_on(self.inner.read(ptr))
    }
    /// See [`crate::Client::read_range`].
    pub fn read_range(&self, ptr: Pointer, offset: u64, len: u32) -> Result<Bytes> {
        self.runtime
            .block_on(self.inner.read_range(ptr, offset, len))
    }
    /// See [`crate::Client::replace`].
    pub fn replace(&self, ptr: Pointer, data: impl Into<Bytes>) -> Result<Version> {
        self.runtime.block_on(self.inner.replace(ptr, data))
    }
    /// See [`crate::Client::write_at`].
    pub fn write_at(&self, ptr: Pointer, offset: u64, data: impl Into<Bytes>) -> Result<Version> {
        self.runtime
            .block_on(self.inner.write_at(ptr, offset, data))
    }
    /// See [`crate::Client::replace_if`].
    pub fn replace_if(
        &self,
        ptr: Pointer,
        expected: Version,
        data: impl Into<Bytes>,
    ) -> Result<Version> {
        self.runtime
            .block_on(self.inner.replace_if(ptr, expected, data))
    }
    /// See [`crate::Client::delete`].
    pub fn delete(&self, ptr: Pointer) -> Result<()> {
        self.runtime.block_on(self.inner.delete(ptr))
    }
    /// See [`crate::Client::set_access`].
    pub fn set_access(&self, ptr: Pointer, access: Access) -> Result<()> {
        self.runtime.block_on(self.inner.set_access(ptr, access))
    }
    /// See [`crate::Client::takeover`].
    pub fn takeover(&self, ptr: Pointer) -> Result<()> {
        self.runtime.block_on(self.inner.takeover(ptr))
    }
    /// See [`crate::Client::transfer`].
    pub fn transfer(&self, ptr: Pointer, to: impl Into<NewOwner>) -> Result<()> {
        self.runtime.block_on(self.inner.transfer(ptr, to))
    }
    /// Transfers to the identity of an IP address.
    pub fn transfer_to_ip(&self, ptr: Pointer, ip: IpAddr) -> Result<()> {
        self.transfer(ptr, ip)
    }
    /// See [`crate::Client::info`].
    pub fn info(&self, ptr: Pointer) -> Result<RecordInfo> {
        self.runtime.block_on(self.inner.info(ptr))
    }
    /// See [`crate::Client::watch`]. The returned iterator blocks for each event.
    pub fn watch(&self, ptr: Pointer) -> Result<Watch> {
        let inner = self.runtime.block_on(self.inner.watch(ptr))?;
        Ok(Watch {
            inner,
            _runtime: self.runtime.clone(),
        })
    }
}

/// A blocking iterator of [`WatchEvent`]s; dropping it unwatches.
#[derive(Debug)]
pub struct Watch {
    inner: crate::client::Watch,
    _runtime: Arc<tokio::runtime::Runtime>,
}

impl Watch {
    /// The watched record.
    pub fn pointer(&self) -> Pointer {
        self.inner.pointer()
    }
}

impl Iterator for Watch {
    type Item = WatchEvent;
    fn next(&mut self) -> Option<WatchEvent> {
        self.inner.blocking_next()
    }
}
