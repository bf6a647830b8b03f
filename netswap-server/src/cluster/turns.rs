//! Turns for requests that change records (`--redis-max-in-flight`), one set per
//! primary.
//!
//! A change holds a turn for as long as Redis takes to answer it: requests queue here,
//! in arrival order, rather than inside the Redis client. With one set for the whole
//! gateway, a primary that stops answering without closing its connections (cut off,
//! or stalled) let the changes of its records hold every turn, each until the
//! response timeout and its retries, and the changes of records on the primaries that
//! answered waited seconds behind them (test
//! `a_primary_that_stops_answering_holds_up_only_the_writes_of_its_records`: 15.6–16.3 s
//! in three runs, against under a second). So each primary has its own set, found
//! from the slot of the change's record (a create: of its identity's quota, the first
//! key it writes) through the layout the gateway reads every second (`CLUSTER NODES`),
//! by the primary's node id (its place in that listing can change from one reading to
//! the next). Slots of no known primary (before the first reading, or of a primary
//! marked failing) share one more set. A change that also needs another primary (a
//! write that changes a record's size changes its payer's quota, wherever that is)
//! holds its record's primary's turn while it waits for the other.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::batch::UNKNOWN;
use super::lock;

/// The turns of one gateway.
pub(crate) struct Turns {
    /// Turns per primary.
    each: usize,
    /// The primary of each slot (an index into the second), and each index's turns.
    layout: RwLock<(Vec<u16>, Vec<Arc<Semaphore>>)>,
    /// Every primary's turns by node id, kept while it is a primary.
    by_id: Mutex<HashMap<String, Arc<Semaphore>>>,
    /// The turns of slots whose primary is not known.
    unknown: Arc<Semaphore>,
}

impl Turns {
    /// `each` turns per primary (at least 1).
    pub fn new(each: usize) -> Turns {
        let each = each.max(1);
        Turns {
            each,
            layout: RwLock::new((Vec::new(), Vec::new())),
            by_id: Mutex::new(HashMap::new()),
            unknown: Arc::new(Semaphore::new(each)),
        }
    }

    /// Takes the layout of `CLUSTER NODES` as `batch::primaries_by_id` reads it: the
    /// primary of each slot (an index into `ids`), and the primaries' node ids. A
    /// primary keeps its turns, those held included, as long as it is one.
    pub fn follow(&self, slots: &[u16], ids: &[String]) {
        let sets: Vec<Arc<Semaphore>> = {
            let mut by_id = lock(&self.by_id);
            by_id.retain(|id, _| ids.contains(id));
            ids.iter()
                .map(|id| {
                    by_id
                        .entry(id.clone())
                        .or_insert_with(|| Arc::new(Semaphore::new(self.each)))
                        .clone()
                })
                .collect()
        };
        *self.layout.write().unwrap_or_else(|e| e.into_inner()) = (slots.to_vec(), sets);
    }

    /// A turn for a change whose first key is in `slot`, held until dropped.
    pub async fn enter(&self, slot: u16) -> OwnedSemaphorePermit {
        self.set_of(slot)
            .acquire_owned()
            .await
            .expect("never closed")
    }

    /// The set of turns of `slot`'s primary.
    fn set_of(&self, slot: u16) -> Arc<Semaphore> {
        let layout = self.layout.read().unwrap_or_else(|e| e.into_inner());
        match layout.0.get(slot as usize) {
            Some(&i) if i != UNKNOWN => layout.1.get(i as usize).unwrap_or(&self.unknown),
            _ => &self.unknown,
        }
        .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::batch::primaries_by_id;

    fn follow(t: &Turns, nodes: &str) {
        let (slots, ids) = primaries_by_id(nodes);
        t.follow(&slots, &ids);
    }

    const NODES: &str = "\
a1 127.0.0.1:30001@31001 myself,master - 0 0 1 connected 0-5460
b2 127.0.0.1:30002@31002 master - 0 0 2 connected 5461-10922
c3 127.0.0.1:30003@31003 master - 0 0 3 connected 10923-16383
";

    #[tokio::test]
    async fn a_primary_whose_turns_are_all_held_holds_up_no_other() {
        let t = Turns::new(2);
        follow(&t, NODES);
        let held = [t.enter(0).await, t.enter(5460).await];
        assert_eq!(t.set_of(1).available_permits(), 0);
        // Another primary's, and slots of none known, are free.
        assert_eq!(t.set_of(5461).available_permits(), 2);
        let _other = t.enter(16383).await;
        drop(held);
        assert_eq!(t.set_of(0).available_permits(), 2);
    }

    #[tokio::test]
    async fn a_primary_keeps_its_turns_when_the_listing_changes_order() {
        let t = Turns::new(1);
        follow(&t, NODES);
        let held = t.enter(6000).await;
        // b2 listed first now, and a1 marked failing: its slots have no primary.
        let reordered = "\
b2 127.0.0.1:30002@31002 master - 0 0 2 connected 5461-10922
a1 127.0.0.1:30001@31001 master,fail - 0 0 1 connected 0-5460
c3 127.0.0.1:30003@31003 master - 0 0 3 connected 10923-16383
";
        follow(&t, reordered);
        assert_eq!(
            t.set_of(6000).available_permits(),
            0,
            "b2's turn still held"
        );
        assert_eq!(t.set_of(11000).available_permits(), 1);
        assert!(Arc::ptr_eq(&t.set_of(0), &t.unknown));
        drop(held);
        assert_eq!(t.set_of(6000).available_permits(), 1);
    }

    #[tokio::test]
    async fn before_any_layout_every_slot_shares_one_set() {
        let t = Turns::new(3);
        assert!(Arc::ptr_eq(&t.set_of(0), &t.set_of(16383)));
    }
}
