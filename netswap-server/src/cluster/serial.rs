//! One change at a time per record on a gateway.
//!
//! Every change of a record is a compare-and-set on its revision, so two changes of
//! one record in flight at once cannot both apply: the loser loads the record and
//! decides again. Left to race, the changes a gateway works on starve each other. A
//! write decided on the remembered state (`states`) needs one round trip, one that
//! lost needs two (a load, then the commit), so the writer that won last wins again,
//! and after `MAX_ATTEMPTS` lost races the others were answered BUSY: four
//! connections writing one record through one gateway got BUSY within a second, and
//! the reaper never deleted an orphan that others kept writing.
//!
//! So the requests that change a record (and the reaper's deletes) take the record's
//! turn first, in arrival order (`tokio::sync::Mutex` is fair), and decide once the
//! change before them is done: on one gateway they never race, and each is decided on
//! the state the previous one left, in one round trip. Only changes through other
//! gateways still race (the compare-and-set decides those), and to keep those fair
//! the queue counts the races its changes lost in a row: past
//! `scripts::CLAIM_AFTER`, the next commit claims the record (`scripts::CLAIM`). A
//! record's queue exists while someone holds or waits for its turn.
//!
//! The same queues, keyed by identity, put a gateway's lease changes of an identity
//! (take, renew, release) in one order (`ClusterStore::open`, `renew_leases`).

use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use hashbrown::HashMap;
use netswap_proto::Pointer;
use tokio::sync::OwnedMutexGuard;

use super::lock;

/// A record's queue.
#[derive(Debug, Default)]
struct Queue {
    turn: Arc<tokio::sync::Mutex<()>>,
    /// How many hold or wait for the turn.
    users: usize,
    /// Races lost in a row by the record's commits.
    lost: u32,
}

/// The queues of the keys (records, by default) that have changes in flight on this
/// gateway.
#[derive(Debug)]
pub(crate) struct Serial<K = Pointer> {
    queues: Mutex<HashMap<K, Queue>>,
    /// Changes that found an earlier change of their key in flight or waiting.
    pub queued: AtomicU64,
}

impl<K> Default for Serial<K> {
    fn default() -> Self {
        Serial {
            queues: Mutex::new(HashMap::new()),
            queued: AtomicU64::new(0),
        }
    }
}

/// A key's turn, held until dropped (also while still waiting for it: a request
/// dropped in the queue leaves it).
pub(crate) struct Turn<'a, K: Hash + Eq + Copy = Pointer> {
    serial: &'a Serial<K>,
    key: K,
    held: Option<OwnedMutexGuard<()>>,
}

impl<K: Hash + Eq + Copy> Serial<K> {
    /// Waits for `key`'s turn, after the changes of `key` that came before.
    pub async fn enter(&self, key: K) -> Turn<'_, K> {
        let queue = {
            let mut queues = lock(&self.queues);
            let queue = queues.entry(key).or_default();
            queue.users += 1;
            if queue.users > 1 {
                self.queued.fetch_add(1, Ordering::Relaxed);
            }
            queue.turn.clone()
        };
        let mut turn = Turn {
            serial: self,
            key,
            held: None,
        };
        turn.held = Some(queue.lock_owned().await);
        turn
    }

    /// Notes how a commit of `key` went: `won` (applied, or found applied), or it
    /// lost a race. Returns the races lost in a row.
    pub fn raced(&self, key: K, won: bool) -> u32 {
        match lock(&self.queues).get_mut(&key) {
            Some(q) if won => {
                q.lost = 0;
                0
            }
            Some(q) => {
                q.lost += 1;
                q.lost
            }
            None => 0,
        }
    }

    /// Races the commits of `key` lost in a row (0 when nobody holds its turn).
    pub fn lost(&self, key: K) -> u32 {
        lock(&self.queues).get(&key).map_or(0, |q| q.lost)
    }

    /// Records with a change in flight or waiting.
    #[cfg(test)]
    fn len(&self) -> usize {
        lock(&self.queues).len()
    }
}

impl<K: Hash + Eq + Copy> Drop for Turn<'_, K> {
    fn drop(&mut self) {
        // The next in the queue may go now.
        self.held = None;
        let mut queues = lock(&self.serial.queues);
        if let Some(q) = queues.get_mut(&self.key) {
            q.users -= 1;
            if q.users == 0 {
                queues.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ptr(n: u64) -> Pointer {
        Pointer::new(n).unwrap()
    }

    #[tokio::test]
    async fn changes_of_one_record_go_one_at_a_time_in_arrival_order() {
        let serial = Arc::new(Serial::default());
        let order = Arc::new(Mutex::new(Vec::new()));
        let first = serial.enter(ptr(1)).await;
        // Another record's turn is free.
        drop(serial.enter(ptr(2)).await);
        let mut waiting = Vec::new();
        for i in 0..5 {
            let (serial, order) = (serial.clone(), order.clone());
            waiting.push(tokio::spawn(async move {
                let _turn = serial.enter(ptr(1)).await;
                lock(&order).push(i);
                tokio::task::yield_now().await;
            }));
            // Each in the queue before the next comes.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(lock(&order).is_empty(), "all wait for the first");
        drop(first);
        for w in waiting {
            w.await.unwrap();
        }
        assert_eq!(*lock(&order), vec![0, 1, 2, 3, 4]);
        assert_eq!(serial.len(), 0, "no queue left behind");
        assert_eq!(serial.queued.load(Ordering::Relaxed), 5, "five waited");
    }

    #[tokio::test]
    async fn a_queue_counts_the_races_its_commits_lost_in_a_row() {
        let serial = Serial::default();
        assert_eq!(serial.raced(ptr(3), false), 0, "no queue: nothing counted");
        let turn = serial.enter(ptr(3)).await;
        assert_eq!(serial.raced(ptr(3), false), 1);
        assert_eq!(serial.raced(ptr(3), false), 2);
        assert_eq!(serial.lost(ptr(3)), 2);
        assert_eq!(serial.raced(ptr(3), true), 0);
        assert_eq!(serial.raced(ptr(3), false), 1);
        drop(turn);
        let _turn = serial.enter(ptr(3)).await;
        assert_eq!(serial.lost(ptr(3)), 0, "a new queue starts afresh");
    }

    #[tokio::test]
    async fn a_request_dropped_while_waiting_leaves_the_queue() {
        let serial = Arc::new(Serial::default());
        let held = serial.enter(ptr(7)).await;
        let s = serial.clone();
        let waiter = tokio::spawn(async move {
            let _turn = s.enter(ptr(7)).await;
        });
        tokio::time::sleep(Duration::from_millis(5)).await;
        waiter.abort();
        let _ = waiter.await;
        drop(held);
        assert_eq!(serial.len(), 0, "the dropped waiter is gone too");
        // The turn is free again.
        drop(serial.enter(ptr(7)).await);
        assert_eq!(serial.len(), 0);
    }
}
