//! State shared by all connections: the store, per-IP connection counts, and the
//! routes that carry watch notifications to the connections that registered them.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use tracing::warn;

use netswap_proto::identity::normalize_ip;
use netswap_proto::{
    ConnId, Notification, NotifyQueue, Pointer, Pushed, SharedBudget, Store, WatchConfig,
};
use tokio::sync::Notify;

use crate::cluster::ClusterStore;
use crate::config::ServerConfig;

/// A watching connection's mailbox: notifications from other connections wait here
/// until the connection's task has room for them in its output. Bounded: past
/// `--notify-queue` waiting notifications, each watch's are merged (see
/// [`NotifyQueue`]), so a watcher that does not read costs bounded memory and a burst
/// from a writer never disconnects a watcher that reads.
#[derive(Debug)]
pub(crate) struct Mailbox {
    queue: Mutex<NotifyQueue>,
    /// Wakes the connection's task when something became ready to send, or a
    /// rate-limited watch's summary is due earlier than before.
    pub(crate) ready: Notify,
}

impl Mailbox {
    /// Takes notifications that may be sent at `now`, until their payloads add up to
    /// `max_bytes` (at least one, if any is ready).
    pub(crate) fn take(&self, max_bytes: usize, now: Instant, out: &mut Vec<Notification>) {
        let mut q = lock(&self.queue);
        let mut bytes = 0;
        while bytes < max_bytes {
            match q.pop(now) {
                Some(n) => {
                    bytes += NOTIFY_OVERHEAD + n.wire_len();
                    out.push(n);
                }
                None => break,
            }
        }
    }

    /// Says how a watch wants its notifications, before it is registered.
    pub(crate) fn configure(&self, ptr: Pointer, xid: u32, config: WatchConfig) {
        lock(&self.queue).configure(ptr, xid, config);
    }

    /// Forgets a watch that ended or moved to another XID.
    pub(crate) fn forget(&self, ptr: Pointer, xid: u32) {
        lock(&self.queue).forget(ptr, xid);
    }

    /// When the next rate-limited summary is due, if nothing else waits.
    pub(crate) fn next_due(&self) -> Option<Instant> {
        lock(&self.queue).next_due()
    }

    /// Notifications waiting.
    pub(crate) fn len(&self) -> usize {
        lock(&self.queue).len()
    }

    /// Adds a notification; true when it was merged.
    fn push(&self, n: Notification, now: Instant) -> bool {
        let mut q = lock(&self.queue);
        let (was_ready, was_due) = (q.ready(now), q.next_due());
        let merged = q.push(n, now) == Pushed::Merged;
        let wake = (!was_ready && q.ready(now)) || q.next_due() != was_due;
        drop(q);
        if wake {
            self.ready.notify_one();
        }
        merged
    }
}

/// Bytes of a NOTIFY besides its payload (the frame header).
const NOTIFY_OVERHEAD: usize = netswap_proto::HEADER_LEN;

/// Where records live.
#[derive(Debug)]
pub(crate) enum Backend {
    /// The embedded store, in this process (boxed: it is much larger than the other).
    Memory(Box<Store>),
    /// Redis Cluster: this server is a stateless gateway.
    Cluster(Arc<ClusterStore>),
}

/// Shared server state.
#[derive(Debug)]
pub(crate) struct Hub {
    pub backend: Backend,
    /// Counters for STATS and /metrics.
    pub metrics: crate::metrics::Metrics,
    pub config: ServerConfig,
    per_ip: Mutex<HashMap<IpAddr, u32>>,
    per_net: Mutex<HashMap<NetKey, NetEntry>>,
    /// Throttle on lookups of pointers that do not exist.
    pub throttle: MissThrottle,
    routes: Mutex<HashMap<ConnId, Arc<Mailbox>>>,
    /// Notifications merged into summaries because their watcher was behind.
    pub notifications_merged: AtomicU64,
    /// Wakes the reaper when a new orphan deadline may be earlier than it thinks.
    pub reaper: Notify,
    /// Bytes promised to unfinished messages, all connections together.
    pub partial_budget: Arc<SharedBudget>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The network a client's address belongs to, for limits that an attacker must not
/// dodge by changing addresses within it: an IPv4 address, or an IPv6 /64 (what one
/// subscriber usually gets).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct NetKey(IpAddr);

impl NetKey {
    pub fn of(ip: IpAddr) -> NetKey {
        match normalize_ip(ip) {
            IpAddr::V4(v4) => NetKey(IpAddr::V4(v4)),
            IpAddr::V6(v6) => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                NetKey(IpAddr::V6(bits.into()))
            }
        }
    }
}

impl std::fmt::Display for NetKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IpAddr::V4(v4) => write!(f, "{v4}"),
            IpAddr::V6(v6) => write!(f, "{v6}/64"),
        }
    }
}

/// What one network (see [`NetKey`]) holds while it has connections.
#[derive(Debug)]
struct NetEntry {
    connections: u32,
    /// Its share of the server-wide budget for unfinished messages.
    partial_budget: Arc<SharedBudget>,
}

/// Holds one slot of an IP's connection count; gives it back when dropped.
#[derive(Debug)]
pub(crate) struct IpSlot {
    hub: Arc<Hub>,
    ip: IpAddr,
    /// The network the address belongs to.
    pub net: NetKey,
    /// The network's share of the budget for unfinished messages.
    pub partial_budget: Arc<SharedBudget>,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut map = lock(&self.hub.per_ip);
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
        drop(map);
        let mut nets = lock(&self.hub.per_net);
        if let Some(e) = nets.get_mut(&self.net) {
            e.connections -= 1;
            if e.connections == 0 {
                nets.remove(&self.net);
            }
        }
    }
}

/// Lookups of pointers that do not exist, throttled per network: a pointer is a
/// capability, and a scanner must not try millions a second. Past the rate, the
/// network's requests that name a pointer get BUSY until the bucket refills.
#[derive(Debug)]
pub(crate) struct MissThrottle {
    /// `None` when the throttle is off (`--max-misses-per-second 0`).
    limiter: Option<DefaultKeyedRateLimiter<NetKey>>,
    per_second: u32,
    /// One log line per offender per minute.
    log: DefaultKeyedRateLimiter<NetKey>,
    /// Lookups of pointers that do not exist.
    pub misses: AtomicU64,
    /// Requests answered BUSY by the throttle.
    pub throttled: AtomicU64,
}

/// How long until `limiter` allows again, at least 1 ms. Read on the limiter's own
/// clock: making one (`DefaultClock::default()`) per miss cost a gateway under a
/// pointer scan 39% of its time (the TSC check under it is slow on virtual machines).
fn wait(
    limiter: &DefaultKeyedRateLimiter<NetKey>,
    not_until: governor::NotUntil<<DefaultClock as Clock>::Instant>,
) -> Duration {
    not_until
        .wait_time_from(limiter.clock().now())
        .max(Duration::from_millis(1))
}

impl MissThrottle {
    fn new(per_second: u32) -> MissThrottle {
        MissThrottle {
            limiter: NonZeroU32::new(per_second)
                .map(|n| RateLimiter::keyed(Quota::per_second(n).allow_burst(n))),
            per_second,
            log: RateLimiter::keyed(Quota::per_minute(NonZeroU32::MIN)),
            misses: AtomicU64::new(0),
            throttled: AtomicU64::new(0),
        }
    }

    /// Counts one miss by `net`; returns how long its lookups must wait when it is
    /// over the rate.
    pub fn miss(&self, net: NetKey) -> Option<Duration> {
        self.misses.fetch_add(1, Ordering::Relaxed);
        let limiter = self.limiter.as_ref()?;
        match limiter.check_key(&net) {
            Ok(()) => None,
            Err(not_until) => {
                if self.log.check_key(&net).is_ok() {
                    warn!(
                        network = %net,
                        limit_per_second = self.per_second,
                        "throttled: too many lookups of pointers that do not exist (pointer scanning?)"
                    );
                }
                Some(wait(limiter, not_until))
            }
        }
    }

    /// A miss of a lookup that paid up front ([`MissThrottle::admit`]): counted only.
    pub fn count_miss(&self) {
        self.misses.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes one token of `net`'s miss bucket for a lookup before it is made (a
    /// network on probation, see `conn::PROBATION`); `Err`: how long its lookups must
    /// wait.
    pub fn admit(&self, net: NetKey) -> Result<(), Duration> {
        let Some(limiter) = self.limiter.as_ref() else {
            return Ok(());
        };
        limiter
            .check_key(&net)
            .map_err(|not_until| wait(limiter, not_until))
    }

    /// Forgets networks whose bucket is full again (called now and then).
    pub fn prune(&self) {
        if let Some(l) = &self.limiter {
            l.retain_recent();
        }
        self.log.retain_recent();
    }
}

impl Hub {
    pub fn new(config: ServerConfig, backend: Backend) -> Hub {
        Hub {
            backend,
            metrics: crate::metrics::Metrics::default(),
            partial_budget: SharedBudget::new(config.max_total_partial_bytes),
            throttle: MissThrottle::new(config.max_misses_per_second),
            config,
            per_ip: Mutex::new(HashMap::new()),
            per_net: Mutex::new(HashMap::new()),
            routes: Mutex::new(HashMap::new()),
            notifications_merged: AtomicU64::new(0),
            reaper: Notify::new(),
        }
    }

    /// Takes a connection slot for `ip`, or `None` when it has `max_connections_per_ip`.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<IpSlot> {
        let ip = normalize_ip(ip);
        let mut map = lock(&self.per_ip);
        let n = map.entry(ip).or_insert(0);
        if *n >= self.config.max_connections_per_ip {
            return None;
        }
        *n += 1;
        drop(map);
        let net = NetKey::of(ip);
        let mut nets = lock(&self.per_net);
        let entry = nets.entry(net).or_insert_with(|| NetEntry {
            connections: 0,
            partial_budget: SharedBudget::with_refusal(
                self.config.max_partial_bytes_per_ip,
                "unfinished messages from this address hold its share of the server's memory; retry later",
            ),
        });
        entry.connections += 1;
        let partial_budget = entry.partial_budget.clone();
        drop(nets);
        Some(IpSlot {
            hub: self.clone(),
            ip,
            net,
            partial_budget,
        })
    }

    /// The embedded store (`None` with Redis Cluster).
    pub fn memory(&self) -> Option<&Store> {
        match &self.backend {
            Backend::Memory(s) => Some(s),
            Backend::Cluster(_) => None,
        }
    }

    /// Notifications waiting in all mailboxes.
    pub fn notifications_waiting(&self) -> usize {
        lock(&self.routes).values().map(|m| m.len()).sum()
    }

    /// Number of open connections (for logs and tests).
    pub fn connections(&self) -> u32 {
        lock(&self.per_ip).values().sum()
    }

    /// Opens a mailbox for a connection that started watching.
    pub fn open_route(&self, conn: ConnId) -> Arc<Mailbox> {
        let mailbox = Arc::new(Mailbox {
            queue: Mutex::new(NotifyQueue::new(
                self.config.notify_queue,
                self.config.notify_queue_bytes,
            )),
            ready: Notify::new(),
        });
        lock(&self.routes).insert(conn, mailbox.clone());
        mailbox
    }

    /// The connection closed: what still waited for it is dropped (and counted).
    pub fn close_route(&self, conn: ConnId) {
        if let Some(m) = lock(&self.routes).remove(&conn) {
            self.metrics
                .notifications_dropped
                .fetch_add(m.len() as u64, Ordering::Relaxed);
        }
    }

    /// Delivers notifications for other connections. Never waits for a watcher: a
    /// watcher that is behind gets merged notifications (see [`Mailbox`]).
    pub fn deliver(&self, notifications: impl IntoIterator<Item = Notification>) {
        let routes = lock(&self.routes);
        let mut merged = 0;
        let now = Instant::now();
        for n in notifications {
            let Some(mailbox) = routes.get(&n.conn) else {
                continue; // the watcher is gone
            };
            if mailbox.push(n, now) {
                merged += 1;
            }
        }
        if merged > 0 {
            self.notifications_merged
                .fetch_add(merged, Ordering::Relaxed);
        }
    }
}
