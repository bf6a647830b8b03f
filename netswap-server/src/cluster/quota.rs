//! Quotas across hash slots. A record and the identities that pay for it live in
//! different slots, so a change that moves a charge cannot be one atomic step. It is
//! **reserve, commit, settle**:
//!
//! 1. **Reserve**: each affected identity gets a pending entry `p:OPID` in its quota
//!    hash (compare-and-set on the hash's revision). A charge (positive) is decided by
//!    [`rules::charge`] and applied at once, so concurrent changes cannot both fit in
//!    the same room; a release (negative) is only noted.
//! 2. **Commit** the record change, fenced: it carries the entries' deadline and the
//!    operation id, and the commit script refuses after the deadline and marks the
//!    operation as committed (field `m:OPID` of the record's state hash; a deleted
//!    record's hash stays as a tombstone of its markers).
//! 3. **Settle**: each entry is removed, applying the noted releases. (If the commit
//!    did not happen, the charges are undone instead.) Then the marker goes.
//!
//! A gateway that dies between the steps leaves entries behind. They are **repaired**
//! by whoever next touches that identity's quota (or reaps it), once their deadline
//! has passed: the marker says whether the commit happened (settle) or not (undo), and
//! after the deadline the fence guarantees the answer cannot change any more.
//!
//! Each gateway caches the quota hashes it uses and serialises its own changes to one
//! identity, so its compare-and-sets conflict only with other gateways'. Changes that
//! queue up behind one in flight are written together, in one compare-and-set (group
//! commit): one identity's many concurrent creates and deletes cost a round trip per
//! group, not per change.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use netswap_proto::rules::{self, QuotaKind, Usage};
use netswap_proto::{Identity, Pointer, StoreConfig};
use redis::Value;
use redis::cluster_async::ClusterConnection;
use tokio::sync::oneshot;

use super::keys::Keys;
use super::lock;
use super::redis_io::{as_bytes, marker, run};
use super::scripts;

/// A change of an identity's charges, pending until settled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Pending {
    /// Records and bytes: added (already applied) or to give back (applied at settle).
    pub records: u64,
    pub bytes: u64,
    /// True: a charge, applied at reserve. False: a release, applied at settle.
    pub charge: bool,
    /// Redis time (ms) after which the change's commit is fenced off.
    pub deadline: u64,
    pub ptr: Pointer,
}

impl Pending {
    fn encode(&self) -> Vec<u8> {
        format!(
            "{}:{}:{}:{}:{}",
            self.records, self.bytes, self.charge as u8, self.deadline, self.ptr
        )
        .into_bytes()
    }

    fn decode(b: &[u8]) -> Option<Pending> {
        let s = std::str::from_utf8(b).ok()?;
        let mut it = s.split(':');
        let p = Pending {
            records: it.next()?.parse().ok()?,
            bytes: it.next()?.parse().ok()?,
            charge: it.next()? == "1",
            deadline: it.next()?.parse().ok()?,
            ptr: it.next()?.parse().ok()?,
        };
        it.next().is_none().then_some(p)
    }

    fn usage(&self) -> Usage {
        Usage {
            records: self.records,
            bytes: self.bytes,
        }
    }
}

/// An identity's quota hash as this gateway last saw it.
#[derive(Debug, Default)]
struct State {
    loaded: bool,
    rev: String,
    used: Usage,
    pending: HashMap<String, Pending>,
}

impl State {
    fn load(&mut self, fields: &[Value]) {
        *self = State {
            loaded: true,
            ..State::default()
        };
        for pair in fields.chunks(2) {
            let (Some(k), Some(v)) = (
                pair.first().and_then(as_bytes),
                pair.get(1).and_then(as_bytes),
            ) else {
                continue;
            };
            let num = || {
                std::str::from_utf8(v)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0)
            };
            match k {
                b"r" => self.rev = String::from_utf8_lossy(v).into_owned(),
                b"n" => self.used.records = num(),
                b"b" => self.used.bytes = num(),
                _ if k.starts_with(b"p:") => {
                    if let Some(p) = Pending::decode(v) {
                        self.pending
                            .insert(String::from_utf8_lossy(&k[2..]).into_owned(), p);
                    }
                }
                _ => {}
            }
        }
    }
}

/// What a quota operation could not do.
#[derive(Clone, Debug)]
pub(crate) enum QuotaError {
    Exceeded(QuotaKind),
    Redis(redis::RedisError),
}

impl From<redis::RedisError> for QuotaError {
    fn from(e: redis::RedisError) -> Self {
        QuotaError::Redis(e)
    }
}

/// The quota hashes of identities this gateway is changing, each behind its own lock.
#[derive(Debug)]
pub(crate) struct QuotaBook {
    keys: Keys,
    states: Mutex<HashMap<Identity, Arc<Cell>>>,
    /// Compare-and-sets written, and the changes they carried.
    pub writes: AtomicU64,
    pub changes: AtomicU64,
}

/// One identity's quota hash as this gateway knows it, and the changes waiting to be
/// written to it.
#[derive(Debug, Default)]
struct Cell {
    state: tokio::sync::Mutex<State>,
    queue: Mutex<Vec<Job>>,
}

/// A change to an identity's quota hash: decided on the state as it is when its group
/// is written (again on a fresh state if another gateway changed it meanwhile). It
/// changes `pending` only when it succeeds.
type Decide = Box<dyn FnMut(&mut State) -> Result<Edit, QuotaError> + Send>;

struct Job {
    decide: Decide,
    /// Redis time (ms) of a reservation: entries whose deadline has passed by then are
    /// repaired before the group is decided (see [`QuotaBook::repair`]).
    repair_at: Option<u64>,
    done: oneshot::Sender<Result<(), QuotaError>>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Job")
    }
}

/// How a change to the cached state is written back.
#[derive(Default)]
struct Edit {
    set: Vec<(String, Vec<u8>)>,
    del: Vec<String>,
}

impl Edit {
    /// `other` after `self`: a field set and then deleted is deleted, and the other
    /// way round.
    fn then(&mut self, other: Edit) {
        for (f, v) in other.set {
            self.del.retain(|d| *d != f);
            self.set.retain(|(s, _)| *s != f);
            self.set.push((f, v));
        }
        for f in other.del {
            self.set.retain(|(s, _)| *s != f);
            if !self.del.contains(&f) {
                self.del.push(f);
            }
        }
    }
}

impl QuotaBook {
    pub fn new(keys: Keys) -> QuotaBook {
        QuotaBook {
            keys,
            states: Mutex::default(),
            writes: AtomicU64::new(0),
            changes: AtomicU64::new(0),
        }
    }

    fn state(&self, id: &Identity) -> Arc<Cell> {
        lock(&self.states).entry(*id).or_default().clone()
    }

    /// Forgets cached states nobody is using but those `keep` keeps (identities made
    /// up by the thousand must not grow the gateway). A walk over every state: for
    /// the periodic sweep, not for each connection that closes.
    pub fn forget_unused(&self, keep: impl Fn(&Identity) -> bool) {
        lock(&self.states).retain(|id, s| Arc::strong_count(s) > 1 || keep(id));
    }

    /// Forgets `id`'s cached state if nobody is using it.
    pub fn forget(&self, id: &Identity) {
        let mut states = lock(&self.states);
        if states.get(id).is_some_and(|s| Arc::strong_count(s) == 1) {
            states.remove(id);
        }
    }

    /// Applies `decide` to the identity's state and writes the result with a
    /// compare-and-set, deciding again on a fresh state when another gateway changed
    /// it meanwhile. Changes to one identity wait for the one being written; the
    /// first of them to get its turn writes all that waited, in order, in one
    /// compare-and-set (each is decided on the state the ones before it left, and one
    /// that fails, e.g. over quota, leaves it as it was).
    async fn update(
        &self,
        redis: &ClusterConnection,
        id: &Identity,
        decide: Decide,
        repair_at: Option<u64>,
    ) -> Result<(), QuotaError> {
        let cell = self.state(id);
        let (done, result) = oneshot::channel();
        lock(&cell.queue).push(Job {
            decide,
            repair_at,
            done,
        });
        {
            let mut st = cell.state.lock().await;
            let jobs = std::mem::take(&mut *lock(&cell.queue));
            // Empty: a change that got its turn earlier wrote this one with its own.
            if !jobs.is_empty() {
                self.write_group(redis, id, &mut st, jobs).await;
            }
        }
        result.await.unwrap_or_else(|_| {
            Err(QuotaError::Redis(redis::RedisError::from((
                redis::ErrorKind::Io,
                "a quota change was dropped before it was written",
            ))))
        })
    }

    /// Writes `jobs` (see [`QuotaBook::update`]) and tells each how it went.
    async fn write_group(
        &self,
        redis: &ClusterConnection,
        id: &Identity,
        st: &mut State,
        mut jobs: Vec<Job>,
    ) {
        let keys = self.keys.identity(id);
        loop {
            // Whether the state was read from Redis for this group (else remembered).
            let fresh = !st.loaded;
            if !st.loaded {
                match redis::cmd("HGETALL")
                    .arg(&keys.quota)
                    .query_async::<Value>(&mut redis.clone())
                    .await
                {
                    Ok(v) => st.load(&flatten(v)),
                    Err(e) => return tell(jobs, &Err(QuotaError::Redis(e))),
                }
            }
            let rev = st.rev.clone();
            let mut edit = Edit::default();
            // Entries of interrupted changes first, so that they do not keep using room.
            if let Some(now) = jobs.iter().filter_map(|j| j.repair_at).max()
                && let Err(e) = self.repair_stale(redis, id, st, now, &mut edit).await
            {
                st.loaded = false;
                return tell(jobs, &Err(e));
            }
            let mut outcomes = Vec::with_capacity(jobs.len());
            for job in &mut jobs {
                let used = st.used;
                match (job.decide)(st) {
                    Ok(e) => {
                        edit.then(e);
                        outcomes.push(Ok(()));
                    }
                    Err(e) => {
                        st.used = used;
                        outcomes.push(Err(e));
                    }
                }
            }
            if !fresh && outcomes.iter().any(Result::is_err) {
                // Refused on a remembered state: other gateways may have given room
                // back since (a refusal writes nothing, so no compare-and-set would
                // find out). Decide again on the state as it is now.
                st.loaded = false;
                continue;
            }
            if edit.set.is_empty() && edit.del.is_empty() {
                // Nothing to write (refused, or settled already).
                for (job, outcome) in jobs.into_iter().zip(outcomes) {
                    let _ = job.done.send(outcome);
                }
                return;
            }
            let next = (rev.parse::<u64>().unwrap_or(0) + 1).to_string();
            let mut set = edit.set;
            set.push(("n".into(), st.used.records.to_string().into_bytes()));
            set.push(("b".into(), st.used.bytes.to_string().into_bytes()));
            let n = set.len().to_string();
            let k = edit.del.len().to_string();
            let mut args: Vec<&[u8]> = vec![rev.as_bytes(), next.as_bytes(), n.as_bytes()];
            for (f, v) in &set {
                args.push(f.as_bytes());
                args.push(v);
            }
            args.push(k.as_bytes());
            for f in &edit.del {
                args.push(f.as_bytes());
            }
            self.writes.fetch_add(1, Ordering::Relaxed);
            // The state now holds the group's decisions, which Redis may or may not
            // get: until it says, the next writer must read the hash again (also when
            // this future is dropped mid-way).
            st.loaded = false;
            let v = run(redis, &scripts::CAS, &[&keys.quota], &args).await;
            match v {
                Ok(Value::Array(items))
                    if items.first().and_then(super::redis_io::as_int) == Some(1) =>
                {
                    st.loaded = true;
                    st.rev = next;
                    self.changes.fetch_add(jobs.len() as u64, Ordering::Relaxed);
                    for (job, outcome) in jobs.into_iter().zip(outcomes) {
                        let _ = job.done.send(outcome);
                    }
                    return;
                }
                Ok(Value::Array(items)) if items.len() == 2 => {
                    // Another gateway changed it: decide again on what it holds now.
                    st.load(&flatten(items[1].clone()));
                }
                Ok(other) => {
                    st.loaded = false;
                    let e = redis::RedisError::from((
                        redis::ErrorKind::Parse,
                        "unexpected reply from Redis",
                        format!("CAS gave {other:?}"),
                    ));
                    return tell(jobs, &Err(QuotaError::Redis(e)));
                }
                Err(e) => {
                    st.loaded = false;
                    return tell(jobs, &Err(QuotaError::Redis(e)));
                }
            }
        }
    }

    /// Reserves a charge of `add` for operation `op` (checked against the quota with
    /// [`rules::charge`] unless `over_quota`: a parked record's charge moving to its
    /// owner). Repairs stale entries first, so a crashed gateway's reservations do
    /// not keep using the room.
    #[allow(clippy::too_many_arguments)]
    pub async fn reserve(
        &self,
        redis: &ClusterConnection,
        cfg: &StoreConfig,
        id: &Identity,
        op: &str,
        ptr: Pointer,
        add: Usage,
        deadline: u64,
        over_quota: bool,
        now: u64,
    ) -> Result<(), QuotaError> {
        let (cfg, op) = (cfg.clone(), op.to_string());
        let decide = move |st: &mut State| {
            st.used = if over_quota {
                Usage {
                    records: st.used.records + add.records,
                    bytes: st.used.bytes + add.bytes,
                }
            } else {
                rules::charge(st.used, add, &cfg).map_err(QuotaError::Exceeded)?
            };
            let p = Pending {
                records: add.records,
                bytes: add.bytes,
                charge: true,
                deadline,
                ptr,
            };
            st.pending.insert(op.clone(), p);
            Ok(Edit {
                set: vec![(format!("p:{op}"), p.encode())],
                del: vec![],
            })
        };
        self.update(redis, id, Box::new(decide), Some(now)).await
    }

    /// Notes a release of `back` for operation `op`, applied when it settles.
    pub async fn note_release(
        &self,
        redis: &ClusterConnection,
        id: &Identity,
        op: &str,
        ptr: Pointer,
        back: Usage,
        deadline: u64,
    ) -> Result<(), QuotaError> {
        let op = op.to_string();
        let decide = move |st: &mut State| {
            let p = Pending {
                records: back.records,
                bytes: back.bytes,
                charge: false,
                deadline,
                ptr,
            };
            st.pending.insert(op.clone(), p);
            Ok(Edit {
                set: vec![(format!("p:{op}"), p.encode())],
                del: vec![],
            })
        };
        self.update(redis, id, Box::new(decide), None).await
    }

    /// Operation `op` committed (`true`) or never will (`false`): removes its entry,
    /// applying a noted release, or undoing a charge.
    pub async fn settle(
        &self,
        redis: &ClusterConnection,
        id: &Identity,
        op: &str,
        committed: bool,
    ) -> Result<(), QuotaError> {
        let op = op.to_string();
        let decide = move |st: &mut State| {
            let Some(p) = st.pending.remove(&op) else {
                // Already settled (by a repair pass elsewhere): nothing to write.
                return Ok(Edit::default());
            };
            if p.charge != committed {
                // A release that committed, or a charge that did not.
                st.used = rules::release(st.used, p.usage());
            }
            Ok(Edit {
                set: vec![],
                del: vec![format!("p:{op}")],
            })
        };
        self.update(redis, id, Box::new(decide), None).await
    }

    /// Settles every entry of `id` whose deadline has passed by `now`, asking the
    /// record's slot whether its commit happened (the reaper's pass; a reservation
    /// does the same with its group, [`QuotaBook::update`]).
    pub async fn repair(
        &self,
        redis: &ClusterConnection,
        id: &Identity,
        now: u64,
    ) -> Result<(), QuotaError> {
        self.update(
            redis,
            id,
            Box::new(|_: &mut State| Ok(Edit::default())),
            Some(now),
        )
        .await
    }

    /// Settles, in `st` and `edit`, the entries whose deadline has passed by `now`: the
    /// marker of the operation says whether its commit happened, and after the
    /// deadline (and a second of margin: a commit that started before it has finished)
    /// the fence guarantees that cannot change any more.
    async fn repair_stale(
        &self,
        redis: &ClusterConnection,
        id: &Identity,
        st: &mut State,
        now: u64,
        edit: &mut Edit,
    ) -> Result<(), QuotaError> {
        let stale: Vec<(String, Pending)> = st
            .pending
            .iter()
            .filter(|(_, p)| p.deadline + 1000 < now)
            .map(|(k, p)| (k.clone(), *p))
            .collect();
        for (op, p) in stale {
            let committed: bool = redis::cmd("HEXISTS")
                .arg(&self.keys.record(p.ptr).meta)
                .arg(marker(&op))
                .query_async::<i64>(&mut redis.clone())
                .await?
                == 1;
            tracing::info!(identity = %id, op, committed, "repairing a quota charge left by an interrupted change");
            st.pending.remove(&op);
            if p.charge != committed {
                st.used = rules::release(st.used, p.usage());
            }
            edit.then(Edit {
                set: vec![],
                del: vec![format!("p:{op}")],
            });
        }
        Ok(())
    }
}

/// Tells every job of a group the same outcome.
fn tell(jobs: Vec<Job>, outcome: &Result<(), QuotaError>) {
    for job in jobs {
        let _ = job.done.send(outcome.clone());
    }
}

/// HGETALL's reply as a flat list of fields and values (RESP2 array or RESP3 map).
fn flatten(v: Value) -> Vec<Value> {
    match v {
        Value::Array(items) => items,
        Value::Map(pairs) => pairs.into_iter().flat_map(|(k, v)| [k, v]).collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_nobody_uses_are_forgotten_one_by_one_or_all_but_those_kept() {
        let book = QuotaBook::new(Keys::new("t"));
        let id = |n: u8| Identity([n; 32]);
        let held = book.state(&id(1));
        for n in 2..=4 {
            book.state(&id(n));
        }
        let known = || {
            let mut v: Vec<u8> = lock(&book.states).keys().map(|i| i.0[0]).collect();
            v.sort();
            v
        };
        assert_eq!(known(), [1, 2, 3, 4]);
        book.forget(&id(1));
        book.forget(&id(2));
        assert_eq!(known(), [1, 3, 4], "1 is in use");
        book.forget_unused(|i| *i == id(3));
        assert_eq!(known(), [1, 3], "1 in use, 3 kept");
        drop(held);
        book.forget_unused(|_| false);
        assert!(known().is_empty());
    }

    #[test]
    fn edits_of_one_group_combine_in_order() {
        let set = |f: &str| Edit {
            set: vec![(f.to_string(), b"1".to_vec())],
            del: vec![],
        };
        let del = |f: &str| Edit {
            set: vec![],
            del: vec![f.to_string()],
        };
        let mut e = Edit::default();
        for x in [
            set("p:a"),
            set("p:b"),
            del("p:a"),
            del("p:c"),
            set("p:c"),
            del("p:c"),
        ] {
            e.then(x);
        }
        assert_eq!(e.set, vec![("p:b".to_string(), b"1".to_vec())]);
        assert_eq!(e.del, vec!["p:a".to_string(), "p:c".to_string()]);
    }

    #[test]
    fn pending_entries_round_trip() {
        let p = Pending {
            records: 1,
            bytes: 1234,
            charge: false,
            deadline: 99,
            ptr: Pointer::new(0xfeed).unwrap(),
        };
        assert_eq!(Pending::decode(&p.encode()), Some(p));
        assert_eq!(Pending::decode(b"1:2:3"), None);
    }
}
