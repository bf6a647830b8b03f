//! What the server counts, for STATS and for Prometheus.
//!
//! The hot path must not pay for this: each connection counts in plain integers
//! ([`Local`]) and adds its counts to the shared atomics ([`Metrics`]) once per read
//! batch. Request latency (from a request's last frame to its reply being queued) is
//! measured per batch with the embedded store (one clock read per batch: every request
//! of a batch gets the batch's time, an upper bound) and per request with Redis
//! Cluster. `/metrics` encodes these with `prometheus-client` ([`Collector`]) and is
//! served by `hyper` ([`serve_metrics`]); STATS ([`Hub::stats_entries`]) reads the same
//! numbers.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request as HttpRequest, Response, StatusCode};
use netswap_proto::{Opcode, Status};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeGaugeValue, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::hub::{Backend, Hub};

/// Opcodes counted (every request opcode, and one slot for bytes that are none).
pub const OPS: usize = Opcode::ALL.len() + 1;
const UNKNOWN_OP: usize = OPS - 1;
/// Statuses counted.
pub const STATUSES: usize = Status::ALL.len();
/// Latency bucket bounds, seconds.
pub const BUCKETS: [f64; 16] = [
    5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.5,
    2.5,
];

fn op_index(op: u8) -> usize {
    Opcode::from_u8(op).map_or(UNKNOWN_OP, |o| o as usize)
}

fn op_name(i: usize) -> &'static str {
    Opcode::ALL.get(i).map_or("unknown", |o| o.name())
}

fn bucket(d: Duration) -> usize {
    let s = d.as_secs_f64();
    BUCKETS
        .iter()
        .position(|b| s <= *b)
        .unwrap_or(BUCKETS.len())
}

/// Counters shared by every connection.
#[derive(Debug)]
pub(crate) struct Metrics {
    started: Instant,
    requests: Vec<AtomicU64>,
    latency: Vec<AtomicU64>,
    latency_ns: Vec<AtomicU64>,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub connections_accepted: AtomicU64,
    pub connections_refused: AtomicU64,
    pub protocol_errors: AtomicU64,
    pub busy: AtomicU64,
    pub notifications_sent: AtomicU64,
    /// Notifications never sent: their watch ended or their connection closed first.
    pub notifications_dropped: AtomicU64,
    pub orphans_reaped: AtomicU64,
    pub snapshots_written: AtomicU64,
    pub snapshot_failures: AtomicU64,
    pub scrapes: AtomicU64,
}

fn atomics(n: usize) -> Vec<AtomicU64> {
    (0..n).map(|_| AtomicU64::new(0)).collect()
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            started: Instant::now(),
            requests: atomics(OPS * STATUSES),
            latency: atomics(OPS * (BUCKETS.len() + 1)),
            latency_ns: atomics(OPS),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            connections_accepted: AtomicU64::new(0),
            connections_refused: AtomicU64::new(0),
            protocol_errors: AtomicU64::new(0),
            busy: AtomicU64::new(0),
            notifications_sent: AtomicU64::new(0),
            notifications_dropped: AtomicU64::new(0),
            orphans_reaped: AtomicU64::new(0),
            snapshots_written: AtomicU64::new(0),
            snapshot_failures: AtomicU64::new(0),
            scrapes: AtomicU64::new(0),
        }
    }
}

/// One connection's counts since its last flush.
#[derive(Debug)]
pub(crate) struct Local {
    requests: Vec<u32>,
    /// Requests of the current batch per opcode, whose latency is not counted yet.
    batch: [u32; OPS],
    latency: Vec<u32>,
    latency_ns: [u64; OPS],
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub notifications: u64,
    pub busy: u64,
    dirty: bool,
    /// Opcodes (by index, as bits) with counts since the last flush: a flush looks at
    /// those rows only.
    ops: u32,
}

impl Default for Local {
    fn default() -> Self {
        Local {
            requests: vec![0; OPS * STATUSES],
            batch: [0; OPS],
            latency: vec![0; OPS * (BUCKETS.len() + 1)],
            latency_ns: [0; OPS],
            bytes_in: 0,
            bytes_out: 0,
            notifications: 0,
            busy: 0,
            dirty: false,
            ops: 0,
        }
    }
}

impl Local {
    /// A request with opcode byte `op` was answered with `status`; its latency is
    /// the batch's.
    pub fn answered(&mut self, op: u8, status: Status) {
        let i = op_index(op);
        self.requests[i * STATUSES + status as usize] += 1;
        self.batch[i] += 1;
        self.ops |= 1 << i;
        if status == Status::Busy {
            self.busy += 1;
        }
        self.dirty = true;
    }

    /// A request answered `took` after its last frame (an asynchronous backend).
    pub fn answered_after(&mut self, op: u8, status: Status, took: Duration) {
        let i = op_index(op);
        self.ops |= 1 << i;
        self.requests[i * STATUSES + status as usize] += 1;
        self.latency[i * (BUCKETS.len() + 1) + bucket(took)] += 1;
        self.latency_ns[i] += took.as_nanos() as u64;
        if status == Status::Busy {
            self.busy += 1;
        }
        self.dirty = true;
    }

    /// The batch that started at `since` is answered: its requests get its latency.
    pub fn batch_done(&mut self, since: Instant) {
        if self.batch.iter().all(|&n| n == 0) {
            return;
        }
        let took = since.elapsed();
        let b = bucket(took);
        for (i, n) in self.batch.iter_mut().enumerate() {
            if *n > 0 {
                self.latency[i * (BUCKETS.len() + 1) + b] += *n;
                self.latency_ns[i] += took.as_nanos() as u64 * *n as u64;
                *n = 0;
            }
        }
    }

    /// Marks that something was counted outside [`Local::answered`].
    pub fn touch(&mut self) {
        self.dirty = true;
    }

    /// Adds the counts to `m` and starts again from zero.
    pub fn flush(&mut self, m: &Metrics) {
        if !self.dirty {
            return;
        }
        self.dirty = false;
        let rows = BUCKETS.len() + 1;
        while self.ops != 0 {
            let op = self.ops.trailing_zeros() as usize;
            self.ops &= self.ops - 1;
            for s in op * STATUSES..(op + 1) * STATUSES {
                let n = std::mem::take(&mut self.requests[s]);
                if n > 0 {
                    m.requests[s].fetch_add(n as u64, Ordering::Relaxed);
                }
            }
            for b in op * rows..(op + 1) * rows {
                let n = std::mem::take(&mut self.latency[b]);
                if n > 0 {
                    m.latency[b].fetch_add(n as u64, Ordering::Relaxed);
                }
            }
            let ns = std::mem::take(&mut self.latency_ns[op]);
            if ns > 0 {
                m.latency_ns[op].fetch_add(ns, Ordering::Relaxed);
            }
        }
        for (local, shared) in [
            (&mut self.bytes_in, &m.bytes_in),
            (&mut self.bytes_out, &m.bytes_out),
            (&mut self.notifications, &m.notifications_sent),
            (&mut self.busy, &m.busy),
        ] {
            if *local > 0 {
                shared.fetch_add(*local, Ordering::Relaxed);
                *local = 0;
            }
        }
    }
}

impl Metrics {
    /// Requests answered so far, all opcodes and statuses.
    pub fn requests_total(&self) -> u64 {
        self.requests
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .sum()
    }

    /// Requests answered with `op` and `status`.
    pub fn requests(&self, op: Opcode, status: Status) -> u64 {
        self.requests[op as usize * STATUSES + status as usize].load(Ordering::Relaxed)
    }
}

/// Numbers that are read when asked (gauges), from the hub.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Gauges {
    pub connections: u64,
    pub identities: u64,
    pub records: u64,
    pub data_bytes: u64,
    pub watches: u64,
    pub partial_bytes: u64,
    pub notifications_waiting: u64,
    pub orphans_pending: u64,
}

impl Hub {
    /// The gauges now. With Redis Cluster, records, bytes and pending orphans are the
    /// last count of the deployment's keys (taken on demand, at most once a second).
    pub(crate) fn gauges(&self) -> Gauges {
        let (identities, records, data_bytes, watches, orphans) = match &self.backend {
            Backend::Memory(s) => {
                let st = s.stats();
                (
                    st.accounts,
                    st.records,
                    st.data_bytes,
                    st.watches,
                    s.orphans_pending(),
                )
            }
            Backend::Cluster(c) => {
                let (r, b, o) = c.last_counts();
                (c.local_identities() as u64, r, b, c.watch_count(), o)
            }
        };
        Gauges {
            connections: self.connections() as u64,
            identities,
            records,
            data_bytes,
            watches,
            partial_bytes: self.partial_budget.used(),
            notifications_waiting: self.notifications_waiting() as u64,
            orphans_pending: orphans,
        }
    }

    /// The STATS reply's entries: server-wide counters only (no identity learns
    /// anything about another), then the caller's own quota usage when known.
    pub(crate) fn stats_entries(&self, own: Option<(u64, u64)>) -> Vec<(String, u64)> {
        let m = &self.metrics;
        let g = self.gauges();
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut out: Vec<(String, u64)> = vec![
            ("uptime_seconds".into(), m.started.elapsed().as_secs()),
            (
                "backend_redis_cluster".into(),
                matches!(self.backend, Backend::Cluster(_)) as u64,
            ),
            ("connections".into(), g.connections),
            ("connections_accepted".into(), load(&m.connections_accepted)),
            ("connections_refused".into(), load(&m.connections_refused)),
            ("identities".into(), g.identities),
            ("records".into(), g.records),
            ("data_bytes".into(), g.data_bytes),
            ("watches".into(), g.watches),
            ("partial_bytes".into(), g.partial_bytes),
            ("orphans_pending".into(), g.orphans_pending),
            ("orphans_reaped".into(), load(&m.orphans_reaped)),
            ("bytes_in".into(), load(&m.bytes_in)),
            ("bytes_out".into(), load(&m.bytes_out)),
            ("requests".into(), m.requests_total()),
            ("busy".into(), load(&m.busy)),
            ("protocol_errors".into(), load(&m.protocol_errors)),
            ("misses".into(), load(&self.throttle.misses)),
            ("throttled".into(), load(&self.throttle.throttled)),
            ("notifications_sent".into(), load(&m.notifications_sent)),
            (
                "notifications_merged".into(),
                load(&self.notifications_merged),
            ),
            ("notifications_waiting".into(), g.notifications_waiting),
            (
                "notifications_dropped".into(),
                load(&m.notifications_dropped),
            ),
            ("snapshots_written".into(), load(&m.snapshots_written)),
        ];
        for (i, op) in Opcode::ALL.iter().enumerate() {
            let n: u64 = (0..STATUSES)
                .map(|s| m.requests[i * STATUSES + s].load(Ordering::Relaxed))
                .sum();
            out.push((format!("requests_{}", op.name().to_ascii_lowercase()), n));
        }
        if let Some((r, b)) = own {
            out.push(("your_records".into(), r));
            out.push(("your_bytes".into(), b));
        }
        out
    }
}

/// Encodes the hub's numbers for Prometheus on every scrape.
#[derive(Debug)]
struct HubCollector(Arc<Hub>);

fn counter(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: u64,
) -> Result<(), std::fmt::Error> {
    ConstCounter::new(v).encode(e.encode_descriptor(name, help, None, MetricType::Counter)?)
}

/// A counter with one label: a sample per `(value, count)`.
fn counters_by(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &str,
    samples: &[(&str, u64)],
) -> Result<(), std::fmt::Error> {
    let mut fam = e.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (value, n) in samples {
        ConstCounter::new(*n).encode(fam.encode_family(&[(label, *value)])?)?;
    }
    Ok(())
}

/// A gauge of any number Prometheus encodes (integers as integers, seconds as floats).
fn gauge<N: EncodeGaugeValue>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: N,
) -> Result<(), std::fmt::Error> {
    ConstGauge::new(v).encode(e.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

impl Collector for HubCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let hub = &self.0;
        let m = &hub.metrics;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        {
            let mut fam = e.encode_descriptor(
                "netswap_requests",
                "Requests answered, by opcode and status.",
                None,
                MetricType::Counter,
            )?;
            for op in 0..OPS {
                for (s, status) in Status::ALL.iter().enumerate() {
                    let n = load(&m.requests[op * STATUSES + s]);
                    if n == 0 {
                        continue;
                    }
                    let labels = [("op", op_name(op)), ("status", status.name())];
                    ConstCounter::new(n).encode(fam.encode_family(&labels)?)?;
                }
            }
        }
        {
            let mut fam = e.encode_descriptor(
                "netswap_request_duration_seconds",
                "Time from a request's last frame to its reply being queued, by opcode.",
                None,
                MetricType::Histogram,
            )?;
            for op in 0..OPS {
                let row = &m.latency[op * (BUCKETS.len() + 1)..(op + 1) * (BUCKETS.len() + 1)];
                let count: u64 = row.iter().map(load).sum();
                if count == 0 {
                    continue;
                }
                // Per-bucket counts: the encoder makes them cumulative.
                let buckets: Vec<(f64, u64)> = BUCKETS
                    .iter()
                    .chain([f64::INFINITY].iter())
                    .enumerate()
                    .map(|(i, b)| (*b, load(&row[i])))
                    .collect();
                let sum = load(&m.latency_ns[op]) as f64 / 1e9;
                let labels = [("op", op_name(op))];
                fam.encode_family(&labels)?
                    .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                        sum, count, &buckets, None,
                    )?;
            }
        }
        let g = hub.gauges();
        counter(
            &mut e,
            "netswap_received_bytes",
            "Bytes read from clients.",
            load(&m.bytes_in),
        )?;
        counter(
            &mut e,
            "netswap_sent_bytes",
            "Bytes written to clients.",
            load(&m.bytes_out),
        )?;
        counter(
            &mut e,
            "netswap_connections_accepted",
            "Connections accepted.",
            load(&m.connections_accepted),
        )?;
        counter(
            &mut e,
            "netswap_connections_refused",
            "Connections refused (per-address limit, or the store unavailable).",
            load(&m.connections_refused),
        )?;
        gauge(
            &mut e,
            "netswap_connections",
            "Open client connections.",
            g.connections,
        )?;
        gauge(
            &mut e,
            "netswap_identities",
            "Identities known (with Redis Cluster: connected to this gateway).",
            g.identities,
        )?;
        gauge(&mut e, "netswap_records", "Records stored.", g.records)?;
        gauge(
            &mut e,
            "netswap_data_bytes",
            "Data bytes stored.",
            g.data_bytes,
        )?;
        gauge(
            &mut e,
            "netswap_partial_message_bytes",
            "Bytes promised to unfinished multi-frame messages.",
            g.partial_bytes,
        )?;
        gauge(
            &mut e,
            "netswap_orphans_pending",
            "Identities and records waiting out their orphan grace.",
            g.orphans_pending,
        )?;
        counter(
            &mut e,
            "netswap_orphans_reaped",
            "Records deleted because their owner stayed away.",
            load(&m.orphans_reaped),
        )?;
        gauge(&mut e, "netswap_watches", "Watches registered.", g.watches)?;
        counter(
            &mut e,
            "netswap_notifications_sent",
            "NOTIFY messages queued for watchers.",
            load(&m.notifications_sent),
        )?;
        counter(
            &mut e,
            "netswap_notifications_merged",
            "Notifications merged into summaries because their watcher was behind.",
            load(&hub.notifications_merged),
        )?;
        counter(
            &mut e,
            "netswap_notifications_dropped",
            "Notifications never sent because their watch ended or their connection closed first.",
            load(&m.notifications_dropped),
        )?;
        gauge(
            &mut e,
            "netswap_notifications_waiting",
            "Notifications waiting in watchers' mailboxes.",
            g.notifications_waiting,
        )?;
        counter(
            &mut e,
            "netswap_busy_replies",
            "Replies with status BUSY.",
            load(&m.busy),
        )?;
        counter(
            &mut e,
            "netswap_protocol_errors",
            "Connections closed with PROTOCOL_ERROR.",
            load(&m.protocol_errors),
        )?;
        counter(
            &mut e,
            "netswap_pointer_misses",
            "Lookups of pointers that do not exist.",
            load(&hub.throttle.misses),
        )?;
        counter(
            &mut e,
            "netswap_pointer_misses_throttled",
            "Requests answered BUSY by the miss throttle.",
            load(&hub.throttle.throttled),
        )?;
        counter(
            &mut e,
            "netswap_snapshots_written",
            "Snapshots written (--data-dir).",
            load(&m.snapshots_written),
        )?;
        counter(
            &mut e,
            "netswap_snapshot_failures",
            "Snapshots that failed.",
            load(&m.snapshot_failures),
        )?;
        gauge(
            &mut e,
            "netswap_uptime_seconds",
            "Seconds since the server started.",
            m.started.elapsed().as_secs(),
        )?;
        if let Backend::Cluster(c) = &hub.backend {
            let g = c.counts();
            counters_by(
                &mut e,
                "netswap_redis_loads",
                "Loads of records from Redis Cluster: by plain commands in one round trip, or by the atomic LOAD script after writes kept coming in between.",
                "how",
                &[("plain", g.loads_plain), ("script", g.loads_script)],
            )?;
            counter(
                &mut e,
                "netswap_redis_load_retries",
                "Loads read again because a write came in between their commands.",
                g.load_retries,
            )?;
            counters_by(
                &mut e,
                "netswap_redis_state_cache_writes",
                "Writes by how the gateway's remembered state served them: hit (one round trip), stale (the commit refused it; decided again), miss (loaded first).",
                "result",
                &[
                    ("hit", g.state_cache_hits),
                    ("stale", g.state_cache_stale),
                    ("miss", g.state_cache_misses),
                ],
            )?;
            counters_by(
                &mut e,
                "netswap_redis_read_cache_loads",
                "Loads by how the read cache (--redis-read-cache) served them: hit (answered from it after a barrier), fill (loaded on a tracking connection, filling it), missed (held, but its barrier failed or it was invalidated meanwhile: loaded), bypassed (could have filled it, but the cache served few hits: loaded as without it).",
                "result",
                &[
                    ("hit", g.read_cache_hits),
                    ("fill", g.read_cache_fills),
                    ("missed", g.read_cache_missed_at_barrier),
                    ("bypassed", g.read_cache_bypassed),
                ],
            )?;
            counter(
                &mut e,
                "netswap_redis_read_cache_barriers",
                "Barriers sent on the read cache's tracking connections (one serves the hits on one primary gathered in one pass).",
                g.read_cache_barriers,
            )?;
            counter(
                &mut e,
                "netswap_redis_read_cache_invalidations",
                "Records the read cache dropped on Redis's invalidations (changes through any gateway).",
                g.read_cache_invalidations,
            )?;
            counter(
                &mut e,
                "netswap_redis_read_cache_pushes",
                "Invalidations Redis pushed to the read cache's tracking connections: one per change of a record this gateway read since its last change (what the cache costs Redis per write).",
                g.read_cache_pushes,
            )?;
            counter(
                &mut e,
                "netswap_redis_queued_changes",
                "Changes that waited for an earlier change of their record on this gateway (a record's changes go one at a time): many mean records written by many at once.",
                g.queued_changes,
            )?;
            counter(
                &mut e,
                "netswap_redis_commit_races_lost",
                "Commits that found their record changed since they were decided (by another gateway, or giving way to its claim); each is decided again on the state it brought back.",
                g.commit_races_lost,
            )?;
            counter(
                &mut e,
                "netswap_redis_grouped_writes",
                "Writes committed in one commit with an earlier write of their record that queued with them on this gateway (one round trip and one script for the group).",
                g.grouped_writes,
            )?;
            counter(
                &mut e,
                "netswap_redis_claims",
                "Commits sent with a claim on a record this gateway's changes kept losing, so that writers through several gateways all get in.",
                g.claims,
            )?;
            counter(
                &mut e,
                "netswap_redis_batches",
                "Pipelines sent to one primary with the loads and commits of several requests (--redis-batch).",
                g.batches,
            )?;
            counter(
                &mut e,
                "netswap_redis_batched",
                "Loads and commits sent in those pipelines (per pipeline: this over netswap_redis_batches_total).",
                g.batched,
            )?;
            counter(
                &mut e,
                "netswap_redis_batched_resent",
                "Loads and commits of a pipeline that failed as a whole (a slot moved since the gateway last read the cluster's layout), sent again on their own.",
                g.batched_resent,
            )?;
            counter(
                &mut e,
                "netswap_redis_quota_writes",
                "Compare-and-sets written to identities' quota hashes (the changes that queue up behind one go together in the next).",
                g.quota_writes,
            )?;
            counter(
                &mut e,
                "netswap_redis_quota_changes",
                "Quota changes (reservations, noted releases, settlements) those compare-and-sets carried.",
                g.quota_changes,
            )?;
            counters_by(
                &mut e,
                "netswap_redis_replies_refused",
                "Large replies (READs, data watches' first replies) answered BUSY because replies their clients have not read hold the address's share (a quarter) or all of --redis-max-reply-bytes.",
                "held",
                &[
                    ("address", g.replies_refused_address),
                    ("gateway", g.replies_refused_gateway),
                ],
            )?;
            gauge(
                &mut e,
                "netswap_redis_subscribed_records",
                "Records this gateway holds subscriptions to events for: watched here now, or until --redis-unsubscribe-after once their last watch here ended.",
                g.subscribed_records,
            )?;
            gauge(
                &mut e,
                "netswap_redis_primaries_silent",
                "Primaries that did not answer the last look's PING (every second) on the connection for commands; creates put new records on the others meanwhile.",
                g.primaries_silent,
            )?;
            gauge(
                &mut e,
                "netswap_redis_slots_avoided",
                "Hash slots creates put no new record in now: of primaries that did not answer the last look's PING, or of none known (a primary marked failing, before a replica takes over).",
                g.slots_avoided,
            )?;
            gauge(
                &mut e,
                "netswap_redis_unsubscribes_owed",
                "Records whose SUNSUBSCRIBE failed or was not answered (Redis may still publish their events to this gateway): sent again at the next sweep of unused subscriptions.",
                g.unsubscribes_owed,
            )?;
            gauge(
                &mut e,
                "netswap_redis_reply_bytes_held",
                "Bytes of large replies fetched from Redis and not sent yet (of --redis-max-reply-bytes).",
                g.reply_bytes_held,
            )?;
            gauge(
                &mut e,
                "netswap_redis_lease_renewal_seconds",
                "How long the last pass renewing this gateway's leases on its identities took (a pass runs every third of --lease-ttl; one near the TTL lets leases run out).",
                g.lease_renewal_micros as f64 / 1e6,
            )?;
            counter(
                &mut e,
                "netswap_redis_lease_renewals",
                "Lease renewals that succeeded (every identity with a connection here, each third of --lease-ttl).",
                g.lease_renewals,
            )?;
            counter(
                &mut e,
                "netswap_redis_lease_renewals_failed",
                "Lease renewals that failed (each is tried again at the next pass; the lease runs out after --lease-ttl without one).",
                g.lease_renewals_failed,
            )?;
            counter(
                &mut e,
                "netswap_redis_lease_renewals_late",
                "Lease renewals not done within a quarter of their period (a primary slow or not answering): they went on in the background, and their pass went on to the others.",
                g.lease_renewals_late,
            )?;
            counter(
                &mut e,
                "netswap_redis_leases_lapsed",
                "Lease renewals that found the lease run out: the gateway was paused or cut off from the cluster for longer than --lease-ttl, and its identities were offline for the other gateways meanwhile.",
                g.leases_lapsed,
            )?;
            counter(
                &mut e,
                "netswap_redis_connections_replaced",
                "Connections to Redis Cluster replaced because they stopped answering while the cluster answered a new one (the redis crate's recovery after a failover did not complete).",
                g.connections_replaced,
            )?;
            counter(
                &mut e,
                "netswap_redis_tls_reloads",
                "Times the TLS files (--redis-tls-ca, --redis-tls-cert, --redis-tls-key) changed and were read again: later connections to Redis Cluster use them, and the gateway's connections were made anew with them.",
                g.tls_reloads,
            )?;
            counter(
                &mut e,
                "netswap_redis_subscriptions_renewed",
                "Times the gateway subscribed again to every watched record on a new connection because the cluster's primaries changed (a failover takes the dead primary's subscriptions with it) or subscriptions were missing on the primaries (see netswap_redis_subscriptions_missing_total).",
                g.subscriptions_renewed,
            )?;
            counter(
                &mut e,
                "netswap_redis_subscriptions_missing",
                "Of those renewals, the ones made because the primaries held fewer of the gateway's subscriptions than its watches need (CLIENT INFO's ssub, two looks in a row): the redis crate lost some when a connection to a node came back, or made one on a replica.",
                g.subscriptions_missing,
            )?;
            counter(
                &mut e,
                "netswap_redis_unreplicated_writes",
                "Writes acknowledged with fewer replicas than --redis-wait-replicas asked (their primary had fewer: a failover).",
                g.unreplicated_writes,
            )?;
        }
        if let Some(rss) = resident_bytes() {
            gauge(
                &mut e,
                "netswap_resident_memory_bytes",
                "Resident memory of the server process.",
                rss,
            )?;
        }
        Ok(())
    }
}

/// The process's resident memory (Linux: `/proc/self/statm`).
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// The Prometheus text of the hub's numbers.
pub(crate) fn render(hub: &Arc<Hub>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(HubCollector(hub.clone())));
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry) {
        warn!(error = %e, "encoding metrics failed");
    }
    out
}

/// Serves `GET /metrics` (Prometheus text format) on `listener` until `stop`; any
/// other path is 404, other methods 405, and what is not HTTP gets hyper's 400 or a
/// close. Scrapes run on their own tasks and only read atomics (and, with the
/// embedded store, count the records shard by shard).
pub(crate) async fn serve_metrics(
    listener: TcpListener,
    hub: Arc<Hub>,
    mut stop: watch::Receiver<bool>,
) {
    info!(addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "metrics at /metrics");
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.changed() => return,
            a = listener.accept() => match a {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let hub = hub.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |req: HttpRequest<hyper::body::Incoming>| {
                    let hub = hub.clone();
                    async move { Ok::<_, Infallible>(respond(&hub, &req)) }
                });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            if let Err(e) = tokio::time::timeout(Duration::from_secs(30), conn)
                .await
                .unwrap_or(Ok(()))
            {
                debug!(%peer, error = %e, "metrics connection ended with an error");
            }
        });
    }
}

fn respond<B>(hub: &Arc<Hub>, req: &HttpRequest<B>) -> Response<Full<Bytes>> {
    let reply = |code: StatusCode, body: &'static str| {
        Response::builder()
            .status(code)
            .header("content-type", "text/plain; charset=utf-8")
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .expect("a valid response")
    };
    let path = req.uri().path();
    if !matches!(path, "/metrics" | "/healthz" | "/readyz") {
        return reply(
            StatusCode::NOT_FOUND,
            "not found: metrics are at /metrics (and /healthz, /readyz)\n",
        );
    }
    if req.method() != hyper::Method::GET && req.method() != hyper::Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
    }
    match path {
        // Liveness: the process serves.
        "/healthz" => return reply(StatusCode::OK, "ok\n"),
        // Readiness: requests can be served (a gateway out of touch with the cluster
        // answers every request BUSY; a load balancer should send clients elsewhere).
        "/readyz" => {
            return match &hub.backend {
                Backend::Cluster(c) if !c.ready() => reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: the Redis Cluster did not answer this gateway's last periodic work\n",
                ),
                _ => reply(StatusCode::OK, "ready\n"),
            };
        }
        _ => {}
    }
    hub.metrics.scrapes.fetch_add(1, Ordering::Relaxed);
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
        .body(Full::new(Bytes::from(render(hub))))
        .expect("a valid response")
}

/// Binds the metrics listener (a clear error at start when it cannot).
pub(crate) async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
