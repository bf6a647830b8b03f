//! Owner identities: one [`Account`] per identity, with its quota usage, its
//! connection count (which decides when its records become orphans) and the records
//! handed to it while it was away, still paid for by someone else.

use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crate::identity::Identity;
use crate::rules::{self, QuotaKind, Usage};
use crate::store::StoreConfig;

/// Everything the store knows about one identity. Records point at their owner's
/// account (8 bytes per record instead of a 32-byte identity), and quota usage is
/// counted here with atomics so that shards never share a lock on the write path.
#[derive(Debug)]
pub struct Account {
    identity: Identity,
    records: AtomicU64,
    bytes: AtomicU64,
    pub(crate) state: Mutex<AccountState>,
}

#[derive(Debug, Default)]
pub(crate) struct AccountState {
    /// Open connections of this identity.
    pub connections: u32,
    /// Bumped on every connect: deadlines set before it are void.
    pub generation: u64,
    /// When the identity's records expire (set when its last connection closes).
    pub offline_deadline: Option<Instant>,
    /// Records this identity owns but another identity pays for: handed to it while
    /// it had no connection. Their charge moves here when it connects.
    pub parked: HashSet<u64>,
}

impl Account {
    pub(crate) fn new(identity: Identity) -> Account {
        Account {
            identity,
            records: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            state: Mutex::new(AccountState::default()),
        }
    }

    /// The identity this account belongs to.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Records this identity pays for (its quota usage).
    pub fn records(&self) -> u64 {
        self.records.load(Ordering::Relaxed)
    }

    /// Data bytes this identity pays for (its quota usage).
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Open connections of this identity.
    pub fn connections(&self) -> u32 {
        self.lock_state().connections
    }

    pub(crate) fn lock_state(&self) -> std::sync::MutexGuard<'_, AccountState> {
        // A poisoned lock only means a panic elsewhere; the counters are still valid.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Charges `add` if the quotas allow it ([`rules::charge`]); all or nothing.
    pub(crate) fn charge(&self, add: Usage, cfg: &StoreConfig) -> Result<(), QuotaKind> {
        let one = |kind: QuotaKind, cell: &AtomicU64, n: u64| {
            if n == 0 {
                return Ok(());
            }
            cell.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                let (used, add) = match kind {
                    QuotaKind::Records => (
                        Usage {
                            records: v,
                            bytes: 0,
                        },
                        Usage {
                            records: n,
                            bytes: 0,
                        },
                    ),
                    QuotaKind::Bytes => (
                        Usage {
                            records: 0,
                            bytes: v,
                        },
                        Usage {
                            records: 0,
                            bytes: n,
                        },
                    ),
                };
                rules::charge(used, add, cfg).ok().map(|u| match kind {
                    QuotaKind::Records => u.records,
                    QuotaKind::Bytes => u.bytes,
                })
            })
            .map(|_| ())
            .map_err(|_| kind)
        };
        one(QuotaKind::Records, &self.records, add.records)?;
        if let Err(kind) = one(QuotaKind::Bytes, &self.bytes, add.bytes) {
            self.records.fetch_sub(add.records, Ordering::AcqRel);
            return Err(kind);
        }
        Ok(())
    }

    /// Charges `add` whatever the quota (a parked record's charge moving to its owner).
    pub(crate) fn charge_over_quota(&self, add: Usage) {
        self.records.fetch_add(add.records, Ordering::AcqRel);
        self.bytes.fetch_add(add.bytes, Ordering::AcqRel);
    }

    /// Gives back what [`Account::charge`] took.
    pub(crate) fn release(&self, back: Usage) {
        self.records.fetch_sub(back.records, Ordering::AcqRel);
        self.bytes.fetch_sub(back.bytes, Ordering::AcqRel);
    }
}
