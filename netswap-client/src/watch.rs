//! Watches and mirrors, and the table that keeps them across connections.
//!
//! A watch lives in the client, not in a connection: when the connection is replaced
//! it is registered again (asking for the record's state), and the watcher is told
//! what changed while it was away. A [`Mirror`] is a data watch that keeps an exact
//! local copy: each NOTIFY carries the bytes a change wrote and the version it applies
//! to; a gap in the versions (or a change that came without its bytes) makes the
//! mirror register again, which brings a fresh copy.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use netswap_proto::{Delta, Event, Pointer, RecordInfo, Reply, Request, Version, WatchOptions};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::client::{Client, Shared};
use crate::conn::{Conn, lock};
use crate::error::{Error, Result};

/// A change to a watched record, pushed by the server (or, after a reconnect, found
/// by comparing the record with what was last seen).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WatchEvent {
    /// What happened.
    pub event: Event,
    /// The record.
    pub ptr: Pointer,
    /// Its version after the event (the last version when deleted).
    pub version: Version,
}

/// What happened to a [`Mirror`]'s copy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MirrorEvent {
    /// A change (or several merged) was applied: these bytes of the copy are new,
    /// and the copy may have changed size (a shrink changes no byte).
    Updated {
        /// The copy's version now.
        version: Version,
        /// The bytes that changed, by offset (shared with the message they came in).
        changed: Vec<(u64, Bytes)>,
        /// The copy's size now.
        size: u64,
    },
    /// The copy was replaced by a fresh one from the server (after a gap in the
    /// versions, a change that came without its bytes, or a reconnect during which
    /// the record changed).
    Reloaded {
        /// The copy's version now.
        version: Version,
        /// The copy's size now.
        size: u64,
    },
    /// The record changed owner (TAKEOVER, TRANSFER).
    OwnerChanged,
    /// The record's access bits changed.
    AccessChanged,
    /// The record is gone; the copy keeps its last bytes and no event follows.
    Deleted,
}

pub(crate) struct MirrorCopy {
    pub data: Vec<u8>,
    pub version: Version,
}

pub(crate) enum Sink {
    Events(mpsc::UnboundedSender<WatchEvent>),
    Mirror(Arc<Mutex<MirrorCopy>>, mpsc::UnboundedSender<MirrorEvent>),
}

/// One watch of the client: where it is registered and what it last saw.
pub(crate) struct WatchReg {
    ptr: Pointer,
    options: WatchOptions,
    /// The connection generation and XID it is registered with now.
    at: Option<(u64, u32)>,
    /// The record's state as last seen (`None` before the first registration).
    last: Option<RecordInfo>,
    sink: Sink,
    /// A mirror is being registered again to repair a gap.
    resyncing: bool,
}

impl Shared {
    fn add(&self, ptr: Pointer, options: WatchOptions, sink: Sink) -> u64 {
        let id = self.next_watch_id();
        lock(&self.watches).insert(
            id,
            WatchReg {
                ptr,
                options,
                at: None,
                last: None,
                sink,
                resyncing: false,
            },
        );
        id
    }

    pub(crate) fn add_watch(
        &self,
        ptr: Pointer,
        options: WatchOptions,
    ) -> (u64, mpsc::UnboundedReceiver<WatchEvent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (self.add(ptr, options, Sink::Events(tx)), rx)
    }

    pub(crate) fn add_mirror(
        &self,
        ptr: Pointer,
        options: WatchOptions,
    ) -> (
        u64,
        Arc<Mutex<MirrorCopy>>,
        mpsc::UnboundedReceiver<MirrorEvent>,
    ) {
        let (tx, rx) = mpsc::unbounded_channel();
        let copy = Arc::new(Mutex::new(MirrorCopy {
            data: Vec::new(),
            version: 0,
        }));
        (
            self.add(ptr, options, Sink::Mirror(copy.clone(), tx)),
            copy,
            rx,
        )
    }

    /// The WATCH that registers watch `id`.
    pub(crate) fn watch_request(&self, id: u64) -> Result<Request> {
        let w = lock(&self.watches);
        let reg = w
            .get(&id)
            .ok_or_else(|| Error::Disconnected("the watch has ended".into()))?;
        Ok(Request::Watch {
            ptr: reg.ptr,
            options: reg.options,
        })
    }

    /// Registers watch `id` on `conn` (replacing its registration with XID
    /// `replaces`, if any) and waits for the acknowledgement, which
    /// [`Shared::watch_acknowledged`] has already applied. A record that is gone, or
    /// no longer readable, ends the watch with a last event.
    pub(crate) async fn register(
        self: &Arc<Self>,
        id: u64,
        conn: &Arc<Conn>,
        replaces: Option<u32>,
        started: Instant,
        deadline: Option<Instant>,
    ) -> Result<()> {
        let request = self.watch_request(id)?;
        let (_, pending) = conn.start_watch(id, &request, replaces)?;
        match pending.wait(started, deadline).await {
            Ok(_) => Ok(()),
            Err(e @ (Error::AddressFault(_) | Error::AccessViolation(_))) => {
                let gone = matches!(e, Error::AddressFault(_));
                if let Some(reg) = lock(&self.watches).remove(&id)
                    && reg.last.is_some()
                {
                    // A watch that was running: it ends with what happened.
                    let version = reg.last.map_or(0, |l| l.version);
                    let event = if gone {
                        Event::Deleted
                    } else {
                        Event::AccessChanged
                    };
                    // The stream ends after this event.
                    reg.send(event, version);
                }
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    /// A new connection: every watch registered on an earlier one is registered
    /// again. Failures other than the connection's own end the watch (the record is
    /// gone or unreadable) or are retried at the next connection.
    pub(crate) async fn register_all_again(self: &Arc<Self>, conn: &Arc<Conn>) {
        let ids: Vec<u64> = lock(&self.watches)
            .iter()
            .filter(|(_, w)| w.at.is_some_and(|(g, _)| g < conn.generation))
            .map(|(id, _)| *id)
            .collect();
        let started = Instant::now();
        let deadline = self.options.request_timeout.map(|t| started + t);
        let all = ids.into_iter().map(|id| async move {
            let _ = self.register(id, conn, None, started, deadline).await;
        });
        futures_util::future::join_all(all).await;
    }

    /// The acknowledgement of a WATCH for watch `id` arrived (on connection
    /// `generation`, XID `xid`): from now on its NOTIFYs come with that XID. Called
    /// by the connection's reader before any NOTIFY on that XID. After a first
    /// registration this only records the state; after a later one, the watcher is
    /// told what changed meanwhile (a mirror takes the fresh copy).
    pub(crate) fn watch_acknowledged(&self, id: u64, generation: u64, xid: u32, reply: &Reply) {
        let mut watches = lock(&self.watches);
        let Some(reg) = watches.get_mut(&id) else {
            return;
        };
        reg.at = Some((generation, xid));
        let Reply::Watching(info, data) = reply else {
            return; // a v1 acknowledgement: nothing to compare
        };
        let before = reg.last.replace(*info);
        reg.resyncing = false;
        match &reg.sink {
            Sink::Events(tx) => {
                let Some(b) = before else { return };
                let send = |event| {
                    let _ = tx.send(WatchEvent {
                        event,
                        ptr: reg.ptr,
                        version: info.version,
                    });
                };
                if b.owned != info.owned {
                    send(Event::OwnerChanged);
                }
                if b.access != info.access {
                    send(Event::AccessChanged);
                }
                if b.version != info.version {
                    send(Event::Changed);
                }
            }
            Sink::Mirror(copy, tx) => {
                let mut c = lock(copy);
                let changed = before.is_none_or(|b| b.version != info.version)
                    || c.data.len() as u64 != info.size;
                c.data.clear();
                c.data.extend_from_slice(data);
                c.version = info.version;
                drop(c);
                if let Some(b) = before {
                    if b.owned != info.owned {
                        let _ = tx.send(MirrorEvent::OwnerChanged);
                    }
                    if b.access != info.access {
                        let _ = tx.send(MirrorEvent::AccessChanged);
                    }
                    if changed {
                        let _ = tx.send(MirrorEvent::Reloaded {
                            version: info.version,
                            size: info.size,
                        });
                    }
                }
            }
        }
    }

    /// A NOTIFY for watch `id` arrived on connection `generation`, XID `xid`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn notified(
        self: &Arc<Self>,
        id: u64,
        generation: u64,
        xid: u32,
        event: Event,
        ptr: Pointer,
        version: Version,
        delta: Option<Delta>,
    ) {
        let mut watches = lock(&self.watches);
        let Some(reg) = watches.get_mut(&id) else {
            return;
        };
        if reg.at != Some((generation, xid)) {
            return; // from a registration that has been replaced
        }
        if let Some(last) = &mut reg.last
            && event == Event::Changed
        {
            last.version = last.version.max(version);
        }
        let mut resync = false;
        match &reg.sink {
            Sink::Events(tx) => {
                let _ = tx.send(WatchEvent {
                    event,
                    ptr,
                    version,
                });
            }
            Sink::Mirror(copy, tx) => match event {
                Event::Changed => {
                    let mut c = lock(copy);
                    match delta {
                        Some(d) if d.base == c.version => {
                            d.apply_to(&mut c.data);
                            c.version = version;
                            let _ = tx.send(MirrorEvent::Updated {
                                version,
                                size: d.size,
                                changed: d.ranges,
                            });
                        }
                        _ if version <= c.version => {} // already in the copy
                        // A gap, or a change without its bytes: a fresh copy.
                        _ => resync = !reg.resyncing,
                    }
                }
                Event::Deleted => {
                    let _ = tx.send(MirrorEvent::Deleted);
                }
                Event::OwnerChanged => {
                    let _ = tx.send(MirrorEvent::OwnerChanged);
                }
                Event::AccessChanged => {
                    let _ = tx.send(MirrorEvent::AccessChanged);
                }
            },
        }
        if event == Event::Deleted {
            watches.remove(&id);
            return;
        }
        if resync {
            reg.resyncing = true;
            drop(watches);
            let me = self.clone();
            tokio::spawn(async move { me.resync(id, generation, xid).await });
        }
    }

    /// Registers a mirror again on its connection, which brings a fresh copy (the
    /// new registration replaces the old one).
    async fn resync(self: Arc<Self>, id: u64, generation: u64, xid: u32) {
        let Some(conn) = self.current_conn().filter(|c| c.generation == generation) else {
            return; // a new connection registers it anyway
        };
        let started = Instant::now();
        let deadline = self.options.request_timeout.map(|t| started + t);
        if self
            .register(id, &conn, Some(xid), started, deadline)
            .await
            .is_err()
            && let Some(reg) = lock(&self.watches).get_mut(&id)
        {
            reg.resyncing = false; // the next gap tries again
        }
    }

    /// A watch or mirror was dropped: forget it and unwatch.
    pub(crate) fn end_watch(&self, id: u64) {
        let Some(reg) = lock(&self.watches).remove(&id) else {
            return;
        };
        if let (Some((generation, xid)), Some(conn)) = (reg.at, self.current_conn())
            && conn.generation == generation
        {
            conn.unwatch(reg.ptr, xid);
        }
    }
}

impl WatchReg {
    /// Sends a last event (the watch is ending).
    fn send(&self, event: Event, version: Version) {
        match &self.sink {
            Sink::Events(tx) => {
                let _ = tx.send(WatchEvent {
                    event,
                    ptr: self.ptr,
                    version,
                });
            }
            Sink::Mirror(_, tx) => {
                let _ = tx.send(match event {
                    Event::Deleted => MirrorEvent::Deleted,
                    _ => MirrorEvent::AccessChanged,
                });
            }
        }
    }
}

/// A stream of [`WatchEvent`]s for one record; dropping it unwatches.
///
/// It survives reconnects: on a new connection the watch is registered again, and an
/// event tells what changed while the connection was down. It ends after
/// [`Event::Deleted`], when the record is no longer readable, or when the client is
/// closed.
pub struct Watch {
    client: Client,
    id: u64,
    ptr: Pointer,
    rx: mpsc::UnboundedReceiver<WatchEvent>,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch").field("ptr", &self.ptr).finish()
    }
}

impl Watch {
    pub(crate) fn new(
        client: Client,
        id: u64,
        ptr: Pointer,
        rx: mpsc::UnboundedReceiver<WatchEvent>,
    ) -> Watch {
        Watch {
            client,
            id,
            ptr,
            rx,
        }
    }

    /// The watched record.
    pub fn pointer(&self) -> Pointer {
        self.ptr
    }

    /// The next event; `None` once the watch has ended.
    pub async fn next(&mut self) -> Option<WatchEvent> {
        self.rx.recv().await
    }
}

impl futures_core::Stream for Watch {
    type Item = WatchEvent;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<WatchEvent>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.client.shared.end_watch(self.id);
    }
}

/// A local copy of a record that the server keeps exact (see [`Client::mirror`]).
///
/// The copy is updated in the background as deltas arrive, whether or not the events
/// are read: [`Mirror::version`] and [`Mirror::data`] are always the latest. The
/// events say what changed. Dropping the mirror unwatches.
pub struct Mirror {
    client: Client,
    id: u64,
    ptr: Pointer,
    copy: Arc<Mutex<MirrorCopy>>,
    rx: mpsc::UnboundedReceiver<MirrorEvent>,
}

impl std::fmt::Debug for Mirror {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mirror")
            .field("ptr", &self.ptr)
            .field("version", &self.version())
            .finish()
    }
}

impl Mirror {
    pub(crate) fn new(
        client: Client,
        id: u64,
        ptr: Pointer,
        copy: Arc<Mutex<MirrorCopy>>,
        rx: mpsc::UnboundedReceiver<MirrorEvent>,
    ) -> Mirror {
        Mirror {
            client,
            id,
            ptr,
            copy,
            rx,
        }
    }

    /// The mirrored record.
    pub fn pointer(&self) -> Pointer {
        self.ptr
    }

    /// The version of the copy.
    pub fn version(&self) -> Version {
        lock(&self.copy).version
    }

    /// A copy of the bytes (see [`Mirror::with_data`] to look without copying).
    pub fn data(&self) -> Bytes {
        Bytes::copy_from_slice(&lock(&self.copy).data)
    }

    /// Looks at the bytes and their version without copying them (the copy is not
    /// updated while `f` runs: keep it short).
    pub fn with_data<R>(&self, f: impl FnOnce(&[u8], Version) -> R) -> R {
        let c = lock(&self.copy);
        f(&c.data, c.version)
    }

    /// The next event; `None` once the mirror has ended (the record was deleted or
    /// became unreadable, or the client was closed).
    pub async fn next(&mut self) -> Option<MirrorEvent> {
        self.rx.recv().await
    }

    /// The next event if one is waiting, without waiting.
    pub fn try_next(&mut self) -> Option<MirrorEvent> {
        self.rx.try_recv().ok()
    }

    /// A handle on the copy alone (cheap to clone, `Send + Sync`), for threads that
    /// look at the bytes while another consumes the events.
    pub fn view(&self) -> MirrorView {
        MirrorView {
            copy: self.copy.clone(),
        }
    }
}

/// The copy of a [`Mirror`], readable from anywhere while the mirror lives (see
/// [`Mirror::view`]). After the mirror is dropped it keeps its last bytes.
#[derive(Clone)]
pub struct MirrorView {
    copy: Arc<Mutex<MirrorCopy>>,
}

impl std::fmt::Debug for MirrorView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MirrorView")
            .field("version", &self.version())
            .finish()
    }
}

impl MirrorView {
    /// The version of the copy.
    pub fn version(&self) -> Version {
        lock(&self.copy).version
    }

    /// A copy of the bytes.
    pub fn data(&self) -> Bytes {
        Bytes::copy_from_slice(&lock(&self.copy).data)
    }

    /// Looks at the bytes and their version without copying them.
    pub fn with_data<R>(&self, f: impl FnOnce(&[u8], Version) -> R) -> R {
        let c = lock(&self.copy);
        f(&c.data, c.version)
    }
}

impl futures_core::Stream for Mirror {
    type Item = MirrorEvent;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<MirrorEvent>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for Mirror {
    fn drop(&mut self) {
        self.client.shared.end_watch(self.id);
    }
}

impl Shared {
    pub(crate) fn next_watch_id(&self) -> u64 {
        self.next_watch.fetch_add(1, Ordering::Relaxed)
    }
}
