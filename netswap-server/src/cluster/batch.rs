//! Loads and commits of many requests, sent to Redis together.
//!
//! A load is a few commands on one record's keys, a commit one `EVALSHA` (both in one
//! hash slot). Sent alone, each is one request through the `redis` crate's cluster
//! client, which costs the gateway more than the commands themselves: a message to
//! the client's routing task, a slot lookup, a message to the node's connection task,
//! a reply handed back through two channels, timers (docs/BENCHMARKS.md: the crate
//! and the task switches were a third of the gateway's CPU per READ). So they go
//! through a [`Batcher`]: what arrives while its task waits for its turn to run (the
//! requests of one turn of the event loop) is grouped by the primary that serves
//! each slot, and each group goes out as one pipeline, routed by the crate to the
//! first entry's slot.
//!
//! Which primary serves which slot comes from `CLUSTER NODES` (read every second,
//! [`primaries_by_id`]); the crate's routing stays the authority. When a slot moved since
//! the last reading, a command of a group gets `MOVED` or `ASK`, the crate retries the
//! whole group, and when it still fails every entry is sent again on its own
//! ([`Batcher::send`] returns `None`), routed by the crate alone. That is safe
//! because what goes in a group may be sent twice: loads only read, and a commit
//! carries an operation id that makes a re-send find it applied (`scripts::COMMIT`);
//! the caller treats a failed group like a lost reply. A group keeps each entry's
//! commands together and in order, which is all a load relies on
//! (docs/ARCHITECTURE.md).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::stream::{FuturesUnordered, StreamExt};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, SingleNodeRoutingInfo, SlotAddr};
use redis::{Cmd, RedisResult, Value};
use tokio::sync::{Notify, oneshot};

use super::lock;
use super::redis_io::{asked, on_slot, slot_moving, slot_of};

/// Hash slots of Redis Cluster.
const SLOTS: usize = 16_384;
/// A slot whose primary is not known.
pub(crate) const UNKNOWN: u16 = u16::MAX;
/// Entries (loads or commits) per pipeline at most: bounds one pipeline's size when
/// very many requests arrive at once.
pub(crate) const MAX_GROUP: usize = 256;

/// What an entry gets back: its commands' replies, or `None`: send again alone.
type Answer = Option<RedisResult<Vec<Value>>>;

struct Item {
    slot: u16,
    cmds: Vec<Cmd>,
    answer: oneshot::Sender<Answer>,
}

#[derive(Default)]
struct Inner {
    queue: Vec<Item>,
    /// The primary of each slot, as an index of its own (`UNKNOWN`: none known).
    primaries: Vec<u16>,
}

/// How batching went (for `/metrics`).
#[derive(Debug, Default)]
pub(crate) struct BatchCounters {
    /// Pipelines sent.
    pub pipelines: AtomicU64,
    /// Loads and commits they carried.
    pub carried: AtomicU64,
    /// Loads and commits of groups that failed, sent again on their own.
    pub resent: AtomicU64,
}

/// Collects loads and commits and sends them in pipelines, one per primary (module
/// docs).
#[derive(Default)]
pub(crate) struct Batcher {
    inner: Mutex<Inner>,
    wake: Notify,
    pub counters: BatchCounters,
}

impl Batcher {
    /// Sends `cmds` (on keys of `slot`) with the commands of other requests that come
    /// in meanwhile, and returns their replies (errors left in place, as Redis gave
    /// them). `None`: they could not go with others (or the batcher is gone); send
    /// them again on their own.
    pub async fn send(&self, slot: u16, cmds: Vec<Cmd>) -> Answer {
        let (answer, rx) = oneshot::channel();
        let first = {
            let mut inner = lock(&self.inner);
            inner.queue.push(Item { slot, cmds, answer });
            inner.queue.len() == 1
        };
        if first {
            self.wake.notify_one();
        }
        rx.await.unwrap_or(None)
    }

    /// Sends the commands `build` makes (idempotent commands on keys of `key`'s
    /// slot: a group that fails may have run them) with other requests' commands, or
    /// alone (built again) when they cannot go together, or without a batcher; their
    /// replies, errors left in place. The connection is taken from `conn` only then.
    pub async fn send_idempotent(
        batch: Option<&Batcher>,
        conn: &super::Replaceable,
        key: &str,
        build: impl Fn() -> Vec<Cmd>,
    ) -> RedisResult<Vec<Value>> {
        let slot = slot_of(key);
        if let Some(b) = batch
            && let Some(replies) = b.send(slot, build()).await
        {
            return replies;
        }
        // Boxed: the rare path, and a request's future holds room for its largest await.
        Box::pin(on_slot(&conn.get(), slot, build)).await
    }

    /// Which primary serves which slot, from `CLUSTER NODES` (see [`primaries_by_id`]).
    pub fn set_primaries(&self, primaries: Vec<u16>) {
        lock(&self.inner).primaries = primaries;
    }

    /// The batcher's task: sends what comes in, forever (the store aborts it when
    /// dropped).
    pub async fn drive(self: Arc<Self>, commands: Arc<super::Replaceable>) {
        let mut sending = FuturesUnordered::new();
        loop {
            tokio::select! {
                biased;
                Some(()) = sending.next(), if !sending.is_empty() => {}
                () = self.wake.notified() => {
                    // Let the other tasks that are ready run first: what they send joins
                    // this batch.
                    tokio::task::yield_now().await;
                    let groups = {
                        let mut inner = lock(&self.inner);
                        let inner = &mut *inner;
                        group(std::mem::take(&mut inner.queue), &inner.primaries)
                    };
                    for g in groups {
                        sending.push(send_group(commands.get(), g, &self.counters));
                    }
                }
            }
        }
    }
}

/// Splits `items` into groups to send together: by primary (at most `MAX_GROUP`
/// entries each).
fn group(mut items: Vec<Item>, primaries: &[u16]) -> Vec<Vec<Item>> {
    items.sort_unstable_by_key(|i| group_key(primaries, i.slot));
    let mut groups: Vec<Vec<Item>> = Vec::new();
    let mut last = None;
    for item in items {
        let key = group_key(primaries, item.slot);
        match groups.last_mut() {
            Some(g) if last == Some(key) && g.len() < MAX_GROUP => g.push(item),
            _ => groups.push(vec![item]),
        }
        last = Some(key);
    }
    groups
}

/// Entries with the same key go in one pipeline: the slot's primary when it is known,
/// else the slot itself.
fn group_key(primaries: &[u16], slot: u16) -> u32 {
    match primaries.get(slot as usize) {
        Some(&p) if p != UNKNOWN => p as u32,
        _ => 0x1_0000 + slot as u32,
    }
}

/// Sends one group as one pipeline to the primary of its first entry's slot, and
/// hands each entry its replies.
async fn send_group(conn: ClusterConnection, group: Vec<Item>, counters: &BatchCounters) {
    counters.pipelines.fetch_add(1, Ordering::Relaxed);
    counters
        .carried
        .fetch_add(group.len() as u64, Ordering::Relaxed);
    let total: usize = group.iter().map(|i| i.cmds.len()).sum();
    let route = SingleNodeRoutingInfo::SpecificNode(Route::new(group[0].slot, SlotAddr::Master));
    let mut pipe = redis::Pipeline::with_capacity(total);
    let mut answers = Vec::with_capacity(group.len());
    for item in group {
        answers.push((item.cmds.len(), item.answer));
        for c in item.cmds {
            pipe.add_command(c);
        }
    }
    let result = conn.clone().route_pipeline(pipe, 0, total, route).await;
    // A slot of the group is being migrated: its entries go again alone (see
    // `on_slot`), as after any failure of the group.
    let asked = asked(&result);
    match result {
        Ok(values) if values.len() == total && !asked => {
            let mut values = values.into_iter();
            for (n, answer) in answers {
                let _ = answer.send(Some(Ok(values.by_ref().take(n).collect())));
            }
        }
        // One entry alone: its own error (the crate retried it as it would have),
        // unless its slot moved on meanwhile (`on_slot` follows it further).
        Err(e) if answers.len() == 1 && !asked && !slot_moving(&e) => {
            let (_, answer) = answers.pop().expect("one");
            let _ = answer.send(Some(Err(e)));
        }
        _ => {
            counters
                .resent
                .fetch_add(answers.len() as u64, Ordering::Relaxed);
            for (_, answer) in answers {
                let _ = answer.send(None);
            }
        }
    }
}

/// The primary of each slot (an index per primary; `UNKNOWN` where no healthy
/// primary claims the slot), from the text of `CLUSTER NODES`, and the id of each
/// index's primary.
pub(crate) fn primaries_by_id(nodes: &str) -> (Vec<u16>, Vec<String>) {
    let mut map = vec![UNKNOWN; SLOTS];
    let mut ids = Vec::new();
    let masters = nodes
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f.len() >= 8 && f[2].contains("master") && !f[2].contains("fail"));
    for (i, f) in masters.enumerate() {
        ids.push(f[0].to_string());
        // Slot ranges "a-b" or single slots "a"; "[slot->-node]" entries of a
        // migration are skipped (the crate follows those by ASK).
        for r in &f[8.min(f.len())..] {
            let (a, b) = match r.split_once('-') {
                Some((a, b)) => (a.parse::<usize>().ok(), b.parse::<usize>().ok()),
                None => (r.parse().ok(), r.parse().ok()),
            };
            if let (Some(a), Some(b)) = (a, b)
                && a <= b
                && b < SLOTS
            {
                map[a..=b].fill(i as u16);
            }
        }
    }
    (map, ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODES: &str = "\
07c37dfeb235213a872192d90877d0cd55635b91 127.0.0.1:30004@31004 slave e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 0 1426238317239 4 connected
67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 127.0.0.1:30002@31002 master - 0 1426238316232 2 connected 5461-10922
292f8b365bb7edb5e285caf0b7e6ddc7265d2f4f 127.0.0.1:30003@31003 master - 0 1426238318243 3 connected 10923-16383 [77->-e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca]
e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 127.0.0.1:30001@31001 myself,master - 0 0 1 connected 0-5460 77
9f1e2e1c3c4b5a6978877665544332211aabbccd 127.0.0.1:30005@31005 master,fail - 0 0 5 connected
";

    #[test]
    fn primaries_map_every_slot_to_its_healthy_primary() {
        let p = primaries_by_id(NODES).0;
        assert_eq!(p.len(), SLOTS);
        assert_eq!((p[5461], p[10922]), (0, 0));
        assert_eq!((p[10923], p[16383]), (1, 1));
        assert_eq!((p[0], p[77], p[5460]), (2, 2, 2));
        // Two slots on one primary group together; on two, apart; unknown: by slot.
        assert_eq!(group_key(&p, 0), group_key(&p, 5460));
        assert_ne!(group_key(&p, 0), group_key(&p, 5461));
        assert_eq!(group_key(&[], 7), 0x1_0000 + 7);
        assert_ne!(group_key(&[], 7), group_key(&[], 8));
    }

    fn item(slot: u16) -> Item {
        Item {
            slot,
            cmds: vec![redis::cmd("PING")],
            answer: oneshot::channel().0,
        }
    }

    #[test]
    fn loads_group_by_primary_and_unknown_slots_go_alone() {
        let p = primaries_by_id(NODES).0;
        let slots = |g: &Vec<Item>| g.iter().map(|i| i.slot).collect::<Vec<_>>();
        let groups = group([0, 6000, 5460, 16000, 7, 12000].map(item).into(), &p);
        let mut got: Vec<Vec<u16>> = groups.iter().map(slots).collect();
        for g in &mut got {
            g.sort();
        }
        got.sort();
        assert_eq!(got, vec![vec![0, 7, 5460], vec![6000], vec![12000, 16000]]);
        // Without a map, only loads on one slot go together.
        let groups = group([3, 4, 3].map(item).into(), &[]);
        assert_eq!(
            groups.iter().map(slots).collect::<Vec<_>>(),
            [vec![3, 3], vec![4]]
        );
        // Never more than MAX_GROUP in one pipeline.
        let groups = group((0..MAX_GROUP + 1).map(|_| item(1)).collect(), &p);
        assert_eq!(
            groups.iter().map(Vec::len).collect::<Vec<_>>(),
            [MAX_GROUP, 1]
        );
    }

    #[test]
    fn primaries_of_garbage_are_unknown() {
        let p = primaries_by_id("nonsense\n1 2 master - 0 0 1 connected 9-3 x-y 20000\n\n").0;
        assert!(p.iter().all(|&x| x == UNKNOWN));
    }
}
