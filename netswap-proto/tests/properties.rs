//! Property tests: encode/decode round trips, framing under any split and interleaving,
//! and the store's invariants under random operation sequences.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use netswap_proto::*;
use proptest::prelude::*;
use rand::SeedableRng;
use rand::rngs::SmallRng;

fn pointer() -> impl Strategy<Value = Pointer> {
    (1u64..).prop_map(|p| Pointer::new(p).unwrap())
}

fn access() -> impl Strategy<Value = Access> {
    (0u8..8).prop_map(|b| Access::from_bits(b).unwrap())
}

fn data(max: usize) -> impl Strategy<Value = Bytes> {
    prop::collection::vec(any::<u8>(), 0..max).prop_map(Bytes::from)
}

fn request() -> impl Strategy<Value = Request> {
    let owner = prop_oneof![
        any::<[u8; 32]>().prop_map(|b| NewOwner::Identity(Identity(b))),
        any::<[u8; 4]>().prop_map(|b| NewOwner::Ip(IpAddr::from(b))),
        any::<[u8; 16]>().prop_map(|b| NewOwner::Ip(identity::normalize_ip(IpAddr::from(b)))),
    ];
    prop_oneof![
        (access(), data(3000)).prop_map(|(access, data)| Request::Create { access, data }),
        (pointer(), access()).prop_map(|(ptr, access)| Request::SetAccess { ptr, access }),
        (pointer(), prop::option::of((any::<u64>(), any::<u32>())))
            .prop_map(|(ptr, range)| Request::Read { ptr, range }),
        (pointer(), data(3000)).prop_map(|(ptr, data)| Request::Replace { ptr, data }),
        (pointer(), any::<u64>(), data(100)).prop_map(|(ptr, offset, data)| Request::WriteAt {
            ptr,
            offset,
            data
        }),
        pointer().prop_map(|ptr| Request::Delete { ptr }),
        pointer().prop_map(|ptr| Request::Takeover { ptr }),
        (pointer(), owner).prop_map(|(ptr, to)| Request::Transfer { ptr, to }),
        pointer().prop_map(|ptr| Request::Info { ptr }),
        Just(Request::Hello),
        (
            pointer(),
            any::<bool>(),
            any::<bool>(),
            0..=MAX_WATCH_INTERVAL_MS
        )
            .prop_map(|(ptr, data, state, min_interval_ms)| Request::Watch {
                ptr,
                options: WatchOptions {
                    data,
                    state,
                    min_interval_ms
                }
            }),
        pointer().prop_map(|ptr| Request::Unwatch { ptr }),
        (pointer(), any::<u64>(), data(100)).prop_map(|(ptr, expected, data)| {
            Request::ReplaceIf {
                ptr,
                expected,
                data,
            }
        }),
    ]
}

/// Frames one message by itself (what any sender must produce).
fn frames_of(msg: OutMessage) -> Vec<OutFrame> {
    let mut q = OutQueue::new();
    q.push(msg).unwrap();
    std::iter::from_fn(|| q.pop_frame()).collect()
}

fn feed(stream: &[u8], cuts: &[usize], r: &mut Reassembler) -> Result<Vec<Inbound>, FramingError> {
    let mut out = Vec::new();
    let mut buf = BytesMut::new();
    let mut start = 0;
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
    points.push(stream.len());
    points.sort_unstable();
    for end in points {
        buf.extend_from_slice(&stream[start..end]);
        start = end;
        while let Some(f) = decode_frame(&mut buf)? {
            if let Some(m) = r.push(f)? {
                out.push(m);
            }
        }
    }
    assert!(
        buf.is_empty(),
        "no bytes left over at the end of a whole stream"
    );
    Ok(out)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn request_round_trips_through_frames(req in request(), xid in any::<u32>(), cuts in prop::collection::vec(any::<usize>(), 0..8)) {
        let mut wire = BytesMut::new();
        for f in frames_of(req.encode(xid)) {
            f.encode(&mut wire);
        }
        let mut r = Reassembler::new(ReassemblyLimits::default());
        let got = feed(&wire, &cuts, &mut r).unwrap();
        prop_assert_eq!(got.len(), 1);
        let Inbound::Message(m) = &got[0] else { panic!("refused: {:?}", got[0]) };
        prop_assert_eq!(m.xid, xid);
        prop_assert_eq!(Request::parse(m.op, m.arg, m.payload.clone()).unwrap(), req);
    }

    #[test]
    fn reply_round_trips(status in 0u8..=10, arg in 0u8..=5, payload in data(200), op in 0u8..13) {
        // Whatever parses must encode back to the same bytes.
        let op = Opcode::from_u8(op);
        if let Ok(reply) = Reply::parse(op, status, arg, payload.clone()) {
            let m = reply.encode(3);
            prop_assert_eq!(m.op, status);
            prop_assert_eq!(m.arg, arg);
            if reply.status().carries_reason() {
                prop_assert_eq!(m.payload(), Bytes::from(String::from_utf8_lossy(&payload).into_owned()));
            } else if let Reply::Info(_) | Reply::Watching(..) = reply {
                // Reserved access bits and flags are dropped on parse.
                prop_assert_eq!(m.payload().len(), payload.len());
                prop_assert_eq!(&m.payload()[18..], &payload[18..]);
            } else {
                prop_assert_eq!(m.payload(), payload);
            }
        }
    }

    #[test]
    fn any_interleaving_and_any_split_gives_the_same_messages(
        sizes in prop::collection::vec(0usize..6000, 1..6),
        order_seed in any::<u64>(),
        cuts in prop::collection::vec(any::<usize>(), 0..20),
    ) {
        // Each message's frames in order; messages interleaved in a random order.
        let msgs: Vec<OutMessage> = sizes.iter().enumerate().map(|(i, &n)| OutMessage {
            xid: i as u32 * 7919,
            op: 3,
            arg: 0,
            head: Head::from_slice(&[i as u8; 8]),
            body: Bytes::from((0..n).map(|b| (b * 31 + i) as u8).collect::<Vec<u8>>()),
        }).collect();
        let mut queues: Vec<std::collections::VecDeque<OutFrame>> =
            msgs.iter().map(|m| frames_of(m.clone()).into()).collect();
        let mut rng = SmallRng::seed_from_u64(order_seed);
        let mut wire = BytesMut::new();
        while queues.iter().any(|q| !q.is_empty()) {
            let live: Vec<usize> = (0..queues.len()).filter(|&i| !queues[i].is_empty()).collect();
            let pick = live[(rand::RngCore::next_u32(&mut rng) as usize) % live.len()];
            queues[pick].pop_front().unwrap().encode(&mut wire);
        }
        let mut r = Reassembler::new(ReassemblyLimits::default());
        let got = feed(&wire, &cuts, &mut r).unwrap();
        let got: BTreeMap<u32, Bytes> = got.into_iter().map(|m| match m {
            Inbound::Message(m) => (m.xid, m.payload),
            other => panic!("refused: {other:?}"),
        }).collect();
        let want: BTreeMap<u32, Bytes> = msgs.iter().map(|m| (m.xid, m.payload())).collect();
        prop_assert_eq!(got, want);
        prop_assert_eq!(r.buffered_bytes(), 0);
    }

    #[test]
    fn the_receiver_with_direct_reads_gives_what_plain_decoding_gives(
        sizes in prop::collection::vec(0usize..40_000, 1..5),
        order_seed in any::<u64>(),
        burst in 1usize..40,
        reads in prop::collection::vec(1usize..70_000, 1..12),
        corrupt in prop::option::of((any::<prop::sample::Index>(), any::<u8>())),
    ) {
        // Messages interleaved in bursts (a sender finishing a batch of one message's
        // frames before the next), read with arbitrary read sizes; optionally one byte
        // corrupted. Whatever the plain path yields, the receiver must yield too.
        let msgs: Vec<OutMessage> = sizes.iter().enumerate().map(|(i, &n)| OutMessage {
            xid: i as u32 + 1,
            op: 3,
            arg: 0,
            head: Head::new(),
            body: Bytes::from((0..n).map(|b| (b * 13 + i) as u8).collect::<Vec<u8>>()),
        }).collect();
        let mut queues: Vec<std::collections::VecDeque<OutFrame>> =
            msgs.iter().map(|m| frames_of(m.clone()).into()).collect();
        let mut rng = SmallRng::seed_from_u64(order_seed);
        let mut wire = BytesMut::new();
        while queues.iter().any(|q| !q.is_empty()) {
            let live: Vec<usize> = (0..queues.len()).filter(|&i| !queues[i].is_empty()).collect();
            let pick = live[(rand::RngCore::next_u32(&mut rng) as usize) % live.len()];
            for _ in 0..burst {
                if let Some(f) = queues[pick].pop_front() {
                    f.encode(&mut wire);
                }
            }
        }
        if let Some((at, byte)) = corrupt {
            let i = at.index(wire.len());
            wire[i] ^= byte;
        }
        let limits = ReassemblyLimits::default();
        let mut plain_r = Reassembler::new(limits);
        let mut plain_buf = wire.clone();
        let plain = (|| {
            let mut out = Vec::new();
            while let Some(f) = decode_frame(&mut plain_buf)? {
                out.extend(plain_r.push(f)?);
            }
            Ok::<_, FramingError>(out)
        })();
        let mut rx = Receiver::new(Reassembler::new(limits), 16 * 1024);
        let mut got = Vec::new();
        let mut at = 0;
        let mut k = 0;
        let direct = loop {
            if at == wire.len() {
                break Ok(got);
            }
            let want = reads[k % reads.len()];
            k += 1;
            at += rx.read_from_slice(&wire[at..(at + want).min(wire.len())]);
            let mut failed = None;
            loop {
                match rx.next_inbound() {
                    Ok(Some(m)) => got.push(m),
                    Ok(None) => break,
                    Err(e) => { failed = Some(e.error); break; }
                }
            }
            if let Some(e) = failed {
                break Err(e);
            }
        };
        match (plain, direct) {
            (Ok(a), Ok(b)) => {
                prop_assert_eq!(a, b);
                // A corrupted header can leave a message unfinished on both paths (a
                // frame moved to a made-up XID): what the receiver holds must be what
                // plain decoding holds, not necessarily nothing.
                let (held, plain_held) = (rx.reassembler(), &plain_r);
                prop_assert_eq!(held.buffered_bytes(), plain_held.buffered_bytes());
                prop_assert_eq!(held.partial_messages(), plain_held.partial_messages());
                prop_assert_eq!(held.has_unfinished(), plain_held.has_unfinished());
                if corrupt.is_none() {
                    prop_assert_eq!(held.buffered_bytes(), 0);
                }
            }
            (Err(a), Err(b)) => prop_assert_eq!(a, b),
            (a, b) => prop_assert!(false, "plain {:?} but receiver {:?}", a.map(|v| v.len()), b.map(|v| v.len())),
        }
    }

    #[test]
    fn write_buf_sends_exactly_the_encoded_frames(
        sizes in prop::collection::vec(0usize..12_000, 1..8),
        writes in prop::collection::vec((1usize..20_000, 1usize..20), 1..10),
        limit in 1usize..40_000,
    ) {
        let msgs: Vec<OutMessage> = sizes.iter().enumerate().map(|(i, &n)| OutMessage {
            xid: i as u32,
            op: 1,
            arg: 0,
            head: Head::from_slice(&[i as u8; 5]),
            body: Bytes::from((0..n).map(|b| (b * 5 + i) as u8).collect::<Vec<u8>>()),
        }).collect();
        let mut q = OutQueue::new();
        for m in &msgs { q.push(m.clone()).unwrap(); }
        let mut want = BytesMut::new();
        q.write_to(&mut want, usize::MAX);
        for m in &msgs { q.push(m.clone()).unwrap(); }
        let mut wb = WriteBuf::new();
        let mut got = Vec::new();
        let mut k = 0;
        while !q.is_empty() || !wb.is_empty() {
            wb.fill(&mut q, limit);
            // A socket that takes at most `cap` slices and `max` bytes per write.
            let (max, cap) = writes[k % writes.len()];
            k += 1;
            let mut io = vec![std::io::IoSlice::new(&[]); cap];
            let n = bytes::Buf::chunks_vectored(&wb, &mut io);
            let mut taken = 0;
            for s in &io[..n] {
                let t = s.len().min(max - taken);
                got.extend_from_slice(&s[..t]);
                taken += t;
            }
            bytes::Buf::advance(&mut wb, taken);
            if wb.is_empty() { wb.release_idle_buffer(); }
        }
        prop_assert_eq!(got, want.to_vec());
    }

    #[test]
    fn garbage_never_panics_and_memory_stays_bounded(stream in prop::collection::vec(any::<u8>(), 0..20_000)) {
        let limits = ReassemblyLimits { max_message_bytes: 50_000, max_partial_messages: 4, max_partial_bytes: 100_000 };
        let mut r = Reassembler::new(limits);
        let mut buf = BytesMut::from(&stream[..]);
        loop {
            match decode_frame(&mut buf) {
                Ok(Some(f)) => match r.push(f) {
                    Ok(Some(Inbound::Message(m))) => { let _ = Request::parse(m.op, m.arg, m.payload); }
                    Ok(_) => {}
                    Err(_) => break,
                },
                Ok(None) | Err(_) => break,
            }
            prop_assert!(r.buffered_bytes() <= limits.max_partial_bytes);
            prop_assert!(r.partial_messages() <= limits.max_partial_messages);
        }
    }
}

#[derive(Clone, Debug)]
enum Op {
    Create {
        who: usize,
        access: u8,
        len: usize,
    },
    Read {
        who: usize,
        rec: usize,
    },
    Replace {
        who: usize,
        rec: usize,
        len: usize,
    },
    WriteAt {
        who: usize,
        rec: usize,
        off: u64,
        len: usize,
    },
    ReplaceIf {
        who: usize,
        rec: usize,
        ver: u64,
    },
    Delete {
        who: usize,
        rec: usize,
    },
    SetAccess {
        who: usize,
        rec: usize,
        access: u8,
    },
    Takeover {
        who: usize,
        rec: usize,
    },
    Transfer {
        who: usize,
        rec: usize,
        to: usize,
    },
    Disconnect {
        who: usize,
    },
    Connect {
        who: usize,
    },
    Advance {
        secs: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let who = 0usize..4;
    let rec = 0usize..16;
    prop_oneof![
        (who.clone(), 0u8..8, 0usize..40).prop_map(|(who, access, len)| Op::Create {
            who,
            access,
            len
        }),
        (who.clone(), rec.clone()).prop_map(|(who, rec)| Op::Read { who, rec }),
        (who.clone(), rec.clone(), 0usize..40).prop_map(|(who, rec, len)| Op::Replace {
            who,
            rec,
            len
        }),
        (who.clone(), rec.clone(), 0u64..50, 0usize..20)
            .prop_map(|(who, rec, off, len)| Op::WriteAt { who, rec, off, len }),
        (who.clone(), rec.clone(), 0u64..5).prop_map(|(who, rec, ver)| Op::ReplaceIf {
            who,
            rec,
            ver
        }),
        (who.clone(), rec.clone()).prop_map(|(who, rec)| Op::Delete { who, rec }),
        (who.clone(), rec.clone(), 0u8..8).prop_map(|(who, rec, access)| Op::SetAccess {
            who,
            rec,
            access
        }),
        (who.clone(), rec.clone()).prop_map(|(who, rec)| Op::Takeover { who, rec }),
        (who.clone(), rec.clone(), 0usize..5).prop_map(|(who, rec, to)| Op::Transfer {
            who,
            rec,
            to
        }),
        who.clone().prop_map(|who| Op::Disconnect { who }),
        who.prop_map(|who| Op::Connect { who }),
        (0u64..200).prop_map(|secs| Op::Advance { secs }),
    ]
}

/// What the test believes about a record, from replies alone.
#[derive(Clone, Debug)]
struct Known {
    owner: usize,
    /// Who is charged for it: the owner, or for a record handed to an identity with
    /// no connection, the one who paid before, until the owner connects.
    payer: usize,
    version: u64,
    data: Vec<u8>,
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Drives the store with random operations from four identities and checks, after
    /// every step: quotas hold and match what each identity owns; versions only grow;
    /// only owners delete; data is what the last acknowledged write left; records
    /// disappear only by DELETE or by reaping, and reaped records are gone.
    #[test]
    fn store_invariants(ops in prop::collection::vec(op(), 1..120)) {
        let cfg = StoreConfig {
            quota_records: 5,
            quota_bytes: 120,
            max_record_bytes: 60,
            orphan_grace: Duration::from_secs(300),
            shards: 4,
            ..StoreConfig::default()
        };
        let store = Store::new(cfg.clone(), IdentityKey::new(*b"prop"));
        let ips: Vec<IpAddr> = (2..7u8).map(|i| IpAddr::from([127, 0, 0, i])).collect();
        let mut sessions: Vec<Vec<Session>> = (0..4).map(|i| vec![store.connect(ips[i])]).collect();
        let mut rng = SmallRng::seed_from_u64(1);
        let t0 = Instant::now();
        let mut now = t0;
        let mut ptrs: Vec<Pointer> = Vec::new();
        let mut known: HashMap<Pointer, Known> = HashMap::new();
        let mut xid = 0u32;
        // Records whose charge moved to an identity when it connected (which may take
        // it past its quota).
        let mut migrated = [0u64; 5];

        for op in ops {
            xid += 1;
            let pick = |rec: usize, ptrs: &Vec<Pointer>| ptrs.get(rec % ptrs.len().max(1)).copied()
                .unwrap_or(Pointer::new(99).unwrap());
            let (who, req) = match op {
                Op::Create { who, access, len } => (who, Request::Create { access: Access::from_bits(access).unwrap(), data: vec![xid as u8; len].into() }),
                Op::Read { who, rec } => (who, Request::Read { ptr: pick(rec, &ptrs), range: None }),
                Op::Replace { who, rec, len } => (who, Request::Replace { ptr: pick(rec, &ptrs), data: vec![xid as u8; len].into() }),
                Op::WriteAt { who, rec, off, len } => (who, Request::WriteAt { ptr: pick(rec, &ptrs), offset: off, data: vec![xid as u8; len].into() }),
                Op::ReplaceIf { who, rec, ver } => (who, Request::ReplaceIf { ptr: pick(rec, &ptrs), expected: ver, data: vec![xid as u8; 3].into() }),
                Op::Delete { who, rec } => (who, Request::Delete { ptr: pick(rec, &ptrs) }),
                Op::SetAccess { who, rec, access } => (who, Request::SetAccess { ptr: pick(rec, &ptrs), access: Access::from_bits(access).unwrap() }),
                Op::Takeover { who, rec } => (who, Request::Takeover { ptr: pick(rec, &ptrs) }),
                Op::Transfer { who, rec, to } => (who, Request::Transfer { ptr: pick(rec, &ptrs), to: NewOwner::Ip(ips[to]) }),
                Op::Disconnect { who } => {
                    if let Some(s) = sessions[who].pop() { store.disconnect(s, now); }
                    continue;
                }
                Op::Connect { who } => {
                    if sessions[who].is_empty() {
                        // First connection: the records parked with it become its charge.
                        for k in known.values_mut() {
                            if k.owner == who && k.payer != who {
                                k.payer = who;
                                migrated[who] += 1;
                            }
                        }
                    }
                    sessions[who].push(store.connect(ips[who]));
                    continue;
                }
                Op::Advance { secs } => {
                    now += Duration::from_secs(secs);
                    let reaped = store.reap(now);
                    for p in reaped.records {
                        let k = known.remove(&p).expect("reaped a record the test knew");
                        // Only records of identities with no connection are reaped.
                        prop_assert!(k.owner == 4 || sessions[k.owner].is_empty(), "reaped a connected owner's record");
                    }
                    continue;
                }
            };
            let Some(session) = sessions[who].last_mut() else { continue };
            let ptr = req.pointer();
            let before = ptr.and_then(|p| known.get(&p).cloned());
            let applied = store.apply(session, xid, req.clone(), now, &mut rng);
            match (&req, &applied.reply) {
                (Request::Create { data, .. }, Reply::Created(p)) => {
                    ptrs.push(*p);
                    known.insert(*p, Known { owner: who, payer: who, version: 1, data: data.to_vec() });
                }
                (Request::Read { .. }, Reply::Data(d)) => {
                    prop_assert_eq!(&d[..], &before.unwrap().data[..]);
                }
                (Request::Replace { data, .. } | Request::ReplaceIf { data, .. }, Reply::Written(v)) => {
                    let k = known.get_mut(&ptr.unwrap()).unwrap();
                    prop_assert_eq!(*v, k.version + 1, "versions grow by one");
                    k.version = *v;
                    k.data = data.to_vec();
                }
                (Request::WriteAt { offset, data, .. }, Reply::Written(v)) => {
                    let k = known.get_mut(&ptr.unwrap()).unwrap();
                    prop_assert_eq!(*v, k.version + 1);
                    k.version = *v;
                    let end = *offset as usize + data.len();
                    if k.data.len() < end { k.data.resize(end, 0); }
                    k.data[*offset as usize..end].copy_from_slice(data);
                }
                (Request::Delete { .. }, Reply::Done) => {
                    let k = known.remove(&ptr.unwrap()).unwrap();
                    prop_assert_eq!(k.owner, who, "only owners delete");
                }
                (Request::Takeover { .. }, Reply::Done) => {
                    let k = known.get_mut(&ptr.unwrap()).unwrap();
                    k.owner = who;
                    k.payer = who;
                }
                (Request::Transfer { to: NewOwner::Ip(ip), .. }, Reply::Done) => {
                    let to = ips.iter().position(|i| i == ip).unwrap();
                    let k = known.get_mut(&ptr.unwrap()).unwrap();
                    if k.owner != to {
                        k.owner = to;
                        // A receiver with no connection does not pay until it connects.
                        if to < 4 && !sessions[to].is_empty() {
                            k.payer = to;
                        }
                    }
                }
                (Request::ReplaceIf { expected, .. }, Reply::Conflict(v)) => {
                    prop_assert_ne!(*expected, *v);
                    prop_assert_eq!(*v, before.unwrap().version);
                }
                (_, Reply::Error { reason, .. }) => {
                    // A known record never answers "no such record".
                    if let Some(p) = ptr && before.is_some() {
                        prop_assert_ne!(reason.as_ref(), "no such record", "record {} vanished", p);
                    }
                }
                (_, Reply::Done) => {}
                (r, reply) => prop_assert!(false, "unexpected reply {reply:?} to {r:?}"),
            }

            // Cross-check the store against what the test knows.
            let mut owned_records = [0u64; 5];
            let mut owned_bytes = [0u64; 5];
            for (p, k) in &known {
                owned_records[k.payer] += 1;
                owned_bytes[k.payer] += k.data.len() as u64;
                // The owner (or, if absent, anyone after a read-only look) sees the truth.
                if k.owner < 4 && let Some(s) = sessions[k.owner].last_mut() {
                    let info = store.apply(s, 0, Request::Info { ptr: *p }, now, &mut rng).reply;
                    prop_assert_eq!(info, Reply::Info(RecordInfo {
                        size: k.data.len() as u64,
                        version: k.version,
                        access: match store.apply(s, 0, Request::Info { ptr: *p }, now, &mut rng).reply {
                            Reply::Info(i) => i.access, _ => unreachable!() },
                        owned: true,
                    }));
                }
            }
            for who in 0..4 {
                if let Some(s) = sessions[who].last() {
                    prop_assert_eq!(s.account().records(), owned_records[who]);
                    prop_assert_eq!(s.account().bytes(), owned_bytes[who]);
                    // Within the quota, unless parked records became its charge when
                    // it connected.
                    if migrated[who] == 0 {
                        prop_assert!(s.account().records() <= cfg.quota_records);
                        prop_assert!(s.account().bytes() <= cfg.quota_bytes);
                    }
                }
            }
            if let Err(e) = store.audit() {
                prop_assert!(false, "the store's books: {}", e);
            }
            let stats = store.stats();
            prop_assert_eq!(stats.records, known.len() as u64);
            prop_assert_eq!(stats.data_bytes, owned_bytes.iter().sum::<u64>());
        }
    }
}

/// What a writer or the watcher's connection does next, for the mirror property.
#[derive(Clone, Debug)]
enum SyncOp {
    /// WRITE_AT at an offset (taken modulo size + 1) of `len` bytes.
    WriteAt { writer: usize, off: u64, len: usize },
    /// REPLACE with `len` bytes.
    Replace { writer: usize, len: usize },
    /// Time passes.
    Advance { ms: u64 },
    /// The watcher's socket takes up to `n` notifications.
    Pop { n: usize },
}

fn sync_op() -> impl Strategy<Value = SyncOp> {
    prop_oneof![
        4 => (0usize..3, any::<u64>(), 0usize..40).prop_map(|(writer, off, len)| SyncOp::WriteAt { writer, off, len }),
        1 => (0usize..3, 0usize..120).prop_map(|(writer, len)| SyncOp::Replace { writer, len }),
        2 => (0u64..80).prop_map(|ms| SyncOp::Advance { ms }),
        2 => (0usize..6).prop_map(|n| SyncOp::Pop { n }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// A mirror fed by a data watch stays byte-exact: writers change a record at
    /// random (WRITE_AT anywhere, growing, REPLACE shrinking or growing), the
    /// watcher's queue is small (so changes are merged), with or without a rate
    /// limit, and the watcher pops at random moments. Applying what it receives in
    /// version order (and re-reading when a change comes without its bytes or after a
    /// gap, as the client's mirror does) always ends at the record's bytes.
    #[test]
    fn a_mirror_stays_exact_under_random_concurrent_writes(
        ops in prop::collection::vec(sync_op(), 1..150),
        limit in 1usize..6,
        byte_limit in 16usize..400,
        interval_ms in prop_oneof![Just(0u64), 1u64..60],
    ) {
        let store = Store::new(StoreConfig { shards: 2, ..StoreConfig::default() }, IdentityKey::new(*b"mirror"));
        let mut writers: Vec<Session> = (2..5u8).map(|i| store.connect(IpAddr::from([127, 0, 0, i]))).collect();
        let mut watcher = store.connect(IpAddr::from([127, 0, 0, 9]));
        let mut rng = SmallRng::seed_from_u64(3);
        let mut now = Instant::now();
        let Reply::Created(ptr) = store
            .apply(&mut writers[0], 1, Request::Create { access: Access::READ | Access::WRITE, data: Bytes::from_static(b"initial") }, now, &mut rng)
            .reply else { panic!() };
        let mut queue = NotifyQueue::new(limit, byte_limit);
        queue.configure(ptr, 7, WatchConfig { data: true, min_interval: Duration::from_millis(interval_ms) });
        let options = WatchOptions { data: true, state: true, min_interval_ms: interval_ms as u32 };
        let Reply::Watching(info, data) = store.apply(&mut watcher, 7, Request::Watch { ptr, options }, now, &mut rng).reply else { panic!() };
        let mut copy = data.to_vec();
        let mut version = info.version;
        let mut rereads = 0;
        let read_record = |store: &Store, s: &mut Session, rng: &mut SmallRng, now| {
            let Reply::Info(i) = store.apply(s, 9, Request::Info { ptr }, now, rng).reply else { panic!() };
            let Reply::Data(d) = store.apply(s, 9, Request::Read { ptr, range: None }, now, rng).reply else { panic!() };
            (d.to_vec(), i.version)
        };
        let mut take = |queue: &mut NotifyQueue, n: usize, now, copy: &mut Vec<u8>, version: &mut Version, watcher: &mut Session, rng: &mut SmallRng| -> Result<(), TestCaseError> {
            for _ in 0..n {
                let Some(note) = queue.pop(now) else { break };
                prop_assert_eq!(note.event, Event::Changed);
                match note.delta {
                    Some(d) if d.base == *version => {
                        d.apply_to(copy);
                        *version = note.version;
                    }
                    _ if note.version <= *version => {}
                    _ => {
                        // A change without its bytes, or a gap: read the record.
                        let (d, v) = read_record(&store, watcher, rng, now);
                        *copy = d;
                        *version = v;
                        rereads += 1;
                    }
                }
            }
            Ok(())
        };
        for (i, op) in ops.into_iter().enumerate() {
            let xid = 100 + i as u32;
            let size = match store.apply(&mut writers[0], xid, Request::Info { ptr }, now, &mut rng).reply {
                Reply::Info(i) => i.size,
                r => panic!("{r:?}"),
            };
            let (w, req) = match op {
                SyncOp::WriteAt { writer, off, len } => (writer, Request::WriteAt { ptr, offset: off % (size + 1), data: vec![i as u8 ^ 0x5a; len].into() }),
                SyncOp::Replace { writer, len } => (writer, Request::Replace { ptr, data: (0..len).map(|b| (b + i) as u8).collect::<Vec<u8>>().into() }),
                SyncOp::Advance { ms } => { now += Duration::from_millis(ms); continue; }
                SyncOp::Pop { n } => { take(&mut queue, n, now, &mut copy, &mut version, &mut watcher, &mut rng)?; continue; }
            };
            let applied = store.apply(&mut writers[w], xid, req, now, &mut rng);
            prop_assert!(matches!(applied.reply, Reply::Written(_)), "{:?}", applied.reply);
            for n in applied.notifications {
                prop_assert_eq!(n.conn, watcher.conn());
                queue.push(n, now);
            }
        }
        // Time enough for any rate-limited summary, then everything is taken.
        now += Duration::from_millis(interval_ms + 1);
        take(&mut queue, usize::MAX, now, &mut copy, &mut version, &mut watcher, &mut rng)?;
        prop_assert!(queue.is_empty());
        let (want, want_version) = read_record(&store, &mut watcher, &mut rng, now);
        prop_assert_eq!(version, want_version);
        prop_assert_eq!(copy, want, "after {} re-reads", rereads);
        prop_assert!(queue.held_bytes() == 0);
    }
}
