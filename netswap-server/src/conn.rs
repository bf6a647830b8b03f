//! One client connection: a single task that reads many frames per read, applies the
//! complete requests to the store, and writes many frames per write.
//!
//! The loop is readiness-driven on one socket (no split halves, no per-request
//! tasks): after every read it processes every whole frame, queues the replies in the
//! fair [`OutQueue`], and writes optimistically, so a pipelining client costs one read
//! and one write syscall per batch. Backpressure: when a client does not read its
//! replies, the server stops reading its requests.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use netswap_proto::{
    Applied, ConnId, Event, Inbound, Notification, OutQueue, Pointer, RESERVED_XID, Reassembler,
    Receiver, Reply, Request, Session, Status, WatchConfig, WatchOptions, WriteBuf,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{Instant, sleep_until};
use tracing::{debug, info};

use crate::cluster::{Caller, ClusterSession, ClusterStore, Outcome, WatchChange};
use crate::hub::{Backend, Hub, Mailbox, NetKey};
use crate::metrics::Local;

/// Bytes reserved for each read.
const READ_CHUNK: usize = 64 * 1024;
/// Bytes of frames taken from the fair queue into the write buffer at a time, about one
/// write ([`netswap_proto::MAX_WRITE`]): a small reply queued during a large one waits
/// behind at most this much. With 256 KiB (when each `writev` took the whole buffer)
/// the p99 of a small read during a 64 MiB read rose from 1.7 to 2.4 ms once writes
/// were capped at 64,000 bytes, for no throughput (docs/BENCHMARKS.md).
const WRITE_CHUNK: usize = 64 * 1024;
/// Reads per turn before the connection yields to writes and to other connections:
/// with input always available, tokio's own budget would let one connection run for
/// over a hundred turns' worth (many MB of requests) while others wait.
const READS_PER_WAKE: usize = 2;
/// Large replies queued before the server stops reading a connection's requests.
const MAX_LARGE_REPLIES: usize = 4;
/// Passes of the event loop a connection of the cluster backend waits at most, while
/// requests of it are still in flight, to send the replies of those done with theirs
/// in one write (see [`Conn::run`]). Eight gathered as much as waiting until none
/// was left in flight (`sendto` per READ at pipeline 16: 0.13 with one pass, 0.065
/// with eight or up to 64), and bounds the wait behind a slow request (a commit
/// waiting for replicas, a node that does not answer) to a few passes.
const GATHER_PASSES: usize = 8;
/// How long a closing connection may take to flush its last replies.
const FLUSH_ON_CLOSE: Duration = Duration::from_secs(2);
/// How long input is drained after PROTOCOL_ERROR, so the peer can read the reason.
const LINGER: Duration = Duration::from_secs(1);

/// Why a connection ended.
#[derive(Debug)]
enum End {
    /// The peer closed and everything was answered.
    Eof,
    /// Framing broke: PROTOCOL_ERROR was sent.
    ProtocolError(String),
    /// No progress on a partial frame or message.
    Stalled,
    /// No traffic for the idle timeout.
    Idle,
    /// The server is shutting down.
    Shutdown,
    /// A socket error.
    Io(io::Error),
}

/// The connection's state in its store.
enum ConnSession {
    Memory(Session),
    Cluster(ClusterSession),
}

impl ConnSession {
    fn conn(&self) -> ConnId {
        match self {
            ConnSession::Memory(s) => s.conn(),
            ConnSession::Cluster(s) => s.conn(),
        }
    }
    fn identity(&self) -> &netswap_proto::Identity {
        match self {
            ConnSession::Memory(s) => s.identity(),
            ConnSession::Cluster(s) => s.identity(),
        }
    }
    fn watches(&self) -> &std::collections::HashMap<Pointer, u32> {
        match self {
            ConnSession::Memory(s) => s.watches(),
            ConnSession::Cluster(s) => s.watches(),
        }
    }
    fn watch_ended(&mut self, ptr: Pointer, xid: u32) {
        match self {
            ConnSession::Memory(s) => s.watch_ended(ptr, xid),
            ConnSession::Cluster(s) => s.watch_ended(ptr, xid),
        }
    }
}

/// A request being served by an asynchronous backend (see [`Finished`]).
type InFlight = Pin<Box<dyn Future<Output = Finished> + Send>>;

/// A request an asynchronous backend finished: its XID, record, opcode and arrival
/// (the read that brought it), and its outcome; and the writes of the same record
/// that were started with it (see [`Conn::finish`]), with theirs.
struct Finished {
    xid: u32,
    ptr: Option<Pointer>,
    started: (u8, std::time::Instant),
    outcome: Outcome,
    more: Vec<(u32, (u8, std::time::Instant), Outcome)>,
}
/// A request queued behind another on its record: XID, request, arrival.
type Queued = (u32, Request, std::time::Instant);

/// A READ in flight, and the READs that share its reply.
struct Sharing {
    /// The [`Conn::read`] it came in.
    read_pass: u64,
    /// Its range.
    range: Option<(u64, u32)>,
    /// The READs that share its reply: XID, arrival.
    followers: Vec<(u32, std::time::Instant)>,
}

/// Requests one connection may have in flight to an asynchronous backend (queued
/// ones included) before it stops reading more.
const MAX_IN_FLIGHT: usize = 1024;

/// Writes of one record a connection hands to the store together at most (the
/// store's group is as large: `cluster::MAX_GROUP`).
const MAX_WRITES_TOGETHER: usize = crate::cluster::MAX_GROUP;

/// How long after its last throttled lookup a connection on the cluster backend pays
/// the miss throttle for every lookup before sending it to Redis. There a miss is
/// known only when Redis answers, and a pipelining scanner has sent its next thousand
/// guesses by then: each throttle window that ended let a burst of lookups through,
/// and Redis answered every guess (118k a second), all of them but the rate answered
/// BUSY only afterwards (docs/RELIABILITY.md). On probation a lookup costs a token whether
/// or not it misses, so the network's lookups to Redis stay within the rate.
const PROBATION: Duration = Duration::from_secs(1);

struct Conn {
    hub: Arc<Hub>,
    /// With Redis Cluster: requests in flight, at most one per record at a time (the
    /// others wait in `waiting`, in arrival order), and the notifications of WATCHes
    /// still in flight (sent after their OK).
    in_flight: FuturesUnordered<InFlight>,
    /// The records with a request in flight, and for a READ started as it arrived,
    /// what READs of the record may share its reply (see [`Conn::submit`]).
    busy: std::collections::HashMap<Pointer, Option<Sharing>>,
    waiting: std::collections::HashMap<Pointer, std::collections::VecDeque<Queued>>,
    /// Requests waiting in `waiting`, READs sharing another's reply (`busy`), and
    /// the writes in `first_writes`.
    queued: usize,
    /// Writes that may be grouped, each the first request of its record in this
    /// batch with nothing in flight on the record: started at the end of the batch
    /// together with the groupable writes of the record that queued right behind
    /// them (`Conn::start_first_writes`). Their records are in `busy` meanwhile.
    first_writes: Vec<(Pointer, Queued)>,
    /// Whether the batch being applied names a record more than once: only then are
    /// writes held in `first_writes` (otherwise nothing can queue behind them).
    repeats: bool,
    /// The calls of [`Conn::read`] so far: which one a request came in.
    read_pass: u64,
    held: std::collections::HashMap<u32, Vec<Notification>>,
    /// WATCHes in flight: their record and the XID of the watch they replace.
    watches_starting: std::collections::HashMap<u32, (Pointer, Option<u32>)>,
    /// A PROTOCOL_ERROR waiting for the requests in flight before it.
    deferred: Option<(u32, Reply)>,
    /// Counts since the last flush to the hub's metrics.
    stats: Local,
    /// The network the peer's address belongs to (for the miss throttle).
    net: NetKey,
    /// Until when requests that name a pointer get BUSY: this network looked up too
    /// many pointers that do not exist.
    throttled_until: Option<std::time::Instant>,
    /// On the cluster backend, until when each request that names a pointer pays the
    /// miss throttle up front (see [`PROBATION`]).
    probation_until: Option<std::time::Instant>,
    /// Requests in flight that paid the miss throttle up front.
    prepaid: std::collections::HashSet<u32>,
    session: ConnSession,
    rx: Receiver,
    outq: OutQueue,
    wbuf: WriteBuf,
    /// Notifications from other connections' requests, once this one watches.
    mailbox: Option<Arc<Mailbox>>,
    /// Reused buffer for notifications taken from the mailbox.
    notes: Vec<Notification>,
    last_rx: Instant,
    last_io: Instant,
    eof: bool,
    /// "Now" for the store, read once per batch of frames.
    batch_now: std::time::Instant,
    /// Messages taken from `rx` to be handled together (reused; see `Conn::process`).
    batch: Vec<Pending>,
    /// The last READ answered from the embedded store returned a value held outside
    /// its record's slot, or the last REPLACE wrote one: the next batch's values are
    /// prefetched.
    large_values: bool,
    /// Set after a fatal condition: stop reading, flush, then end with this reason.
    closing: Option<End>,
    /// When a closing connection stops waiting for its peer to read.
    closing_deadline: Option<Instant>,
}

/// Messages handled together, at most: their records are loaded from memory together.
const BATCH: usize = 16;

/// A message taken from the receiver, to be handled in its turn.
enum Pending {
    Request {
        xid: u32,
        op: u8,
        request: Result<Request, netswap_proto::Malformed>,
        /// Where its record is, when the batch located it ahead.
        at: Option<netswap_proto::Located>,
    },
    Refused {
        xid: u32,
        status: Status,
        reason: String,
    },
}

/// Moves the groupable writes at the front of a record's queue `q` to `next`, behind
/// the groupable write there, up to [`MAX_WRITES_TOGETHER`] in all: the writes
/// handed to the store together ([`Conn::start_writes`]).
fn take_groupable(q: &mut std::collections::VecDeque<Queued>, next: &mut Vec<Queued>) {
    while next.len() < MAX_WRITES_TOGETHER
        && q.front()
            .is_some_and(|(_, r, _)| crate::cluster::groupable(r))
    {
        next.extend(q.pop_front());
    }
}

/// Whether two requests of `batch` (at most [`BATCH`]) name one record.
fn names_a_record_twice(batch: &[Pending]) -> bool {
    let mut seen = [None; BATCH];
    let mut n = 0;
    for p in batch {
        if let Pending::Request { request: Ok(r), .. } = p
            && let Some(ptr) = r.pointer()
        {
            if seen[..n].contains(&Some(ptr)) {
                return true;
            }
            if let Some(slot) = seen.get_mut(n) {
                *slot = Some(ptr);
                n += 1;
            }
        }
    }
    false
}

/// Socket options of an accepted connection: no Nagle delay, at most
/// [`netswap_proto::NOTSENT_LOWAT`] unsent bytes in the kernel (replies wait in the
/// fair queue instead, where a small one can pass a large one), and the receive
/// buffer when one is configured (`--receive-buffer`). Failures only cost latency.
pub(crate) fn tune_socket(stream: &TcpStream, receive_buffer: Option<usize>) {
    let _ = stream.set_nodelay(true);
    let sock = socket2::SockRef::from(stream);
    #[cfg(target_os = "linux")]
    let _ = sock.set_tcp_notsent_lowat(netswap_proto::NOTSENT_LOWAT);
    if let Some(bytes) = receive_buffer {
        let _ = sock.set_recv_buffer_size(bytes);
    }
}

/// Serves one accepted connection until it ends.
pub(crate) async fn serve(
    mut stream: TcpStream,
    peer: SocketAddr,
    hub: Arc<Hub>,
    mut shutdown: watch::Receiver<bool>,
) {
    tune_socket(&stream, hub.config.receive_buffer);
    let Some(slot) = hub.admit(peer.ip()) else {
        hub.metrics
            .connections_refused
            .fetch_add(1, Ordering::Relaxed);
        info!(%peer, limit = hub.config.max_connections_per_ip, "refused: too many connections from this address");
        // Boxed, like every rarely taken path below: a future's size is that of its
        // largest state, and every connection's task is allocated at that size.
        Box::pin(refuse(&mut stream, hub.config.max_connections_per_ip)).await;
        return;
    };
    let session = match &hub.backend {
        Backend::Memory(store) => ConnSession::Memory(store.connect(peer.ip())),
        Backend::Cluster(c) => match Box::pin(c.open(peer.ip(), hub.config.max_output_bytes)).await
        {
            Ok(s) => ConnSession::Cluster(s),
            Err(reply) => {
                info!(%peer, "refused: the store is unavailable");
                hub.metrics
                    .connections_refused
                    .fetch_add(1, Ordering::Relaxed);
                Box::pin(refuse_with(&mut stream, reply)).await;
                return;
            }
        },
    };
    debug!(%peer, conn = session.conn().0, identity = %session.identity(), "connected");
    hub.metrics
        .connections_accepted
        .fetch_add(1, Ordering::Relaxed);
    let now = Instant::now();
    let mut conn = Conn {
        rx: Receiver::new(
            Reassembler::with_shared_budgets(
                hub.config.reassembly,
                vec![slot.partial_budget.clone(), hub.partial_budget.clone()],
            ),
            READ_CHUNK,
        ),
        net: slot.net,
        throttled_until: None,
        probation_until: None,
        prepaid: Default::default(),
        in_flight: FuturesUnordered::new(),
        busy: Default::default(),
        waiting: Default::default(),
        queued: 0,
        first_writes: Vec::new(),
        repeats: false,
        read_pass: 0,
        held: Default::default(),
        watches_starting: Default::default(),
        deferred: None,
        stats: Local::default(),
        hub,
        session,
        outq: OutQueue::new(),
        wbuf: WriteBuf::new(),
        mailbox: None,
        notes: Vec::new(),
        last_rx: now,
        last_io: now,
        eof: false,
        batch_now: std::time::Instant::now(),
        batch: Vec::new(),
        large_values: false,
        closing: None,
        closing_deadline: None,
    };
    let end = conn.run(&stream, &mut shutdown).await;
    conn.stats.flush(&conn.hub.metrics);
    match &end {
        End::Eof | End::Shutdown => debug!(%peer, ?end, "closed"),
        End::Io(e) => debug!(%peer, error = %e, "closed by a socket error"),
        End::ProtocolError(reason) => info!(%peer, %reason, "closed: protocol error"),
        _ => info!(%peer, ?end, "closed by the server"),
    }
    if matches!(end, End::ProtocolError(_) | End::Stalled) {
        Box::pin(linger(&mut stream)).await;
    }
    let Conn { hub, session, .. } = conn;
    hub.close_route(session.conn());
    match (session, &hub.backend) {
        (ConnSession::Memory(s), Backend::Memory(store)) => {
            if store.disconnect(s, std::time::Instant::now()).is_some() {
                hub.reaper.notify_one();
            }
        }
        (ConnSession::Cluster(s), Backend::Cluster(c)) => Box::pin(c.close(s)).await,
        _ => unreachable!("a session belongs to its backend"),
    }
    drop(slot);
}

/// Reads once into `rx` (large messages straight into their buffers, see
/// [`Receiver`]). The flag says the socket was drained: the read returned less than
/// there was room for. Then readiness is cleared as if the read had returned
/// would-block (tokio keeps it if data arrived meanwhile), which saves the extra
/// `recv` per request that only learns the socket is empty.
fn read_once(stream: &TcpStream, rx: &mut Receiver) -> (io::Result<usize>, bool) {
    let sock = socket2::SockRef::from(stream);
    let mut drained_n = None;
    let read = stream.try_io(Interest::READABLE, || {
        let n = rx.read_with(|bufs| recv_into(&sock, bufs))?;
        if n > 0 && rx.drained() {
            drained_n = Some(n);
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match (read, drained_n) {
        (Err(e), Some(n)) if e.kind() == io::ErrorKind::WouldBlock => (Ok(n), true),
        (read, _) => (read, false),
    }
}

/// One non-blocking `recvmsg` into the receiver's (possibly uninitialised) buffers.
fn recv_into(
    sock: &socket2::SockRef<'_>,
    bufs: &mut [&mut [std::mem::MaybeUninit<u8>]],
) -> io::Result<usize> {
    if let [one] = bufs {
        // The common case (no large message arriving): no allocation.
        return sock.recv(one);
    }
    let mut slices: Vec<socket2::MaybeUninitSlice<'_>> = bufs
        .iter_mut()
        .map(|b| socket2::MaybeUninitSlice::new(b))
        .collect();
    sock.recv_vectored(&mut slices).map(|(n, _)| n)
}

fn throttled_reply(wait: Duration) -> Reply {
    Reply::error(
        Status::Busy,
        format!(
            "too many lookups of pointers that do not exist from this address; retry in {} ms",
            wait.as_millis().max(1)
        ),
    )
}

/// Tells a connection over the per-IP limit why it is closed, then closes it.
async fn refuse(stream: &mut TcpStream, limit: u32) {
    let reason = format!("too many connections from this address (limit {limit})");
    refuse_with(stream, Reply::error(Status::Busy, reason)).await;
}

/// Sends `reply` on the reserved XID, then closes the connection.
async fn refuse_with(stream: &mut TcpStream, reply: Reply) {
    let mut q = OutQueue::new();
    let _ = q.push(reply.encode(RESERVED_XID));
    let mut buf = BytesMut::new();
    q.write_to(&mut buf, usize::MAX);
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(&buf).await?;
        stream.shutdown().await
    })
    .await;
    linger(stream).await;
}

/// Half-closes, then discards input for a moment so that the peer's unread requests
/// do not turn our close into a reset that destroys the reason we sent.
async fn linger(stream: &mut TcpStream) {
    let _ = stream.shutdown().await;
    // On the heap: an array here would be part of every connection's task (above).
    let mut sink = vec![0u8; 4096];
    let _ = tokio::time::timeout(LINGER, async {
        while let Ok(n) = stream.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

/// Bytes of notifications moved from the mailbox to the output per turn, at most.
const NOTE_BYTES_PER_TURN: usize = 128 * 1024;

async fn mailbox_ready(mailbox: &Option<Arc<Mailbox>>) {
    match mailbox {
        Some(m) => m.ready.notified().await,
        None => std::future::pending().await,
    }
}

impl Conn {
    async fn run(&mut self, stream: &TcpStream, shutdown: &mut watch::Receiver<bool>) -> End {
        let timer = tokio::time::sleep(Duration::from_secs(3600));
        tokio::pin!(timer);
        let mut armed: Option<Instant> = None;
        loop {
            self.stats.flush(&self.hub.metrics);
            if self.has_output()
                && let Err(e) = self.flush(stream)
            {
                return End::Io(e);
            }
            if !self.has_output() && !self.has_work() {
                if let Some(end) = self.closing.take() {
                    return end;
                }
                if self.eof {
                    return End::Eof;
                }
            }
            self.take_notes();
            let read = self.wants_read();
            let write = self.has_output();
            let interest = match (read, write) {
                (true, true) => Interest::READABLE | Interest::WRITABLE,
                (true, false) => Interest::READABLE,
                (false, true) => Interest::WRITABLE,
                (false, false) if !self.has_work() => {
                    return self.closing.take().unwrap_or(End::Eof);
                }
                (false, false) => Interest::READABLE,
            };
            if let Some(d) = self.deadline()
                && armed.is_none_or(|a| d < a)
            {
                timer.as_mut().reset(d);
                armed = Some(d);
            }
            tokio::select! {
                biased;
                _ = shutdown.changed() => return self.shut_down(stream).await,
                _ = mailbox_ready(&self.mailbox), if self.notes_room() > 0 => {}
                Some(done) = self.in_flight.next(), if !self.in_flight.is_empty() => {
                    // One reading of the clock for the latencies of every request
                    // finished in this pass (2% of the gateway's CPU at pipeline 16
                    // when each took its own).
                    let now = std::time::Instant::now();
                    self.finish(done, now);
                    // Every other request that is done too, so their replies leave in
                    // one write.
                    self.finish_done(Some(now));
                    // With more still in flight, let the tasks that read Redis's
                    // other replies run (one pass of the event loop per yield), and
                    // take what they finished too, until nothing is left in flight or
                    // GATHER_PASSES passed: the requests a connection sent together
                    // are spread over the primaries, whose replies come back in
                    // different passes. One yield made READs +10-11% at pipeline 16;
                    // up to eight, READs +15% more at P16 and +20% at P4, REPLACEs
                    // +9% (docs/BENCHMARKS.md).
                    let mut passes = 0;
                    while !self.in_flight.is_empty() && passes < GATHER_PASSES {
                        tokio::task::yield_now().await;
                        self.finish_done(None);
                        passes += 1;
                    }
                    self.send_deferred();
                }
                ready = stream.ready(interest), if read || write => match ready {
                    Ok(r) if r.is_readable() || r.is_read_closed() => {
                        match self.read(stream) {
                            Err(e) => return End::Io(e),
                            // More input is waiting: answer what was read, then let
                            // the other connections have their turn.
                            Ok(true) => {
                                if self.has_output()
                                    && let Err(e) = self.flush(stream)
                                {
                                    return End::Io(e);
                                }
                                tokio::task::yield_now().await;
                            }
                            Ok(false) => {}
                        }
                    }
                    Ok(_) => {}
                    Err(e) => return End::Io(e),
                },
                _ = &mut timer, if armed.is_some() => {
                    armed = None;
                    let now = Instant::now();
                    let cfg = &self.hub.config;
                    if self.closing_deadline.is_some_and(|d| d <= now) {
                        return self.closing.take().unwrap_or(End::Eof);
                    } else if self.closing.is_none() && self.stall_deadline().is_some_and(|d| d <= now) {
                        let reason = format!(
                            "no progress on a partial frame or message for {} s", cfg.stall_timeout.as_secs());
                        self.fatal(End::Stalled, reason);
                    } else if cfg.idle_timeout.is_some_and(|t| self.last_io + t <= now) {
                        return End::Idle;
                    }
                }
            }
        }
    }

    fn has_output(&self) -> bool {
        !self.wbuf.is_empty() || !self.outq.is_empty()
    }

    fn wants_read(&self) -> bool {
        !self.eof
            && self.closing.is_none()
            && self.output_room() > 0
            && self.outq.large_messages() < MAX_LARGE_REPLIES
            && self.in_flight.len() + self.queued < MAX_IN_FLIGHT
    }

    /// Requests still being served (the connection must not end before them).
    fn has_work(&self) -> bool {
        !self.in_flight.is_empty()
    }

    /// Bytes of small replies that may still be queued before this connection stops
    /// taking more work (requests or notifications): backpressure on a slow reader.
    fn output_room(&self) -> usize {
        self.hub
            .config
            .max_output_bytes
            .saturating_sub(self.outq.small_pending_bytes() + self.wbuf.len())
    }

    /// How many bytes of notifications the output takes now: at most one write batch
    /// of small ones waits to be sent (in the write buffer, or behind a large reply in
    /// the fair queue) and a few large deltas at most, so a
    /// watcher that does not read leaves them in the mailbox, which merges them
    /// instead of growing.
    fn notes_room(&self) -> usize {
        if self.closing.is_some() {
            return 0;
        }
        if self.outq.large_messages() >= MAX_LARGE_REPLIES {
            return 0; // large deltas (or replies) are waiting to be sent
        }
        let queued = self.wbuf.len() + self.outq.small_pending_bytes();
        WRITE_CHUNK.saturating_sub(queued).min(NOTE_BYTES_PER_TURN)
    }

    /// Moves waiting notifications from the mailbox to the output (see
    /// [`Conn::notes_room`]).
    fn take_notes(&mut self) {
        let Some(mailbox) = self.mailbox.clone() else {
            return;
        };
        let max = self.notes_room();
        if max == 0 {
            return;
        }
        let mut notes = std::mem::take(&mut self.notes);
        mailbox.take(max, std::time::Instant::now(), &mut notes);
        for n in notes.drain(..) {
            self.notify(n);
        }
        self.notes = notes;
    }

    /// A WATCH is about to be applied: its mailbox knows how the watch wants its
    /// notifications before the first can arrive. Returns the XID of the watch it
    /// replaces on the same record, if any.
    fn watch_starting(&mut self, ptr: Pointer, xid: u32, options: WatchOptions) -> Option<u32> {
        let mailbox = self
            .mailbox
            .get_or_insert_with(|| self.hub.open_route(self.session.conn()));
        mailbox.configure(
            ptr,
            xid,
            WatchConfig {
                data: options.data,
                min_interval: Duration::from_millis(options.min_interval_ms.into()),
            },
        );
        self.session.watches().get(&ptr).copied()
    }

    /// A WATCH was answered: the configuration of the watch that did not come to be
    /// (refused), or of the one it replaced (accepted), is forgotten.
    fn watch_settled(&mut self, ptr: Pointer, xid: u32, replaced: Option<u32>, ok: bool) {
        let Some(mailbox) = &self.mailbox else { return };
        match (ok, replaced) {
            (false, _) => mailbox.forget(ptr, xid),
            (true, Some(old)) if old != xid => mailbox.forget(ptr, old),
            _ => {}
        }
    }

    /// When the oldest partial frame or unfinished message times out: each must
    /// progress by itself within the stall timeout (other traffic does not count).
    fn stall_deadline(&self) -> Option<Instant> {
        self.rx
            .stalled_since()
            .map(|t| Instant::from_std(t) + self.hub.config.stall_timeout)
    }

    /// The next moment a timeout may end this connection, or a rate-limited watch's
    /// notification becomes due.
    fn deadline(&self) -> Option<Instant> {
        if self.closing_deadline.is_some() {
            return self.closing_deadline;
        }
        let stall = self.stall_deadline();
        let idle = self.hub.config.idle_timeout.map(|t| self.last_io + t);
        let due = self
            .mailbox
            .as_ref()
            .and_then(|m| m.next_due())
            .map(Instant::from_std);
        [stall, idle, due].into_iter().flatten().min()
    }

    /// Reads what is available (a few reads at most) and processes every whole frame.
    /// Returns true when it stopped at its per-turn cap with more input likely waiting.
    fn read(&mut self, stream: &TcpStream) -> io::Result<bool> {
        self.read_pass += 1;
        let mut capped = true;
        for _ in 0..READS_PER_WAKE {
            if !self.wants_read() {
                capped = false;
                break;
            }
            let (read, drained) = read_once(stream, &mut self.rx);
            match read {
                Ok(0) => {
                    self.eof = true;
                    capped = false;
                    break;
                }
                Ok(n) => {
                    let now = Instant::now();
                    self.last_rx = now;
                    self.last_io = now;
                    self.batch_now = now.into_std();
                    self.rx.set_now(self.batch_now);
                    self.stats.bytes_in += n as u64;
                    self.process();
                    self.stats.batch_done(self.batch_now);
                    if drained {
                        // Nothing more waits: no read just to learn it would block.
                        capped = false;
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    capped = false;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        // Idle connections hold no read buffer.
        self.rx.release_idle_buffer();
        Ok(capped)
    }

    /// Takes every whole frame off the read buffer and acts on it, in order, in
    /// batches of up to [`BATCH`] messages: with the embedded store, the records a
    /// batch names are located (each pointer decrypted once, the decryptions
    /// overlapping) and prefetched together first ([`netswap_proto::Store::prefetch`]),
    /// so that pipelined requests wait for their cache misses at once rather than one
    /// after another: their slots always, and the values held outside the slots while
    /// this connection's READs return such values or its REPLACEs write them
    /// (`large_values`). At pipeline 16, 64 B reads and writes over 300,000 records
    /// +32-37%, 1 KiB reads over 10,000 +7-10% and then +9-12% more, 1 KiB writes
    /// +12-15% and then +10% more; 64 B over 10,000 records (mostly in cache) within
    /// ±1.5% (docs/BENCHMARKS.md).
    fn process(&mut self) {
        while self.closing.is_none() && self.process_batch() {}
    }

    /// One batch of [`Conn::process`]. Returns whether more may be waiting.
    fn process_batch(&mut self) -> bool {
        let mut batch = std::mem::take(&mut self.batch);
        let mut error = None;
        let mut more = true;
        while batch.len() < BATCH {
            match self.rx.next_inbound() {
                Ok(None) => {
                    more = false;
                    break;
                }
                Ok(Some(Inbound::Message(m))) => batch.push(Pending::Request {
                    xid: m.xid,
                    op: m.op,
                    request: Request::parse(m.op, m.arg, m.payload),
                    at: None,
                }),
                Ok(Some(Inbound::Refused {
                    xid,
                    status,
                    reason,
                })) => batch.push(Pending::Refused {
                    xid,
                    status,
                    reason,
                }),
                Err(e) => {
                    error = Some(e);
                    more = false;
                    break;
                }
            }
        }
        if let (Backend::Memory(store), true) = (&self.hub.backend, batch.len() > 1) {
            // Each pointer decrypted once, for the prefetch and the apply.
            for p in batch.iter_mut() {
                if let Pending::Request {
                    request: Ok(r), at, ..
                } = p
                {
                    *at = r.pointer().map(|ptr| store.locate_ahead(ptr));
                }
            }
            let located = batch.iter().filter_map(|p| match p {
                Pending::Request { at, .. } => *at,
                Pending::Refused { .. } => None,
            });
            store.prefetch(located, self.large_values);
        }
        self.repeats =
            matches!(self.hub.backend, Backend::Cluster(_)) && names_a_record_twice(&batch);
        for p in batch.drain(..) {
            if self.closing.is_some() {
                continue;
            }
            match p {
                Pending::Request {
                    xid,
                    op,
                    request,
                    at,
                } => self.apply(xid, op, request, at),
                Pending::Refused {
                    xid,
                    status,
                    reason,
                } => self.refused(xid, status, reason),
            }
        }
        self.batch = batch;
        // Before a PROTOCOL_ERROR: they came before it.
        self.start_first_writes();
        if let Some(e) = error
            && self.closing.is_none()
        {
            self.protocol_error(e.xid, e.error.to_string());
        }
        more
    }

    /// Answers a message the reassembler refused.
    fn refused(&mut self, xid: u32, status: Status, reason: String) {
        debug!(xid, ?status, %reason, "refused a message");
        self.stats.answered(0xFF, status);
        self.reply(xid, Reply::error(status, reason));
    }

    /// Applies one request (`at`: where its record is, when located ahead).
    fn apply(
        &mut self,
        xid: u32,
        op: u8,
        request: Result<Request, netswap_proto::Malformed>,
        at: Option<netswap_proto::Located>,
    ) {
        let request = match request {
            Ok(r) => r,
            Err(m) => {
                self.stats.answered(op, Status::Malformed);
                return self.reply(xid, Reply::error(Status::Malformed, m.0));
            }
        };
        if let Some(until) = self.throttled_until {
            if self.batch_now < until && request.pointer().is_some() {
                self.hub.throttle.throttled.fetch_add(1, Ordering::Relaxed);
                self.stats.answered(op, Status::Busy);
                return self.reply(xid, throttled_reply(until - self.batch_now));
            }
            self.throttled_until = None;
        }
        if request == Request::Stats {
            // Server-wide counters, and the caller's own usage: nothing about any
            // other identity.
            self.stats.flush(&self.hub.metrics);
            let own = match &self.session {
                ConnSession::Memory(s) => Some((s.account().records(), s.account().bytes())),
                ConnSession::Cluster(_) => None,
            };
            self.stats.answered(op, Status::Ok);
            return self.reply(xid, Reply::Stats(self.hub.stats_entries(own)));
        }
        if let Backend::Cluster(c) = &self.hub.backend {
            let c = c.clone();
            if request.pointer().is_some()
                && self.probation_until.is_some_and(|t| self.batch_now < t)
            {
                if let Err(wait) = self.hub.throttle.admit(self.net) {
                    self.throttled_until = Some(self.batch_now + wait);
                    self.probation_until = Some(self.batch_now + PROBATION);
                    self.hub.throttle.throttled.fetch_add(1, Ordering::Relaxed);
                    self.stats.answered(op, Status::Busy);
                    return self.reply(xid, throttled_reply(wait));
                }
                self.prepaid.insert(xid);
            }
            return self.submit(c, xid, request);
        }
        // The mailbox exists and knows the watch before the watch does, so no
        // notification is lost or sent the wrong way.
        let watch = match request {
            Request::Watch { ptr, options } => Some((ptr, self.watch_starting(ptr, xid, options))),
            _ => None,
        };
        let unwatch = match request {
            Request::Unwatch { ptr } => self.session.watches().get(&ptr).map(|x| (ptr, *x)),
            _ => None,
        };
        // The store is borrowed from the hub (no `Arc` clone per request: two
        // atomic operations on a count every connection's thread shares).
        let (Backend::Memory(store), ConnSession::Memory(session)) =
            (&self.hub.backend, &mut self.session)
        else {
            unreachable!("a session belongs to its backend")
        };
        let wake_reaper = matches!(request, Request::Transfer { .. });
        if let Request::Replace { data, .. } | Request::ReplaceIf { data, .. } = &request {
            self.large_values = data.len() > netswap_proto::INLINE_VALUE;
        }
        // A READ's bytes go straight from the record into the write buffer
        // when nothing is queued before them (see `Conn::reply`).
        let (outq, wbuf, large) = (&self.outq, &mut self.wbuf, &mut self.large_values);
        let mut sink = |bytes: &[u8]| {
            *large = bytes.len() > netswap_proto::INLINE_VALUE;
            outq.is_empty() && wbuf.push_data(xid, bytes)
        };
        let now = self.batch_now;
        let applied = store.apply_into(session, xid, request, at, now, &mut LazyRng, &mut sink);
        let ok = applied.reply.status() == Status::Ok;
        if let Some((ptr, replaced)) = watch {
            self.watch_settled(ptr, xid, replaced, ok);
        }
        if let (Some((ptr, old)), true, Some(m)) = (unwatch, ok, &self.mailbox) {
            m.forget(ptr, old);
        }
        self.answer(xid, Some(op), applied);
        if wake_reaper {
            self.hub.reaper.notify_one();
        }
    }

    /// Replies to an applied request: the miss throttle, the reply, notifications;
    /// counted under `op` (`None`: counted already, with its own latency).
    fn answer(&mut self, xid: u32, op: Option<u8>, applied: Applied) {
        let prepaid = !self.prepaid.is_empty() && self.prepaid.remove(&xid);
        let over = match (applied.miss, prepaid) {
            (false, _) => None,
            (true, true) => {
                self.hub.throttle.count_miss();
                None
            }
            (true, false) => self.hub.throttle.miss(self.net),
        };
        if let Some(wait) = over {
            // Over the rate: this miss and the next lookups say BUSY, so a scanner
            // learns nothing more until the rate allows.
            self.throttled_until = Some(self.batch_now + wait);
            self.probation_until = Some(self.batch_now + PROBATION);
            self.hub.throttle.throttled.fetch_add(1, Ordering::Relaxed);
            if let Some(op) = op {
                self.stats.answered(op, Status::Busy);
            }
            self.reply(xid, throttled_reply(wait));
        } else {
            if let Some(op) = op {
                self.stats.answered(op, applied.reply.status());
            }
            if !applied.sent {
                self.reply(xid, applied.reply);
            }
        }
        if !applied.notifications.is_empty() {
            let me = self.session.conn();
            for n in applied.notifications.iter().filter(|n| n.conn == me) {
                self.notify(n.clone());
            }
            self.hub
                .deliver(applied.notifications.into_iter().filter(|n| n.conn != me));
        }
    }

    /// Starts a request on the Redis Cluster backend, or queues it behind the one in
    /// flight on the same record: requests on one record are applied in the order
    /// they arrived; requests on different records run concurrently.
    ///
    /// A READ that finds a READ of the same record and range in flight, which came in
    /// the same [`Conn::read`] with nothing queued behind it, shares its reply instead
    /// of waiting for it and then asking Redis again. That reply is as new as its own
    /// would be: the one in flight has sent nothing to Redis yet (a request's future is
    /// first polled after the read), so what it reads is read after both arrived, and
    /// nothing of this connection comes between them. Replies up to
    /// [`crate::cluster::SHARED_REPLY_MAX`] are shared (see `finish`). By Zipf's law
    /// (exponent 0.99) the hottest record takes ~8% of the READs, so a client that
    /// pipelines sends it more than once in one go (docs/BENCHMARKS.md).
    fn submit(&mut self, c: Arc<ClusterStore>, xid: u32, request: Request) {
        let ptr = request.pointer();
        if let Some(p) = ptr
            && let Some(in_flight) = self.busy.get_mut(&p)
        {
            if let Request::Read { range, .. } = &request
                && let Some(s) = in_flight
                && s.read_pass == self.read_pass
                && s.range == *range
                && !self.waiting.contains_key(&p)
            {
                s.followers.push((xid, self.batch_now));
                self.queued += 1;
                return;
            }
            let arrived = self.batch_now;
            self.waiting
                .entry(p)
                .or_default()
                .push_back((xid, request, arrived));
            self.queued += 1;
            return;
        }
        if let Some(p) = ptr
            && self.repeats
            && crate::cluster::groupable(&request)
        {
            self.busy.insert(p, None);
            self.queued += 1;
            self.first_writes.push((p, (xid, request, self.batch_now)));
            return;
        }
        self.start(c, xid, ptr, request, self.batch_now, true);
    }

    /// Starts the writes held in `first_writes` (at the end of each batch of
    /// requests, [`Conn::process_batch`]), each with the groupable writes of its
    /// record that queued right behind it in the batch: a burst of writes of one
    /// record that a client pipelines goes to the store as one group from its first
    /// write, in one round trip instead of two (the first alone, then the rest, as
    /// when only the writes queued behind a request in flight were handed over).
    /// Nothing waited meanwhile: the futures of requests are first polled after the
    /// read that brought them.
    fn start_first_writes(&mut self) {
        if self.first_writes.is_empty() {
            return;
        }
        let Backend::Cluster(c) = &self.hub.backend else {
            return;
        };
        let c = c.clone();
        let mut held = std::mem::take(&mut self.first_writes);
        for (p, first) in held.drain(..) {
            // The first counts in `in_flight` now; those behind it in `queued` still.
            self.queued -= 1;
            let mut next = vec![first];
            if !self.waiting.is_empty()
                && let Some(q) = self.waiting.get_mut(&p)
            {
                take_groupable(q, &mut next);
                if q.is_empty() {
                    self.waiting.remove(&p);
                }
            }
            if next.len() > 1 {
                self.start_writes(c.clone(), p, next);
            } else if let Some((x, r, arrived)) = next.pop() {
                self.start(c.clone(), x, Some(p), r, arrived, false);
            }
        }
        self.first_writes = held;
    }

    /// Starts a request that arrived at `arrived` (the time of the read that brought
    /// it: its latency counts from there, queued or not). `shareable`: it is started
    /// in the read it came in, so a READ may share its reply ([`Conn::submit`]).
    fn start(
        &mut self,
        c: Arc<ClusterStore>,
        xid: u32,
        ptr: Option<Pointer>,
        request: Request,
        arrived: std::time::Instant,
        shareable: bool,
    ) {
        if let Request::Watch { ptr, options } = request {
            self.held.entry(xid).or_default();
            let replaced = self.watch_starting(ptr, xid, options);
            self.watches_starting.insert(xid, (ptr, replaced));
        }
        let caller = self.caller(xid, ptr);
        if let Some(p) = ptr {
            let sharing = match &request {
                Request::Read { range, .. } if shareable => Some(Sharing {
                    read_pass: self.read_pass,
                    range: *range,
                    followers: Vec::new(),
                }),
                _ => None,
            };
            self.busy.insert(p, sharing);
        }
        let started = (request.opcode() as u8, arrived);
        self.in_flight.push(Box::pin(async move {
            let outcome = c.apply(caller, request).await;
            Finished {
                xid,
                ptr,
                started,
                outcome,
                more: Vec::new(),
            }
        }));
    }

    /// The caller of a request with XID `xid` on the cluster backend.
    fn caller(&self, xid: u32, ptr: Option<Pointer>) -> Caller {
        let ConnSession::Cluster(session) = &self.session else {
            unreachable!("only the cluster backend is asynchronous")
        };
        Caller {
            conn: session.conn(),
            xid,
            identity: *session.identity(),
            watching: session.watches().len(),
            watch_xid: ptr.and_then(|p| session.watches().get(&p).copied()),
            budget: session.budget().clone(),
        }
    }

    /// Starts writes of record `p` that queued one after the other (behind this
    /// connection's request on it, or behind the first write of a batch,
    /// [`Conn::start_first_writes`]), together: the store commits them as a group, in
    /// their order (`ClusterStore::apply_writes`), in one round trip instead of one
    /// each. The first is in flight as any request; the others stay counted in
    /// `queued` until they are answered with it ([`Conn::finish`]).
    fn start_writes(&mut self, c: Arc<ClusterStore>, p: Pointer, writes: Vec<Queued>) {
        let mut started = Vec::with_capacity(writes.len());
        let mut requests = Vec::with_capacity(writes.len());
        for (xid, request, arrived) in writes {
            started.push((xid, (request.opcode() as u8, arrived)));
            requests.push((self.caller(xid, Some(p)), request));
        }
        self.busy.insert(p, None);
        self.in_flight.push(Box::pin(async move {
            let mut outcomes = c.apply_writes(p, requests).await.into_iter();
            let mut started = started.into_iter();
            let (xid, first) = started.next().expect("two writes at least");
            let outcome = outcomes.next().expect("an outcome per write");
            Finished {
                xid,
                ptr: Some(p),
                started: first,
                outcome,
                more: started.zip(outcomes).map(|((x, s), o)| (x, s, o)).collect(),
            }
        }));
    }

    /// Finishes every request in flight that is done already (without waiting), as
    /// of `now` (`None`: the clock is read if any is done).
    fn finish_done(&mut self, mut now: Option<std::time::Instant>) {
        while let Some(Some(done)) = self.in_flight.next().now_or_never() {
            let now = *now.get_or_insert_with(std::time::Instant::now);
            self.finish(done, now);
        }
    }

    /// A request on the cluster backend completed (with the writes started with it,
    /// [`Conn::start_writes`]).
    fn finish(&mut self, done: Finished, now: std::time::Instant) {
        let Finished {
            xid,
            ptr,
            started,
            outcome,
            more,
        } = done;
        self.stats.answered_after(
            started.0,
            outcome.applied.reply.status(),
            now.saturating_duration_since(started.1),
        );
        if let ConnSession::Cluster(s) = &mut self.session {
            match outcome.watch {
                WatchChange::Added(p, x) => s.set_watch(p, x),
                WatchChange::Removed(p) => {
                    let old = s.watches().get(&p).copied().unwrap_or(0);
                    s.watch_ended(p, old);
                    if let Some(m) = &self.mailbox {
                        m.forget(p, old);
                    }
                }
                WatchChange::None => {}
            }
        }
        if let Some((p, replaced)) = self.watches_starting.remove(&xid) {
            let ok = outcome.applied.reply.status() == Status::Ok;
            self.watch_settled(p, xid, replaced, ok);
        }
        // The READs that share this one's reply (`submit`), answered right after it.
        // A large reply is not shared: each READ of it holds its own share of the
        // reply budgets (`cluster::budget`), so those READs go to the front of the
        // record's queue instead, in their order, and run one at a time as before.
        let mut shared = None;
        if let Some(p) = ptr
            && let Some(s) = self.busy.get_mut(&p).and_then(Option::take)
            && !s.followers.is_empty()
        {
            match &outcome.applied.reply {
                Reply::Data(b) if b.len() > crate::cluster::SHARED_REPLY_MAX => {
                    let q = self.waiting.entry(p).or_default();
                    for (x, arrived) in s.followers.into_iter().rev() {
                        let read = Request::Read {
                            ptr: p,
                            range: s.range,
                        };
                        q.push_front((x, read, arrived));
                    }
                }
                reply => shared = Some((s.followers, reply.clone(), outcome.applied.miss)),
            }
        }
        self.answer(xid, None, outcome.applied);
        if let Some((followers, reply, miss)) = shared {
            for (x, arrived) in followers {
                // Zero already when the server is shutting down.
                self.queued = self.queued.saturating_sub(1);
                self.stats.answered_after(
                    started.0,
                    reply.status(),
                    now.saturating_duration_since(arrived),
                );
                let applied = Applied {
                    reply: reply.clone(),
                    notifications: Vec::new(),
                    miss,
                    sent: false,
                };
                self.answer(x, None, applied);
            }
        }
        if let Some(held) = self.held.remove(&xid) {
            // After the WATCH's OK, the events that raced with it.
            for n in held {
                self.notify(n);
            }
        }
        // The writes started with it, in their order.
        for (x, (op, arrived), o) in more {
            self.queued = self.queued.saturating_sub(1);
            self.stats.answered_after(
                op,
                o.applied.reply.status(),
                now.saturating_duration_since(arrived),
            );
            self.answer(x, None, o.applied);
        }
        let Some(p) = ptr else { return };
        self.busy.remove(&p);
        // The next request on the record, and the writes that queued right behind it
        // if it is one that may be grouped (`Conn::start_writes`).
        let mut next = Vec::new();
        if let Some(q) = self.waiting.get_mut(&p) {
            if let Some(first) = q.pop_front() {
                let grouped = crate::cluster::groupable(&first.1);
                next.push(first);
                if grouped {
                    take_groupable(q, &mut next);
                }
            }
            if q.is_empty() {
                self.waiting.remove(&p);
            }
        }
        if self.closing.is_some() && self.deferred.is_none() {
            // A closing connection starts nothing new, except the requests that came
            // before a PROTOCOL_ERROR (sent once they are answered).
            return;
        }
        let Backend::Cluster(c) = &self.hub.backend else {
            return;
        };
        if next.is_empty() {
            return;
        }
        let c = c.clone();
        if next.len() > 1 {
            // The first counts in `in_flight` now; the others in `queued` still.
            self.queued -= 1;
            self.start_writes(c, p, next);
        } else if let Some((x, r, arrived)) = next.pop() {
            self.queued -= 1;
            self.start(c, x, Some(p), r, arrived, false);
        }
    }

    fn reply(&mut self, xid: u32, reply: Reply) {
        // A write's reply, a few fixed bytes, goes straight to the write buffer.
        if self.outq.is_empty() && self.wbuf.push_reply(xid, &reply) {
            return;
        }
        let msg = reply.encode(xid);
        // With nothing queued, a small reply goes straight to the write buffer, in
        // the order the queue would have produced.
        if self.outq.is_empty() && self.wbuf.push_message(&msg) {
            return;
        }
        // Replies are bounded by the record size, which is capped below the framing
        // limit, so this cannot fail.
        let _ = self.outq.push(msg);
    }

    /// Queues a notification for this connection, unless its watch has ended since.
    fn notify(&mut self, n: Notification) {
        if let Some(held) = self.held.get_mut(&n.xid) {
            held.push(n); // its WATCH is still in flight
            return;
        }
        if self.session.watches().get(&n.ptr) != Some(&n.xid) {
            self.hub
                .metrics
                .notifications_dropped
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        if n.event == Event::Deleted {
            self.session.watch_ended(n.ptr, n.xid);
            if let Some(m) = &self.mailbox {
                m.forget(n.ptr, n.xid);
            }
        }
        self.stats.notifications += 1;
        self.stats.touch();
        self.reply(n.xid, n.to_reply());
    }

    fn protocol_error(&mut self, xid: u32, reason: String) {
        debug!(xid, %reason, "protocol error");
        self.hub
            .metrics
            .protocol_errors
            .fetch_add(1, Ordering::Relaxed);
        // Requests that arrived before the broken frame are applied and answered first,
        // those in flight and those queued behind others on the same record alike, then
        // the PROTOCOL_ERROR (as with the embedded store, where every earlier reply is
        // already queued).
        self.deferred = Some((xid, Reply::error(Status::ProtocolError, reason.clone())));
        self.closing = Some(End::ProtocolError(reason));
        self.closing_deadline = Some(Instant::now() + FLUSH_ON_CLOSE);
        self.rx.discard_input();
        self.send_deferred();
    }

    /// Sends the PROTOCOL_ERROR once no request is in flight any more.
    fn send_deferred(&mut self) {
        if self.in_flight.is_empty()
            && let Some((xid, reply)) = self.deferred.take()
        {
            self.reply(xid, reply);
        }
    }

    fn fatal(&mut self, end: End, reason: String) {
        if self.closing.is_none() {
            self.hub
                .metrics
                .protocol_errors
                .fetch_add(1, Ordering::Relaxed);
            self.reply(RESERVED_XID, Reply::error(Status::ProtocolError, reason));
            self.closing = Some(end);
            self.closing_deadline = Some(Instant::now() + FLUSH_ON_CLOSE);
            // Nothing more is read: release the unfinished messages' share of the
            // partial-message budgets now, not after the goodbye and linger.
            self.rx.discard_input();
        }
    }

    /// Writes queued frames until the socket would block or nothing is left.
    ///
    /// Frames go out in batches with one `writev` (see [`WriteBuf`]): record data
    /// shared with the store is handed to the kernel where it is, and a partial write
    /// leaves the rest where it was for the next attempt. Each call hands over at most
    /// [`netswap_proto::MAX_WRITE`] bytes (one full TCP offload packet, never a short
    /// tail: 1 MiB reads 1.4-1.8x faster than 256 KiB writes, docs/BENCHMARKS.md).
    fn flush(&mut self, stream: &TcpStream) -> io::Result<()> {
        /// Slices per `writev`: enough for `MAX_WRITE` bytes of full frames (two
        /// slices each) and then some.
        const MAX_SLICES: usize = 2 * (netswap_proto::MAX_WRITE / netswap_proto::MAX_PAYLOAD + 2);
        loop {
            if self.wbuf.len() < WRITE_CHUNK && !self.outq.is_empty() {
                self.wbuf.fill(&mut self.outq, WRITE_CHUNK);
            }
            if self.wbuf.is_empty() {
                break;
            }
            let mut slices = [io::IoSlice::new(&[]); MAX_SLICES];
            let written = match self.wbuf.io_slices(&mut slices, netswap_proto::MAX_WRITE) {
                // One slice (small replies only): a plain write.
                1 => stream.try_write(&slices[0][..]),
                k => stream.try_write_vectored(&slices[..k]),
            };
            match written {
                Ok(n) => {
                    self.wbuf.advance(n);
                    self.stats.bytes_out += n as u64;
                    self.stats.touch();
                    self.last_io = Instant::now();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        self.wbuf.release_idle_buffer();
        Ok(())
    }

    /// Server shutdown: stop reading, let requests in flight complete and queued
    /// replies leave, for a moment.
    async fn shut_down(&mut self, stream: &TcpStream) -> End {
        let deadline = Instant::now() + FLUSH_ON_CLOSE;
        // Requests queued behind others never started: they are not applied.
        self.waiting.clear();
        self.queued = 0;
        while !self.in_flight.is_empty() {
            tokio::select! {
                Some(done) = self.in_flight.next() => {
                    self.busy.clear();
                    self.finish(done, std::time::Instant::now());
                }
                _ = sleep_until(deadline) => break,
            }
        }
        self.send_deferred();
        while self.has_output() {
            if self.flush(stream).is_err() {
                break;
            }
            if !self.has_output() {
                break;
            }
            tokio::select! {
                r = stream.writable() => if r.is_err() { break },
                _ = sleep_until(deadline) => break,
            }
        }
        End::Shutdown
    }
}

/// The thread's random number generator, taken only when a request uses it (a CREATE
/// picks a shard with it): a READ or a write does not touch the thread-local.
struct LazyRng;

impl rand::RngCore for LazyRng {
    fn next_u32(&mut self) -> u32 {
        rand::rng().next_u32()
    }
    fn next_u64(&mut self) -> u64 {
        rand::rng().next_u64()
    }
    fn fill_bytes(&mut self, dst: &mut [u8]) {
        rand::rng().fill_bytes(dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Connected loopback pair: (accepted, connecting).
    async fn pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        (l.accept().await.unwrap().0, c)
    }

    /// Every connection's task is allocated at the size of `serve`'s future, idle or
    /// not: its rarely taken paths (refusals, lingering, the cluster's open and
    /// close) are boxed so that they do not set it: 2,504 bytes, 6,368 before
    /// (docs/BENCHMARKS.md, "Idle connections").
    #[tokio::test]
    async fn a_connection_s_task_stays_small() {
        let (s, _c) = pair().await;
        let config = crate::ServerConfig::new("127.0.0.1:0".parse().unwrap());
        let store = netswap_proto::Store::new(config.store.clone(), config.identity_key.clone());
        let hub = Arc::new(Hub::new(config, Backend::Memory(Box::new(store))));
        let (_tx, rx) = watch::channel(false);
        let peer = s.peer_addr().unwrap();
        let task = serve(s, peer, hub, rx);
        let size = std::mem::size_of_val(&task);
        assert!(size <= 3072, "serve's future is {size} bytes");
    }

    #[tokio::test]
    async fn a_configured_receive_buffer_is_set_and_none_leaves_the_kernel_s() {
        let (s, _c) = pair().await;
        let before = socket2::SockRef::from(&s).recv_buffer_size().unwrap();
        tune_socket(&s, None);
        assert_eq!(
            socket2::SockRef::from(&s).recv_buffer_size().unwrap(),
            before
        );
        assert!(s.nodelay().unwrap());
        // Linux doubles the value for its bookkeeping; 40,000 is under any rmem_max,
        // and the range excludes the kernel's default (tcp_rmem: 128 KiB).
        tune_socket(&s, Some(40_000));
        let set = socket2::SockRef::from(&s).recv_buffer_size().unwrap();
        assert!(
            (40_000..=80_000).contains(&set),
            "SO_RCVBUF {set} (was {before})"
        );
    }
}
