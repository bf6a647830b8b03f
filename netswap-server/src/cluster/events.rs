//! Watches across gateways. A commit publishes its event on the record's sharded
//! channel, atomically with the change (the commit script SPUBLISHes). Each gateway
//! subscribes to the channels of the records its connections watch and hands the
//! events to their mailboxes, like the embedded store's notifications.
//!
//! Nothing is missed silently: a watch registered on a record's state at revision R
//! receives every event after R (events that raced with the registration are kept
//! for a moment, [`WatchEntry::recent`]); and when a subscription was lost and
//! restored (a node failed over, a connection dropped), the gateway loads the record
//! again and tells its watchers what changed meanwhile.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use netswap_proto::{Access, ConnId, Delta, Event, Identity, Notification, Pointer, Version};
use redis::{PushInfo, PushKind, Value};
use tracing::{debug, warn};

use super::redis_io::{self, Stored};
use super::scripts;
use super::{ClusterStore, RECENT_EVENTS, fault_point, lock};

/// An event as published: kind, version, revision, owner and access bits after it;
/// on the channel with bytes, a data change also carries what it wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct EventInfo {
    pub event: Event,
    pub version: Version,
    pub rev: u64,
    pub owner: Identity,
    pub access: Access,
    /// The record's size after a data change, the offset written and the bytes.
    pub wrote: Option<(u64, u64, Bytes)>,
}

/// Bytes of an event without its data.
const EVENT_LEN: usize = 50;

/// Records the sweep unsubscribes from at once (`ClusterStore::sweep_subscriptions`).
const UNSUBSCRIBE_AT_ONCE: usize = 64;

/// What the commit script appends to an event on the channel with bytes, before the
/// bytes: the record's new size and the offset written.
pub(crate) fn delta_head(size: u64, offset: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(16);
    v.extend_from_slice(&size.to_be_bytes());
    v.extend_from_slice(&offset.to_be_bytes());
    v
}

impl EventInfo {
    pub fn new(event: Event, version: Version, rev: u64, owner: Identity, access: Access) -> Self {
        EventInfo {
            event,
            version,
            rev,
            owner,
            access,
            wrote: None,
        }
    }

    /// `kind u8, version u64, rev u64, owner [32], access u8` (the commit script adds
    /// `size u64, offset u64, bytes` on the channel with bytes).
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(EVENT_LEN);
        v.push(self.event as u8);
        v.extend_from_slice(&self.version.to_be_bytes());
        v.extend_from_slice(&self.rev.to_be_bytes());
        v.extend_from_slice(&self.owner.0);
        v.push(self.access.bits());
        v
    }

    pub fn decode(b: &Bytes) -> Option<EventInfo> {
        if b.len() != EVENT_LEN && b.len() < EVENT_LEN + 16 {
            return None;
        }
        let wrote = (b.len() > EVENT_LEN).then(|| {
            (
                u64::from_be_bytes(b[50..58].try_into().expect("8 bytes")),
                u64::from_be_bytes(b[58..66].try_into().expect("8 bytes")),
                b.slice(66..),
            )
        });
        Some(EventInfo {
            event: Event::from_u8(b[0])?,
            version: u64::from_be_bytes(b[1..9].try_into().ok()?),
            rev: u64::from_be_bytes(b[9..17].try_into().ok()?),
            owner: Identity(b[17..49].try_into().ok()?),
            access: Access::from_bits_truncate(b[49]),
            wrote,
        })
    }

    /// The notification for one watcher: data watchers get the bytes when the event
    /// carries them (else a "changed" without bytes: they read the record).
    fn note(&self, w: &Watcher, ptr: Pointer) -> Notification {
        let mut n = Notification::new(w.conn, w.xid, self.event, ptr, self.version);
        if w.data
            && self.event == Event::Changed
            && let Some((size, offset, bytes)) = &self.wrote
        {
            n.delta = Some(Delta {
                base: self.version - 1,
                size: *size,
                ranges: vec![(*offset, bytes.clone())],
            });
        }
        n
    }
}

/// One connection's watch of a record on this gateway.
#[derive(Clone, Copy, Debug)]
struct Watcher {
    conn: ConnId,
    xid: u32,
    /// The revision its WATCH was decided on: it sees the events after it.
    from: u64,
    /// A data watch.
    data: bool,
}

/// A record watched from this gateway.
#[derive(Debug)]
pub(crate) struct WatchEntry {
    watchers: Vec<Watcher>,
    /// Recent events, for watches being registered.
    recent: VecDeque<EventInfo>,
    /// The record as last known here: revision, version, owner, access.
    known: Option<(u64, Version, Identity, Access)>,
    /// The subscription to the record's channel is confirmed.
    subscribed: tokio::sync::watch::Sender<bool>,
    /// The subscription to the channel with bytes is confirmed: from then on, events
    /// are taken from that channel only (it carries every event; the plain channel
    /// is ignored, so a data watch never gets a change without its bytes).
    with_bytes: tokio::sync::watch::Sender<bool>,
    /// When the last watcher left (for unsubscribing idle channels later).
    idle_since: Option<Instant>,
    /// A resync is running; `resync_again`: one more is wanted after it (a
    /// subscription was confirmed again while it ran).
    resyncing: bool,
    resync_again: bool,
    /// The sweep is unsubscribing from its channels: forgotten once Redis confirmed
    /// that, and a watch of it waits until then (`ClusterStore::subscribe`).
    leaving: bool,
}

impl WatchEntry {
    fn new() -> WatchEntry {
        WatchEntry {
            watchers: Vec::new(),
            recent: VecDeque::new(),
            known: None,
            subscribed: tokio::sync::watch::channel(false).0,
            with_bytes: tokio::sync::watch::channel(false).0,
            idle_since: None,
            resyncing: false,
            resync_again: false,
            leaving: false,
        }
    }

    fn remove(&mut self, conn: ConnId) {
        self.watchers.retain(|w| w.conn != conn);
        if self.watchers.is_empty() {
            self.idle_since = Some(Instant::now());
        }
    }
}

impl ClusterStore {
    /// Makes sure this gateway is subscribed to `ptr`'s events (and, for a data
    /// watch, to its events with bytes), before a WATCH loads the record (so no event
    /// after the load can be missed).
    ///
    /// A record the sweep is unsubscribing from is subscribed to anew once that is
    /// done: a `SSUBSCRIBE` sent before the sweep's `SUNSUBSCRIBE` would be undone
    /// by it, and the watch would hear nothing.
    pub(super) async fn subscribe(&self, ptr: Pointer, data: bool) -> redis::RedisResult<()> {
        let (mut ready, first) = loop {
            let swept = self.swept.notified();
            tokio::pin!(swept);
            swept.as_mut().enable();
            let taken = {
                let mut l = lock(&self.local);
                match l.watched.get_mut(&ptr) {
                    Some(e) if e.leaving => None,
                    Some(e) => {
                        // Taken: the sweep leaves it alone from now on (a WATCH
                        // refused makes it idle again, `unsubscribe_if_unwatched`).
                        if e.watchers.is_empty() {
                            e.idle_since = None;
                        }
                        Some((e.subscribed.subscribe(), false))
                    }
                    None => {
                        let e = WatchEntry::new();
                        let rx = e.subscribed.subscribe();
                        l.watched.insert(ptr, e);
                        Some((rx, true))
                    }
                }
            };
            match taken {
                Some(taken) => break taken,
                None => swept.await,
            }
        };
        if first {
            let channel = self.keys.record(ptr).events();
            let r = self.subs.get().ssubscribe(&channel).await;
            let mut l = lock(&self.local);
            match r {
                Ok(()) => {
                    if let Some(e) = l.watched.get(&ptr) {
                        e.subscribed.send_replace(true);
                    }
                }
                Err(e) => {
                    l.watched.remove(&ptr);
                    return Err(e);
                }
            }
        } else {
            let _ = tokio::time::timeout(Duration::from_secs(5), ready.wait_for(|s| *s)).await;
        }
        if data {
            let with_bytes = match lock(&self.local).watched.get(&ptr) {
                Some(e) if !*e.with_bytes.borrow() => Some(e.with_bytes.subscribe()),
                _ => None,
            };
            if let Some(mut with_bytes) = with_bytes {
                self.subs
                    .get()
                    .ssubscribe(self.keys.record(ptr).data_events())
                    .await?;
                // Switched over when the confirmation is dispatched, in order with the
                // events (see `on_push`).
                let _ =
                    tokio::time::timeout(Duration::from_secs(5), with_bytes.wait_for(|s| *s)).await;
            }
        }
        self.mark_watched(ptr).await
    }

    /// Marks `ptr` watched in Redis, so that commits look for subscribers and publish
    /// (`scripts::COMMIT`). After the subscription, before the load: a commit that
    /// does not see the mark is one the load sees.
    async fn mark_watched(&self, ptr: Pointer) -> redis::RedisResult<()> {
        // `NETSWAP_FAULT_AT=watch-mark-fails`: the first mark fails (Redis failing
        // after a WATCH's subscription).
        if fault_point("watch-mark-fails") {
            return Err(redis::RedisError::from((
                redis::ErrorKind::Io,
                "NETSWAP_FAULT_AT=watch-mark-fails",
            )));
        }
        let k = self.keys.record(ptr);
        redis_io::run(&self.redis(), &scripts::WATCHED, &[k.meta.as_str()], &[]).await?;
        Ok(())
    }

    /// Registers a watch decided on `rec`, delivering the events that came since the
    /// state it was decided on.
    pub(super) fn register_watch(
        &self,
        ptr: Pointer,
        conn: ConnId,
        xid: u32,
        data: bool,
        rec: &Stored,
    ) {
        let mut out = Vec::new();
        {
            let mut l = lock(&self.local);
            let e = l.watched.entry(ptr).or_insert_with(WatchEntry::new);
            e.watchers.retain(|w| w.conn != conn);
            let w = Watcher {
                conn,
                xid,
                from: rec.rev,
                data,
            };
            e.watchers.push(w);
            e.idle_since = None;
            if e.known.is_none_or(|(r, ..)| r < rec.rev) {
                e.known = Some((rec.rev, rec.version, rec.owner, rec.access));
            }
            for ev in e.recent.iter().filter(|ev| ev.rev > rec.rev) {
                out.push(ev.note(&w, ptr));
            }
            if out.iter().any(|n| n.event == Event::Deleted) {
                e.remove(conn);
            }
        }
        if !out.is_empty() {
            let _ = self.events.send(out);
        }
    }

    pub(super) fn unregister_watch(&self, ptr: Pointer, conn: ConnId) {
        let mut l = lock(&self.local);
        if let Some(e) = l.watched.get_mut(&ptr) {
            e.remove(conn);
        }
    }

    /// Leaves a record nobody watches to the sweep (a WATCH that registered nothing).
    pub(super) async fn unsubscribe_if_unwatched(&self, ptr: Pointer) {
        let mut l = lock(&self.local);
        if let Some(e) = l.watched.get_mut(&ptr)
            && e.watchers.is_empty()
            && e.idle_since.is_none()
        {
            e.idle_since = Some(Instant::now());
        }
    }

    /// Unsubscribes from the channels of records nobody has watched for
    /// [`super::ClusterOptions::unsubscribe_after`] (every
    /// [`ClusterStore::sweep_every`], by the server: a watch that comes back soon
    /// finds its subscription still there), [`UNSUBSCRIBE_AT_ONCE`] at a time. Each
    /// record is forgotten once its `SUNSUBSCRIBE` was answered; a watch of it
    /// meanwhile waits for that (`subscribe`). Forgotten first and unsubscribed
    /// after, one at a time, a record watched again in between was subscribed to
    /// anew, unsubscribed by the sweep, and subscribed a third time when the
    /// confirmation of that `SUNSUBSCRIBE` showed it watched (`on_push`), with a
    /// resync for what its watchers missed in between (test
    /// `records_watched_again_while_the_sweep_unsubscribes_are_subscribed_once`).
    pub async fn sweep_subscriptions(&self) {
        let idle = self.opts.unsubscribe_after;
        let gone: Vec<Pointer> = {
            let mut guard = lock(&self.local);
            let l = &mut *guard;
            let mut gone: Vec<Pointer> = l
                .watched
                .iter_mut()
                .filter(|(_, e)| {
                    !e.leaving
                        && e.watchers.is_empty()
                        && e.idle_since.is_some_and(|t| t.elapsed() >= idle)
                })
                .map(|(p, e)| {
                    e.leaving = true;
                    *p
                })
                .collect();
            // Owed an `SUNSUBSCRIBE` by an earlier sweep: sent again, as leaving
            // records (a watch meanwhile waits for it), unless watched again since
            // (subscribed anew after the one that failed: the subscription is the
            // watch's now).
            let owed: Vec<Pointer> = l
                .unsubscribe_owed
                .drain()
                .filter(|p| !l.watched.contains_key(p))
                .collect();
            for p in owed {
                let mut e = WatchEntry::new();
                e.leaving = true;
                l.watched.insert(p, e);
                gone.push(p);
            }
            gone
        };
        // `NETSWAP_FAULT_AT=unsubscribes-fail`: every `SUNSUBSCRIBE` of the first
        // sweep that sends any fails unsent (a test of the sweeps after).
        let failing = !gone.is_empty() && fault_point("unsubscribes-fail");
        let failed = AtomicU64::new(0);
        futures_util::stream::iter(gone)
            .for_each_concurrent(UNSUBSCRIBE_AT_ONCE, |p| {
                let failed = &failed;
                async move {
                    let k = self.keys.record(p);
                    let mut subs = self.subs.get();
                    let channels = [k.events(), k.data_events()];
                    let unsubscribe = async {
                        if failing {
                            return Err(redis::RedisError::from((
                                redis::ErrorKind::Io,
                                "NETSWAP_FAULT_AT=unsubscribes-fail",
                            )));
                        }
                        subs.sunsubscribe(&channels[..]).await
                    };
                    // Bounded, as a WATCH of the record waits for it (a confirmation
                    // that comes later finds the record forgotten, or watched again
                    // and subscribed again: `on_push`).
                    let done =
                        match tokio::time::timeout(self.opts.response_timeout, unsubscribe).await {
                            Ok(Ok(())) => true,
                            Ok(Err(e)) => {
                                debug!(ptr = %p, error = %e, "SUNSUBSCRIBE failed");
                                false
                            }
                            Err(_) => {
                                debug!(ptr = %p, "SUNSUBSCRIBE not answered in time");
                                false
                            }
                        };
                    let mut l = lock(&self.local);
                    if l.watched.get(&p).is_some_and(|e| e.leaving) {
                        l.watched.remove(&p);
                        if !done {
                            // Redis may still hold the subscription: sent again at
                            // the next sweep.
                            l.unsubscribe_owed.insert(p);
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    drop(l);
                    self.swept.notify_waiters();
                }
            })
            .await;
        let failed = failed.into_inner();
        if failed > 0 {
            warn!(
                records = failed,
                "SUNSUBSCRIBEs of unused subscriptions failed or were not answered; sending them again at the next sweep"
            );
        }
    }

    /// Records this gateway holds subscriptions for: watched here now, or in the
    /// last [`super::ClusterOptions::unsubscribe_after`].
    pub fn subscribed_records(&self) -> u64 {
        lock(&self.local).watched.len() as u64
    }

    /// Watches registered from this gateway.
    pub fn watch_count(&self) -> u64 {
        lock(&self.local)
            .watched
            .values()
            .map(|e| e.watchers.len() as u64)
            .sum()
    }

    /// Channels of watched records whose subscription Redis confirmed: what the
    /// connection for subscriptions should hold on the primaries.
    fn channels_confirmed(&self) -> u64 {
        lock(&self.local)
            .watched
            .values()
            .filter(|e| !e.leaving)
            .map(|e| u64::from(*e.subscribed.borrow()) + u64::from(*e.with_bytes.borrow()))
            .sum()
    }

    /// Whether the connection for subscriptions holds fewer shard channels on the
    /// primaries than this gateway's watches need, as counted by the primaries
    /// themselves (`CLIENT INFO` on that connection to each primary: its `ssub`).
    /// `None`: not known now (nothing watched, a subscription being made again, a
    /// primary failing or not answering on that connection).
    ///
    /// Two ways to lose a subscription that nothing reports: the `redis` crate
    /// subscribes again after its connection to a node came back with one
    /// `SSUBSCRIBE` naming every channel of that node, which Redis refuses
    /// (`CROSSSLOT`) as soon as the channels are of more than one slot, and the
    /// crate drops that error; and a subscription made while the primary's
    /// connection was down goes to its replica, where a commit does not count it
    /// (`scripts::COMMIT` asks the primary: `PUBSUB SHARDNUMSUB`).
    pub(super) async fn subscriptions_short(&self) -> Option<bool> {
        if lock(&self.local).watched.is_empty() || self.resubscribing.load(Ordering::Relaxed) > 0 {
            return None;
        }
        let primaries: Vec<(String, u16)> = {
            let layout = lock(&self.replicas);
            let mut at = Vec::with_capacity(layout.serving.len());
            for id in &layout.serving {
                if !layout.primaries.contains(id) {
                    return None;
                }
                at.push(layout.nodes.get(id)?.clone());
            }
            at
        };
        let before = self.channels_confirmed();
        let mut held = 0;
        for (host, port) in primaries {
            held += self.shard_channels_on(host, port).await?;
        }
        // A record forgotten meanwhile was unsubscribed too; one subscribed since
        // was subscribed before it counted.
        let expected = before.min(self.channels_confirmed());
        Some(held < expected)
    }

    /// The shard channels the connection for subscriptions holds on the node at
    /// `host:port` (`None`: no answer within [`super::PING_WAIT`]).
    async fn shard_channels_on(&self, host: String, port: u16) -> Option<u64> {
        use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
        let to = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host, port });
        let mut conn = self.subs.get();
        let info = conn.route_command(redis::cmd("CLIENT").arg("INFO").clone(), to);
        let text = redis_io::into_text(
            tokio::time::timeout(super::PING_WAIT, info)
                .await
                .ok()?
                .ok()?,
        )?;
        text.split_whitespace()
            .find_map(|f| f.strip_prefix("ssub="))
            .and_then(|n| n.parse().ok())
    }

    /// Dispatches pushes from Redis until the connection ends (the server's task).
    pub async fn dispatch_events(self: Arc<Self>) {
        let Some(mut rx) = lock(&self.push_rx).take() else {
            return;
        };
        while let Some(push) = rx.recv().await {
            self.on_push(push).await;
        }
    }

    async fn on_push(self: &Arc<Self>, push: PushInfo) {
        match push.kind {
            PushKind::SMessage => {
                let (Some(Value::BulkString(channel)), Some(Value::BulkString(msg))) =
                    (push.data.first(), push.data.get(1))
                else {
                    return;
                };
                let (Some((ptr, with_bytes)), Some(ev)) = (
                    self.keys.channel(channel),
                    EventInfo::decode(&Bytes::copy_from_slice(msg)),
                ) else {
                    warn!("an event that is not netswap's on a netswap channel");
                    return;
                };
                let out = self.on_event(ptr, ev, with_bytes);
                if !out.is_empty() {
                    let _ = self.events.send(out);
                }
            }
            PushKind::SSubscribe => {
                let Some((ptr, with_bytes)) = self.channel_of(&push) else {
                    return;
                };
                let resync = {
                    let l = lock(&self.local);
                    let Some(e) = l.watched.get(&ptr) else { return };
                    let switched = *e.with_bytes.borrow();
                    if with_bytes && !switched {
                        // From now on the events come from the channel with bytes:
                        // this confirmation is in order with the events, so none is
                        // taken twice or missed.
                        e.with_bytes.send_replace(true);
                        false
                    } else {
                        // A (re)subscription of the channel in use: after a lost
                        // connection, events may have been missed.
                        with_bytes == switched && e.known.is_some()
                    }
                };
                if resync {
                    self.resync_soon(ptr);
                }
            }
            PushKind::SUnsubscribe => {
                let Some((ptr, with_bytes)) = self.channel_of(&push) else {
                    return;
                };
                // Unless the sweep is unsubscribing from it, a record still here lost
                // a subscription it needs: Redis drops the subscriptions of a slot it
                // gives to another primary.
                let needed = lock(&self.local)
                    .watched
                    .get(&ptr)
                    .is_some_and(|e| !e.leaving && (!with_bytes || *e.with_bytes.borrow()));
                if needed {
                    self.resubscribe_soon(ptr, &[with_bytes]);
                }
            }
            _ => {}
        }
    }

    /// The record and kind (with bytes or not) of the channel a (un)subscription
    /// confirmation names.
    fn channel_of(&self, push: &PushInfo) -> Option<(Pointer, bool)> {
        match push.data.first()? {
            Value::BulkString(c) => self.keys.channel(c),
            _ => None,
        }
    }

    /// Subscribes again to the channels of every watched record (on a new connection
    /// for the subscriptions, `ClusterStore::check_connection`), each in a task of
    /// its own, and tells their watchers what changed meanwhile.
    pub(super) fn resubscribe_all(self: &Arc<Self>) {
        let watched: Vec<(Pointer, bool)> = lock(&self.local)
            .watched
            .iter()
            .filter(|(_, e)| !e.leaving)
            .map(|(p, e)| (*p, *e.with_bytes.borrow()))
            .collect();
        for (ptr, with_bytes) in watched {
            let channels: &[bool] = if with_bytes { &[false, true] } else { &[false] };
            self.resubscribe_soon(ptr, channels);
        }
    }

    /// Subscribes again to channels of `ptr` (`false`: the plain one, `true`: the
    /// one with bytes, in that order) in a task of its own, counted in
    /// `resubscribing` from now until it is done.
    fn resubscribe_soon(self: &Arc<Self>, ptr: Pointer, channels: &[bool]) {
        let counted = Resubscribing::new(self.clone());
        let channels = channels.to_vec();
        tokio::spawn(async move {
            for with_bytes in channels {
                counted.0.resubscribe(ptr, with_bytes).await;
            }
        });
    }

    /// Subscribes again to a channel of `ptr` that Redis dropped (its slot moved),
    /// trying until it works or nobody here watches the record any more; then, if
    /// it is the channel in use, reports what the watchers missed (`resync`).
    async fn resubscribe(self: &Arc<Self>, ptr: Pointer, with_bytes: bool) {
        let k = self.keys.record(ptr);
        let channel = if with_bytes {
            k.data_events()
        } else {
            k.events()
        };
        let mut pause = Duration::from_millis(50);
        loop {
            match self.subs.get().ssubscribe(&channel).await {
                Ok(()) => {
                    debug!(%ptr, with_bytes, "subscribed again to a watched record's channel");
                    // Confirmed: what changed meanwhile is reported now (the client
                    // library does not always pass the confirmation on as a push).
                    let in_use = lock(&self.local)
                        .watched
                        .get(&ptr)
                        .is_some_and(|e| *e.with_bytes.borrow() == with_bytes);
                    if in_use {
                        self.resync_soon(ptr);
                    }
                    return;
                }
                Err(e) => warn!(%ptr, error = %e, "could not subscribe again to a watched record"),
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(2));
            if lock(&self.local)
                .watched
                .get(&ptr)
                .is_none_or(|e| e.leaving)
            {
                return;
            }
        }
    }

    fn on_event(&self, ptr: Pointer, ev: EventInfo, with_bytes: bool) -> Vec<Notification> {
        let mut l = lock(&self.local);
        let Some(e) = l.watched.get_mut(&ptr) else {
            return Vec::new();
        };
        if with_bytes != *e.with_bytes.borrow() {
            return Vec::new(); // the other channel carries the same event
        }
        if e.known.is_none_or(|(r, ..)| r < ev.rev) {
            e.known = Some((ev.rev, ev.version, ev.owner, ev.access));
        }
        let out: Vec<Notification> = e
            .watchers
            .iter()
            .filter(|w| ev.rev > w.from)
            .map(|w| ev.note(w, ptr))
            .collect();
        if ev.event == Event::Deleted {
            // Every watch of a deleted record ends.
            e.watchers.clear();
            e.idle_since = Some(Instant::now());
        } else {
            for w in e.watchers.iter_mut() {
                w.from = w.from.max(ev.rev);
            }
        }
        e.recent.push_back(ev);
        if e.recent.len() > RECENT_EVENTS {
            e.recent.pop_front();
        }
        out
    }

    /// Resyncs `ptr` (see `resync`) in a task of its own; when one is running, once
    /// more after it (the client library may confirm a subscription many times in a
    /// row while the cluster's layout changes).
    fn resync_soon(self: &Arc<Self>, ptr: Pointer) {
        {
            let mut l = lock(&self.local);
            let Some(e) = l.watched.get_mut(&ptr) else {
                return;
            };
            if e.resyncing {
                e.resync_again = true;
                return;
            }
            e.resyncing = true;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let mut pause = Duration::from_millis(100);
            loop {
                // Until it gets through: a record whose check failed may have lost its
                // watched mark, and then no commit publishes its events any more.
                let done = me.resync(ptr).await;
                {
                    let mut l = lock(&me.local);
                    let Some(e) = l.watched.get_mut(&ptr) else {
                        return;
                    };
                    if done && !std::mem::take(&mut e.resync_again) {
                        e.resyncing = false;
                        return;
                    }
                }
                if done {
                    pause = Duration::from_millis(100);
                } else {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
            }
        });
    }

    /// Compares a watched record with what was last known and tells the watchers what
    /// changed while events could not arrive. Returns whether it got through (marked
    /// and loaded the record); one that did not is tried again (`resync_soon`).
    async fn resync(&self, ptr: Pointer) -> bool {
        // Marked again first: while the subscription was gone, a commit that found
        // nobody subscribed cleared the mark.
        let loaded = if fault_point("resync-fails") {
            Err(redis::RedisError::from((
                redis::ErrorKind::Io,
                "NETSWAP_FAULT_AT=resync-fails",
            )))
        } else {
            match self.mark_watched(ptr).await {
                Ok(()) => self.load(ptr, None, 0, false).await,
                Err(e) => Err(e),
            }
        };
        let now = match loaded {
            Ok(r) => r,
            Err(e) => {
                warn!(%ptr, error = %e, "could not check a watched record after a reconnect; trying again");
                return false;
            }
        };
        let out = {
            let mut l = lock(&self.local);
            let Some(e) = l.watched.get_mut(&ptr) else {
                return true;
            };
            let Some((rev, version, owner, access)) = e.known else {
                return true;
            };
            let mut events = Vec::new();
            match &now {
                None => events.push((Event::Deleted, version)),
                Some(r) if r.rev > rev => {
                    if r.owner != owner {
                        events.push((Event::OwnerChanged, r.version));
                    }
                    if r.access != access {
                        events.push((Event::AccessChanged, r.version));
                    }
                    if r.version != version {
                        events.push((Event::Changed, r.version));
                    }
                    e.known = Some((r.rev, r.version, r.owner, r.access));
                }
                Some(_) => {}
            }
            let mut out = Vec::new();
            for w in e.watchers.iter_mut() {
                if now.as_ref().is_none_or(|r| r.rev > w.from) {
                    // Without the bytes: a data watch reads the record again.
                    for (ev, v) in &events {
                        out.push(Notification::new(w.conn, w.xid, *ev, ptr, *v));
                    }
                    if let Some(r) = &now {
                        w.from = r.rev;
                    }
                }
            }
            if now.is_none() {
                e.watchers.clear();
            }
            out
        };
        if !out.is_empty() {
            debug!(%ptr, events = out.len(), "events recovered after a lost subscription");
            let _ = self.events.send(out);
        }
        true
    }
}

/// Counts subscriptions being made again while it lives (see
/// `ClusterStore::subscriptions_short`, which does not count meanwhile).
struct Resubscribing(Arc<ClusterStore>);

impl Resubscribing {
    fn new(store: Arc<ClusterStore>) -> Self {
        store.resubscribing.fetch_add(1, Ordering::Relaxed);
        Resubscribing(store)
    }
}

impl Drop for Resubscribing {
    fn drop(&mut self) {
        self.0.resubscribing.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip() {
        let e = EventInfo::new(Event::OwnerChanged, 7, 9, Identity([3; 32]), Access::READ);
        assert_eq!(EventInfo::decode(&Bytes::from(e.encode())), Some(e.clone()));
        assert_eq!(EventInfo::decode(&Bytes::from_static(b"short")), None);
        // As the commit script sends it on the channel with bytes.
        let mut with = e.encode();
        with.extend_from_slice(&delta_head(12, 4));
        with.extend_from_slice(b"abc");
        let got = EventInfo::decode(&Bytes::from(with)).unwrap();
        assert_eq!(got.wrote, Some((12, 4, Bytes::from_static(b"abc"))));
    }
}
