//! The notifications waiting for one watching connection, with bounded memory.
//!
//! A watcher that keeps up receives one NOTIFY per operation, in order. One that falls
//! behind by more than the queue's limit (`--notify-queue`) is not disconnected and
//! does not grow the server's memory: from then on, the notifications for each of its
//! watches are merged into a summary of that watch (which kinds of event happened,
//! and the latest version), until it has caught up. A summary becomes at most three
//! NOTIFYs (owner changed, access changed, changed, in that order, each with the
//! latest version), or one "deleted" when the record is gone. Memory is then bounded
//! by the limit plus one summary per watch.
//!
//! No clock and no I/O: the server wraps it in a lock, pushes what the store decides
//! and pops as fast as the watcher's socket takes the frames.

use std::collections::{HashMap, VecDeque};

use crate::store::Notification;
use crate::types::{Event, Pointer, Version};

/// What [`NotifyQueue::push`] did with a notification.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pushed {
    /// Queued as it is.
    Queued,
    /// Merged into its watch's summary (the watcher is behind).
    Merged,
}

/// Kinds of event a summary holds, as bits.
const CHANGED: u8 = 1;
const OWNER: u8 = 2;
const ACCESS: u8 = 4;
const DELETED: u8 = 8;

#[derive(Clone, Copy, Debug)]
struct Summary {
    kinds: u8,
    version: Version,
}

/// The notifications waiting for one connection. See the module documentation.
#[derive(Debug)]
pub struct NotifyQueue {
    limit: usize,
    exact: VecDeque<Notification>,
    summaries: HashMap<(Pointer, u32), Summary>,
    /// Watches with a summary, in the order their first merged event came.
    order: VecDeque<(Pointer, u32)>,
    /// Notifications of the summary being emitted.
    expanding: VecDeque<Notification>,
    merged: u64,
}

impl NotifyQueue {
    /// An empty queue that holds up to `limit` notifications exactly (at least 1).
    pub fn new(limit: usize) -> NotifyQueue {
        NotifyQueue {
            limit: limit.max(1),
            exact: VecDeque::new(),
            summaries: HashMap::new(),
            order: VecDeque::new(),
            expanding: VecDeque::new(),
            merged: 0,
        }
    }

    /// Adds a notification: queued as it is while fewer than the limit wait, else
    /// merged into a summary of its watch. A watch that already has a summary keeps
    /// merging into it, so the order of one watch's events is kept.
    pub fn push(&mut self, n: Notification) -> Pushed {
        let key = (n.ptr, n.xid);
        if let Some(s) = self.summaries.get_mut(&key) {
            s.merge(n.event, n.version);
            self.merged += 1;
            return Pushed::Merged;
        }
        if self.exact.len() < self.limit {
            self.exact.push_back(n);
            return Pushed::Queued;
        }
        let mut s = Summary {
            kinds: 0,
            version: n.version,
        };
        s.merge(n.event, n.version);
        self.summaries.insert(key, s);
        self.order.push_back(key);
        self.merged += 1;
        Pushed::Merged
    }

    /// The next notification to send: the exact ones first, then summaries.
    pub fn pop(&mut self) -> Option<Notification> {
        if let Some(n) = self.exact.pop_front() {
            return Some(n);
        }
        if let Some(n) = self.expanding.pop_front() {
            return Some(n);
        }
        let key = self.order.pop_front()?;
        let s = self
            .summaries
            .remove(&key)
            .expect("ordered summaries exist");
        let (ptr, xid) = key;
        let note = |event| Notification {
            conn: crate::store::ConnId(0),
            xid,
            event,
            ptr,
            version: s.version,
        };
        if s.kinds & DELETED != 0 {
            self.expanding.push_back(note(Event::Deleted));
        } else {
            for (bit, event) in [
                (OWNER, Event::OwnerChanged),
                (ACCESS, Event::AccessChanged),
                (CHANGED, Event::Changed),
            ] {
                if s.kinds & bit != 0 {
                    self.expanding.push_back(note(event));
                }
            }
        }
        self.expanding.pop_front()
    }

    /// Notifications waiting (a summary counts once).
    pub fn len(&self) -> usize {
        self.exact.len() + self.expanding.len() + self.order.len()
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Notifications merged into summaries so far.
    pub fn merged(&self) -> u64 {
        self.merged
    }
}

impl Summary {
    fn merge(&mut self, event: Event, version: Version) {
        self.kinds |= match event {
            Event::Changed => CHANGED,
            Event::OwnerChanged => OWNER,
            Event::AccessChanged => ACCESS,
            Event::Deleted => DELETED,
        };
        self.version = self.version.max(version);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ConnId;

    fn n(ptr: u64, event: Event, version: Version) -> Notification {
        Notification {
            conn: ConnId(0),
            xid: ptr as u32,
            event,
            ptr: Pointer::new(ptr).unwrap(),
            version,
        }
    }

    fn drain(q: &mut NotifyQueue) -> Vec<(u64, Event, Version)> {
        std::iter::from_fn(|| q.pop())
            .map(|n| (n.ptr.get(), n.event, n.version))
            .collect()
    }

    #[test]
    fn a_watcher_that_keeps_up_gets_every_notification_in_order() {
        let mut q = NotifyQueue::new(4);
        for v in 2..6 {
            assert_eq!(q.push(n(1, Event::Changed, v)), Pushed::Queued);
        }
        assert_eq!(
            drain(&mut q),
            (2..6).map(|v| (1, Event::Changed, v)).collect::<Vec<_>>()
        );
        assert!(q.is_empty());
        assert_eq!(q.merged(), 0);
    }

    #[test]
    fn past_the_limit_each_watch_is_summarised_with_bounded_memory() {
        let mut q = NotifyQueue::new(2);
        q.push(n(1, Event::Changed, 2));
        q.push(n(1, Event::Changed, 3));
        for v in 4..100_000 {
            q.push(n(1, Event::Changed, v));
            q.push(n(7, Event::Changed, v));
        }
        q.push(n(1, Event::AccessChanged, 99_999));
        q.push(n(1, Event::OwnerChanged, 99_999));
        assert_eq!(q.len(), 4, "2 exact + one summary per watch");
        assert_eq!(
            drain(&mut q),
            vec![
                (1, Event::Changed, 2),
                (1, Event::Changed, 3),
                (1, Event::OwnerChanged, 99_999),
                (1, Event::AccessChanged, 99_999),
                (1, Event::Changed, 99_999),
                (7, Event::Changed, 99_999),
            ]
        );
        assert_eq!(q.merged(), 2 * 99_996 + 2);
        // Caught up: exact again.
        assert_eq!(q.push(n(1, Event::Changed, 100_000)), Pushed::Queued);
    }

    #[test]
    fn a_deletion_is_never_merged_away() {
        let mut q = NotifyQueue::new(1);
        q.push(n(5, Event::Changed, 2));
        q.push(n(1, Event::Changed, 2));
        q.push(n(1, Event::Deleted, 2));
        assert_eq!(
            drain(&mut q),
            vec![(5, Event::Changed, 2), (1, Event::Deleted, 2)]
        );
    }

    #[test]
    fn a_watch_with_a_summary_keeps_its_order() {
        let mut q = NotifyQueue::new(1);
        q.push(n(9, Event::Changed, 1));
        q.push(n(1, Event::Changed, 2)); // summary for 1
        assert_eq!(q.pop().unwrap().ptr.get(), 9);
        // Room again, but watch 1 has a summary: this merges instead of overtaking it.
        assert_eq!(q.push(n(1, Event::Changed, 3)), Pushed::Merged);
        assert_eq!(drain(&mut q), vec![(1, Event::Changed, 3)]);
    }
}
