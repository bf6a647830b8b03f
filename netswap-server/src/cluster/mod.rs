//! The Redis Cluster backend: the netswap server as a stateless gateway.
//!
//! Records, quotas, leases and the reaper's schedule live in Redis Cluster
//! (`docs/ARCHITECTURE.md` has the data layout; [`keys`] the key names). The gateway
//! keeps no record itself. Every request is decided by `netswap_proto::rules` on a
//! record's state loaded from Redis, and the decided change is applied by a
//! compare-and-set script that checks the record's revision; when another gateway
//! changed the record in between, the gateway loads it again and decides again. Any
//! number of gateways pointed at one cluster are one netswap.
//!
//! - Loads and commits of requests that arrive together go to Redis as one pipeline
//!   per primary (`batch`).
//! - Quotas span slots: reserve, commit, settle, with a repair pass; one identity's
//!   changes are written in groups ([`quota`]).
//! - Liveness: a gateway holds a lease (with a TTL) on each identity it has
//!   connections of, renewed every third of the TTL. An identity with no live lease
//!   on any gateway is offline; its records are reaped a grace period later by one
//!   elected reaper. A gateway that dies stops renewing: its leases run out.
//! - Watches: each gateway subscribes (sharded pub/sub) to the channels of the records
//!   its connections watch; commits publish their events atomically with the change.

mod batch;
mod budget;
mod clock;
mod events;
mod group;
pub(crate) use group::{MAX_GROUP, groupable};
pub(crate) mod keys;
mod ops;
pub(crate) mod quota;
mod reads;
mod reaper;
pub(crate) mod redis_io;
pub(crate) mod scripts;
mod serial;
mod silent;
mod states;
mod turns;

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use netswap_proto::rules::{self, Usage};
use netswap_proto::{
    Access, Applied, ConnId, HelloInfo, Identity, IdentityKey, NewOwner, Notification, Pointer,
    Reply, Request, StoreConfig,
};
use rand::RngCore;
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{PushInfo, RedisError, Value};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

pub(crate) use budget::{Full, GatewayBudget, ReplyBudget};
use keys::Keys;
use quota::{QuotaBook, QuotaError};
use redis_io::{Change, Committed, DataOp, Stored, unavailable};
use turns::{Turn, Turns};

/// Bytes a READ gets back with the record's state in one round trip; larger ranges are
/// read in a second one, once the caller is known to be allowed.
const MAX_INLINE: usize = 16 * 1024;
/// The largest reply READs that arrive together may share (`conn::Conn::submit`):
/// larger ones each hold their own part of the reply budgets (`budget`).
pub(crate) const SHARED_REPLY_MAX: usize = MAX_INLINE;
/// How long a quota reservation and its commit may take before the commit is fenced.
const FENCE: Duration = Duration::from_secs(10);
/// Attempts at a request whose record keeps changing under it.
const MAX_ATTEMPTS: usize = 64;
/// How long a commit whose reply was lost is sent again (a failover takes a few
/// seconds).
const RESEND_FOR: Duration = Duration::from_secs(15);
/// How long a gateway keeps trying to delete the record of a create whose caller was
/// told it failed (`ClusterStore::undo_create_later`).
const UNDO_FOR: Duration = Duration::from_secs(600);
/// Events remembered per watched record, for watches being registered.
const RECENT_EVENTS: usize = 64;
/// Looks in a row without an answer ([`ClusterStore::check_connection`], one a
/// second, each waiting up to [`PING_WAIT`]) before a new connection is tried. A
/// look sends a `PING` to each primary and any answer counts, so a failover, or a
/// primary that stops answering, does not keep it from being answered; a look with
/// no answer at all, twice in a row, means the connection stopped serving, or the
/// whole cluster did.
const UNANSWERED_BEFORE_NEW: u64 = 2;

/// How long a look waits for the `PING`'s answer (at most the response timeout).
const PING_WAIT: Duration = Duration::from_secs(1);

/// Looks at the topology in a row that must find subscriptions missing on the
/// primaries before they are all made again ([`ClusterStore::refresh_topology`]):
/// one look can fall between a slot's move and its channels' subscription on the
/// new primary.
const SHORT_LOOKS_BEFORE_RENEWAL: u64 = 2;

/// Leases renewed at once (`ClusterStore::renew_leases`).
const RENEW_AT_ONCE: usize = 64;
/// How long TLS files that changed but could not be used wait before they are tried
/// again ([`ClusterStore::reload_tls`]); files that change again are tried at once.
const TLS_RETRY: Duration = Duration::from_secs(10);
/// Identities put on the reaper's schedule per `ZADD`.
const SCHEDULE_AT_ONCE: usize = 512;

/// Who a gateway is to Redis: the user and password of `redis-cluster://USER:PASSWORD@…`
/// (Redis's `AUTH` on every connection to every node). Never printed: its `Debug`
/// hides the password.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    /// An ACL user (`None`: Redis's `default` user).
    pub username: Option<String>,
    /// Its password (`None`: no `AUTH`).
    pub password: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<hidden>"))
            .finish()
    }
}

/// TLS to every node (`rediss-cluster://`): whom to trust, and who the gateway is
/// when the nodes ask clients for a certificate (`tls-auth-clients`).
#[derive(Clone, Default)]
pub struct Tls {
    /// PEM certificates of the authorities that sign the nodes' certificates
    /// (`--redis-tls-ca`); `None`: the system's.
    pub ca: Option<Vec<u8>>,
    /// The gateway's PEM certificate and private key (`--redis-tls-cert`,
    /// `--redis-tls-key`).
    pub client: Option<(Vec<u8>, Vec<u8>)>,
    /// The files `ca` and `client` were read from: the gateway reads them again when
    /// they change, and its later connections use them
    /// (every second, docs/ARCHITECTURE.md, "Credentials and TLS"). `None`: given as bytes, read once.
    pub files: Option<TlsFiles>,
}

/// Where a gateway's TLS settings come from (`--redis-tls-ca`, `--redis-tls-cert`,
/// `--redis-tls-key`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// The authorities' certificates.
    pub ca: Option<PathBuf>,
    /// The gateway's certificate and its private key.
    pub client: Option<(PathBuf, PathBuf)>,
}

/// What a PEM file must hold ([`read_pem`]).
#[derive(Clone, Copy)]
enum Pem {
    /// One certificate or more.
    Certificates,
    /// A private key.
    PrivateKey,
}

/// Reads the PEM file of `flag` and checks it holds what `want` says, so that a wrong
/// file is an error that names it (at start: exit code 2), not a failed connection.
fn read_pem(flag: &str, path: &Path, want: Pem) -> Result<Vec<u8>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let bad = |what: String| format!("{flag} {}: {what}", path.display());
    let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    match want {
        Pem::Certificates => {
            let certs = CertificateDer::pem_slice_iter(&bytes)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad(format!("not PEM certificates ({e:?})")))?;
            if certs.is_empty() {
                return Err(bad("no PEM certificate in it".into()));
            }
        }
        Pem::PrivateKey => {
            PrivateKeyDer::from_pem_slice(&bytes)
                .map_err(|e| bad(format!("no PEM private key in it ({e:?})")))?;
        }
    }
    Ok(bytes)
}

/// A file's modification time and length, or `None` when it cannot be read.
type Stamp = Option<(std::time::SystemTime, u64)>;

/// What [`ClusterStore::reload_tls`] last saw of the TLS files.
struct TlsWatch {
    /// Their stamps when last taken (at start, or read again).
    taken: Vec<Stamp>,
    /// Their stamps when they could not be taken, and when to try them again.
    failed: Option<(Vec<Stamp>, Instant)>,
}

/// The authorities' certificates, and the gateway's certificate and key, as
/// [`Tls::ca`] and [`Tls::client`] hold them.
type TlsBytes = (Option<Vec<u8>>, Option<(Vec<u8>, Vec<u8>)>);

impl TlsFiles {
    /// Reads and checks the files: the authorities' certificates and the gateway's
    /// certificate and key, as [`Tls::ca`] and [`Tls::client`] hold them.
    pub fn read(&self) -> Result<TlsBytes, String> {
        let ca = match &self.ca {
            Some(p) => Some(read_pem("--redis-tls-ca", p, Pem::Certificates)?),
            None => None,
        };
        let client = match &self.client {
            Some((cert, key)) => Some((
                read_pem("--redis-tls-cert", cert, Pem::Certificates)?,
                read_pem("--redis-tls-key", key, Pem::PrivateKey)?,
            )),
            None => None,
        };
        Ok((ca, client))
    }

    /// The files' stamps now: a change of any means they were replaced.
    fn stamps(&self) -> Vec<Stamp> {
        let stamp = |p: &PathBuf| {
            std::fs::metadata(p)
                .ok()
                .map(|m| (m.modified().unwrap_or(std::time::UNIX_EPOCH), m.len()))
        };
        let mut all: Vec<Stamp> = self.ca.iter().map(stamp).collect();
        if let Some((cert, key)) = &self.client {
            all.extend([stamp(cert), stamp(key)]);
        }
        all
    }
}

impl Tls {
    /// The authority and client certificate for the `redis` crate (`None`: neither
    /// is given; the system's authorities, no client certificate).
    fn certificates(&self) -> Option<redis::TlsCertificates> {
        (self.ca.is_some() || self.client.is_some()).then(|| redis::TlsCertificates {
            client_tls: self.client.clone().map(|(client_cert, client_key)| {
                redis::ClientTlsConfig {
                    client_cert,
                    client_key,
                }
            }),
            root_cert: self.ca.clone(),
        })
    }
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("ca", &self.ca.as_ref().map(|c| c.len()))
            .field(
                "client",
                &self.client.as_ref().map(|_| "<certificate and key>"),
            )
            .field("files", &self.files)
            .finish()
    }
}

/// Settings of the Redis Cluster backend.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// Seed nodes, `host:port`.
    pub nodes: Vec<String>,
    /// User and password for every node (from the URL).
    pub credentials: Credentials,
    /// TLS to every node (`rediss-cluster://`); `None`: plain TCP.
    pub tls: Option<Tls>,
    /// Lease time to live: how long an identity stays "connected" after its gateway
    /// vanished without saying goodbye.
    pub lease_ttl: Duration,
    /// Replicas that must acknowledge a write before it is acknowledged (`WAIT`);
    /// 0 = Redis's asynchronous replication.
    pub wait_replicas: u32,
    /// How long one Redis command may take.
    pub response_timeout: Duration,
    /// Prefix of every key (`--redis-prefix`): deployments sharing a cluster use
    /// different ones.
    pub prefix: String,
    /// Requests that change records worked on at once, per primary
    /// (`--redis-max-in-flight`, `turns.rs`; reads take no turn); 0 = no limit.
    pub max_in_flight: usize,
    /// Records whose last seen state is remembered, so that a write on one of them
    /// takes one Redis round trip (`--redis-state-cache`); 0 = off.
    pub state_cache: usize,
    /// Small records held with their bytes and answered without a load, kept exact
    /// by Redis's invalidations (`--redis-read-cache`, `reads`); 0 = off (the
    /// default).
    pub read_cache: usize,
    /// Loads and commits that arrive together go to Redis as one pipeline per
    /// primary (`--redis-batch`, `batch.rs`).
    pub batch: bool,
    /// Bytes of records fetched for large replies not sent yet, across the gateway's
    /// connections (`--redis-max-reply-bytes`, see `budget`).
    pub max_reply_bytes: usize,
    /// How often the gateway reads the cluster's layout (`CLUSTER NODES`: replicas
    /// for `WAIT`, primaries for batching); the `redis` crate follows changes by
    /// itself in between.
    pub topology_every: Duration,
    /// How long the subscriptions to a record's events outlast its last watch here
    /// (a watch that comes back soon finds them there); the sweep looks every third
    /// of this, at most every 10 s.
    pub unsubscribe_after: Duration,
}

impl ClusterOptions {
    /// Parses `redis-cluster://[[USER]:PASSWORD@]host:port,host:port,...` (or
    /// `rediss-cluster://...`: TLS to every node, trusting the system's authorities
    /// until [`ClusterOptions::tls`] says otherwise): the seed
    /// nodes, and the user and password for all of them (percent-encoded, as in any
    /// URL: `%40` for `@`; `:PASSWORD@` alone for Redis's `default` user, as
    /// `redis-cli -u` takes it). Errors name the URL without its password.
    pub fn parse(url: &str) -> Result<ClusterOptions, String> {
        let (rest, tls) = match (
            url.strip_prefix("redis-cluster://"),
            url.strip_prefix("rediss-cluster://"),
        ) {
            (Some(rest), _) => (rest, None),
            (_, Some(rest)) => (rest, Some(Tls::default())),
            _ => {
                return Err(format!(
                    "--store {}: expected memory, redis-cluster://[[USER]:PASSWORD@]HOST:PORT,... \
                     or rediss-cluster://... (TLS)",
                    redact(url)
                ));
            }
        };
        let (credentials, rest) = match rest.rsplit_once('@') {
            None => (Credentials::default(), rest),
            Some((userinfo, hosts)) => {
                let decode = |s: &str, what: &str| {
                    percent_encoding::percent_decode_str(s)
                        .decode_utf8()
                        .map(|s| s.into_owned())
                        .map_err(|_| {
                            format!(
                                "--store {}: the {what} is not UTF-8 once decoded",
                                redact(url)
                            )
                        })
                };
                let (user, password) = match userinfo.split_once(':') {
                    Some((u, p)) => (u, Some(p)),
                    None => (userinfo, None),
                };
                let credentials = Credentials {
                    username: Some(decode(user, "user")?).filter(|u| !u.is_empty()),
                    password: password.map(|p| decode(p, "password")).transpose()?,
                };
                if credentials.password.is_none() {
                    return Err(format!(
                        "--store {}: a user needs a password (USER:PASSWORD@, or :PASSWORD@ for the default user)",
                        redact(url)
                    ));
                }
                (credentials, hosts)
            }
        };
        let nodes: Vec<String> = rest
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| s.to_string())
            .collect();
        if nodes.is_empty() {
            return Err(format!("--store {}: no nodes", redact(url)));
        }
        for n in &nodes {
            if n.contains(['/', '?', '#'])
                || n.rsplit_once(':')
                    .and_then(|(_, p)| p.parse::<u16>().ok())
                    .is_none()
            {
                return Err(format!("--store: node {n:?} is not HOST:PORT"));
            }
        }
        Ok(ClusterOptions {
            nodes,
            credentials,
            tls,
            lease_ttl: Duration::from_secs(15),
            wait_replicas: 0,
            response_timeout: Duration::from_secs(2),
            prefix: "ns".into(),
            max_in_flight: 128,
            state_cache: 65_536,
            read_cache: 0,
            batch: true,
            topology_every: Duration::from_secs(1),
            unsubscribe_after: Duration::from_secs(30),
            max_reply_bytes: 1 << 30,
        })
    }
}

/// One connection's state on this gateway.
#[derive(Debug)]
pub(crate) struct ClusterSession {
    conn: ConnId,
    identity: Identity,
    /// Its address (its network's share of the reply budget).
    ip: IpAddr,
    watches: HashMap<Pointer, u32>,
    /// Shared with its requests in flight: one count to raise per request.
    budget: Arc<ReplyBudget>,
}

impl ClusterSession {
    pub fn conn(&self) -> ConnId {
        self.conn
    }
    /// Its budget of record bytes fetched for replies not sent yet (see `budget`).
    pub fn budget(&self) -> &Arc<ReplyBudget> {
        &self.budget
    }
    pub fn identity(&self) -> &Identity {
        &self.identity
    }
    pub fn watches(&self) -> &HashMap<Pointer, u32> {
        &self.watches
    }
    pub fn watch_ended(&mut self, ptr: Pointer, xid: u32) {
        if self.watches.get(&ptr) == Some(&xid) {
            self.watches.remove(&ptr);
        }
    }
    pub fn set_watch(&mut self, ptr: Pointer, xid: u32) {
        self.watches.insert(ptr, xid);
    }
}

/// What a request needs to know about its connection.
#[derive(Clone, Debug)]
pub(crate) struct Caller {
    pub conn: ConnId,
    pub xid: u32,
    pub identity: Identity,
    /// Records the connection watches.
    pub watching: usize,
    /// The XID of its watch on the request's record, if any.
    pub watch_xid: Option<u32>,
    /// The connection's budget of fetched, unsent reply bytes.
    pub budget: Arc<ReplyBudget>,
}

/// What a request did to the connection's watches (the connection updates its own
/// map when the request completes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum WatchChange {
    None,
    Added(Pointer, u32),
    Removed(Pointer),
}

/// The result of a request on this backend.
#[derive(Debug)]
pub(crate) struct Outcome {
    pub applied: Applied,
    pub watch: WatchChange,
}

impl From<Reply> for Outcome {
    fn from(r: Reply) -> Outcome {
        Outcome {
            applied: r.into(),
            watch: WatchChange::None,
        }
    }
}

#[derive(Debug, Default)]
struct Local {
    /// Identities with connections on this gateway.
    identities: HashMap<Identity, Held>,
    /// The shares of the gateway's budget of large replies of the networks with
    /// connections (`budget`).
    reply_shares: budget::Shares,
    /// Records watched from this gateway.
    watched: HashMap<Pointer, events::WatchEntry>,
    /// Records forgotten by the sweep whose `SUNSUBSCRIBE` failed or was not
    /// answered: Redis may still hold their subscriptions (and publish their events
    /// to this gateway for nothing), so the next sweep sends it again
    /// (`ClusterStore::sweep_subscriptions`).
    unsubscribe_owed: HashSet<Pointer>,
}

/// An identity with connections on this gateway.
#[derive(Debug, Default)]
struct Held {
    /// Its connections here.
    conns: u32,
    /// This gateway may hold a lease on it in Redis (taking one began, and no release
    /// since). Changed only in the identity's turn (`ClusterStore::lease_turns`).
    leased: bool,
    /// When the last lease script that succeeded for it (the take or a renewal) was
    /// sent: its lease runs until at least a TTL after that. Passes renew the
    /// identities in this order, oldest first (`ClusterStore::renew_leases`).
    renewed: Option<Instant>,
    /// A pass of renewals has it: its renewal is queued or in flight (in the
    /// background, if late: a later pass leaves it alone until it is done).
    renewing: bool,
}

/// One lease renewal's outcome ([`ClusterStore::renew_leases`]): `None` if the
/// identity was no longer leased; else the `LEASE` script's result (Redis's time, and
/// whether the lease had run out) and when it was sent.
type Renewal = Option<redis::RedisResult<((u64, bool), Instant)>>;

/// A connection to the cluster (the one for commands, or the one for subscriptions)
/// that is replaced when it stops answering while the cluster answers a new one
/// ([`ClusterStore::check_connection`]).
pub(crate) struct Replaceable(std::sync::RwLock<ClusterConnection>);

impl Replaceable {
    fn new(conn: ClusterConnection) -> Replaceable {
        Replaceable(std::sync::RwLock::new(conn))
    }

    /// The connection now (a handle: cheap to clone, and a request sent on it goes
    /// on even if it is replaced meanwhile).
    pub fn get(&self) -> ClusterConnection {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn replace(&self, conn: ClusterConnection) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = conn;
    }
}

/// The Redis Cluster backend. See the module documentation.
pub(crate) struct ClusterStore {
    commands: Arc<Replaceable>,
    /// The connection that holds the watch subscriptions, and nothing else: Redis
    /// sends an `SUNSUBSCRIBE` nobody asked for when a slot moves to another primary,
    /// and the `redis` crate (1.8.1; fixed in 1.8.2) took any such push for the reply
    /// to the oldest request in flight on that connection, which shifted every later
    /// reply by one. Here only (un)subscriptions can be in flight. Replaced like `commands`
    /// when it stops answering ([`ClusterStore::check_connection`]).
    subs: Replaceable,
    /// Where the subscription connection's pushes go (for a new one).
    push_tx: mpsc::UnboundedSender<PushInfo>,
    /// The connection for this gateway's leases (taking, renewing, releasing them,
    /// and the reaper's schedule they move), and nothing else: a lease is renewed
    /// even while the connection for commands is stuck. The `redis` crate's cluster
    /// connection, as released (1.8.2), can stop serving for seconds at a time while
    /// slots move and primaries fail over (its recovery deadlocks with requests in
    /// flight, `docs/upstream/redis-rs-cluster-recovery-deadlock.md`; netswap builds
    /// with the fix, third_party/README.md), again and again on each new connection
    /// while the layout keeps changing; with the leases on it, their renewals failed
    /// meanwhile, the leases ran out, and a client that had stayed connected lost its
    /// records to the reaper (`scripts/chaos-cluster.sh`, docs/RELIABILITY.md). Its
    /// few requests seldom meet a recovery. Replaced like `commands` when it stops
    /// answering ([`ClusterStore::check_connection`]).
    liveness: Replaceable,
    cfg: StoreConfig,
    key: IdentityKey,
    opts: ClusterOptions,
    /// This gateway's name in leases and the reaper lock.
    gateway: String,
    keys: Keys,
    local: Mutex<Local>,
    quota: Arc<QuotaBook>,
    /// Redis time (ms) at a local instant, to estimate Redis time without asking.
    clock: Mutex<(Instant, u64)>,
    /// Since when this gateway has reached the cluster without a failure of its
    /// periodic work (reaper rounds, lease renewals); `None`: it failed last. A
    /// lease that ran out before then, plus a TTL, may have run out only because
    /// its gateway could not renew it (see [`ClusterStore::liveness`]).
    in_touch: Mutex<Option<Instant>>,
    /// Whether the last `PING` on the connection for commands, and on the leases'
    /// connection, was answered (`check_connection`, every second): `/readyz` wants
    /// both.
    answered: [AtomicBool; 2],
    next_conn: AtomicU64,
    next_op: AtomicU64,
    /// The last counts for STATS: records, bytes, pending orphans.
    counts: Mutex<(u64, u64, u64)>,
    counted_at: Mutex<Option<Instant>>,
    /// Replicas per slot range, for `WAIT`.
    replicas: Mutex<redis_io::Replicas>,
    /// Writes acknowledged with fewer replicas than `--redis-wait-replicas` asked
    /// (their primary had fewer: a failover).
    unreplicated: AtomicU64,
    events: mpsc::UnboundedSender<Vec<Notification>>,
    events_rx: Mutex<Option<mpsc::UnboundedReceiver<Vec<Notification>>>>,
    push_rx: Mutex<Option<mpsc::UnboundedReceiver<PushInfo>>>,
    /// Turns for requests (`ClusterOptions::max_in_flight`); `None`: no limit.
    turns: Option<Turns>,
    /// Records' last seen states, for writes in one round trip.
    states: Mutex<states::States>,
    /// Small records read without a load (`None`: `--redis-read-cache 0`).
    reads: Option<Arc<reads::ReadCache>>,
    /// One change at a time per record on this gateway, and writes committed
    /// together (`serial`, `group`).
    serial: Arc<serial::Serial<Pointer, group::Member>>,
    /// This gateway's lease changes of an identity (take, renew, release) in one
    /// order. Without it a renewal sent before the identity's last connection closed
    /// could reach Redis after the release: a lease nobody renews. With a grace no
    /// longer than the TTL, the reaper could then find the identity connected and
    /// take it off its schedule, and its records were never reaped.
    lease_turns: serial::Serial<Identity>,
    /// Held by a pass of renewals from when it picks the identities still connected
    /// until their move on the reaper's schedule is done, and by a release around
    /// its own entry on the schedule: a release's entry is never overtaken by a
    /// pass's `ZADD GT` that still counted the identity as connected.
    schedule_turn: tokio::sync::Mutex<()>,
    /// A pass's identities are being moved on the reaper's schedule
    /// (`ClusterStore::schedule_renewed`, in the background).
    scheduling: AtomicBool,
    /// This gateway's claim on a record its commits keep losing (`scripts::CLAIM`):
    /// its id.
    claim: Arc<str>,
    /// Commits of changes that found their record changed (lost a race, or gave way
    /// to a claim), and commits sent with a claim.
    races_lost: AtomicU64,
    /// See [`GatewayCounts::grouped_writes`].
    grouped_writes: AtomicU64,
    claims: AtomicU64,
    /// The primaries (by id) this gateway has loaded its scripts on, as of its last
    /// look at the layout.
    scripted: Mutex<HashSet<String>>,
    /// The primaries serving slots (ids, sorted) at the last look at the topology: a
    /// change makes the gateway subscribe again on a new connection
    /// ([`ClusterStore::refresh_topology`]).
    primaries_seen: Mutex<Vec<String>>,
    /// Primaries that did not answer the last look, whose slots creates avoid.
    silent: silent::Silent,
    /// The primaries changed and the subscriptions are not on a new connection yet.
    renewal_due: AtomicBool,
    /// Looks in a row that found fewer subscriptions on the primaries than the
    /// watches need ([`ClusterStore::refresh_topology`]).
    short_looks: AtomicU64,
    /// Subscriptions being made again now (`events::ClusterStore::resubscribe`).
    resubscribing: std::sync::atomic::AtomicUsize,
    /// Told when the sweep forgot records it unsubscribed from (a watch of one waits
    /// for that before it subscribes anew: `events::ClusterStore::subscribe`).
    swept: tokio::sync::Notify,
    /// Bytes of records fetched for large replies not sent yet, across connections.
    reply_bytes: GatewayBudget,
    /// How loads went.
    loads: redis_io::LoadCounters,
    /// Loads and commits sent together (`None`: each on its own, `--redis-batch
    /// false`).
    batch: Option<Arc<batch::Batcher>>,
    /// The batcher's task (aborted when the store goes).
    batch_task: Option<tokio::task::JoinHandle<()>>,
    /// Writes decided on a remembered state and committed, decided on one that had
    /// gone stale (the commit refused it), and first attempts of writes with none.
    cache_hits: AtomicU64,
    cache_stale: AtomicU64,
    cache_misses: AtomicU64,
    /// Large replies refused BUSY by the reply budget: the address's share was
    /// taken, the gateway's budget was.
    refused_address: AtomicU64,
    refused_gateway: AtomicU64,
    /// The last pass over this gateway's leases: how long it took (µs), and
    /// renewals that succeeded and that failed in all passes.
    renewal_micros: AtomicU64,
    renewals: AtomicU64,
    renewals_failed: AtomicU64,
    /// Renewals that went on in the background (`renew_leases`).
    renewals_late: AtomicU64,
    /// Renewals that found their lease run out (`scripts::LEASE`).
    leases_lapsed: AtomicU64,
    /// Looks in a row at the command connection that it did not answer
    /// ([`ClusterStore::check_connection`]), and the times it was replaced.
    unanswered: AtomicU64,
    subs_unanswered: AtomicU64,
    liveness_unanswered: AtomicU64,
    connections_replaced: AtomicU64,
    /// The TLS settings of new connections: `opts.tls` as read again when its files
    /// changed ([`ClusterStore::reload_tls`]).
    tls_now: std::sync::RwLock<Option<Tls>>,
    /// The TLS files' stamps as last taken, and as they were when they could not be.
    tls_watch: Mutex<TlsWatch>,
    /// Times the TLS files were read again and taken.
    tls_reloads: AtomicU64,
    /// Times every watched record was subscribed again on a new connection because
    /// the primaries changed or subscriptions were missing
    /// ([`ClusterStore::refresh_topology`]).
    subscriptions_renewed: AtomicU64,
    /// Of those, times it was because subscriptions were missing on the primaries.
    subscriptions_missing: AtomicU64,
}

/// What a gateway counts of its work with Redis (for `/metrics`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GatewayCounts {
    /// Loads answered by plain commands.
    pub loads_plain: u64,
    /// Plain tries that saw a change come in between and read again.
    pub load_retries: u64,
    /// Loads that fell back to the atomic `LOAD` script.
    pub loads_script: u64,
    /// Writes decided on the remembered state and committed in one round trip.
    pub state_cache_hits: u64,
    /// Writes decided on a remembered state that had gone stale (decided again).
    pub state_cache_stale: u64,
    /// Writes with no remembered state (loaded first).
    pub state_cache_misses: u64,
    /// Loads answered by the read cache (`--redis-read-cache`), after their barrier.
    pub read_cache_hits: u64,
    /// Loads that went on a tracking connection, filling the read cache.
    pub read_cache_fills: u64,
    /// Held records whose barrier failed or that were invalidated while it was in
    /// flight (loaded instead).
    pub read_cache_missed_at_barrier: u64,
    /// Barriers sent on the tracking connections (each serves the hits on one
    /// primary gathered in one pass).
    pub read_cache_barriers: u64,
    /// Held records dropped by Redis's invalidations.
    pub read_cache_invalidations: u64,
    /// Invalidation pushes Redis sent the tracking connections (one per change of a
    /// record this gateway read since its last change).
    pub read_cache_pushes: u64,
    /// Loads that could have filled the read cache but did not (it served few hits).
    pub read_cache_bypassed: u64,
    /// Writes acknowledged with fewer replicas than `--redis-wait-replicas` asked.
    pub unreplicated_writes: u64,
    /// Pipelines the batcher sent (the loads and commits of several requests).
    pub batches: u64,
    /// Loads and commits that went in those pipelines.
    pub batched: u64,
    /// Loads and commits of a pipeline that failed as a whole (a slot moved), sent
    /// again alone.
    pub batched_resent: u64,
    /// Compare-and-sets written to identities' quota hashes.
    pub quota_writes: u64,
    /// Quota changes (reserve, note, settle) they carried.
    pub quota_changes: u64,
    /// Large replies (READs, data watches' first replies) refused BUSY because their
    /// address held its share of `--redis-max-reply-bytes`.
    pub replies_refused_address: u64,
    /// The same, because the gateway held all of it.
    pub replies_refused_gateway: u64,
    /// Bytes of large replies fetched and not sent yet (of `--redis-max-reply-bytes`).
    pub reply_bytes_held: u64,
    /// Records this gateway holds subscriptions for (watched here now, or in the
    /// last `unsubscribe_after`).
    pub subscribed_records: u64,
    /// Records whose `SUNSUBSCRIBE` failed or was not answered, to be sent again at
    /// the next sweep.
    pub unsubscribes_owed: u64,
    /// Primaries that did not answer the last look's `PING` (creates avoid them).
    pub primaries_silent: u64,
    /// Slots creates avoid: of primaries that did not answer, or of none known.
    pub slots_avoided: u64,
    /// How long the last pass renewing this gateway's leases took (µs).
    pub lease_renewal_micros: u64,
    /// Lease renewals that succeeded.
    pub lease_renewals: u64,
    /// Lease renewals that failed (each tried again at the next pass).
    pub lease_renewals_failed: u64,
    /// Lease renewals not done within a quarter of the renewal period (at most the
    /// response timeout), which went on in the background while the pass went on.
    pub lease_renewals_late: u64,
    /// Lease renewals that found the lease run out: the identity was offline for
    /// the other gateways (this one paused, or cut off, for longer than the TTL).
    pub leases_lapsed: u64,
    /// Command connections replaced because they stopped answering while the
    /// cluster answered a new one ([`ClusterStore::check_connection`]).
    pub connections_replaced: u64,
    /// Times the TLS files (`--redis-tls-*`) changed and were read again and taken
    /// for new connections ([`ClusterStore::check_connection`]).
    pub tls_reloads: u64,
    /// Times every watched record was subscribed again on a new connection because
    /// the cluster's primaries changed (a failover) or the primaries held fewer of
    /// this gateway's subscriptions than its watches need
    /// ([`ClusterStore::refresh_topology`]).
    pub subscriptions_renewed: u64,
    /// Of those, times the primaries held fewer of this gateway's subscriptions than
    /// its watches need, on [`SHORT_LOOKS_BEFORE_RENEWAL`] looks in a row (the
    /// `redis` crate lost some without a word: [`ClusterStore::refresh_topology`]).
    pub subscriptions_missing: u64,
    /// Changes that waited for an earlier change of their record on this gateway.
    pub queued_changes: u64,
    /// Commits of changes that found the record changed since they were decided.
    pub commit_races_lost: u64,
    /// Writes committed in one commit with an earlier write of their record
    /// (`cluster/group.rs`).
    pub grouped_writes: u64,
    /// Commits sent with a claim on their record (`scripts::CLAIM`).
    pub claims: u64,
}

impl std::fmt::Debug for ClusterStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterStore")
            .field("nodes", &self.opts.nodes)
            .field("gateway", &self.gateway)
            .finish()
    }
}

impl Drop for ClusterStore {
    fn drop(&mut self) {
        if let Some(t) = &self.batch_task {
            t.abort();
        }
    }
}

/// `url` with the password of its user information, if any, replaced by `***`.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    match rest.rsplit_once('@') {
        Some((userinfo, hosts)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{hosts}"),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A connection to the cluster (RESP3; with `pushes`, its pushes go there): a clear
/// error when the cluster is down or unreachable.
async fn cluster_connection(
    opts: &ClusterOptions,
    pushes: Option<mpsc::UnboundedSender<PushInfo>>,
) -> Result<ClusterConnection, String> {
    let nodes = opts.nodes.join(",");
    let scheme = if opts.tls.is_some() {
        "rediss"
    } else {
        "redis"
    };
    let urls: Vec<String> = opts
        .nodes
        .iter()
        .map(|n| format!("{scheme}://{n}/?protocol=resp3"))
        .collect();
    if opts.tls.is_some() {
        // The crate's TLS is rustls, which takes its cryptography from the process's
        // provider: ring (an error only says one is installed already).
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    let mut builder = ClusterClientBuilder::new(urls)
        .use_protocol(redis::ProtocolVersion::RESP3)
        .connection_timeout(Duration::from_secs(1))
        .response_timeout(opts.response_timeout)
        .retries(2);
    if let Some(tls) = &opts.tls {
        builder = builder.tls(redis::TlsMode::Secure);
        if let Some(certs) = tls.certificates() {
            builder = builder.certs(certs);
        }
    }
    if let Some(user) = &opts.credentials.username {
        builder = builder.username(user);
    }
    if let Some(password) = &opts.credentials.password {
        builder = builder.password(password);
    }
    if let Some(tx) = pushes {
        builder = builder.push_sender(tx);
    }
    let client = builder
        .build()
        .map_err(|e| format!("Redis Cluster {nodes}: {e}"))?;
    tokio::time::timeout(Duration::from_secs(10), client.get_async_connection())
        .await
        .map_err(|_| format!("Redis Cluster {nodes}: no answer within 10 s"))?
        .map_err(|e| {
            let e = e.to_string();
            if e.contains("NOAUTH") {
                format!(
                    "Redis Cluster {nodes} wants a password; give it in the store URL \
                     (redis-cluster://[USER]:PASSWORD@HOST:PORT,...): {e}"
                )
            } else if e.contains("WRONGPASS") {
                format!("Redis Cluster {nodes} refused the store URL's user and password: {e}")
            } else if e.contains("UnknownIssuer") {
                format!(
                    "Redis Cluster {nodes}: the nodes' certificates are signed by an authority \
                     the gateway does not trust (give its certificate: --redis-tls-ca FILE): {e}"
                )
            } else if e.contains("CertificateRequired") {
                format!(
                    "Redis Cluster {nodes} wants a client certificate \
                     (--redis-tls-cert FILE --redis-tls-key FILE): {e}"
                )
            } else if opts.tls.is_none() && e.contains("reset by peer") {
                format!(
                    "Redis Cluster {nodes} is unreachable or not a working cluster (nodes that \
                     speak TLS only close plain connections so: rediss-cluster://...): {e}"
                )
            } else {
                format!("Redis Cluster {nodes} is unreachable or not a working cluster: {e}")
            }
        })
}

/// A client for the one node at `host:port`, with the store URL's user, password and
/// TLS (RESP3).
fn node_client(opts: &ClusterOptions, host: &str, port: u16) -> redis::RedisResult<redis::Client> {
    use redis::IntoConnectionInfo;
    let scheme = if opts.tls.is_some() {
        "rediss"
    } else {
        "redis"
    };
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    };
    let info = format!("{scheme}://{host}:{port}/?protocol=resp3").into_connection_info()?;
    let mut redis = info.redis_settings().clone();
    if let Some(user) = &opts.credentials.username {
        redis = redis.set_username(user);
    }
    if let Some(password) = &opts.credentials.password {
        redis = redis.set_password(password);
    }
    let info = info.set_redis_settings(redis);
    match opts.tls.as_ref().and_then(Tls::certificates) {
        Some(certs) => redis::Client::build_with_tls(info, certs),
        None => redis::Client::open(info),
    }
}

impl ClusterStore {
    /// Connects to the cluster (a clear error when it is down or unreachable), reads
    /// its layout and loads the scripts on its primaries.
    pub async fn connect(
        cfg: StoreConfig,
        key: IdentityKey,
        opts: ClusterOptions,
    ) -> Result<ClusterStore, String> {
        let (push_tx, push_rx) = mpsc::unbounded_channel();
        let redis = cluster_connection(&opts, None).await?;
        let subs = Replaceable::new(cluster_connection(&opts, Some(push_tx.clone())).await?);
        let liveness = Replaceable::new(cluster_connection(&opts, None).await?);
        let (now, at) = redis_io::redis_now(&redis)
            .await
            .map_err(|e| format!("Redis Cluster {}: {e}", opts.nodes.join(",")))?;
        let mut id = [0u8; 8];
        rand::rng().fill_bytes(&mut id);
        let gateway = id.iter().map(|b| format!("{b:02x}")).collect::<String>();
        let claim: Arc<str> = gateway.as_str().into();
        let (events, events_rx) = mpsc::unbounded_channel();
        let keys = Keys::new(&opts.prefix);
        info!(nodes = %opts.nodes.join(","), gateway, "connected to Redis Cluster");
        let turns = (opts.max_in_flight > 0).then(|| Turns::new(opts.max_in_flight));
        let batch = opts.batch.then(|| Arc::new(batch::Batcher::default()));
        let commands = Arc::new(Replaceable::new(redis));
        let batch_task = batch
            .as_ref()
            .map(|b| tokio::spawn(b.clone().drive(commands.clone())));
        let reads = (opts.read_cache > 0)
            .then(|| Arc::new(reads::ReadCache::new(opts.read_cache, keys.clone())));
        let store = ClusterStore {
            commands,
            subs,
            liveness,
            push_tx,
            cfg,
            key,
            gateway,
            local: Mutex::new(Local::default()),
            quota: Arc::new(QuotaBook::new(keys.clone())),
            keys,
            clock: Mutex::new((at, now)),
            in_touch: Mutex::new(None),
            answered: [AtomicBool::new(true), AtomicBool::new(true)],
            next_conn: AtomicU64::new(1),
            next_op: AtomicU64::new(1),
            replicas: Mutex::default(),
            counts: Mutex::default(),
            counted_at: Mutex::default(),
            unreplicated: AtomicU64::new(0),
            renewal_micros: AtomicU64::new(0),
            renewals: AtomicU64::new(0),
            renewals_failed: AtomicU64::new(0),
            renewals_late: AtomicU64::new(0),
            leases_lapsed: AtomicU64::new(0),
            unanswered: AtomicU64::new(0),
            subs_unanswered: AtomicU64::new(0),
            liveness_unanswered: AtomicU64::new(0),
            connections_replaced: AtomicU64::new(0),
            tls_now: std::sync::RwLock::new(opts.tls.clone()),
            tls_watch: Mutex::new(TlsWatch {
                taken: opts
                    .tls
                    .as_ref()
                    .and_then(|t| t.files.as_ref())
                    .map(TlsFiles::stamps)
                    .unwrap_or_default(),
                failed: None,
            }),
            tls_reloads: AtomicU64::new(0),
            subscriptions_renewed: AtomicU64::new(0),
            subscriptions_missing: AtomicU64::new(0),
            events,
            events_rx: Mutex::new(Some(events_rx)),
            push_rx: Mutex::new(Some(push_rx)),
            turns,
            states: Mutex::new(states::States::new(opts.state_cache)),
            reads,
            serial: Arc::default(),
            lease_turns: serial::Serial::default(),
            schedule_turn: tokio::sync::Mutex::new(()),
            scheduling: AtomicBool::new(false),
            claim,
            races_lost: AtomicU64::new(0),
            grouped_writes: AtomicU64::new(0),
            claims: AtomicU64::new(0),
            scripted: Mutex::default(),
            primaries_seen: Mutex::default(),
            silent: silent::Silent::default(),
            renewal_due: AtomicBool::new(false),
            short_looks: AtomicU64::new(0),
            resubscribing: Default::default(),
            swept: tokio::sync::Notify::new(),
            reply_bytes: GatewayBudget::new(opts.max_reply_bytes),
            loads: redis_io::LoadCounters::default(),
            batch,
            batch_task,
            cache_hits: AtomicU64::new(0),
            cache_stale: AtomicU64::new(0),
            cache_misses: AtomicU64::new(0),
            refused_address: AtomicU64::new(0),
            refused_gateway: AtomicU64::new(0),
            opts,
        };
        // The layout, and the scripts on every primary, before the first request.
        store.look_at_topology().await;
        Ok(store)
    }

    /// Whether the read cache is on (`--redis-read-cache`).
    pub fn read_cache_on(&self) -> bool {
        self.reads.is_some()
    }

    /// What this gateway has counted of its work with Redis.
    pub fn counts(&self) -> GatewayCounts {
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        GatewayCounts {
            loads_plain: n(&self.loads.plain),
            load_retries: n(&self.loads.retries),
            loads_script: n(&self.loads.script),
            state_cache_hits: n(&self.cache_hits),
            state_cache_stale: n(&self.cache_stale),
            state_cache_misses: n(&self.cache_misses),
            read_cache_hits: self.reads.as_ref().map_or(0, |r| n(&r.counters.hits)),
            read_cache_fills: self.reads.as_ref().map_or(0, |r| n(&r.counters.fills)),
            read_cache_missed_at_barrier: self
                .reads
                .as_ref()
                .map_or(0, |r| n(&r.counters.missed_at_barrier)),
            read_cache_barriers: self.reads.as_ref().map_or(0, |r| n(&r.counters.barriers)),
            read_cache_invalidations: self
                .reads
                .as_ref()
                .map_or(0, |r| n(&r.counters.invalidations)),
            read_cache_pushes: self.reads.as_ref().map_or(0, |r| n(&r.counters.pushes)),
            read_cache_bypassed: self.reads.as_ref().map_or(0, |r| n(&r.counters.bypassed)),
            unreplicated_writes: n(&self.unreplicated),
            batches: self.batch.as_ref().map_or(0, |b| n(&b.counters.pipelines)),
            batched: self.batch.as_ref().map_or(0, |b| n(&b.counters.carried)),
            batched_resent: self.batch.as_ref().map_or(0, |b| n(&b.counters.resent)),
            quota_writes: n(&self.quota.writes),
            quota_changes: n(&self.quota.changes),
            replies_refused_address: n(&self.refused_address),
            replies_refused_gateway: n(&self.refused_gateway),
            reply_bytes_held: self.reply_bytes.held(),
            subscribed_records: self.subscribed_records(),
            unsubscribes_owed: lock(&self.local).unsubscribe_owed.len() as u64,
            primaries_silent: self.silent.count() as u64,
            slots_avoided: self.silent.avoided() as u64,
            lease_renewal_micros: n(&self.renewal_micros),
            lease_renewals: n(&self.renewals),
            lease_renewals_failed: n(&self.renewals_failed),
            lease_renewals_late: n(&self.renewals_late),
            leases_lapsed: n(&self.leases_lapsed),
            connections_replaced: n(&self.connections_replaced),
            tls_reloads: n(&self.tls_reloads),
            subscriptions_renewed: n(&self.subscriptions_renewed),
            subscriptions_missing: n(&self.subscriptions_missing),
            queued_changes: n(&self.serial.queued),
            commit_races_lost: n(&self.races_lost),
            grouped_writes: n(&self.grouped_writes),
            claims: n(&self.claims),
        }
    }

    /// The connection for commands now (see [`Replaceable`]).
    fn redis(&self) -> ClusterConnection {
        self.commands.get()
    }

    /// How often [`ClusterStore::check_connection`] runs.
    pub fn check_every(&self) -> Duration {
        Duration::from_secs(1)
    }

    /// Looks whether the connections to the cluster (for commands, subscriptions and
    /// leases) still answer (a `PING` to each primary on each, any answer counting:
    /// [`ClusterStore::pings`]); after
    /// [`UNANSWERED_BEFORE_NEW`] looks in a row that got no answer on one, makes a
    /// new connection, and if that one answers, it replaces the old one. A new
    /// connection for the subscriptions subscribes again to every watched record's
    /// channels and tells the watchers what changed meanwhile.
    ///
    /// The `redis` crate (1.8) can stop serving a cluster connection for good: under
    /// load, while a primary fails over or slots move, its recovery (reading the slots
    /// again, or connecting to the initial nodes again) never completes, and every
    /// request on that connection times out from then on, while the cluster serves a
    /// new connection at once. The soak under failovers found it
    /// (`scripts/chaos-cluster.sh`: after the first SIGKILL of a primary, every
    /// command of the gateway timed out for the 15 minutes the run went on). A
    /// cluster that is down fails the new connection too, and nothing is replaced.
    pub async fn check_connection(self: &Arc<Self>) {
        self.reload_tls().await;
        // `NETSWAP_FAULT_AT=commands-stay-stuck`: a command connection that stops
        // answering stays (tests of what does not depend on it);
        // `commands-replace`: the first look replaces it anyway (a test of the
        // replacement under load).
        let mut silent = HashSet::new();
        let due = self
            .due_for_new(
                &self.commands,
                &self.unanswered,
                Some(&self.answered[0]),
                Some(&mut silent),
            )
            .await;
        self.silent.heard(silent);
        if (due || fault_point("commands-replace"))
            && !fault_set("commands-stay-stuck")
            && let Some(fresh) = self.fresh_connection(None).await
        {
            warn!(
                "the connection to Redis Cluster stopped answering while the cluster answers a new one; replaced it"
            );
            self.commands.replace(fresh);
            self.answered[0].store(true, Ordering::Relaxed);
            self.connections_replaced.fetch_add(1, Ordering::Relaxed);
        }
        if self
            .due_for_new(
                &self.liveness,
                &self.liveness_unanswered,
                Some(&self.answered[1]),
                None,
            )
            .await
            && let Some(fresh) = self.fresh_connection(None).await
        {
            warn!(
                "the leases' connection to Redis Cluster stopped answering while the cluster answers a new one; replaced it"
            );
            self.liveness.replace(fresh);
            self.answered[1].store(true, Ordering::Relaxed);
            self.connections_replaced.fetch_add(1, Ordering::Relaxed);
        }
        let forced = !lock(&self.local).watched.is_empty() && fault_point("subs-replace");
        if (self
            .due_for_new(&self.subs, &self.subs_unanswered, None, None)
            .await
            || forced)
            && self.subscribe_anew().await
        {
            warn!(
                "the subscriptions' connection to Redis Cluster stopped answering while the cluster answers a new one; replaced it and subscribing again"
            );
            self.connections_replaced.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The settings of a new connection: the options given, with the TLS files as
    /// last read ([`ClusterStore::reload_tls`]).
    fn opts_now(&self) -> ClusterOptions {
        let mut o = self.opts.clone();
        o.tls = self
            .tls_now
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        o
    }

    /// Reads the TLS files again when one of them changed (a certificate renewed: a
    /// gateway's connections must not outlive its certificate, nor trust only an
    /// authority the nodes no longer use), and if a new connection with them is
    /// answered, takes them for every later connection and replaces the
    /// connections for commands, leases and subscriptions with new ones (the read
    /// cache's connections, made per primary, take them when next made). Files that
    /// cannot be read or checked, or that the cluster refuses, leave everything as it
    /// was; they are tried again every [`TLS_RETRY`] while they stay as they are,
    /// and at once when they change again.
    async fn reload_tls(self: &Arc<Self>) {
        let Some(files) = self.opts.tls.as_ref().and_then(|t| t.files.clone()) else {
            return;
        };
        let stamps = files.stamps();
        {
            let watch = lock(&self.tls_watch);
            let failed = |(f, t): &(Vec<Stamp>, Instant)| *f == stamps && Instant::now() < *t;
            if watch.taken == stamps || watch.failed.as_ref().is_some_and(failed) {
                return;
            }
        }
        let taken = self.take_tls(&files).await;
        let mut watch = lock(&self.tls_watch);
        match taken {
            Ok(()) => {
                *watch = TlsWatch {
                    taken: stamps,
                    failed: None,
                }
            }
            Err(e) => {
                watch.failed = Some((stamps, Instant::now() + TLS_RETRY));
                warn!(error = %e, "the TLS files changed, but the new ones cannot be used; the connections go on with those read before, and the files are tried again in {} s", TLS_RETRY.as_secs());
            }
        }
    }

    /// [`ClusterStore::reload_tls`]'s work once a file changed.
    async fn take_tls(self: &Arc<Self>, files: &TlsFiles) -> Result<(), String> {
        let (ca, client) = files.read()?;
        let mut opts = self.opts_now();
        if let Some(tls) = opts.tls.as_mut() {
            (tls.ca, tls.client) = (ca, client);
        }
        let fresh = cluster_connection(&opts, None).await?;
        if !self.pings(fresh.clone(), None).await {
            return Err("a new connection with them made no answer to a PING".into());
        }
        *self.tls_now.write().unwrap_or_else(|e| e.into_inner()) = opts.tls;
        self.commands.replace(fresh);
        if let Some(fresh) = self.fresh_connection(None).await {
            self.liveness.replace(fresh);
        }
        // Missed now, it is replaced with one on the new files when it stops
        // answering, as any other.
        self.subscribe_anew().await;
        self.tls_reloads.fetch_add(1, Ordering::Relaxed);
        info!("the TLS files changed: read them again; new connections to Redis Cluster use them");
        Ok(())
    }

    /// Replaces the connection for subscriptions with a new one (if the cluster
    /// answers one) and subscribes again there to every watched record's channels,
    /// telling the watchers what changed meanwhile. Returns whether it did.
    async fn subscribe_anew(self: &Arc<Self>) -> bool {
        let Some(fresh) = self.fresh_connection(Some(self.push_tx.clone())).await else {
            return false;
        };
        // The old connection's subscriptions go with it, those owed an
        // `SUNSUBSCRIBE` too.
        self.subs.replace(fresh);
        lock(&self.local).unsubscribe_owed.clear();
        self.resubscribe_all();
        true
    }

    /// One look at `conn` (see [`ClusterStore::check_connection`]): whether it is
    /// due to be replaced, by `unanswered`, its count of looks in a row without an
    /// answer (reset then); `answered`, if given: set to whether this look's `PING` was
    /// answered (for `/readyz`); `silent`, if given: filled with the primaries that
    /// did not answer (see [`ClusterStore::pings`]).
    async fn due_for_new(
        &self,
        conn: &Replaceable,
        unanswered: &AtomicU64,
        answered: Option<&AtomicBool>,
        silent: Option<&mut HashSet<String>>,
    ) -> bool {
        let pinged = self.pings(conn.get(), silent).await;
        if let Some(a) = answered {
            a.store(pinged, Ordering::Relaxed);
        }
        if pinged {
            unanswered.store(0, Ordering::Relaxed);
            return false;
        }
        if unanswered.fetch_add(1, Ordering::Relaxed) + 1 < UNANSWERED_BEFORE_NEW {
            return false;
        }
        unanswered.store(0, Ordering::Relaxed);
        true
    }

    /// A new connection that answers a `PING`, or `None` (the cluster does not
    /// answer a new connection either).
    async fn fresh_connection(
        &self,
        pushes: Option<mpsc::UnboundedSender<PushInfo>>,
    ) -> Option<ClusterConnection> {
        let fresh = cluster_connection(&self.opts_now(), pushes).await.ok()?;
        self.pings(fresh.clone(), None).await.then_some(fresh)
    }

    /// Whether `conn` gets an answer within [`PING_WAIT`] (at most the response
    /// timeout) to a `PING` sent to each primary not marked failing, from one at
    /// least (before the first reading of the layout: to one `PING` to any node).
    ///
    /// One `PING` to a node picked at random made a primary that stops answering
    /// without closing its connections (cut off, or stalled) look like a connection
    /// that stopped answering: two looks in a row that picked it, and the connection
    /// was replaced, the one for subscriptions with every watch subscribed again and
    /// resynced (with three primaries, a third of the looks; in 3 of 8 runs of the
    /// two tests that stop a primary for 5–6 s, `a_primary_that_stops_answering_…`).
    /// A connection that is stuck (the `redis` crate's recovery that never ends,
    /// docs/upstream) answers none.
    ///
    /// `silent`, if given: the look waits for every answer (a primary that does not
    /// answer makes it take [`PING_WAIT`]), and the node ids of the primaries that did
    /// not answer are put there (`silent.rs`); else the first answer ends it.
    async fn pings(
        &self,
        conn: ClusterConnection,
        mut silent: Option<&mut HashSet<String>>,
    ) -> bool {
        use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
        let wait = PING_WAIT.min(self.opts.response_timeout);
        let primaries: Vec<(String, (String, u16))> = {
            let layout = lock(&self.replicas);
            layout
                .primaries
                .iter()
                .filter_map(|id| Some((id.clone(), layout.nodes.get(id)?.clone())))
                .collect()
        };
        let routes: Vec<(Option<String>, RoutingInfo)> = if primaries.is_empty() {
            vec![(None, RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random))]
        } else {
            primaries
                .into_iter()
                .map(|(id, (host, port))| {
                    let to = SingleNodeRoutingInfo::ByAddress { host, port };
                    (Some(id), RoutingInfo::SingleNode(to))
                })
                .collect()
        };
        let mut each: futures_util::stream::FuturesUnordered<_> = routes
            .into_iter()
            .map(|(id, to)| {
                let mut conn = conn.clone();
                async move {
                    let ping = conn.route_command(redis::cmd("PING"), to);
                    let answered = matches!(tokio::time::timeout(wait, ping).await, Ok(Ok(_)));
                    (id, answered)
                }
            })
            .collect();
        let mut any = false;
        while let Some((id, answered)) = each.next().await {
            any |= answered;
            match silent.as_deref_mut() {
                None if any => return true,
                Some(silent) if !answered => silent.extend(id),
                _ => {}
            }
        }
        any
    }

    /// A random pointer for a new record, whose slot's primary answered the last look
    /// where one can be drawn (`silent.rs`).
    fn new_pointer(&self) -> Pointer {
        let mut draws = 0;
        loop {
            let Some(p) = Pointer::new(rand::rng().next_u64()) else {
                continue;
            };
            draws += 1;
            if draws < silent::DRAWS && self.silent.avoids(p) {
                continue;
            }
            return p;
        }
    }

    /// Notifications for local watchers (taken once, by the server's event task).
    pub fn take_events(&self) -> Option<mpsc::UnboundedReceiver<Vec<Notification>>> {
        lock(&self.events_rx).take()
    }

    /// Redis time now, estimated from the last reading.
    fn now_ms(&self) -> u64 {
        let (at, ms) = *lock(&self.clock);
        ms + at.elapsed().as_millis() as u64
    }

    fn note_clock(&self, ms: u64) {
        *lock(&self.clock) = (Instant::now(), ms);
    }

    /// Whether the gateway's connections for commands and for leases each answered
    /// the last `PING` of [`ClusterStore::check_connection`] (every second; true from
    /// a successful start): the readiness that `/readyz` reports. A `PING` goes to
    /// any node, so a shard failing over leaves the gateway ready (its other shards
    /// serve); a cluster that is gone, or a connection of this gateway's that is
    /// stuck, does not.
    pub(crate) fn ready(&self) -> bool {
        self.answered.iter().all(|a| a.load(Ordering::Relaxed))
    }

    /// The periodic work reached the cluster (`true`) or failed (`false`): see
    /// `in_touch`.
    pub(crate) fn note_contact(&self, ok: bool) {
        let mut t = lock(&self.in_touch);
        match (ok, *t) {
            (true, None) => *t = Some(Instant::now()),
            (false, _) => *t = None,
            (true, Some(_)) => {}
        }
    }

    /// How many replicas a commit to `ptr` waits for: what `--redis-wait-replicas`
    /// asks, but never more than its primary has (see [`redis_io::Replicas`]).
    fn wait_for(&self, ptr: Pointer) -> redis_io::Wait {
        let asked = self.opts.wait_replicas;
        let replicas = if asked == 0 {
            0
        } else {
            match lock(&self.replicas).of(&self.keys.record(ptr).meta) {
                Some(have) if have < asked => {
                    self.unreplicated.fetch_add(1, Ordering::Relaxed);
                    have
                }
                _ => asked,
            }
        };
        redis_io::Wait {
            replicas,
            ms: (redis_io::ms(self.opts.response_timeout) / 2).clamp(10, 1000),
            nodes: if replicas > 0 {
                lock(&self.replicas).nodes.clone()
            } else {
                Default::default()
            },
        }
    }

    /// How often [`ClusterStore::refresh_topology`] runs.
    pub fn topology_every(&self) -> Duration {
        self.opts.topology_every
    }

    /// How often subscriptions nobody uses are looked for
    /// ([`ClusterOptions::unsubscribe_after`]).
    pub fn sweep_every(&self) -> Duration {
        (self.opts.unsubscribe_after / 3).clamp(Duration::from_millis(100), Duration::from_secs(10))
    }

    /// Refreshes what the gateway knows of the cluster's replicas and primaries
    /// (every [`ClusterOptions::topology_every`]).
    ///
    /// When the primaries serving slots change (a replica took over), the gateway
    /// subscribes again to every watched record on a new connection. A primary that
    /// dies takes its subscriptions with it, and Redis says nothing about it (unlike a
    /// slot that moves: an `SUNSUBSCRIBE`). The `redis` crate subscribes again on its
    /// own, but by the slot map it had: to the restarted node, which is now a replica.
    /// A replica takes a shard channel subscription and gets the channel's messages,
    /// but a commit looks for subscribers on the primary only (`scripts::COMMIT`): it
    /// found none, cleared the record's watched mark, and published nothing any more.
    /// A new connection reads the slots anew, so every subscription is on a primary
    /// again. A primary only suspected down, or slots moved between primaries, change
    /// nothing here (a moved slot's subscriptions are followed by its `SUNSUBSCRIBE`).
    /// A renewal that could not make its new connection is tried again at the next
    /// look.
    ///
    /// Each look also counts the subscriptions this gateway holds on the primaries
    /// (`ClusterStore::subscriptions_short`). Fewer than its watches need, on
    /// [`SHORT_LOOKS_BEFORE_RENEWAL`] looks in a row, renews them the same way: the
    /// `redis` crate can lose subscriptions without a word when its connection to a
    /// node comes back, and a subscription made meanwhile can land on a replica.
    pub async fn refresh_topology(self: &Arc<Self>) {
        if self.look_at_topology().await {
            self.renewal_due.store(true, Ordering::Relaxed);
        } else if !self.renewal_due.load(Ordering::Relaxed) {
            match self.subscriptions_short().await {
                Some(true) => {
                    let looks = self.short_looks.fetch_add(1, Ordering::Relaxed) + 1;
                    if looks >= SHORT_LOOKS_BEFORE_RENEWAL {
                        warn!(
                            looks,
                            "the primaries hold fewer of this gateway's subscriptions than its watches need; subscribing again on a new connection"
                        );
                        self.short_looks.store(0, Ordering::Relaxed);
                        self.subscriptions_missing.fetch_add(1, Ordering::Relaxed);
                        self.renewal_due.store(true, Ordering::Relaxed);
                    }
                }
                Some(false) => self.short_looks.store(0, Ordering::Relaxed),
                None => {}
            }
        }
        if !self.renewal_due.load(Ordering::Relaxed) {
            return;
        }
        if lock(&self.local).watched.is_empty() {
            self.renewal_due.store(false, Ordering::Relaxed);
        } else if self.subscribe_anew().await {
            self.renewal_due.store(false, Ordering::Relaxed);
            info!(
                "the cluster's primaries changed; subscribed again to every watched record on a new connection"
            );
            self.subscriptions_renewed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Reads the layout (`CLUSTER NODES`) and loads the scripts on primaries seen for
    /// the first time; returns whether the primaries changed since the last look.
    async fn look_at_topology(&self) -> bool {
        let Some((layout, text)) = redis_io::Replicas::read(&self.redis()).await else {
            return false;
        };
        let (primaries, nodes) = (layout.primaries.clone(), layout.nodes.clone());
        let changed = {
            let mut seen = lock(&self.primaries_seen);
            let changed = !seen.is_empty() && *seen != layout.serving;
            *seen = layout.serving.clone();
            changed
        };
        *lock(&self.replicas) = layout;
        // Read once for both: the slots' primaries, and the primaries' ids.
        let (slots, ids) = batch::primaries_by_id(&text);
        self.silent.follow(&slots, &ids);
        if let Some(t) = &self.turns {
            t.follow(&slots, &ids);
        }
        if let Some(b) = &self.batch {
            b.set_primaries(slots);
        }
        // In the background: connecting to a primary that does not answer must not
        // hold up this look (the scripts for new primaries, below), nor the next.
        if let Some(cache) = &self.reads {
            let (cache, opts, nodes) = (cache.clone(), self.opts_now(), nodes.clone());
            let text = text.clone();
            tokio::spawn(async move { cache.follow(&opts, &text, &nodes).await });
        }
        // Primaries seen for the first time (all of them at start, then a promoted
        // replica, a node restarted) get the scripts before a request needs them:
        // `SCRIPT LOAD` is not replicated, so a replica promoted by a failover has
        // none, and every commit in flight would meet `NOSCRIPT` there.
        let new: Vec<String> = {
            let mut scripted = lock(&self.scripted);
            scripted.retain(|id| primaries.contains(id));
            primaries
                .into_iter()
                .filter(|id| !scripted.contains(id))
                .collect()
        };
        for id in new {
            let Some((host, port)) = nodes.get(&id) else {
                continue;
            };
            match redis_io::load_scripts_on(&self.redis(), host, *port).await {
                Ok(()) => {
                    debug!(node = %id, "scripts loaded on a new primary");
                    lock(&self.scripted).insert(id);
                }
                Err(e) => debug!(node = %id, error = %e, "loading the scripts failed; next look"),
            }
        }
        changed
    }

    /// Loads a record (`redis_io::load`), with other requests' loads when batching;
    /// `in_hash`: its bytes were last seen in its state hash (one `HMGET` then).
    async fn load(
        &self,
        ptr: Pointer,
        range: Option<(u64, u64)>,
        max_inline: usize,
        in_hash: bool,
    ) -> redis::RedisResult<Option<redis_io::Stored>> {
        let k = self.keys.record(ptr);
        // A small record: loaded on the read cache's tracking connection, filling
        // it (`reads`); the usual load when that cannot be done.
        if let Some(cache) = &self.reads
            && in_hash
            && let Some(loaded) = cache.load(ptr, &k, range).await
        {
            return loaded;
        }
        redis_io::load(
            &self.commands,
            self.batch.as_deref(),
            &k,
            range,
            max_inline,
            in_hash,
            &self.loads,
        )
        .await
    }

    fn op_id(&self) -> String {
        format!(
            "{}-{}",
            self.gateway,
            self.next_op.fetch_add(1, Ordering::Relaxed)
        )
    }

    fn identity_of(&self, ip: IpAddr) -> Identity {
        Identity::derive(&self.key, ip)
    }

    /// The HELLO answer.
    pub fn hello(&self, identity: Identity) -> HelloInfo {
        HelloInfo {
            protocol: netswap_proto::PROTOCOL_VERSION,
            max_record_bytes: self.cfg.max_record_bytes,
            max_message_bytes: self.cfg.max_message_bytes,
            orphan_grace_secs: self.cfg.orphan_grace.as_secs().min(u32::MAX as u64) as u32,
            identity,
        }
    }

    // ---- connections and leases ----

    /// A connection from `ip` opened: the first one of its identity on this gateway
    /// takes a lease (which makes the identity connected for every gateway), and the
    /// charges of records handed to it while it was away move to it.
    pub async fn open(
        self: &Arc<Self>,
        ip: IpAddr,
        reply_budget: usize,
    ) -> Result<ClusterSession, Reply> {
        let identity = self.identity_of(ip);
        let (leased, share) = {
            let mut l = lock(&self.local);
            let held = l.identities.entry(identity).or_default();
            held.conns += 1;
            let leased = held.leased;
            (leased, l.reply_shares.join(ip, &self.reply_bytes))
        };
        // The identity's first connection here takes the lease. Others do not wait
        // for the identity's turn (a renewal may hold it while a primary fails over).
        let first = !leased && {
            let _turn = self.lease_turns.enter(identity).await;
            let first = {
                let mut l = lock(&self.local);
                let held = l
                    .identities
                    .get_mut(&identity)
                    .expect("held by this connection");
                !std::mem::replace(&mut held.leased, true)
            };
            if first {
                let sent = Instant::now();
                if let Err(e) = self.take_lease(&identity, true).await {
                    drop(_turn);
                    lock(&self.local).reply_shares.leave(ip);
                    // Released: the script may have run though its reply was lost.
                    self.close_identity(&identity).await;
                    return Err(unavailable(&e));
                }
                self.note_renewed(&identity, sent);
            }
            first
        };
        if first {
            let me = self.clone();
            tokio::spawn(async move { me.claim_parked(identity).await });
        }
        Ok(ClusterSession {
            conn: ConnId(self.next_conn.fetch_add(1, Ordering::Relaxed)),
            identity,
            ip,
            watches: HashMap::new(),
            budget: Arc::new(ReplyBudget::new(reply_budget, &share, &self.reply_bytes)),
        })
    }

    /// Takes (`new`) or renews this gateway's lease on `id` and puts the identity on
    /// the reaper's schedule for when the lease could have run out.
    async fn take_lease(&self, id: &Identity, new: bool) -> redis::RedisResult<u64> {
        let (now, _) = self.lease(id, new).await?;
        self.schedule_after_leases(now, std::slice::from_ref(id))
            .await?;
        Ok(now)
    }

    /// The lease itself (the `LEASE` script): Redis's time then, and whether a
    /// renewal found the lease run out (then taken anew, see [`scripts::LEASE`]).
    async fn lease(&self, id: &Identity, new: bool) -> redis::RedisResult<(u64, bool)> {
        let k = self.keys.identity(id);
        let ttl = redis_io::ms(self.opts.lease_ttl).to_string();
        let v = redis_io::run(
            &self.liveness.get(),
            &scripts::LEASE,
            &[&k.leases, &k.quota],
            &[
                self.gateway.as_bytes(),
                ttl.as_bytes(),
                if new { b"1" } else { b"0" },
            ],
        )
        .await?;
        let (now, lapsed) = match &v {
            Value::Array(items) => (
                items.first().and_then(redis_io::as_int).unwrap_or(0) as u64,
                items.get(2).and_then(redis_io::as_int) == Some(1),
            ),
            _ => (0, false),
        };
        self.note_clock(now);
        Ok((now, lapsed))
    }

    /// The reaper looks at each of `ids` once a lease taken at `now` could have run
    /// out and the grace passed: one `ZADD GT` (a member not there yet is added) per
    /// [`SCHEDULE_AT_ONCE`] identities, all in one pipeline: a release that starts
    /// after this does cannot come in between (its own schedule must come last).
    async fn schedule_after_leases(&self, now: u64, ids: &[Identity]) -> redis::RedisResult<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let due = now + redis_io::ms(self.opts.lease_ttl + self.cfg.orphan_grace);
        let mut pipe = redis::pipe();
        for chunk in ids.chunks(SCHEDULE_AT_ONCE) {
            let cmd = pipe.cmd("ZADD").arg(self.keys.reap()).arg("GT");
            for id in chunk {
                cmd.arg(due).arg(keys::reap_identity(id));
            }
            cmd.ignore();
        }
        pipe.query_async::<()>(&mut self.liveness.get()).await
    }

    /// A connection of `id` closed: the last one here releases the lease, unless a
    /// new connection came by the time it has the identity's turn.
    async fn close_identity(&self, id: &Identity) {
        {
            let mut l = lock(&self.local);
            let Some(held) = l.identities.get_mut(id) else {
                return;
            };
            held.conns -= 1;
            if held.conns > 0 {
                return;
            }
        }
        let _turn = self.lease_turns.enter(*id).await;
        // Unless a connection came meanwhile (or another close of it released first).
        let release = {
            let mut l = lock(&self.local);
            match l.identities.get(id) {
                Some(held) if held.conns == 0 => l.identities.remove(id).is_some_and(|h| h.leased),
                _ => return,
            }
        };
        if release {
            self.release_lease(id).await;
        }
        drop(_turn);
        // Only its own: a walk over every identity's state at each close made
        // thousands of identities leaving together quadratic.
        self.quota.forget(id);
    }

    /// Forgets the cached quota states of identities with no connection here that no
    /// request is using (those of records' payers, or reaped identities; every ten
    /// seconds, by the server).
    pub fn forget_unused_quotas(&self) {
        let here: HashSet<Identity> = lock(&self.local).identities.keys().copied().collect();
        self.quota.forget_unused(|i| here.contains(i));
    }

    /// Gives up this gateway's lease on `id`; when no gateway holds one any more, the
    /// reaper looks at the identity once its grace has passed.
    async fn release_lease(&self, id: &Identity) {
        let k = self.keys.identity(id);
        let released = redis_io::run(
            &self.liveness.get(),
            &scripts::RELEASE,
            &[&k.leases, &k.quota],
            &[self.gateway.as_bytes()],
        )
        .await;
        match released {
            Ok(Value::Array(items)) => {
                let live = items.first().and_then(redis_io::as_int).unwrap_or(1);
                let now = items.get(1).and_then(redis_io::as_int).unwrap_or(0) as u64;
                self.note_clock(now);
                if live == 0 {
                    let due = now + redis_io::ms(self.cfg.orphan_grace);
                    // After a pass that counted the identity as connected has put
                    // it on the schedule (`schedule_turn`).
                    let _turn = self.schedule_turn.lock().await;
                    let _ = redis::cmd("ZADD")
                        .arg(self.keys.reap())
                        .arg(due)
                        .arg(keys::reap_identity(id))
                        .query_async::<Value>(&mut self.liveness.get())
                        .await;
                }
            }
            Ok(_) => {}
            Err(e) => {
                warn!(identity = %id, error = %e, "could not release a lease; it runs out by itself")
            }
        }
    }

    /// A connection closed: its watches end; the last connection of its identity on
    /// this gateway gives up the lease.
    pub async fn close(&self, session: ClusterSession) {
        for ptr in session.watches.keys() {
            self.unregister_watch(*ptr, session.conn);
        }
        lock(&self.local).reply_shares.leave(session.ip);
        self.close_identity(&session.identity).await;
    }

    /// Counts this deployment's records and their data bytes by scanning every
    /// primary (for monitoring and tests: it reads every key of the prefix).
    pub async fn count_records(&self) -> redis::RedisResult<(u64, u64)> {
        use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
        let mut conn = self.redis();
        let (layout, _) = redis_io::Replicas::read(&conn).await.ok_or_else(|| {
            RedisError::from((redis::ErrorKind::Parse, "CLUSTER NODES: no answer"))
        })?;
        let pattern = format!("{}:{{r:*}}:m", self.opts.prefix);
        let (mut records, mut bytes) = (0u64, 0u64);
        for id in &layout.primaries {
            let Some((host, port)) = layout.nodes.get(id) else {
                continue;
            };
            let route = SingleNodeRoutingInfo::ByAddress {
                host: host.clone(),
                port: *port,
            };
            let mut cursor = "0".to_string();
            loop {
                let v = conn
                    .route_command(
                        redis::cmd("SCAN")
                            .arg(&cursor)
                            .arg("MATCH")
                            .arg(&pattern)
                            .arg("COUNT")
                            .arg(1000)
                            .clone(),
                        RoutingInfo::SingleNode(route.clone()),
                    )
                    .await?;
                let Value::Array(parts) = v else { break };
                let (Some(next), Some(Value::Array(keys))) = (parts.first(), parts.get(1)) else {
                    break;
                };
                cursor = redis_io::as_bytes(next)
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_else(|| "0".into());
                if !keys.is_empty() {
                    let mut pipe = redis::pipe();
                    for k in keys {
                        let Some(k) = redis_io::as_bytes(k) else {
                            continue;
                        };
                        let meta = String::from_utf8_lossy(k);
                        // A record has a revision (a deleted one's tombstone does
                        // not); its bytes are in the data key or in the field `d`.
                        pipe.cmd("HEXISTS").arg(meta.as_ref()).arg("r");
                        pipe.cmd("STRLEN")
                            .arg(format!("{}d", meta.trim_end_matches('m')));
                        pipe.cmd("HSTRLEN").arg(meta.as_ref()).arg("d");
                    }
                    let count = pipe.len();
                    let replies = conn.route_pipeline(pipe, 0, count, route.clone()).await?;
                    for r in replies.chunks(3) {
                        if redis_io::as_int(&r[0]) == Some(1) {
                            records += 1;
                            bytes += r[1..].iter().filter_map(redis_io::as_int).sum::<i64>() as u64;
                        }
                    }
                }
                if cursor == "0" {
                    break;
                }
            }
        }
        Ok((records, bytes))
    }

    /// Counts records, bytes and pending orphans for STATS and /metrics (every 10 s).
    pub async fn count_for_stats(&self) {
        let counted = self.count_records().await;
        let pending: redis::RedisResult<u64> = redis::cmd("ZCARD")
            .arg(self.keys.reap())
            .query_async(&mut self.redis())
            .await;
        let mut c = lock(&self.counts);
        if let Ok((r, b)) = counted {
            c.0 = r;
            c.1 = b;
        }
        if let Ok(p) = pending {
            c.2 = p;
        }
    }

    /// The last counts: records, data bytes, pending orphans. When they are over a
    /// second old, a new count starts in the background (at most one per second, so
    /// a flood of STATS or scrapes does not become a flood of scans).
    pub fn last_counts(self: &Arc<Self>) -> (u64, u64, u64) {
        let mut at = lock(&self.counted_at);
        if at.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            *at = Some(Instant::now());
            let me = self.clone();
            tokio::spawn(async move { me.count_for_stats().await });
        }
        drop(at);
        *lock(&self.counts)
    }

    /// How often leases are renewed: a third of their time to live.
    pub fn lease_renewal(&self) -> Duration {
        (self.opts.lease_ttl / 3).max(Duration::from_millis(100))
    }

    /// Identities with connections on this gateway.
    pub fn local_identities(&self) -> usize {
        lock(&self.local).identities.len()
    }

    /// Notes that a lease script for `id` sent at `sent` succeeded.
    fn note_renewed(&self, id: &Identity, sent: Instant) {
        if let Some(h) = lock(&self.local).identities.get_mut(id) {
            h.renewed = h.renewed.max(Some(sent));
        }
    }

    /// Renews this gateway's leases (every third of the TTL, by the server):
    /// [`RENEW_AT_ONCE`] in flight, then the reaper's schedule for all of them
    /// together; the claims of leases found run out go on in the background. One by
    /// one, each waiting for the last, a pass over 5,000 identities took ~0.6 s (two
    /// round trips each), longer than the renewal period of a short TTL, and a pass
    /// over ~130,000 would have outlasted the default TTL.
    ///
    /// Oldest lease first: each identity then comes at about the same point of
    /// every pass, so it waits about as long as the passes are apart, and a lease
    /// runs out only when a pass takes longer than the TTL. In the order of the hash
    /// map (the same from pass to pass only while nobody comes or goes), an identity
    /// that connected during a pass, or any when the map grew, could be renewed
    /// last in the next, waiting up to two passes: a pass that met a storm of 3,000
    /// connections took a second, and up to half of those leases ran out with a 1-s
    /// TTL (docs/RELIABILITY.md).
    pub async fn renew_leases(self: &Arc<Self>) {
        let started = Instant::now();
        let mut held: Vec<(Option<Instant>, Identity)> = {
            let mut l = lock(&self.local);
            l.identities
                .iter_mut()
                // Not one whose renewal from an earlier pass still goes on.
                .filter(|(_, h)| h.leased && !h.renewing)
                .map(|(id, h)| {
                    h.renewing = true;
                    (h.renewed, *id)
                })
                .collect()
        };
        // Leases being taken (none sent yet) last.
        held.sort_unstable_by_key(|&(renewed, _)| (renewed.is_none(), renewed));
        // A renewal not done by then goes on in the background and gives its place
        // to the next: renewals sent to a primary that does not answer (cut off, or
        // stalled) each waited for the response timeout and took all of a pass's
        // places, so the identities of the primaries that answered were renewed
        // seconds late and their leases ran out for the other gateways (test
        // `a_primary_that_stops_answering_holds_up_only_its_own_leases`: 249 of 388
        // with a 3-s TTL while one of three primaries was stopped for 6 s; with the
        // one that holds the reaper's schedule, up to 402 of 405, see
        // `schedule_renewed`).
        let patience = (self.lease_renewal() / 4).min(self.opts.response_timeout);
        let mut each = futures_util::stream::iter(held)
            .map(|(_, id)| {
                let mut renewal = tokio::spawn(self.clone().renew_one(id));
                async move {
                    match tokio::time::timeout(patience, &mut renewal).await {
                        Ok(joined) => Ok((id, joined.ok().flatten())),
                        Err(_) => Err((id, renewal)),
                    }
                }
            })
            .buffer_unordered(RENEW_AT_ONCE);
        let mut done = Vec::new();
        let mut late = Vec::new();
        let mut renewed = Vec::new();
        let mut lapsed = Vec::new();
        let mut latest = 0;
        let mut failed = 0u64;
        let mut first_error = None;
        while let Some(r) = each.next().await {
            let (id, r) = match r {
                Ok(r) => r,
                Err(still_going) => {
                    late.push(still_going);
                    continue;
                }
            };
            done.push(id);
            match r {
                None => {}
                Some(Ok(((now, ran_out), sent))) => {
                    latest = latest.max(now);
                    renewed.push((id, sent));
                    if ran_out {
                        lapsed.push(id);
                    }
                }
                Some(Err(e)) => {
                    failed += 1;
                    first_error.get_or_insert(e);
                }
            }
        }
        drop(each);
        let renewed_all = renewed.len();
        let renewed: Vec<Identity> = {
            // Each still connected notes its renewal here, under the one lock.
            let mut l = lock(&self.local);
            for id in &done {
                if let Some(h) = l.identities.get_mut(id) {
                    h.renewing = false;
                }
            }
            renewed
                .into_iter()
                .filter_map(|(id, sent)| {
                    let h = l.identities.get_mut(&id).filter(|h| h.leased)?;
                    h.renewed = h.renewed.max(Some(sent));
                    Some(id)
                })
                .collect()
        };
        // The reaper's schedule, in the background, one pass's at a time: passes
        // waited for it, and while the primary of the schedule did not answer, each
        // took the response timeout longer (and the leases of a 3-s TTL came within
        // a few hundred ms of running out). A pass that finds the last one's still
        // going leaves it at that: an identity's entry that comes due early is only
        // looked at early.
        if !renewed.is_empty() && !self.scheduling.swap(true, Ordering::AcqRel) {
            let me = self.clone();
            tokio::spawn(async move {
                me.schedule_renewed(latest, renewed).await;
                me.scheduling.store(false, Ordering::Release);
            });
        }
        if let Some(e) = first_error {
            warn!(failed, of = failed as usize + renewed_all, error = %e, "lease renewals failed; trying again at the next pass");
        }
        self.note_contact(failed == 0);
        self.renewals_failed.fetch_add(failed, Ordering::Relaxed);
        self.renewals
            .fetch_add(renewed_all as u64, Ordering::Relaxed);
        self.renewal_micros
            .store(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        if !late.is_empty() {
            self.renewals_late
                .fetch_add(late.len() as u64, Ordering::Relaxed);
            let me = self.clone();
            tokio::spawn(async move { me.finish_late_renewals(late).await });
        }
        self.claim_lapsed(lapsed);
    }

    /// Moves identities a pass renewed (Redis's time `now`) on the reaper's
    /// schedule.
    async fn schedule_renewed(&self, now: u64, renewed: Vec<Identity>) {
        // Not those whose last connection left meanwhile: their release put them on
        // the schedule for the end of their grace, which this must not postpone. And
        // none that leaves from here on may have its release's entry overtaken by
        // this one's: the release waits for `schedule_turn` (a release in between
        // was reaped a TTL late: test
        // `an_identity_that_leaves_while_a_pass_schedules_is_reaped_on_time`; under
        // load, 39 of 1,500 identities that left during a pass were not reaped 8 s
        // after, in one run of `identities_that_leave_during_a_pass_of_renewals_…`).
        let _turn = self.schedule_turn.lock().await;
        let renewed: Vec<Identity> = {
            let l = lock(&self.local);
            renewed
                .into_iter()
                .filter(|id| l.identities.get(id).is_some_and(|h| h.leased))
                .collect()
        };
        if !renewed.is_empty() && fault_point("schedule-pause") {
            tokio::time::sleep(Duration::from_secs(4)).await;
        }
        if let Err(e) = self.schedule_after_leases(now, &renewed).await {
            // Each identity is on the schedule from when its lease was first taken;
            // a later due time only spares the reaper an early look.
            warn!(identities = renewed.len(), error = %e, "could not move renewed identities on the reaper's schedule");
        }
    }

    /// One renewal of a pass ([`ClusterStore::renew_leases`]): `None` if `id` is no
    /// longer leased; else the lease script's result and when it was sent.
    async fn renew_one(self: Arc<Self>, id: Identity) -> Renewal {
        let _turn = self.lease_turns.enter(id).await;
        // Still leased: not released meanwhile (a lease taken again since, in the
        // identity's order, is renewed).
        let still = lock(&self.local)
            .identities
            .get(&id)
            .is_some_and(|h| h.leased);
        if !still {
            return None;
        }
        // `NETSWAP_FAULT_AT=renewals-slow`: each renewal is sent 100 ms late (a test
        // of passes nearly as long as the TTL).
        if fault_set("renewals-slow") {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let sent = Instant::now();
        Some(self.lease(&id, false).await.map(|r| (r, sent)))
    }

    /// The renewals a pass left going on in the background: each noted as soon as it
    /// is done, as the pass notes its own (the reaper's schedule aside: a renewed
    /// identity whose entry comes due is only looked at early). Noted all together
    /// once the slowest was done (a timeout: 2 s), they kept the identities of the
    /// others from the next passes meanwhile, and under the full test suite's load
    /// 88 of 3,000 leases ran out in one run of
    /// `thousands_of_identities_hold_up_neither_their_leases_nor_the_watches`.
    async fn finish_late_renewals(
        self: Arc<Self>,
        late: Vec<(Identity, tokio::task::JoinHandle<Renewal>)>,
    ) {
        let mut each: futures_util::stream::FuturesUnordered<_> = late
            .into_iter()
            .map(|(id, renewal)| async move { (id, renewal.await.ok().flatten()) })
            .collect();
        let mut lapsed = Vec::new();
        let (mut renewed, mut failed) = (0u64, 0u64);
        let mut first_error = None;
        while let Some((id, r)) = each.next().await {
            let mut l = lock(&self.local);
            let h = l.identities.get_mut(&id);
            match r {
                Some(Ok(((_, ran_out), sent))) => {
                    renewed += 1;
                    self.renewals.fetch_add(1, Ordering::Relaxed);
                    if ran_out {
                        lapsed.push(id);
                    }
                    if let Some(h) = h {
                        h.renewing = false;
                        if h.leased {
                            h.renewed = h.renewed.max(Some(sent));
                        }
                    }
                }
                other => {
                    if let Some(Err(e)) = other {
                        failed += 1;
                        self.renewals_failed.fetch_add(1, Ordering::Relaxed);
                        first_error.get_or_insert(e);
                    }
                    if let Some(h) = h {
                        h.renewing = false;
                    }
                }
            }
        }
        if let Some(e) = first_error {
            warn!(failed, of = failed + renewed, error = %e, "lease renewals that went on in the background failed; trying again at the next pass");
        }
        self.claim_lapsed(lapsed);
    }

    /// After renewals that found leases run out: offline for every other gateway
    /// meanwhile, what was handed to these identities then is charged to its
    /// senders until claimed, as at a connect (the `LEASE` script raised their
    /// generations). In the background, as at a connect: the next pass does not
    /// wait for the claims.
    fn claim_lapsed(self: &Arc<Self>, lapsed: Vec<Identity>) {
        if lapsed.is_empty() {
            return;
        }
        warn!(
            identities = lapsed.len(),
            "leases had run out before their renewal (this gateway was paused or cut off from the cluster for longer than --lease-ttl); their identities were offline for other gateways and are connected again"
        );
        self.leases_lapsed
            .fetch_add(lapsed.len() as u64, Ordering::Relaxed);
        let me = self.clone();
        tokio::spawn(async move {
            futures_util::stream::iter(lapsed)
                .for_each_concurrent(RENEW_AT_ONCE, |id| me.claim_parked(id))
                .await;
        });
    }

    /// Moves the charge of every record handed to `id` while it was away to `id`
    /// ([`rules::Payer`]), even past its quota.
    async fn claim_parked(&self, id: Identity) {
        let k = self.keys.identity(&id);
        let parked: Vec<Vec<u8>> = match redis::cmd("SMEMBERS")
            .arg(&k.parked)
            .query_async(&mut self.redis())
            .await
        {
            Ok(v) => v,
            Err(e) => {
                warn!(identity = %id, error = %e, "could not list records parked with an identity");
                return;
            }
        };
        for raw in parked {
            let Some(ptr) = std::str::from_utf8(&raw)
                .ok()
                .and_then(|s| s.parse::<Pointer>().ok())
            else {
                continue;
            };
            for _ in 0..MAX_ATTEMPTS {
                match self.claim_one(&id, ptr).await {
                    Ok(true) => break,
                    Ok(false) => continue,
                    Err(e) => {
                        warn!(identity = %id, %ptr, error = ?e, "could not move a parked record's charge");
                        break;
                    }
                }
            }
        }
    }

    /// One parked record: `Ok(false)` when it changed meanwhile (try again).
    async fn claim_one(&self, id: &Identity, ptr: Pointer) -> Result<bool, QuotaError> {
        let k = self.keys.identity(id);
        let Some(rec) = self.load(ptr, None, 0, false).await? else {
            let _: Value = redis::cmd("SREM")
                .arg(&k.parked)
                .arg(ptr.to_string())
                .query_async(&mut self.redis())
                .await?;
            return Ok(true);
        };
        let Some(payer) = rec.payer.filter(|_| rec.owner == *id) else {
            let _: Value = redis::cmd("SREM")
                .arg(&k.parked)
                .arg(ptr.to_string())
                .query_async(&mut self.redis())
                .await?;
            return Ok(true);
        };
        let charge = Usage {
            records: 1,
            bytes: rec.size,
        };
        let op = self.op_id();
        let now = self.now_ms();
        let deadline = now + redis_io::ms(FENCE);
        self.quota
            .reserve(
                &self.redis(),
                &self.cfg,
                id,
                &op,
                ptr,
                charge,
                deadline,
                true,
                now,
            )
            .await?;
        if let Err(e) = self
            .quota
            .note_release(&self.redis(), &payer, &op, ptr, charge, deadline)
            .await
        {
            let _ = self.quota.settle(&self.redis(), id, &op, false).await;
            return Err(e);
        }
        let change = Change {
            expected: Some(rec.rev),
            fence: deadline,
            op: op.clone(),
            mark: true,
            set: vec![
                ("r", (rec.rev + 1).to_string().into_bytes()),
                Stored {
                    payer: None,
                    deadline: None,
                    ..rec.clone()
                }
                .state_field(),
            ],
            del: rec.legacy_fields().to_vec(),
            ..Change::default()
        };
        let committed = self.commit(ptr, &change).await?;
        if committed == Committed::Unknown {
            return Ok(true); // the repair pass settles it from the marker
        }
        let ok = committed == Committed::Yes;
        self.settle_later(ptr, op, vec![*id, payer], ok);
        if ok {
            let _: Value = redis::cmd("SREM")
                .arg(&k.parked)
                .arg(ptr.to_string())
                .query_async(&mut self.redis())
                .await?;
        }
        Ok(ok)
    }

    /// Is `id` connected to any gateway (a live lease)? With its generation, and
    /// since when it is offline.
    ///
    /// An identity whose lease ran out (its gateways did not release it) counts as
    /// offline from the lease's expiry, but never from before this gateway has been
    /// in touch with the cluster for a lease TTL: a lease runs out while the cluster
    /// is unreachable whether or not its gateway is alive, and the gateway renews it
    /// within a TTL once the cluster is back. Without this, records of a client that
    /// stayed connected through an outage longer than the TTL and the grace were
    /// reaped when the cluster came back (test
    /// `a_cluster_outage_longer_than_lease_and_grace_reaps_nothing_of_connected_clients`).
    async fn liveness(&self, id: &Identity) -> redis::RedisResult<Liveness> {
        let k = self.keys.identity(id);
        let v = redis_io::run(
            &self.redis(),
            &scripts::LIVENESS,
            &[&k.leases, &k.quota],
            &[],
        )
        .await?;
        let Value::Array(items) = v else {
            return Err(RedisError::from((redis::ErrorKind::Parse, "LIVENESS")));
        };
        let get = |i: usize| items.get(i).and_then(redis_io::as_int);
        let now = get(4).unwrap_or(0) as u64;
        self.note_clock(now);
        let last_lease = match items.get(1) {
            Some(Value::Double(d)) => Some(*d as u64),
            Some(v) => redis_io::as_int(v).map(|x| x as u64).or_else(|| {
                redis_io::as_bytes(v).and_then(|b| {
                    std::str::from_utf8(b)
                        .ok()?
                        .parse::<f64>()
                        .ok()
                        .map(|f| f as u64)
                })
            }),
            None => None,
        };
        let released = get(2).map(|x| x as u64);
        let lapsed = last_lease.filter(|&l| released.is_none_or(|r| l >= r));
        let offline_since = match lapsed {
            Some(expiry) => {
                // Redis time at which this gateway has been in touch for a TTL.
                let ttl = redis_io::ms(self.opts.lease_ttl);
                let settled = match *lock(&self.in_touch) {
                    Some(t) => (now + ttl).saturating_sub(redis_io::ms(t.elapsed())),
                    None => now + ttl,
                };
                Some(expiry.max(settled))
            }
            None => released,
        };
        Ok(Liveness {
            live: get(0).unwrap_or(0) > 0,
            offline_since,
            generation: get(3).unwrap_or(0) as u64,
            now,
        })
    }

    // ---- requests ----

    /// A turn to work with Redis for a change whose first key is in `slot`, held
    /// until the request is done with it and moved to each primary it waits on:
    /// requests queue here, in arrival order, rather than inside the Redis client,
    /// each primary's on their own (`turns.rs`).
    pub(super) async fn turn(&self, slot: u16) -> Turn<'_> {
        Turns::first(self.turns.as_ref(), slot).await
    }

    /// Applies one request. Never waits on Redis for longer than the per-command
    /// timeout times the retries; a cluster that is unreachable or failing answers
    /// BUSY (retry later).
    pub async fn apply(self: Arc<Self>, caller: Caller, request: Request) -> Outcome {
        let Some(ptr) = request.pointer() else {
            return match request {
                Request::Create { access, data } => {
                    // The turn of its identity's primary, which it asks first (its
                    // quota); the new record's slot is not known yet.
                    let mut turn = self.turn(keys::identity_slot(&caller.identity)).await;
                    // Boxed, as the other rarer branches: every request's future
                    // holds room for the largest branch it may take.
                    Box::pin(self.create(&caller, access, data, &mut turn))
                        .await
                        .into()
                }
                // Answered without Redis: a keepalive never waits for a turn.
                _ => Reply::Hello(self.hello(caller.identity)).into(),
            };
        };
        // A change waits for the record's changes before it on this gateway
        // (`serial`), before it takes a turn: a queue on a busy record holds no turns.
        // A small write may be committed with others of its record instead (`group`).
        let _record_turn = match request {
            _ if group::groupable(&request) => {
                match self.enter_grouped(&caller, ptr, &request).await {
                    Ok(turn) => Some(turn),
                    Err(outcome) => return outcome,
                }
            }
            Request::Read { .. }
            | Request::Info { .. }
            | Request::Watch { .. }
            | Request::Unwatch { .. } => None,
            // Not bounded: a connection has one request on a record in flight, so the
            // queue is at most one change per connection writing the record, each
            // about a round trip. While Redis fails, only a change decided on a
            // remembered state is re-sent for long (15 s); the rest fail at their
            // load (test `a_cluster_that_goes_away_…`: 16 queued writes all answered).
            _ => Some(self.serial.enter(ptr).await),
        };
        // Reads take no turn: their loads go to Redis in pipelines (`batch.rs`), and
        // waiting for a turn only cost each read a wake-up (docs/BENCHMARKS.md).
        let mut turn = match request {
            Request::Read { .. } | Request::Info { .. } => Turn::none(),
            _ => self.turn(keys::record_slot(ptr)).await,
        };
        self.apply_in_turn(&caller, ptr, &request, &mut turn).await
    }

    /// [`ClusterStore::apply`] once the request holds its record's turn (a change)
    /// and `turn`, of its record's primary (moved to each other primary the change
    /// waits on, `turns::Turn`; none for a read). A WATCH that registered nothing, however it
    /// ended (refused, or BUSY when Redis failed after its subscription), leaves its
    /// record's subscription to the sweep: only the refused ones did, and a WATCH
    /// answered BUSY kept a subscription nobody used until the gateway stopped.
    async fn apply_in_turn(
        &self,
        caller: &Caller,
        ptr: Pointer,
        request: &Request,
        turn: &mut Turn<'_>,
    ) -> Outcome {
        let outcome = self.apply_decided(caller, ptr, request, turn).await;
        if matches!(request, Request::Watch { .. }) && outcome.watch == WatchChange::None {
            Box::pin(self.unsubscribe_if_unwatched(ptr)).await;
        }
        outcome
    }

    /// [`ClusterStore::apply_in_turn`], but for the subscriptions of WATCHes that
    /// registered nothing.
    async fn apply_decided(
        &self,
        caller: &Caller,
        ptr: Pointer,
        request: &Request,
        turn: &mut Turn<'_>,
    ) -> Outcome {
        let transfer_to = match &request {
            Request::Transfer { to, .. } => Some(match *to {
                NewOwner::Identity(id) => id,
                NewOwner::Ip(ip) => self.identity_of(ip),
            }),
            _ => None,
        };
        let watch = matches!(request, Request::Watch { .. });
        let data = matches!(request, Request::Watch { options, .. } if options.data);
        if watch && let Err(e) = Box::pin(self.subscribe(ptr, data)).await {
            return unavailable(&e).into();
        }
        for n in 0..MAX_ATTEMPTS {
            if n > 0 {
                // A lost race after the turn was moved to another primary (a payer's).
                turn.move_to(keys::record_slot(ptr)).await;
            }
            // Every attempt may decide a write on the remembered state: after a lost
            // race it is the one the commit found (`scripts::CHANGED`), or none.
            match self
                .attempt(caller, ptr, request, transfer_to.as_ref(), true, turn)
                .await
            {
                Ok(Some(outcome)) => return outcome,
                Ok(None) => continue, // the record changed under us: decide again
                Err(AttemptError::Redis(e)) => return unavailable(&e).into(),
            }
        }
        Reply::error(
            netswap_proto::Status::Busy,
            "the record kept changing under this request; retry later",
        )
        .into()
    }

    /// CREATE, holding `turn` of its identity's primary (its quota first), then of
    /// the new record's.
    async fn create(
        self: &Arc<Self>,
        caller: &Caller,
        access: Access,
        data: Bytes,
        turn: &mut Turn<'_>,
    ) -> Reply {
        if let Err(r) = rules::decide_create(data.len() as u64, &self.cfg) {
            return r;
        }
        let me = caller.identity;
        let charge = Usage {
            records: 1,
            bytes: data.len() as u64,
        };
        loop {
            // The quota, and the owner's index, are on its identity's primary.
            turn.move_to(keys::identity_slot(&me)).await;
            let ptr = self.new_pointer();
            let op = self.op_id();
            let now = self.now_ms();
            let deadline = now + redis_io::ms(FENCE);
            match self
                .quota
                .reserve(
                    &self.redis(),
                    &self.cfg,
                    &me,
                    &op,
                    ptr,
                    charge,
                    deadline,
                    false,
                    now,
                )
                .await
            {
                Ok(()) => {}
                Err(QuotaError::Exceeded(kind)) => return kind.reply(&self.cfg),
                Err(QuotaError::Redis(e)) => return unavailable(&e),
            }
            crash_point("create-after-reserve");
            let ik = self.keys.identity(&me);
            let sadd = || {
                vec![
                    redis::cmd("SADD")
                        .arg(&ik.owned)
                        .arg(ptr.to_string())
                        .take(),
                ]
            };
            let indexed = batch::Batcher::send_idempotent(
                self.batch.as_deref(),
                &self.commands,
                &ik.owned,
                sadd,
            )
            .await
            .and_then(|mut v| v.pop().map_or(Ok(Value::Nil), Value::extract_error));
            let change = Change {
                expected: None,
                inline: true, // new: nothing to move
                fence: deadline,
                op: op.clone(),
                mark: true,
                data: DataOp::Set(data.clone()),
                set: vec![
                    ("r", b"1".to_vec()),
                    (
                        redis_io::STATE,
                        redis_io::pack_state(&me, None, access, 1, None),
                    ),
                ],
                ..Change::default()
            };
            let committed = match indexed {
                Ok(_) => {
                    turn.move_to(keys::record_slot(ptr)).await;
                    self.commit_placing(ptr, &change).await
                }
                Err(e) => Err(e),
            };
            let committed = match committed {
                Ok((Committed::Yes, _)) if fault_point("create-reply-lost") => {
                    Err(RedisError::from((
                        redis::ErrorKind::Io,
                        "the create's reply was lost (NETSWAP_FAULT_AT)",
                    )))
                }
                other => other,
            };
            let in_hash = matches!(committed, Ok((_, true)));
            match committed.map(|(c, _)| c) {
                Ok(Committed::Yes) => {
                    self.settle_later(ptr, op, vec![me], true);
                    // Its state is known: a first write through this gateway is
                    // decided on it and committed in one round trip.
                    lock(&self.states).seen(
                        ptr,
                        &Stored {
                            rev: 1,
                            owner: me,
                            payer: None,
                            access,
                            version: 1,
                            deadline: None,
                            size: data.len() as u64,
                            data: None,
                            inline: in_hash || data.len() <= scripts::IN_HASH,
                            legacy: false,
                        },
                    );
                    return Reply::Created(ptr);
                }
                Ok(c) => {
                    // A pointer that exists already (a re-send that finds the record
                    // changed is that too: ours would carry our operation id), or the
                    // fence: give the charge back and try another pointer.
                    turn.move_to(keys::identity_slot(&me)).await;
                    let _ = self.quota.settle(&self.redis(), &me, &op, false).await;
                    if c == Committed::Fenced {
                        return Reply::error(
                            netswap_proto::Status::Busy,
                            "the store was too slow to apply the change; retry later",
                        );
                    }
                }
                Err(e) => {
                    // Unknown whether it committed; the repair pass settles the
                    // charge. Nobody but this gateway knows the pointer, so a record
                    // made would be one its owner cannot use and pays for while it
                    // stays connected: it is deleted once Redis answers again.
                    self.undo_create_later(ptr, me);
                    return unavailable(&e);
                }
            }
        }
    }

    /// Deletes the record a create may have made at `ptr` for `me` when its caller was
    /// told it failed (its commit's outcome was not known): in the background, trying
    /// again while Redis fails, for up to [`UNDO_FOR`]. A gateway that dies first
    /// leaves the record to the reaper (it goes with its owner's other records).
    fn undo_create_later(self: &Arc<Self>, ptr: Pointer, me: Identity) {
        let store = self.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let mut pause = Duration::from_millis(200);
            loop {
                match store.undo_create(ptr, &me).await {
                    Ok(deleted) => {
                        if deleted {
                            info!(%ptr, "deleted the record of a create whose caller was told it failed");
                        }
                        return;
                    }
                    Err(AttemptError::Redis(e)) if started.elapsed() + pause > UNDO_FOR => {
                        warn!(%ptr, error = %e, "could not undo a create whose outcome was unknown; its owner's reaping will take it");
                        return;
                    }
                    Err(_) => {
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(5));
                    }
                }
            }
        });
    }

    /// One try of [`ClusterStore::undo_create_later`]: whether a record was deleted.
    async fn undo_create(&self, ptr: Pointer, me: &Identity) -> Result<bool, AttemptError> {
        let _turn = self.serial.enter(ptr).await;
        for _ in 0..MAX_ATTEMPTS {
            // Only the record the create would have made: `me`'s, never changed (the
            // pointer was never told anyone). Anything else under the pointer is not
            // this create's (its compare-and-set refused it).
            let Some(rec) = self
                .load(ptr, None, 0, false)
                .await?
                .filter(|r| r.owner == *me && r.rev == 1)
            else {
                return Ok(false);
            };
            match self.delete(ptr, &rec, &mut Turn::none()).await? {
                Committed::Yes => return Ok(true),
                Committed::Unknown => return Ok(false),
                Committed::Changed(_) | Committed::Fenced => {}
            }
        }
        Ok(false)
    }

    /// Settles the quota entries of operation `op` on record `ptr` after its commit,
    /// without delaying the reply, then removes its marker; a failure leaves them to
    /// the repair pass (which reads the marker).
    fn settle_later(&self, ptr: Pointer, op: String, ids: Vec<Identity>, committed: bool) {
        let commands = self.commands.clone();
        let quota = self.quota.clone();
        let batch = self.batch.clone();
        let meta = self.keys.record(ptr).meta;
        tokio::spawn(async move {
            for id in ids {
                if let Err(e) = quota.settle(&commands.get(), &id, &op, committed).await {
                    debug!(identity = %id, op, error = ?e, "settle failed; the repair pass will do it");
                    return;
                }
            }
            // (The last marker of a deleted record's tombstone takes the hash with it.)
            let del = || {
                vec![
                    redis::cmd("HDEL")
                        .arg(&meta)
                        .arg(redis_io::marker(&op))
                        .take(),
                ]
            };
            let _ = batch::Batcher::send_idempotent(batch.as_deref(), &commands, &meta, del).await;
        });
    }

    /// Sends idempotent commands on keys of `key`'s slot after the reply, with other
    /// requests' commands when batching; what they do may be left undone (index
    /// clean-up that the reaper and claims tolerate).
    fn send_later(&self, key: String, cmds: Vec<redis::Cmd>) {
        let commands = self.commands.clone();
        let batch = self.batch.clone();
        tokio::spawn(async move {
            if let Err(e) =
                batch::Batcher::send_idempotent(batch.as_deref(), &commands, &key, || cmds.clone())
                    .await
            {
                debug!(key, error = %e, "index clean-up failed; the reaper skips stale entries");
            }
        });
    }

    /// Commits a decided change. When Redis fails mid-way (a failover, a timeout) the
    /// same change is sent again, with backoff, for up to [`RESEND_FOR`]: the commit
    /// is idempotent (its operation id), so the re-send either applies it or finds it
    /// applied. A re-send that finds the record changed cannot tell: `Unknown`.
    pub(super) async fn commit(
        &self,
        ptr: Pointer,
        change: &Change,
    ) -> redis::RedisResult<Committed> {
        self.commit_placing(ptr, change).await.map(|(c, _)| c)
    }

    /// [`ClusterStore::commit`], and whether the bytes were kept in the state hash
    /// whatever their size (a new data key refused while the slot migrates, see
    /// `redis_io::commit`): a state remembered after the commit must say where they are.
    pub(super) async fn commit_placing(
        &self,
        ptr: Pointer,
        change: &Change,
    ) -> redis::RedisResult<(Committed, bool)> {
        // Whatever happens, the state remembered is no longer the record's.
        lock(&self.states).forget(ptr);
        // After races lost in a row, claim the record (`scripts::CLAIM`).
        let claimed;
        let change = if change.expected.is_some() && self.serial.lost(ptr) >= scripts::CLAIM_AFTER {
            self.claims.fetch_add(1, Ordering::Relaxed);
            claimed = Change {
                claim: Some(self.claim.clone()),
                ..change.clone()
            };
            &claimed
        } else {
            change
        };
        let keys = self.keys.record(ptr);
        let started = Instant::now();
        let mut pause = Duration::from_millis(50);
        let mut resent = false;
        loop {
            // A re-send goes alone, not with other requests' commits.
            let batch = if resent { None } else { self.batch.as_deref() };
            let committed =
                redis_io::commit(&self.commands, batch, &keys, change, self.wait_for(ptr)).await;
            match &committed {
                Ok((Committed::Changed(found), _)) => {
                    // The state the commit found: the next attempt is decided on it.
                    if let Some(found) = found {
                        lock(&self.states).seen(ptr, found);
                    }
                    if change.expected.is_some() {
                        self.races_lost.fetch_add(1, Ordering::Relaxed);
                    }
                    self.serial.raced(ptr, false);
                }
                Ok((Committed::Yes, _)) => {
                    self.serial.raced(ptr, true);
                }
                _ => {}
            }
            match committed {
                Ok((Committed::Changed(_), _)) if resent => return Ok((Committed::Unknown, false)),
                Ok(c) => return Ok(c),
                Err(e) if redis_io::is_group_failed(&e) => {
                    debug!(%ptr, "a pipeline of commits failed; sending this one again alone");
                    resent = true;
                }
                Err(e) if started.elapsed() + pause > RESEND_FOR => return Err(e),
                Err(e) => {
                    debug!(%ptr, error = %e, "commit failed; sending it again");
                    resent = true;
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
            }
        }
    }
}

pub(crate) struct Liveness {
    live: bool,
    offline_since: Option<u64>,
    generation: u64,
    now: u64,
}

/// For the crash tests: `NETSWAP_CRASH_AT=NAME` makes the process abort at the named
/// point (e.g. between a quota reservation and its commit), as a gateway dying
/// mid-operation would. Read once; unset in production.
fn crash_point(name: &str) {
    static AT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    if AT
        .get_or_init(|| std::env::var("NETSWAP_CRASH_AT").ok())
        .as_deref()
        == Some(name)
    {
        eprintln!("netswap-server: NETSWAP_CRASH_AT={name}: aborting here, as a crash would");
        std::process::abort();
    }
}

/// For the tests of lost replies and races: `NETSWAP_FAULT_AT=NAME` makes the named
/// point (`create-reply-lost`: a create's commit applied but its reply lost;
/// `reap-pause`: the reaper pauses 2 s after its first chunk of an identity's
/// records; `schedule-pause`: a pass of renewals pauses 4 s between picking the
/// identities still connected and moving them on the reaper's schedule;
/// `reap-live-pause`: the reaper pauses 2 s after finding a due identity connected;
/// `unsubscribes-fail`: the `SUNSUBSCRIBE`s of the first sweep that sends any fail)
/// happen once, the first time the process gets there. Read once; unset in
/// production.
pub(crate) fn fault_point(name: &str) -> bool {
    static DONE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    fault_set(name) && !DONE.swap(true, Ordering::Relaxed)
}

/// Whether `NETSWAP_FAULT_AT` names `name`, every time (a fault that lasts, unlike
/// [`fault_point`]'s, such as `commands-stay-stuck`).
pub(crate) fn fault_set(name: &str) -> bool {
    static AT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    AT.get_or_init(|| std::env::var("NETSWAP_FAULT_AT").ok())
        .as_deref()
        == Some(name)
}

/// Redis failed (unreachable, an error reply, a timeout).
#[derive(Debug)]
pub(crate) enum AttemptError {
    Redis(RedisError),
}

impl std::fmt::Display for AttemptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AttemptError::Redis(e) => write!(f, "{e}"),
        }
    }
}

impl From<RedisError> for AttemptError {
    fn from(e: RedisError) -> Self {
        AttemptError::Redis(e)
    }
}

impl From<QuotaError> for AttemptError {
    fn from(e: QuotaError) -> Self {
        match e {
            QuotaError::Redis(e) => AttemptError::Redis(e),
            QuotaError::Exceeded(_) => {
                unreachable!("quota refusals are answered where they happen")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_urls_carry_a_user_and_password_for_every_node() {
        let o = ClusterOptions::parse("redis-cluster://127.0.0.1:7000,127.0.0.1:7001").unwrap();
        assert_eq!(o.nodes, ["127.0.0.1:7000", "127.0.0.1:7001"]);
        assert_eq!(o.credentials, Credentials::default());
        assert!(o.tls.is_none());
        let o = ClusterOptions::parse("rediss-cluster://:pw@a:1").unwrap();
        let tls = o.tls.expect("TLS");
        assert!(
            tls.ca.is_none() && tls.client.is_none(),
            "the system's authorities"
        );
        assert_eq!(o.credentials.password.as_deref(), Some("pw"));
        let o = ClusterOptions::parse("redis-cluster://gw:p%40ss%3Aw0rd@a:1,b:2").unwrap();
        assert_eq!(o.nodes, ["a:1", "b:2"]);
        assert_eq!(o.credentials.username.as_deref(), Some("gw"));
        assert_eq!(o.credentials.password.as_deref(), Some("p@ss:w0rd"));
        let o = ClusterOptions::parse("redis-cluster://:secret@a:1").unwrap();
        assert_eq!(o.credentials.username, None, "the default user");
        assert_eq!(o.credentials.password.as_deref(), Some("secret"));
        // An @ not encoded in the password: the last one ends it.
        let o = ClusterOptions::parse("redis-cluster://:se@cret@a:1").unwrap();
        assert_eq!(o.credentials.password.as_deref(), Some("se@cret"));
        assert_eq!(o.nodes, ["a:1"]);
        let shown = format!("{o:?}");
        assert!(
            !shown.contains("se@cret") && shown.contains("<hidden>"),
            "{shown}"
        );
    }

    #[test]
    fn bad_store_urls_are_refused_without_showing_the_password() {
        for (url, says) in [
            ("redis-cluster://gw@a:1", "a user needs a password"),
            ("redis-cluster://gw:hunter2@", "no nodes"),
            ("redis-cluster://gw:hunter2@a:1/0", "is not HOST:PORT"),
            ("redis-cluster://gw:hunter2%FF@a:1", "not UTF-8"),
            (
                "redis://gw:hunter2@a:1",
                "expected memory, redis-cluster://",
            ),
        ] {
            let e = ClusterOptions::parse(url).unwrap_err();
            assert!(e.contains(says), "{url}: {e}");
            assert!(!e.contains("hunter2"), "{url}: {e}");
        }
        assert_eq!(redact("redis://gw:x@a:1"), "redis://gw:***@a:1");
        assert_eq!(redact("redis://a:1"), "redis://a:1");
    }
}
