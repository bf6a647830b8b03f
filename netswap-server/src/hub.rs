//! State shared by all connections: the store, per-IP connection counts, and the
//! routes that carry watch notifications to the connections that registered them.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use netswap_proto::identity::normalize_ip;
use netswap_proto::{ConnId, Notification, SharedBudget, Store};
use tokio::sync::{Notify, mpsc};

use crate::config::ServerConfig;

/// A watching connection's mailbox.
#[derive(Debug)]
struct Route {
    tx: mpsc::Sender<Notification>,
    overflow: Arc<Overflow>,
}

/// Raised when a watcher's notification queue is full: it is then disconnected.
#[derive(Debug, Default)]
pub(crate) struct Overflow {
    flag: AtomicBool,
    pub(crate) notify: Notify,
}

impl Overflow {
    pub(crate) fn is_set(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }
}

/// Shared server state.
#[derive(Debug)]
pub(crate) struct Hub {
    pub store: Store,
    pub config: ServerConfig,
    per_ip: Mutex<HashMap<IpAddr, u32>>,
    routes: Mutex<HashMap<ConnId, Route>>,
    /// Wakes the reaper when a new orphan deadline may be earlier than it thinks.
    pub reaper: Notify,
    /// Bytes promised to unfinished messages, all connections together.
    pub partial_budget: Arc<SharedBudget>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Holds one slot of an IP's connection count; gives it back when dropped.
#[derive(Debug)]
pub(crate) struct IpSlot {
    hub: Arc<Hub>,
    ip: IpAddr,
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
    }
}

impl Hub {
    pub fn new(config: ServerConfig) -> Hub {
        Hub {
            store: Store::new(config.store.clone(), config.identity_key.clone()),
            partial_budget: SharedBudget::new(config.max_total_partial_bytes),
            config,
            per_ip: Mutex::new(HashMap::new()),
            routes: Mutex::new(HashMap::new()),
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
        Some(IpSlot {
            hub: self.clone(),
            ip,
        })
    }

    /// Number of open connections (for logs and tests).
    pub fn connections(&self) -> u32 {
        lock(&self.per_ip).values().sum()
    }

    /// Opens a mailbox for a connection that started watching.
    pub fn open_route(&self, conn: ConnId) -> (mpsc::Receiver<Notification>, Arc<Overflow>) {
        let (tx, rx) = mpsc::channel(self.config.notify_queue);
        let overflow = Arc::new(Overflow::default());
        lock(&self.routes).insert(
            conn,
            Route {
                tx,
                overflow: overflow.clone(),
            },
        );
        (rx, overflow)
    }

    pub fn close_route(&self, conn: ConnId) {
        lock(&self.routes).remove(&conn);
    }

    /// Delivers notifications for other connections. A watcher whose queue is full
    /// is flagged and disconnects itself: the writer never waits for a slow reader.
    pub fn deliver(&self, notifications: impl IntoIterator<Item = Notification>) {
        let routes = lock(&self.routes);
        for n in notifications {
            let Some(route) = routes.get(&n.conn) else {
                continue; // the watcher is gone
            };
            if route.tx.try_send(n).is_err() && !route.overflow.flag.swap(true, Ordering::AcqRel) {
                route.overflow.notify.notify_one();
            }
        }
    }
}
