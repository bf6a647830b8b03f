//! Mirrors through the C ABI: an exact local copy of a record, kept up to date by the
//! bytes the server pushes for every change (a data watch), readable at any moment.

use std::ffi::c_void;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use ::netswap_client::{MirrorEvent, MirrorView};

use crate::netswap_result::*;
use crate::{WatchShared, fail, guard, netswap_buffer, netswap_client, netswap_result, pointer};

/// Mirror event: a change (or several merged) was applied; `changed` lists the bytes.
pub const NETSWAP_MIRROR_UPDATED: u8 = 1;
/// Mirror event: the copy was replaced by a fresh one (after a gap in the versions or a
/// reconnect during which the record changed).
pub const NETSWAP_MIRROR_RELOADED: u8 = 2;
/// Mirror event: the owner changed.
pub const NETSWAP_MIRROR_OWNER_CHANGED: u8 = 3;
/// Mirror event: the access bits changed.
pub const NETSWAP_MIRROR_ACCESS_CHANGED: u8 = 4;
/// Mirror event: the record is gone; the copy keeps its last bytes; no more events.
pub const NETSWAP_MIRROR_DELETED: u8 = 5;

/// Bytes that changed in a mirror's copy: `len` bytes at `offset` (valid during the
/// callback only).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct netswap_range {
    /// Where in the record.
    pub offset: u64,
    /// The new bytes.
    pub data: *const u8,
    /// How many.
    pub len: usize,
}

/// Called for every event of a mirror, in order: `event` is a NETSWAP_MIRROR_* value,
/// `version` and `size` the copy's right after it (netswap_mirror_copy() may already
/// give a later version), `changed[0..changed_len]` the bytes an UPDATED event changed
/// (else NULL and 0): applied in order to the copy at the previous event's version
/// they give this one. Same thread rules as netswap_watch().
pub type netswap_mirror_callback = Option<
    unsafe extern "C" fn(
        user_data: *mut c_void,
        event: u8,
        version: u64,
        size: u64,
        changed: *const netswap_range,
        changed_len: usize,
    ),
>;

/// A mirror (opaque). Release with netswap_mirror_free().
pub struct netswap_mirror {
    view: MirrorView,
    shared: Arc<WatchShared>,
    task: tokio::task::JoinHandle<()>,
}

/// Starts mirroring the record `ptr` (READ access needed): `*out` holds an exact copy
/// from now on, updated in the background, at most once per `min_interval_ms` (0:
/// every change). `callback` (may be NULL) hears about each update. The mirror
/// survives reconnects. Release it with netswap_mirror_free().
#[unsafe(no_mangle)]
pub unsafe extern "C" fn netswap_mirror_new(
    client: *const netswap_client,
    ptr: u64,
    min_interval_ms: u32,
    callback: netswap_mirror_callback,
    user_data: *mut c_void,
    out: *mut *mut netswap_mirror,
) -> netswap_result {
    guard(|| {
        let c = arg!(client, "client");
        let out = out!(out, "out");
        let ptr = tri!(pointer(ptr));
        let mirror = call!(c.client.mirror_with(ptr, min_interval_ms));
        let mut mirror = mirror.into_async();
        let view = mirror.view();
        let shared = WatchShared::new();
        let s = shared.clone();
        let user = user_data as usize; // the caller vouches for its thread-safety
        let task = c.client.runtime().spawn(async move {
            while let Some(e) = mirror.next().await {
                let Some(cb) = callback else { continue };
                // The event's own version (the copy may be further along already).
                let version = match &e {
                    MirrorEvent::Updated { version, .. }
                    | MirrorEvent::Reloaded { version, .. } => *version,
                    _ => mirror.version(),
                };
                let (kind, size, ranges) = match &e {
                    MirrorEvent::Updated { changed, size, .. } => (
                        NETSWAP_MIRROR_UPDATED,
                        *size,
                        changed
                            .iter()
                            .map(|(off, b)| netswap_range {
                                offset: *off,
                                data: b.as_ptr(),
                                len: b.len(),
                            })
                            .collect(),
                    ),
                    MirrorEvent::Reloaded { size, .. } => (NETSWAP_MIRROR_RELOADED, *size, vec![]),
                    MirrorEvent::OwnerChanged => (NETSWAP_MIRROR_OWNER_CHANGED, 0, vec![]),
                    MirrorEvent::AccessChanged => (NETSWAP_MIRROR_ACCESS_CHANGED, 0, vec![]),
                    MirrorEvent::Deleted => (NETSWAP_MIRROR_DELETED, 0, vec![]),
                };
                let size = match e {
                    MirrorEvent::Updated { .. } | MirrorEvent::Reloaded { .. } => size,
                    _ => mirror.with_data(|d, _| d.len() as u64),
                };
                let (at, n) = if ranges.is_empty() {
                    (std::ptr::null(), 0)
                } else {
                    (ranges.as_ptr(), ranges.len())
                };
                let go_on =
                    s.run(|| unsafe { cb(user as *mut c_void, kind, version, size, at, n) });
                if !go_on {
                    return;
                }
            }
        });
        c.register_callbacks(shared.clone());
        *out = Box::into_raw(Box::new(netswap_mirror { view, shared, task }));
        NETSWAP_OK
    })
}

/// The version of the mirror's copy (0 for NULL).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn netswap_mirror_version(mirror: *const netswap_mirror) -> u64 {
    unsafe { mirror.as_ref() }.map_or(0, |m| m.view.version())
}

/// A copy of the mirror's bytes as they are now, in a new library-owned buffer (release
/// it with netswap_buffer_free()), and their version in `*out_version` (may be NULL).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn netswap_mirror_copy(
    mirror: *const netswap_mirror,
    out: *mut *mut netswap_buffer,
    out_version: *mut u64,
) -> netswap_result {
    guard(|| {
        let m = arg!(mirror, "mirror");
        let out = out!(out, "out");
        let (bytes, version) = m
            .view
            .with_data(|d, v| (bytes::Bytes::copy_from_slice(d), v));
        if let Some(v) = unsafe { out_version.as_mut() } {
            *v = version;
        }
        *out = Box::into_raw(Box::new(netswap_buffer { bytes }));
        NETSWAP_OK
    })
}

/// Copies the mirror's bytes into the caller's buffer `dst` of `capacity` bytes:
/// `*out_len` is the copy's size (the bytes written are min(size, capacity); call again
/// with more room when it is larger), `*out_version` (may be NULL) its version.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn netswap_mirror_read_into(
    mirror: *const netswap_mirror,
    dst: *mut u8,
    capacity: usize,
    out_len: *mut usize,
    out_version: *mut u64,
) -> netswap_result {
    guard(|| {
        let m = arg!(mirror, "mirror");
        let out_len = out!(out_len, "out_len");
        if dst.is_null() && capacity > 0 {
            return fail(NETSWAP_INVALID_ARGUMENT, "argument `dst` is NULL");
        }
        m.view.with_data(|d, v| {
            let n = d.len().min(capacity);
            if n > 0 {
                // SAFETY: the caller promises `capacity` writable bytes at `dst`.
                unsafe { std::ptr::copy_nonoverlapping(d.as_ptr(), dst, n) };
            }
            *out_len = d.len();
            if let Some(o) = unsafe { out_version.as_mut() } {
                *o = v;
            }
        });
        NETSWAP_OK
    })
}

/// Ends a mirror and releases it: when this returns no callback of it is running or
/// will run (except when called from inside its callback, which then is the last).
/// Valid after the client was freed. NULL is ignored.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn netswap_mirror_free(mirror: *mut netswap_mirror) {
    if mirror.is_null() {
        return;
    }
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: created by netswap_mirror_new and not freed before (caller's contract).
        let m = unsafe { Box::from_raw(mirror) };
        m.shared.stop();
        // Dropping the task's Mirror ends its data watch.
        m.task.abort();
    }));
}
