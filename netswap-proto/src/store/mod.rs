//! The record store and its ownership/permission state machine.
//!
//! Driven like quinn-proto: connection opened/closed events, requests and "now" go in;
//! replies, notifications for watchers, deadlines and reaped records come out. There
//! is no clock and no thread inside. The store is `Sync`: records live in shards (by
//! pointer), each behind its own mutex, and quota usage is counted with atomics per
//! owner, so requests on different records do not serialize on one lock.

mod account;
mod records;

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use nohash_hasher::BuildNoHashHasher;
use rand::RngCore;

pub use account::Account;
use account::QuotaKind;
use records::{Data, Record, Records};

use crate::identity::{Identity, IdentityKey};
use crate::message::{HelloInfo, NewOwner, RecordInfo, Reply, Request};
use crate::types::{Access, Event, Pointer, Status, Version};

/// The store's limits and timings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreConfig {
    /// Largest record (`--max-record-bytes`).
    pub max_record_bytes: u64,
    /// Largest request message, reported by HELLO (`--max-message-bytes`).
    pub max_message_bytes: u64,
    /// Records one identity may own (`--quota-records`).
    pub quota_records: u64,
    /// Data bytes one identity may own (`--quota-bytes`).
    pub quota_bytes: u64,
    /// How long records outlive their owner's last connection (`--orphan-grace`).
    pub orphan_grace: Duration,
    /// Records one connection may watch at once.
    pub max_watches_per_connection: usize,
    /// Number of shards (rounded up to a power of two).
    pub shards: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            max_record_bytes: crate::DEFAULT_MAX_RECORD_BYTES,
            max_message_bytes: crate::DEFAULT_MAX_RECORD_BYTES + 16,
            quota_records: 1_000_000,
            quota_bytes: 1 << 30,
            orphan_grace: Duration::from_secs(300),
            max_watches_per_connection: 65_536,
            shards: 64,
        }
    }
}

/// Names a connection, for routing watch notifications.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// Tell connection `conn` about `event` on its watch with XID `xid`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Notification {
    /// The watching connection.
    pub conn: ConnId,
    /// The XID of its WATCH request.
    pub xid: u32,
    /// What happened.
    pub event: Event,
    /// The record.
    pub ptr: Pointer,
    /// Its version after the event (the last version for a deletion).
    pub version: Version,
}

impl Notification {
    /// The NOTIFY reply that carries this notification.
    pub fn to_reply(&self) -> Reply {
        Reply::Notify {
            event: self.event,
            ptr: self.ptr,
            version: self.version,
        }
    }
}

/// The result of applying one request.
#[derive(Debug, PartialEq, Eq)]
pub struct Applied {
    /// The reply to send to the caller.
    pub reply: Reply,
    /// Watchers to notify (possibly including the caller's own watches).
    pub notifications: Vec<Notification>,
    /// The request named a pointer that does not exist (for the server's throttle on
    /// pointer guessing).
    pub miss: bool,
}

impl Applied {
    /// ADDRESS_FAULT "no such record", flagged as a miss.
    pub fn missing() -> Applied {
        Applied {
            reply: no_such_record(),
            notifications: Vec::new(),
            miss: true,
        }
    }
}

impl From<Reply> for Applied {
    fn from(reply: Reply) -> Applied {
        Applied {
            reply,
            notifications: Vec::new(),
            miss: false,
        }
    }
}

/// What [`Store::reap`] removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reaped {
    /// Records deleted because their owner stayed away past the grace period.
    pub records: Vec<Pointer>,
    /// Deletion notifications for their watchers.
    pub notifications: Vec<Notification>,
}

/// One connection's view of the store: who it is and what it watches.
#[derive(Debug)]
pub struct Session {
    conn: ConnId,
    account: Arc<Account>,
    watches: HashMap<Pointer, u32>,
}

impl Session {
    /// This connection's id.
    pub fn conn(&self) -> ConnId {
        self.conn
    }
    /// This connection's identity.
    pub fn identity(&self) -> &Identity {
        self.account.identity()
    }
    /// The account of this connection's identity.
    pub fn account(&self) -> &Arc<Account> {
        &self.account
    }
    /// Records this connection watches, with the XID of each watch.
    pub fn watches(&self) -> &HashMap<Pointer, u32> {
        &self.watches
    }
    /// Forgets a watch the store has ended (call on a `Deleted` notification).
    pub fn watch_ended(&mut self, ptr: Pointer, xid: u32) {
        if self.watches.get(&ptr) == Some(&xid) {
            self.watches.remove(&ptr);
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Watcher {
    conn: ConnId,
    xid: u32,
}

type PtrMap<V> = HashMap<u64, V, BuildNoHashHasher<u64>>;

/// Records whose pointers fall in one shard. Pointers are random, so they are their
/// own hash.
#[derive(Debug, Default)]
struct Shard {
    records: Records,
    data_bytes: u64,
    watches: PtrMap<Vec<Watcher>>,
    /// Records handed to an identity with no open connection: their own deadline and
    /// the generation of that identity at the transfer.
    transfer_deadline: PtrMap<(Instant, u64)>,
    transfer_order: BTreeSet<(Instant, u64)>,
}

#[derive(Debug, Default)]
struct Registry {
    accounts: HashMap<Identity, Arc<Account>>,
    offline: BTreeSet<(Instant, Identity)>,
}

/// Counts for monitoring and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Records stored.
    pub records: u64,
    /// Data bytes stored.
    pub data_bytes: u64,
    /// Identities known (connected, or owning records).
    pub accounts: u64,
    /// Watches registered.
    pub watches: u64,
}

/// Data at or below this size is copied into its own allocation when stored, so that a
/// small record never pins the (larger) network buffer it arrived in.
const COPY_BELOW: usize = 16 * 1024;

fn own(data: Bytes) -> Bytes {
    if data.len() < COPY_BELOW {
        Bytes::copy_from_slice(&data)
    } else {
        data
    }
}

fn no_such_record() -> Reply {
    Reply::error(Status::AddressFault, "no such record")
}

fn quota_reply(kind: QuotaKind, cfg: &StoreConfig) -> Reply {
    match kind {
        QuotaKind::Records => Reply::error(
            Status::QuotaExceeded,
            format!(
                "the owner's quota of {} records is used up",
                cfg.quota_records
            ),
        ),
        QuotaKind::Bytes => Reply::error(
            Status::QuotaExceeded,
            format!(
                "the owner's quota of {} bytes would be exceeded",
                cfg.quota_bytes
            ),
        ),
    }
}

fn too_large(size: u64, cfg: &StoreConfig) -> Reply {
    Reply::error(
        Status::TooLarge,
        format!(
            "record of {size} bytes is over the limit of {} bytes",
            cfg.max_record_bytes
        ),
    )
}

fn denied(what: &'static str) -> Reply {
    Reply::error(Status::AccessViolation, what)
}

/// The record store. See the module documentation.
#[derive(Debug)]
pub struct Store {
    config: StoreConfig,
    key: IdentityKey,
    shards: Box<[Mutex<Shard>]>,
    shard_mask: u64,
    registry: Mutex<Registry>,
    next_conn: AtomicU64,
}

impl Store {
    /// An empty store.
    pub fn new(config: StoreConfig, key: IdentityKey) -> Store {
        let n = config.shards.max(1).next_power_of_two();
        Store {
            shards: (0..n).map(|_| Mutex::new(Shard::default())).collect(),
            shard_mask: n as u64 - 1,
            config,
            key,
            registry: Mutex::new(Registry::default()),
            next_conn: AtomicU64::new(1),
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    /// The identity of a client at `ip`.
    pub fn identity_of(&self, ip: IpAddr) -> Identity {
        Identity::derive(&self.key, ip)
    }

    fn shard(&self, ptr: u64) -> MutexGuard<'_, Shard> {
        // Low bits pick the shard; the hash map uses the pointer as its own hash.
        let i = (ptr.rotate_right(32) & self.shard_mask) as usize;
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn account_for(reg: &mut Registry, identity: Identity) -> Arc<Account> {
        reg.accounts
            .entry(identity)
            .or_insert_with(|| Arc::new(Account::new(identity)))
            .clone()
    }

    /// A connection from `ip` opened. Cancels its identity's pending orphan expiry.
    pub fn connect(&self, ip: IpAddr) -> Session {
        let identity = self.identity_of(ip);
        let account = {
            let mut reg = self.registry();
            let account = Self::account_for(&mut reg, identity);
            let mut st = account.lock_state();
            st.connections += 1;
            st.generation += 1;
            if let Some(d) = st.offline_deadline.take() {
                reg.offline.remove(&(d, identity));
            }
            drop(st);
            account
        };
        Session {
            conn: ConnId(self.next_conn.fetch_add(1, Ordering::Relaxed)),
            account,
            watches: HashMap::new(),
        }
    }

    /// A connection closed: its watches end, and when it was its identity's last
    /// connection, the identity's records expire `orphan_grace` after `now`.
    /// Returns that deadline when one was set.
    pub fn disconnect(&self, session: Session, now: Instant) -> Option<Instant> {
        for (ptr, _) in session.watches.iter() {
            let mut shard = self.shard(ptr.get());
            if let Some(list) = shard.watches.get_mut(&ptr.get()) {
                list.retain(|w| w.conn != session.conn);
                if list.is_empty() {
                    shard.watches.remove(&ptr.get());
                }
            }
        }
        let Session { account, .. } = session;
        let identity = *account.identity();
        let mut reg = self.registry();
        let mut st = account.lock_state();
        st.connections = st.connections.saturating_sub(1);
        if st.connections > 0 {
            return None;
        }
        let deadline = if account.records() > 0 {
            let d = now + self.config.orphan_grace;
            st.offline_deadline = Some(d);
            reg.offline.insert((d, identity));
            Some(d)
        } else {
            None
        };
        drop(st);
        drop(account);
        Self::prune(&mut reg, &identity);
        deadline
    }

    /// Forgets an account nobody refers to any more (no connection, no record).
    fn prune(reg: &mut Registry, identity: &Identity) {
        if let Some(a) = reg.accounts.get(identity)
            && Arc::strong_count(a) == 1
        {
            reg.accounts.remove(identity);
        }
    }

    /// The earliest moment at which [`Store::reap`] has work to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        let mut next = self.registry().offline.first().map(|(d, _)| *d);
        for s in self.shards.iter() {
            let s = s.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((d, _)) = s.transfer_order.first() {
                next = Some(next.map_or(*d, |n| n.min(*d)));
            }
        }
        next
    }

    /// Deletes the records whose orphan grace has run out by `now`.
    pub fn reap(&self, now: Instant) -> Reaped {
        let mut out = Reaped::default();
        // Accounts whose own deadline has passed.
        let mut due: Vec<Arc<Account>> = Vec::new();
        {
            let mut reg = self.registry();
            while let Some(&(d, identity)) = reg.offline.first() {
                if d > now {
                    break;
                }
                reg.offline.pop_first();
                if let Some(a) = reg.accounts.get(&identity) {
                    let mut st = a.lock_state();
                    if st.connections == 0 && st.offline_deadline == Some(d) {
                        st.offline_deadline = None;
                        drop(st);
                        if a.records() > 0 {
                            due.push(a.clone());
                        }
                    }
                }
            }
        }
        let due_set: HashSet<*const Account> = due.iter().map(Arc::as_ptr).collect();
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            let mut doomed: Vec<u64> = Vec::new();
            if !due_set.is_empty() {
                for rec in shard.records.iter() {
                    if !due_set.contains(&Arc::as_ptr(&rec.owner)) {
                        continue;
                    }
                    // A record handed to this identity after it went away keeps its
                    // own, later deadline.
                    let spared = shard
                        .transfer_deadline
                        .get(&rec.ptr)
                        .is_some_and(|&(d, g)| d > now && g == rec.owner.lock_state().generation);
                    if !spared {
                        doomed.push(rec.ptr);
                    }
                }
            }
            while let Some(&(d, ptr)) = shard.transfer_order.first() {
                if d > now {
                    break;
                }
                shard.transfer_order.pop_first();
                let Some((_, generation)) = shard.transfer_deadline.remove(&ptr) else {
                    continue;
                };
                if let Some(rec) = shard.records.get(ptr) {
                    let st = rec.owner.lock_state();
                    if st.connections == 0 && st.generation == generation {
                        doomed.push(ptr);
                    }
                }
            }
            doomed.sort_unstable();
            doomed.dedup();
            for ptr in doomed {
                let p = Pointer::new(ptr).expect("stored pointers are non-zero");
                shard.remove_record(p, &mut out.notifications);
                out.records.push(p);
            }
        }
        let mut reg = self.registry();
        for a in due {
            let identity = *a.identity();
            drop(a);
            Self::prune(&mut reg, &identity);
        }
        out
    }

    /// Counts records, bytes, identities and watches (locks every shard in turn).
    pub fn stats(&self) -> StoreStats {
        let mut s = StoreStats {
            accounts: self.registry().accounts.len() as u64,
            ..StoreStats::default()
        };
        for shard in self.shards.iter() {
            let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            s.records += shard.records.len() as u64;
            s.data_bytes += shard.data_bytes;
            s.watches += shard.watches.values().map(|w| w.len() as u64).sum::<u64>();
        }
        s
    }

    /// The HELLO answer for `session`.
    pub fn hello(&self, session: &Session) -> HelloInfo {
        HelloInfo {
            protocol: crate::PROTOCOL_VERSION,
            max_record_bytes: self.config.max_record_bytes,
            max_message_bytes: self.config.max_message_bytes,
            orphan_grace_secs: self.config.orphan_grace.as_secs().min(u32::MAX as u64) as u32,
            identity: *session.identity(),
        }
    }

    /// Applies one request from `session`, sent with XID `xid`.
    pub fn apply(
        &self,
        session: &mut Session,
        xid: u32,
        request: Request,
        now: Instant,
        rng: &mut dyn RngCore,
    ) -> Applied {
        let cfg = &self.config;
        let me = &session.account;
        match request {
            Request::Hello => Reply::Hello(self.hello(session)).into(),
            Request::Create { access, data } => {
                if data.len() as u64 > cfg.max_record_bytes {
                    return too_large(data.len() as u64, cfg).into();
                }
                if let Err(kind) =
                    me.charge(1, data.len() as u64, cfg.quota_records, cfg.quota_bytes)
                {
                    return quota_reply(kind, cfg).into();
                }
                let data = Data::from_bytes(data, own);
                loop {
                    let Some(ptr) = Pointer::new(rng.next_u64()) else {
                        continue;
                    };
                    let mut shard = self.shard(ptr.get());
                    if shard.records.contains_key(ptr.get()) {
                        continue;
                    }
                    shard.data_bytes += data.len() as u64;
                    shard.records.insert(Record {
                        ptr: ptr.get(),
                        data,
                        version: 1,
                        owner: me.clone(),
                        access,
                    });
                    return Reply::Created(ptr).into();
                }
            }
            Request::Read { ptr, range } => {
                let shard = self.shard(ptr.get());
                let Some(rec) = shard.records.get(ptr.get()) else {
                    return Applied::missing();
                };
                if !rec.may(me, Access::READ) {
                    return denied("the record's READ bit is not set").into();
                }
                let size = rec.data.len() as u64;
                match range {
                    None => Reply::Data(rec.data.slice(0, size as usize)).into(),
                    Some((off, _)) if off > size => Reply::error(
                        Status::AddressFault,
                        format!("offset {off} is past the end of the record ({size} bytes)"),
                    )
                    .into(),
                    Some((off, n)) => {
                        let end = size.min(off + n as u64);
                        Reply::Data(rec.data.slice(off as usize, end as usize)).into()
                    }
                }
            }
            Request::Info { ptr } => {
                let shard = self.shard(ptr.get());
                let Some(rec) = shard.records.get(ptr.get()) else {
                    return Applied::missing();
                };
                if !rec.may(me, Access::READ) {
                    return denied("the record's READ bit is not set").into();
                }
                Reply::Info(RecordInfo {
                    size: rec.data.len() as u64,
                    version: rec.version,
                    access: rec.access,
                    owned: Arc::ptr_eq(&rec.owner, me),
                })
                .into()
            }
            Request::Replace { ptr, data } => self.write(me, ptr, None, WriteKind::Replace(data)),
            Request::ReplaceIf {
                ptr,
                expected,
                data,
            } => self.write(me, ptr, Some(expected), WriteKind::Replace(data)),
            Request::WriteAt { ptr, offset, data } => {
                self.write(me, ptr, None, WriteKind::At(offset, data))
            }
            Request::SetAccess { ptr, access } => {
                let mut shard = self.shard(ptr.get());
                let Some(rec) = shard.records.get_mut(ptr.get()) else {
                    return Applied::missing();
                };
                if !Arc::ptr_eq(&rec.owner, me) {
                    return denied("only the owner may change access bits").into();
                }
                if rec.access == access {
                    return Reply::Done.into();
                }
                rec.access = access;
                let version = rec.version;
                let notifications = shard.notify(ptr, Event::AccessChanged, version);
                Applied {
                    reply: Reply::Done,
                    notifications,
                    miss: false,
                }
            }
            Request::Delete { ptr } => {
                let mut shard = self.shard(ptr.get());
                let Some(rec) = shard.records.get(ptr.get()) else {
                    return Applied::missing();
                };
                if !Arc::ptr_eq(&rec.owner, me) {
                    return denied("only the owner may delete a record").into();
                }
                let mut notifications = Vec::new();
                shard.remove_record(ptr, &mut notifications);
                Applied {
                    reply: Reply::Done,
                    notifications,
                    miss: false,
                }
            }
            Request::Takeover { ptr } => {
                let mut shard = self.shard(ptr.get());
                let Some(rec) = shard.records.get(ptr.get()) else {
                    return Applied::missing();
                };
                if Arc::ptr_eq(&rec.owner, me) {
                    return Reply::Done.into();
                }
                if !rec.access.contains(Access::TAKEOVER) {
                    return denied("the record's TAKEOVER bit is not set").into();
                }
                self.change_owner(&mut shard, ptr, me.clone(), now, true)
            }
            Request::Transfer { ptr, to } => {
                let target = match to {
                    NewOwner::Identity(id) => id,
                    NewOwner::Ip(ip) => self.identity_of(ip),
                };
                let mut shard = self.shard(ptr.get());
                let Some(rec) = shard.records.get(ptr.get()) else {
                    return Applied::missing();
                };
                if !Arc::ptr_eq(&rec.owner, me) {
                    return denied("only the owner may transfer a record").into();
                }
                if target == *me.identity() {
                    return Reply::Done.into();
                }
                // Lock order: shard, then registry (reap and connect never hold the
                // registry while taking a shard).
                let new_owner = Self::account_for(&mut self.registry(), target);
                self.change_owner(&mut shard, ptr, new_owner, now, false)
            }
            Request::Watch { ptr } => {
                let mut shard = self.shard(ptr.get());
                let Some(rec) = shard.records.get(ptr.get()) else {
                    return Applied::missing();
                };
                if !rec.may(me, Access::READ) {
                    return denied("the record's READ bit is not set").into();
                }
                if !session.watches.contains_key(&ptr)
                    && session.watches.len() >= cfg.max_watches_per_connection
                {
                    return Reply::error(
                        Status::QuotaExceeded,
                        format!(
                            "this connection already watches {} records",
                            session.watches.len()
                        ),
                    )
                    .into();
                }
                let conn = session.conn;
                let list = shard.watches.entry(ptr.get()).or_default();
                match list.iter_mut().find(|w| w.conn == conn) {
                    Some(w) => w.xid = xid,
                    None => list.push(Watcher { conn, xid }),
                }
                session.watches.insert(ptr, xid);
                Reply::Done.into()
            }
            Request::Unwatch { ptr } => {
                let mut shard = self.shard(ptr.get());
                if !shard.records.contains_key(ptr.get()) {
                    return Applied::missing();
                }
                if session.watches.remove(&ptr).is_none() {
                    return Reply::error(Status::AddressFault, "no such watch on this connection")
                        .into();
                }
                if let Some(list) = shard.watches.get_mut(&ptr.get()) {
                    list.retain(|w| w.conn != session.conn);
                    if list.is_empty() {
                        shard.watches.remove(&ptr.get());
                    }
                }
                Reply::Done.into()
            }
        }
    }

    fn change_owner(
        &self,
        shard: &mut Shard,
        ptr: Pointer,
        new_owner: Arc<Account>,
        now: Instant,
        clear_takeover: bool,
    ) -> Applied {
        let cfg = &self.config;
        let rec = shard.records.get_mut(ptr.get()).expect("checked by caller");
        let size = rec.data.len() as u64;
        if let Err(kind) = new_owner.charge(1, size, cfg.quota_records, cfg.quota_bytes) {
            return quota_reply(kind, cfg).into();
        }
        rec.owner.release(1, size);
        if clear_takeover {
            rec.access.remove(Access::TAKEOVER);
        }
        let st = new_owner.lock_state();
        let offline = (st.connections == 0).then_some(st.generation);
        drop(st);
        rec.owner = new_owner;
        let version = rec.version;
        shard.clear_deadline(ptr.get());
        if let Some(generation) = offline {
            let d = now + cfg.orphan_grace;
            shard.transfer_deadline.insert(ptr.get(), (d, generation));
            shard.transfer_order.insert((d, ptr.get()));
        }
        Applied {
            reply: Reply::Done,
            notifications: shard.notify(ptr, Event::OwnerChanged, version),
            miss: false,
        }
    }

    fn write(
        &self,
        me: &Arc<Account>,
        ptr: Pointer,
        expected: Option<Version>,
        kind: WriteKind,
    ) -> Applied {
        let cfg = &self.config;
        let mut shard = self.shard(ptr.get());
        let shard = &mut *shard;
        let Some(rec) = shard.records.get_mut(ptr.get()) else {
            return Applied::missing();
        };
        if !rec.may(me, Access::WRITE) {
            return denied("the record's WRITE bit is not set").into();
        }
        let old = rec.data.len() as u64;
        let new_len = match &kind {
            WriteKind::Replace(d) => d.len() as u64,
            WriteKind::At(off, d) => {
                if *off > old {
                    return Reply::error(
                        Status::AddressFault,
                        format!("offset {off} is past the end of the record ({old} bytes)"),
                    )
                    .into();
                }
                old.max(off + d.len() as u64)
            }
        };
        if let Some(expected) = expected
            && expected != rec.version
        {
            return Reply::Conflict(rec.version).into();
        }
        if new_len > cfg.max_record_bytes {
            return too_large(new_len, cfg).into();
        }
        if new_len > old {
            if let Err(kind) =
                rec.owner
                    .charge(0, new_len - old, cfg.quota_records, cfg.quota_bytes)
            {
                return quota_reply(kind, cfg).into();
            }
        } else {
            rec.owner.release(0, old - new_len);
        }
        match kind {
            WriteKind::Replace(d) => rec.data = Data::from_bytes(d, own),
            WriteKind::At(off, d) => rec.data.patch(off as usize, &d),
        }
        rec.version += 1;
        let version = rec.version;
        shard.data_bytes = shard.data_bytes + new_len - old;
        Applied {
            reply: Reply::Written(version),
            notifications: shard.notify(ptr, Event::Changed, version),
            miss: false,
        }
    }
}

enum WriteKind {
    Replace(Bytes),
    At(u64, Bytes),
}

impl Record {
    fn may(&self, who: &Arc<Account>, bit: Access) -> bool {
        Arc::ptr_eq(&self.owner, who) || self.access.contains(bit)
    }
}

impl Shard {
    fn notify(&self, ptr: Pointer, event: Event, version: Version) -> Vec<Notification> {
        match self.watches.get(&ptr.get()) {
            None => Vec::new(),
            Some(list) => list
                .iter()
                .map(|w| Notification {
                    conn: w.conn,
                    xid: w.xid,
                    event,
                    ptr,
                    version,
                })
                .collect(),
        }
    }

    fn clear_deadline(&mut self, ptr: u64) {
        if let Some((d, _)) = self.transfer_deadline.remove(&ptr) {
            self.transfer_order.remove(&(d, ptr));
        }
    }

    fn remove_record(&mut self, ptr: Pointer, notifications: &mut Vec<Notification>) {
        let Some(rec) = self.records.remove(ptr.get()) else {
            return;
        };
        rec.owner.release(1, rec.data.len() as u64);
        self.data_bytes -= rec.data.len() as u64;
        self.clear_deadline(ptr.get());
        if let Some(list) = self.watches.remove(&ptr.get()) {
            notifications.extend(list.into_iter().map(|w| Notification {
                conn: w.conn,
                xid: w.xid,
                event: Event::Deleted,
                ptr,
                version: rec.version,
            }));
        }
    }
}

/// A short reason for any [`Reply::Error`] (used by logs and tests).
pub fn reason_of(reply: &Reply) -> Option<&Cow<'static, str>> {
    match reply {
        Reply::Error { reason, .. } => Some(reason),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
