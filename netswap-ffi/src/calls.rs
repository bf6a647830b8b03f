//! Asynchronous calls: netswap_call_async() starts a request and returns at once; a
//! completion callback delivers its result on the library's I/O thread. A cancel token
//! stops a call that has not completed (its request is taken back if it has not left
//! yet). This is what the C# `*Async` methods stand on.

use std::ffi::{CString, c_char, c_void};
use std::net::IpAddr;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::Duration;

use ::netswap_client::{Error, HelloInfo, Identity, Pointer, RecordInfo};
use bytes::Bytes;
use tokio::sync::Notify;

use crate::netswap_result::*;
use crate::{
    access_arg, bytes_arg, fail, guard, netswap_client, netswap_hello_info, netswap_record_info,
    netswap_result, pointer, str_arg,
};

/// What netswap_call_async() does.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum netswap_op {
    /// CREATE: `access`, `data`. Outcome: `ptr`.
    NETSWAP_OP_CREATE = 0,
    /// READ of the whole record. Outcome: `data`.
    NETSWAP_OP_READ = 1,
    /// READ of `length` bytes from `offset`. Outcome: `data`.
    NETSWAP_OP_READ_RANGE = 2,
    /// REPLACE with `data`. Outcome: `version`.
    NETSWAP_OP_REPLACE = 3,
    /// WRITE_AT `offset` of `data`. Outcome: `version`.
    NETSWAP_OP_WRITE_AT = 4,
    /// REPLACE_IF at version `version` with `data`. Outcome: `version` (the current
    /// one on NETSWAP_CONFLICT).
    NETSWAP_OP_REPLACE_IF = 5,
    /// DELETE.
    NETSWAP_OP_DELETE = 6,
    /// SET_ACCESS to `access`.
    NETSWAP_OP_SET_ACCESS = 7,
    /// TAKEOVER.
    NETSWAP_OP_TAKEOVER = 8,
    /// TRANSFER to the identity of the address `ip`.
    NETSWAP_OP_TRANSFER_TO_IP = 9,
    /// TRANSFER to the 32-byte identity in `data`.
    NETSWAP_OP_TRANSFER_TO_IDENTITY = 10,
    /// INFO. Outcome: `info`.
    NETSWAP_OP_INFO = 11,
    /// HELLO. Outcome: `hello`.
    NETSWAP_OP_HELLO = 12,
}

use netswap_op::*;

/// One call for netswap_call_async(): the operation and the fields it uses (the others
/// are ignored). Everything it points to is copied before netswap_call_async() returns.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct netswap_call {
    /// The operation.
    pub op: netswap_op,
    /// The record (all but CREATE and HELLO).
    pub ptr: u64,
    /// READ_RANGE, WRITE_AT.
    pub offset: u64,
    /// READ_RANGE.
    pub length: u32,
    /// REPLACE_IF: the expected version.
    pub version: u64,
    /// CREATE, SET_ACCESS: NETSWAP_ACCESS_* bits.
    pub access: u8,
    /// CREATE, REPLACE, WRITE_AT, REPLACE_IF: the bytes; TRANSFER_TO_IDENTITY: 32
    /// bytes. May be NULL when `data_len` is 0.
    pub data: *const u8,
    /// Bytes at `data`.
    pub data_len: usize,
    /// TRANSFER_TO_IP: the address ("10.0.0.7", "::1").
    pub ip: *const c_char,
    /// Deadline in ms (0: the client handle's request timeout).
    pub timeout_ms: u32,
    /// Cancels the call when triggered (NULL: not cancellable).
    pub cancel: *const netswap_cancel,
}

/// What a completed call gives its callback. Valid only during the callback: copy what
/// you keep.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct netswap_outcome {
    /// CREATE: the new pointer.
    pub ptr: u64,
    /// Writes: the new version; REPLACE_IF on NETSWAP_CONFLICT: the current version.
    pub version: u64,
    /// READ, READ_RANGE: the bytes (NULL when empty).
    pub data: *const u8,
    /// Bytes at `data`.
    pub data_len: usize,
    /// INFO.
    pub info: netswap_record_info,
    /// HELLO.
    pub hello: netswap_hello_info,
    /// On failure: what went wrong (NUL-terminated); "" on success.
    pub message: *const c_char,
}

/// Called once per started call, with its result (NETSWAP_CANCELLED when it was
/// cancelled first) and outcome, on the library's I/O thread. It must return quickly
/// and must not wait for other netswap calls.
pub type netswap_completion = Option<
    unsafe extern "C" fn(
        user_data: *mut c_void,
        result: netswap_result,
        outcome: *const netswap_outcome,
    ),
>;

/// A cancel token (opaque): triggered once, it cancels every call it was given to.
/// Freeing it does not cancel; the library keeps what it needs of it.
pub struct netswap_cancel {
    inner: Arc<Cancel>,
}

struct Cancel {
    triggered: std::sync::atomic::AtomicBool,
    notify: Notify,
}

impl Cancel {
    async fn triggered(&self) {
        loop {
            let n = self.notify.notified();
            if self.triggered.load(std::sync::atomic::Ordering::Acquire) {
                return;
            }
            n.await;
        }
    }
}

/// A new cancel token. Release it with netswap_cancel_free().
#[unsafe(no_mangle)]
pub extern "C" fn netswap_cancel_new() -> *mut netswap_cancel {
    Box::into_raw(Box::new(netswap_cancel {
        inner: Arc::new(Cancel {
            triggered: std::sync::atomic::AtomicBool::new(false),
            notify: Notify::new(),
        }),
    }))
}

/// Cancels every call started with this token that has not completed: each completes
/// with NETSWAP_CANCELLED (a request that has not left is taken back; one that has is
/// abandoned). Later calls with it complete with NETSWAP_CANCELLED at once. NULL is
/// ignored; safe from any thread.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn netswap_cancel_trigger(cancel: *const netswap_cancel) {
    if let Some(c) = unsafe { cancel.as_ref() } {
        c.inner
            .triggered
            .store(true, std::sync::atomic::Ordering::Release);
        c.inner.notify.notify_waiters();
    }
}

/// Releases a cancel token (calls it was given to are not cancelled). NULL is ignored.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn netswap_cancel_free(cancel: *mut netswap_cancel) {
    if !cancel.is_null() {
        // SAFETY: created by netswap_cancel_new and not freed before.
        drop(unsafe { Box::from_raw(cancel) });
    }
}

/// The result of a call, before it is handed to C.
enum Done {
    Nothing,
    Ptr(Pointer),
    Version(u64),
    Data(Bytes),
    Info(RecordInfo),
    Hello(HelloInfo),
}

/// Starts `call` on `client` and returns at once. On NETSWAP_OK, `completion` will be
/// called exactly once with the result (it may already have been called when this
/// returns); on any other result (a NULL or invalid argument) it is not called. The
/// call copies what `call` points to. `user_data` is passed as given.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn netswap_call_async(
    client: *const netswap_client,
    call: *const netswap_call,
    completion: netswap_completion,
    user_data: *mut c_void,
) -> netswap_result {
    guard(|| {
        let c = arg!(client, "client");
        let call = arg!(call, "call");
        let Some(done) = completion else {
            return fail(NETSWAP_INVALID_ARGUMENT, "argument `completion` is NULL");
        };
        let mut client = c.client.as_async().clone();
        if call.timeout_ms > 0 {
            client = client.with_timeout(Duration::from_millis(call.timeout_ms.into()));
        }
        let cancel = unsafe { call.cancel.as_ref() }.map(|t| t.inner.clone());
        let ptr = || pointer(call.ptr);
        let data = || unsafe { bytes_arg(call.data, call.data_len) };
        // Everything is checked and copied here, before the call leaves this thread.
        let work: std::pin::Pin<Box<dyn Future<Output = Result<Done, Error>> + Send>> =
            match call.op {
                NETSWAP_OP_CREATE => {
                    let access = tri!(access_arg(call.access));
                    let data = tri!(data());
                    Box::pin(async move { client.create(access, data).await.map(Done::Ptr) })
                }
                NETSWAP_OP_READ => {
                    let p = tri!(ptr());
                    Box::pin(async move { client.read(p).await.map(Done::Data) })
                }
                NETSWAP_OP_READ_RANGE => {
                    let (p, off, len) = (tri!(ptr()), call.offset, call.length);
                    Box::pin(async move { client.read_range(p, off, len).await.map(Done::Data) })
                }
                NETSWAP_OP_REPLACE => {
                    let (p, d) = (tri!(ptr()), tri!(data()));
                    Box::pin(async move { client.replace(p, d).await.map(Done::Version) })
                }
                NETSWAP_OP_WRITE_AT => {
                    let (p, off, d) = (tri!(ptr()), call.offset, tri!(data()));
                    Box::pin(async move { client.write_at(p, off, d).await.map(Done::Version) })
                }
                NETSWAP_OP_REPLACE_IF => {
                    let (p, v, d) = (tri!(ptr()), call.version, tri!(data()));
                    Box::pin(async move { client.replace_if(p, v, d).await.map(Done::Version) })
                }
                NETSWAP_OP_DELETE => {
                    let p = tri!(ptr());
                    Box::pin(async move { client.delete(p).await.map(|_| Done::Nothing) })
                }
                NETSWAP_OP_SET_ACCESS => {
                    let (p, a) = (tri!(ptr()), tri!(access_arg(call.access)));
                    Box::pin(async move { client.set_access(p, a).await.map(|_| Done::Nothing) })
                }
                NETSWAP_OP_TAKEOVER => {
                    let p = tri!(ptr());
                    Box::pin(async move { client.takeover(p).await.map(|_| Done::Nothing) })
                }
                NETSWAP_OP_TRANSFER_TO_IP => {
                    let p = tri!(ptr());
                    let text = tri!(unsafe { str_arg(call.ip, "call.ip") });
                    let ip = tri!(text.parse::<IpAddr>().map_err(|_| fail(
                        NETSWAP_INVALID_ARGUMENT,
                        format!("{text:?} is not an IP address")
                    )));
                    Box::pin(async move { client.transfer(p, ip).await.map(|_| Done::Nothing) })
                }
                NETSWAP_OP_TRANSFER_TO_IDENTITY => {
                    let p = tri!(ptr());
                    let d = tri!(data());
                    let Ok(id) = <[u8; 32]>::try_from(&d[..]) else {
                        return fail(
                            NETSWAP_INVALID_ARGUMENT,
                            "TRANSFER_TO_IDENTITY needs 32 bytes of identity in `data`",
                        );
                    };
                    Box::pin(async move {
                        client
                            .transfer(p, Identity(id))
                            .await
                            .map(|_| Done::Nothing)
                    })
                }
                NETSWAP_OP_INFO => {
                    let p = tri!(ptr());
                    Box::pin(async move { client.info(p).await.map(Done::Info) })
                }
                NETSWAP_OP_HELLO => Box::pin(async move { client.hello().await.map(Done::Hello) }),
            };
        let user = user_data as usize; // the caller vouches for its thread-safety
        c.client.runtime().spawn(async move {
            let result = match cancel {
                None => Some(work.await),
                Some(t) => tokio::select! {
                    biased;
                    _ = t.triggered() => None, // dropping `work` gives the request up
                    r = work => Some(r),
                },
            };
            complete(done, user as *mut c_void, result);
        });
        NETSWAP_OK
    })
}

/// Hands a result to the completion callback (a panic in it is caught).
fn complete(
    done: unsafe extern "C" fn(*mut c_void, netswap_result, *const netswap_outcome),
    user: *mut c_void,
    result: Option<Result<Done, Error>>,
) {
    let mut outcome = netswap_outcome {
        ptr: 0,
        version: 0,
        data: std::ptr::null(),
        data_len: 0,
        info: netswap_record_info::default(),
        hello: netswap_hello_info::default(),
        message: c"".as_ptr(),
    };
    let mut keep = None;
    let message;
    let code = match result {
        None => {
            message = CString::new("the call was cancelled").unwrap_or_default();
            outcome.message = message.as_ptr();
            NETSWAP_CANCELLED
        }
        Some(Err(e)) => {
            if let Error::Conflict { current } = &e {
                outcome.version = *current;
            }
            message = CString::new(e.to_string().replace('\0', " ")).unwrap_or_default();
            outcome.message = message.as_ptr();
            crate::code_of(&e)
        }
        Some(Ok(d)) => {
            match d {
                Done::Nothing => {}
                Done::Ptr(p) => outcome.ptr = p.get(),
                Done::Version(v) => outcome.version = v,
                Done::Data(b) => {
                    if !b.is_empty() {
                        outcome.data = b.as_ptr();
                        outcome.data_len = b.len();
                    }
                    keep = Some(b);
                }
                Done::Info(i) => outcome.info = crate::record_info(&i),
                Done::Hello(h) => outcome.hello = crate::hello_info(&h),
            }
            NETSWAP_OK
        }
    };
    let _ = catch_unwind(AssertUnwindSafe(|| unsafe { done(user, code, &outcome) }));
    drop(keep);
}
