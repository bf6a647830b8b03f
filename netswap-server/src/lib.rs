//! # netswap-server
//!
//! The tokio server around [`netswap_proto`]: it accepts TCP connections (IPv4 and
//! IPv6), serves every v1 operation, delivers watch notifications, reaps orphaned
//! records on time, enforces the limits, and shuts down cleanly.
//!
//! The binary (`cargo run --release -p netswap-server`) is a thin command line over
//! [`Server`]; tests and embedders use [`spawn`] to run one on a background thread.
//!
//! ```no_run
//! # #[cfg(unix)]
//! # async fn demo() -> std::io::Result<()> {
//! use netswap_server::{Server, ServerConfig};
//! use tokio::signal::unix::{SignalKind, signal};
//! let server = Server::bind(ServerConfig::new("127.0.0.1:0".parse().unwrap())).await?;
//! // The handler before saying it listens: a SIGTERM sent at once is then a clean
//! // stop, not the signal's default action (a future like `ctrl_c()` installs its
//! // handler only when first polled).
//! let mut term = signal(SignalKind::terminate())?;
//! println!("listening on {}", server.local_addr());
//! server.run(async move { term.recv().await; }).await
//! # }
//! ```

#![warn(missing_docs)]

mod cluster;
pub mod config;
mod conn;
mod hub;
mod metrics;
pub mod persist;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

pub use config::{Args, ConfigError, ServerConfig};
use netswap_proto::{Store, StoreStats};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tracing::{error, info, warn};

pub use persist::{DataDir, LoadError, SnapshotReport};

use cluster::ClusterStore;
pub use cluster::{ClusterOptions, Credentials, Tls, TlsFiles};
use hub::{Backend, Hub};

/// How long shutdown waits for connections to flush their last replies.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// A bound, not yet running, server.
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
    metrics: Option<TcpListener>,
    hub: Arc<Hub>,
    data: Option<Arc<DataDir>>,
    snapshots: (SnapshotSender, mpsc::UnboundedReceiver<SnapshotRequest>),
}

/// A request for a snapshot now, with where to say how it went.
type SnapshotRequest = Option<oneshot::Sender<Result<SnapshotReport, String>>>;
type SnapshotSender = mpsc::UnboundedSender<SnapshotRequest>;

/// Asks a running server with `--data-dir` for a snapshot now (what SIGUSR1 does).
#[derive(Clone, Debug)]
pub struct SnapshotHandle {
    tx: SnapshotSender,
}

impl SnapshotHandle {
    /// Requests a snapshot and returns at once (the server logs the outcome).
    pub fn request(&self) {
        let _ = self.tx.send(None);
    }

    /// Requests a snapshot and waits until it is on disk.
    pub async fn snapshot(&self) -> Result<SnapshotReport, String> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Some(tx))
            .map_err(|_| "the server is not running".to_string())?;
        rx.await
            .map_err(|_| "the server stopped before the snapshot".to_string())?
    }
}

/// Why a server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The listening socket.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: io::Error,
    },
    /// The data directory or its snapshot.
    #[error(transparent)]
    Data(#[from] LoadError),
    /// The Redis Cluster is down, unreachable or not a cluster.
    #[error("{0}")]
    Store(String),
}

impl From<StartError> for io::Error {
    fn from(e: StartError) -> io::Error {
        match e {
            StartError::Listen { source, .. } => source,
            StartError::Data(d) => io::Error::other(d.to_string()),
            StartError::Store(s) => io::Error::other(s),
        }
    }
}

/// A read-only view of a running server's state, for tests and monitoring.
#[derive(Clone, Debug)]
pub struct ServerStats {
    hub: Arc<Hub>,
}

impl ServerStats {
    /// Records, bytes, identities and watches in the store. With Redis Cluster: the
    /// identities connected to this gateway and the watches registered on it (the
    /// records are the cluster's).
    pub fn store(&self) -> StoreStats {
        match &self.hub.backend {
            Backend::Memory(s) => s.stats(),
            Backend::Cluster(c) => StoreStats {
                accounts: c.local_identities() as u64,
                watches: c.watch_count(),
                ..StoreStats::default()
            },
        }
    }
    /// Records and data bytes in the store: the embedded store's counts, or, with
    /// Redis Cluster, a scan of the deployment's keys on every primary.
    pub async fn count_records(&self) -> io::Result<(u64, u64)> {
        match &self.hub.backend {
            Backend::Memory(s) => {
                let st = s.stats();
                Ok((st.records, st.data_bytes))
            }
            Backend::Cluster(c) => c.count_records().await.map_err(io::Error::other),
        }
    }
    /// Requests answered with this opcode and status.
    pub fn requests(&self, op: netswap_proto::Opcode, status: netswap_proto::Status) -> u64 {
        self.hub.metrics.requests(op, status)
    }
    /// The Prometheus text `/metrics` serves.
    pub fn prometheus_text(&self) -> String {
        metrics::render(&self.hub)
    }
    /// What a STATS request answers (without the caller's own usage).
    pub fn stats_entries(&self) -> Vec<(String, u64)> {
        self.hub.stats_entries(None)
    }
    /// Open client connections.
    pub fn connections(&self) -> u32 {
        self.hub.connections()
    }
    /// Bytes currently promised to unfinished multi-frame messages, all connections.
    pub fn partial_bytes(&self) -> u64 {
        self.hub.partial_budget.used()
    }
    /// Notifications waiting in watchers' mailboxes (a merged summary counts once).
    pub fn notifications_waiting(&self) -> usize {
        self.hub.notifications_waiting()
    }
    /// Notifications merged into summaries because their watcher was behind.
    pub fn notifications_merged(&self) -> u64 {
        self.hub.notifications_merged.load(Ordering::Relaxed)
    }
    /// Lookups of pointers that do not exist.
    pub fn misses(&self) -> u64 {
        self.hub.throttle.misses.load(Ordering::Relaxed)
    }
    /// Requests answered BUSY by the throttle on such lookups.
    pub fn throttled(&self) -> u64 {
        self.hub.throttle.throttled.load(Ordering::Relaxed)
    }
}

/// A thread that frees the large values the store lets go of (`Store::set_retire`):
/// freeing a 64 MiB value unmaps its pages, 1–3 ms that would otherwise hold up the
/// event loop. It ends when the store (and with it the sender) is gone. `None` when
/// no thread can be started (they are then freed in place).
fn freeing_thread() -> Option<impl Fn(bytes::Bytes) + Send + Sync + 'static> {
    let (tx, rx) = std::sync::mpsc::channel::<bytes::Bytes>();
    std::thread::Builder::new()
        .name("netswap-free".into())
        .spawn(move || rx.into_iter().for_each(drop))
        .ok()?;
    Some(move |b| {
        // The thread only ends once this sender is gone.
        let _ = tx.send(b);
    })
}

impl Server {
    /// Loads the snapshot when `--data-dir` is set (before anything can connect), then
    /// binds the listening socket.
    pub async fn bind(config: ServerConfig) -> Result<Server, StartError> {
        let listen = config.listen;
        let data = config.data_dir.clone();
        let backend = match &config.cluster {
            None => {
                let mut store = Store::new(config.store.clone(), config.identity_key.clone());
                if let Some(free) = freeing_thread() {
                    store.set_retire(free);
                }
                Backend::Memory(Box::new(store))
            }
            Some(opts) => Backend::Cluster(Arc::new(
                ClusterStore::connect(
                    config.store.clone(),
                    config.identity_key.clone(),
                    opts.clone(),
                )
                .await
                .map_err(StartError::Store)?,
            )),
        };
        let hub = Arc::new(Hub::new(config, backend));
        let data = match (data, hub.memory()) {
            (Some(dir), Some(store)) => {
                let dir = DataDir::open(&dir)?;
                let loaded =
                    dir.load(store, &hub.config.identity_key, std::time::Instant::now())?;
                match loaded {
                    Some(r) => info!(
                        file = %dir.snapshot_path().display(),
                        records = r.records,
                        bytes = r.bytes,
                        seconds = r.elapsed.as_secs_f64(),
                        grace_secs = hub.config.store.orphan_grace.as_secs(),
                        "snapshot loaded; every owner is offline until it reconnects"
                    ),
                    None => {
                        info!(file = %dir.snapshot_path().display(), "no snapshot yet: starting empty")
                    }
                }
                hub.reaper.notify_one();
                Some(Arc::new(dir))
            }
            _ => None,
        };
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|source| StartError::Listen {
                addr: listen,
                source,
            })?;
        let metrics = match hub.config.metrics_listen {
            Some(addr) => Some(
                metrics::bind(addr)
                    .await
                    .map_err(|source| StartError::Listen { addr, source })?,
            ),
            None => None,
        };
        Ok(Server {
            listener,
            metrics,
            hub,
            data,
            snapshots: mpsc::unbounded_channel(),
        })
    }

    /// Where `/metrics` is served, when it is.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Where snapshots go (`None` without `--data-dir`).
    pub fn data_dir(&self) -> Option<&DataDir> {
        self.data.as_deref()
    }

    /// A handle to request snapshots (they fail without `--data-dir`).
    pub fn snapshot_handle(&self) -> SnapshotHandle {
        SnapshotHandle {
            tx: self.snapshots.0.clone(),
        }
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// A handle on the server's counters.
    pub fn stats(&self) -> ServerStats {
        ServerStats {
            hub: self.hub.clone(),
        }
    }

    /// Serves until `shutdown` completes, then stops accepting, lets connections
    /// flush their replies (up to a few seconds) and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> io::Result<()> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let reaper = tokio::spawn(reap(self.hub.clone(), stop_rx.clone()));
        let housekeeping = tokio::spawn(housekeep(self.hub.clone(), stop_rx.clone()));
        let (_, requests) = self.snapshots;
        let metrics = self
            .metrics
            .map(|l| tokio::spawn(metrics::serve_metrics(l, self.hub.clone(), stop_rx.clone())));
        let persister = tokio::spawn(persist_loop(
            self.hub.clone(),
            self.data.clone(),
            requests,
            stop_rx.clone(),
        ));
        let mut conns = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        conns.spawn(conn::serve(stream, peer, self.hub.clone(), stop_rx.clone()));
                    }
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
        info!(connections = conns.len(), "shutting down");
        drop(self.listener);
        let _ = stop_tx.send(true);
        let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
            while conns.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            warn!(
                left = conns.len(),
                "connections did not finish in time; closing them"
            );
            conns.shutdown().await;
        }
        let _ = reaper.await;
        let _ = housekeeping.await;
        let _ = persister.await;
        if let Some(m) = metrics {
            let _ = m.await;
        }
        if let Some(dir) = self.data.clone() {
            // Every reply has been flushed (or its connection given up on): the last
            // snapshot holds everything that was acknowledged.
            let hub = self.hub.clone();
            match tokio::task::spawn_blocking(move || {
                dir.save(
                    hub.memory().expect("snapshots are of the embedded store"),
                    &hub.config.identity_key,
                )
            })
            .await
            {
                Ok(Ok(r)) => persist::log_saved("shutdown", &r),
                Ok(Err(e)) => {
                    error!(error = %e, "the shutdown snapshot failed; the previous snapshot is kept");
                    return Err(e);
                }
                Err(e) => return Err(io::Error::other(e)),
            }
        }
        let stats = ServerStats {
            hub: self.hub.clone(),
        }
        .store();
        if let Backend::Cluster(c) = &self.hub.backend
            && c.read_cache_on()
        {
            let g = c.counts();
            info!(
                hits = g.read_cache_hits,
                fills = g.read_cache_fills,
                missed = g.read_cache_missed_at_barrier,
                barriers = g.read_cache_barriers,
                invalidations = g.read_cache_invalidations,
                pushes = g.read_cache_pushes,
                bypassed = g.read_cache_bypassed,
                "read cache"
            );
        }
        if let Backend::Cluster(c) = &self.hub.backend {
            let g = c.counts();
            info!(
                grouped = g.grouped_writes,
                races_lost = g.commit_races_lost,
                connections_replaced = g.connections_replaced,
                "the gateway's counts"
            );
        }
        info!(records = stats.records, bytes = stats.data_bytes, "stopped");
        Ok(())
    }
}

/// Writes periodic and requested snapshots, one at a time, on a blocking thread.
async fn persist_loop(
    hub: Arc<Hub>,
    data: Option<Arc<DataDir>>,
    mut requests: mpsc::UnboundedReceiver<SnapshotRequest>,
    mut stop: watch::Receiver<bool>,
) {
    let interval = hub.config.snapshot_interval.filter(|_| data.is_some());
    let mut tick = tokio::time::interval(interval.unwrap_or(Duration::from_secs(3600)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is now: nothing to save yet
    loop {
        let (why, reply) = tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick(), if interval.is_some() => ("periodic", None),
            r = requests.recv() => match r {
                Some(reply) => ("requested", reply),
                None => return,
            },
        };
        let Some(dir) = data.clone() else {
            if let Some(tx) = reply {
                let _ = tx.send(Err("snapshots need --data-dir".into()));
            }
            continue;
        };
        let h = hub.clone();
        let result = tokio::task::spawn_blocking(move || {
            dir.save(
                h.memory().expect("snapshots are of the embedded store"),
                &h.config.identity_key,
            )
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
        match &result {
            Ok(r) => {
                hub.metrics
                    .snapshots_written
                    .fetch_add(1, Ordering::Relaxed);
                persist::log_saved(why, r)
            }
            Err(e) => {
                hub.metrics
                    .snapshot_failures
                    .fetch_add(1, Ordering::Relaxed);
                error!(why, error = %e, "snapshot failed; the previous snapshot is kept")
            }
        }
        if let Some(tx) = reply {
            let _ = tx.send(result);
        }
    }
}

/// Deletes orphaned records when their grace period ends: sleeps until the next
/// deadline (or until woken because a new one may be earlier), never polls.
async fn reap(hub: Arc<Hub>, mut stop: watch::Receiver<bool>) {
    let store = match &hub.backend {
        Backend::Memory(s) => s,
        Backend::Cluster(c) => return cluster_upkeep(hub.clone(), c.clone(), stop).await,
    };
    loop {
        let next = store.next_deadline();
        let sleep = async {
            match next {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stop.changed() => return,
            _ = hub.reaper.notified() => continue,
            _ = sleep => {}
        }
        let reaped = store.reap(std::time::Instant::now());
        hub.metrics
            .orphans_reaped
            .fetch_add(reaped.records.len() as u64, Ordering::Relaxed);
        if !reaped.records.is_empty() {
            info!(records = reaped.records.len(), "reaped orphaned records");
        }
        hub.deliver(reaped.notifications);
    }
}

/// The gateway's own work with Redis Cluster: hands the cluster's events to the
/// watchers' mailboxes, renews leases, reaps (when it is the reaper), drops
/// subscriptions nobody uses and forgets quota states nobody uses. Each chore runs on
/// its own, so that the events never wait for a pass over thousands of leases or a
/// round of reaping (they did: with 5,000 identities connected, a watch's changes
/// arrived 250 ms late at the median).
async fn cluster_upkeep(hub: Arc<Hub>, c: Arc<ClusterStore>, mut stop: watch::Receiver<bool>) {
    let pushes = tokio::spawn(c.clone().dispatch_events());
    let mut events = c.take_events().expect("taken once");
    c.refresh_topology().await;
    let topology = {
        let c = c.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(c.topology_every());
            loop {
                tick.tick().await;
                c.refresh_topology().await;
            }
        })
    };
    let chores = [
        tokio::spawn(every(
            c.check_every(),
            stop.clone(),
            c.clone(),
            |c| async move { c.check_connection().await },
        )),
        tokio::spawn(every(
            c.lease_renewal(),
            stop.clone(),
            c.clone(),
            |c| async move { c.renew_leases().await },
        )),
        tokio::spawn(every(
            Duration::from_secs(1),
            stop.clone(),
            (c.clone(), hub.clone()),
            |(c, hub)| async move { reap_while_due(&c, &hub).await },
        )),
        tokio::spawn(every(
            c.sweep_every(),
            stop.clone(),
            c.clone(),
            |c| async move {
                c.sweep_subscriptions().await;
                c.forget_unused_quotas();
            },
        )),
    ];
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            Some(batch) = events.recv() => hub.deliver(batch),
        }
    }
    // Each chore finishes the round it is in (a reaping round half done would be
    // left to the repair pass).
    for chore in chores {
        let _ = chore.await;
    }
    pushes.abort();
    topology.abort();
}

/// Reaping rounds back to back while entries are due, for up to a second (then the
/// stop signal is looked at, and the next tick comes at once).
async fn reap_while_due(c: &ClusterStore, hub: &Hub) {
    let started = std::time::Instant::now();
    loop {
        let round = c.reap_once().await;
        c.note_contact(round.is_ok());
        match round {
            Ok(round) => {
                hub.metrics
                    .orphans_reaped
                    .fetch_add(round.reaped as u64, Ordering::Relaxed);
                if !round.more || started.elapsed() >= Duration::from_secs(1) {
                    return;
                }
            }
            Err(e) => {
                warn!(error = %e, "reaping failed; trying again in a second");
                return;
            }
        }
    }
}

/// Runs `chore` on a copy of `with` every `period` (the first at once; a round that
/// overruns delays the next, it never runs twice at once) until `stop`.
async fn every<T, F, Fut>(period: Duration, mut stop: watch::Receiver<bool>, with: T, mut chore: F)
where
    T: Clone,
    F: FnMut(T) -> Fut,
    Fut: Future<Output = ()>,
{
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => chore(with.clone()).await,
        }
    }
}

/// Periodic upkeep that has no deadline of its own: forgets the throttle state of
/// networks whose miss budget is full again.
async fn housekeep(hub: Arc<Hub>, stop: watch::Receiver<bool>) {
    every(Duration::from_secs(10), stop, hub, |hub| {
        hub.throttle.prune();
        std::future::ready(())
    })
    .await
}

/// A server running on its own thread and runtime; stopped by [`RunningServer::stop`]
/// or when dropped.
#[derive(Debug)]
pub struct RunningServer {
    addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    stats: ServerStats,
    snapshots: SnapshotHandle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<io::Result<()>>>,
}

impl RunningServer {
    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    /// Where it serves `/metrics`, when it does (the port it got, for port 0).
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }
    /// Its counters.
    pub fn stats(&self) -> &ServerStats {
        &self.stats
    }
    /// Writes a snapshot now and waits for it (needs `--data-dir`).
    pub fn snapshot(&self) -> Result<SnapshotReport, String> {
        let h = self.snapshots.clone();
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .build()
                .map_err(|e| e.to_string())?
                .block_on(h.snapshot())
        })
        .join()
        .map_err(|_| "snapshot thread panicked".to_string())?
    }
    /// Shuts it down and waits for it.
    pub fn stop(mut self) -> io::Result<()> {
        self.stop_inner()
    }
    fn stop_inner(&mut self) -> io::Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| io::Error::other("server thread panicked"))?,
            None => Ok(()),
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        let _ = self.stop_inner();
    }
}

/// Starts a server on a new thread with a `threads`-worker runtime (1 = current
/// thread) and returns once it listens.
pub fn spawn(config: ServerConfig, threads: usize) -> io::Result<RunningServer> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    // Everything runtime-related happens on the new thread, so this works from inside
    // another runtime too (e.g. an async test).
    let thread = std::thread::Builder::new()
        .name("netswap-server".into())
        .spawn(move || {
            let runtime = build_runtime(threads)?;
            runtime.block_on(async {
                let server = match Server::bind(config).await {
                    Ok(s) => s,
                    Err(e) => {
                        let e = io::Error::from(e);
                        let _ = ready_tx.send(Err(io::Error::new(e.kind(), e.to_string())));
                        return Err(e);
                    }
                };
                let _ = ready_tx.send(Ok((
                    server.local_addr(),
                    server.metrics_addr(),
                    server.stats(),
                    server.snapshot_handle(),
                )));
                server
                    .run(async {
                        let _ = rx.await;
                    })
                    .await
            })
        })?;
    let (addr, metrics_addr, stats, snapshots) = ready_rx
        .recv()
        .map_err(|_| io::Error::other("server thread ended before listening"))??;
    Ok(RunningServer {
        addr,
        metrics_addr,
        stats,
        snapshots,
        stop: Some(tx),
        thread: Some(thread),
    })
}

/// A tokio runtime with `threads` workers (1 = the single-threaded scheduler).
pub fn build_runtime(threads: usize) -> io::Result<tokio::runtime::Runtime> {
    if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    }
}

/// Turns transparent huge pages off for this process (`disabled` true:
/// `prctl(PR_SET_THP_DISABLE)`, what Redis does with `disable-thp yes`), for its
/// memory now and later, whatever the allocator asks for, or lets the system's
/// setting apply again (`disabled` false). Returns whether they were disabled before
/// (a parent process may have done so: the flag is inherited), so that a caller can
/// put that back. On systems other than Linux there is nothing to do (`Ok(false)`).
///
/// Why (docs/BENCHMARKS.md): a huge page is faulted in and cleared in one go, 2 MiB
/// at a time, on the thread that touches it first, here the event loop that serves
/// every connection. mimalloc places its arenas where the kernel may use huge pages;
/// on the test host a 64 MiB write then took 0.11 s instead of 0.04 s.
pub fn set_transparent_huge_pages_disabled(disabled: bool) -> io::Result<bool> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: PR_GET_THP_DISABLE and PR_SET_THP_DISABLE take integers, no pointers.
        let before = unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) };
        if before < 0 {
            return Err(io::Error::last_os_error());
        }
        let flag = libc::c_ulong::from(disabled);
        // SAFETY: as above.
        if unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, flag, 0, 0, 0) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(before == 1)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = disabled;
        Ok(false)
    }
}
