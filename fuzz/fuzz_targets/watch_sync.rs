//! Watches end to end without I/O: writers change, delete, hand over and reap records
//! while two watchers hold plain and data watches (some rate-limited) through their own
//! bounded `NotifyQueue`s, taking notifications at arbitrary moments. Checks, against
//! an independent model of every record's bytes at every version:
//! - each data watch's copy is exact at the version of every delta it applies, and a
//!   delta's base is always the copy's version (no gap within one registration; told
//!   "changed" without the bytes, the watcher sends its WATCH again, as clients do);
//! - a watch's versions never go back;
//! - no kind of event is lost: once drained, every change, owner change and access
//!   change pushed for a live watch has been delivered (merged, not dropped), and
//!   every watch of a deleted or reaped record got "deleted";
//! - a queue never holds more than its byte budget.
#![no_main]

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use netswap_proto::*;

#[derive(Arbitrary, Debug)]
enum Op {
    Create { w: u8, access: u8, len: u8 },
    WriteAt { w: u8, rec: u8, off: u8, len: u8 },
    Replace { w: u8, rec: u8, len: u8 },
    ReplaceIf { w: u8, rec: u8, back: u8, len: u8 },
    Delete { w: u8, rec: u8 },
    SetAccess { w: u8, rec: u8, access: u8 },
    Takeover { w: u8, rec: u8 },
    Transfer { w: u8, rec: u8, to: u8 },
    Leave { w: u8 },
    Return { w: u8 },
    Watch { who: bool, rec: u8, data: bool, interval: u8 },
    Unwatch { who: bool, rec: u8 },
    Reconnect { who: bool },
    Pop { who: bool, n: u8 },
    Advance { ms: u16 },
    Reap { secs: u16 },
}

#[derive(Arbitrary, Debug)]
struct Input {
    limit: u8,
    byte_limit: u16,
    ops: Vec<Op>,
}

/// What one watch has seen.
struct Seen {
    xid: u32,
    data: bool,
    interval: u32,
    copy: Vec<u8>,
    version: Version,
    /// Latest version of each kind of event pushed and not yet delivered.
    pending: HashMap<u8, Version>,
}

struct Watcher {
    session: Session,
    /// XIDs for WATCHes sent again (above those of the operations).
    next_xid: u32,
    queue: NotifyQueue,
    watches: HashMap<Pointer, Seen>,
}

fn kind(e: Event) -> u8 {
    match e {
        Event::Changed => 1,
        Event::Deleted => 2,
        Event::OwnerChanged => 3,
        Event::AccessChanged => 4,
    }
}

/// The model: every record's bytes at every version it had (deleted ones too, for
/// the notifications still on their way).
#[derive(Default)]
struct History {
    live: HashMap<Pointer, BTreeMap<Version, Vec<u8>>>,
    gone: HashMap<Pointer, BTreeMap<Version, Vec<u8>>>,
}

impl History {
    fn at(&self, ptr: Pointer, v: Version) -> &Vec<u8> {
        let versions = self.live.get(&ptr).or(self.gone.get(&ptr)).expect("a record of the model");
        &versions[&v]
    }

    fn delete(&mut self, ptr: Pointer) -> bool {
        match self.live.remove(&ptr) {
            Some(v) => {
                self.gone.insert(ptr, v);
                true
            }
            None => false,
        }
    }
}

fn current(history: &History, ptr: Pointer) -> Option<(Version, &Vec<u8>)> {
    history.live.get(&ptr)?.last_key_value().map(|(v, d)| (*v, d))
}

/// What a client does when told "changed" without the bytes: it sends the WATCH again,
/// which moves the watch to a new XID and brings the current value; what is still
/// queued for the old XID is ignored.
fn rewatch(store: &Store, wt: &mut Watcher, ptr: Pointer, now: Instant, rng: &mut rand::rngs::SmallRng, history: &History) {
    let Some(old) = wt.watches.get(&ptr) else { return };
    let (old_xid, interval) = (old.xid, old.interval);
    wt.next_xid += 1;
    let xid = wt.next_xid;
    let options = WatchOptions { data: true, state: true, min_interval_ms: interval };
    wt.queue.configure(ptr, xid, WatchConfig { data: true, min_interval: Duration::from_millis(interval as u64) });
    match store.apply(&mut wt.session, xid, Request::Watch { ptr, options }, now, rng).reply {
        Reply::Watching(info, bytes) => {
            let (v, d) = current(history, ptr).expect("a watched record lives");
            assert_eq!((info.version, &bytes[..]), (v, &d[..]));
            wt.queue.forget(ptr, old_xid);
            wt.watches.insert(ptr, Seen { xid, data: true, interval, copy: bytes.to_vec(), version: v, pending: HashMap::new() });
        }
        // Gone (its "deleted" is still on its way on the old XID), or no longer
        // readable: the client ends the mirror.
        _ => {
            wt.queue.forget(ptr, xid);
            if current(history, ptr).is_some() {
                wt.queue.forget(ptr, old_xid);
                wt.watches.remove(&ptr);
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn take(store: &Store, wt: &mut Watcher, n: usize, now: Instant, rng: &mut rand::rngs::SmallRng, history: &History, byte_limit: usize) {
    for _ in 0..n {
        let Some(note) = wt.queue.pop(now) else { break };
        assert!(wt.queue.held_bytes() <= byte_limit);
        let Some(seen) = wt.watches.get_mut(&note.ptr) else {
            continue; // a watch that has ended
        };
        if note.xid != seen.xid {
            continue; // from a registration that was replaced
        }
        assert!(
            note.version >= seen.version || note.event != Event::Changed || !seen.data,
            "a data watch's version went back: {} after {}",
            note.version,
            seen.version
        );
        if let Some(v) = seen.pending.get(&kind(note.event))
            && note.version >= *v
        {
            seen.pending.remove(&kind(note.event));
        }
        let mut resync = false;
        match note.event {
            Event::Deleted => {
                assert!(current(history, note.ptr).is_none(), "deleted, but the record lives");
                wt.queue.forget(note.ptr, note.xid);
                wt.watches.remove(&note.ptr);
            }
            Event::Changed if seen.data => match &note.delta {
                Some(d) if note.version > seen.version => {
                    assert_eq!(d.base, seen.version, "a gap in the versions within one registration");
                    d.apply_to(&mut seen.copy);
                    seen.version = note.version;
                    let want = history.at(note.ptr, note.version);
                    assert_eq!(&seen.copy, want, "the copy at version {}", note.version);
                }
                Some(_) => {}
                None => {
                    if let Some((v, _)) = current(history, note.ptr) {
                        assert!(v >= note.version);
                    }
                    resync = true;
                }
            },
            _ => {}
        }
        if resync {
            rewatch(store, wt, note.ptr, now, rng, history);
        }
    }
}

fuzz_target!(|input: Input| {
    let cfg = StoreConfig {
        quota_records: 20,
        quota_bytes: 4000,
        max_record_bytes: 300,
        orphan_grace: Duration::from_secs(300),
        shards: 2,
        ..StoreConfig::default()
    };
    let limit = 1 + input.limit as usize % 4;
    let byte_limit = input.byte_limit as usize % 1200;
    let store = Store::new(cfg, IdentityKey::new(*b"watch-sync"));
    let ips: Vec<IpAddr> = (2..6u8).map(|i| IpAddr::from([127, 0, 0, i])).collect();
    let mut writers: Vec<Option<Session>> = ips[..3].iter().map(|ip| Some(store.connect(*ip))).collect();
    let watcher_ips = [IpAddr::from([127, 0, 0, 8]), IpAddr::from([127, 0, 0, 9])];
    let mut watchers: Vec<Watcher> = watcher_ips
        .iter()
        .map(|ip| Watcher {
            session: store.connect(*ip),
            next_xid: 1 << 20,
            queue: NotifyQueue::new(limit, byte_limit),
            watches: HashMap::new(),
        })
        .collect();
    let mut rng = <rand::rngs::SmallRng as rand::SeedableRng>::seed_from_u64(5);
    let mut now = Instant::now();
    let mut ptrs: Vec<Pointer> = Vec::new();
    let mut history = History::default();

    let deliver = |watchers: &mut Vec<Watcher>, notes: Vec<Notification>, now: Instant| {
        for n in notes {
            let wt = watchers
                .iter_mut()
                .find(|w| w.session.conn() == n.conn)
                .expect("only watchers watch");
            if let Some(seen) = wt.watches.get_mut(&n.ptr)
                && seen.xid == n.xid
            {
                let p = seen.pending.entry(kind(n.event)).or_insert(0);
                *p = (*p).max(n.version);
            }
            wt.queue.push(n, now);
            assert!(wt.queue.held_bytes() <= byte_limit, "over the byte budget");
        }
    };

    for (i, op) in input.ops.into_iter().take(400).enumerate() {
        let xid = 1000 + i as u32;
        let pick = |rec: u8| ptrs.get(rec as usize % ptrs.len().max(1)).copied().unwrap_or(Pointer::new(7).unwrap());
        let fill = |len: u8| Bytes::from((0..len).map(|b| b ^ i as u8).collect::<Vec<u8>>());
        let (w, req) = match op {
            Op::Create { w, access, len } => (w, Request::Create { access: Access::from_bits_truncate(access), data: fill(len) }),
            Op::WriteAt { w, rec, off, len } => {
                let ptr = pick(rec);
                let size = current(&history, ptr).map_or(0, |(_, d)| d.len());
                (w, Request::WriteAt { ptr, offset: off as u64 % (size as u64 + 2), data: fill(len) })
            }
            Op::Replace { w, rec, len } => (w, Request::Replace { ptr: pick(rec), data: fill(len) }),
            Op::ReplaceIf { w, rec, back, len } => {
                let ptr = pick(rec);
                let v = current(&history, ptr).map_or(1, |(v, _)| v);
                (w, Request::ReplaceIf { ptr, expected: v.saturating_sub((back % 2) as u64), data: fill(len) })
            }
            Op::Delete { w, rec } => (w, Request::Delete { ptr: pick(rec) }),
            Op::SetAccess { w, rec, access } => (w, Request::SetAccess { ptr: pick(rec), access: Access::from_bits_truncate(access) }),
            Op::Takeover { w, rec } => (w, Request::Takeover { ptr: pick(rec) }),
            Op::Transfer { w, rec, to } => (w, Request::Transfer { ptr: pick(rec), to: NewOwner::Ip(ips[to as usize % 3]) }),
            Op::Leave { w } => {
                if let Some(s) = writers[w as usize % 3].take() {
                    store.disconnect(s, now);
                }
                continue;
            }
            Op::Return { w } => {
                let slot = &mut writers[w as usize % 3];
                if slot.is_none() {
                    *slot = Some(store.connect(ips[w as usize % 3]));
                }
                continue;
            }
            Op::Watch { who, rec, data, interval } => {
                let wt = &mut watchers[who as usize];
                let ptr = pick(rec);
                let options = WatchOptions { data, state: true, min_interval_ms: interval as u32 };
                let config = WatchConfig { data, min_interval: Duration::from_millis(interval as u64) };
                wt.queue.configure(ptr, xid, config);
                match store.apply(&mut wt.session, xid, Request::Watch { ptr, options }, now, &mut rng).reply {
                    Reply::Watching(info, bytes) => {
                        let (v, d) = current(&history, ptr).expect("a watched record lives");
                        assert_eq!(info.version, v);
                        assert_eq!(info.size, d.len() as u64);
                        if data {
                            assert_eq!(&bytes[..], &d[..], "the WATCH's value");
                        } else {
                            assert!(bytes.is_empty());
                        }
                        if let Some(old) = wt.watches.insert(ptr, Seen { xid, data, interval: interval as u32, copy: bytes.to_vec(), version: info.version, pending: HashMap::new() }) {
                            wt.queue.forget(ptr, old.xid);
                        }
                    }
                    Reply::Error { status, .. } => {
                        assert!(matches!(status, Status::AccessViolation | Status::AddressFault), "{status:?}");
                        wt.queue.forget(ptr, xid);
                    }
                    r => panic!("WATCH answered {r:?}"),
                }
                continue;
            }
            Op::Unwatch { who, rec } => {
                let wt = &mut watchers[who as usize];
                let ptr = pick(rec);
                let _ = store.apply(&mut wt.session, xid, Request::Unwatch { ptr }, now, &mut rng);
                if let Some(old) = wt.watches.remove(&ptr) {
                    wt.queue.forget(ptr, old.xid);
                }
                continue;
            }
            Op::Reconnect { who } => {
                let wt = &mut watchers[who as usize];
                let fresh = store.connect(watcher_ips[who as usize]);
                let old = std::mem::replace(&mut wt.session, fresh);
                store.disconnect(old, now);
                wt.queue = NotifyQueue::new(limit, byte_limit);
                wt.watches.clear();
                continue;
            }
            Op::Pop { who, n } => {
                // Mostly a few at a time: the interesting moments are between them.
                let n = if n < 16 { usize::MAX } else { 1 + n as usize % 3 };
                take(&store, &mut watchers[who as usize], n, now, &mut rng, &history, byte_limit);
                continue;
            }
            Op::Advance { ms } => {
                now += Duration::from_millis(ms as u64);
                continue;
            }
            Op::Reap { secs } => {
                now += Duration::from_secs(secs as u64);
                let reaped = store.reap(now);
                for p in &reaped.records {
                    assert!(history.delete(*p), "reaped a record that was not there");
                }
                deliver(&mut watchers, reaped.notifications, now);
                continue;
            }
        };
        let Some(session) = writers[w as usize % 3].as_mut() else { continue };
        let applied = store.apply(session, xid, req.clone(), now, &mut rng);
        match (&req, &applied.reply) {
            (Request::Create { data, .. }, Reply::Created(p)) => {
                ptrs.push(*p);
                history.live.insert(*p, BTreeMap::from([(1, data.to_vec())]));
            }
            (Request::WriteAt { ptr, offset, data }, Reply::Written(v)) => {
                let (old, bytes) = current(&history, *ptr).expect("written, so it lives");
                assert_eq!(*v, old + 1);
                let mut bytes = bytes.clone();
                let end = *offset as usize + data.len();
                if bytes.len() < end {
                    bytes.resize(end, 0);
                }
                bytes[*offset as usize..end].copy_from_slice(data);
                history.live.get_mut(ptr).unwrap().insert(*v, bytes);
            }
            (Request::Replace { ptr, data } | Request::ReplaceIf { ptr, data, .. }, Reply::Written(v)) => {
                let (old, _) = current(&history, *ptr).expect("written, so it lives");
                assert_eq!(*v, old + 1);
                history.live.get_mut(ptr).unwrap().insert(*v, data.to_vec());
            }
            (Request::Delete { ptr }, Reply::Done) => {
                assert!(history.delete(*ptr));
            }
            _ => {}
        }
        deliver(&mut watchers, applied.notifications, now);
    }

    // Everything that was pushed is delivered once the intervals have passed.
    now += Duration::from_secs(1);
    for wt in watchers.iter_mut() {
        take(&store, wt, usize::MAX, now, &mut rng, &history, byte_limit);
        assert!(wt.queue.is_empty());
        assert_eq!(wt.queue.held_bytes(), 0);
        for (ptr, seen) in &wt.watches {
            let (v, d) = current(&history, *ptr).expect("a watch of a deleted record got \"deleted\"");
            assert!(seen.pending.is_empty(), "undelivered kinds of event {:?}", seen.pending);
            if seen.data {
                assert_eq!(seen.version, v, "the copy is current");
                assert_eq!(&seen.copy, d, "the copy is exact");
            }
        }
    }
});
