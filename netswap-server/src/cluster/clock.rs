//! The eviction of the gateway's two bounded caches (the read cache's entries,
//! `reads`, and the records' last seen states, `states`): CLOCK, or second chance.

use hashbrown::HashMap;
use netswap_proto::Pointer;

/// What the eviction ([`Clock`]) needs of an entry.
pub(crate) trait Hand {
    /// The token of the fill that put it in (a new fill of the record, a new token).
    fn token(&self) -> u64;
    /// Whether it was hit since the hand last passed it; clears that.
    fn second_chance(&mut self) -> bool;
}

/// CLOCK (second chance). Entries wait in the order they were filled; the hand takes
/// the oldest, and one used (hit) since the hand last passed goes to the back
/// instead, once. A record used often stays while it is used; one used once goes
/// after a round. Before, the entry that went was the one the hash table
/// listed first: always in its lowest buckets, so that records filled there went
/// again at the next fill while those filled higher up stayed for good, hot or not
/// (READs of 100,000 records by Zipf's law, exponent 0.99, through 16,384 entries:
/// half of them hits, where the 16,384 hottest take ~85% of the READs).
#[derive(Debug, Default)]
pub(crate) struct Clock {
    /// Each entry's pointer and token, oldest first; those of entries gone since
    /// (or filled again) are skipped when the hand meets them.
    ring: std::collections::VecDeque<(Pointer, u64)>,
}

impl Clock {
    /// `ptr`'s entry was filled with `token`.
    pub fn filled<E: Hand>(&mut self, ptr: Pointer, token: u64, map: &HashMap<Pointer, E>) {
        self.ring.push_back((ptr, token));
        // Entries dropped without the hand (invalidated, their connection lost) leave
        // their place behind: dropped from the ring while it is twice the entries.
        if self.ring.len() > 2 * map.len().max(64) {
            self.ring
                .retain(|(p, t)| map.get(p).is_some_and(|e| e.token() == *t));
        }
    }

    /// The entry to evict from `map` (`None`: `map` is empty).
    pub fn victim<E: Hand>(&mut self, map: &mut HashMap<Pointer, E>) -> Option<Pointer> {
        // Every entry is in the ring once, so two turns find one unless it is empty.
        let mut turns = 2 * self.ring.len() + 1;
        while turns > 0 {
            turns -= 1;
            let (ptr, token) = self.ring.pop_front()?;
            match map.get_mut(&ptr) {
                Some(e) if e.token() == token => {
                    if !e.second_chance() {
                        return Some(ptr);
                    }
                    self.ring.push_back((ptr, token));
                }
                _ => {}
            }
        }
        map.keys().next().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An entry of the eviction's tests.
    struct Test {
        token: u64,
        hit: bool,
    }

    impl Hand for Test {
        fn token(&self) -> u64 {
            self.token
        }
        fn second_chance(&mut self) -> bool {
            std::mem::take(&mut self.hit)
        }
    }

    fn p(n: u64) -> Pointer {
        Pointer::new(n).unwrap()
    }

    /// Fills `n`'s entry with `token` (not hit).
    fn fill(map: &mut HashMap<Pointer, Test>, clock: &mut Clock, n: u64, token: u64) {
        map.insert(p(n), Test { token, hit: false });
        clock.filled(p(n), token, map);
    }

    /// Records 1 to `n`, filled in that order with tokens 1 to `n`.
    fn filled(n: u64) -> (HashMap<Pointer, Test>, Clock) {
        let (mut map, mut clock) = (HashMap::new(), Clock::default());
        for n in 1..=n {
            fill(&mut map, &mut clock, n, n);
        }
        (map, clock)
    }

    #[test]
    fn the_clock_keeps_what_is_hit_and_evicts_the_oldest_of_the_rest() {
        let (mut map, mut clock) = filled(4);
        // 1 and 3 hit: 2 goes first, then 4, then 1 and 3 (their chance used).
        map.get_mut(&p(1)).unwrap().hit = true;
        map.get_mut(&p(3)).unwrap().hit = true;
        let mut evict = |map: &mut HashMap<Pointer, Test>| {
            let v = clock.victim(map).unwrap();
            map.remove(&v);
            v
        };
        assert_eq!(evict(&mut map), p(2));
        assert_eq!(evict(&mut map), p(4));
        assert_eq!(evict(&mut map), p(1));
        assert_eq!(evict(&mut map), p(3));
        assert_eq!(clock.victim(&mut map), None);
    }

    #[test]
    fn the_clock_skips_entries_gone_or_filled_again() {
        let (mut map, mut clock) = filled(3);
        // 1 invalidated; 2 filled again (a new token: it is now the newest).
        map.remove(&p(1));
        fill(&mut map, &mut clock, 2, 9);
        assert_eq!(clock.victim(&mut map), Some(p(3)));
        map.remove(&p(3));
        assert_eq!(clock.victim(&mut map), Some(p(2)));
        // Entries dropped without the hand do not grow the ring past twice the
        // entries (at least 64).
        for n in 100..10_000 {
            fill(&mut map, &mut clock, n, n);
            map.remove(&p(n));
        }
        assert!(clock.ring.len() <= 2 * 64 + 1, "{}", clock.ring.len());
    }
}
