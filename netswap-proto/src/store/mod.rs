//! The embedded record store: records in memory, in shards.
//!
//! Driven like quinn-proto: connection opened/closed events, requests and "now" go in;
//! replies, notifications for watchers, deadlines and reaped records come out. There
//! is no clock and no thread inside. The store is `Sync`: records live in shards (by
//! pointer), each behind its own mutex, and quota usage is counted with atomics per
//! identity, so requests on different records do not serialize on one lock.
//!
//! The rules (who may do what, what changes, which error wins, who pays) are not
//! here: [`crate::rules`] decides, and the store applies the decision under the
//! record's shard lock. The Redis Cluster backend applies the same decisions.

mod account;
mod place;
mod records;

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use nohash_hasher::BuildNoHashHasher;
use rand::RngCore;

pub use account::Account;
use place::PlaceCodec;
use records::{Data, DataRef, Record, Records};

/// Values up to this many bytes are held in their record's slot; larger ones in a
/// buffer of their own (see [`Store::prefetch`]).
pub const INLINE_VALUE: usize = records::INLINE;

use crate::identity::{Identity, IdentityKey};
use crate::message::{Delta, HelloInfo, NewOwner, Reply, Request};
use crate::rules::{self, Decision, Payer, RecordView, Usage, WriteKind};
use crate::snapshot::SnapshotRecord;
use crate::types::{Access, Event, Pointer, Version};

/// Where a pointer says its record is: [`Store::locate_ahead`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Located {
    ptr: u64,
    shard: usize,
    slot: u32,
}

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
    /// Number of shards (rounded up to a power of two; at most 256, more are taken as
    /// 256).
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
#[derive(Clone, Debug, PartialEq, Eq)]
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
    /// For a data watch's "changed": the bytes the change wrote (one range, from
    /// `version - 1`; or several merged changes). `None` on a data watch's "changed"
    /// means the bytes could not be sent: the watcher must read the record.
    pub delta: Option<Delta>,
}

impl Notification {
    /// A notification without data.
    pub fn new(conn: ConnId, xid: u32, event: Event, ptr: Pointer, version: Version) -> Self {
        Notification {
            conn,
            xid,
            event,
            ptr,
            version,
            delta: None,
        }
    }

    /// The NOTIFY reply that carries this notification. A delta that does not fit
    /// one message is left out (a plain "changed": the watcher reads the record).
    pub fn to_reply(&self) -> Reply {
        Reply::Notify {
            event: self.event,
            ptr: self.ptr,
            version: self.version,
            delta: self
                .delta
                .as_ref()
                .filter(|d| d.wire_len() as u64 <= crate::frame::MAX_MESSAGE)
                .cloned(),
        }
    }

    /// Bytes this notification's NOTIFY payload takes.
    pub fn wire_len(&self) -> usize {
        self.delta.as_ref().map_or(16, Delta::wire_len)
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
    /// The reply (a READ's bytes) went to the sink given to [`Store::apply_into`];
    /// `reply` is then an empty DATA.
    pub sent: bool,
}

impl Applied {
    /// ADDRESS_FAULT "no such record", flagged as a miss.
    pub fn missing() -> Applied {
        Applied {
            reply: rules::no_such_record(),
            notifications: Vec::new(),
            miss: true,
            sent: false,
        }
    }

    fn notifying(reply: Reply, notifications: Vec<Notification>) -> Applied {
        Applied {
            reply,
            notifications,
            miss: false,
            sent: false,
        }
    }
}

impl From<Reply> for Applied {
    fn from(reply: Reply) -> Applied {
        Applied::notifying(reply, Vec::new())
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
    /// A data watch: its notifications carry the changed bytes.
    data: bool,
}

type PtrMap<V> = HashMap<u64, V, BuildNoHashHasher<u64>>;

/// The records whose pointers name one shard, and what goes with them.
#[derive(Debug)]
struct Shard {
    records: Records,
    data_bytes: u64,
    watches: PtrMap<Vec<Watcher>>,
    /// Records handed to an identity with no open connection: their own deadline and
    /// the generation of that identity at the transfer.
    transfer_deadline: PtrMap<(Instant, u64)>,
    transfer_order: BTreeSet<(Instant, u64)>,
    /// Records paid for by an identity other than their owner ("parked": handed to an
    /// identity that had no open connection, see [`rules::Payer`]).
    payers: PtrMap<Arc<Account>>,
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
    /// Identities known (connected, or owning or paying for records).
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

/// Accounts that lost a reference during a request: pruned from the registry once the
/// shard lock is released, if nothing refers to them any more.
type Released = Vec<Arc<Account>>;

/// Where large values go when the store lets go of them ([`Store::set_retire`]).
struct Retire(Box<dyn Fn(Bytes) + Send + Sync>);

impl std::fmt::Debug for Retire {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Retire")
    }
}

/// The record store. See the module documentation.
#[derive(Debug)]
pub struct Store {
    /// Where large values the store lets go of are freed (see [`Store::set_retire`]).
    retire: Option<Retire>,
    config: StoreConfig,
    key: IdentityKey,
    shards: Box<[Mutex<Shard>]>,
    /// Where a pointer says its record is.
    codec: PlaceCodec,
    registry: Mutex<Registry>,
    next_conn: AtomicU64,
}

impl Store {
    /// An empty store.
    pub fn new(config: StoreConfig, key: IdentityKey) -> Store {
        let n = config
            .shards
            .clamp(1, 1 << place::MAX_SHARD_BITS)
            .next_power_of_two();
        let codec = PlaceCodec::random(n);
        Store {
            retire: None,
            shards: (0..n)
                .map(|i| Mutex::new(Shard::new(Records::new(codec.clone(), i))))
                .collect(),
            codec,
            config,
            key,
            registry: Mutex::new(Registry::default()),
            next_conn: AtomicU64::new(1),
        }
    }

    /// Hands every large value (256 KiB and up) the store lets go of — replaced,
    /// deleted or reaped — to `retire` instead of freeing it on the spot, after the
    /// record's shard is unlocked. A server passes them to a thread of its own, so
    /// that freeing a 64 MiB value (1–3 ms of `munmap`) does not hold up the requests
    /// behind it. Without it they are freed by the caller, also after the unlock.
    pub fn set_retire(&mut self, retire: impl Fn(Bytes) + Send + Sync + 'static) {
        self.retire = Some(Retire(Box::new(retire)));
    }

    /// Frees or hands on values taken from the shards (call with no shard locked).
    fn retire(&self, values: Vec<Bytes>) {
        if let Some(Retire(f)) = &self.retire {
            values.into_iter().for_each(f);
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

    /// The shard a pointer names, locked, and the slot it names there.
    fn locate(&self, ptr: u64) -> (MutexGuard<'_, Shard>, u32) {
        let place = self.codec.decode(ptr);
        (self.lock_shard(place.shard), place.slot)
    }

    /// Shard `i`, locked.
    fn lock_shard(&self, i: usize) -> MutexGuard<'_, Shard> {
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The shard a pointer names, locked.
    fn shard(&self, ptr: u64) -> MutexGuard<'_, Shard> {
        self.locate(ptr).0
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

    /// A connection from `ip` opened. Cancels its identity's pending orphan expiry,
    /// and when it is the identity's first connection, the charge of every record
    /// handed to it while it was away moves to it (see [`rules::Payer`]).
    pub fn connect(&self, ip: IpAddr) -> Session {
        let identity = self.identity_of(ip);
        let (account, parked) = {
            let mut reg = self.registry();
            let account = Self::account_for(&mut reg, identity);
            let mut st = account.lock_state();
            st.connections += 1;
            st.generation += 1;
            if let Some(d) = st.offline_deadline.take() {
                reg.offline.remove(&(d, identity));
            }
            let parked = std::mem::take(&mut st.parked);
            drop(st);
            (account, parked)
        };
        let mut released = Released::new();
        for ptr in parked {
            let mut shard = self.shard(ptr);
            let shard = &mut *shard;
            let Some(rec) = shard.records.get(ptr) else {
                continue;
            };
            if !Arc::ptr_eq(rec.owner, &account) {
                continue;
            }
            if let Some(payer) = shard.payers.remove(&ptr) {
                let charge = Usage {
                    records: 1,
                    bytes: rec.data.len() as u64,
                };
                account.charge_over_quota(charge);
                payer.release(charge);
                released.push(payer);
            }
        }
        self.prune_released(released);
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

    /// Forgets an account nobody refers to any more (no connection, no record owned or
    /// paid for): only the registry holds it.
    fn prune(reg: &mut Registry, identity: &Identity) {
        if let Some(a) = reg.accounts.get(identity)
            && Arc::strong_count(a) == 1
        {
            if let Some(d) = a.lock_state().offline_deadline {
                reg.offline.remove(&(d, *identity));
            }
            reg.accounts.remove(identity);
        }
    }

    /// Prunes the accounts a request let go of (call with no shard lock held).
    fn prune_released(&self, released: Released) {
        if released.is_empty() {
            return;
        }
        let ids: Vec<Identity> = released.iter().map(|a| *a.identity()).collect();
        drop(released);
        let mut reg = self.registry();
        for id in ids {
            Self::prune(&mut reg, &id);
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

    /// Deletes the records whose orphan grace has run out by `now`
    /// ([`rules::orphan_expiry`]).
    pub fn reap(&self, now: Instant) -> Reaped {
        let mut out = Reaped::default();
        let mut released = Released::new();
        let mut retired = Vec::new();
        // Accounts whose own deadline has passed, with that deadline.
        let mut due: Vec<(Arc<Account>, Instant)> = Vec::new();
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
                        due.push((a.clone(), d));
                    }
                }
            }
        }
        let due_set: HashMap<*const Account, Instant> =
            due.iter().map(|(a, d)| (Arc::as_ptr(a), *d)).collect();
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            let mut doomed: Vec<u64> = Vec::new();
            if !due_set.is_empty() {
                for rec in shard.records.iter() {
                    let Some(&owner_deadline) = due_set.get(&Arc::as_ptr(rec.owner)) else {
                        continue;
                    };
                    // A record handed to this identity after it went away keeps its
                    // own, later deadline.
                    let own = shard
                        .transfer_deadline
                        .get(&rec.ptr)
                        .filter(|&&(_, g)| g == rec.owner.lock_state().generation)
                        .map(|&(d, _)| d);
                    if rules::orphan_expiry(Some(owner_deadline), own).is_some_and(|d| d <= now) {
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
                    let owner_deadline = st.offline_deadline;
                    if st.connections == 0
                        && st.generation == generation
                        && rules::orphan_expiry(owner_deadline, Some(d)).is_some_and(|e| e <= now)
                    {
                        doomed.push(ptr);
                    }
                }
            }
            doomed.sort_unstable();
            doomed.dedup();
            for ptr in doomed {
                let p = Pointer::new(ptr).expect("stored pointers are non-zero");
                let slot = shard.records.find(ptr).expect("found above");
                shard.remove_record(p, slot, &mut out.notifications, &mut released);
                out.records.push(p);
            }
            retired.extend(shard.records.take_retired());
        }
        released.extend(due.into_iter().map(|(a, _)| a));
        self.prune_released(released);
        self.retire(retired);
        out
    }

    /// Identities whose records are waiting out their orphan grace, and records with a
    /// grace of their own (handed to an absent identity).
    pub fn orphans_pending(&self) -> u64 {
        let mut n = self.registry().offline.len() as u64;
        for s in self.shards.iter() {
            n += s
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .transfer_order
                .len() as u64;
        }
        n
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

    /// Copies every record out for a snapshot, handing them to `sink` a page (up to
    /// 285 records of one shard) at a time. Each page is copied under its shard's
    /// lock, which is then released before `sink` runs: serving never waits for more
    /// than one page's copy (large values are shared, not copied). Records changed
    /// while the export runs are exported as they were when their page was copied.
    pub fn export<E>(
        &self,
        mut sink: impl FnMut(Vec<SnapshotRecord>) -> Result<(), E>,
    ) -> Result<(), E> {
        for shard in self.shards.iter() {
            let mut page = 0;
            loop {
                let chunk = {
                    let s = shard.lock().unwrap_or_else(|e| e.into_inner());
                    if page >= s.records.pages() {
                        break;
                    }
                    // Small values share one copy per page.
                    let inline: usize = s
                        .records
                        .page(page)
                        .filter(|r| matches!(r.data, DataRef::Inline(_)))
                        .map(|r| r.data.len())
                        .sum();
                    let mut arena = BytesMut::with_capacity(inline);
                    for r in s.records.page(page) {
                        if let DataRef::Inline(b) = r.data {
                            arena.extend_from_slice(b);
                        }
                    }
                    let arena = arena.freeze();
                    let mut at = 0;
                    let mut out = Vec::with_capacity(records::PAGE);
                    for r in s.records.page(page) {
                        let data = match r.data {
                            DataRef::Shared(b) => b.clone(),
                            DataRef::Inline(_) => {
                                let d = arena.slice(at..at + r.data.len());
                                at += r.data.len();
                                d
                            }
                        };
                        out.push(SnapshotRecord {
                            ptr: Pointer::new(r.ptr).expect("stored pointers are non-zero"),
                            owner: *r.owner.identity(),
                            payer: s.payers.get(&r.ptr).map(|p| *p.identity()),
                            access: r.access,
                            version: r.version,
                            data,
                        });
                    }
                    out
                };
                page += 1;
                if !chunk.is_empty() {
                    sink(chunk)?;
                }
            }
        }
        Ok(())
    }

    /// Starts loading records from a snapshot into this (empty) store.
    pub fn restore(&self) -> Restore<'_> {
        Restore {
            store: self,
            owners: HashSet::new(),
            records: 0,
            bytes: 0,
        }
    }

    /// Checks the store's books (for tests and fuzzing; locks everything in turn):
    /// every identity's quota usage is exactly the records it pays for and their
    /// bytes, every record's payer and owner are known accounts, every parked record
    /// is in its owner's parked set and only those, and the byte counts add up.
    pub fn audit(&self) -> Result<(), String> {
        let reg = self.registry();
        let mut paid: HashMap<Identity, Usage> = HashMap::new();
        let mut parked: HashMap<Identity, Vec<u64>> = HashMap::new();
        for shard in self.shards.iter() {
            let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            let mut bytes = 0;
            for rec in shard.records.iter() {
                bytes += rec.data.len() as u64;
                let owner = *rec.owner.identity();
                let payer = shard.payers.get(&rec.ptr).unwrap_or(rec.owner);
                for a in [rec.owner, payer] {
                    if !reg
                        .accounts
                        .get(a.identity())
                        .is_some_and(|r| Arc::ptr_eq(r, a))
                    {
                        return Err(format!("record {:x}: account not registered", rec.ptr));
                    }
                }
                let u = paid.entry(*payer.identity()).or_default();
                u.records += 1;
                u.bytes += rec.data.len() as u64;
                if shard.payers.contains_key(&rec.ptr) {
                    parked.entry(owner).or_default().push(rec.ptr);
                }
            }
            if bytes != shard.data_bytes {
                return Err(format!(
                    "shard counts {} bytes, holds {bytes}",
                    shard.data_bytes
                ));
            }
            if shard.payers.keys().any(|p| !shard.records.contains_key(*p)) {
                return Err("a payer is recorded for a record that is gone".into());
            }
        }
        for (id, a) in &reg.accounts {
            let want = paid.get(id).copied().unwrap_or_default();
            if (a.records(), a.bytes()) != (want.records, want.bytes) {
                return Err(format!(
                    "{id} is charged {} records / {} bytes but pays for {} / {}",
                    a.records(),
                    a.bytes(),
                    want.records,
                    want.bytes
                ));
            }
            let mut have: Vec<u64> = a.lock_state().parked.iter().copied().collect();
            let mut want = parked.remove(id).unwrap_or_default();
            have.sort_unstable();
            want.sort_unstable();
            if have != want {
                return Err(format!(
                    "{id}: parked set {have:x?}, parked records {want:x?}"
                ));
            }
        }
        Ok(())
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

    /// Where the record `ptr` names would be (a pointer decryption): handed to
    /// [`Store::prefetch`] and then to [`Store::apply_into`] for the same request, a
    /// batch decrypts each pointer once, and its decryptions (independent of each
    /// other) overlap.
    pub fn locate_ahead(&self, ptr: Pointer) -> Located {
        let place = self.codec.decode(ptr.get());
        Located {
            ptr: ptr.get(),
            shard: place.shard,
            slot: place.slot,
        }
    }

    /// The shard a pointer names, locked, and the slot it names there (`at`: where
    /// [`Store::locate_ahead`] found it already, used if it is for this pointer).
    fn locate_at(&self, ptr: u64, at: Option<Located>) -> (MutexGuard<'_, Shard>, u32) {
        match at {
            Some(at) if at.ptr == ptr => (self.lock_shard(at.shard), at.slot),
            _ => self.locate(ptr),
        }
    }

    /// Asks the CPU to start loading the records' slots `at` names (from
    /// [`Store::locate_ahead`]) and, with `values`, then their values held outside the
    /// slots (the first KiB), before requests for them are applied: a connection with
    /// several requests read at once waits for their memory together instead of one
    /// cache miss after another. The values pay only for values larger than
    /// [`INLINE_VALUE`] (a REPLACE's new value gets the allocation the write before it
    /// freed: the old values prefetched are the memory the next writes go to). A
    /// hint: it changes nothing; call with no shard locked. It costs a shard lock per
    /// record and pass (looks at the first 32) (docs/BENCHMARKS.md).
    pub fn prefetch<I>(&self, at: I, values: bool)
    where
        I: IntoIterator<Item = Located>,
        I::IntoIter: Clone,
    {
        /// Requests looked at per call, at most.
        const MAX: usize = 32;
        /// Bytes of a value loaded ahead (the hardware follows the rest).
        const VALUE_BYTES: usize = 1024;
        let at = at.into_iter().take(MAX);
        // First every record's slot, then (the slots on their way) every value: the
        // misses of one pass overlap instead of following each other.
        for a in at.clone() {
            self.lock_shard(a.shard).records.prefetch_slot(a.slot);
        }
        for a in at.filter(|_| values) {
            self.lock_shard(a.shard)
                .records
                .prefetch_value(a.ptr, a.slot, VALUE_BYTES);
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
        self.apply_into(session, xid, request, None, now, rng, &mut |_| false)
    }

    /// [`Store::apply`], offering a READ's bytes to `sink` first, while the record is
    /// locked: a server that writes them into its output buffer there (returning
    /// true) copies them once, from the record, with no handle to share and no
    /// reference count to touch (`Applied::sent`). When `sink` returns false they come
    /// in the reply as from `apply`. `at`: where [`Store::locate_ahead`] found the
    /// request's record (`None`: the pointer is decrypted here).
    #[allow(clippy::too_many_arguments)]
    pub fn apply_into(
        &self,
        session: &mut Session,
        xid: u32,
        request: Request,
        at: Option<Located>,
        now: Instant,
        rng: &mut dyn RngCore,
        sink: &mut dyn FnMut(&[u8]) -> bool,
    ) -> Applied {
        let Some(ptr) = request.pointer() else {
            return match request {
                Request::Create { access, data } => self.create(session, access, data, rng),
                Request::Stats => {
                    let st = self.stats();
                    let me = session.account();
                    Reply::Stats(vec![
                        ("records".into(), st.records),
                        ("data_bytes".into(), st.data_bytes),
                        ("identities".into(), st.accounts),
                        ("watches".into(), st.watches),
                        ("your_records".into(), me.records()),
                        ("your_bytes".into(), me.bytes()),
                    ])
                    .into()
                }
                _ => Reply::Hello(self.hello(session)).into(),
            };
        };
        let transfer_to = match &request {
            Request::Transfer { to, .. } => Some(match *to {
                NewOwner::Identity(id) => id,
                NewOwner::Ip(ip) => self.identity_of(ip),
            }),
            _ => None,
        };
        let mut released = Released::new();
        let (applied, retired) = {
            let (mut guard, at) = self.locate_at(ptr.get(), at);
            let shard = &mut *guard;
            let me = &session.account;
            // One lookup: the decision and its application use the same slot.
            let slot = shard.records.find_at(ptr.get(), at);
            let view = slot.map(|s| {
                let r = shard.records.at(s);
                RecordView {
                    owned_by_caller: Arc::ptr_eq(r.owner, me),
                    access: r.access,
                    version: r.version,
                    size: r.data.len() as u64,
                }
            });
            let decision = rules::decide(
                &request,
                view.as_ref(),
                me.identity(),
                transfer_to.as_ref(),
                &self.config,
            );
            let applied = self.carry_out(
                shard,
                session,
                xid,
                ptr,
                slot,
                decision,
                request,
                now,
                &mut released,
                sink,
            );
            (applied, shard.records.take_retired())
        };
        self.prune_released(released);
        self.retire(retired);
        applied
    }

    fn create(
        &self,
        session: &Session,
        access: Access,
        data: Bytes,
        rng: &mut dyn RngCore,
    ) -> Applied {
        let cfg = &self.config;
        let me = &session.account;
        if let Err(reply) = rules::decide_create(data.len() as u64, cfg) {
            return reply.into();
        }
        let charge = Usage {
            records: 1,
            bytes: data.len() as u64,
        };
        if let Err(kind) = me.charge(charge, cfg) {
            return kind.reply(cfg).into();
        }
        let data = Data::from_bytes(data, own);
        // Any shard will do: spread them. The pointer says where the record went.
        let i = rng.next_u32() as usize % self.shards.len();
        let mut shard = self.lock_shard(i);
        shard.data_bytes += data.len() as u64;
        let ptr = shard.records.create(Record {
            ptr: 0,
            data,
            version: 1,
            owner: me.clone(),
            access,
        });
        Reply::Created(Pointer::new(ptr).expect("created pointers are never 0")).into()
    }

    /// Applies a decision to the record, under its shard's lock.
    #[allow(clippy::too_many_arguments)]
    fn carry_out(
        &self,
        shard: &mut Shard,
        session: &mut Session,
        xid: u32,
        ptr: Pointer,
        slot: Option<u32>,
        decision: Decision,
        request: Request,
        now: Instant,
        released: &mut Released,
        sink: &mut dyn FnMut(&[u8]) -> bool,
    ) -> Applied {
        let cfg = &self.config;
        let key = ptr.get();
        let decided = || slot.expect("decided on it");
        match decision {
            Decision::Missing => Applied::missing(),
            Decision::Answer(reply) => reply.into(),
            Decision::Read { start, end } => {
                let rec = shard.records.at(decided());
                let (start, end) = (start as usize, end as usize);
                if sink(&rec.data.as_slice()[start..end]) {
                    Applied {
                        sent: true,
                        ..Reply::Data(Bytes::new()).into()
                    }
                } else {
                    Reply::Data(rec.data.slice(start, end)).into()
                }
            }
            Decision::Info(info) => Reply::Info(info).into(),
            Decision::Write(w) => {
                // Only a change of size is the payer's business: a write of the same
                // size (the common case) looks up no payer and takes no atomic
                // operation on its account.
                if w.bytes_delta != 0 {
                    let payer = shard.payer(key, decided());
                    let change = Usage {
                        records: 0,
                        bytes: w.bytes_delta.unsigned_abs(),
                    };
                    if w.bytes_delta > 0 {
                        if let Err(kind) = payer.charge(change, cfg) {
                            return kind.reply(cfg).into();
                        }
                    } else {
                        payer.release(change);
                    }
                }
                let data = match request {
                    Request::Replace { data, .. }
                    | Request::ReplaceIf { data, .. }
                    | Request::WriteAt { data, .. } => data,
                    _ => unreachable!("only writes decide a write"),
                };
                let offset = match w.kind {
                    WriteKind::Replace => 0,
                    WriteKind::At(off) => off,
                };
                // Data watches get the written bytes (shared, not copied); without
                // watchers nothing is built.
                let notifications = if shard.watches.contains_key(&key) {
                    let delta = Delta {
                        base: w.new_version - 1,
                        size: w.new_size,
                        ranges: vec![(offset, data.clone())],
                    };
                    shard.notify_change(ptr, w.new_version, delta)
                } else {
                    Vec::new()
                };
                let s = decided();
                match w.kind {
                    WriteKind::Replace => shard.records.set_data(s, Data::from_bytes(data, own)),
                    WriteKind::At(off) => shard.records.patch(s, off as usize, &data),
                }
                shard.records.set_version(s, w.new_version);
                shard.data_bytes = (shard.data_bytes as i64 + w.bytes_delta) as u64;
                Applied::notifying(Reply::Written(w.new_version), notifications)
            }
            Decision::SetAccess(access) => {
                let s = decided();
                shard.records.set_access(s, access);
                let version = shard.records.at(s).version;
                Applied::notifying(
                    Reply::Done,
                    shard.notify(ptr, Event::AccessChanged, version),
                )
            }
            Decision::Delete => {
                let mut notifications = Vec::new();
                shard.remove_record(ptr, decided(), &mut notifications, released);
                Applied::notifying(Reply::Done, notifications)
            }
            Decision::TakeOver => {
                let taker = session.account.clone();
                self.change_owner(shard, ptr, decided(), taker, true, now, released)
            }
            Decision::Transfer(to) => {
                // Lock order: shard, then registry (reap and connect never hold the
                // registry while taking a shard).
                let new_owner = Self::account_for(&mut self.registry(), to);
                self.change_owner(shard, ptr, decided(), new_owner, false, now, released)
            }
            Decision::Watch(state) => {
                let already = session.watches.contains_key(&ptr);
                if let Err(reply) = rules::admit_watch(session.watches.len(), already, cfg) {
                    return reply.into();
                }
                let data = matches!(request, Request::Watch { options, .. } if options.data);
                let conn = session.conn;
                let list = shard.watches.entry(key).or_default();
                match list.iter_mut().find(|w| w.conn == conn) {
                    Some(w) => {
                        w.xid = xid;
                        w.data = data;
                    }
                    None => list.push(Watcher { conn, xid, data }),
                }
                session.watches.insert(ptr, xid);
                match state {
                    None => Reply::Done.into(),
                    // The state and (for a data watch) the bytes, read under the same
                    // lock as the registration: every later change is notified.
                    Some(info) => {
                        let bytes = if data {
                            let rec = shard.records.at(decided());
                            rec.data.slice(0, rec.data.len())
                        } else {
                            Bytes::new()
                        };
                        Reply::Watching(info, bytes).into()
                    }
                }
            }
            Decision::Unwatch => {
                if session.watches.remove(&ptr).is_none() {
                    return rules::no_such_watch().into();
                }
                if let Some(list) = shard.watches.get_mut(&key) {
                    list.retain(|w| w.conn != session.conn);
                    if list.is_empty() {
                        shard.watches.remove(&key);
                    }
                }
                Reply::Done.into()
            }
        }
    }

    /// Gives the record a new owner. TAKEOVER (`takeover`): the taker pays and the
    /// TAKEOVER bit is cleared. TRANSFER: the new owner pays if it is connected, else
    /// the payer so far keeps paying until it connects ([`rules::payer_after_transfer`]),
    /// and the record's own orphan grace starts now.
    #[allow(clippy::too_many_arguments)]
    fn change_owner(
        &self,
        shard: &mut Shard,
        ptr: Pointer,
        s: u32,
        new_owner: Arc<Account>,
        takeover: bool,
        now: Instant,
        released: &mut Released,
    ) -> Applied {
        let cfg = &self.config;
        let key = ptr.get();
        let rec = shard.records.at(s);
        let charge = Usage {
            records: 1,
            bytes: rec.data.len() as u64,
        };
        let old_owner = rec.owner.clone();
        let old_payer = shard.payers.get(&key).unwrap_or(rec.owner).clone();
        let (payer, offline_generation) = {
            let mut st = new_owner.lock_state();
            let connected = st.connections > 0;
            let payer = if takeover {
                Payer::NewOwner
            } else {
                rules::payer_after_transfer(connected)
            };
            if payer == Payer::Unchanged {
                // Under the receiver's state lock, so that a connect either sees this
                // record parked or happened before and made the receiver pay.
                st.parked.insert(key);
            }
            (payer, (!connected).then_some(st.generation))
        };
        if payer == Payer::NewOwner {
            // (A parked record taken over by the one who pays for it: nothing moves.)
            if !Arc::ptr_eq(&new_owner, &old_payer) {
                if let Err(kind) = new_owner.charge(charge, cfg) {
                    return kind.reply(cfg).into();
                }
                old_payer.release(charge);
            }
            shard.payers.remove(&key);
        } else {
            shard.payers.insert(key, old_payer.clone());
        }
        // The old owner no longer has this record parked with it (if it had).
        old_owner.lock_state().parked.remove(&key);
        if takeover {
            let access = shard.records.at(s).access - Access::TAKEOVER;
            shard.records.set_access(s, access);
        }
        shard.records.set_owner(s, new_owner);
        let version = shard.records.at(s).version;
        shard.clear_deadline(key);
        if let Some(generation) = offline_generation.filter(|_| !takeover) {
            let d = now + cfg.orphan_grace;
            shard.transfer_deadline.insert(key, (d, generation));
            shard.transfer_order.insert((d, key));
        }
        released.push(old_owner);
        released.push(old_payer);
        Applied::notifying(Reply::Done, shard.notify(ptr, Event::OwnerChanged, version))
    }
}

impl Shard {
    fn new(records: Records) -> Shard {
        Shard {
            records,
            data_bytes: 0,
            watches: PtrMap::default(),
            transfer_deadline: PtrMap::default(),
            transfer_order: BTreeSet::new(),
            payers: PtrMap::default(),
        }
    }

    /// Who pays for a record: its owner, unless it is parked.
    fn payer(&self, key: u64, slot: u32) -> &Arc<Account> {
        match self.payers.get(&key) {
            Some(p) => p,
            None => self.records.at(slot).owner,
        }
    }

    fn notify(&self, ptr: Pointer, event: Event, version: Version) -> Vec<Notification> {
        match self.watches.get(&ptr.get()) {
            None => Vec::new(),
            Some(list) => list
                .iter()
                .map(|w| Notification::new(w.conn, w.xid, event, ptr, version))
                .collect(),
        }
    }

    /// "Changed" for every watcher; data watchers also get the bytes.
    fn notify_change(&self, ptr: Pointer, version: Version, delta: Delta) -> Vec<Notification> {
        match self.watches.get(&ptr.get()) {
            None => Vec::new(),
            Some(list) => list
                .iter()
                .map(|w| Notification {
                    delta: w.data.then(|| delta.clone()),
                    ..Notification::new(w.conn, w.xid, Event::Changed, ptr, version)
                })
                .collect(),
        }
    }

    fn clear_deadline(&mut self, ptr: u64) {
        if let Some((d, _)) = self.transfer_deadline.remove(&ptr) {
            self.transfer_order.remove(&(d, ptr));
        }
    }

    /// Takes record `ptr`, in `slot`, out.
    fn remove_record(
        &mut self,
        ptr: Pointer,
        slot: u32,
        notifications: &mut Vec<Notification>,
        released: &mut Released,
    ) {
        let key = ptr.get();
        let rec = self.records.remove_at(slot);
        let charge = Usage {
            records: 1,
            bytes: rec.data.len() as u64,
        };
        match self.payers.remove(&key) {
            Some(payer) => {
                payer.release(charge);
                rec.owner.lock_state().parked.remove(&key);
                released.push(payer);
            }
            None => rec.owner.release(charge),
        }
        self.data_bytes -= rec.data.len() as u64;
        self.clear_deadline(key);
        if let Some(list) = self.watches.remove(&key) {
            notifications.extend(
                list.into_iter()
                    .map(|w| Notification::new(w.conn, w.xid, Event::Deleted, ptr, rec.version)),
            );
        }
        released.push(rec.owner);
        if let Data::Shared(b) = rec.data {
            self.records.retire(b);
        }
    }
}

/// Loads records from a snapshot: see [`Store::restore`].
#[derive(Debug)]
pub struct Restore<'a> {
    store: &'a Store,
    owners: HashSet<Identity>,
    records: u64,
    bytes: u64,
}

impl Restore<'_> {
    /// Adds one record: charged to its payer (even past the quota: the snapshot is
    /// what was stored), parked with its owner when someone else pays. Refuses a
    /// pointer that is already there.
    pub fn add(&mut self, r: SnapshotRecord) -> Result<(), String> {
        let store = self.store;
        let (owner, payer) = {
            let mut reg = store.registry();
            let owner = Store::account_for(&mut reg, r.owner);
            let payer = r.payer.map(|p| Store::account_for(&mut reg, p));
            (owner, payer)
        };
        let key = r.ptr.get();
        let size = r.data.len() as u64;
        let mut shard = store.shard(key);
        if shard.records.contains_key(key) {
            return Err(format!("record {} appears twice", r.ptr));
        }
        let charge = Usage {
            records: 1,
            bytes: size,
        };
        match payer {
            Some(p) => {
                p.charge_over_quota(charge);
                owner.lock_state().parked.insert(key);
                shard.payers.insert(key, p);
            }
            None => owner.charge_over_quota(charge),
        }
        shard.data_bytes += size;
        shard.records.insert_foreign(Record {
            ptr: key,
            version: r.version,
            owner,
            access: r.access,
            data: Data::from_bytes(r.data, own),
        });
        self.owners.insert(r.owner);
        self.records += 1;
        self.bytes += size;
        Ok(())
    }

    /// Ends the load: every identity that owns records is disconnected, so its
    /// records start their orphan grace at `now` (an owner that reconnects within it
    /// keeps everything). Returns the records and bytes loaded.
    pub fn finish(self, now: Instant) -> (u64, u64) {
        let deadline = now + self.store.config.orphan_grace;
        let mut reg = self.store.registry();
        for id in &self.owners {
            let Some(a) = reg.accounts.get(id).cloned() else {
                continue;
            };
            let mut st = a.lock_state();
            if st.connections == 0 && st.offline_deadline.is_none() {
                st.offline_deadline = Some(deadline);
                reg.offline.insert((deadline, *id));
            }
        }
        (self.records, self.bytes)
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
