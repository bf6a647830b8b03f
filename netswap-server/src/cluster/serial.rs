//! One change at a time per record on a gateway, and the writes that queued
//! together committed together.
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
//! One change per round trip caps a record written by many at one write per round
//! trip (docs/BENCHMARKS.md, "Records picked by Zipf's law"). So a write that may be
//! committed with others ([`Serial::enter_group`]: the caller says which) and finds a
//! *group* open, one whose leader still waits for the turn, joins it instead of
//! queueing behind it: the leader, once it has the turn, decides its members in
//! order, each on the state the one before leaves, and commits them together
//! (`ClusterStore::apply_group`). A request that may not be grouped closes the open
//! group as it queues, so nothing joins a group ahead of a request that came before
//! it: the order of arrival holds.
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
#[derive(Debug)]
struct Queue<F> {
    turn: Arc<tokio::sync::Mutex<()>>,
    /// How many hold or wait for the turn (members of a group are not counted:
    /// their leader is).
    users: usize,
    /// Races lost in a row by the record's commits.
    lost: u32,
    /// The group that writes may still join: its id and members.
    open: Option<(u64, Vec<F>)>,
    /// How many members the open group may take in all (its leader's own writes
    /// left out).
    room: usize,
    /// Groups closed with members that their leaders have not taken yet.
    closed: Vec<(u64, Vec<F>)>,
}

impl<F> Default for Queue<F> {
    fn default() -> Self {
        Queue {
            turn: Arc::default(),
            users: 0,
            lost: 0,
            open: None,
            room: 0,
            closed: Vec::new(),
        }
    }
}

/// The queues of the keys (records, by default) that have changes in flight on this
/// gateway; `F`: what a member of a group is.
#[derive(Debug)]
pub(crate) struct Serial<K = Pointer, F = ()> {
    queues: Mutex<HashMap<K, Queue<F>>>,
    /// Changes that found an earlier change of their key in flight or waiting.
    pub queued: AtomicU64,
    /// Changes that joined a group rather than queueing.
    pub joined: AtomicU64,
    next_group: AtomicU64,
}

impl<K, F> Default for Serial<K, F> {
    fn default() -> Self {
        Serial {
            queues: Mutex::new(HashMap::new()),
            queued: AtomicU64::new(0),
            joined: AtomicU64::new(0),
            next_group: AtomicU64::new(0),
        }
    }
}

/// A key's turn, held until dropped (also while still waiting for it: a request
/// dropped in the queue leaves it, and the members of its group, if it led one, are
/// dropped: they learn it from their channels).
pub(crate) struct Turn<'a, K: Hash + Eq + Copy = Pointer, F = ()> {
    serial: SerialRef<'a, K, F>,
    key: K,
    held: Option<OwnedMutexGuard<()>>,
    /// The group it leads, until it takes the members.
    group: Option<u64>,
    /// Counted in its queue's users (until detached).
    counted: bool,
}

/// The queues a turn is of: borrowed, or shared by a turn that outlives its
/// request ([`Turn::detach`]).
enum SerialRef<'a, K, F> {
    Borrowed(&'a Serial<K, F>),
    Shared(Arc<Serial<K, F>>),
}

impl<K, F> std::ops::Deref for SerialRef<'_, K, F> {
    type Target = Serial<K, F>;
    fn deref(&self) -> &Serial<K, F> {
        match self {
            SerialRef::Borrowed(s) => s,
            SerialRef::Shared(s) => s,
        }
    }
}

/// How [`Serial::enter_group`] went.
pub(crate) enum Entered<'a, K: Hash + Eq + Copy, F> {
    /// The turn, with the members that joined the caller's group while it waited,
    /// in the order they came (none if nothing was ahead of it: then nothing could);
    /// from [`Serial::enter_group_many`], the caller's own members first.
    Lead(Turn<'a, K, F>, Vec<F>),
    /// The caller's member (made by `join`) joined another's group: its leader has
    /// it now.
    Joined,
}

impl<K: Hash + Eq + Copy, F> Serial<K, F> {
    /// Waits for `key`'s turn, after the changes of `key` that came before. Closes
    /// the open group: nothing that comes later joins a group ahead of this.
    pub async fn enter(&self, key: K) -> Turn<'_, K, F> {
        let (queue, _) = self.queue_up(lock(&self.queues).entry(key).or_default(), None);
        let mut turn = Turn {
            serial: SerialRef::Borrowed(self),
            key,
            held: None,
            group: None,
            counted: true,
        };
        turn.held = Some(queue.lock_owned().await);
        turn
    }

    /// Joins `key`'s open group, if there is one with fewer than `max` members, with
    /// the member `join` makes; else waits for the turn as [`Serial::enter`] does,
    /// leading a new group that writes coming meanwhile may join if a change was
    /// ahead of it.
    pub async fn enter_group(
        &self,
        key: K,
        max: usize,
        join: impl FnOnce() -> F,
    ) -> Entered<'_, K, F> {
        let (queue, group) = {
            let mut queues = lock(&self.queues);
            let queue = queues.entry(key).or_default();
            if let Some((_, members)) = &mut queue.open
                && members.len() < queue.room
            {
                members.push(join());
                self.joined.fetch_add(1, Ordering::Relaxed);
                return Entered::Joined;
            }
            // The leader is the group's first.
            self.queue_up(queue, Some(max.saturating_sub(1)))
        };
        self.lead(key, queue, group, Vec::new()).await
    }

    /// [`Serial::enter_group`] for several members at once (`own`, in their order,
    /// at most `max`): all join the open group if it has room for all; else the
    /// caller leads a new group with them first, and the members that join it while
    /// it waits after them (`Entered::Lead` has `own` followed by those).
    pub async fn enter_group_many(&self, key: K, max: usize, own: Vec<F>) -> Entered<'_, K, F> {
        let (queue, group) = {
            let mut queues = lock(&self.queues);
            let queue = queues.entry(key).or_default();
            if let Some((_, members)) = &mut queue.open
                && members.len() + own.len() <= queue.room
            {
                self.joined.fetch_add(own.len() as u64, Ordering::Relaxed);
                members.extend(own);
                return Entered::Joined;
            }
            self.queue_up(queue, Some(max.saturating_sub(own.len())))
        };
        self.lead(key, queue, group, own).await
    }

    /// Waits for the turn of a caller that leads group `group` (if one was opened):
    /// `own` and the members that joined it.
    async fn lead(
        &self,
        key: K,
        queue: Arc<tokio::sync::Mutex<()>>,
        group: Option<u64>,
        mut own: Vec<F>,
    ) -> Entered<'_, K, F> {
        let mut turn = Turn {
            serial: SerialRef::Borrowed(self),
            key,
            held: None,
            group,
            counted: true,
        };
        turn.held = Some(queue.lock_owned().await);
        let joined = turn.take_members();
        if own.is_empty() {
            own = joined;
        } else {
            own.extend(joined);
        }
        Entered::Lead(turn, own)
    }

    /// Counts one more user of a queue and closes its open group; opens a new
    /// one (its id returned) with room for `group` members when that is given and a
    /// change is ahead.
    fn queue_up(
        &self,
        queue: &mut Queue<F>,
        group: Option<usize>,
    ) -> (Arc<tokio::sync::Mutex<()>>, Option<u64>) {
        queue.users += 1;
        if queue.users > 1 {
            self.queued.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(open) = queue.open.take()
            && !open.1.is_empty()
        {
            queue.closed.push(open);
        }
        let id = group.filter(|_| queue.users > 1).map(|room| {
            let id = self.next_group.fetch_add(1, Ordering::Relaxed);
            queue.open = Some((id, Vec::new()));
            queue.room = room;
            id
        });
        (queue.turn.clone(), id)
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

impl<K: Hash + Eq + Copy, F> Turn<'_, K, F> {
    /// The members of the group this turn leads (none once taken), closing it.
    fn take_members(&mut self) -> Vec<F> {
        let Some(id) = self.group.take() else {
            return Vec::new();
        };
        let mut queues = lock(&self.serial.queues);
        let Some(q) = queues.get_mut(&self.key) else {
            return Vec::new();
        };
        if q.open.as_ref().is_some_and(|(g, _)| *g == id) {
            return q.open.take().map(|(_, m)| m).unwrap_or_default();
        }
        match q.closed.iter().position(|(g, _)| *g == id) {
            Some(at) => q.closed.swap_remove(at).1,
            None => Vec::new(),
        }
    }

    /// The turn, made to outlive the borrow of its queues (for a task of its own);
    /// `serial` is the same queues.
    pub fn detach(mut self, serial: Arc<Serial<K, F>>) -> Turn<'static, K, F> {
        // What is left of `self` is dropped without leaving the queue.
        self.counted = false;
        Turn {
            serial: SerialRef::Shared(serial),
            key: self.key,
            held: self.held.take(),
            group: self.group.take(),
            counted: true,
        }
    }
}

impl<K: Hash + Eq + Copy, F> Drop for Turn<'_, K, F> {
    fn drop(&mut self) {
        // A leader dropped while it waited: its members go with it (dropped after the
        // lock, as anything they own may wake others).
        let orphans = self.take_members();
        // The next in the queue may go now.
        self.held = None;
        if !self.counted {
            return;
        }
        let mut queues = lock(&self.serial.queues);
        if let Some(q) = queues.get_mut(&self.key) {
            q.users -= 1;
            if q.users == 0 {
                queues.remove(&self.key);
            }
        }
        drop(queues);
        drop(orphans);
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
        let serial = Arc::new(Serial::<Pointer>::default());
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
        let serial = Arc::new(Serial::<Pointer>::default());
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
        let serial = Arc::new(Serial::<Pointer>::default());
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

    /// Writes that queue behind a change join one group, in arrival order; a request
    /// that may not be grouped closes it, and later writes form a new group behind.
    /// A write with nothing ahead of it leads no group: nothing waits to join it.
    #[tokio::test]
    async fn writes_that_queue_together_join_one_group_in_arrival_order() {
        let serial = Arc::new(Serial::<Pointer, u32>::default());
        match serial
            .enter_group(ptr(1), 4, || unreachable!("nothing to join"))
            .await
        {
            Entered::Lead(turn, members) => {
                assert!(members.is_empty());
                assert!(turn.group.is_none(), "nothing was ahead: no group");
            }
            Entered::Joined => panic!("nothing to join"),
        }
        let first = serial.enter(ptr(1)).await;
        let lead = |id| {
            let s = serial.clone();
            tokio::spawn(async move {
                match s
                    .enter_group(ptr(1), 4, || unreachable!("{id} leads"))
                    .await
                {
                    Entered::Lead(_, members) => members,
                    Entered::Joined => panic!("{id} leads"),
                }
            })
        };
        let joins = |id: u32| {
            let s = serial.clone();
            async move {
                assert!(matches!(
                    s.enter_group(ptr(1), 4, || id).await,
                    Entered::Joined
                ));
            }
        };
        let leader = lead(10);
        tokio::time::sleep(Duration::from_millis(5)).await;
        for m in 11..14 {
            joins(m).await;
        }
        // The group is full (four with its leader): the next write leads a group of
        // its own.
        let second = lead(20);
        tokio::time::sleep(Duration::from_millis(5)).await;
        // A request that may not be grouped closes the open group...
        let plain = {
            let s = serial.clone();
            tokio::spawn(async move { drop(s.enter(ptr(1)).await) })
        };
        tokio::time::sleep(Duration::from_millis(5)).await;
        // ... so this write leads a third group, behind it.
        let third = lead(30);
        tokio::time::sleep(Duration::from_millis(5)).await;
        joins(31).await;
        joins(32).await;
        drop(first);
        assert_eq!(leader.await.unwrap(), vec![11, 12, 13]);
        assert_eq!(second.await.unwrap(), Vec::<u32>::new());
        plain.await.unwrap();
        assert_eq!(third.await.unwrap(), vec![31, 32]);
        assert_eq!(serial.joined.load(Ordering::Relaxed), 5);
        assert_eq!(serial.len(), 0, "no queue left behind");
    }

    /// Several writes entered at once (a connection's burst) join the open group
    /// only if it has room for all of them, else lead a group of their own, first in
    /// it, which later writes may join up to the group's size.
    #[tokio::test]
    async fn writes_entered_together_join_or_lead_together() {
        let serial = Arc::new(Serial::<Pointer, u32>::default());
        let first = serial.enter(ptr(1)).await;
        let lead = |own: Vec<u32>| {
            let s = serial.clone();
            tokio::spawn(async move {
                match s.enter_group_many(ptr(1), 4, own).await {
                    Entered::Lead(_, members) => members,
                    Entered::Joined => panic!("leads"),
                }
            })
        };
        let a = lead(vec![1, 2]);
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(matches!(
            serial.enter_group(ptr(1), 4, || 3).await,
            Entered::Joined
        ));
        // Two more do not fit in a group of four with three in it.
        let b = lead(vec![4, 5]);
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(matches!(
            serial.enter_group(ptr(1), 4, || 6).await,
            Entered::Joined
        ));
        assert!(matches!(
            serial.enter_group_many(ptr(1), 4, vec![7]).await,
            Entered::Joined
        ));
        // Full: this one leads a group of its own.
        let c = lead(vec![8]);
        tokio::time::sleep(Duration::from_millis(5)).await;
        drop(first);
        assert_eq!(a.await.unwrap(), vec![1, 2, 3]);
        assert_eq!(b.await.unwrap(), vec![4, 5, 6, 7]);
        assert_eq!(c.await.unwrap(), vec![8]);
        assert_eq!(serial.joined.load(Ordering::Relaxed), 3);
        assert_eq!(serial.len(), 0, "no queue left behind");
    }

    /// A leader dropped while it waits for the turn drops its members (their
    /// channels tell them) and leaves the queue; a turn detached for a task of its
    /// own still holds the record and leaves the queue once.
    #[tokio::test]
    async fn a_leader_dropped_while_waiting_drops_its_members() {
        type Member = tokio::sync::oneshot::Sender<()>;
        let serial = Arc::new(Serial::<Pointer, Member>::default());
        let held = serial.enter(ptr(8)).await;
        let s = serial.clone();
        let leader = tokio::spawn(async move {
            let _ = s.enter_group(ptr(8), 8, || unreachable!()).await;
        });
        tokio::time::sleep(Duration::from_millis(5)).await;
        let (tx, rx) = tokio::sync::oneshot::channel();
        assert!(matches!(
            serial.enter_group(ptr(8), 8, || tx).await,
            Entered::Joined
        ));
        leader.abort();
        let _ = leader.await;
        assert!(rx.await.is_err(), "the member learns its leader is gone");
        drop(held);
        assert_eq!(serial.len(), 0);

        let turn = serial.enter(ptr(8)).await.detach(serial.clone());
        let s = serial.clone();
        let next = tokio::spawn(async move { drop(s.enter(ptr(8)).await) });
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(!next.is_finished(), "the detached turn holds the record");
        drop(turn);
        next.await.unwrap();
        assert_eq!(serial.len(), 0, "the detached turn left the queue");
    }
}
