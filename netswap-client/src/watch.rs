//! Watches and mirrors, and the table that keeps them across connections.
//!
//! The server keeps one watch per connection and record (a second WATCH moves it), so
//! all the watches and mirrors one client has of a record share one registration: a
//! *group*. It asks for the most any member needs (the bytes when one is a mirror, the
//! shortest interval), and its events go to every member. A group lives in the client,
//! not in a connection: when the connection is replaced it is registered again (asking
//! for the record's state), and its members are told what changed while it was away.
//! A mirror keeps an exact copy: each NOTIFY carries the bytes a change wrote and the
//! version it applies to; a gap in the versions (or a change that came without its
//! bytes) registers the group again, which brings a fresh copy.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use netswap_proto::{Delta, Event, Pointer, RecordInfo, Reply, Request, Version, WatchOptions};
use rand::Rng;
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
    Mirror(mpsc::UnboundedSender<MirrorEvent>),
}

struct Member {
    sink: Sink,
    options: WatchOptions,
    /// Joined since the last acknowledgement: nothing to compare yet.
    fresh: bool,
}

/// All of a client's watches and mirrors of one record: one registration.
pub(crate) struct Group {
    ptr: Pointer,
    members: HashMap<u64, Member>,
    /// What the registration asked for, and where it is (connection generation, XID).
    registered: Option<(WatchOptions, u64, u32)>,
    /// The record's state as last seen.
    last: Option<RecordInfo>,
    /// The copy the group's mirrors share (once one joined).
    copy: Option<Arc<Mutex<MirrorCopy>>>,
    /// A gap is being repaired by registering again.
    resyncing: bool,
    /// One registration at a time.
    registering: Arc<tokio::sync::Mutex<()>>,
}

impl Group {
    /// What the members need together: the bytes when one is a mirror; the shortest
    /// interval.
    fn wanted(&self) -> WatchOptions {
        let data = self.members.values().any(|m| m.options.data);
        let min_interval_ms = self
            .members
            .values()
            .map(|m| m.options.min_interval_ms)
            .min()
            .unwrap_or(0);
        WatchOptions {
            data,
            state: true,
            min_interval_ms,
        }
    }

    fn send_all(&self, event: Event, version: Version) {
        for m in self.members.values() {
            match &m.sink {
                Sink::Events(tx) => {
                    let _ = tx.send(WatchEvent {
                        event,
                        ptr: self.ptr,
                        version,
                    });
                }
                Sink::Mirror(tx) => {
                    let _ = tx.send(match event {
                        Event::Deleted => MirrorEvent::Deleted,
                        Event::OwnerChanged => MirrorEvent::OwnerChanged,
                        Event::AccessChanged => MirrorEvent::AccessChanged,
                        // A mirror learns data changes from the copy, not from here.
                        Event::Changed => continue,
                    });
                }
            }
        }
    }
}

/// The table of groups.
#[derive(Default)]
pub(crate) struct Watches {
    groups: HashMap<u64, Group>,
    by_ptr: HashMap<Pointer, u64>,
    /// Member id -> group id.
    member_of: HashMap<u64, u64>,
}

impl Shared {
    /// Adds a member to the group of `ptr` (made if needed). Returns the member id and
    /// the group id, and for a mirror the copy it shares.
    fn join(
        &self,
        ptr: Pointer,
        options: WatchOptions,
        sink: Sink,
    ) -> (u64, u64, Option<Arc<Mutex<MirrorCopy>>>) {
        let mut w = lock(&self.watches);
        let member = self.next_watch_id();
        let group_id = match w.by_ptr.get(&ptr) {
            Some(g) => *g,
            None => {
                let g = self.next_watch_id();
                w.groups.insert(
                    g,
                    Group {
                        ptr,
                        members: HashMap::new(),
                        registered: None,
                        last: None,
                        copy: None,
                        resyncing: false,
                        registering: Arc::new(tokio::sync::Mutex::new(())),
                    },
                );
                w.by_ptr.insert(ptr, g);
                g
            }
        };
        w.member_of.insert(member, group_id);
        let group = w.groups.get_mut(&group_id).expect("made above");
        let copy = if options.data {
            Some(
                group
                    .copy
                    .get_or_insert_with(|| {
                        Arc::new(Mutex::new(MirrorCopy {
                            data: Vec::new(),
                            version: 0,
                        }))
                    })
                    .clone(),
            )
        } else {
            None
        };
        group.members.insert(
            member,
            Member {
                sink,
                options,
                fresh: true,
            },
        );
        (member, group_id, copy)
    }

    pub(crate) fn add_watch(
        &self,
        ptr: Pointer,
        options: WatchOptions,
    ) -> (u64, u64, mpsc::UnboundedReceiver<WatchEvent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let (member, group, _) = self.join(ptr, options, Sink::Events(tx));
        (member, group, rx)
    }

    pub(crate) fn add_mirror(
        &self,
        ptr: Pointer,
        options: WatchOptions,
    ) -> (
        u64,
        u64,
        Arc<Mutex<MirrorCopy>>,
        mpsc::UnboundedReceiver<MirrorEvent>,
    ) {
        let (tx, rx) = mpsc::unbounded_channel();
        let (member, group, copy) = self.join(ptr, options, Sink::Mirror(tx));
        (member, group, copy.expect("a mirror has a copy"), rx)
    }

    /// Makes sure group `id` is registered on `conn` with what its members need
    /// (`force`: register again even so, to repair a mirror). Waits for the
    /// acknowledgement, which [`Shared::watch_acknowledged`] has already applied. A
    /// record that is gone, or no longer readable, ends the group with a last event.
    pub(crate) async fn register(
        self: &Arc<Self>,
        id: u64,
        conn: &Arc<Conn>,
        force: bool,
        started: Instant,
        deadline: Option<Instant>,
    ) -> Result<()> {
        let registering = match lock(&self.watches).groups.get(&id) {
            Some(g) => g.registering.clone(),
            None => return Err(Error::Disconnected("the watch has ended".into())),
        };
        let _one_at_a_time = registering.lock().await;
        let (request, replaces) = {
            let w = lock(&self.watches);
            let Some(g) = w.groups.get(&id) else {
                return Err(Error::Disconnected("the watch has ended".into()));
            };
            let wanted = g.wanted();
            let replaces = match g.registered {
                Some((have, generation, xid)) if generation == conn.generation => {
                    let covers = (have.data || !wanted.data)
                        && have.min_interval_ms <= wanted.min_interval_ms;
                    if covers && !force {
                        return Ok(());
                    }
                    Some(xid)
                }
                _ => None,
            };
            (
                Request::Watch {
                    ptr: g.ptr,
                    options: wanted,
                },
                replaces,
            )
        };
        let (_, pending) = conn.start_watch(id, &request, replaces)?;
        match pending.wait(started, deadline).await {
            Ok(_) => Ok(()),
            Err(e @ (Error::AddressFault(_) | Error::AccessViolation(_))) => {
                let mut w = lock(&self.watches);
                if let Some(g) = w.groups.remove(&id) {
                    w.by_ptr.remove(&g.ptr);
                    for m in g.members.keys() {
                        w.member_of.remove(m);
                    }
                    // Members that were running end with what happened; the streams end.
                    if let Some(last) = g.last {
                        let event = if matches!(e, Error::AddressFault(_)) {
                            Event::Deleted
                        } else {
                            Event::AccessChanged
                        };
                        g.send_all(event, last.version);
                    }
                }
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    /// A new connection: every group registered on an earlier one is registered again.
    /// A record that is gone or unreadable ends its group; a server that is busy
    /// (BUSY: a gateway whose Redis Cluster is failing over, or whose reply budget
    /// is taken) or slow (the request's deadline) is asked again on this connection,
    /// after a pause drawn like the reconnection's backoff, until the watch is back or
    /// the connection ends (the next one registers it again). Before, such a watch
    /// stayed registered on the dead connection only, and heard nothing until the
    /// next reconnection, which a healthy connection never brings.
    pub(crate) async fn register_all_again(self: &Arc<Self>, conn: &Arc<Conn>) {
        let ids: Vec<u64> = lock(&self.watches)
            .groups
            .iter()
            .filter(|(_, g)| {
                g.registered
                    .is_some_and(|(_, generation, _)| generation < conn.generation)
            })
            .map(|(id, _)| *id)
            .collect();
        let all = ids.into_iter().map(|id| async move {
            let mut attempt = 0;
            loop {
                let started = Instant::now();
                let deadline = self.options.request_timeout.map(|t| started + t);
                match self.register(id, conn, false, started, deadline).await {
                    Err(Error::Busy(_) | Error::Timeout { .. }) if !conn.is_closed() => {}
                    _ => return,
                }
                attempt += 1;
                let window = self.options.reconnect.window(attempt);
                let pause = rand::rng().random_range(std::time::Duration::ZERO..=window);
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = conn.ended() => return,
                }
            }
        });
        futures_util::future::join_all(all).await;
    }

    /// The acknowledgement of a WATCH for group `id` on `ptr` arrived (on connection
    /// `generation`, XID `xid`, asking for `options`): from now on its NOTIFYs come
    /// with that XID. Called by the connection's reader before any NOTIFY on that XID,
    /// also when the WATCH's caller gave up waiting (the server has the watch all the
    /// same). Members that were already running are told what changed since they last
    /// saw the record; mirrors take the fresh copy.
    ///
    /// When nothing on this client watches `ptr` any more, the watch is ended on the
    /// server. (A group of `ptr` other than `id` sends, or has sent, a WATCH of its
    /// own after this one, which takes the server's watch over; ending it here would
    /// end that one. The UNWATCH is queued under the watch table's lock, so a group
    /// made after this look sends its WATCH after the UNWATCH.)
    pub(crate) fn watch_acknowledged(
        &self,
        conn: &Conn,
        id: u64,
        ptr: Pointer,
        xid: u32,
        options: WatchOptions,
        reply: &Reply,
    ) {
        let generation = conn.generation;
        let mut w = lock(&self.watches);
        let Some(g) = w.groups.get_mut(&id) else {
            if !w.by_ptr.contains_key(&ptr) {
                conn.unwatch(ptr, xid);
            }
            return;
        };
        let Reply::Watching(info, data) = reply else {
            return; // a v1 acknowledgement: nothing to compare
        };
        // What the server was asked for, not what the members want now: a member that
        // joined since (a mirror, wanting bytes) must still be registered.
        g.registered = Some((options, generation, xid));
        let before = g.last.replace(*info);
        g.resyncing = false;
        let reloaded = match &g.copy {
            Some(copy) if g.registered.is_some_and(|(o, ..)| o.data) => {
                let mut c = lock(copy);
                let changed = c.version != info.version || c.data[..] != data[..];
                c.data.clear();
                c.data.extend_from_slice(data);
                c.version = info.version;
                changed
            }
            _ => false,
        };
        for m in g.members.values_mut() {
            if std::mem::replace(&mut m.fresh, false) {
                continue;
            }
            let Some(b) = before else { continue };
            let mut events = Vec::new();
            if b.owned != info.owned {
                events.push(Event::OwnerChanged);
            }
            if b.access != info.access {
                events.push(Event::AccessChanged);
            }
            match &m.sink {
                Sink::Events(tx) => {
                    if b.version != info.version {
                        events.push(Event::Changed);
                    }
                    for event in events {
                        let _ = tx.send(WatchEvent {
                            event,
                            ptr: g.ptr,
                            version: info.version,
                        });
                    }
                }
                Sink::Mirror(tx) => {
                    for event in events {
                        let _ = tx.send(match event {
                            Event::OwnerChanged => MirrorEvent::OwnerChanged,
                            _ => MirrorEvent::AccessChanged,
                        });
                    }
                    if reloaded {
                        let _ = tx.send(MirrorEvent::Reloaded {
                            version: info.version,
                            size: info.size,
                        });
                    }
                }
            }
        }
    }

    /// A NOTIFY for group `id` arrived on connection `generation`, XID `xid`.
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
        let mut w = lock(&self.watches);
        let Some(g) = w.groups.get_mut(&id) else {
            return;
        };
        if g.registered
            .is_none_or(|(_, gen_, x)| (gen_, x) != (generation, xid))
        {
            return; // from a registration that has been replaced
        }
        if let Some(last) = &mut g.last
            && event == Event::Changed
        {
            last.version = last.version.max(version);
        }
        let mut resync = false;
        if event == Event::Changed
            && let Some(copy) = &g.copy
        {
            let mut c = lock(copy);
            match &delta {
                Some(d) if d.base == c.version => {
                    d.apply_to(&mut c.data);
                    c.version = version;
                    drop(c);
                    for m in g.members.values() {
                        if let Sink::Mirror(tx) = &m.sink {
                            let _ = tx.send(MirrorEvent::Updated {
                                version,
                                size: d.size,
                                changed: d.ranges.clone(),
                            });
                        }
                    }
                }
                _ if version <= c.version => {} // already in the copy
                // A gap, or a change without its bytes: a fresh copy.
                _ => resync = !g.resyncing,
            }
        }
        g.send_all(event, version);
        if event == Event::Deleted {
            // The watch has ended for every member; the streams end.
            let g = w.groups.remove(&id).expect("found above");
            w.by_ptr.remove(&g.ptr);
            for m in g.members.keys() {
                w.member_of.remove(m);
            }
            return;
        }
        let _ = ptr;
        if resync {
            g.resyncing = true;
            drop(w);
            let me = self.clone();
            tokio::spawn(async move { me.resync(id, generation).await });
        }
    }

    /// Registers a group again on its connection, which brings a fresh copy.
    async fn resync(self: Arc<Self>, id: u64, generation: u64) {
        let Some(conn) = self.current_conn().filter(|c| c.generation == generation) else {
            return; // a new connection registers it anyway
        };
        let started = Instant::now();
        let deadline = self.options.request_timeout.map(|t| started + t);
        if self
            .register(id, &conn, true, started, deadline)
            .await
            .is_err()
            && let Some(g) = lock(&self.watches).groups.get_mut(&id)
        {
            g.resyncing = false; // the next gap tries again
        }
    }

    /// A watch or mirror was dropped: it leaves its group; the last one out unwatches.
    pub(crate) fn end_watch(&self, member: u64) {
        let mut w = lock(&self.watches);
        let Some(id) = w.member_of.remove(&member) else {
            return;
        };
        let Some(g) = w.groups.get_mut(&id) else {
            return;
        };
        g.members.remove(&member);
        if !g.members.is_empty() {
            return; // the registration stays as it is for the others
        }
        let g = w.groups.remove(&id).expect("found above");
        w.by_ptr.remove(&g.ptr);
        // Queued before the lock is let go: a new watch of the record (a new group)
        // sends its WATCH after this UNWATCH, not before it (which would end it).
        if let (Some((_, generation, xid)), Some(conn)) = (g.registered, self.current_conn())
            && conn.generation == generation
        {
            conn.unwatch(g.ptr, xid);
        }
        drop(w);
    }

    pub(crate) fn next_watch_id(&self) -> u64 {
        self.next_watch.fetch_add(1, Ordering::Relaxed)
    }
}

/// A stream of [`WatchEvent`]s for one record; dropping it unwatches.
///
/// It survives reconnects: on a new connection the watch is registered again, and an
/// event tells what changed while the connection was down. It ends after
/// [`Event::Deleted`], when the record is no longer readable, or when the client is
/// closed. Watches and mirrors of one record on one client share one registration
/// with the server: the shortest interval among them applies to all.
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
