//! A read cache kept exact (`--redis-read-cache N`, off by default): small records
//! (bytes in their state hash) held by the gateway, answered without a load, and never
//! older than a change acknowledged before the request arrived, through any gateway.
//!
//! - **Tracking.** The gateway holds one connection of its own to each primary
//!   (RESP3), with `CLIENT TRACKING ON`: Redis remembers the keys read on it and
//!   pushes an invalidation on it for the next change of each, whoever makes it (then
//!   forgets the key until it is read again). The `redis` crate hands a push to
//!   [`Entries`] in the connection's reading task, before it reads on: every
//!   invalidation that came before a reply is applied before the reply's caller runs.
//! - **Fills.** A load of a record last seen with its bytes in its hash goes on that
//!   connection (one `HMGET`, as a load through the connection for commands does),
//!   which makes Redis track the record's state hash for it, and fills an entry. Before
//!   it is sent, a placeholder is put in: an invalidation of the record takes it away,
//!   and the reply fills only if it is still there. A change made after the `HMGET`
//!   was executed pushes its invalidation after the reply on the same connection, so
//!   no entry is ever filled with a state older than the last invalidation seen. (Every
//!   change of a record writes its state hash, also one that changes only its data
//!   key; only records whose bytes are in the hash are held.) The fills of one pass go
//!   as one pipeline (the crate hands the pushes between its replies over before the
//!   pipeline's reply, so a fill is only the more careful for it). While the cache
//!   serves few hits, only some loads fill ([`ReadCache::admits`]).
//! - **Barriers.** A hit is answered only after a barrier on the connection that
//!   filled it: one `EXISTS` of a key on a slot of that primary, sent after the
//!   request arrived, shared by all the hits on that primary that come while the one
//!   before is in flight (one task sends them; hits wait on a `watch`). A change
//!   acknowledged before the request arrived was executed by the primary before it
//!   read the barrier, and Redis writes a tracked key's invalidation into the tracking
//!   connection's output while it executes the change (`trackingInvalidateKey`, from
//!   `signalModifiedKey`). So the invalidation is ahead of the barrier's reply on the
//!   connection, and the entry is gone when the barrier returns; the entry is used
//!   only if it is still there then.
//! - **Only a primary vouches.** A replica applies its primary's changes later than
//!   they were acknowledged, so the rule above does not hold for it. A barrier on a
//!   node that is not (any more) the primary of the probed slot is answered `MOVED`
//!   (a replica without `READONLY` redirects every key), and fails; a fill there too.
//!   A failover that makes the primary a replica keeps the connection open, so this
//!   matters (test `a_read_cache_stays_exact_while_its_primary_is_made_a_replica`).
//! - **What drops entries.** An invalidation of the record; a `FLUSHALL` (an
//!   invalidation of everything); the connection closing (its entries go; the next
//!   look at the layout connects again); a barrier or fill on it that times out (the
//!   connection is given up: the requests after it load at once instead of each
//!   waiting for the node, and the next look connects again); a primary no longer
//!   serving slots (its entries go). A barrier that fails (the node is a replica now
//!   and answers `MOVED`, the slot is migrating and answers `ASK`, a timeout) is a
//!   miss: the request loads as without the cache. Keys a slot's migration moves are
//!   deleted on the old primary, which invalidates them there.
//! - **The window Redis Cluster has itself.** A primary cut off from the rest of the
//!   cluster, but not from this gateway, answers barriers until it notices (the
//!   cluster's node timeout), while its replica may already acknowledge changes; in
//!   that window Redis Cluster also acknowledges writes on the old primary that it
//!   then loses.
//!
//! What it costs: a change of a record some gateways filled since its last change is
//! pushed to each of them (about a `SPUBLISH` to one subscriber each; none for a record
//! no gateway holds), and Redis keeps a table of the keys each tracking connection
//! read (`tracking-table-max-keys` bounds it: past it Redis forgets keys at random
//! and pushes their invalidation, which only costs the gateway a fill).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hashbrown::HashMap;
use netswap_proto::Pointer;
use redis::aio::MultiplexedConnection;
use redis::{PushInfo, PushKind, RedisResult, Value};
use tracing::{debug, warn};

use super::batch::UNKNOWN;
use super::clock::{Clock, Hand};
use super::keys::{Keys, RecordKeys};
use super::redis_io::{self, Stored};
use super::{ClusterOptions, lock};

/// What the read cache counted (for `/metrics`).
#[derive(Debug, Default)]
pub(crate) struct ReadCounters {
    /// Loads answered from the cache (after their barrier).
    pub hits: AtomicU64,
    /// Loads that went on a tracking connection and filled (or tried to fill) an
    /// entry.
    pub fills: AtomicU64,
    /// Hits whose barrier failed or whose entry went meanwhile (loaded instead).
    pub missed_at_barrier: AtomicU64,
    /// Barriers sent.
    pub barriers: AtomicU64,
    /// Entries (or placeholders) dropped by an invalidation.
    pub invalidations: AtomicU64,
    /// Invalidation pushes received (Redis sends one per change of a record this
    /// gateway read since its last change: what the cache costs Redis per write).
    pub pushes: AtomicU64,
    /// Loads that could have filled an entry but did not, the cache serving few
    /// hits ([`ReadCache::admits`]).
    pub bypassed: AtomicU64,
}

/// An entry of the cache.
enum Entry {
    /// A fill on `tracker`'s connection is under way; it fills only if this is still
    /// here (the same `token`) when its reply comes.
    Filling { token: u64, tracker: Arc<Tracker> },
    /// The record as `tracker`'s connection last read it, with all of its bytes.
    /// `hit`: answered a READ since the eviction's hand last passed it ([`Clock`]).
    Ready {
        token: u64,
        tracker: Arc<Tracker>,
        rec: Stored,
        hit: bool,
    },
}

impl Entry {
    fn tracker(&self) -> u64 {
        match self {
            Entry::Filling { tracker, .. } | Entry::Ready { tracker, .. } => tracker.id,
        }
    }
}

impl Hand for Entry {
    fn token(&self) -> u64 {
        match self {
            Entry::Filling { token, .. } | Entry::Ready { token, .. } => *token,
        }
    }

    fn second_chance(&mut self) -> bool {
        match self {
            Entry::Ready { hit, .. } => std::mem::take(hit),
            Entry::Filling { .. } => false,
        }
    }
}

/// The entries, shared with the tracking connections' push handlers.
struct Entries {
    map: HashMap<Pointer, Entry>,
    capacity: usize,
    next_token: u64,
    clock: Clock,
}

impl Entries {
    fn token(&mut self) -> u64 {
        self.next_token += 1;
        self.next_token
    }

    /// Puts `entry` in for `ptr`, making room when full (the [`Clock`] picks what goes).
    fn put(&mut self, ptr: Pointer, entry: Entry) {
        if !self.map.contains_key(&ptr)
            && self.map.len() >= self.capacity
            && let Some(victim) = self.clock.victim(&mut self.map)
        {
            self.map.remove(&victim);
        }
        let token = entry.token();
        self.map.insert(ptr, entry);
        self.clock.filled(ptr, token, &self.map);
    }

    /// Drops the entries filled on the tracking connection `tracker`.
    fn drop_tracker(&mut self, tracker: u64) {
        self.map.retain(|_, e| e.tracker() != tracker);
    }
}

/// One tracking connection to a primary.
pub(crate) struct Tracker {
    id: u64,
    /// The primary's id.
    node: String,
    /// Cleared when the connection closes (its push handler sees it go).
    alive: Arc<AtomicBool>,
    barriers: Arc<Barriers>,
    fills: Arc<Fills>,
    /// The tasks that send the barriers and the fills (aborted with the tracker).
    drivers: [tokio::task::JoinHandle<()>; 2],
}

impl Drop for Tracker {
    fn drop(&mut self) {
        for d in &self.drivers {
            d.abort();
        }
    }
}

/// A tracking connection's fills waiting to be sent: the ones that come in one pass
/// go to Redis as one pipeline (sent alone, each was a write and a read of its own
/// for Redis: READs of 100,000 records through 16,384 entries, mostly fills, were
/// 0.80× of the same gateway without the cache at pipeline 1).
#[derive(Default)]
struct Fills {
    waiting: Mutex<Vec<(redis::Cmd, tokio::sync::oneshot::Sender<Option<Value>>)>>,
    wake: tokio::sync::Notify,
}

/// Sends `f`'s fills on `conn`, those that wait together as one pipeline; each gets
/// its reply, or `None` (an error: it loads as without the cache).
async fn drive_fills(f: Arc<Fills>, conn: MultiplexedConnection, alive: Arc<AtomicBool>) {
    loop {
        f.wake.notified().await;
        // The fills ready in this pass of the event loop join.
        tokio::task::yield_now().await;
        // At most `MAX_GROUP` per pipeline, as the batcher's; the rest go next.
        let batch: Vec<_> = {
            let mut waiting = lock(&f.waiting);
            let n = waiting.len().min(super::batch::MAX_GROUP);
            if waiting.len() > n {
                f.wake.notify_one();
            }
            waiting.drain(..n).collect()
        };
        if batch.is_empty() {
            continue;
        }
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for (cmd, _) in &batch {
            pipe.add_command(cmd.clone());
        }
        let mut c = conn.clone();
        let replies: RedisResult<Vec<Value>> = pipe.query_async(&mut c).await;
        match replies {
            Ok(replies) if replies.len() == batch.len() => {
                for ((_, tx), reply) in batch.into_iter().zip(replies) {
                    let ok = !matches!(reply, Value::ServerError(_));
                    let _ = tx.send(ok.then_some(reply));
                }
            }
            Ok(_) => {}
            Err(e) => gives_up(&e, &alive),
        }
    }
}

/// A tracking connection's barriers, numbered: at most one in flight; the hits that
/// come meanwhile wait for the next one, sent when it returns. (One task sends
/// them, and hits wait on a `watch`: waking each hit once per barrier. A shared
/// future per barrier woke every hit at each of its inner wake-ups, and cost the
/// gateway ~10% of its time at 66 hits per barrier.)
struct Barriers {
    /// The number of the last barrier sent (set before it is sent).
    sent: AtomicU64,
    /// The highest barrier number a hit waits for.
    wanted: AtomicU64,
    wake: tokio::sync::Notify,
    /// The last barrier returned: its number, and whether it showed the connection
    /// current.
    done: tokio::sync::watch::Sender<(u64, bool)>,
    /// A key on a slot this primary serves, for `EXISTS` (set at each look at the
    /// layout).
    probe: Mutex<String>,
}

impl Tracker {
    /// Waits for a barrier on this connection sent after now (with the other hits
    /// that come before it is sent): `true` when the primary answered it as the
    /// primary of a slot, so every invalidation of a change it acknowledged before
    /// now has been applied.
    async fn barrier(&self) -> bool {
        let b = &self.barriers;
        let mut done = b.done.subscribe();
        // The next barrier sent: the driver numbers a barrier before it sends it.
        let want = b.sent.load(Ordering::SeqCst) + 1;
        b.wanted.fetch_max(want, Ordering::SeqCst);
        b.wake.notify_one();
        match done.wait_for(|(n, _)| *n >= want).await {
            // A later barrier than `want` was sent later still: as good.
            Ok(v) => v.1 && self.alive.load(Ordering::Acquire),
            Err(_) => false,
        }
    }
}

/// Whether `e` leaves a tracking connection in doubt (a timeout, the connection
/// lost): it is then given up (`alive` cleared), so that the requests after it load
/// at once instead of each waiting for the same timeout while the node does not
/// answer; the next look at the layout connects again. An answer from the node (a
/// `MOVED`, …) says nothing against the connection.
fn gives_up(e: &redis::RedisError, alive: &AtomicBool) {
    if e.code().is_none() {
        alive.store(false, Ordering::Release);
    }
}

/// Sends `b`'s barriers on `conn`, one at a time, as hits want them.
async fn drive(
    b: Arc<Barriers>,
    conn: MultiplexedConnection,
    alive: Arc<AtomicBool>,
    counters: Arc<ReadCounters>,
) {
    loop {
        while b.wanted.load(Ordering::SeqCst) <= b.sent.load(Ordering::SeqCst) {
            b.wake.notified().await;
        }
        // The hits ready in this pass of the event loop join.
        tokio::task::yield_now().await;
        let n = b.sent.fetch_add(1, Ordering::SeqCst) + 1;
        counters.barriers.fetch_add(1, Ordering::Relaxed);
        let probe = lock(&b.probe).clone();
        let mut c = conn.clone();
        let r: RedisResult<Value> = redis::cmd("EXISTS").arg(probe).query_async(&mut c).await;
        if let Err(e) = &r {
            gives_up(e, &alive);
        }
        b.done.send_replace((n, r.is_ok()));
    }
}

/// A key of the `keys` deployment's that hashes to one of the slots `slots` gives
/// primary `i` (`None`: it serves none).
fn probe_key(keys: &Keys, slots: &[u16], i: usize) -> Option<String> {
    if !slots.contains(&(i as u16)) {
        return None;
    }
    (0u32..)
        .map(|n| keys.probe(n))
        .find(|k| slots.get(redis_io::slot_of(k) as usize) == Some(&(i as u16)))
}

/// Why a tracking connection was not made.
enum Tracking {
    /// The node refused `CLIENT TRACKING` (`NOPERM`; `ERR`: a Redis without it).
    Refused(redis::RedisError),
    /// Connecting failed (the node is down, a timeout, …): the next look tries again.
    Failed(redis::RedisError),
}

/// Which tracking connection serves each slot.
#[derive(Default)]
struct Layout {
    /// The index in `trackers` of each slot's primary (`UNKNOWN`: none).
    slots: Vec<u16>,
    /// Per primary: its tracking connection (`None`: not connected).
    trackers: Vec<Option<Arc<Tracker>>>,
}

/// The read cache (see the module documentation).
pub(crate) struct ReadCache {
    entries: Arc<Mutex<Entries>>,
    keys: Keys,
    layout: Mutex<Layout>,
    pub counters: Arc<ReadCounters>,
    next_tracker: AtomicU64,
    /// Held by the look at the layout that is following it ([`ReadCache::follow`]).
    following: tokio::sync::Mutex<()>,
    /// Set when a primary refused `CLIENT TRACKING` (an ACL user without it): the
    /// cache stays off for the gateway's life instead of trying every second.
    refused: AtomicBool,
    /// Loads that could fill an entry in the current admission window, and the hits
    /// counted when it began.
    window_misses: AtomicU64,
    window_start_hits: AtomicU64,
    /// The last window served fewer hits than half its loads that could fill: fill
    /// only one in [`SPARSE_FILLS`] of them.
    sparse: AtomicBool,
}

/// Loads that could fill an entry per admission window ([`ReadCache::admits`]).
const ADMISSION_WINDOW: u64 = 4096;
/// While the cache serves few hits, one in this many of those loads fills (a fill
/// costs more than a load: it goes on the tracking connection, and Redis tracks the
/// key; READs of 100,000 records through 16,384 entries, 16% hits, were 0.85× of
/// the same gateway without the cache at pipeline 1 when all filled).
const SPARSE_FILLS: u64 = 8;

impl ReadCache {
    /// A cache of at most `capacity` records.
    pub fn new(capacity: usize, keys: Keys) -> ReadCache {
        ReadCache {
            entries: Arc::new(Mutex::new(Entries {
                map: HashMap::new(),
                capacity,
                next_token: 0,
                clock: Clock::default(),
            })),
            keys,
            layout: Mutex::default(),
            counters: Arc::default(),
            next_tracker: AtomicU64::new(1),
            following: tokio::sync::Mutex::new(()),
            refused: AtomicBool::new(false),
            window_misses: AtomicU64::new(0),
            window_start_hits: AtomicU64::new(0),
            sparse: AtomicBool::new(false),
        }
    }

    /// The record `ptr` from the cache, with the bytes of `range`, once a barrier
    /// showed it current (`None`: not held, or not shown current: load it).
    pub async fn get(&self, ptr: Pointer, range: Option<(u64, u64)>) -> Option<Stored> {
        let (token, tracker) = match lock(&self.entries).map.get(&ptr) {
            Some(Entry::Ready { token, tracker, .. }) => (*token, tracker.clone()),
            _ => return None,
        };
        if !tracker.alive.load(Ordering::Acquire) {
            // Given up (`gives_up`): no barrier to wait for.
            return None;
        }
        let current = tracker.barrier().await;
        let rec = match lock(&self.entries).map.get_mut(&ptr) {
            Some(Entry::Ready {
                token: t, rec, hit, ..
            }) if current && *t == token => {
                *hit = true;
                redis_io::ranged(rec, range)
            }
            _ => {
                self.counters
                    .missed_at_barrier
                    .fetch_add(1, Ordering::Relaxed);
                return None;
            }
        };
        self.counters.hits.fetch_add(1, Ordering::Relaxed);
        Some(rec)
    }

    /// Whether a load that could fill an entry does (see [`ADMISSION_WINDOW`]): all
    /// do while the cache serves at least one hit per two of them, one in
    /// [`SPARSE_FILLS`] otherwise (the others load as without the cache, counted
    /// `bypassed`).
    fn admits(&self) -> bool {
        let n = self.window_misses.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= ADMISSION_WINDOW {
            self.window_misses.store(0, Ordering::Relaxed);
            let now = self.counters.hits.load(Ordering::Relaxed);
            let hits = now - self.window_start_hits.swap(now, Ordering::Relaxed);
            self.sparse.store(hits * 2 < n, Ordering::Relaxed);
        }
        if self.sparse.load(Ordering::Relaxed) && !n.is_multiple_of(SPARSE_FILLS) {
            self.counters.bypassed.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Loads `ptr`, whose bytes were last seen in its state hash, on the tracking
    /// connection of its slot's primary, filling its entry: the record (`None`:
    /// there is none) with the bytes of `range`. `None`: no tracking connection
    /// serves the slot, the primary did not answer as its primary, or the bytes are
    /// not in the hash: load it as usual.
    pub async fn load(
        &self,
        ptr: Pointer,
        k: &RecordKeys,
        range: Option<(u64, u64)>,
    ) -> Option<RedisResult<Option<Stored>>> {
        let tracker = {
            let layout = lock(&self.layout);
            let i = *layout.slots.get(redis_io::slot_of(&k.meta) as usize)?;
            if i == UNKNOWN {
                return None;
            }
            layout.trackers.get(i as usize)?.clone()?
        };
        if !tracker.alive.load(Ordering::Acquire) || !self.admits() {
            return None;
        }
        self.counters.fills.fetch_add(1, Ordering::Relaxed);
        let token = {
            let mut entries = lock(&self.entries);
            let token = entries.token();
            let tracker = tracker.clone();
            entries.put(ptr, Entry::Filling { token, tracker });
            token
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        lock(&tracker.fills.waiting).push((redis_io::hash_load_command(k), tx));
        tracker.fills.wake.notify_one();
        // `None`: an error (the fill's, or the whole pipeline's: see `drive_fills`).
        let reply = rx.await.ok().flatten();
        let mut entries = lock(&self.entries);
        let still =
            matches!(entries.map.get(&ptr), Some(Entry::Filling { token: t, .. }) if *t == token);
        let found = match reply.map(redis_io::hash_load_whole) {
            Some(Ok(Some(found))) => found,
            // A redirection (the node is not the slot's primary now), a timeout, or
            // bytes not in the hash: the usual load answers.
            _ => {
                if still {
                    entries.map.remove(&ptr);
                }
                return None;
            }
        };
        match (&found, still) {
            (Some(rec), true) => {
                let rec = rec.clone();
                entries.map.insert(
                    ptr,
                    Entry::Ready {
                        token,
                        tracker,
                        rec,
                        hit: false,
                    },
                );
            }
            (None, true) => {
                entries.map.remove(&ptr);
            }
            (_, false) => {}
        }
        Some(Ok(found.map(|rec| redis_io::ranged(&rec, range))))
    }

    /// Follows the cluster's layout (`CLUSTER NODES`' text, the nodes' addresses by
    /// id as the crate routes to them): a tracking connection to every primary that
    /// serves slots; the entries of primaries that no longer do go. One at a time: a
    /// look that comes while one is still connecting is skipped (the next look
    /// brings a newer layout), so an older layout never replaces a newer one.
    pub async fn follow(
        &self,
        opts: &ClusterOptions,
        nodes_text: &str,
        addresses: &std::collections::HashMap<String, (String, u16)>,
    ) {
        let Ok(_turn) = self.following.try_lock() else {
            return;
        };
        if self.refused.load(Ordering::Relaxed) {
            return;
        }
        let (slots, ids) = super::batch::primaries_by_id(nodes_text);
        let known: Vec<Option<Arc<Tracker>>> = {
            let layout = lock(&self.layout);
            ids.iter()
                .map(|id| {
                    layout
                        .trackers
                        .iter()
                        .flatten()
                        .find(|t| &t.node == id && t.alive.load(Ordering::Acquire))
                        .cloned()
                })
                .collect()
        };
        let mut trackers = Vec::with_capacity(ids.len());
        for (i, (id, known)) in ids.iter().zip(known).enumerate() {
            // A primary that serves no slot gets no tracking connection.
            if !slots.contains(&(i as u16)) {
                trackers.push(None);
                continue;
            }
            let t = match known {
                Some(t) => Some(t),
                None => match addresses.get(id) {
                    Some((host, port)) => match self.track(opts, id, host, *port).await {
                        Ok(t) => Some(t),
                        Err(Tracking::Refused(e)) => {
                            warn!(
                                node = %id,
                                error = %e,
                                "Redis refused CLIENT TRACKING (an ACL user needs +client or \
                                 +@connection): the read cache is off, READs load"
                            );
                            self.refused.store(true, Ordering::Relaxed);
                            *lock(&self.layout) = Layout::default();
                            lock(&self.entries).map.clear();
                            return;
                        }
                        Err(Tracking::Failed(e)) => {
                            debug!(node = %id, error = %e, "no tracking connection; next look");
                            None
                        }
                    },
                    None => None,
                },
            };
            // The probe stays while its slot is the primary's (a search may take
            // thousands of tries for a primary of few slots).
            if let Some(t) = &t {
                let mut probe = lock(&t.barriers.probe);
                let kept = !probe.is_empty()
                    && slots.get(redis_io::slot_of(&probe) as usize) == Some(&(i as u16));
                if !kept && let Some(k) = probe_key(&self.keys, &slots, i) {
                    *probe = k;
                }
            }
            trackers.push(t);
        }
        let live: Vec<u64> = trackers.iter().flatten().map(|t| t.id).collect();
        lock(&self.entries)
            .map
            .retain(|_, e| live.contains(&e.tracker()));
        *lock(&self.layout) = Layout { slots, trackers };
    }

    /// A new tracking connection to the primary `node` at `host:port`.
    async fn track(
        &self,
        opts: &ClusterOptions,
        node: &str,
        host: &str,
        port: u16,
    ) -> Result<Arc<Tracker>, Tracking> {
        let id = self.next_tracker.fetch_add(1, Ordering::Relaxed);
        let alive = Arc::new(AtomicBool::new(true));
        let pushes = {
            // Weak: the entries hold the trackers, whose connections hold this.
            let entries = Arc::downgrade(&self.entries);
            let (keys, alive) = (self.keys.clone(), alive.clone());
            let counters = self.counters.clone();
            move |info: PushInfo| -> Result<(), ()> {
                let Some(entries) = entries.upgrade() else {
                    return Ok(());
                };
                match info.kind {
                    PushKind::Invalidate => {
                        counters.pushes.fetch_add(1, Ordering::Relaxed);
                        let mut entries = lock(&entries);
                        match info.data.first() {
                            Some(Value::Array(keys_changed)) => {
                                for key in keys_changed {
                                    let ptr = match key {
                                        Value::BulkString(b) => keys.record_of(b),
                                        _ => None,
                                    };
                                    if let Some(ptr) = ptr
                                        && entries.map.remove(&ptr).is_some()
                                    {
                                        counters.invalidations.fetch_add(1, Ordering::Relaxed);
                                    }
                                }
                            }
                            // `FLUSHALL` (a null), or anything not understood:
                            // nothing this connection filled can be trusted.
                            _ => entries.drop_tracker(id),
                        }
                    }
                    PushKind::Disconnection => {
                        alive.store(false, Ordering::Release);
                        lock(&entries).drop_tracker(id);
                    }
                    _ => {}
                }
                Ok(())
            }
        };
        let client = super::node_client(opts, host, port).map_err(Tracking::Failed)?;
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(opts.response_timeout))
            .set_push_sender(pushes);
        let mut conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(Tracking::Failed)?;
        // Not `BCAST`: Redis then pushes a change only to the connections that read
        // the key since its last change (the fills), not to every gateway with the
        // cache for every write (docs/BENCHMARKS.md, "Tracking what a gateway read").
        let () = redis::cmd("CLIENT")
            .arg("TRACKING")
            .arg("ON")
            .query_async(&mut conn)
            .await
            .map_err(|e| match e.code() {
                // The node said no, and will say so again (not a passing state of
                // its own, as `LOADING` or `BUSY` are).
                Some("NOPERM" | "ERR") => Tracking::Refused(e),
                _ => Tracking::Failed(e),
            })?;
        debug!(node, host, port, "tracking connection made");
        let barriers = Arc::new(Barriers {
            sent: AtomicU64::new(0),
            wanted: AtomicU64::new(0),
            wake: tokio::sync::Notify::new(),
            done: tokio::sync::watch::Sender::new((0, false)),
            probe: Mutex::default(),
        });
        let fills = Arc::new(Fills::default());
        let drivers = [
            tokio::spawn(drive(
                barriers.clone(),
                conn.clone(),
                alive.clone(),
                self.counters.clone(),
            )),
            tokio::spawn(drive_fills(fills.clone(), conn.clone(), alive.clone())),
        ];
        Ok(Arc::new(Tracker {
            id,
            node: node.to_string(),
            alive,
            barriers,
            fills,
            drivers,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_are_sparse_while_the_cache_serves_few_hits() {
        let cache = ReadCache::new(16, Keys::new("ns"));
        let admitted = |n: u64| (0..n).filter(|_| cache.admits()).count();
        // No hits in the first window: all fill, then one in SPARSE_FILLS.
        assert_eq!(admitted(ADMISSION_WINDOW), ADMISSION_WINDOW as usize);
        let sparse = admitted(ADMISSION_WINDOW);
        assert_eq!(sparse, (ADMISSION_WINDOW / SPARSE_FILLS) as usize);
        assert_eq!(
            cache.counters.bypassed.load(Ordering::Relaxed),
            ADMISSION_WINDOW - sparse as u64
        );
        // A window with a hit per two such loads: all fill again.
        cache
            .counters
            .hits
            .fetch_add(ADMISSION_WINDOW / 2, Ordering::Relaxed);
        admitted(ADMISSION_WINDOW);
        assert_eq!(admitted(ADMISSION_WINDOW), ADMISSION_WINDOW as usize);
    }

    #[test]
    fn probe_keys_hash_to_a_slot_of_their_primary() {
        let keys = Keys::new("ns");
        // Three primaries in thirds, and one that serves no slot.
        let slots: Vec<u16> = (0..16_384u32).map(|s| (s * 3 / 16_384) as u16).collect();
        for i in 0..3 {
            let k = probe_key(&keys, &slots, i).expect("a key");
            assert!(k.starts_with("ns:{b:"), "{k}");
            assert_eq!(slots[redis_io::slot_of(&k) as usize], i as u16);
        }
        assert_eq!(probe_key(&keys, &slots, 3), None);
        // A primary with one slot only gets a key there too.
        let mut one = vec![0u16; 16_384];
        one[12_345] = 1;
        let k = probe_key(&keys, &one, 1).expect("a key");
        assert_eq!(redis_io::slot_of(&k), 12_345);
    }
}
