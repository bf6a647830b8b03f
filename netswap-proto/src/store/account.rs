//! Owner identities: one [`Account`] per identity, with its quota usage and its
//! connection count (which decides when its records become orphans).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crate::identity::Identity;

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
}

/// Which quota a charge would break.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum QuotaKind {
    Records,
    Bytes,
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

    /// Records this identity owns.
    pub fn records(&self) -> u64 {
        self.records.load(Ordering::Relaxed)
    }

    /// Data bytes this identity owns.
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

    /// Adds `records` and `bytes` if both stay within the quotas; all or nothing.
    pub(crate) fn charge(
        &self,
        records: u64,
        bytes: u64,
        quota_records: u64,
        quota_bytes: u64,
    ) -> Result<(), QuotaKind> {
        if records > 0 {
            self.records
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| {
                    r.checked_add(records).filter(|&n| n <= quota_records)
                })
                .map_err(|_| QuotaKind::Records)?;
        }
        if bytes > 0
            && self
                .bytes
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                    b.checked_add(bytes).filter(|&n| n <= quota_bytes)
                })
                .is_err()
        {
            self.records.fetch_sub(records, Ordering::AcqRel);
            return Err(QuotaKind::Bytes);
        }
        Ok(())
    }

    /// Gives back what [`Account::charge`] took.
    pub(crate) fn release(&self, records: u64, bytes: u64) {
        self.records.fetch_sub(records, Ordering::AcqRel);
        self.bytes.fetch_sub(bytes, Ordering::AcqRel);
    }
}
