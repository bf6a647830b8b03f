//! `netswap-bench`: a load generator for netswap servers, like `redis-benchmark`.
//!
//! It costs the machine little per request: each thread runs one single-threaded
//! runtime, each connection is one task that keeps `--pipeline` requests in flight
//! with pre-encoded frames (no task or allocation per request), replies are matched by
//! XID (one XID per pipeline slot), and latencies go into an `hdrhistogram`.
//!
//! Modes: `load` (throughput and latency), `fill` (many records, memory per record),
//! `idle` (many idle connections, memory per connection), `hol` (latency of small reads
//! on a connection that carries a huge transfer), `sync` (many watchers keeping a copy
//! of one record: notify + READ, data watches, or Redis's SETRANGE + PUBLISH + GET),
//! `ceiling` (a server that only frames replies, to compare netswap-server with).
//! `load --protocol memcached|resp|resp-cluster` measures memcached, Redis and a Redis
//! Cluster with the same client design.

mod ceiling;
mod kv;
mod sync;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use clap::{Parser, Subcommand, ValueEnum};
use hdrhistogram::Histogram;
use netswap_client::raw;
use netswap_client::{Access, Client, Options, Pointer};
use netswap_proto::{
    Inbound, MAX_MESSAGE, OutQueue, Reassembler, ReassemblyLimits, Receiver, Request, Status,
    WriteBuf,
};
use rand::SeedableRng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;

/// Load generator for netswap servers (and, for comparison, Redis): throughput and
/// latency percentiles, memory per record and per connection, head-of-line blocking,
/// state sync by watches.
#[derive(Parser, Debug)]
#[command(name = "netswap-bench", version)]
struct Cli {
    /// Server address.
    #[arg(
        long,
        short = 's',
        env = "NETSWAP_SERVER",
        default_value = "127.0.0.1:7420",
        global = true
    )]
    server: SocketAddr,
    /// Print one JSON object instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// The server's process id, to report its resident memory and, under load, its CPU
    /// time per operation (Linux /proc).
    #[arg(long, global = true)]
    server_pid: Option<u32>,
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum Op {
    /// READ whole records.
    Read,
    /// REPLACE whole records.
    Replace,
    /// WRITE_AT offset 0 (same size: no growth).
    WriteAt,
    /// CREATE a record, then DELETE it (two operations).
    CreateDelete,
}

#[derive(Subcommand, Debug)]
enum Mode {
    /// Throughput and latency of one operation.
    Load(LoadArgs),
    /// Create records and report the server's memory per record.
    Fill {
        /// Records to create.
        #[arg(long, default_value_t = 1_000_000)]
        records: u64,
        /// Value size in bytes.
        #[arg(long, short = 'd', default_value_t = 64)]
        size: usize,
        /// Connections (each from its own 127.0.0.x address, so quotas are per address).
        #[arg(long, short = 'c', default_value_t = 4)]
        connections: usize,
        /// Requests in flight per connection.
        #[arg(long, short = 'P', default_value_t = 64)]
        pipeline: usize,
    },
    /// Open many connections, say HELLO, hold them idle, report memory per connection.
    Idle {
        /// Connections (spread over 127.0.x.y source addresses, --per-address each).
        #[arg(long, short = 'c', default_value_t = 10_000)]
        connections: usize,
        /// Seconds to hold them.
        #[arg(long, default_value_t = 2.0)]
        hold: f64,
        /// Connections per source address, i.e. per identity (1: as many identities as
        /// connections, as from many players or an attacker's many addresses).
        #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..))]
        per_address: u32,
    },
    /// Many watchers keep an exact copy of one record that a writer changes at a tick
    /// rate: bytes on the wire per update and the time until every copy has it.
    Sync {
        /// How the copies are kept.
        #[arg(long, value_enum, default_value = "delta")]
        how: sync::How,
        /// Watchers (each its own connection; two for Redis).
        #[arg(long, short = 'w', default_value_t = 50)]
        watchers: usize,
        /// The record's size.
        #[arg(long, short = 'd', default_value_t = 4096)]
        size: usize,
        /// Bytes each update changes, at a random offset.
        #[arg(long, default_value_t = 64)]
        change: usize,
        /// Updates per second.
        #[arg(long, default_value_t = 60.0)]
        rate: f64,
        /// Updates in all.
        #[arg(long, default_value_t = 600)]
        updates: u64,
        /// Minimum interval of the watches in ms (netswap only; 0 = every change).
        #[arg(long, default_value_t = 0)]
        interval: u32,
        /// The Redis server for --how redis.
        #[arg(long, default_value = "127.0.0.1:6379")]
        redis: SocketAddr,
    },
    /// Serve as the framing-only ceiling: a server that reads, reassembles and writes
    /// like netswap-server but keeps no records (every READ gets the same value).
    Ceiling {
        /// Where to listen (port 0: any free one; the address is printed).
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// Size of the value every READ gets.
        #[arg(long, short = 'd', default_value_t = 64)]
        size: usize,
        /// Worker threads (1: a single-threaded runtime, as netswap-server --threads 1).
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
    /// Latency of small reads on one connection while it carries a huge transfer.
    Hol {
        /// Size of the large record.
        #[arg(long, default_value_t = 64 << 20)]
        big: usize,
        /// Direction of the large transfer.
        #[arg(long, value_enum, default_value = "write")]
        direction: Direction,
        /// Small reads issued one after another during the transfer.
        #[arg(long, default_value_t = 200)]
        reads: usize,
        /// The client socket's receive buffer in bytes (the client's
        /// `Options::receive_buffer`; 0 = the kernel's autotuning).
        #[arg(long, default_value_t = 0)]
        receive_buffer: u32,
    },
}

/// What `load` runs.
#[derive(clap::Args, Debug)]
struct LoadArgs {
    /// Connections.
    #[arg(long, short = 'c', default_value_t = 50)]
    connections: usize,
    /// Requests in flight per connection.
    #[arg(long, short = 'P', default_value_t = 1)]
    pipeline: usize,
    /// Value size in bytes.
    #[arg(long, short = 'd', default_value_t = 64)]
    size: usize,
    /// The operation.
    #[arg(long, value_enum, default_value = "read")]
    op: Op,
    /// Records created beforehand and used at random.
    #[arg(long, default_value_t = 10_000)]
    keys: usize,
    /// Pick records by Zipf's law with this exponent instead of evenly: the k-th most
    /// requested record gets a share proportional to 1/k^S (0.99: the hot set of a
    /// typical cache workload; 0: even). The same for every protocol.
    #[arg(long, value_name = "S")]
    zipf: Option<f64>,
    /// Use this existing record instead of creating `--keys` (repeat for several):
    /// e.g. one record written by load generators on several gateways at once.
    /// Its access bits must allow the operation.
    #[arg(long = "record", value_name = "POINTER")]
    records: Vec<Pointer>,
    /// Seconds to run (ignored with --requests).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Stop after this many requests in total instead.
    #[arg(long, short = 'n')]
    requests: Option<u64>,
    /// Threads, each with its own runtime and share of the connections.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Speak memcached's binary protocol or Redis's RESP instead (GET/SET on keys
    /// "key:%012d", preloaded), to measure those servers with the same client design.
    #[arg(long, value_enum, default_value = "netswap")]
    protocol: Protocol,
    /// With --protocol resp or resp-cluster: how keys hold values, and so what a
    /// write is (`versioned-*`: a hash of the value and a version, the version
    /// raised with each write, atomically, as a netswap REPLACE does).
    #[arg(long, value_enum, default_value = "plain")]
    resp_layout: kv::RespLayout,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum Protocol {
    /// netswap v1.
    Netswap,
    /// memcached's binary protocol (read = GET, replace/write-at = SET).
    Memcached,
    /// Redis's RESP (read = GET, replace/write-at = SET).
    Resp,
    /// Redis's RESP on a Redis Cluster (`--server` is any node): each connection
    /// talks to one primary (connections go round them) with the keys in its slots,
    /// as `redis-benchmark --cluster` does.
    RespCluster,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum Direction {
    /// The large record is being written (REPLACE).
    Write,
    /// The large record is being read.
    Read,
}

/// A single-threaded runtime: the load generator must cost the machine little.
fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
}

fn rss_kib(pid: Option<u32>) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid?)).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// CPU time (user + system, all threads, exited ones included) the process `pid` has
/// used so far, from `/proc/PID/stat`; `None` where that is not readable.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; the fields after it start at
    // `state` (field 3), so utime and stime (fields 14 and 15) are at 11 and 12.
    let mut rest = stat
        .get(stat.rfind(')')? + 1..)?
        .split_whitespace()
        .skip(11);
    let ticks = rest.next()?.parse::<u64>().ok()? + rest.next()?.parse::<u64>().ok()?;
    Some(ticks as f64 / clock_ticks_per_second()?)
}

#[cfg(unix)]
fn clock_ticks_per_second() -> Option<f64> {
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then_some(hz as f64)
}

#[cfg(not(unix))]
fn clock_ticks_per_second() -> Option<f64> {
    None
}

/// CPU time used by the server (`--server-pid`) and by this load generator over one
/// measured window: where each side's time goes tells which of them bounds a rate
/// when both share the machine (docs/BENCHMARKS.md).
struct CpuWindow {
    server: Option<(u32, f64)>,
    own: Option<f64>,
}

impl CpuWindow {
    fn start(server_pid: Option<u32>) -> CpuWindow {
        CpuWindow {
            server: server_pid.and_then(|p| Some((p, cpu_seconds(p)?))),
            own: cpu_seconds(std::process::id()),
        }
    }

    /// CPU seconds since `start`: (server, load generator).
    fn finish(&self) -> (Option<f64>, Option<f64>) {
        let server = self.server.and_then(|(p, t0)| Some(cpu_seconds(p)? - t0));
        let own = self
            .own
            .and_then(|t0| Some(cpu_seconds(std::process::id())? - t0));
        (server, own)
    }
}

fn loopback(n: usize) -> IpAddr {
    // 127.0.0.2 … 127.0.0.254, then 127.0.1.2 …
    let n = n as u32;
    IpAddr::from([127, 0, (n / 253) as u8, (n % 253 + 2) as u8])
}

async fn raw_connect(
    server: SocketAddr,
    from: Option<IpAddr>,
) -> std::io::Result<tokio::net::TcpStream> {
    let sock = if server.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = from {
        sock.bind(SocketAddr::new(ip, 0))?;
    }
    let s = sock.connect(server).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// What one connection measured.
struct Tally {
    ops: u64,
    errors: u64,
    bytes: u64,
    hist: Histogram<u64>,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            ops: 0,
            errors: 0,
            bytes: 0,
            hist: Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("histogram"),
        }
    }
}

/// Which of `keys` records a request names: spread evenly over them, or by Zipf's
/// law (`--zipf`), where the first records are the hottest.
#[derive(Clone)]
struct Picker {
    keys: usize,
    zipf: Option<rand_distr::Zipf<f64>>,
}

impl Picker {
    fn new(keys: usize, zipf: Option<f64>) -> Picker {
        let keys = keys.max(1);
        Picker {
            keys,
            zipf: zipf.map(|s| {
                rand_distr::Zipf::new(keys as f64, s).expect("checked when the run was set up")
            }),
        }
    }

    /// The record of request number `n` (0-based, below `keys`).
    fn pick(&self, n: u64) -> usize {
        match &self.zipf {
            None => (n.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 20) as usize % self.keys,
            Some(z) => {
                // Seeded by the request's number: a run names the same records each
                // time, as the even spread does.
                let mut rng = rand::rngs::SmallRng::seed_from_u64(n);
                let rank: f64 = rand_distr::Distribution::sample(z, &mut rng);
                (rank as usize).clamp(1, self.keys) - 1
            }
        }
    }
}

struct LoadSpec {
    server: SocketAddr,
    op: Op,
    pipeline: usize,
    keys: Arc<Vec<Pointer>>,
    /// `--zipf`: the exponent records are picked by (`None`: evenly).
    zipf: Option<f64>,
    /// Picks among `keys`.
    picker: Picker,
    value: Bytes,
    stop: Arc<AtomicBool>,
    budget: Arc<AtomicU64>,
    deadline: Instant,
}

impl LoadSpec {
    /// Takes one request from the shared budget, unless the run is over.
    fn take(&self) -> bool {
        !self.stop.load(Ordering::Relaxed)
            && self
                .budget
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| b.checked_sub(1))
                .is_ok()
    }
}

fn request(spec: &LoadSpec, n: u64, created: Option<Pointer>) -> Request {
    let ptr = spec.keys[spec.picker.pick(n)];
    match (spec.op, created) {
        (Op::Read, _) => Request::Read { ptr, range: None },
        (Op::Replace, _) => Request::Replace {
            ptr,
            data: spec.value.clone(),
        },
        (Op::WriteAt, _) => Request::WriteAt {
            ptr,
            offset: 0,
            data: spec.value.clone(),
        },
        (Op::CreateDelete, None) => Request::Create {
            access: Access::empty(),
            data: spec.value.clone(),
        },
        (Op::CreateDelete, Some(ptr)) => Request::Delete { ptr },
    }
}

/// Reads more replies into `rbuf` (counting the bytes) and ends the run at the
/// deadline; the server closing the connection is an error. Returns the time of the read.
async fn read_more(
    stream: &mut tokio::net::TcpStream,
    rbuf: &mut BytesMut,
    tally: &mut Tally,
    spec: &LoadSpec,
) -> std::io::Result<Instant> {
    if rbuf.capacity() - rbuf.len() < 16 * 1024 {
        rbuf.reserve(256 * 1024);
    }
    let n = stream.read_buf(rbuf).await?;
    after_read(n, tally, spec)
}

/// Counts a read of `n` bytes (0: the server closed) and stops the run at its deadline.
fn after_read(n: usize, tally: &mut Tally, spec: &LoadSpec) -> std::io::Result<Instant> {
    if n == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the server closed the connection",
        ));
    }
    tally.bytes += n as u64;
    let now = Instant::now();
    if now >= spec.deadline {
        spec.stop.store(true, Ordering::Relaxed);
    }
    Ok(now)
}

/// Queues a request: a small one straight into the write buffer when nothing is
/// queued ahead of it (as the server does with small replies).
fn queue(outq: &mut OutQueue, wbuf: &mut WriteBuf, msg: netswap_proto::OutMessage) {
    if !(outq.is_empty() && wbuf.push_message(&msg)) {
        outq.push(msg).expect("requests fit the framing");
    }
}

/// One connection keeping `pipeline` requests in flight until the deadline or budget.
async fn drive(spec: Arc<LoadSpec>, conn_no: usize) -> std::io::Result<Tally> {
    let mut stream = raw_connect(spec.server, None).await?;
    let p = spec.pipeline;
    let mut sent_at = vec![Instant::now(); p];
    let mut created: Vec<Option<Pointer>> = vec![None; p];
    let mut outq = OutQueue::new();
    // As the client library does: vectored writes, replies read into place.
    let mut wbuf = WriteBuf::new();
    let mut rx = Receiver::new(
        Reassembler::new(ReassemblyLimits {
            max_message_bytes: MAX_MESSAGE,
            max_partial_messages: usize::MAX,
            max_partial_bytes: u64::MAX,
        }),
        256 * 1024,
    );
    let mut tally = Tally::new();
    let mut counter = (conn_no as u64) << 40;
    let mut inflight = 0usize;
    for (slot, sent) in sent_at.iter_mut().enumerate() {
        if !spec.take() {
            break;
        }
        counter += 1;
        queue(
            &mut outq,
            &mut wbuf,
            request(&spec, counter, None).encode(slot as u32),
        );
        *sent = Instant::now();
        inflight += 1;
    }
    loop {
        raw::write_frames(&mut stream, &mut wbuf, raw::MAX_CLIENT_WRITE, |b| {
            let before = b.len();
            b.fill(&mut outq, raw::WRITE_CHUNK);
            tally.bytes += (b.len() - before) as u64;
        })
        .await?;
        if inflight == 0 {
            break;
        }
        let n = netswap_client::raw::read_frames(&stream, &mut rx).await?;
        let now = after_read(n, &mut tally, &spec)?;
        while let Some(m) = rx
            .next_inbound()
            .map_err(|e| std::io::Error::other(e.error))?
        {
            let Inbound::Message(m) = m else {
                continue;
            };
            let slot = m.xid as usize;
            inflight -= 1;
            tally.ops += 1;
            let _ = tally
                .hist
                .record((now - sent_at[slot]).as_nanos().max(1) as u64);
            let mut next_created = None;
            if m.op == Status::Ok as u8 || m.op == Status::Data as u8 {
                if spec.op == Op::CreateDelete && created[slot].is_none() && m.payload.len() == 8 {
                    next_created =
                        Pointer::new(u64::from_be_bytes(m.payload[..8].try_into().unwrap()));
                }
            } else {
                tally.errors += 1;
            }
            created[slot] = next_created;
            // A created record is always deleted, even past the deadline.
            if next_created.is_some() || spec.take() {
                counter += 1;
                queue(
                    &mut outq,
                    &mut wbuf,
                    request(&spec, counter, next_created).encode(slot as u32),
                );
                sent_at[slot] = Instant::now();
                inflight += 1;
            }
        }
    }
    Ok(tally)
}

fn quantile_us(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

fn load(cli: &Cli, args: &LoadArgs) -> Result<(), String> {
    let &LoadArgs {
        connections,
        pipeline,
        size,
        op,
        keys,
        zipf,
        ref records,
        duration,
        requests,
        threads,
        protocol,
        resp_layout,
    } = args;
    let pipeline = pipeline.max(1);
    if let Some(s) = zipf
        && !(s.is_finite() && s >= 0.0)
    {
        return Err(format!("--zipf wants an exponent of 0 or more, not {s}"));
    }
    let records = records.clone();
    let rt = runtime()?;
    let value = Bytes::from(vec![0x5Au8; size]);
    if !records.is_empty() && (protocol != Protocol::Netswap || op == Op::CreateDelete) {
        return Err(
            "--record goes with --protocol netswap and --op read, replace or write-at".into(),
        );
    }
    if protocol != Protocol::Netswap && op == Op::CreateDelete {
        return Err(format!(
            "--protocol {protocol:?} supports read, replace and write-at"
        ));
    }
    let resp = matches!(protocol, Protocol::Resp | Protocol::RespCluster);
    if !resp && resp_layout != kv::RespLayout::Plain {
        return Err("--resp-layout goes with --protocol resp or resp-cluster".into());
    }
    let mut targets = match protocol {
        Protocol::Resp => Some(kv::RespTargets::single(
            cli.server,
            keys.max(1),
            resp_layout,
        )),
        Protocol::RespCluster => Some(
            rt.block_on(kv::RespTargets::cluster(
                cli.server,
                keys.max(1),
                resp_layout,
            ))
            .map_err(|e| format!("cannot read the cluster's slots from {}: {e}", cli.server))?,
        ),
        _ => None,
    };
    let preloaded = match (&mut targets, protocol) {
        (Some(t), _) => rt.block_on(kv::resp_preload(t, &value)),
        (None, Protocol::Memcached) => rt.block_on(kv::mc_preload(cli.server, keys.max(1), &value)),
        (None, _) => Ok(()),
    };
    preloaded.map_err(|e| format!("cannot preload the keys: {e}"))?;
    let targets =
        Arc::new(targets.unwrap_or_else(|| kv::RespTargets::single(cli.server, 1, resp_layout)));
    // Records every connection may read and write (same identity or not).
    let ptrs = rt.block_on(async {
        if protocol != Protocol::Netswap {
            // Keys are "key:%012d" for 0..keys; the pointers only count them.
            return Ok((
                None,
                (1..=keys.max(1) as u64)
                    .map(|k| Pointer::new(k).unwrap())
                    .collect(),
            ));
        }
        if !records.is_empty() {
            return Ok((None, records));
        }
        let c = Client::connect_with(cli.server, Options::default()).await?;
        let mut ptrs = Vec::with_capacity(keys.max(1));
        let mut pending = Vec::new();
        for _ in 0..keys.max(1) {
            let c = c.clone();
            let v = value.clone();
            pending.push(tokio::spawn(async move {
                c.create(Access::READ | Access::WRITE, v).await
            }));
            if pending.len() == 256 {
                for p in pending.drain(..) {
                    ptrs.push(p.await.unwrap()?);
                }
            }
        }
        for p in pending {
            ptrs.push(p.await.unwrap()?);
        }
        Ok::<_, netswap_client::Error>((Some(c), ptrs))
    });
    let (keeper, ptrs) = ptrs.map_err(|e| format!("cannot prepare records: {e}"))?;
    let rss_before = rss_kib(cli.server_pid);
    let cpu = CpuWindow::start(cli.server_pid);
    let started = Instant::now();
    let spec = Arc::new(LoadSpec {
        server: cli.server,
        op,
        pipeline,
        picker: Picker::new(ptrs.len(), zipf),
        keys: Arc::new(ptrs),
        zipf,
        value,
        stop: Arc::new(AtomicBool::new(false)),
        budget: Arc::new(AtomicU64::new(requests.unwrap_or(u64::MAX))),
        deadline: if requests.is_some() {
            started + Duration::from_secs(3600)
        } else {
            started + Duration::from_secs_f64(duration)
        },
    });
    let threads = threads.clamp(1, connections.max(1));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let spec = spec.clone();
            let targets = targets.clone();
            std::thread::spawn(move || {
                let rt = runtime().expect("a runtime");
                rt.block_on(async {
                    let mut tasks = Vec::new();
                    for c in (t..connections).step_by(threads) {
                        tasks.push(match protocol {
                            Protocol::Netswap => tokio::spawn(drive(spec.clone(), c)),
                            Protocol::Memcached => {
                                tokio::spawn(kv::drive_memcached(spec.clone(), c))
                            }
                            Protocol::Resp | Protocol::RespCluster => {
                                tokio::spawn(kv::drive_resp(spec.clone(), targets.clone(), c))
                            }
                        });
                    }
                    let mut out = Vec::new();
                    for task in tasks {
                        out.push(task.await.unwrap());
                    }
                    out
                })
            })
        })
        .collect();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).unwrap();
    let (mut ops, mut errors, mut bytes) = (0u64, 0u64, 0u64);
    for h in handles {
        for t in h.join().map_err(|_| "a load thread panicked")? {
            let t = t.map_err(|e| format!("connection failed: {e}"))?;
            ops += t.ops;
            errors += t.errors;
            bytes += t.bytes;
            hist.add(&t.hist).unwrap();
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let (server_cpu, own_cpu) = cpu.finish();
    let rss_after = rss_kib(cli.server_pid);
    drop(keeper);
    let ops_per_sec = ops as f64 / elapsed;
    // Microseconds of CPU per operation, and cores used on average.
    let per_op = |t: Option<f64>| t.map(|t| t * 1e6 / ops.max(1) as f64);
    let cores = |t: Option<f64>| t.map(|t| t / elapsed);
    let op_name = format!("{op:?}").to_lowercase();
    if cli.json {
        println!(
            "{}",
            serde_json::json!({
                "tool": "netswap-bench", "mode": "load", "protocol": protocol.to_possible_value().map(|v| v.get_name().to_string()),
                "resp_layout": resp.then(|| resp_layout.to_possible_value().map(|v| v.get_name().to_string())),
                "servers": targets.servers(),
                "op": op_name, "size": size,
                "connections": connections, "pipeline": pipeline, "threads": threads,
                "ops": ops, "errors": errors, "seconds": elapsed, "ops_per_sec": ops_per_sec,
                "p50_us": quantile_us(&hist, 0.5), "p99_us": quantile_us(&hist, 0.99),
                "p999_us": quantile_us(&hist, 0.999), "max_us": hist.max() as f64 / 1000.0,
                "wire_bytes_per_op": bytes as f64 / ops.max(1) as f64,
                "server_rss_kib_before": rss_before, "server_rss_kib_after": rss_after,
                "server_cpu_us_per_op": per_op(server_cpu), "server_cores": cores(server_cpu),
                "client_cpu_us_per_op": per_op(own_cpu), "client_cores": cores(own_cpu),
            })
        );
    } else {
        println!(
            "{op_name} {size} B, {connections} connections, pipeline {pipeline}, {threads} thread(s)"
        );
        println!("  {ops} ops in {elapsed:.2} s: {ops_per_sec:.0} ops/s, {errors} errors");
        println!(
            "  latency p50 {:.1} us, p99 {:.1} us, p99.9 {:.1} us, max {:.1} us",
            quantile_us(&hist, 0.5),
            quantile_us(&hist, 0.99),
            quantile_us(&hist, 0.999),
            hist.max() as f64 / 1000.0
        );
        println!(
            "  {:.1} bytes on the wire per op (both directions, headers included)",
            bytes as f64 / ops.max(1) as f64
        );
        if let (Some(us), Some(c)) = (per_op(server_cpu), cores(server_cpu)) {
            println!("  server CPU {us:.2} us per op ({c:.2} cores)");
        }
        if let (Some(us), Some(c)) = (per_op(own_cpu), cores(own_cpu)) {
            println!("  load generator CPU {us:.2} us per op ({c:.2} cores)");
        }
    }
    if errors > 0 {
        return Err(format!("{errors} requests failed"));
    }
    Ok(())
}

fn fill(
    cli: &Cli,
    records: u64,
    size: usize,
    connections: usize,
    pipeline: usize,
) -> Result<(), String> {
    let rt = runtime()?;
    let before = rss_kib(cli.server_pid);
    let started = Instant::now();
    let value = Bytes::from(vec![0xA5u8; size]);
    let created = rt.block_on(async {
        let per = records.div_ceil(connections as u64);
        let mut tasks = Vec::new();
        for c in 0..connections {
            let value = value.clone();
            let server = cli.server;
            let n = per.min(records.saturating_sub(per * c as u64));
            tasks.push(tokio::spawn(async move {
                let client = Client::connect_with(
                    server,
                    Options {
                        local_addr: Some(loopback(c)),
                        ..Options::default()
                    },
                )
                .await?;
                let mut done = 0u64;
                let mut pending = std::collections::VecDeque::new();
                while done < n {
                    while pending.len() < pipeline && done + (pending.len() as u64) < n {
                        let c = client.clone();
                        let v = value.clone();
                        pending.push_back(tokio::spawn(
                            async move { c.create(Access::READ, v).await },
                        ));
                    }
                    pending.pop_front().unwrap().await.unwrap()?;
                    done += 1;
                }
                // Keep the records: the connection stays open until all are counted.
                Ok::<_, netswap_client::Error>((client, done))
            }));
        }
        let mut keep = Vec::new();
        let mut total = 0;
        for t in tasks {
            let (c, n) = t.await.unwrap()?;
            total += n;
            keep.push(c);
        }
        let after = rss_kib(cli.server_pid);
        Ok::<_, netswap_client::Error>((total, after, keep))
    });
    let (total, after, _keep) = created.map_err(|e| format!("fill failed: {e}"))?;
    let secs = started.elapsed().as_secs_f64();
    let per_record = match (before, after) {
        (Some(b), Some(a)) => Some((a.saturating_sub(b) * 1024) as f64 / total as f64),
        _ => None,
    };
    if cli.json {
        println!(
            "{}",
            serde_json::json!({"tool": "netswap-bench", "mode": "fill", "records": total, "size": size,
                "seconds": secs, "records_per_sec": total as f64 / secs,
                "server_rss_kib_before": before, "server_rss_kib_after": after,
                "server_bytes_per_record": per_record})
        );
    } else {
        println!(
            "created {total} records of {size} B in {secs:.2} s ({:.0}/s)",
            total as f64 / secs
        );
        if let Some(p) = per_record {
            println!(
                "server RSS {} KiB -> {} KiB: {p:.1} bytes per record",
                before.unwrap(),
                after.unwrap()
            );
        }
    }
    Ok(())
}

fn idle(cli: &Cli, connections: usize, hold: f64, per_address: usize) -> Result<(), String> {
    let rt = runtime()?;
    let before = rss_kib(cli.server_pid);
    let started = Instant::now();
    let result = rt.block_on(async {
        let mut open = Vec::with_capacity(connections);
        let hello = {
            let mut q = OutQueue::new();
            q.push(Request::Hello.encode(1)).unwrap();
            let mut b = BytesMut::new();
            q.write_to(&mut b, usize::MAX);
            b.freeze()
        };
        for i in 0..connections {
            let mut s = raw_connect(cli.server, Some(loopback(i / per_address)))
                .await
                .map_err(|e| format!("connection {i}: {e}"))?;
            s.write_all(&hello).await.map_err(|e| e.to_string())?;
            let mut reply = [0u8; 63];
            s.read_exact(&mut reply)
                .await
                .map_err(|e| format!("connection {i}: {e}"))?;
            open.push(s);
        }
        let opened = started.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_secs_f64(hold)).await;
        let during = rss_kib(cli.server_pid);
        // Every connection is still served.
        let mut alive = 0;
        for s in open.iter_mut().step_by((connections / 100).max(1)) {
            s.write_all(&hello).await.map_err(|e| e.to_string())?;
            let mut reply = [0u8; 63];
            if s.read_exact(&mut reply).await.is_ok() {
                alive += 1;
            }
        }
        Ok::<_, String>((opened, during, alive))
    });
    let (opened, during, alive) = result?;
    let per_conn = match (before, during) {
        (Some(b), Some(a)) => Some((a.saturating_sub(b) * 1024) as f64 / connections as f64),
        _ => None,
    };
    if cli.json {
        println!(
            "{}",
            serde_json::json!({"tool": "netswap-bench", "mode": "idle", "connections": connections,
                "addresses": connections.div_ceil(per_address),
                "open_seconds": opened, "server_rss_kib_before": before, "server_rss_kib_during": during,
                "server_bytes_per_connection": per_conn, "sampled_alive": alive})
        );
    } else {
        println!(
            "{connections} idle connections from {} addresses opened in {opened:.2} s; sampled {alive} still answering",
            connections.div_ceil(per_address)
        );
        if let Some(p) = per_conn {
            println!(
                "server RSS {} KiB -> {} KiB: {p:.0} bytes per idle connection",
                before.unwrap(),
                during.unwrap()
            );
        }
    }
    Ok(())
}

fn hol(
    cli: &Cli,
    big: usize,
    direction: Direction,
    reads: usize,
    receive_buffer: u32,
) -> Result<(), String> {
    let rt = runtime()?;
    rt.block_on(async {
        let options = Options {
            request_timeout: None,
            receive_buffer: (receive_buffer > 0).then_some(receive_buffer),
            ..Options::default()
        };
        let c = Client::connect_with(cli.server, options)
            .await
            .map_err(|e| e.to_string())?;
        let small = c.create(Access::empty(), vec![1u8; 64]).await.map_err(|e| e.to_string())?;
        let big_ptr = c.create(Access::empty(), vec![2u8; big]).await.map_err(|e| e.to_string())?;
        let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).unwrap();
        // Made before the clock starts and freed after it stops: filling 64 MiB inside
        // the transfer task held this single-threaded client for ~25 ms, and freeing
        // it ~2 ms, which the small reads then counted as the server's delay.
        let payload = Bytes::from(vec![3u8; big]);
        let transfer = {
            let c = c.clone();
            let payload = payload.clone();
            tokio::spawn(async move {
                let t = Instant::now();
                match direction {
                    Direction::Write => c.replace(big_ptr, payload).await.map(|_| ()),
                    Direction::Read => c.read(big_ptr).await.map(|_| ()),
                }
                .map(|_| t.elapsed())
            })
        };
        let mut during = 0;
        for _ in 0..reads {
            let t = Instant::now();
            c.read(small).await.map_err(|e| e.to_string())?;
            let _ = hist.record(t.elapsed().as_nanos() as u64);
            if !transfer.is_finished() {
                during += 1;
            }
        }
        let took = transfer.await.unwrap().map_err(|e| e.to_string())?;
        // Freed only now (unmapping 64 MiB takes this client milliseconds).
        drop(payload);
        let dir = format!("{direction:?}").to_lowercase();
        if cli.json {
            println!(
                "{}",
                serde_json::json!({"tool": "netswap-bench", "mode": "hol", "direction": dir, "big": big,
                    "transfer_seconds": took.as_secs_f64(), "small_reads": reads, "during_transfer": during,
                    "p50_us": quantile_us(&hist, 0.5), "p99_us": quantile_us(&hist, 0.99), "max_us": hist.max() as f64 / 1000.0})
            );
        } else {
            println!(
                "{dir} of {big} B took {:.1} ms; {during} of {reads} small reads ran during it",
                took.as_secs_f64() * 1000.0
            );
            println!(
                "  small read latency p50 {:.1} us, p99 {:.1} us, max {:.1} us",
                quantile_us(&hist, 0.5),
                quantile_us(&hist, 0.99),
                hist.max() as f64 / 1000.0
            );
        }
        Ok(())
    })
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.mode {
        Mode::Load(ref args) => load(&cli, args),
        Mode::Fill {
            records,
            size,
            connections,
            pipeline,
        } => fill(&cli, records, size, connections.max(1), pipeline.max(1)),
        Mode::Idle {
            connections,
            hold,
            per_address,
        } => idle(&cli, connections, hold, per_address as usize),
        Mode::Ceiling {
            listen,
            size,
            threads,
        } => ceiling::run(listen, size, threads),
        Mode::Hol {
            big,
            direction,
            reads,
            receive_buffer,
        } => hol(&cli, big, direction, reads, receive_buffer),
        Mode::Sync {
            how,
            watchers,
            size,
            change,
            rate,
            updates,
            interval,
            redis,
        } => sync::sync(
            sync::Spec {
                server: cli.server,
                redis,
                how,
                watchers: watchers.max(1),
                size,
                change,
                rate,
                updates,
                interval_ms: interval,
            },
            cli.json,
        ),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("netswap-bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Picker;

    /// The share of `n` picks that fall on the first `hot` of `keys` records.
    fn share(p: &Picker, hot: usize, n: u64) -> f64 {
        (0..n).filter(|&i| p.pick(i) < hot).count() as f64 / n as f64
    }

    #[test]
    fn the_even_picker_spreads_and_zipf_favours_the_first_records() {
        let (keys, n) = (100_000, 200_000);
        let even = Picker::new(keys, None);
        let zipf = Picker::new(keys, Some(0.99));
        assert!((0..n).all(|i| even.pick(i) < keys && zipf.pick(i) < keys));
        // Evenly: the first 1% get about 1%. By Zipf's law with 0.99: about
        // H(1000, 0.99) / H(100000, 0.99) = 0.63.
        let e = share(&even, keys / 100, n);
        let z = share(&zipf, keys / 100, n);
        assert!((0.008..0.012).contains(&e), "even: {e}");
        assert!((0.58..0.68).contains(&z), "zipf 0.99: {z}");
        // The same request names the same record every time.
        assert_eq!(zipf.pick(12_345), zipf.pick(12_345));
        // An exponent of 0 is even.
        let flat = share(&Picker::new(keys, Some(0.0)), keys / 100, n);
        assert!((0.008..0.012).contains(&flat), "zipf 0: {flat}");
    }
}
