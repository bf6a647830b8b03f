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
//!    operation as committed (`ns:{r:PTR}:op:OPID`, kept an hour).
//! 3. **Settle**: each entry is removed, applying the noted releases. (If the commit
//!    did not happen, the charges are undone instead.)
//!
//! A gateway that dies between the steps leaves entries behind. They are **repaired**
//! by whoever next touches that identity's quota (or reaps it), once their deadline
//! has passed: the marker says whether the commit happened (settle) or not (undo), and
//! after the deadline the fence guarantees the answer cannot change any more.
//!
//! Each gateway caches the quota hashes it uses and serialises its own changes to one
//! identity, so its compare-and-sets conflict only with other gateways'.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use netswap_proto::rules::{self, QuotaKind, Usage};
use netswap_proto::{Identity, Pointer, StoreConfig};
use redis::Value;
use redis::cluster_async::ClusterConnection;

use super::keys::Keys;
use super::redis_io::{as_bytes, run};
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
#[derive(Debug)]
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
    states: Mutex<HashMap<Identity, Arc<tokio::sync::Mutex<State>>>>,
}

/// How a change to the cached state is written back.
struct Edit {
    set: Vec<(String, Vec<u8>)>,
    del: Vec<String>,
}

impl QuotaBook {
    pub fn new(keys: Keys) -> QuotaBook {
        QuotaBook {
            keys,
            states: Mutex::default(),
        }
    }

    fn state(&self, id: &Identity) -> Arc<tokio::sync::Mutex<State>> {
        self.states
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(*id)
            .or_default()
            .clone()
    }

    /// Forgets cached states nobody is using (identities made up by the thousand
    /// must not grow the gateway).
    pub fn forget_unused(&self, keep: impl Fn(&Identity) -> bool) {
        self.states
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|id, s| Arc::strong_count(s) > 1 || keep(id));
    }

    /// Applies `decide` to the identity's state and writes the result with a
    /// compare-and-set, deciding again on a fresh state when another gateway changed
    /// it meanwhile.
    async fn update<T>(
        &self,
        redis: &ClusterConnection,
        id: &Identity,
        mut decide: impl FnMut(&mut State) -> Result<(Edit, T), QuotaError>,
    ) -> Result<T, QuotaError> {
        let cell = self.state(id);
        let mut st = cell.lock().await;
        let keys = self.keys.identity(id);
        loop {
            if !st.loaded {
                let v = redis::cmd("HGETALL")
                    .arg(&keys.quota)
                    .query_async::<Value>(&mut redis.clone())
                    .await?;
                st.load(&flatten(v));
            }
            let before = (st.rev.clone(), st.used, st.pending.clone());
            let (edit, out) = match decide(&mut st) {
                Ok(x) => x,
                Err(e) => {
                    (st.rev, st.used, st.pending) = before;
                    return Err(e);
                }
            };
            let next = (st.rev.parse::<u64>().unwrap_or(0) + 1).to_string();
            let mut set = edit.set;
            set.push(("n".into(), st.used.records.to_string().into_bytes()));
            set.push(("b".into(), st.used.bytes.to_string().into_bytes()));
            let n = set.len().to_string();
            let k = edit.del.len().to_string();
            let mut args: Vec<&[u8]> = vec![before.0.as_bytes(), next.as_bytes(), n.as_bytes()];
            for (f, v) in &set {
                args.push(f.as_bytes());
                args.push(v);
            }
            args.push(k.as_bytes());
            for f in &edit.del {
                args.push(f.as_bytes());
            }
            let v = run(redis, &scripts::CAS, &[&keys.quota], &args).await;
            match v {
                Ok(Value::Array(items))
                    if items.first().and_then(super::redis_io::as_int) == Some(1) =>
                {
                    st.rev = next;
                    return Ok(out);
                }
                Ok(Value::Array(items)) if items.len() == 2 => {
                    // Another gateway changed it: decide again on what it holds now.
                    st.load(&flatten(items[1].clone()));
                }
                Ok(other) => {
                    st.loaded = false;
                    return Err(QuotaError::Redis(redis::RedisError::from((
                        redis::ErrorKind::Parse,
                        "unexpected reply from Redis",
                        format!("CAS gave {other:?}"),
                    ))));
                }
                Err(e) => {
                    st.loaded = false;
                    return Err(e.into());
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
        self.repair(redis, id, now).await?;
        self.update(redis, id, |st| {
            st.used = if over_quota {
                Usage {
                    records: st.used.records + add.records,
                    bytes: st.used.bytes + add.bytes,
                }
            } else {
                rules::charge(st.used, add, cfg).map_err(QuotaError::Exceeded)?
            };
            let p = Pending {
                records: add.records,
                bytes: add.bytes,
                charge: true,
                deadline,
                ptr,
            };
            st.pending.insert(op.to_string(), p);
            Ok((
                Edit {
                    set: vec![(format!("p:{op}"), p.encode())],
                    del: vec![],
                },
                (),
            ))
        })
        .await
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
        self.update(redis, id, |st| {
            let p = Pending {
                records: back.records,
                bytes: back.bytes,
                charge: false,
                deadline,
                ptr,
            };
            st.pending.insert(op.to_string(), p);
            Ok((
                Edit {
                    set: vec![(format!("p:{op}"), p.encode())],
                    del: vec![],
                },
                (),
            ))
        })
        .await
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
        self.update(redis, id, |st| {
            let Some(p) = st.pending.remove(op) else {
                // Already settled (by a repair pass elsewhere).
                return Ok((
                    Edit {
                        set: vec![],
                        del: vec![],
                    },
                    (),
                ));
            };
            if p.charge != committed {
                // A release that committed, or a charge that did not.
                st.used = rules::release(st.used, p.usage());
            }
            Ok((
                Edit {
                    set: vec![],
                    del: vec![format!("p:{op}")],
                },
                (),
            ))
        })
        .await
    }

    /// Settles every entry of `id` whose deadline has passed by `now`, asking the
    /// record's slot whether its commit happened.
    pub async fn repair(
        &self,
        redis: &ClusterConnection,
        id: &Identity,
        now: u64,
    ) -> Result<(), QuotaError> {
        let stale: Vec<(String, Pending)> = {
            let cell = self.state(id);
            let mut st = cell.lock().await;
            if !st.loaded {
                let v = redis::cmd("HGETALL")
                    .arg(self.keys.identity(id).quota)
                    .query_async::<Value>(&mut redis.clone())
                    .await?;
                st.load(&flatten(v));
            }
            st.pending
                .iter()
                // A second of margin past the fence: a commit that started before it
                // has finished.
                .filter(|(_, p)| p.deadline + 1000 < now)
                .map(|(k, p)| (k.clone(), *p))
                .collect()
        };
        for (op, p) in stale {
            let marker = self.keys.record(p.ptr).op(&op);
            let committed: bool = redis::cmd("EXISTS")
                .arg(&marker)
                .query_async::<i64>(&mut redis.clone())
                .await?
                == 1;
            tracing::info!(identity = %id, op, committed, "repairing a quota charge left by an interrupted change");
            self.settle(redis, id, &op, committed).await?;
        }
        Ok(())
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
