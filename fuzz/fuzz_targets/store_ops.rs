//! Drives the record store with arbitrary operation sequences from four identities
//! and checks its invariants after every step: quota usage equals what each identity
//! pays for (the store's own audit), versions only grow, only owners delete, reaped
//! records are gone, and the store's counts match.
#![no_main]

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use netswap_proto::*;

#[derive(Arbitrary, Debug)]
enum Op {
    Create { who: u8, access: u8, len: u8 },
    Read { who: u8, rec: u8, range: Option<(u8, u8)> },
    Replace { who: u8, rec: u8, len: u8 },
    WriteAt { who: u8, rec: u8, off: u8, len: u8 },
    ReplaceIf { who: u8, rec: u8, ver: u8 },
    Delete { who: u8, rec: u8 },
    SetAccess { who: u8, rec: u8, access: u8 },
    Takeover { who: u8, rec: u8 },
    Transfer { who: u8, rec: u8, to: u8 },
    Watch { who: u8, rec: u8 },
    Unwatch { who: u8, rec: u8 },
    Disconnect { who: u8 },
    Connect { who: u8 },
    Advance { secs: u16 },
}

fuzz_target!(|ops: Vec<Op>| {
    let cfg = StoreConfig {
        quota_records: 6,
        quota_bytes: 300,
        max_record_bytes: 200,
        orphan_grace: Duration::from_secs(300),
        shards: 4,
        ..StoreConfig::default()
    };
    let store = Store::new(cfg.clone(), IdentityKey::new(*b"fuzz"));
    let ips: Vec<IpAddr> = (2..7u8).map(|i| IpAddr::from([127, 0, 0, i])).collect();
    let mut sessions: Vec<Vec<Session>> = (0..4).map(|i| vec![store.connect(ips[i])]).collect();
    let mut rng = <rand::rngs::SmallRng as rand::SeedableRng>::seed_from_u64(1);
    let mut now = Instant::now();
    let mut ptrs: Vec<Pointer> = Vec::new();
    let mut versions: HashMap<Pointer, u64> = HashMap::new();
    for (xid, op) in ops.into_iter().take(300).enumerate() {
        let pick = |rec: u8| ptrs.get(rec as usize % ptrs.len().max(1)).copied().unwrap_or(Pointer::new(7).unwrap());
        let data = |len: u8| Bytes::from(vec![xid as u8; len as usize]);
        let access = |a: u8| Access::from_bits_truncate(a);
        let (who, req) = match op {
            Op::Create { who, access: a, len } => (who, Request::Create { access: access(a), data: data(len) }),
            Op::Read { who, rec, range } => (who, Request::Read { ptr: pick(rec), range: range.map(|(o, n)| (o as u64, n as u32)) }),
            Op::Replace { who, rec, len } => (who, Request::Replace { ptr: pick(rec), data: data(len) }),
            Op::WriteAt { who, rec, off, len } => (who, Request::WriteAt { ptr: pick(rec), offset: off as u64, data: data(len) }),
            Op::ReplaceIf { who, rec, ver } => (who, Request::ReplaceIf { ptr: pick(rec), expected: ver as u64, data: data(3) }),
            Op::Delete { who, rec } => (who, Request::Delete { ptr: pick(rec) }),
            Op::SetAccess { who, rec, access: a } => (who, Request::SetAccess { ptr: pick(rec), access: access(a) }),
            Op::Takeover { who, rec } => (who, Request::Takeover { ptr: pick(rec) }),
            Op::Transfer { who, rec, to } => (who, Request::Transfer { ptr: pick(rec), to: NewOwner::Ip(ips[to as usize % 5]) }),
            Op::Watch { who, rec } => (who, Request::watch(pick(rec))),
            Op::Unwatch { who, rec } => (who, Request::Unwatch { ptr: pick(rec) }),
            Op::Disconnect { who } => {
                if let Some(s) = sessions[who as usize % 4].pop() {
                    store.disconnect(s, now);
                }
                continue;
            }
            Op::Connect { who } => {
                let w = who as usize % 4;
                sessions[w].push(store.connect(ips[w]));
                continue;
            }
            Op::Advance { secs } => {
                now += Duration::from_secs(secs as u64);
                for p in store.reap(now).records {
                    versions.remove(&p);
                    // Reaped records are gone for everyone.
                    for list in sessions.iter_mut() {
                        if let Some(s) = list.last_mut() {
                            let r = store.apply(s, 0, Request::Read { ptr: p, range: None }, now, &mut rng).reply;
                            assert_eq!(r, Reply::error(Status::AddressFault, "no such record"));
                        }
                    }
                }
                continue;
            }
        };
        let Some(session) = sessions[who as usize % 4].last_mut() else { continue };
        let owner_before = req.pointer().and_then(|p| {
            match store.apply(session, 0, Request::Info { ptr: p }, now, &mut rng).reply {
                Reply::Info(i) => Some(i.owned),
                _ => None,
            }
        });
        let applied = store.apply(session, xid as u32, req.clone(), now, &mut rng);
        match (&req, &applied.reply) {
            (Request::Create { .. }, Reply::Created(p)) => {
                ptrs.push(*p);
                versions.insert(*p, 1);
            }
            (_, Reply::Written(v)) => {
                let p = req.pointer().unwrap();
                let old = versions.insert(p, *v).unwrap_or(0);
                assert!(*v > old, "versions only grow");
            }
            (Request::Delete { ptr }, Reply::Done) => {
                assert_eq!(owner_before, Some(true), "only owners delete");
                versions.remove(ptr);
            }
            _ => {}
        }
        // The books balance: each identity is charged exactly what it pays for (a
        // record handed to an absent identity stays charged to the sender until the
        // receiver connects; then the charge moves, even past the receiver's quota).
        if let Err(e) = store.audit() {
            panic!("after {req:?}: {e}");
        }
        assert_eq!(store.stats().records as usize, versions.len());
    }
});
