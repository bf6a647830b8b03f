//! The rules of records, written once: who may do what to a record, what a request
//! changes, which error wins, how quotas are charged, who pays for a transferred
//! record and when an orphan expires.
//!
//! Every function here is pure: it looks at a record's state (a [`RecordView`]), the
//! request and the limits, and returns a [`Decision`]. Nothing is stored or locked.
//! Both store backends call these functions and only store state and apply the
//! decided change atomically: the embedded [`crate::Store`] under a shard lock, the
//! Redis Cluster backend of `netswap-server` with a compare-and-set on the record's
//! revision (retrying when the record changed in between). So the rules cannot drift
//! apart between backends.
//!
//! Error precedence (docs/PROTOCOL.md): MALFORMED (at parsing), then ADDRESS_FAULT
//! (no such record), ACCESS_VIOLATION, ADDRESS_FAULT (range) or CONFLICT, TOO_LARGE
//! (record size), QUOTA_EXCEEDED (checked by [`charge`] when the change is applied).

use crate::frame::MAX_MESSAGE;
use crate::identity::Identity;
use crate::message::{RecordInfo, Reply, Request, WATCH_STATE_LEN};
use crate::store::StoreConfig;
use crate::types::{Access, Status, Version};

/// What the rules need to know about one record to decide a request about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordView {
    /// The caller's identity owns the record.
    pub owned_by_caller: bool,
    /// Access bits for other identities.
    pub access: Access,
    /// Current version.
    pub version: Version,
    /// Current data size.
    pub size: u64,
}

/// How a write changes a record's data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteKind {
    /// The whole value is replaced (REPLACE, REPLACE_IF).
    Replace,
    /// Bytes are written from this offset (WRITE_AT); the record may grow.
    At(u64),
}

/// A decided write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Write {
    /// Replace or write at an offset.
    pub kind: WriteKind,
    /// The size afterwards.
    pub new_size: u64,
    /// The version afterwards (every successful write bumps it).
    pub new_version: Version,
    /// Bytes to charge to the record's payer (negative: to give back).
    pub bytes_delta: i64,
}

/// What to do with a request, decided from the state of its record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Answer this and change nothing (a refusal, or a request that is a no-op).
    Answer(Reply),
    /// The request names a record that does not exist: ADDRESS_FAULT, and a miss for
    /// the server's throttle on pointer guessing.
    Missing,
    /// Send the record's bytes from `start` to `end` as DATA.
    Read {
        /// First byte.
        start: u64,
        /// One past the last byte.
        end: u64,
    },
    /// Answer INFO with this.
    Info(RecordInfo),
    /// Change the data (the bytes are the request's).
    Write(Write),
    /// Set the access bits (they differ from the current ones); notify "access changed".
    SetAccess(Access),
    /// Delete the record; notify "deleted".
    Delete,
    /// The caller becomes the owner and pays; the TAKEOVER bit is cleared; notify
    /// "owner changed".
    TakeOver,
    /// Hand the record to this identity (see [`payer_after_transfer`]); notify
    /// "owner changed".
    Transfer(Identity),
    /// Register (or move) the caller's watch (see [`admit_watch`]) and answer OK:
    /// empty, or with this state (a WATCH that asked for it), followed by the whole
    /// data for a data watch.
    Watch(Option<RecordInfo>),
    /// End the caller's watch, if it has one (see [`no_such_watch`]).
    Unwatch,
}

/// The largest record a data watch may watch: its OK must carry the state and the
/// whole data in one message.
pub const MAX_DATA_WATCH: u64 = MAX_MESSAGE - WATCH_STATE_LEN as u64;

/// ADDRESS_FAULT for a pointer that names no record.
pub fn no_such_record() -> Reply {
    Reply::error(Status::AddressFault, "no such record")
}

/// ADDRESS_FAULT for UNWATCH by a connection that does not watch the record.
pub fn no_such_watch() -> Reply {
    Reply::error(Status::AddressFault, "no such watch on this connection")
}

fn denied(what: &'static str) -> Reply {
    Reply::error(Status::AccessViolation, what)
}

fn too_large(size: u64, cfg: &StoreConfig) -> Reply {
    Reply::error(
        Status::TooLarge,
        format!(
            "record of {size} bytes is over the limit of {} bytes",
            cfg.max_record_bytes
        ),
    )
}

fn past_the_end(off: u64, size: u64) -> Reply {
    Reply::error(
        Status::AddressFault,
        format!("offset {off} is past the end of the record ({size} bytes)"),
    )
}

/// May the caller use the record this way? The owner may do everything; others only
/// what the access bits allow.
pub fn may(record: &RecordView, bit: Access) -> bool {
    record.owned_by_caller || record.access.contains(bit)
}

/// Decides CREATE: the size limit (quota is charged by the backend with [`charge`]).
pub fn decide_create(size: u64, cfg: &StoreConfig) -> Result<(), Reply> {
    if size > cfg.max_record_bytes {
        return Err(too_large(size, cfg));
    }
    Ok(())
}

/// Decides a request about an existing (`Some`) or missing (`None`) record.
///
/// `caller` is the caller's identity and `transfer_to` the identity a TRANSFER names
/// (resolved from an address by the backend, which holds the identity key). CREATE
/// and HELLO name no record: see [`decide_create`].
pub fn decide(
    request: &Request,
    record: Option<&RecordView>,
    caller: &Identity,
    transfer_to: Option<&Identity>,
    cfg: &StoreConfig,
) -> Decision {
    let Some(rec) = record else {
        return Decision::Missing;
    };
    match request {
        Request::Create { .. } | Request::Hello | Request::Stats => {
            unreachable!("CREATE, HELLO and STATS name no record")
        }
        Request::Read { range, .. } => {
            if !may(rec, Access::READ) {
                return Decision::Answer(denied("the record's READ bit is not set"));
            }
            match *range {
                None => Decision::Read {
                    start: 0,
                    end: rec.size,
                },
                Some((off, _)) if off > rec.size => Decision::Answer(past_the_end(off, rec.size)),
                Some((off, n)) => Decision::Read {
                    start: off,
                    end: rec.size.min(off + n as u64),
                },
            }
        }
        Request::Info { .. } => {
            if !may(rec, Access::READ) {
                return Decision::Answer(denied("the record's READ bit is not set"));
            }
            Decision::Info(RecordInfo {
                size: rec.size,
                version: rec.version,
                access: rec.access,
                owned: rec.owned_by_caller,
            })
        }
        Request::Replace { data, .. } => write(rec, None, WriteKind::Replace, data.len(), cfg),
        Request::ReplaceIf { expected, data, .. } => {
            write(rec, Some(*expected), WriteKind::Replace, data.len(), cfg)
        }
        Request::WriteAt { offset, data, .. } => {
            write(rec, None, WriteKind::At(*offset), data.len(), cfg)
        }
        Request::SetAccess { access, .. } => {
            if !rec.owned_by_caller {
                return Decision::Answer(denied("only the owner may change access bits"));
            }
            if rec.access == *access {
                return Decision::Answer(Reply::Done);
            }
            Decision::SetAccess(*access)
        }
        Request::Delete { .. } => {
            if !rec.owned_by_caller {
                return Decision::Answer(denied("only the owner may delete a record"));
            }
            Decision::Delete
        }
        Request::Takeover { .. } => {
            if rec.owned_by_caller {
                return Decision::Answer(Reply::Done);
            }
            if !rec.access.contains(Access::TAKEOVER) {
                return Decision::Answer(denied("the record's TAKEOVER bit is not set"));
            }
            Decision::TakeOver
        }
        Request::Transfer { .. } => {
            if !rec.owned_by_caller {
                return Decision::Answer(denied("only the owner may transfer a record"));
            }
            let to = *transfer_to.expect("the backend resolves TRANSFER's new owner");
            if to == *caller {
                return Decision::Answer(Reply::Done);
            }
            Decision::Transfer(to)
        }
        Request::Watch { options, .. } => {
            if !may(rec, Access::READ) {
                return Decision::Answer(denied("the record's READ bit is not set"));
            }
            if options.data && rec.size > MAX_DATA_WATCH {
                return Decision::Answer(Reply::error(
                    Status::TooLarge,
                    format!(
                        "a record of {} bytes is too large to watch with its data (at most {} bytes); watch it without data and read ranges",
                        rec.size, MAX_DATA_WATCH
                    ),
                ));
            }
            Decision::Watch(options.wants_state().then_some(RecordInfo {
                size: rec.size,
                version: rec.version,
                access: rec.access,
                owned: rec.owned_by_caller,
            }))
        }
        Request::Unwatch { .. } => Decision::Unwatch,
    }
}

fn write(
    rec: &RecordView,
    expected: Option<Version>,
    kind: WriteKind,
    len: usize,
    cfg: &StoreConfig,
) -> Decision {
    if !may(rec, Access::WRITE) {
        return Decision::Answer(denied("the record's WRITE bit is not set"));
    }
    let len = len as u64;
    let new_size = match kind {
        WriteKind::Replace => len,
        WriteKind::At(off) => {
            if off > rec.size {
                return Decision::Answer(past_the_end(off, rec.size));
            }
            rec.size.max(off + len)
        }
    };
    if let Some(expected) = expected
        && expected != rec.version
    {
        return Decision::Answer(Reply::Conflict(rec.version));
    }
    if new_size > cfg.max_record_bytes {
        return Decision::Answer(too_large(new_size, cfg));
    }
    Decision::Write(Write {
        kind,
        new_size,
        new_version: rec.version + 1,
        bytes_delta: new_size as i64 - rec.size as i64,
    })
}

/// Decides whether a connection watching `watching` records may watch one more
/// (`already` = it watches this one, and WATCH only moves that watch to a new XID).
pub fn admit_watch(watching: usize, already: bool, cfg: &StoreConfig) -> Result<(), Reply> {
    if !already && watching >= cfg.max_watches_per_connection {
        return Err(Reply::error(
            Status::QuotaExceeded,
            format!("this connection already watches {watching} records"),
        ));
    }
    Ok(())
}

/// What an identity's quota counts: the records it pays for and their data bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Records.
    pub records: u64,
    /// Data bytes.
    pub bytes: u64,
}

/// Which quota a charge would break.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuotaKind {
    /// The record count.
    Records,
    /// The data bytes.
    Bytes,
}

impl QuotaKind {
    /// The QUOTA_EXCEEDED reply for this quota.
    pub fn reply(self, cfg: &StoreConfig) -> Reply {
        match self {
            QuotaKind::Records => Reply::error(
                Status::QuotaExceeded,
                format!(
                    "the owner's quota of {} records is used up",
                    cfg.quota_records
                ),
            ),
            QuotaKind::Bytes => Reply::error(
                Status::QuotaExceeded,
                format!(
                    "the owner's quota of {} bytes would be exceeded",
                    cfg.quota_bytes
                ),
            ),
        }
    }
}

/// Adds `add` to an identity's `used` quota if both stay within the limits: the new
/// usage, or the quota that would be broken. Giving back never fails (see
/// [`release`]).
pub fn charge(used: Usage, add: Usage, cfg: &StoreConfig) -> Result<Usage, QuotaKind> {
    let records = used
        .records
        .checked_add(add.records)
        .filter(|&r| add.records == 0 || r <= cfg.quota_records)
        .ok_or(QuotaKind::Records)?;
    let bytes = used
        .bytes
        .checked_add(add.bytes)
        .filter(|&b| add.bytes == 0 || b <= cfg.quota_bytes)
        .ok_or(QuotaKind::Bytes)?;
    Ok(Usage { records, bytes })
}

/// Gives back what [`charge`] took.
pub fn release(used: Usage, back: Usage) -> Usage {
    Usage {
        records: used.records.saturating_sub(back.records),
        bytes: used.bytes.saturating_sub(back.bytes),
    }
}

/// Who pays (is charged in quota) for a record after TRANSFER to an identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Payer {
    /// The new owner pays from now on.
    NewOwner,
    /// The one who paid so far keeps paying until the new owner connects ("parked"),
    /// then the charge moves to the new owner, even past its quota. So an identity
    /// cannot keep more than its quota alive by handing records to identities that
    /// never connect: what it hands over still counts against it until the receiver
    /// shows up, and is reaped after the grace period if it never does.
    Unchanged,
}

/// The payer after TRANSFER to an identity that has (`true`) or has not an open
/// connection. TAKEOVER is always paid by the taker, who is connected.
pub fn payer_after_transfer(receiver_connected: bool) -> Payer {
    if receiver_connected {
        Payer::NewOwner
    } else {
        Payer::Unchanged
    }
}

/// When a record whose owner has no open connection expires: the later of the
/// owner's own deadline (its last connection closed, plus the grace period) and the
/// record's (it was handed to the owner while the owner was away, plus the grace
/// period; void once the owner has connected since). `None`: not set to expire.
pub fn orphan_expiry<T: Ord>(owner_deadline: Option<T>, record_deadline: Option<T>) -> Option<T> {
    match (owner_deadline, record_deadline) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    use crate::types::Pointer;

    fn cfg() -> StoreConfig {
        StoreConfig {
            max_record_bytes: 100,
            quota_records: 3,
            quota_bytes: 50,
            max_watches_per_connection: 2,
            ..StoreConfig::default()
        }
    }

    fn view(owned: bool, access: Access, size: u64) -> RecordView {
        RecordView {
            owned_by_caller: owned,
            access,
            version: 7,
            size,
        }
    }

    const ME: Identity = Identity([1; 32]);
    const P: Pointer = match Pointer::new(5) {
        Some(p) => p,
        None => unreachable!(),
    };

    fn d(req: Request, rec: Option<&RecordView>) -> Decision {
        decide(&req, rec, &ME, Some(&Identity([2; 32])), &cfg())
    }

    #[test]
    fn missing_records_are_misses_whatever_the_request() {
        assert_eq!(d(Request::Delete { ptr: P }, None), Decision::Missing);
        assert_eq!(
            d(
                Request::Read {
                    ptr: P,
                    range: None
                },
                None
            ),
            Decision::Missing
        );
    }

    #[test]
    fn error_precedence_is_access_then_range_or_conflict_then_size() {
        let other = view(false, Access::READ, 10);
        // No WRITE bit beats a range past the end and a size over the limit.
        let r = d(
            Request::WriteAt {
                ptr: P,
                offset: 99,
                data: Bytes::from(vec![0; 200]),
            },
            Some(&other),
        );
        assert!(matches!(r, Decision::Answer(ref e) if e.status() == Status::AccessViolation));
        let writable = view(false, Access::WRITE, 10);
        let r = d(
            Request::WriteAt {
                ptr: P,
                offset: 11,
                data: Bytes::from(vec![0; 200]),
            },
            Some(&writable),
        );
        assert!(matches!(r, Decision::Answer(ref e) if e.status() == Status::AddressFault));
        let r = d(
            Request::ReplaceIf {
                ptr: P,
                expected: 1,
                data: Bytes::from(vec![0; 200]),
            },
            Some(&writable),
        );
        assert_eq!(r, Decision::Answer(Reply::Conflict(7)));
        let r = d(
            Request::Replace {
                ptr: P,
                data: Bytes::from(vec![0; 101]),
            },
            Some(&writable),
        );
        assert!(matches!(r, Decision::Answer(ref e) if e.status() == Status::TooLarge));
    }

    #[test]
    fn writes_bump_the_version_and_say_what_to_charge() {
        let rec = view(true, Access::empty(), 10);
        assert_eq!(
            d(
                Request::WriteAt {
                    ptr: P,
                    offset: 8,
                    data: Bytes::from_static(b"abcd")
                },
                Some(&rec)
            ),
            Decision::Write(Write {
                kind: WriteKind::At(8),
                new_size: 12,
                new_version: 8,
                bytes_delta: 2
            })
        );
        assert_eq!(
            d(
                Request::Replace {
                    ptr: P,
                    data: Bytes::from_static(b"ab")
                },
                Some(&rec)
            ),
            Decision::Write(Write {
                kind: WriteKind::Replace,
                new_size: 2,
                new_version: 8,
                bytes_delta: -8
            })
        );
    }

    #[test]
    fn ranges_are_cut_at_the_end_and_offsets_past_it_fault() {
        let rec = view(false, Access::READ, 10);
        let read = |off, n| {
            d(
                Request::Read {
                    ptr: P,
                    range: Some((off, n)),
                },
                Some(&rec),
            )
        };
        assert_eq!(read(4, 100), Decision::Read { start: 4, end: 10 });
        assert_eq!(read(10, 5), Decision::Read { start: 10, end: 10 });
        assert!(matches!(read(11, 1), Decision::Answer(_)));
    }

    #[test]
    fn ownership_changes() {
        let takeable = view(false, Access::TAKEOVER, 1);
        assert_eq!(
            d(Request::Takeover { ptr: P }, Some(&takeable)),
            Decision::TakeOver
        );
        let mine = view(true, Access::empty(), 1);
        assert_eq!(
            d(Request::Takeover { ptr: P }, Some(&mine)),
            Decision::Answer(Reply::Done)
        );
        let to_me = decide(
            &Request::Transfer {
                ptr: P,
                to: ME.into(),
            },
            Some(&mine),
            &ME,
            Some(&ME),
            &cfg(),
        );
        assert_eq!(to_me, Decision::Answer(Reply::Done));
        assert_eq!(payer_after_transfer(false), Payer::Unchanged);
        assert_eq!(payer_after_transfer(true), Payer::NewOwner);
    }

    #[test]
    fn quotas_are_all_or_nothing() {
        let c = cfg();
        let used = Usage {
            records: 2,
            bytes: 40,
        };
        assert_eq!(
            charge(
                used,
                Usage {
                    records: 1,
                    bytes: 10
                },
                &c
            ),
            Ok(Usage {
                records: 3,
                bytes: 50
            })
        );
        assert_eq!(
            charge(
                used,
                Usage {
                    records: 2,
                    bytes: 0
                },
                &c
            ),
            Err(QuotaKind::Records)
        );
        assert_eq!(
            charge(
                used,
                Usage {
                    records: 1,
                    bytes: 11
                },
                &c
            ),
            Err(QuotaKind::Bytes)
        );
        // A charge of nothing never fails, even over the quota (charges moved to a
        // receiver past its quota).
        let over = Usage {
            records: 9,
            bytes: 90,
        };
        assert_eq!(charge(over, Usage::default(), &c), Ok(over));
        assert_eq!(admit_watch(2, true, &c), Ok(()));
        assert!(admit_watch(2, false, &c).is_err());
    }

    #[test]
    fn an_orphan_expires_at_the_later_deadline() {
        assert_eq!(orphan_expiry(Some(5), Some(9)), Some(9));
        assert_eq!(orphan_expiry(Some(5), None), Some(5));
        assert_eq!(orphan_expiry::<u32>(None, None), None);
    }
}

#[cfg(test)]
mod watch_tests {
    use super::*;
    use crate::message::WatchOptions;
    use crate::types::Pointer;

    #[test]
    fn a_record_too_large_for_one_message_cannot_be_watched_with_its_data() {
        let cfg = StoreConfig::default();
        let rec = RecordView {
            owned_by_caller: true,
            access: Access::empty(),
            version: 3,
            size: MAX_DATA_WATCH + 1,
        };
        let ptr = Pointer::new(1).unwrap();
        let me = Identity([1; 32]);
        let with_data = Request::Watch {
            ptr,
            options: WatchOptions::data(),
        };
        match decide(&with_data, Some(&rec), &me, None, &cfg) {
            Decision::Answer(r) => assert_eq!(r.status(), Status::TooLarge),
            d => panic!("{d:?}"),
        }
        assert_eq!(
            decide(&Request::watch(ptr), Some(&rec), &me, None, &cfg),
            Decision::Watch(None),
            "without data it is a v1 watch"
        );
        let fits = RecordView {
            size: MAX_DATA_WATCH,
            ..rec
        };
        assert!(matches!(
            decide(&with_data, Some(&fits), &me, None, &cfg),
            Decision::Watch(Some(RecordInfo { version: 3, .. }))
        ));
    }
}
