//! Primaries that did not answer the last look, for the one change that can go
//! elsewhere: a create picks its record's pointer at random, so while a primary does
//! not answer (cut off without its connections closing, stalled, or killed and not
//! yet replaced by its replica) it picks one whose slot is served by a primary that
//! answers.
//!
//! Each second the gateway sends a `PING` to every primary on its connection for
//! commands (`ClusterStore::check_connection`); those that do not answer within the
//! look's wait are *silent* until a later look hears them. Slots of no known primary
//! (before a failover promotes a replica, `CLUSTER NODES` marks the primary failing)
//! are avoided as well. A create whose random pointer's slot is to be avoided draws
//! another, up to [`DRAWS`] pointers in all. Before, a third of the creates (with
//! three primaries) went to the primary that did not answer, and their commits timed
//! out and were sent again for up to 15 s (`RESEND_FOR`, for a failover): no answer
//! within 10 s (test `creates_go_to_primaries_that_answer`).
//!
//! What it costs the pointers: while a primary is silent, a new pointer is one whose
//! slot another primary serves, ~0.6 bits fewer of 64 with one of three primaries
//! silent (it stays random within those slots). When
//! every slot would be avoided (the connection itself stopped answering, or the whole
//! cluster), none is: a create then goes where it drew.

use std::collections::HashSet;
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use netswap_proto::Pointer;

use super::batch::UNKNOWN;
use super::keys::record_slot;

/// How many pointers a create draws at most to find one whose slot is not avoided
/// (with one primary of three silent, all 8 land there once in 6,561 creates).
pub(crate) const DRAWS: usize = 8;

/// What the gateway heard of the primaries at the last look.
#[derive(Default)]
pub(crate) struct Silent {
    /// Whether any slot is avoided (read by every create first).
    any: AtomicBool,
    /// Silent primaries that serve slots now (for `/metrics`).
    count: AtomicUsize,
    /// Slots avoided now (for `/metrics`): a primary marked failing is no longer
    /// pinged, so its slots are avoided without it being counted silent.
    avoided: AtomicUsize,
    state: RwLock<State>,
}

#[derive(Default)]
struct State {
    /// The primary of each slot (an index into `ids`, or `UNKNOWN`).
    slots: Vec<u16>,
    /// The primaries' node ids.
    ids: Vec<String>,
    /// Node ids that did not answer the last look.
    silent: HashSet<String>,
    /// Each slot: whether a new record is not to be put there (empty: none is).
    avoid: Vec<bool>,
}

impl Silent {
    /// Takes the layout of `CLUSTER NODES` as `batch::primaries_by_id` reads it.
    pub fn follow(&self, slots: &[u16], ids: &[String]) {
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        state.slots = slots.to_vec();
        state.ids = ids.to_vec();
        self.settle(&mut state);
    }

    /// Takes the node ids of the primaries that did not answer this look.
    pub fn heard(&self, silent: HashSet<String>) {
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        if state.silent != silent {
            state.silent = silent;
            self.settle(&mut state);
        }
    }

    /// Whether a new record had better not be put at `ptr` (while no slot is
    /// avoided: one load, no slot computed).
    pub fn avoids(&self, ptr: Pointer) -> bool {
        self.any.load(Ordering::Relaxed) && self.avoid(record_slot(ptr))
    }

    /// Whether a new record had better not go to `slot` (none is while `avoid` is
    /// empty).
    fn avoid(&self, slot: u16) -> bool {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        state.avoid.get(slot as usize).copied().unwrap_or(false)
    }

    /// How many primaries that serve slots did not answer the last look.
    pub fn count(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// How many slots creates avoid now.
    pub fn avoided(&self) -> usize {
        self.avoided.load(Ordering::Relaxed)
    }

    fn settle(&self, state: &mut State) {
        let silent: Vec<bool> = state
            .ids
            .iter()
            .map(|id| state.silent.contains(id))
            .collect();
        let avoid: Vec<bool> = state
            .slots
            .iter()
            .map(|&i| i == UNKNOWN || silent.get(i as usize).copied().unwrap_or(true))
            .collect();
        // All avoided, or none: no slot is better than another.
        let any = avoid.iter().any(|&a| a) && !avoid.iter().all(|&a| a);
        state.avoid = if any { avoid } else { Vec::new() };
        self.any.store(any, Ordering::Relaxed);
        let avoided = state.avoid.iter().filter(|&&a| a).count();
        self.avoided.store(avoided, Ordering::Relaxed);
        self.count
            .store(silent.iter().filter(|&&s| s).count(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::batch::primaries_by_id;

    const NODES: &str = "\
a1 127.0.0.1:30001@31001 myself,master - 0 0 1 connected 0-5460
b2 127.0.0.1:30002@31002 master - 0 0 2 connected 5461-10922
c3 127.0.0.1:30003@31003 master - 0 0 3 connected 10923-16383
";

    fn follow(s: &Silent, nodes: &str) {
        let (slots, ids) = primaries_by_id(nodes);
        s.follow(&slots, &ids);
    }

    fn ids(ids: &[&str]) -> HashSet<String> {
        ids.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_slots_of_a_silent_primary_are_avoided_until_it_answers() {
        let s = Silent::default();
        assert!(!s.avoid(0), "nothing known: nothing avoided");
        follow(&s, NODES);
        assert!(!s.avoid(0));
        s.heard(ids(&["b2"]));
        assert_eq!(s.count(), 1);
        assert!(!s.avoid(5460));
        assert!(s.avoid(5461) && s.avoid(10922));
        assert!(!s.avoid(10923));
        assert_eq!(s.avoided(), 5462);
        s.heard(HashSet::new());
        assert_eq!(s.count(), 0);
        assert_eq!(s.avoided(), 0);
        assert!(!s.avoid(5461));
    }

    #[test]
    fn slots_of_no_known_primary_are_avoided() {
        let s = Silent::default();
        follow(
            &s,
            "\
a1 127.0.0.1:30001@31001 master,fail - 0 0 1 connected 0-5460
b2 127.0.0.1:30002@31002 master - 0 0 2 connected 5461-10922
c3 127.0.0.1:30003@31003 master - 0 0 3 connected 10923-16383
",
        );
        assert!(s.avoid(0) && s.avoid(5460));
        assert!(!s.avoid(5461));
        assert_eq!(s.count(), 0, "none silent");
        assert_eq!(s.avoided(), 5461);
    }

    #[test]
    fn when_every_slot_would_be_avoided_none_is() {
        let s = Silent::default();
        follow(&s, NODES);
        s.heard(ids(&["a1", "b2", "c3"]));
        assert_eq!(s.count(), 3);
        assert!(!s.avoid(0) && !s.avoid(6000) && !s.avoid(16383));
        assert_eq!(s.avoided(), 0);
        // A silent node that is no longer a primary counts for nothing.
        s.heard(ids(&["gone"]));
        assert_eq!(s.count(), 0);
        assert!(!s.avoid(0));
    }
}
