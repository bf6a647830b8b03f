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
//! marked failing) share one more set.
//!
//! A change that also needs another primary (a write that changes a record's size
//! changes its payer's quota, a DELETE gives the payer its charge back, a create asks
//! its identity's quota and then writes the new record wherever its pointer is, a
//! TAKEOVER charges the new owner) moves its [`Turn`] to that primary for as long as
//! it waits on it, and back for its commit. It held its record's primary's turn while
//! it waited on the other, so writes of records on a primary that answered, whose
//! payer's quota was on one that did not, held that primary's turns, and the writes of
//! other records there waited behind them (test
//! `a_primary_that_stops_answering_holds_up_only_the_writes_it_is_asked_for`). A
//! change holds one turn at a time, so no two changes ever wait for each other's.

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

    /// A change's turn, first of `slot`'s primary; `turns` `None`: no limit.
    pub async fn first(turns: Option<&Turns>, slot: u16) -> Turn<'_> {
        let mut turn = Turn::none();
        turn.turns = turns;
        turn.move_to(slot).await;
        turn
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

/// The turn one change holds, of the primary it waits on (dropped: given back).
pub(crate) struct Turn<'a> {
    /// The gateway's turns; `None`: a request that takes none (a read, the reaper's
    /// deletes), or no limit.
    turns: Option<&'a Turns>,
    /// The slot it was last moved to, and the turn it holds there.
    held: Option<(u16, OwnedSemaphorePermit)>,
}

impl Turn<'_> {
    /// No turn, and none taken by [`Turn::move_to`].
    pub fn none() -> Turn<'static> {
        Turn {
            turns: None,
            held: None,
        }
    }

    /// Holds a turn of `slot`'s primary instead of the one held before (a no-op when
    /// that is the same primary's). The one held is given back first: a change never
    /// holds two, so it never holds one while it waits for another.
    pub async fn move_to(&mut self, slot: u16) {
        let Some(turns) = self.turns else { return };
        let set = match &self.held {
            Some((at, _)) if *at == slot => return,
            Some((_, permit)) => {
                let set = turns.set_of(slot);
                if Arc::ptr_eq(permit.semaphore(), &set) {
                    self.held = self.held.take().map(|(_, p)| (slot, p));
                    return;
                }
                set
            }
            None => turns.set_of(slot),
        };
        self.held = None;
        let permit = set.acquire_owned().await.expect("never closed");
        self.held = Some((slot, permit));
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
        let held = [
            Turns::first(Some(&t), 0).await,
            Turns::first(Some(&t), 5460).await,
        ];
        assert_eq!(t.set_of(1).available_permits(), 0);
        // Another primary's, and slots of none known, are free.
        assert_eq!(t.set_of(5461).available_permits(), 2);
        let _other = Turns::first(Some(&t), 16383).await;
        drop(held);
        assert_eq!(t.set_of(0).available_permits(), 2);
    }

    #[tokio::test]
    async fn a_primary_keeps_its_turns_when_the_listing_changes_order() {
        let t = Turns::new(1);
        follow(&t, NODES);
        let held = Turns::first(Some(&t), 6000).await;
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
    async fn a_turn_waiting_on_another_primary_holds_none_of_the_first() {
        let t = Arc::new(Turns::new(1));
        follow(&t, NODES);
        // Another slot of the same primary: the same turn, kept.
        let mut turn = Turns::first(Some(&t), 0).await;
        turn.move_to(100).await;
        assert_eq!(t.set_of(0).available_permits(), 0);
        drop(turn);
        // The second primary's one turn is held elsewhere: a change that moves there
        // waits, and holds no turn of the first meanwhile.
        let elsewhere = Turns::first(Some(&t), 6000).await;
        let (took, mut first_taken) = tokio::sync::mpsc::channel(1);
        let mover = tokio::spawn({
            let t = t.clone();
            async move {
                let mut turn = Turns::first(Some(&t), 0).await;
                took.send(()).await.unwrap();
                turn.move_to(6000).await;
                turn.move_to(0).await;
            }
        });
        first_taken.recv().await.unwrap();
        tokio::task::yield_now().await;
        assert!(!mover.is_finished());
        assert_eq!(
            t.set_of(0).available_permits(),
            1,
            "the first primary's turn"
        );
        drop(elsewhere);
        mover.await.unwrap();
        assert_eq!(t.set_of(0).available_permits(), 1);
        assert_eq!(t.set_of(6000).available_permits(), 1);
        // No turns at all: moving takes none.
        let mut none = Turn::none();
        none.move_to(0).await;
        assert_eq!(t.set_of(0).available_permits(), 1);
    }

    #[tokio::test]
    async fn before_any_layout_every_slot_shares_one_set() {
        let t = Turns::new(3);
        assert!(Arc::ptr_eq(&t.set_of(0), &t.set_of(16383)));
    }
}
