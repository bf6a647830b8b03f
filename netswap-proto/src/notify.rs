//! The notifications waiting for one watching connection, with bounded memory.
//!
//! A watcher that keeps up receives one NOTIFY per operation, in order. One that falls
//! behind by more than the queue's limits (`--notify-queue` notifications, or a budget
//! of bytes for data watches) is not disconnected and does not grow the server's
//! memory: from then on, the notifications for each of its watches are merged into a
//! summary of that watch (which kinds of event happened, the latest version, and for
//! a data watch the union of the changed byte ranges), until it has caught up. A
//! summary becomes at most three NOTIFYs (owner changed, access changed, changed — with
//! the merged bytes on a data watch — in that order, each with the latest version), or
//! one "deleted" when the record is gone. Memory is then bounded by the limits plus
//! one summary per watch.
//!
//! A watch may also ask for a minimum interval between its notifications (a game's
//! tick): its changes in between are merged the same way and sent when the interval
//! has passed, so it never receives a backlog. A deletion is sent at once.
//!
//! No clock and no I/O: the server wraps it in a lock, pushes what the store decides
//! with the time it happened, pops as fast as the watcher's socket takes the frames,
//! and sleeps until [`NotifyQueue::next_due`] for rate-limited watches.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::frame::MAX_MESSAGE;
use crate::message::Delta;
use crate::store::{ConnId, Notification};
use crate::types::{Event, Pointer, Version};

/// What [`NotifyQueue::push`] did with a notification.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pushed {
    /// Queued as it is.
    Queued,
    /// Merged into its watch's summary (the watcher is behind, or its watch is
    /// rate-limited).
    Merged,
}

/// Kinds of event a summary holds, as bits.
const CHANGED: u8 = 1;
const OWNER: u8 = 2;
const ACCESS: u8 = 4;
const DELETED: u8 = 8;

/// Most separate byte ranges one merged delta holds; past it the watcher is told
/// "changed" without the bytes and reads the record itself.
pub const MAX_MERGED_RANGES: usize = 256;

/// How a watch wants its notifications (set by the connection when the WATCH is
/// applied; watches without an entry are plain v1 watches).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WatchConfig {
    /// The watch receives the changed bytes.
    pub data: bool,
    /// At most one notification per this interval (zero: no limit).
    pub min_interval: Duration,
}

#[derive(Debug)]
struct WatchState {
    config: WatchConfig,
    /// A rate-limited watch may not be sent anything before this.
    next: Option<Instant>,
}

/// The merged bytes of a data watch's changes.
#[derive(Debug, Default)]
struct DataSummary {
    /// The version the merged changes apply to, and the version after the last one
    /// (`None` until the first change is merged).
    span: Option<(Version, Version)>,
    size: u64,
    /// Changed ranges by offset: non-overlapping, all within `size`.
    ranges: BTreeMap<u64, Bytes>,
    /// The bytes cannot be sent (a gap in the versions, too many ranges, over the
    /// byte budget, or a change that came without its bytes): send a plain "changed".
    lost: bool,
}

#[derive(Debug)]
struct Summary {
    kinds: u8,
    version: Version,
    data: Option<DataSummary>,
    /// When a rate-limited watch's summary may be sent (`None`: now).
    due: Option<Instant>,
}

type Key = (Pointer, u32);

/// The notifications waiting for one connection. See the module documentation.
#[derive(Debug)]
pub struct NotifyQueue {
    limit: usize,
    byte_limit: usize,
    exact: VecDeque<Notification>,
    /// Data bytes in `exact` and in summaries.
    held_bytes: usize,
    summaries: HashMap<Key, Summary>,
    /// Summaries that may be sent now, in the order their first merged event came.
    order: VecDeque<Key>,
    /// Summaries of rate-limited watches, by the time they may be sent.
    timed: BTreeSet<(Instant, Key)>,
    watches: HashMap<Key, WatchState>,
    /// Notifications of the summary being emitted.
    expanding: VecDeque<Notification>,
    merged: u64,
}

fn data_len(n: &Notification) -> usize {
    n.delta
        .as_ref()
        .map_or(0, |d| d.ranges.iter().map(|(_, b)| b.len()).sum())
}

impl NotifyQueue {
    /// An empty queue that holds up to `limit` notifications (at least 1) and
    /// `byte_limit` bytes of changed data exactly.
    pub fn new(limit: usize, byte_limit: usize) -> NotifyQueue {
        NotifyQueue {
            limit: limit.max(1),
            byte_limit,
            exact: VecDeque::new(),
            held_bytes: 0,
            summaries: HashMap::new(),
            order: VecDeque::new(),
            timed: BTreeSet::new(),
            watches: HashMap::new(),
            expanding: VecDeque::new(),
            merged: 0,
        }
    }

    /// Says how the watch `(ptr, xid)` wants its notifications. Call it before the
    /// watch is registered in the store, so its first notification already follows it.
    pub fn configure(&mut self, ptr: Pointer, xid: u32, config: WatchConfig) {
        if config == WatchConfig::default() {
            self.watches.remove(&(ptr, xid));
        } else {
            self.watches
                .insert((ptr, xid), WatchState { config, next: None });
        }
    }

    /// Forgets a watch's configuration (it ended).
    pub fn forget(&mut self, ptr: Pointer, xid: u32) {
        self.watches.remove(&(ptr, xid));
    }

    /// Adds a notification that happened at `now`: queued as it is while the watcher
    /// keeps up and its watch's interval allows, else merged into a summary of its
    /// watch. A watch that already has a summary keeps merging into it, so the order
    /// of one watch's events is kept.
    pub fn push(&mut self, n: Notification, now: Instant) -> Pushed {
        let key = (n.ptr, n.xid);
        if self.summaries.contains_key(&key) {
            self.merge(key, n);
            return Pushed::Merged;
        }
        let mut due = None;
        if let Some(w) = self.watches.get_mut(&key)
            && !w.config.min_interval.is_zero()
            && n.event != Event::Deleted
        {
            match w.next {
                Some(next) if now < next => due = Some(next),
                _ => w.next = Some(now + w.config.min_interval),
            }
        }
        if due.is_none()
            && self.exact.len() < self.limit
            && self.held_bytes + data_len(&n) <= self.byte_limit
        {
            self.held_bytes += data_len(&n);
            self.exact.push_back(n);
            return Pushed::Queued;
        }
        let data = self.watches.get(&key).is_some_and(|w| w.config.data);
        self.summaries.insert(
            key,
            Summary {
                kinds: 0,
                version: n.version,
                data: data.then(DataSummary::default),
                due,
            },
        );
        match due {
            Some(t) => {
                self.timed.insert((t, key));
            }
            None => self.order.push_back(key),
        }
        self.merge(key, n);
        Pushed::Merged
    }

    fn merge(&mut self, key: Key, n: Notification) {
        self.merged += 1;
        let s = self
            .summaries
            .get_mut(&key)
            .expect("merging into a summary");
        if n.event == Event::Deleted
            && let Some(t) = s.due.take()
        {
            // A deletion is not held back by the interval.
            self.timed.remove(&(t, key));
            self.order.push_back(key);
        }
        s.kinds |= match n.event {
            Event::Changed => CHANGED,
            Event::OwnerChanged => OWNER,
            Event::AccessChanged => ACCESS,
            Event::Deleted => DELETED,
        };
        s.version = s.version.max(n.version);
        if n.event != Event::Changed {
            return;
        }
        let Some(d) = s.data.as_mut() else {
            return;
        };
        let before = d.held();
        match n.delta {
            Some(delta)
                if !d.lost
                    && d.span.is_none_or(|(_, last)| delta.base == last)
                    && self.held_bytes + delta_bytes(&delta) <= self.byte_limit =>
            {
                d.span = Some((d.span.map_or(delta.base, |(base, _)| base), n.version));
                for (offset, bytes) in delta.ranges {
                    d.overlay(offset, bytes);
                }
                d.cut(delta.size);
                if d.ranges.len() > MAX_MERGED_RANGES {
                    d.lose();
                }
            }
            // A gap in the versions, a change without its bytes, or over the budget:
            // the watcher will be told "changed" and read the record itself.
            _ => d.lose(),
        }
        self.held_bytes = self.held_bytes + d.held() - before;
    }

    /// The next notification to send at `now`: the rest of a summary being sent, then
    /// the exact ones, then summaries that are due.
    pub fn pop(&mut self, now: Instant) -> Option<Notification> {
        // The rest of a summary being sent goes first: a change pushed meanwhile is
        // newer than it.
        if let Some(n) = self.expanding.pop_front() {
            return Some(n);
        }
        if let Some(n) = self.exact.pop_front() {
            self.held_bytes -= data_len(&n);
            return Some(n);
        }
        while let Some(&(t, key)) = self.timed.first()
            && t <= now
        {
            self.timed.pop_first();
            self.order.push_back(key);
            // It is in the send order now: nothing may queue it again.
            if let Some(s) = self.summaries.get_mut(&key) {
                s.due = None;
            }
        }
        let key = self.order.pop_front()?;
        let s = self
            .summaries
            .remove(&key)
            .expect("ordered summaries exist");
        if let Some(w) = self.watches.get_mut(&key)
            && !w.config.min_interval.is_zero()
        {
            w.next = Some(now + w.config.min_interval);
        }
        let (ptr, xid) = key;
        let note = |event| Notification::new(ConnId(0), xid, event, ptr, s.version);
        if s.kinds & DELETED != 0 {
            if let Some(d) = &s.data {
                self.held_bytes -= d.held();
            }
            self.watches.remove(&key);
            self.expanding.push_back(note(Event::Deleted));
        } else {
            for (bit, event) in [(OWNER, Event::OwnerChanged), (ACCESS, Event::AccessChanged)] {
                if s.kinds & bit != 0 {
                    self.expanding.push_back(note(event));
                }
            }
            if s.kinds & CHANGED != 0 {
                let mut n = note(Event::Changed);
                if let Some(d) = s.data {
                    self.held_bytes -= d.held();
                    n.delta = d.into_delta();
                }
                self.expanding.push_back(n);
            }
        }
        self.expanding.pop_front()
    }

    /// When the next rate-limited summary becomes due, if nothing else waits.
    pub fn next_due(&self) -> Option<Instant> {
        if !self.exact.is_empty() || !self.expanding.is_empty() || !self.order.is_empty() {
            return None;
        }
        self.timed.first().map(|(t, _)| *t)
    }

    /// True when something may be sent now.
    pub fn ready(&self, now: Instant) -> bool {
        !self.exact.is_empty()
            || !self.expanding.is_empty()
            || !self.order.is_empty()
            || self.timed.first().is_some_and(|(t, _)| *t <= now)
    }

    /// Notifications waiting (a summary counts once).
    pub fn len(&self) -> usize {
        self.exact.len() + self.expanding.len() + self.order.len() + self.timed.len()
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Data bytes held for data watches (exact notifications and summaries).
    pub fn held_bytes(&self) -> usize {
        self.held_bytes
    }

    /// Notifications merged into summaries so far.
    pub fn merged(&self) -> u64 {
        self.merged
    }
}

fn delta_bytes(d: &Delta) -> usize {
    d.ranges.iter().map(|(_, b)| b.len()).sum()
}

impl DataSummary {
    fn held(&self) -> usize {
        self.ranges.values().map(Bytes::len).sum()
    }

    fn lose(&mut self) {
        self.lost = true;
        self.ranges.clear();
    }

    /// Lays `bytes` at `start` over the ranges held so far, cutting away what it
    /// overwrites.
    fn overlay(&mut self, start: u64, bytes: Bytes) {
        let end = start + bytes.len() as u64;
        if end == start {
            return;
        }
        let overlapping: Vec<u64> = self
            .ranges
            .range(..end)
            .rev()
            .take_while(|(o, b)| **o + b.len() as u64 > start)
            .map(|(o, _)| *o)
            .collect();
        for o in overlapping {
            let b = self.ranges.remove(&o).expect("listed");
            let e = o + b.len() as u64;
            if o < start {
                self.ranges.insert(o, b.slice(..(start - o) as usize));
            }
            if e > end {
                self.ranges.insert(end, b.slice((end - o) as usize..));
            }
        }
        self.ranges.insert(start, bytes);
    }

    /// The record is now `size` bytes: what lies past it is dropped.
    fn cut(&mut self, size: u64) {
        self.size = size;
        let past: Vec<u64> = self
            .ranges
            .iter()
            .rev()
            .take_while(|(o, b)| **o + b.len() as u64 > size)
            .map(|(o, _)| *o)
            .collect();
        for o in past {
            let b = self.ranges.remove(&o).expect("listed");
            if o < size {
                self.ranges.insert(o, b.slice(..(size - o) as usize));
            }
        }
    }

    /// The merged delta, or `None` when the bytes were lost or do not fit one message.
    fn into_delta(self) -> Option<Delta> {
        let (base, _) = self.span?;
        if self.lost {
            return None;
        }
        let delta = Delta {
            base,
            size: self.size,
            ranges: self.ranges.into_iter().collect(),
        };
        (delta.wire_len() as u64 <= MAX_MESSAGE).then_some(delta)
    }
}

#[cfg(test)]
mod tests;
