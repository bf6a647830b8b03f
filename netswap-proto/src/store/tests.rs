use super::*;
use crate::message::{RecordInfo, WatchOptions};
use crate::types::Status;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use std::collections::HashSet;

struct World {
    store: Store,
    rng: SmallRng,
    t0: Instant,
}

fn ip(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

impl World {
    fn new(config: StoreConfig) -> World {
        World {
            store: Store::new(config, IdentityKey::new(*b"test key")),
            rng: SmallRng::seed_from_u64(7),
            t0: Instant::now(),
        }
    }
    fn default() -> World {
        World::new(StoreConfig {
            shards: 4,
            orphan_grace: Duration::from_secs(300),
            ..StoreConfig::default()
        })
    }
    fn at(&self, secs: u64) -> Instant {
        self.t0 + Duration::from_secs(secs)
    }
    fn apply(&mut self, s: &mut Session, req: Request) -> Applied {
        self.apply_at(s, req, 0)
    }
    fn apply_at(&mut self, s: &mut Session, req: Request, secs: u64) -> Applied {
        let now = self.at(secs);
        self.store.apply(s, 1, req, now, &mut self.rng)
    }
    fn reply(&mut self, s: &mut Session, req: Request) -> Reply {
        self.apply(s, req).reply
    }
    fn create(&mut self, s: &mut Session, access: Access, data: &'static [u8]) -> Pointer {
        match self.reply(
            s,
            Request::Create {
                access,
                data: Bytes::from_static(data),
            },
        ) {
            Reply::Created(p) => p,
            other => panic!("create failed: {other:?}"),
        }
    }
    fn read(&mut self, s: &mut Session, ptr: Pointer) -> Reply {
        self.reply(s, Request::Read { ptr, range: None })
    }
}

fn status(r: &Reply) -> Status {
    r.status()
}

fn data(b: &'static [u8]) -> Reply {
    Reply::Data(Bytes::from_static(b))
}

#[test]
fn create_read_and_version() {
    let mut w = World::default();
    let mut a = w.store.connect(ip(2));
    let p = w.create(&mut a, Access::empty(), b"hello");
    assert_eq!(w.read(&mut a, p), data(b"hello"));
    let info = w.reply(&mut a, Request::Info { ptr: p });
    assert_eq!(
        info,
        Reply::Info(RecordInfo {
            size: 5,
            version: 1,
            access: Access::empty(),
            owned: true
        })
    );
    let p2 = w.create(&mut a, Access::empty(), b"");
    assert_ne!(p, p2);
    assert_eq!(w.read(&mut a, p2), data(b""));
}

/// `apply_into` offers a READ's bytes (only a READ's, only if the caller may read) to
/// the sink; taken, the reply is marked sent; refused, they come in the reply.
#[test]
fn reads_offer_their_bytes_to_the_sink() {
    let mut w = World::default();
    let mut owner = w.store.connect(ip(2));
    let mut other = w.store.connect(ip(3));
    let big: &'static [u8] = Box::leak(vec![7u8; 3000].into_boxed_slice());
    let small = w.create(&mut owner, Access::empty(), b"0123456789");
    let large = w.create(&mut owner, Access::empty(), big);
    let now = w.at(0);
    let apply = |w: &mut World, s: &mut Session, req: Request, take: bool| {
        let mut got: Option<Vec<u8>> = None;
        let mut sink = |b: &[u8]| {
            got = Some(b.to_vec());
            take
        };
        let applied = w
            .store
            .apply_into(s, 1, req, None, now, &mut w.rng, &mut sink);
        (applied, got)
    };
    let read = |ptr, range| Request::Read { ptr, range };
    for (ptr, range, want) in [
        (small, None, &b"0123456789"[..]),
        (small, Some((2, 3)), &b"234"[..]),
        (large, None, big),
        (large, Some((2990, 100)), &big[..10]),
    ] {
        let (applied, got) = apply(&mut w, &mut owner, read(ptr, range), true);
        assert!(applied.sent);
        assert_eq!(got.as_deref(), Some(want));
        let (applied, got) = apply(&mut w, &mut owner, read(ptr, range), false);
        assert!(!applied.sent, "refused by the sink");
        assert_eq!(got.as_deref(), Some(want));
        assert_eq!(applied.reply, Reply::Data(Bytes::copy_from_slice(want)));
    }
    // Not offered: a read the caller may not do, a missing record, other requests.
    let (applied, got) = apply(&mut w, &mut other, read(small, None), true);
    assert_eq!(applied.reply.status(), Status::AccessViolation);
    assert!(!applied.sent && got.is_none());
    w.store.apply(
        &mut owner,
        1,
        Request::Delete { ptr: small },
        now,
        &mut w.rng,
    );
    let (applied, got) = apply(&mut w, &mut owner, read(small, None), true);
    assert!(applied.miss && !applied.sent && got.is_none());
    let (applied, got) = apply(&mut w, &mut owner, Request::Info { ptr: large }, true);
    assert!(!applied.sent && got.is_none(), "{applied:?}");
}

#[test]
fn permissions_across_identities() {
    let mut w = World::default();
    let mut owner = w.store.connect(ip(2));
    let mut other = w.store.connect(ip(3));
    let closed = w.create(&mut owner, Access::empty(), b"secret");
    let readable = w.create(&mut owner, Access::READ, b"public");
    let writable = w.create(&mut owner, Access::READ | Access::WRITE, b"shared");

    for req in [
        Request::Read {
            ptr: closed,
            range: None,
        },
        Request::Info { ptr: closed },
        Request::watch(closed),
        Request::Replace {
            ptr: readable,
            data: Bytes::from_static(b"x"),
        },
        Request::WriteAt {
            ptr: readable,
            offset: 0,
            data: Bytes::from_static(b"x"),
        },
        Request::ReplaceIf {
            ptr: readable,
            expected: 1,
            data: Bytes::from_static(b"x"),
        },
        Request::Delete { ptr: writable },
        Request::SetAccess {
            ptr: writable,
            access: Access::all(),
        },
        Request::Transfer {
            ptr: writable,
            to: NewOwner::Ip(ip(3)),
        },
        Request::Takeover { ptr: writable },
    ] {
        let r = w.reply(&mut other, req.clone());
        assert_eq!(status(&r), Status::AccessViolation, "{req:?} gave {r:?}");
    }
    assert_eq!(w.read(&mut other, readable), data(b"public"));
    assert_eq!(
        w.reply(
            &mut other,
            Request::Replace {
                ptr: writable,
                data: Bytes::from_static(b"changed")
            }
        ),
        Reply::Written(2)
    );
    assert_eq!(w.read(&mut owner, writable), data(b"changed"));
    // Nothing the other identity tried changed the closed record.
    assert_eq!(w.read(&mut owner, closed), data(b"secret"));
    let Reply::Info(info) = w.reply(&mut other, Request::Info { ptr: readable }) else {
        panic!()
    };
    assert!(!info.owned);
}

#[test]
fn unknown_pointer_is_address_fault_for_every_op() {
    let mut w = World::default();
    let mut a = w.store.connect(ip(2));
    let p = Pointer::new(12345).unwrap();
    for req in [
        Request::Read {
            ptr: p,
            range: None,
        },
        Request::Info { ptr: p },
        Request::Replace {
            ptr: p,
            data: Bytes::new(),
        },
        Request::WriteAt {
            ptr: p,
            offset: 0,
            data: Bytes::new(),
        },
        Request::ReplaceIf {
            ptr: p,
            expected: 1,
            data: Bytes::new(),
        },
        Request::Delete { ptr: p },
        Request::SetAccess {
            ptr: p,
            access: Access::READ,
        },
        Request::Takeover { ptr: p },
        Request::Transfer {
            ptr: p,
            to: NewOwner::Ip(ip(3)),
        },
        Request::watch(p),
        Request::Unwatch { ptr: p },
    ] {
        assert_eq!(
            w.reply(&mut a, req),
            Reply::error(Status::AddressFault, "no such record")
        );
    }
}

#[test]
fn ranges_read_and_write() {
    let mut w = World::default();
    let mut a = w.store.connect(ip(2));
    let p = w.create(&mut a, Access::empty(), b"0123456789");
    let rr = |off, n| Request::Read {
        ptr: p,
        range: Some((off, n)),
    };
    assert_eq!(w.reply(&mut a, rr(2, 3)), data(b"234"));
    assert_eq!(w.reply(&mut a, rr(8, 100)), data(b"89"), "cut at the end");
    assert_eq!(
        w.reply(&mut a, rr(10, 5)),
        data(b""),
        "off == size is empty"
    );
    assert_eq!(status(&w.reply(&mut a, rr(11, 1))), Status::AddressFault);
    assert_eq!(
        status(&w.reply(&mut a, rr(u64::MAX, u32::MAX))),
        Status::AddressFault
    );

    let wa = |off, d: &'static [u8]| Request::WriteAt {
        ptr: p,
        offset: off,
        data: Bytes::from_static(d),
    };
    assert_eq!(w.reply(&mut a, wa(1, b"ab")), Reply::Written(2));
    assert_eq!(w.read(&mut a, p), data(b"0ab3456789"));
    assert_eq!(w.reply(&mut a, wa(10, b"XY")), Reply::Written(3), "append");
    assert_eq!(w.reply(&mut a, wa(11, b"ZZZ")), Reply::Written(4), "grow");
    assert_eq!(w.read(&mut a, p), data(b"0ab3456789XZZZ"));
    let r = w.reply(&mut a, wa(15, b"!"));
    assert_eq!(status(&r), Status::AddressFault);
    assert_eq!(
        reason_of(&r).unwrap(),
        "offset 15 is past the end of the record (14 bytes)"
    );
    assert_eq!(w.read(&mut a, p), data(b"0ab3456789XZZZ"), "unchanged");
}

#[test]
fn write_at_is_copy_on_write_while_a_reader_holds_the_bytes() {
    let mut w = World::default();
    let mut a = w.store.connect(ip(2));
    let p = w.create(&mut a, Access::empty(), b"aaaa");
    let Reply::Data(held) = w.read(&mut a, p) else {
        panic!()
    };
    w.reply(
        &mut a,
        Request::WriteAt {
            ptr: p,
            offset: 0,
            data: Bytes::from_static(b"b"),
        },
    );
    assert_eq!(&held[..], b"aaaa", "a reply being sent keeps its bytes");
    assert_eq!(w.read(&mut a, p), data(b"baaa"));
}

#[test]
fn replace_if_conflicts_and_every_write_bumps_the_version() {
    let mut w = World::default();
    let mut a = w.store.connect(ip(2));
    let p = w.create(&mut a, Access::empty(), b"v1");
    let cas = |ver, d: &'static [u8]| Request::ReplaceIf {
        ptr: p,
        expected: ver,
        data: Bytes::from_static(d),
    };
    assert_eq!(w.reply(&mut a, cas(1, b"v2")), Reply::Written(2));
    assert_eq!(w.reply(&mut a, cas(1, b"lost")), Reply::Conflict(2));
    assert_eq!(w.read(&mut a, p), data(b"v2"));
    // Same bytes still bump the version.
    assert_eq!(
        w.reply(
            &mut a,
            Request::Replace {
                ptr: p,
                data: Bytes::from_static(b"v2")
            }
        ),
        Reply::Written(3)
    );
    // Access changes do not.
    w.reply(
        &mut a,
        Request::SetAccess {
            ptr: p,
            access: Access::READ,
        },
    );
    let Reply::Info(i) = w.reply(&mut a, Request::Info { ptr: p }) else {
        panic!()
    };
    assert_eq!((i.version, i.access), (3, Access::READ));
}

#[test]
fn record_size_limit_and_precedence() {
    let mut w = World::new(StoreConfig {
        max_record_bytes: 8,
        shards: 2,
        ..StoreConfig::default()
    });
    let mut a = w.store.connect(ip(2));
    let mut b = w.store.connect(ip(3));
    let r = w.reply(
        &mut a,
        Request::Create {
            access: Access::empty(),
            data: Bytes::from_static(b"123456789"),
        },
    );
    assert_eq!(status(&r), Status::TooLarge);
    let p = w.create(&mut a, Access::empty(), b"12345678");
    let grow = Request::WriteAt {
        ptr: p,
        offset: 8,
        data: Bytes::from_static(b"9"),
    };
    assert_eq!(status(&w.reply(&mut a, grow.clone())), Status::TooLarge);
    // ACCESS_VIOLATION comes before TOO_LARGE.
    assert_eq!(status(&w.reply(&mut b, grow)), Status::AccessViolation);
    // CONFLICT comes before TOO_LARGE.
    let r = w.reply(
        &mut a,
        Request::ReplaceIf {
            ptr: p,
            expected: 9,
            data: Bytes::from_static(b"123456789"),
        },
    );
    assert_eq!(r, Reply::Conflict(1));
    assert_eq!(w.read(&mut a, p), data(b"12345678"));
}

#[test]
fn quotas_count_records_and_bytes_per_identity() {
    let mut w = World::new(StoreConfig {
        quota_records: 2,
        quota_bytes: 10,
        shards: 2,
        ..StoreConfig::default()
    });
    let mut a = w.store.connect(ip(2));
    let mut b = w.store.connect(ip(3));
    let p1 = w.create(&mut a, Access::WRITE | Access::TAKEOVER, b"12345");
    let _p2 = w.create(&mut a, Access::empty(), b"123");
    let r = w.reply(
        &mut a,
        Request::Create {
            access: Access::empty(),
            data: Bytes::new(),
        },
    );
    assert_eq!(status(&r), Status::QuotaExceeded);
    assert!(reason_of(&r).unwrap().contains("2 records"));
    // Another identity is not affected.
    w.create(&mut b, Access::empty(), b"1234567890");
    // Growth by a writer is charged to the owner: a has 8 of 10 bytes.
    let r = w.reply(
        &mut b,
        Request::WriteAt {
            ptr: p1,
            offset: 5,
            data: Bytes::from_static(b"abc"),
        },
    );
    assert_eq!(status(&r), Status::QuotaExceeded);
    assert_eq!(
        w.reply(
            &mut b,
            Request::WriteAt {
                ptr: p1,
                offset: 5,
                data: Bytes::from_static(b"ab"),
            }
        ),
        Reply::Written(2)
    );
    assert_eq!((a.account().records(), a.account().bytes()), (2, 10));
    // Takeover charges the receiver: b is full on bytes.
    assert_eq!(
        status(&w.reply(&mut b, Request::Takeover { ptr: p1 })),
        Status::QuotaExceeded
    );
    // Shrinking gives bytes back; delete gives the record back.
    w.reply(
        &mut a,
        Request::Replace {
            ptr: p1,
            data: Bytes::new(),
        },
    );
    assert_eq!(a.account().bytes(), 3);
    w.reply(&mut a, Request::Delete { ptr: p1 });
    assert_eq!((a.account().records(), a.account().bytes()), (1, 3));
    w.create(&mut a, Access::empty(), b"1234567");
}

#[test]
fn takeover_clears_the_bit_and_moves_ownership() {
    let mut w = World::default();
    let mut a = w.store.connect(ip(2));
    let mut b = w.store.connect(ip(3));
    let mut c = w.store.connect(ip(4));
    let p = w.create(&mut a, Access::READ | Access::TAKEOVER, b"x");
    assert_eq!(
        w.reply(&mut a, Request::Takeover { ptr: p }),
        Reply::Done,
        "owner: no-op"
    );
    assert_eq!(w.reply(&mut b, Request::Takeover { ptr: p }), Reply::Done);
    let Reply::Info(i) = w.reply(&mut b, Request::Info { ptr: p }) else {
        panic!()
    };
    assert!(i.owned);
    assert_eq!(i.access, Access::READ, "TAKEOVER bit cleared");
    assert_eq!(
        status(&w.reply(&mut c, Request::Takeover { ptr: p })),
        Status::AccessViolation
    );
    assert_eq!(
        status(&w.reply(&mut a, Request::Delete { ptr: p })),
        Status::AccessViolation,
        "the old owner lost its rights"
    );
    assert_eq!((a.account().records(), b.account().records()), (0, 1));
}

#[test]
fn transfer_to_ip_and_identity() {
    let mut w = World::default();
    let mut a = w.store.connect(ip(2));
    let mut b = w.store.connect(ip(3));
    let p = w.create(&mut a, Access::TAKEOVER, b"x");
    assert_eq!(
        w.reply(
            &mut a,
            Request::Transfer {
                ptr: p,
                to: NewOwner::Ip("::ffff:127.0.0.3".parse().unwrap())
            }
        ),
        Reply::Done
    );
    assert_eq!(w.read(&mut b, p), data(b"x"), "b owns it now");
    let Reply::Info(i) = w.reply(&mut b, Request::Info { ptr: p }) else {
        panic!()
    };
    assert_eq!(i.access, Access::TAKEOVER, "TRANSFER keeps the access bits");
    assert_eq!(status(&w.read(&mut a, p)), Status::AccessViolation);
    let a_id = *a.identity();
    assert_eq!(
        w.reply(
            &mut b,
            Request::Transfer {
                ptr: p,
                to: NewOwner::Identity(a_id)
            }
        ),
        Reply::Done
    );
    assert_eq!(w.read(&mut a, p), data(b"x"));
    assert_eq!(
        w.reply(
            &mut a,
            Request::Transfer {
                ptr: p,
                to: NewOwner::Identity(a_id)
            }
        ),
        Reply::Done,
        "to oneself: no-op"
    );
}

#[test]
fn watches_see_every_event_once() {
    let mut w = World::default();
    let mut a = w.store.connect(ip(2));
    let mut b = w.store.connect(ip(3));
    let p = w.create(
        &mut a,
        Access::READ | Access::WRITE | Access::TAKEOVER,
        b"x",
    );
    let r = w
        .store
        .apply(&mut b, 40, Request::watch(p), w.t0, &mut w.rng);
    assert_eq!(r.reply, Reply::Done);
    let r = w
        .store
        .apply(&mut a, 41, Request::watch(p), w.t0, &mut w.rng);
    assert_eq!(r.reply, Reply::Done);
    let events = |r: &Applied| {
        let mut v: Vec<_> = r
            .notifications
            .iter()
            .map(|n| (n.conn, n.xid, n.event, n.version))
            .collect();
        v.sort();
        v
    };
    let (ca, cb) = (a.conn(), b.conn());
    let r = w.apply(
        &mut b,
        Request::Replace {
            ptr: p,
            data: Bytes::from_static(b"y"),
        },
    );
    assert_eq!(
        events(&r),
        vec![(ca, 41, Event::Changed, 2), (cb, 40, Event::Changed, 2)],
        "the writer's own watch is told too"
    );
    let r = w.apply(
        &mut a,
        Request::SetAccess {
            ptr: p,
            access: Access::READ | Access::TAKEOVER,
        },
    );
    assert_eq!(events(&r).len(), 2);
    assert!(
        r.notifications
            .iter()
            .all(|n| n.event == Event::AccessChanged)
    );
    let r = w.apply(
        &mut a,
        Request::SetAccess {
            ptr: p,
            access: Access::READ | Access::TAKEOVER,
        },
    );
    assert!(
        r.notifications.is_empty(),
        "no event when the bits do not change"
    );
    let r = w.apply(&mut b, Request::Takeover { ptr: p });
    assert_eq!(
        events(&r),
        vec![
            (ca, 41, Event::OwnerChanged, 2),
            (cb, 40, Event::OwnerChanged, 2)
        ]
    );
    // A second WATCH moves the watch to the new XID.
    let r = w
        .store
        .apply(&mut a, 50, Request::watch(p), w.t0, &mut w.rng);
    assert_eq!(r.reply, Reply::Done);
    assert_eq!(w.reply(&mut a, Request::Unwatch { ptr: p }), Reply::Done);
    assert_eq!(
        w.reply(&mut a, Request::Unwatch { ptr: p }),
        Reply::error(Status::AddressFault, "no such watch on this connection")
    );
    let r = w.apply(&mut b, Request::Delete { ptr: p });
    assert_eq!(events(&r), vec![(cb, 40, Event::Deleted, 2)]);
    assert_eq!(w.store.stats().watches, 0, "deletion ends the watch");
}

#[test]
fn watch_limit_per_connection() {
    let mut w = World::new(StoreConfig {
        max_watches_per_connection: 1,
        shards: 1,
        ..StoreConfig::default()
    });
    let mut a = w.store.connect(ip(2));
    let p1 = w.create(&mut a, Access::empty(), b"1");
    let p2 = w.create(&mut a, Access::empty(), b"2");
    assert_eq!(w.reply(&mut a, Request::watch(p1)), Reply::Done);
    assert_eq!(
        w.reply(&mut a, Request::watch(p1)),
        Reply::Done,
        "re-watch is fine"
    );
    assert_eq!(
        status(&w.reply(&mut a, Request::watch(p2))),
        Status::QuotaExceeded
    );
}

#[test]
fn disconnect_ends_watches() {
    let mut w = World::default();
    let mut a = w.store.connect(ip(2));
    let mut b = w.store.connect(ip(3));
    let p = w.create(&mut a, Access::READ, b"x");
    w.reply(&mut b, Request::watch(p));
    assert_eq!(w.store.stats().watches, 1);
    w.store.disconnect(b, w.at(0));
    assert_eq!(w.store.stats().watches, 0);
    let r = w.apply(
        &mut a,
        Request::Replace {
            ptr: p,
            data: Bytes::new(),
        },
    );
    assert!(r.notifications.is_empty());
}

#[test]
fn orphans_are_reaped_after_the_grace_period() {
    let mut w = World::default();
    let mut a = w.store.connect(ip(2));
    let mut b = w.store.connect(ip(3));
    let p = w.create(&mut a, Access::READ, b"x");
    w.reply(&mut b, Request::watch(p));
    assert_eq!(w.store.disconnect(a, w.at(10)), Some(w.at(310)));
    assert_eq!(w.store.next_deadline(), Some(w.at(310)));
    assert_eq!(w.store.reap(w.at(309)), Reaped::default());
    assert_eq!(
        w.read(&mut b, p),
        data(b"x"),
        "readable during the grace period"
    );
    let reaped = w.store.reap(w.at(310));
    assert_eq!(reaped.records, vec![p]);
    assert_eq!(reaped.notifications.len(), 1);
    assert_eq!(reaped.notifications[0].event, Event::Deleted);
    assert_eq!(status(&w.read(&mut b, p)), Status::AddressFault);
    assert_eq!(w.store.next_deadline(), None);
    assert_eq!(
        w.store.stats().accounts,
        1,
        "the gone identity is forgotten"
    );
}

#[test]
fn reconnect_keeps_records() {
    let mut w = World::default();
    let mut a = w.store.connect(ip(2));
    let p = w.create(&mut a, Access::empty(), b"x");
    w.store.disconnect(a, w.at(0));
    let mut a = w.store.connect(ip(2));
    assert_eq!(w.store.reap(w.at(1000)), Reaped::default());
    assert_eq!(w.read(&mut a, p), data(b"x"));
    assert_eq!(w.store.next_deadline(), None);
}

#[test]
fn a_second_connection_keeps_the_identity_online() {
    let mut w = World::default();
    let mut a1 = w.store.connect(ip(2));
    let a2 = w.store.connect(ip(2));
    let p = w.create(&mut a1, Access::empty(), b"x");
    assert_eq!(w.store.disconnect(a2, w.at(0)), None);
    assert_eq!(w.store.reap(w.at(1000)), Reaped::default());
    assert_eq!(w.read(&mut a1, p), data(b"x"));
}

#[test]
fn adoption_saves_an_orphan() {
    let mut w = World::default();
    let mut a = w.store.connect(ip(2));
    let mut b = w.store.connect(ip(3));
    let kept = w.create(&mut a, Access::TAKEOVER, b"kept");
    let lost = w.create(&mut a, Access::empty(), b"lost");
    w.store.disconnect(a, w.at(0));
    assert_eq!(
        w.reply(&mut b, Request::Takeover { ptr: kept }),
        Reply::Done
    );
    assert_eq!(w.store.reap(w.at(300)).records, vec![lost]);
    assert_eq!(w.read(&mut b, kept), data(b"kept"));
}

#[test]
fn transfer_to_an_absent_identity_starts_that_records_grace() {
    let mut w = World::default();
    let mut a = w.store.connect(ip(2));
    let p = w.create(&mut a, Access::empty(), b"gift");
    let absent = NewOwner::Ip(ip(9));
    assert_eq!(
        w.apply_at(&mut a, Request::Transfer { ptr: p, to: absent }, 100)
            .reply,
        Reply::Done
    );
    assert_eq!(w.store.next_deadline(), Some(w.at(400)));
    assert!(w.store.reap(w.at(399)).records.is_empty());
    assert_eq!(w.store.reap(w.at(400)).records, vec![p]);
    assert_eq!(a.account().records(), 0);
}

#[test]
fn transfer_then_connect_cancels_the_grace() {
    let mut w = World::default();
    let mut a = w.store.connect(ip(2));
    let p = w.create(&mut a, Access::empty(), b"gift");
    w.apply(
        &mut a,
        Request::Transfer {
            ptr: p,
            to: NewOwner::Ip(ip(9)),
        },
    );
    let mut nine = w.store.connect(ip(9));
    assert!(w.store.reap(w.at(400)).records.is_empty());
    assert_eq!(w.read(&mut nine, p), data(b"gift"));
    // When it leaves again, its own grace counts from then.
    w.store.disconnect(nine, w.at(500));
    assert!(w.store.reap(w.at(799)).records.is_empty());
    assert_eq!(w.store.reap(w.at(800)).records, vec![p]);
}

#[test]
fn transfer_to_an_identity_already_in_grace_gets_the_later_deadline() {
    let mut w = World::default();
    let mut a = w.store.connect(ip(2));
    let b = w.store.connect(ip(3));
    let mut b2 = w.store.connect(ip(3));
    let own = w.create(&mut b2, Access::empty(), b"b's own");
    w.store.disconnect(b, w.at(0));
    w.store.disconnect(b2, w.at(0)); // b's records expire at 300
    let gift = w.create(&mut a, Access::empty(), b"gift");
    let b_id = w.store.identity_of(ip(3));
    w.apply_at(
        &mut a,
        Request::Transfer {
            ptr: gift,
            to: NewOwner::Identity(b_id),
        },
        200,
    );
    assert_eq!(w.store.reap(w.at(300)).records, vec![own]);
    assert!(w.store.reap(w.at(499)).records.is_empty());
    assert_eq!(w.store.reap(w.at(500)).records, vec![gift]);
}

#[test]
fn hello_reports_limits_and_identity() {
    let mut w = World::default();
    let mut a = w.store.connect(ip(2));
    let Reply::Hello(h) = w.reply(&mut a, Request::Hello) else {
        panic!()
    };
    assert_eq!(h.protocol, 1);
    assert_eq!(h.max_record_bytes, 64 << 20);
    assert_eq!(h.orphan_grace_secs, 300);
    assert_eq!(h.identity, w.store.identity_of(ip(2)));
}

#[test]
fn pointers_are_not_sequential() {
    let mut w = World::default();
    let mut a = w.store.connect(ip(2));
    let ps: Vec<u64> = (0..100)
        .map(|_| w.create(&mut a, Access::empty(), b"").get())
        .collect();
    let sequential = ps
        .windows(2)
        .filter(|p| p[1].wrapping_sub(p[0]) == 1)
        .count();
    assert_eq!(sequential, 0);
    let distinct: HashSet<_> = ps.iter().collect();
    assert_eq!(distinct.len(), 100);
}

#[test]
fn small_data_does_not_pin_the_network_buffer() {
    let mut w = World::default();
    let mut a = w.store.connect(ip(2));
    let big = Bytes::from(vec![1u8; 65536]);
    let p = match w.reply(
        &mut a,
        Request::Create {
            access: Access::empty(),
            data: big.slice(0..10),
        },
    ) {
        Reply::Created(p) => p,
        r => panic!("{r:?}"),
    };
    // If the store kept a slice of `big`, `big` would not be unique.
    assert!(big.try_into_mut().is_ok());
    assert_eq!(w.read(&mut a, p), Reply::Data(Bytes::from(vec![1u8; 10])));
}

#[test]
fn quota_cannot_be_parked_with_identities_that_never_connect() {
    // Issue 13: one identity kept 50 × its byte quota alive by handing each full
    // record to an identity that never connects, then creating more.
    let mut w = World::new(StoreConfig {
        quota_bytes: 100_000,
        shards: 4,
        ..StoreConfig::default()
    });
    let mut a = w.store.connect(ip(2));
    let full = Bytes::from(vec![7u8; 100_000]);
    let mut created = 0;
    for i in 0..50u8 {
        let r = w.reply(
            &mut a,
            Request::Create {
                access: Access::empty(),
                data: full.clone(),
            },
        );
        let Reply::Created(p) = r else {
            assert_eq!(status(&r), Status::QuotaExceeded);
            continue;
        };
        created += 1;
        let nobody = NewOwner::Identity(Identity([i; 32]));
        assert_eq!(
            w.reply(&mut a, Request::Transfer { ptr: p, to: nobody }),
            Reply::Done
        );
    }
    assert_eq!(created, 1, "what a hands to absent identities still counts");
    assert_eq!(a.account().bytes(), 100_000);
    assert_eq!(w.store.stats().data_bytes, 100_000);
}

#[test]
fn a_parked_charge_moves_to_the_receiver_when_it_connects() {
    let mut w = World::new(StoreConfig {
        quota_records: 1,
        shards: 4,
        ..StoreConfig::default()
    });
    let mut a = w.store.connect(ip(2));
    let p = w.create(&mut a, Access::empty(), b"gift");
    w.reply(
        &mut a,
        Request::Transfer {
            ptr: p,
            to: NewOwner::Ip(ip(9)),
        },
    );
    assert_eq!(a.account().records(), 1, "a pays until 9 connects");
    let nine = w.store.connect(ip(9));
    assert_eq!((a.account().records(), nine.account().records()), (0, 1));
    assert_eq!(nine.account().bytes(), 4);
    w.create(&mut a, Access::empty(), b"room again");
    // 9 is at its quota of one record; a second gift while connected is refused ...
    let mut b = w.store.connect(ip(3));
    let q = w.create(&mut b, Access::empty(), b"second");
    assert_eq!(
        status(&w.reply(
            &mut b,
            Request::Transfer {
                ptr: q,
                to: NewOwner::Ip(ip(9))
            }
        )),
        Status::QuotaExceeded
    );
    // ... but gifts received while away move even past the quota.
    w.store.disconnect(nine, w.at(0));
    assert_eq!(
        w.reply(
            &mut b,
            Request::Transfer {
                ptr: q,
                to: NewOwner::Ip(ip(9))
            }
        ),
        Reply::Done
    );
    let nine = w.store.connect(ip(9));
    assert_eq!(nine.account().records(), 2);
    assert_eq!(b.account().records(), 0);
    assert_eq!(w.read(&mut a, p).status(), Status::AccessViolation);
}

#[test]
fn an_unclaimed_gift_is_reaped_and_gives_the_sender_its_quota_back() {
    let mut w = World::new(StoreConfig {
        quota_records: 1,
        shards: 4,
        ..StoreConfig::default()
    });
    let mut a = w.store.connect(ip(2));
    let p = w.create(&mut a, Access::empty(), b"gift");
    w.apply_at(
        &mut a,
        Request::Transfer {
            ptr: p,
            to: NewOwner::Ip(ip(9)),
        },
        10,
    );
    let r = w.reply(
        &mut a,
        Request::Create {
            access: Access::empty(),
            data: Bytes::new(),
        },
    );
    assert_eq!(status(&r), Status::QuotaExceeded);
    assert_eq!(w.store.reap(w.at(310)).records, vec![p]);
    assert_eq!(a.account().records(), 0);
    w.create(&mut a, Access::empty(), b"");
}

#[test]
fn accounts_of_transfer_targets_are_forgotten_when_nothing_refers_to_them() {
    // Issue 13: TRANSFER to a made-up identity, TAKEOVER back, SET_ACCESS R|T; every
    // cycle used to leave an account behind (~185 B each).
    let mut w = World::default();
    let mut a = w.store.connect(ip(2));
    let p = w.create(&mut a, Access::READ | Access::TAKEOVER, b"cycled");
    let before = w.store.stats().accounts;
    for i in 0..1000u32 {
        let mut id = [0u8; 32];
        id[..4].copy_from_slice(&i.to_be_bytes());
        let to = NewOwner::Identity(Identity(id));
        assert_eq!(
            w.reply(&mut a, Request::Transfer { ptr: p, to }),
            Reply::Done
        );
        assert_eq!(w.reply(&mut a, Request::Takeover { ptr: p }), Reply::Done);
        w.reply(
            &mut a,
            Request::SetAccess {
                ptr: p,
                access: Access::READ | Access::TAKEOVER,
            },
        );
    }
    assert_eq!(w.store.stats().accounts, before);
    // Also when the gift is deleted or reaped instead of taken back.
    let q = w.create(&mut a, Access::empty(), b"x");
    w.reply(
        &mut a,
        Request::Transfer {
            ptr: q,
            to: NewOwner::Identity(Identity([9; 32])),
        },
    );
    assert_eq!(w.store.stats().accounts, before + 1);
    w.store.reap(w.at(400));
    assert_eq!(w.store.stats().accounts, before);
    assert_eq!(a.account().records(), 1);
}

#[test]
fn a_snapshot_restores_every_record_exactly_and_starts_the_grace() {
    use crate::snapshot::{SnapshotLimits, SnapshotReader, SnapshotWriter};
    let mut w = World::default();
    let mut a = w.store.connect(ip(2));
    let mut b = w.store.connect(ip(3));
    let mut made = Vec::new();
    for (i, len) in [0usize, 1, 64, 65, 1390, 5000, 200_000]
        .into_iter()
        .enumerate()
    {
        let data: Vec<u8> = (0..len).map(|j| (i * 31 + j) as u8).collect();
        let access = Access::from_bits_truncate(i as u8);
        let s = if i % 2 == 0 { &mut a } else { &mut b };
        let Reply::Created(p) = w.reply(
            s,
            Request::Create {
                access,
                data: data.into(),
            },
        ) else {
            panic!()
        };
        made.push(p);
    }
    // Versions, and a parked record (handed to an identity that never connected).
    for _ in 0..3 {
        w.reply(
            &mut a,
            Request::WriteAt {
                ptr: made[0],
                offset: 0,
                data: Bytes::from_static(b"z"),
            },
        );
    }
    w.reply(
        &mut b,
        Request::Transfer {
            ptr: made[1],
            to: NewOwner::Ip(ip(9)),
        },
    );
    let key = IdentityKey::new(*b"test key");
    let mut file = SnapshotWriter::new(Vec::new(), &key, 0).unwrap();
    w.store
        .export(|chunk| {
            for r in &chunk {
                file.write(r)?;
            }
            Ok::<_, std::io::Error>(())
        })
        .unwrap();
    let (totals, file) = file.finish().unwrap();
    assert_eq!(totals.records, made.len() as u64);

    let fresh = Store::new(w.store.config().clone(), key.clone());
    let mut reader = SnapshotReader::new(
        &file[..],
        &key,
        SnapshotLimits {
            max_record_bytes: 64 << 20,
        },
    )
    .unwrap();
    let mut restore = fresh.restore();
    while let Some(r) = reader.next_record().unwrap() {
        restore.add(r).unwrap();
    }
    let t0 = w.at(1000);
    assert_eq!(restore.finish(t0), (totals.records, totals.bytes));
    fresh.audit().unwrap();
    assert_eq!(fresh.stats().records, w.store.stats().records);
    assert_eq!(fresh.stats().data_bytes, w.store.stats().data_bytes);
    let mut rng = SmallRng::seed_from_u64(1);
    let mut a2 = fresh.connect(ip(2));
    let mut nine = fresh.connect(ip(9));
    for p in &made {
        let before = w
            .store
            .apply(&mut a, 0, Request::Info { ptr: *p }, t0, &mut w.rng)
            .reply;
        let after = fresh
            .apply(&mut a2, 0, Request::Info { ptr: *p }, t0, &mut rng)
            .reply;
        assert_eq!(before, after, "metadata of {p}");
        let read = |st: &Store, s: &mut Session, rng: &mut SmallRng| {
            st.apply(
                s,
                0,
                Request::Read {
                    ptr: *p,
                    range: None,
                },
                t0,
                rng,
            )
            .reply
        };
        let mut owner9 = read(&fresh, &mut nine, &mut rng);
        if owner9.status() != Status::Data {
            owner9 = read(&fresh, &mut a2, &mut rng);
        }
        let mut orig = read(&w.store, &mut a, &mut w.rng);
        if orig.status() != Status::Data {
            orig = read(&w.store, &mut b, &mut w.rng);
        }
        if orig.status() == Status::Data {
            assert_eq!(orig, owner9, "bytes of {p}");
        }
    }
    // 9 connected after the restore: the parked record's charge moved to it.
    assert_eq!(nine.account().records(), 1);
    // Everyone else is offline since the load: reaped a grace period after it,
    // unless they came back (2 did).
    fresh.disconnect(nine, t0);
    let reaped = fresh.reap(t0 + Duration::from_secs(300));
    assert_eq!(reaped.records.len(), 3, "b's records, and 9's gift");
    fresh.audit().unwrap();
}

#[test]
fn a_data_watch_starts_from_the_state_and_gets_the_written_bytes() {
    let mut w = World::default();
    let mut a = w.store.connect(ip(2));
    let mut b = w.store.connect(ip(3));
    let p = w.create(&mut a, Access::READ | Access::WRITE, b"hello world");
    w.reply(
        &mut a,
        Request::WriteAt {
            ptr: p,
            offset: 0,
            data: Bytes::from_static(b"H"),
        },
    );
    let watch = |options| Request::Watch { ptr: p, options };
    // State only: INFO's fields, no bytes.
    let state = WatchOptions {
        state: true,
        ..WatchOptions::default()
    };
    let info = RecordInfo {
        size: 11,
        version: 2,
        access: Access::READ | Access::WRITE,
        owned: false,
    };
    assert_eq!(
        w.reply(&mut b, watch(state)),
        Reply::Watching(info, Bytes::new())
    );
    // Data: the state and the whole value, then the bytes of every change.
    assert_eq!(
        w.reply(&mut b, watch(WatchOptions::data())),
        Reply::Watching(info, Bytes::from_static(b"Hello world"))
    );
    let plain = w.store.connect(ip(4));
    let mut plain = plain;
    w.reply(&mut plain, Request::watch(p));
    let r = w.apply(
        &mut a,
        Request::WriteAt {
            ptr: p,
            offset: 6,
            data: Bytes::from_static(b"W"),
        },
    );
    let for_b = r.notifications.iter().find(|n| n.conn == b.conn()).unwrap();
    assert_eq!(
        for_b.delta,
        Some(Delta {
            base: 2,
            size: 11,
            ranges: vec![(6, Bytes::from_static(b"W"))]
        })
    );
    let for_plain = r
        .notifications
        .iter()
        .find(|n| n.conn == plain.conn())
        .unwrap();
    assert_eq!(for_plain.delta, None, "a v1 watch gets no bytes");
    assert_eq!(
        for_plain.to_reply().encode(1).len(),
        16,
        "and exactly v1's NOTIFY"
    );
    let r = w.apply(
        &mut a,
        Request::Replace {
            ptr: p,
            data: Bytes::from_static(b"bye"),
        },
    );
    let for_b = r.notifications.iter().find(|n| n.conn == b.conn()).unwrap();
    assert_eq!(
        for_b.to_reply(),
        Reply::Notify {
            event: Event::Changed,
            ptr: p,
            version: 4,
            delta: Some(Delta {
                base: 3,
                size: 3,
                ranges: vec![(0, Bytes::from_static(b"bye"))]
            })
        }
    );
    // A watch without READ is refused as before, with or without data.
    let mut c = w.store.connect(ip(5));
    let q = w.create(&mut c, Access::empty(), b"secret");
    assert_eq!(
        status(&w.reply(
            &mut b,
            Request::Watch {
                ptr: q,
                options: WatchOptions::data()
            }
        )),
        Status::AccessViolation
    );
}

#[test]
fn a_deleted_records_pointer_never_names_the_record_that_reuses_its_slot() {
    // Few records, much churn: slots are reused over and over (the free list is
    // last in, first out), and every pointer ever handed out is checked to name
    // only its own record or nothing.
    let mut w = World::default();
    let mut a = w.store.connect(ip(2));
    let mut live: Vec<(Pointer, u64)> = Vec::new();
    let mut dead: Vec<Pointer> = Vec::new();
    let mut seen = HashSet::new();
    for i in 0..20_000u64 {
        if live.len() >= 8 || (i % 3 == 0 && !live.is_empty()) {
            let (p, _) = live.swap_remove((i as usize * 7) % live.len());
            assert_eq!(w.reply(&mut a, Request::Delete { ptr: p }), Reply::Done);
            dead.push(p);
        }
        let value = Bytes::copy_from_slice(&i.to_le_bytes());
        let Reply::Created(p) = w.reply(
            &mut a,
            Request::Create {
                access: Access::empty(),
                data: value,
            },
        ) else {
            panic!()
        };
        assert!(seen.insert(p), "pointer {p} handed out twice");
        live.push((p, i));
    }
    for (p, i) in &live {
        assert_eq!(
            w.read(&mut a, *p),
            Reply::Data(Bytes::copy_from_slice(&i.to_le_bytes()))
        );
    }
    for p in dead.iter().step_by(97) {
        assert_eq!(status(&w.read(&mut a, *p)), Status::AddressFault, "{p}");
    }
    assert_eq!(w.store.stats().records, live.len() as u64);
    w.store.audit().unwrap();
}

#[test]
fn restored_records_and_new_ones_live_side_by_side() {
    let mut w = World::default();
    let mut a = w.store.connect(ip(2));
    let old: Vec<Pointer> = (0..300)
        .map(|_| w.create(&mut a, Access::READ, b"old"))
        .collect();
    let mut chunks = Vec::new();
    w.store
        .export(|c| {
            chunks.extend(c);
            Ok::<_, ()>(())
        })
        .unwrap();
    // A new store (a restart): a new key, so the old pointers are foreign to it.
    let fresh = Store::new(w.store.config().clone(), IdentityKey::new(*b"test key"));
    let mut restore = fresh.restore();
    for r in chunks {
        restore.add(r).unwrap();
    }
    restore.finish(w.at(0));
    let mut rng = SmallRng::seed_from_u64(3);
    let mut a2 = fresh.connect(ip(2));
    let mut apply = |s: &mut Session, req| fresh.apply(s, 1, req, w.at(0), &mut rng).reply;
    let read = |p: &Pointer| Request::Read {
        ptr: *p,
        range: None,
    };
    let new: Vec<Pointer> = (0..300)
        .map(|_| {
            match apply(
                &mut a2,
                Request::Create {
                    access: Access::READ,
                    data: Bytes::from_static(b"new"),
                },
            ) {
                Reply::Created(p) => p,
                r => panic!("{r:?}"),
            }
        })
        .collect();
    assert!(new.iter().all(|p| !old.contains(p)));
    for (ps, want) in [(&old, "old"), (&new, "new")] {
        for p in ps {
            let got = apply(&mut a2, read(p));
            assert_eq!(got, Reply::Data(Bytes::from(want)), "{p}");
        }
    }
    // Deleting restored records frees their slots for new ones; what remains is found.
    for p in old.iter().step_by(2) {
        assert_eq!(apply(&mut a2, Request::Delete { ptr: *p }), Reply::Done);
    }
    for _ in 0..150 {
        apply(
            &mut a2,
            Request::Create {
                access: Access::empty(),
                data: Bytes::from_static(b"again"),
            },
        );
    }
    for p in old.iter().skip(1).step_by(2).chain(&new) {
        let got = apply(&mut a2, read(p));
        assert_eq!(got.status(), Status::Data, "{p}");
    }
    for p in old.iter().step_by(2) {
        let got = apply(&mut a2, read(p));
        assert_eq!(got.status(), Status::AddressFault, "{p}");
    }
    assert_eq!(fresh.stats().records, 150 + 300 + 150);
    fresh.audit().unwrap();
}

#[test]
fn large_values_let_go_of_are_retired_not_freed_in_place() {
    let mut w = World::default();
    let retired: Arc<Mutex<Vec<usize>>> = Arc::default();
    let seen = retired.clone();
    w.store
        .set_retire(move |b: Bytes| seen.lock().unwrap().push(b.len()));
    let taken = || std::mem::take(&mut *retired.lock().unwrap());
    let mut a = w.store.connect(ip(2));
    let big = |n: usize, fill: u8| Bytes::from(vec![fill; n]);
    let replace = |ptr, data| Request::Replace { ptr, data };
    let p = match w.reply(
        &mut a,
        Request::Create {
            access: Access::empty(),
            data: big(300_000, 1),
        },
    ) {
        Reply::Created(p) => p,
        other => panic!("{other:?}"),
    };
    // Replaced by a large value, by a small one: the old large value is retired.
    assert_eq!(
        w.reply(&mut a, replace(p, big(400_000, 2))),
        Reply::Written(2)
    );
    assert_eq!(taken(), vec![300_000]);
    assert_eq!(w.reply(&mut a, replace(p, big(10, 3))), Reply::Written(3));
    assert_eq!(taken(), vec![400_000]);
    // Small values, and values under 256 KiB, are freed in place.
    assert_eq!(
        w.reply(&mut a, replace(p, big(200_000, 4))),
        Reply::Written(4)
    );
    assert_eq!(
        w.reply(&mut a, replace(p, big(500_000, 5))),
        Reply::Written(5)
    );
    assert_eq!(taken(), Vec::<usize>::new());
    assert_eq!(w.read(&mut a, p), Reply::Data(big(500_000, 5)));
    // Deleted; reaped.
    assert_eq!(w.reply(&mut a, Request::Delete { ptr: p }), Reply::Done);
    assert_eq!(taken(), vec![500_000]);
    let q = match w.reply(
        &mut a,
        Request::Create {
            access: Access::empty(),
            data: big(1 << 20, 6),
        },
    ) {
        Reply::Created(q) => q,
        other => panic!("{other:?}"),
    };
    w.store.disconnect(a, w.at(10));
    assert_eq!(w.store.reap(w.at(310)).records, vec![q]);
    assert_eq!(taken(), vec![1 << 20]);
}

#[test]
fn prefetch_of_any_pointer_changes_nothing() {
    let mut w = World::default();
    let mut a = w.store.connect(ip(2));
    let big: &'static [u8] = &[5u8; 3000];
    let p = w.create(&mut a, Access::empty(), big);
    let q = w.create(&mut a, Access::empty(), b"small");
    let gone = w.create(&mut a, Access::empty(), big);
    assert_eq!(
        status(&w.reply(&mut a, Request::Delete { ptr: gone })),
        Status::Ok
    );
    // Live records, a deleted one, and pointers naming slots and pages that do not
    // exist; more than the 32 looked at.
    let mut ptrs = vec![p, q, gone];
    ptrs.extend((1..100u64).map(|n| Pointer::new(n.wrapping_mul(0x9E37_79B9_7F4A_7C15)).unwrap()));
    let at: Vec<Located> = ptrs.iter().map(|&p| w.store.locate_ahead(p)).collect();
    w.store.prefetch(at.iter().copied(), true);
    w.store.prefetch(at.iter().copied(), false);
    w.store.prefetch(std::iter::empty(), true);
    // Located ahead for another pointer: the store decrypts the request's own.
    let mut sink = |_: &[u8]| false;
    let read = Request::Read {
        ptr: q,
        range: None,
    };
    let now = w.at(0);
    let applied = w
        .store
        .apply_into(&mut a, 9, read, Some(at[0]), now, &mut w.rng, &mut sink);
    assert_eq!(applied.reply, data(b"small"));
    assert_eq!(w.read(&mut a, p), Reply::Data(Bytes::from_static(big)));
    assert_eq!(w.read(&mut a, q), data(b"small"));
    assert_eq!(status(&w.read(&mut a, gone)), Status::AddressFault);
    assert_eq!(w.store.stats().records, 2);
}
