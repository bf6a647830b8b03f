//! Command-line flags (each with an environment variable) and the resolved config.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use netswap_proto::{IdentityKey, MAX_MESSAGE, ReassemblyLimits, StoreConfig};
use rand::RngCore;

/// The largest `--receive-buffer` (the kernel takes an `int` and doubles it).
const MAX_RECEIVE_BUFFER: usize = 1 << 30;

/// netswap-server: swap space over the network.
///
/// Serves netswap records over plain TCP (protocol v1, see docs/PROTOCOL.md), in
/// memory. Every flag can also be set with the environment variable shown.
#[derive(Parser, Debug, Clone)]
#[command(name = "netswap-server", version, about, long_about = None)]
pub struct Args {
    /// Address and port to listen on (IPv4 or IPv6, e.g. `[::]:7420`).
    #[arg(long, env = "NETSWAP_LISTEN", default_value = "127.0.0.1:7420")]
    pub listen: SocketAddr,

    /// Seconds an identity's records survive after its last connection closes.
    #[arg(long, env = "NETSWAP_ORPHAN_GRACE", default_value_t = 300)]
    pub orphan_grace: u64,

    /// Largest record in bytes (at most 91,095,040, the largest message).
    #[arg(long, env = "NETSWAP_MAX_RECORD_BYTES", default_value_t = netswap_proto::DEFAULT_MAX_RECORD_BYTES)]
    pub max_record_bytes: u64,

    /// Largest request message in bytes [default: max record bytes + 16].
    #[arg(long, env = "NETSWAP_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: Option<u64>,

    /// Connections one IP address may hold open at once.
    #[arg(long, env = "NETSWAP_MAX_CONNECTIONS_PER_IP", default_value_t = 256)]
    pub max_connections_per_ip: u32,

    /// Records one identity may own.
    #[arg(long, env = "NETSWAP_QUOTA_RECORDS", default_value_t = 1_000_000)]
    pub quota_records: u64,

    /// Data bytes one identity may own (default 1 GiB).
    #[arg(long, env = "NETSWAP_QUOTA_BYTES", default_value_t = 1 << 30)]
    pub quota_bytes: u64,

    /// Close a connection after this many seconds with no bytes in either direction
    /// (0 = never).
    #[arg(long, env = "NETSWAP_IDLE_TIMEOUT", default_value_t = 0)]
    pub idle_timeout: u64,

    /// Close a connection that stops sending in the middle of a frame or a
    /// multi-frame message for this many seconds.
    #[arg(long, env = "NETSWAP_STALL_TIMEOUT", default_value_t = 30)]
    pub stall_timeout: u64,

    /// File holding the secret that salts identities (raw bytes). Created with 32
    /// random bytes (mode 0600) when missing. Without it, a random key per start.
    #[arg(long, env = "NETSWAP_IDENTITY_KEY")]
    pub identity_key: Option<PathBuf>,

    /// Multi-frame messages one connection may have unfinished at once (BUSY past it).
    #[arg(long, env = "NETSWAP_MAX_PARTIAL_MESSAGES", default_value_t = 64)]
    pub max_partial_messages: usize,

    /// Bytes unfinished messages on one connection may grow to
    /// [default: 2 × max message bytes].
    #[arg(long, env = "NETSWAP_MAX_PARTIAL_BYTES")]
    pub max_partial_bytes: Option<u64>,

    /// Bytes unfinished messages may hold on all connections together (BUSY past it)
    /// [default: 1 GiB, at least 2 × max message bytes].
    #[arg(long, env = "NETSWAP_MAX_TOTAL_PARTIAL_BYTES")]
    pub max_total_partial_bytes: Option<u64>,

    /// Bytes unfinished messages from one address (an IPv4 address or an IPv6 /64)
    /// may hold on all its connections together: its share of the server-wide budget
    /// [default: a quarter of it, at least 2 × max message bytes].
    #[arg(long, env = "NETSWAP_MAX_PARTIAL_BYTES_PER_IP")]
    pub max_partial_bytes_per_ip: Option<u64>,

    /// Lookups of pointers that do not exist one address (an IPv4 address or an IPv6
    /// /64) may make per second, with a burst of as many; past it, its requests that
    /// name a pointer get BUSY until the rate allows again (0 = no limit). A pointer
    /// is a capability: this bounds how fast anyone can guess.
    #[arg(long, env = "NETSWAP_MAX_MISSES_PER_SECOND", default_value_t = 1000)]
    pub max_misses_per_second: u32,

    /// Reply bytes queued for a connection before the server stops reading its
    /// requests (backpressure for clients that do not read).
    #[arg(long, env = "NETSWAP_MAX_OUTPUT_BYTES", default_value_t = 4 << 20)]
    pub max_output_bytes: usize,

    /// Each connection's socket receive buffer in bytes (`SO_RCVBUF`; 0 = the
    /// kernel's autotuning). Bounds how much of a large upload can queue in the
    /// server's socket ahead of a small request on the same connection (head-of-line
    /// latency) at the cost of throughput on links with a long round trip; capped by
    /// `net.core.rmem_max`. See docs/BENCHMARKS.md.
    #[arg(long, env = "NETSWAP_RECEIVE_BUFFER", default_value_t = 0)]
    pub receive_buffer: usize,

    /// Records one connection may watch at once.
    #[arg(long, env = "NETSWAP_MAX_WATCHES", default_value_t = 65_536)]
    pub max_watches: usize,

    /// Notifications queued exactly for a watching connection that is behind; past
    /// it, each watch's further notifications are merged into one summary with the
    /// latest version until it catches up (bounded memory, no disconnect).
    #[arg(long, env = "NETSWAP_NOTIFY_QUEUE", default_value_t = 16_384)]
    pub notify_queue: usize,

    /// Bytes of changed data (data watches) held for one watching connection that is
    /// behind; past it, data changes are merged too, and a watch whose merged bytes do
    /// not fit is told "changed" without them (it reads the record).
    #[arg(long, env = "NETSWAP_NOTIFY_QUEUE_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub notify_queue_bytes: usize,

    /// Worker threads (1 = a single-threaded runtime) [default: CPUs − 1, at least 1].
    #[arg(long, env = "NETSWAP_THREADS")]
    pub threads: Option<usize>,

    /// Store shards, 1 to 256 (rounded up to a power of two).
    #[arg(long, env = "NETSWAP_SHARDS", default_value_t = 64,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=256))]
    pub shards: usize,

    /// Serve Prometheus metrics at http://ADDR:PORT/metrics (off by default).
    #[arg(long, env = "NETSWAP_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// Where records live: `memory` (this process, the fastest) or
    /// `redis-cluster://HOST:PORT,HOST:PORT,...` (the server becomes a stateless
    /// gateway; any number of gateways on one cluster are one netswap; they must all
    /// use the same --identity-key). A cluster that wants a password:
    /// `redis-cluster://USER:PASSWORD@HOST:PORT,...` (`:PASSWORD@` for the default
    /// user; percent-encoded), best given as NETSWAP_STORE, which `ps` does not show.
    /// Nodes that speak TLS: `rediss-cluster://...` (see --redis-tls-ca).
    /// See docs/ARCHITECTURE.md.
    #[arg(
        long,
        env = "NETSWAP_STORE",
        default_value = "memory",
        hide_env_values = true
    )]
    pub store: String,

    /// With Redis Cluster: seconds an identity stays connected after its gateway
    /// vanished without saying goodbye (leases are renewed every third of this).
    #[arg(long, env = "NETSWAP_LEASE_TTL", default_value_t = 15)]
    pub lease_ttl: u64,

    /// With Redis Cluster: replicas that must have a write before it is acknowledged
    /// (Redis `WAIT`; 0 = Redis's asynchronous replication, which can lose the last
    /// acknowledged writes when a primary fails).
    #[arg(long, env = "NETSWAP_REDIS_WAIT_REPLICAS", default_value_t = 0)]
    pub redis_wait_replicas: u32,

    /// With Redis Cluster: requests that change records this gateway works on at
    /// once, per primary (the rest wait their turn in the gateway, in order; each
    /// primary's on their own, so a primary that stops answering holds up only the
    /// changes of its records); 0 = no limit. Reads take no turn (their loads go to
    /// Redis in pipelines, see --redis-batch). See docs/BENCHMARKS.md for how the
    /// bound moves throughput and the tail of writes at pipeline 16.
    #[arg(long, env = "NETSWAP_REDIS_MAX_IN_FLIGHT", default_value_t = 128)]
    pub redis_max_in_flight: usize,

    /// With Redis Cluster: records whose last seen state (not their bytes, ~150 B
    /// each) this gateway remembers, so that a write on one of them is decided at
    /// once and committed in one Redis round trip instead of two; the commit's
    /// revision check catches a state made stale elsewhere. 0 = off.
    #[arg(long, env = "NETSWAP_REDIS_STATE_CACHE", default_value_t = 65_536)]
    pub redis_state_cache: usize,

    /// With Redis Cluster: small records (bytes up to 1 KiB) this gateway holds with
    /// their bytes and answers READs of without a load, kept exact by Redis's
    /// invalidations (CLIENT TRACKING): a READ never sees a state older than a change
    /// acknowledged before it arrived, through any gateway. A change of a record costs
    /// Redis a push to each gateway that read it since its last change; at most
    /// N x ~1.1 KiB of memory. It pays where the records read fit in it: past that,
    /// its fills cost more than the loads they replace. 0 = off (docs/ARCHITECTURE.md).
    #[arg(long, env = "NETSWAP_REDIS_READ_CACHE", default_value_t = 0)]
    pub redis_read_cache: usize,

    /// With Redis Cluster: bytes of records this gateway holds, across its
    /// connections, fetched from Redis for large replies (over 16 KiB) not sent yet;
    /// past it, large READs and data watches get BUSY (retry later). Each READ gets
    /// its own copy from Redis, so without a bound clients that read no replies could
    /// make a gateway hold copies without end. One address (IPv4, or IPv6 /64; all
    /// its connections) holds at most a quarter of it; each connection is also
    /// bounded by --max-output-bytes (docs/ARCHITECTURE.md).
    #[arg(long, env = "NETSWAP_REDIS_MAX_REPLY_BYTES", default_value_t = 1 << 30)]
    pub redis_max_reply_bytes: usize,

    /// With Redis Cluster: seconds the subscriptions to a record's events outlast its
    /// last watch on this gateway (a watch that comes back within them needs no new
    /// subscription); looked for every third of this, at most every 10 s.
    #[arg(long, env = "NETSWAP_REDIS_UNSUBSCRIBE_AFTER", default_value_t = 30)]
    pub redis_unsubscribe_after: u64,

    /// With Redis Cluster: send the loads and commits of requests that arrive together
    /// as one pipeline per primary instead of one request each through the Redis
    /// client (the client's per-request work was a third of the gateway's CPU per
    /// READ; docs/BENCHMARKS.md). `false` sends each on its own.
    #[arg(long, env = "NETSWAP_REDIS_BATCH", default_value_t = true, action = clap::ArgAction::Set)]
    pub redis_batch: bool,

    /// With `rediss-cluster://` (TLS): a PEM file of the authorities that sign the
    /// nodes' certificates, trusted instead of the system's. The three TLS files are
    /// read again when they change (renewed certificates: no restart needed).
    #[arg(long, env = "NETSWAP_REDIS_TLS_CA", value_name = "FILE")]
    pub redis_tls_ca: Option<PathBuf>,

    /// With `rediss-cluster://` (TLS): this gateway's PEM certificate, for nodes that
    /// ask clients for one (`tls-auth-clients yes`); needs --redis-tls-key.
    #[arg(long, env = "NETSWAP_REDIS_TLS_CERT", value_name = "FILE")]
    pub redis_tls_cert: Option<PathBuf>,

    /// With `rediss-cluster://` (TLS): the PEM private key of --redis-tls-cert.
    #[arg(long, env = "NETSWAP_REDIS_TLS_KEY", value_name = "FILE")]
    pub redis_tls_key: Option<PathBuf>,

    /// With Redis Cluster: the prefix of every key, so that several netswap
    /// deployments can share one cluster.
    #[arg(long, env = "NETSWAP_REDIS_PREFIX", default_value = "ns")]
    pub redis_prefix: String,

    /// Keep records across restarts: load the snapshot in this directory at start,
    /// write one every --snapshot-interval and at shutdown (SIGINT/SIGTERM), and on
    /// SIGUSR1. Needs --identity-key (the same key must map addresses to the same
    /// identities after a restart). Off by default: records live in memory only.
    #[arg(long, env = "NETSWAP_DATA_DIR")]
    pub data_dir: Option<PathBuf>,

    /// Seconds between periodic snapshots with --data-dir (0 = only at shutdown and
    /// on SIGUSR1). A crash (SIGKILL, power loss) loses at most the changes since the
    /// last snapshot finished.
    #[arg(long, env = "NETSWAP_SNAPSHOT_INTERVAL", default_value_t = 60)]
    pub snapshot_interval: u64,

    /// Turn transparent huge pages off for this process (Linux; as Redis's
    /// `disable-thp`): where the kernel backs the heap with 2 MiB pages, the event
    /// loop stalls every connection while one is faulted in and cleared (with
    /// mimalloc, a 64 MiB write took 0.11 s instead of 0.04 s and small reads behind
    /// it waited 4-7 ms; docs/BENCHMARKS.md). `false` leaves the system's setting.
    #[arg(long, env = "NETSWAP_DISABLE_THP", default_value_t = true, action = clap::ArgAction::Set)]
    pub disable_thp: bool,
}

/// Everything the server needs, resolved from [`Args`] or built by hand (tests).
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Listen address.
    pub listen: SocketAddr,
    /// Store limits and timings.
    pub store: StoreConfig,
    /// Per-connection reassembly bounds.
    pub reassembly: ReassemblyLimits,
    /// Server-wide bound on bytes promised to unfinished messages.
    pub max_total_partial_bytes: u64,
    /// One address's (IPv4, or IPv6 /64) share of that bound.
    pub max_partial_bytes_per_ip: u64,
    /// Misses (lookups of pointers that do not exist) per second and address; 0 = off.
    pub max_misses_per_second: u32,
    /// Connections per IP address.
    pub max_connections_per_ip: u32,
    /// Idle timeout (`None` = never).
    pub idle_timeout: Option<Duration>,
    /// Stalled-sender timeout.
    pub stall_timeout: Duration,
    /// Backpressure threshold for queued replies.
    pub max_output_bytes: usize,
    /// Each connection's `SO_RCVBUF` (`None`: the kernel's autotuning).
    pub receive_buffer: Option<usize>,
    /// Notification queue per watching connection.
    pub notify_queue: usize,
    /// Bytes of changed data held for one watching connection.
    pub notify_queue_bytes: usize,
    /// Identity salt.
    pub identity_key: IdentityKey,
    /// Where snapshots live (`None`: in memory only).
    pub data_dir: Option<PathBuf>,
    /// Where /metrics is served (`None`: nowhere).
    pub metrics_listen: Option<SocketAddr>,
    /// Redis Cluster instead of the embedded store (`None`: embedded).
    pub cluster: Option<crate::cluster::ClusterOptions>,
    /// Periodic snapshots (`None`: only at shutdown and on request).
    pub snapshot_interval: Option<Duration>,
}

/// A configuration error, reported before the server starts.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// An out-of-range value.
    #[error("{0}")]
    Invalid(String),
    /// The identity key file could not be read or created.
    #[error("identity key file {path}: {source}")]
    KeyFile {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

impl ServerConfig {
    /// Defaults for everything, listening on `listen` (port 0 picks a free port).
    pub fn new(listen: SocketAddr) -> ServerConfig {
        let args = Args::parse_from(["netswap-server", "--listen", &listen.to_string()]);
        ServerConfig::from_args(&args).expect("defaults are valid")
    }

    /// Resolves and validates command-line arguments.
    pub fn from_args(a: &Args) -> Result<ServerConfig, ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if a.max_record_bytes > MAX_MESSAGE {
            return invalid(format!(
                "--max-record-bytes {} is over {MAX_MESSAGE}, the largest message (a record must fit one reply)",
                a.max_record_bytes
            ));
        }
        let max_message = a.max_message_bytes.unwrap_or(a.max_record_bytes + 16);
        if max_message > MAX_MESSAGE {
            return invalid(format!(
                "--max-message-bytes {max_message} is over {MAX_MESSAGE}, the largest message"
            ));
        }
        if a.max_connections_per_ip == 0 || a.max_partial_messages == 0 || a.notify_queue == 0 {
            return invalid(
                "--max-connections-per-ip, --max-partial-messages and --notify-queue must be at least 1"
                    .into(),
            );
        }
        if a.receive_buffer > MAX_RECEIVE_BUFFER {
            return invalid(format!(
                "--receive-buffer {} is over {MAX_RECEIVE_BUFFER} (1 GiB)",
                a.receive_buffer
            ));
        }
        let cluster = match a.store.as_str() {
            "memory" => None,
            url => {
                let mut o =
                    crate::cluster::ClusterOptions::parse(url).map_err(ConfigError::Invalid)?;
                o.lease_ttl = Duration::from_secs(a.lease_ttl.max(1));
                o.wait_replicas = a.redis_wait_replicas;
                o.max_in_flight = a.redis_max_in_flight;
                o.state_cache = a.redis_state_cache;
                o.read_cache = a.redis_read_cache;
                o.max_reply_bytes = a.redis_max_reply_bytes.max(1 << 20);
                o.batch = a.redis_batch;
                o.unsubscribe_after = Duration::from_secs(a.redis_unsubscribe_after);
                if a.redis_prefix.is_empty() || a.redis_prefix.contains(['{', '}']) {
                    return invalid("--redis-prefix must be non-empty and hold no braces".into());
                }
                o.prefix = a.redis_prefix.clone();
                if let Some(tls) = o.tls.as_mut() {
                    let files = crate::cluster::TlsFiles {
                        ca: a.redis_tls_ca.clone(),
                        client: match (&a.redis_tls_cert, &a.redis_tls_key) {
                            (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
                            (None, None) => None,
                            _ => {
                                return invalid(
                                    "--redis-tls-cert and --redis-tls-key go together".into(),
                                );
                            }
                        },
                    };
                    (tls.ca, tls.client) = files.read().map_err(ConfigError::Invalid)?;
                    tls.files = (files != Default::default()).then_some(files);
                }
                Some(o)
            }
        };
        let tls_flags =
            a.redis_tls_ca.is_some() || a.redis_tls_cert.is_some() || a.redis_tls_key.is_some();
        if tls_flags && cluster.as_ref().is_none_or(|c| c.tls.is_none()) {
            return invalid(
                "--redis-tls-ca, --redis-tls-cert and --redis-tls-key are for --store rediss-cluster://... (TLS)"
                    .into(),
            );
        }
        if cluster.is_some() && a.identity_key.is_none() {
            return invalid(
                "--store redis-cluster://... needs --identity-key FILE, the same file on every gateway: identities are the hash of the key and the address, so gateways with different keys would see every client as someone else"
                    .into(),
            );
        }
        if cluster.is_some() && a.data_dir.is_some() {
            return invalid(
                "--data-dir is for the embedded store; with Redis Cluster, durability comes from Redis (AOF, replicas)"
                    .into(),
            );
        }
        if a.data_dir.is_some() && a.identity_key.is_none() {
            return invalid(
                "--data-dir needs --identity-key FILE: without the same key after a restart, every address would map to another identity and no owner could use its records"
                    .into(),
            );
        }
        let identity_key = match &a.identity_key {
            Some(path) => load_or_create_key(path).map_err(|source| ConfigError::KeyFile {
                path: path.clone(),
                source,
            })?,
            None => {
                let mut k = [0u8; 32];
                rand::rng().fill_bytes(&mut k);
                IdentityKey::new(k)
            }
        };
        let max_total_partial_bytes = a
            .max_total_partial_bytes
            .unwrap_or(1 << 30)
            .max(2 * max_message);
        Ok(ServerConfig {
            listen: a.listen,
            store: StoreConfig {
                max_record_bytes: a.max_record_bytes,
                max_message_bytes: max_message,
                quota_records: a.quota_records,
                quota_bytes: a.quota_bytes,
                orphan_grace: Duration::from_secs(a.orphan_grace),
                max_watches_per_connection: a.max_watches,
                shards: a.shards,
            },
            reassembly: ReassemblyLimits {
                max_message_bytes: max_message,
                max_partial_messages: a.max_partial_messages,
                max_partial_bytes: a
                    .max_partial_bytes
                    .unwrap_or(2 * max_message)
                    .max(netswap_proto::MAX_PAYLOAD as u64 * 2),
            },
            max_total_partial_bytes,
            max_partial_bytes_per_ip: a
                .max_partial_bytes_per_ip
                .unwrap_or(max_total_partial_bytes / 4)
                .max(2 * max_message)
                .min(max_total_partial_bytes),
            max_misses_per_second: a.max_misses_per_second,
            max_connections_per_ip: a.max_connections_per_ip,
            idle_timeout: (a.idle_timeout > 0).then(|| Duration::from_secs(a.idle_timeout)),
            stall_timeout: Duration::from_secs(a.stall_timeout.max(1)),
            max_output_bytes: a.max_output_bytes.max(64 * 1024),
            receive_buffer: (a.receive_buffer > 0).then_some(a.receive_buffer),
            notify_queue: a.notify_queue,
            notify_queue_bytes: a.notify_queue_bytes,
            identity_key,
            data_dir: a.data_dir.clone(),
            metrics_listen: a.metrics_listen,
            cluster,
            snapshot_interval: (a.snapshot_interval > 0)
                .then(|| Duration::from_secs(a.snapshot_interval)),
        })
    }
}

fn load_or_create_key(path: &Path) -> std::io::Result<IdentityKey> {
    match std::fs::read(path) {
        Ok(bytes) if bytes.is_empty() => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "the key file is empty",
        )),
        Ok(bytes) => Ok(IdentityKey::new(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut k = [0u8; 32];
            rand::rng().fill_bytes(&mut k);
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
            let mut f = opts.open(path)?;
            f.write_all(&k)?;
            f.sync_all()?;
            Ok(IdentityKey::new(k))
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_protocol() {
        let c = ServerConfig::new("127.0.0.1:0".parse().unwrap());
        assert_eq!(c.store.max_record_bytes, 67_108_864);
        assert_eq!(c.store.max_message_bytes, 67_108_880);
        assert_eq!(c.store.quota_records, 1_000_000);
        assert_eq!(c.store.quota_bytes, 1 << 30);
        assert_eq!(c.store.orphan_grace, Duration::from_secs(300));
        assert_eq!(c.max_connections_per_ip, 256);
        assert_eq!(c.idle_timeout, None);
        assert_eq!(c.receive_buffer, None, "the kernel's autotuning");
        let a = Args::parse_from(["x", "--receive-buffer", "524288"]);
        assert_eq!(
            ServerConfig::from_args(&a).unwrap().receive_buffer,
            Some(524_288)
        );
        let a = Args::parse_from(["x", "--receive-buffer", "1073741825"]);
        let e = ServerConfig::from_args(&a).unwrap_err().to_string();
        assert!(e.contains("--receive-buffer 1073741825 is over"), "{e}");
    }

    #[test]
    fn tls_flags_need_a_tls_store_and_readable_files() {
        let err = |args: &[&str]| {
            let a = Args::parse_from([&["x"], args].concat());
            ServerConfig::from_args(&a).unwrap_err().to_string()
        };
        let e = err(&["--redis-tls-ca", "/etc/hostname"]);
        assert!(e.contains("are for --store rediss-cluster://"), "{e}");
        let e = err(&[
            "--store",
            "redis-cluster://a:1",
            "--redis-tls-ca",
            "/etc/hostname",
        ]);
        assert!(e.contains("are for --store rediss-cluster://"), "{e}");
        let tls = ["--store", "rediss-cluster://a:1"];
        let e = err(&[&tls[..], &["--redis-tls-cert", "/etc/hostname"]].concat());
        assert!(e.contains("go together"), "{e}");
        let junk = std::env::temp_dir().join(format!("netswap-not-pem-{}", std::process::id()));
        std::fs::write(&junk, "not a certificate\n").unwrap();
        let junk_path = junk.display().to_string();
        for flags in [
            vec!["--redis-tls-ca", &junk_path],
            vec![
                "--redis-tls-cert",
                &junk_path,
                "--redis-tls-key",
                &junk_path,
            ],
        ] {
            let e = err(&[&tls[..], &flags].concat());
            assert!(e.contains("no PEM certificate in it"), "{flags:?}: {e}");
        }
        let _ = std::fs::remove_file(&junk);
        let e = err(&[&tls[..], &["--redis-tls-ca", "/nonexistent/ca.crt"]].concat());
        assert!(
            e.contains("--redis-tls-ca /nonexistent/ca.crt: No such file"),
            "{e}"
        );
    }

    #[test]
    fn record_limit_is_capped_by_the_largest_message() {
        let a = Args::parse_from(["x", "--max-record-bytes", "91095041"]);
        assert!(ServerConfig::from_args(&a).is_err());
        let a = Args::parse_from([
            "x",
            "--max-record-bytes",
            "91095040",
            "--max-message-bytes",
            "91095040",
        ]);
        assert!(ServerConfig::from_args(&a).is_ok());
    }

    #[test]
    fn key_file_is_created_then_reused() {
        let dir = std::env::temp_dir().join(format!("netswap-key-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let k1 = load_or_create_key(&dir).unwrap();
        assert_eq!(k1.as_bytes().len(), 32);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let k2 = load_or_create_key(&dir).unwrap();
        assert_eq!(k1, k2);
        std::fs::write(&dir, b"").unwrap();
        assert!(load_or_create_key(&dir).is_err());
        std::fs::remove_file(&dir).unwrap();
    }
}
