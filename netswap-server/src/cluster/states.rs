//! What this gateway last saw of records: the state (revision, owner, payer, access,
//! version, size; never the bytes) each record had when it was last loaded, created
//! or written through this gateway.
//!
//! A write (REPLACE, REPLACE_IF, WRITE_AT) on a record found here is decided on that
//! state and committed at once, in one Redis round trip instead of two (load, then
//! commit). That is safe because the commit is a compare-and-set on the revision: a
//! state that another gateway (or another request) has made stale fails the commit,
//! and the request is decided again on a fresh load. Only decisions the commit checks
//! are taken from here: a refusal or any other answer decided on a remembered state
//! is decided again on a fresh load, so a stale entry can cost a round trip but
//! never change an answer.
//!
//! Bounded: at most `capacity` records (when full, [`Clock`] picks the one that
//! goes: one not used since the hand last passed); 0 turns it off.

use hashbrown::HashMap;
use netswap_proto::Pointer;

use super::clock::{Clock, Hand};
use super::redis_io::Stored;

/// Records' last seen states (see the module documentation).
#[derive(Debug)]
pub(crate) struct States {
    map: HashMap<Pointer, Remembered>,
    capacity: usize,
    next_token: u64,
    clock: Clock,
}

/// A record's remembered state, the token it was noted with, and whether a request
/// used it since the eviction's hand last passed.
#[derive(Debug)]
struct Remembered {
    state: Stored,
    token: u64,
    used: bool,
}

impl Hand for Remembered {
    fn token(&self) -> u64 {
        self.token
    }

    fn second_chance(&mut self) -> bool {
        std::mem::take(&mut self.used)
    }
}

impl States {
    /// Remembers at most `capacity` records.
    pub fn new(capacity: usize) -> States {
        States {
            map: HashMap::new(),
            capacity,
            next_token: 0,
            clock: Clock::default(),
        }
    }

    /// The last state seen of `ptr`, if any.
    pub fn get(&mut self, ptr: Pointer) -> Option<Stored> {
        self.map.get_mut(&ptr).map(|r| {
            r.used = true;
            r.state.clone()
        })
    }

    /// Notes a state seen of `ptr` (its bytes are not kept). A state older than the
    /// one remembered (a load that raced a write of this gateway) is ignored.
    pub fn seen(&mut self, ptr: Pointer, rec: &Stored) {
        if self.capacity == 0 {
            return;
        }
        let state = Stored {
            data: None,
            ..rec.clone()
        };
        if let Some(known) = self.map.get_mut(&ptr) {
            if known.state.rev <= state.rev {
                known.state = state;
            }
            return;
        }
        if self.map.len() >= self.capacity
            && let Some(victim) = self.clock.victim(&mut self.map)
        {
            self.map.remove(&victim);
        }
        self.next_token += 1;
        let token = self.next_token;
        self.map.insert(
            ptr,
            Remembered {
                state,
                token,
                used: false,
            },
        );
        self.clock.filled(ptr, token, &self.map);
    }

    /// Forgets `ptr` (it is gone, or a change of this gateway is under way).
    pub fn forget(&mut self, ptr: Pointer) {
        self.map.remove(&ptr);
    }

    /// Records remembered.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use netswap_proto::{Access, Identity};

    fn state(rev: u64) -> Stored {
        Stored {
            rev,
            owner: Identity([1; 32]),
            payer: None,
            access: Access::READ | Access::WRITE,
            version: rev,
            deadline: None,
            size: 3,
            data: Some(Bytes::from_static(b"abc")),
            inline: true,
            legacy: false,
        }
    }

    fn ptr(n: u64) -> Pointer {
        Pointer::new(n).unwrap()
    }

    #[test]
    fn keeps_the_newest_state_without_the_bytes() {
        let mut s = States::new(8);
        s.seen(ptr(1), &state(5));
        assert_eq!(s.get(ptr(1)).unwrap().rev, 5);
        assert_eq!(s.get(ptr(1)).unwrap().data, None);
        s.seen(ptr(1), &state(4));
        assert_eq!(s.get(ptr(1)).unwrap().rev, 5, "an older state is ignored");
        s.seen(ptr(1), &state(6));
        assert_eq!(s.get(ptr(1)).unwrap().rev, 6);
        s.forget(ptr(1));
        assert_eq!(s.get(ptr(1)), None);
        s.seen(ptr(1), &state(2));
        assert_eq!(
            s.get(ptr(1)).unwrap().rev,
            2,
            "after forget any state is news"
        );
    }

    #[test]
    fn keeps_the_states_in_use_when_full() {
        let mut s = States::new(100);
        for n in 1..=100 {
            s.seen(ptr(n), &state(1));
        }
        // The first ten are used, then ninety others come: the ninety unused go
        // (the used ones get a second chance; unused again, they would go next).
        for n in 1..=10 {
            assert!(s.get(ptr(n)).is_some());
        }
        for n in 101..=190 {
            s.seen(ptr(n), &state(1));
        }
        assert!((1..=10).all(|n| s.get(ptr(n)).is_some()), "used: kept");
        assert!((11..=100).all(|n| s.get(ptr(n)).is_none()), "unused: gone");
        assert_eq!(s.len(), 100);
    }

    #[test]
    fn is_bounded_and_can_be_off() {
        let mut s = States::new(100);
        for n in 1..=1000 {
            s.seen(ptr(n), &state(1));
        }
        assert_eq!(s.len(), 100);
        assert!(s.get(ptr(1000)).is_some(), "the newest is kept");
        let mut off = States::new(0);
        off.seen(ptr(1), &state(1));
        assert_eq!(off.get(ptr(1)), None);
    }
}
