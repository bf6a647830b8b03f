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
use std::time::{Duration, Instant};

use netswap_proto::{Access, ConnId, Event, Identity, Notification, Pointer, Version};
use redis::{PushInfo, PushKind, Value};
use tracing::{debug, warn};

use super::redis_io::{self, Stored};
use super::{ClusterStore, RECENT_EVENTS, lock};

/// An event as published: kind, version, revision, owner and access bits after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct EventInfo {
    pub event: Event,
    pub version: Version,
    pub rev: u64,
    pub owner: Identity,
    pub access: Access,
}

impl EventInfo {
    pub fn new(event: Event, version: Version, rev: u64, owner: Identity, access: Access) -> Self {
        EventInfo {
            event,
            version,
            rev,
            owner,
            access,
        }
    }

    /// `kind u8, version u64, rev u64, owner [32], access u8`.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(50);
        v.push(self.event as u8);
        v.extend_from_slice(&self.version.to_be_bytes());
        v.extend_from_slice(&self.rev.to_be_bytes());
        v.extend_from_slice(&self.owner.0);
        v.push(self.access.bits());
        v
    }

    pub fn decode(b: &[u8]) -> Option<EventInfo> {
        if b.len() != 50 {
            return None;
        }
        Some(EventInfo {
            event: Event::from_u8(b[0])?,
            version: u64::from_be_bytes(b[1..9].try_into().ok()?),
            rev: u64::from_be_bytes(b[9..17].try_into().ok()?),
            owner: Identity(b[17..49].try_into().ok()?),
            access: Access::from_bits_truncate(b[49]),
        })
    }
}

/// A record watched from this gateway.
#[derive(Debug)]
pub(crate) struct WatchEntry {
    /// Connections watching, with their XID and the revision their WATCH was decided
    /// on (they see the events after it).
    watchers: Vec<(ConnId, u32, u64)>,
    /// Recent events, for watches being registered.
    recent: VecDeque<EventInfo>,
    /// The record as last known here: revision, version, owner, access.
    known: Option<(u64, Version, Identity, Access)>,
    /// The subscription is confirmed.
    subscribed: tokio::sync::watch::Sender<bool>,
    /// When the last watcher left (for unsubscribing idle channels later).
    idle_since: Option<Instant>,
}

impl WatchEntry {
    fn new() -> WatchEntry {
        WatchEntry {
            watchers: Vec::new(),
            recent: VecDeque::new(),
            known: None,
            subscribed: tokio::sync::watch::channel(false).0,
            idle_since: None,
        }
    }

    fn remove(&mut self, conn: ConnId) {
        self.watchers.retain(|(c, _, _)| *c != conn);
        if self.watchers.is_empty() {
            self.idle_since = Some(Instant::now());
        }
    }
}

fn note(conn: ConnId, xid: u32, ptr: Pointer, event: Event, version: Version) -> Notification {
    Notification {
        conn,
        xid,
        event,
        ptr,
        version,
    }
}

impl ClusterStore {
    /// Makes sure this gateway is subscribed to `ptr`'s events, before a WATCH loads
    /// the record (so no event after the load can be missed).
    pub(super) async fn subscribe(&self, ptr: Pointer) -> redis::RedisResult<()> {
        let (mut ready, first) = {
            let mut l = lock(&self.local);
            match l.watched.get(&ptr) {
                Some(e) => (e.subscribed.subscribe(), false),
                None => {
                    let e = WatchEntry::new();
                    let rx = e.subscribed.subscribe();
                    l.watched.insert(ptr, e);
                    (rx, true)
                }
            }
        };
        if first {
            let channel = self.keys.record(ptr).events;
            let r = self.redis.clone().ssubscribe(&channel).await;
            let mut l = lock(&self.local);
            match r {
                Ok(()) => {
                    if let Some(e) = l.watched.get(&ptr) {
                        e.subscribed.send_replace(true);
                    }
                    return Ok(());
                }
                Err(e) => {
                    l.watched.remove(&ptr);
                    return Err(e);
                }
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), ready.wait_for(|s| *s)).await;
        Ok(())
    }

    /// Registers a watch decided on `rec`, delivering the events that came since the
    /// state it was decided on.
    pub(super) fn register_watch(&self, ptr: Pointer, conn: ConnId, xid: u32, rec: &Stored) {
        let mut out = Vec::new();
        {
            let mut l = lock(&self.local);
            let e = l.watched.entry(ptr).or_insert_with(WatchEntry::new);
            e.watchers.retain(|(c, _, _)| *c != conn);
            e.watchers.push((conn, xid, rec.rev));
            e.idle_since = None;
            if e.known.is_none_or(|(r, ..)| r < rec.rev) {
                e.known = Some((rec.rev, rec.version, rec.owner, rec.access));
            }
            for ev in e.recent.iter().filter(|ev| ev.rev > rec.rev) {
                out.push(note(conn, xid, ptr, ev.event, ev.version));
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

    /// Forgets a record nobody watches (a WATCH that was refused).
    pub(super) async fn unsubscribe_if_unwatched(&self, ptr: Pointer) {
        let mut l = lock(&self.local);
        if let Some(e) = l.watched.get_mut(&ptr)
            && e.watchers.is_empty()
            && e.idle_since.is_none()
        {
            e.idle_since = Some(Instant::now());
        }
    }

    /// Unsubscribes from channels nobody has watched for `idle` (called now and then:
    /// a watch that comes back soon finds its subscription still there).
    pub async fn sweep_subscriptions(&self, idle: Duration) {
        let gone: Vec<Pointer> = {
            let mut l = lock(&self.local);
            let gone: Vec<Pointer> = l
                .watched
                .iter()
                .filter(|(_, e)| {
                    e.watchers.is_empty() && e.idle_since.is_some_and(|t| t.elapsed() >= idle)
                })
                .map(|(p, _)| *p)
                .collect();
            for p in &gone {
                l.watched.remove(p);
            }
            gone
        };
        for p in gone {
            if let Err(e) = self
                .redis
                .clone()
                .sunsubscribe(self.keys.record(p).events)
                .await
            {
                debug!(ptr = %p, error = %e, "SUNSUBSCRIBE failed");
            }
        }
    }

    /// Watches registered from this gateway.
    pub fn watch_count(&self) -> u64 {
        lock(&self.local)
            .watched
            .values()
            .map(|e| e.watchers.len() as u64)
            .sum()
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
                let (Some(ptr), Some(ev)) = (
                    self.keys.pointer_of_channel(channel),
                    EventInfo::decode(msg),
                ) else {
                    warn!("an event that is not netswap's on a netswap channel");
                    return;
                };
                let out = self.on_event(ptr, ev);
                if !out.is_empty() {
                    let _ = self.events.send(out);
                }
            }
            PushKind::SSubscribe => {
                // A (re)subscription confirmed: after a lost connection, events may
                // have been missed, so look at the record again.
                let Some(ptr) = push.data.first().and_then(|v| match v {
                    Value::BulkString(c) => self.keys.pointer_of_channel(c),
                    _ => None,
                }) else {
                    return;
                };
                let known = lock(&self.local).watched.get(&ptr).and_then(|e| e.known);
                if known.is_some() {
                    let me = self.clone();
                    tokio::spawn(async move { me.resync(ptr).await });
                }
            }
            _ => {}
        }
    }

    fn on_event(&self, ptr: Pointer, ev: EventInfo) -> Vec<Notification> {
        let mut l = lock(&self.local);
        let Some(e) = l.watched.get_mut(&ptr) else {
            return Vec::new();
        };
        e.recent.push_back(ev);
        if e.recent.len() > RECENT_EVENTS {
            e.recent.pop_front();
        }
        if e.known.is_none_or(|(r, ..)| r < ev.rev) {
            e.known = Some((ev.rev, ev.version, ev.owner, ev.access));
        }
        let out: Vec<Notification> = e
            .watchers
            .iter()
            .filter(|(_, _, from)| ev.rev > *from)
            .map(|(c, x, _)| note(*c, *x, ptr, ev.event, ev.version))
            .collect();
        if ev.event == Event::Deleted {
            // Every watch of a deleted record ends.
            e.watchers.clear();
            e.idle_since = Some(Instant::now());
        } else {
            for w in e.watchers.iter_mut() {
                w.2 = w.2.max(ev.rev);
            }
        }
        out
    }

    /// Compares a watched record with what was last known and tells the watchers what
    /// changed while events could not arrive.
    async fn resync(&self, ptr: Pointer) {
        let now = match redis_io::load(&self.redis, &self.keys.record(ptr), None, 0).await {
            Ok(r) => r,
            Err(e) => {
                warn!(%ptr, error = %e, "could not check a watched record after a reconnect");
                return;
            }
        };
        let out = {
            let mut l = lock(&self.local);
            let Some(e) = l.watched.get_mut(&ptr) else {
                return;
            };
            let Some((rev, version, owner, access)) = e.known else {
                return;
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
            for (c, x, from) in e.watchers.iter_mut() {
                if now.as_ref().is_none_or(|r| r.rev > *from) {
                    for (ev, v) in &events {
                        out.push(note(*c, *x, ptr, *ev, *v));
                    }
                    if let Some(r) = &now {
                        *from = r.rev;
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip() {
        let e = EventInfo::new(Event::OwnerChanged, 7, 9, Identity([3; 32]), Access::READ);
        assert_eq!(EventInfo::decode(&e.encode()), Some(e));
        assert_eq!(EventInfo::decode(b"short"), None);
    }
}
