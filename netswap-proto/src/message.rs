//! Typed requests and replies, parsed from and encoded to message payloads.
//!
//! A message is what [`crate::Reassembler`] hands over: `XID`, `OP`, `ARG` and the whole
//! payload. [`Request::parse`] turns it into a [`Request`] or a [`Malformed`] with a
//! precise reason; [`Reply::parse`] does the same for replies on the client side.
//! Both encode to an [`OutMessage`], which [`crate::OutQueue`] cuts into frames.

use std::borrow::Cow;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use bytes::{Buf, Bytes, BytesMut};

use crate::frame::MAX_MESSAGE;
use crate::identity::{Identity, normalize_ip};
use crate::types::{Access, Event, Opcode, Pointer, Status, Version};

/// Bytes a [`Head`] holds inline.
pub const HEAD_CAPACITY: usize = 72;

/// The small first part of a message payload (pointers, offsets, versions, and
/// small values), held inline: building and sending it allocates nothing and
/// touches no reference count.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Head {
    len: u8,
    buf: [u8; HEAD_CAPACITY],
}

impl Head {
    /// An empty head.
    pub const fn new() -> Head {
        Head {
            len: 0,
            buf: [0; HEAD_CAPACITY],
        }
    }
    /// A head holding `bytes`, which must fit [`HEAD_CAPACITY`].
    pub fn from_slice(bytes: &[u8]) -> Head {
        let mut h = Head::new();
        h.put(bytes);
        h
    }
    /// Appends bytes; panics past [`HEAD_CAPACITY`] (heads are built from fixed fields).
    pub fn put(&mut self, bytes: &[u8]) {
        let start = self.len as usize;
        self.buf[start..start + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len() as u8;
    }
}

impl Default for Head {
    fn default() -> Head {
        Head::new()
    }
}

impl std::ops::Deref for Head {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[..self.len as usize]
    }
}

impl std::fmt::Debug for Head {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Head({:02x?})", &self[..])
    }
}

/// A whole message ready to be framed: header fields plus a payload in two parts, a
/// small inline `head` (pointers, offsets, small values) and a `body` (record data,
/// shared without copying).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutMessage {
    /// Transaction id.
    pub xid: u32,
    /// Opcode (request) or status (reply).
    pub op: u8,
    /// Opcode-specific argument.
    pub arg: u8,
    /// First part of the payload.
    pub head: Head,
    /// Second part of the payload.
    pub body: Bytes,
}

impl OutMessage {
    /// Total payload length.
    pub fn len(&self) -> usize {
        self.head.len() + self.body.len()
    }
    /// True when the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The whole payload as one buffer (copies the head).
    pub fn payload(&self) -> Bytes {
        if self.head.is_empty() {
            self.body.clone()
        } else {
            let mut b = BytesMut::with_capacity(self.len());
            b.extend_from_slice(&self.head);
            b.extend_from_slice(&self.body);
            b.freeze()
        }
    }
}

/// A request that is not well formed: the reply is MALFORMED with this reason.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Malformed(pub Cow<'static, str>);

impl Malformed {
    fn new(reason: impl Into<Cow<'static, str>>) -> Malformed {
        Malformed(reason.into())
    }
}

/// The new owner named by TRANSFER.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NewOwner {
    /// An identity, as HELLO reports it.
    Identity(Identity),
    /// An IP address, hashed by the server (IPv4-mapped IPv6 counts as IPv4).
    Ip(IpAddr),
}

impl From<IpAddr> for NewOwner {
    fn from(ip: IpAddr) -> NewOwner {
        NewOwner::Ip(normalize_ip(ip))
    }
}

impl From<Identity> for NewOwner {
    fn from(id: Identity) -> NewOwner {
        NewOwner::Identity(id)
    }
}

/// What a WATCH asks for beyond v1's bare notifications (all off by default, which
/// is exactly v1's WATCH: ARG 0, an 8-byte payload, an empty OK).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct WatchOptions {
    /// Notifications carry the changed bytes (NOTIFY event 5, a [`Delta`]), and the
    /// OK carries the record's state and whole data, so a client can keep an exact
    /// copy. Implies `state`. ARG bit 0x01.
    pub data: bool,
    /// The OK carries the record's state (INFO's fields), so the client knows the
    /// version the watch starts from. ARG bit 0x02.
    pub state: bool,
    /// At most one notification per this many milliseconds for this watch; changes
    /// in between are merged (0 = none; at most [`MAX_WATCH_INTERVAL_MS`]).
    pub min_interval_ms: u32,
}

/// WATCH ARG bit: notifications carry the changed bytes.
pub const WATCH_DATA: u8 = 0x01;
/// WATCH ARG bit: the OK carries the record's state.
pub const WATCH_STATE: u8 = 0x02;
/// Longest minimum interval a WATCH may ask for: one minute.
pub const MAX_WATCH_INTERVAL_MS: u32 = 60_000;
/// NOTIFY ARG of a data change that carries its bytes (a data watch's "changed").
pub const EVENT_DELTA: u8 = 5;
/// Bytes of a NOTIFY delta's fixed part: pointer, version, base version, size.
pub const DELTA_HEAD: usize = 32;
/// Bytes before each range's data in a NOTIFY delta: offset u64, length u32.
pub const DELTA_RANGE_HEAD: usize = 12;
/// Bytes of INFO's fields at the start of a WATCH's OK with state.
pub const WATCH_STATE_LEN: usize = 18;

impl WatchOptions {
    /// Options for a watch that keeps an exact copy: data, with the state.
    pub fn data() -> WatchOptions {
        WatchOptions {
            data: true,
            state: true,
            min_interval_ms: 0,
        }
    }

    /// The OK will carry the record's state (asked for, or implied by `data`).
    pub fn wants_state(&self) -> bool {
        self.data || self.state
    }

    /// These options as WATCH's ARG.
    pub fn arg(&self) -> u8 {
        (if self.data { WATCH_DATA } else { 0 }) | (if self.state { WATCH_STATE } else { 0 })
    }
}

/// The bytes a data change made, as a data watch's NOTIFY carries them: applied to a
/// copy of the record at version `base`, they give the record at the NOTIFY's
/// version. To apply: resize the copy to `size` (cut, or grow with zeros), then write
/// each range. The ranges cover every byte that changed, including every byte beyond
/// the old size; they do not overlap and are in ascending order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Delta {
    /// The version these changes apply to.
    pub base: Version,
    /// The record's size after them.
    pub size: u64,
    /// `(offset, bytes)` of every changed range.
    pub ranges: Vec<(u64, Bytes)>,
}

impl Delta {
    /// Bytes this delta takes in a NOTIFY payload.
    pub fn wire_len(&self) -> usize {
        DELTA_HEAD
            + self
                .ranges
                .iter()
                .map(|(_, b)| DELTA_RANGE_HEAD + b.len())
                .sum::<usize>()
    }

    /// Applies the delta to `copy`, which must hold the record at version `base`.
    pub fn apply_to(&self, copy: &mut Vec<u8>) {
        copy.resize(self.size as usize, 0);
        for (off, bytes) in &self.ranges {
            let off = *off as usize;
            copy[off..off + bytes.len()].copy_from_slice(bytes);
        }
    }
}

/// A client request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// CREATE: a new record with these access bits and initial data.
    Create {
        /// Access bits for others.
        access: Access,
        /// Initial data (may be empty).
        data: Bytes,
    },
    /// SET_ACCESS: change the access bits (owner only).
    SetAccess {
        /// The record.
        ptr: Pointer,
        /// The new bits.
        access: Access,
    },
    /// READ: the whole record, or `len` bytes from `offset` (cut at the end).
    Read {
        /// The record.
        ptr: Pointer,
        /// `Some((offset, len))` for a range read.
        range: Option<(u64, u32)>,
    },
    /// REPLACE: new data for the whole record.
    Replace {
        /// The record.
        ptr: Pointer,
        /// The new data.
        data: Bytes,
    },
    /// WRITE_AT: overwrite (and possibly grow) from `offset`.
    WriteAt {
        /// The record.
        ptr: Pointer,
        /// Where to write; at most the current size.
        offset: u64,
        /// The bytes.
        data: Bytes,
    },
    /// DELETE (owner only).
    Delete {
        /// The record.
        ptr: Pointer,
    },
    /// TAKEOVER: become the owner where the TAKEOVER bit allows.
    Takeover {
        /// The record.
        ptr: Pointer,
    },
    /// TRANSFER: hand the record to another identity (owner only).
    Transfer {
        /// The record.
        ptr: Pointer,
        /// Who gets it.
        to: NewOwner,
    },
    /// INFO: size, version, access bits, whether the caller owns it.
    Info {
        /// The record.
        ptr: Pointer,
    },
    /// HELLO: server parameters and the caller's identity.
    Hello,
    /// WATCH: push a NOTIFY with this request's XID on every change.
    Watch {
        /// The record.
        ptr: Pointer,
        /// Data, state, rate limit (all off: v1's WATCH).
        options: WatchOptions,
    },
    /// UNWATCH: end this connection's watch of the record.
    Unwatch {
        /// The record.
        ptr: Pointer,
    },
    /// REPLACE_IF: replace only when the version is `expected`.
    ReplaceIf {
        /// The record.
        ptr: Pointer,
        /// The version the caller last saw.
        expected: Version,
        /// The new data.
        data: Bytes,
    },
    /// STATS: the server's counters (server-wide, plus the caller's own usage).
    Stats,
}

fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().expect("4 bytes"))
}

fn pointer_at(payload: &[u8], op: Opcode) -> Result<Pointer, Malformed> {
    Pointer::new(be_u64(payload))
        .ok_or_else(|| Malformed::new(format!("{}: pointer 0 is never valid", op.name())))
}

fn exact_len(payload: &Bytes, op: Opcode, want: usize, what: &str) -> Result<(), Malformed> {
    if payload.len() == want {
        Ok(())
    } else {
        Err(Malformed::new(format!(
            "{}: payload must be {want} bytes ({what}), got {}",
            op.name(),
            payload.len()
        )))
    }
}

fn min_len(payload: &Bytes, op: Opcode, want: usize, what: &str) -> Result<(), Malformed> {
    if payload.len() >= want {
        Ok(())
    } else {
        Err(Malformed::new(format!(
            "{}: payload must be at least {want} bytes ({what}), got {}",
            op.name(),
            payload.len()
        )))
    }
}

impl Request {
    /// A v1 WATCH of `ptr` (no data, no state, no rate limit).
    pub fn watch(ptr: Pointer) -> Request {
        Request::Watch {
            ptr,
            options: WatchOptions::default(),
        }
    }

    /// Parses a reassembled request message.
    ///
    /// Checks, in order: the opcode is known; `ARG` is 0 for opcodes without an
    /// argument and has no reserved bits for those with access bits; the payload has the
    /// size the opcode requires; pointers are not 0.
    pub fn parse(op: u8, arg: u8, payload: Bytes) -> Result<Request, Malformed> {
        let op = Opcode::from_u8(op)
            .ok_or_else(|| Malformed::new(format!("unknown opcode 0x{op:02x}")))?;
        let access = match op {
            Opcode::Create | Opcode::SetAccess => Access::from_wire(arg).ok_or_else(|| {
                Malformed::new(format!(
                    "{}: reserved access bits set in ARG 0x{arg:02x} (only 0x01 READ, 0x02 WRITE, 0x04 TAKEOVER exist)",
                    op.name()
                ))
            })?,
            Opcode::Watch if arg & !(WATCH_DATA | WATCH_STATE) != 0 => {
                return Err(Malformed::new(format!(
                    "WATCH: reserved bits set in ARG 0x{arg:02x} (only 0x01 DATA, 0x02 STATE exist)"
                )));
            }
            Opcode::Watch => Access::empty(),
            _ if arg != 0 => {
                return Err(Malformed::new(format!(
                    "{}: ARG must be 0, got 0x{arg:02x}",
                    op.name()
                )));
            }
            _ => Access::empty(),
        };
        let ptr_only = |payload: &Bytes| -> Result<Pointer, Malformed> {
            exact_len(payload, op, 8, "a pointer")?;
            pointer_at(payload, op)
        };
        Ok(match op {
            Opcode::Create => Request::Create {
                access,
                data: payload,
            },
            Opcode::SetAccess => Request::SetAccess {
                ptr: ptr_only(&payload)?,
                access,
            },
            Opcode::Read => match payload.len() {
                8 => Request::Read {
                    ptr: pointer_at(&payload, op)?,
                    range: None,
                },
                20 => Request::Read {
                    ptr: pointer_at(&payload, op)?,
                    range: Some((be_u64(&payload[8..]), be_u32(&payload[16..]))),
                },
                n => {
                    return Err(Malformed::new(format!(
                        "READ: payload must be 8 bytes (pointer) or 20 (pointer, offset, length), got {n}"
                    )));
                }
            },
            // The data is the payload advanced past the head (not a slice of it: no
            // second handle on the receive buffer, no reference count to touch).
            Opcode::Replace => {
                min_len(&payload, op, 8, "a pointer, then the data")?;
                let ptr = pointer_at(&payload, op)?;
                let mut data = payload;
                data.advance(8);
                Request::Replace { ptr, data }
            }
            Opcode::WriteAt => {
                min_len(&payload, op, 16, "a pointer and an offset, then the data")?;
                let (ptr, offset) = (pointer_at(&payload, op)?, be_u64(&payload[8..]));
                let mut data = payload;
                data.advance(16);
                Request::WriteAt { ptr, offset, data }
            }
            Opcode::Delete => Request::Delete {
                ptr: ptr_only(&payload)?,
            },
            Opcode::Takeover => Request::Takeover {
                ptr: ptr_only(&payload)?,
            },
            Opcode::Transfer => {
                let to = match payload.len() {
                    12 => NewOwner::Ip(IpAddr::V4(Ipv4Addr::from(be_u32(&payload[8..])))),
                    24 => {
                        let octets: [u8; 16] = payload[8..24].try_into().expect("16 bytes");
                        NewOwner::Ip(normalize_ip(IpAddr::V6(Ipv6Addr::from(octets))))
                    }
                    40 => {
                        NewOwner::Identity(Identity(payload[8..40].try_into().expect("32 bytes")))
                    }
                    n => {
                        return Err(Malformed::new(format!(
                            "TRANSFER: payload must be a pointer plus a 4-byte IPv4 address, a 16-byte IPv6 address or a 32-byte identity (12, 24 or 40 bytes), got {n}"
                        )));
                    }
                };
                Request::Transfer {
                    ptr: pointer_at(&payload, op)?,
                    to,
                }
            }
            Opcode::Info => Request::Info {
                ptr: ptr_only(&payload)?,
            },
            Opcode::Hello => {
                exact_len(&payload, op, 0, "empty")?;
                Request::Hello
            }
            Opcode::Watch => {
                let min_interval_ms = match payload.len() {
                    8 => 0,
                    12 => be_u32(&payload[8..]),
                    n => {
                        return Err(Malformed::new(format!(
                            "WATCH: payload must be 8 bytes (pointer) or 12 (pointer, minimum interval in ms), got {n}"
                        )));
                    }
                };
                if min_interval_ms > MAX_WATCH_INTERVAL_MS {
                    return Err(Malformed::new(format!(
                        "WATCH: minimum interval {min_interval_ms} ms is over the limit of {MAX_WATCH_INTERVAL_MS} ms"
                    )));
                }
                Request::Watch {
                    ptr: pointer_at(&payload, op)?,
                    options: WatchOptions {
                        data: arg & WATCH_DATA != 0,
                        state: arg & WATCH_STATE != 0,
                        min_interval_ms,
                    },
                }
            }
            Opcode::Unwatch => Request::Unwatch {
                ptr: ptr_only(&payload)?,
            },
            Opcode::Stats => {
                exact_len(&payload, op, 0, "empty")?;
                Request::Stats
            }
            Opcode::ReplaceIf => {
                min_len(&payload, op, 16, "a pointer and a version, then the data")?;
                Request::ReplaceIf {
                    ptr: pointer_at(&payload, op)?,
                    expected: be_u64(&payload[8..]),
                    data: payload.slice(16..),
                }
            }
        })
    }

    /// The request's opcode.
    pub fn opcode(&self) -> Opcode {
        match self {
            Request::Create { .. } => Opcode::Create,
            Request::SetAccess { .. } => Opcode::SetAccess,
            Request::Read { .. } => Opcode::Read,
            Request::Replace { .. } => Opcode::Replace,
            Request::WriteAt { .. } => Opcode::WriteAt,
            Request::Delete { .. } => Opcode::Delete,
            Request::Takeover { .. } => Opcode::Takeover,
            Request::Transfer { .. } => Opcode::Transfer,
            Request::Info { .. } => Opcode::Info,
            Request::Hello => Opcode::Hello,
            Request::Watch { .. } => Opcode::Watch,
            Request::Unwatch { .. } => Opcode::Unwatch,
            Request::ReplaceIf { .. } => Opcode::ReplaceIf,
            Request::Stats => Opcode::Stats,
        }
    }

    /// The record this request is about (`None` for CREATE and HELLO).
    pub fn pointer(&self) -> Option<Pointer> {
        match *self {
            Request::Create { .. } | Request::Hello | Request::Stats => None,
            Request::SetAccess { ptr, .. }
            | Request::Read { ptr, .. }
            | Request::Replace { ptr, .. }
            | Request::WriteAt { ptr, .. }
            | Request::Delete { ptr }
            | Request::Takeover { ptr }
            | Request::Transfer { ptr, .. }
            | Request::Info { ptr }
            | Request::Watch { ptr, .. }
            | Request::Unwatch { ptr }
            | Request::ReplaceIf { ptr, .. } => Some(ptr),
        }
    }

    /// Encodes the request as a message with this XID. Record data is not copied.
    pub fn encode(&self, xid: u32) -> OutMessage {
        let mut head = Head::new();
        let mut arg = 0u8;
        let mut body = Bytes::new();
        if let Some(ptr) = self.pointer() {
            head.put(&ptr.to_be_bytes());
        }
        match self {
            Request::Create { access, data } => {
                arg = access.bits();
                body = data.clone();
            }
            Request::SetAccess { access, .. } => arg = access.bits(),
            Request::Read { range, .. } => {
                if let Some((off, n)) = range {
                    head.put(&off.to_be_bytes());
                    head.put(&n.to_be_bytes());
                }
            }
            Request::Replace { data, .. } => body = data.clone(),
            Request::WriteAt { offset, data, .. } => {
                head.put(&offset.to_be_bytes());
                body = data.clone();
            }
            Request::Transfer { to, .. } => match to {
                NewOwner::Identity(id) => head.put(&id.0),
                NewOwner::Ip(IpAddr::V4(v4)) => head.put(&v4.octets()),
                NewOwner::Ip(IpAddr::V6(v6)) => head.put(&v6.octets()),
            },
            Request::ReplaceIf { expected, data, .. } => {
                head.put(&expected.to_be_bytes());
                body = data.clone();
            }
            Request::Watch { options, .. } => {
                arg = options.arg();
                if options.min_interval_ms > 0 {
                    head.put(&options.min_interval_ms.to_be_bytes());
                }
            }
            Request::Delete { .. }
            | Request::Takeover { .. }
            | Request::Info { .. }
            | Request::Hello
            | Request::Stats
            | Request::Unwatch { .. } => {}
        }
        OutMessage {
            xid,
            op: self.opcode() as u8,
            arg,
            head,
            body,
        }
    }
}

/// INFO's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordInfo {
    /// Data size in bytes.
    pub size: u64,
    /// Current version.
    pub version: Version,
    /// Access bits for others.
    pub access: Access,
    /// True when the caller's identity owns the record.
    pub owned: bool,
}

/// HELLO's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HelloInfo {
    /// Protocol version (1).
    pub protocol: u8,
    /// Largest record the server stores.
    pub max_record_bytes: u64,
    /// Largest request message the server accepts.
    pub max_message_bytes: u64,
    /// Seconds an orphaned record survives.
    pub orphan_grace_secs: u32,
    /// The caller's identity.
    pub identity: Identity,
}

/// A server reply, typed by what it answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// OK to CREATE: the new record's pointer.
    Created(Pointer),
    /// OK with an empty payload (SET_ACCESS, DELETE, TAKEOVER, TRANSFER, WATCH, UNWATCH).
    Done,
    /// OK to REPLACE, WRITE_AT or REPLACE_IF: the new version.
    Written(Version),
    /// DATA: the bytes read.
    Data(Bytes),
    /// OK to INFO.
    Info(RecordInfo),
    /// OK to a WATCH that asked for the state: the record's state when the watch
    /// began, and (for a data watch) its whole data; empty otherwise.
    Watching(RecordInfo, Bytes),
    /// OK to HELLO.
    Hello(HelloInfo),
    /// OK to STATS: named counters, in the server's order.
    Stats(Vec<(String, u64)>),
    /// CONFLICT to REPLACE_IF: the current version.
    Conflict(Version),
    /// NOTIFY: a watched record changed.
    Notify {
        /// What happened.
        event: Event,
        /// The record.
        ptr: Pointer,
        /// Its version after the event.
        version: Version,
        /// The changed bytes, on a data watch's "changed" (NOTIFY event 5).
        delta: Option<Delta>,
    },
    /// Any status that carries a reason.
    Error {
        /// The status.
        status: Status,
        /// The server's short reason.
        reason: Cow<'static, str>,
    },
}

/// A reply the client cannot make sense of.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("bad reply: {0}")]
pub struct BadReply(pub String);

impl Reply {
    /// An error reply with a static or formatted reason.
    pub fn error(status: Status, reason: impl Into<Cow<'static, str>>) -> Reply {
        Reply::Error {
            status,
            reason: reason.into(),
        }
    }

    /// The status byte this reply carries.
    pub fn status(&self) -> Status {
        match self {
            Reply::Created(_)
            | Reply::Done
            | Reply::Written(_)
            | Reply::Info(_)
            | Reply::Watching(..)
            | Reply::Hello(_)
            | Reply::Stats(_) => Status::Ok,
            Reply::Data(_) => Status::Data,
            Reply::Conflict(_) => Status::Conflict,
            Reply::Notify { .. } => Status::Notify,
            Reply::Error { status, .. } => *status,
        }
    }

    /// Encodes the reply as a message with this XID. Data is not copied.
    pub fn encode(&self, xid: u32) -> OutMessage {
        let mut arg = 0;
        let mut body = Bytes::new();
        let mut head = Head::new();
        match self {
            Reply::Created(p) => head.put(&p.to_be_bytes()),
            Reply::Done => {}
            Reply::Written(v) | Reply::Conflict(v) => head.put(&v.to_be_bytes()),
            // Small values are copied inline: no reference count to touch.
            Reply::Data(d) if d.len() <= HEAD_CAPACITY => head.put(d),
            Reply::Data(d) => body = d.clone(),
            Reply::Info(i) => put_info(&mut head, i),
            Reply::Watching(i, data) => {
                put_info(&mut head, i);
                body = data.clone();
            }
            Reply::Hello(h) => {
                head.put(&[h.protocol]);
                head.put(&h.max_record_bytes.to_be_bytes());
                head.put(&h.max_message_bytes.to_be_bytes());
                head.put(&h.orphan_grace_secs.to_be_bytes());
                head.put(&h.identity.0);
            }
            Reply::Stats(entries) => {
                let mut b = BytesMut::new();
                b.extend_from_slice(&(entries.len() as u16).to_be_bytes());
                for (name, value) in entries {
                    let name = &name.as_bytes()[..name.len().min(255)];
                    b.extend_from_slice(&[name.len() as u8]);
                    b.extend_from_slice(name);
                    b.extend_from_slice(&value.to_be_bytes());
                }
                body = b.freeze();
            }
            Reply::Notify {
                event,
                ptr,
                version,
                delta,
            } => {
                arg = *event as u8;
                head.put(&ptr.to_be_bytes());
                head.put(&version.to_be_bytes());
                if let Some(d) = delta {
                    arg = EVENT_DELTA;
                    head.put(&d.base.to_be_bytes());
                    head.put(&d.size.to_be_bytes());
                    match &d.ranges[..] {
                        [] => {}
                        // One range (every change that is not merged): its head
                        // inline, its bytes shared.
                        [(off, bytes)] => {
                            head.put(&off.to_be_bytes());
                            head.put(&(bytes.len() as u32).to_be_bytes());
                            body = bytes.clone();
                        }
                        ranges => {
                            let mut b = BytesMut::with_capacity(d.wire_len() - DELTA_HEAD);
                            for (off, bytes) in ranges {
                                b.extend_from_slice(&off.to_be_bytes());
                                b.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
                                b.extend_from_slice(bytes);
                            }
                            body = b.freeze();
                        }
                    }
                }
            }
            Reply::Error { reason, .. } => {
                body = match reason {
                    Cow::Borrowed(s) => Bytes::from_static(s.as_bytes()),
                    Cow::Owned(s) => Bytes::copy_from_slice(s.as_bytes()),
                }
            }
        }
        OutMessage {
            xid,
            op: self.status() as u8,
            arg,
            head,
            body,
        }
    }

    /// Parses a reply to a request with opcode `request` (`None` when the request is
    /// not known, e.g. a NOTIFY or a message on the reserved XID).
    pub fn parse(
        request: Option<Opcode>,
        status: u8,
        arg: u8,
        payload: Bytes,
    ) -> Result<Reply, BadReply> {
        let status = Status::from_u8(status)
            .ok_or_else(|| BadReply(format!("unknown status 0x{status:02x}")))?;
        let want = |n: usize| -> Result<(), BadReply> {
            if payload.len() == n {
                Ok(())
            } else {
                Err(BadReply(format!(
                    "{} reply must carry {n} bytes, got {}",
                    status.name(),
                    payload.len()
                )))
            }
        };
        if status != Status::Notify && arg != 0 {
            return Err(BadReply(format!("{} reply with ARG {arg}", status.name())));
        }
        Ok(match status {
            Status::Data => Reply::Data(payload),
            Status::Conflict => {
                want(8)?;
                Reply::Conflict(be_u64(&payload))
            }
            Status::Notify if arg == EVENT_DELTA => parse_delta(&payload)?,
            Status::Notify => {
                want(16)?;
                let event = Event::from_u8(arg)
                    .ok_or_else(|| BadReply(format!("NOTIFY with unknown event {arg}")))?;
                let ptr = Pointer::new(be_u64(&payload))
                    .ok_or_else(|| BadReply("NOTIFY for pointer 0".into()))?;
                Reply::Notify {
                    event,
                    ptr,
                    version: be_u64(&payload[8..]),
                    delta: None,
                }
            }
            Status::Ok => match request {
                Some(Opcode::Create) => {
                    want(8)?;
                    Reply::Created(
                        Pointer::new(be_u64(&payload))
                            .ok_or_else(|| BadReply("CREATE returned pointer 0".into()))?,
                    )
                }
                Some(Opcode::Replace | Opcode::WriteAt | Opcode::ReplaceIf) => {
                    want(8)?;
                    Reply::Written(be_u64(&payload))
                }
                Some(Opcode::Info) => {
                    want(18)?;
                    Reply::Info(info_at(&payload))
                }
                Some(Opcode::Watch) if !payload.is_empty() => {
                    if payload.len() < WATCH_STATE_LEN {
                        return Err(BadReply(format!(
                            "WATCH's OK must carry 0 bytes or at least {WATCH_STATE_LEN}, got {}",
                            payload.len()
                        )));
                    }
                    Reply::Watching(info_at(&payload), payload.slice(WATCH_STATE_LEN..))
                }
                Some(Opcode::Hello) => {
                    want(53)?;
                    Reply::Hello(HelloInfo {
                        protocol: payload[0],
                        max_record_bytes: be_u64(&payload[1..]),
                        max_message_bytes: be_u64(&payload[9..]),
                        orphan_grace_secs: be_u32(&payload[17..]),
                        identity: Identity(payload[21..53].try_into().expect("32 bytes")),
                    })
                }
                Some(Opcode::Stats) => Reply::Stats(parse_stats(&payload)?),
                _ => {
                    want(0)?;
                    Reply::Done
                }
            },
            _ => Reply::Error {
                status,
                reason: Cow::Owned(String::from_utf8_lossy(&payload).into_owned()),
            },
        })
    }
}

fn put_info(head: &mut Head, i: &RecordInfo) {
    head.put(&i.size.to_be_bytes());
    head.put(&i.version.to_be_bytes());
    head.put(&[i.access.bits(), u8::from(i.owned)]);
}

fn info_at(b: &[u8]) -> RecordInfo {
    RecordInfo {
        size: be_u64(b),
        version: be_u64(&b[8..]),
        access: Access::from_bits_truncate(b[16]),
        owned: b[17] & 1 == 1,
    }
}

/// A data watch's NOTIFY (event 5): `ptr ver base size`, then ranges of `off len
/// bytes` to the end of the payload.
fn parse_delta(b: &Bytes) -> Result<Reply, BadReply> {
    if b.len() < DELTA_HEAD {
        return Err(BadReply(format!(
            "NOTIFY with data must carry at least {DELTA_HEAD} bytes, got {}",
            b.len()
        )));
    }
    let ptr = Pointer::new(be_u64(b)).ok_or_else(|| BadReply("NOTIFY for pointer 0".into()))?;
    let version = be_u64(&b[8..]);
    let base = be_u64(&b[16..]);
    let size = be_u64(&b[24..]);
    if base >= version {
        return Err(BadReply(format!(
            "NOTIFY delta from version {base} to {version} does not go forward"
        )));
    }
    // A mirror grows its copy to this size: no record is larger than a message.
    if size > MAX_MESSAGE {
        return Err(BadReply(format!(
            "NOTIFY delta: size {size} is over the largest record ({MAX_MESSAGE} bytes)"
        )));
    }
    let mut ranges = Vec::new();
    let mut at = DELTA_HEAD;
    let mut end_of_last = 0u64;
    while at < b.len() {
        let Some(h) = b.get(at..at + DELTA_RANGE_HEAD) else {
            return Err(BadReply("NOTIFY delta: a range header is cut short".into()));
        };
        let off = be_u64(h);
        let len = be_u32(&h[8..]) as usize;
        let start = at + DELTA_RANGE_HEAD;
        if b.len() - start < len {
            return Err(BadReply(
                "NOTIFY delta: a range's bytes are cut short".into(),
            ));
        }
        let end = off.checked_add(len as u64).filter(|e| *e <= size);
        if off < end_of_last || end.is_none() {
            return Err(BadReply(format!(
                "NOTIFY delta: range at {off} ({len} bytes) overlaps the one before or passes the size {size}"
            )));
        }
        end_of_last = end.unwrap_or(0);
        ranges.push((off, b.slice(start..start + len)));
        at = start + len;
    }
    Ok(Reply::Notify {
        event: Event::Changed,
        ptr,
        version,
        delta: Some(Delta { base, size, ranges }),
    })
}

/// STATS's payload: count u16, then per entry a name (length u8, ASCII) and a u64.
fn parse_stats(b: &[u8]) -> Result<Vec<(String, u64)>, BadReply> {
    let bad = || BadReply("STATS reply is cut short".into());
    let n = u16::from_be_bytes(b.get(..2).ok_or_else(bad)?.try_into().expect("2")) as usize;
    let mut at = 2;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let len = *b.get(at).ok_or_else(bad)? as usize;
        let name = b.get(at + 1..at + 1 + len).ok_or_else(bad)?;
        let value = b.get(at + 1 + len..at + 9 + len).ok_or_else(bad)?;
        out.push((String::from_utf8_lossy(name).into_owned(), be_u64(value)));
        at += 9 + len;
    }
    if at != b.len() {
        return Err(BadReply("STATS reply has bytes after its entries".into()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(n: u64) -> Pointer {
        Pointer::new(n).unwrap()
    }

    fn round_trip(req: Request) {
        let m = req.encode(7);
        let back = Request::parse(m.op, m.arg, m.payload()).unwrap();
        assert_eq!(back, req);
    }

    #[test]
    fn every_request_round_trips() {
        let id = Identity([9; 32]);
        for req in [
            Request::Create {
                access: Access::READ | Access::TAKEOVER,
                data: Bytes::from_static(b"hello"),
            },
            Request::Create {
                access: Access::empty(),
                data: Bytes::new(),
            },
            Request::SetAccess {
                ptr: p(1),
                access: Access::WRITE,
            },
            Request::Read {
                ptr: p(2),
                range: None,
            },
            Request::Read {
                ptr: p(2),
                range: Some((5, 9)),
            },
            Request::Replace {
                ptr: p(3),
                data: Bytes::from_static(b"x"),
            },
            Request::WriteAt {
                ptr: p(4),
                offset: 10,
                data: Bytes::from_static(b"yz"),
            },
            Request::Delete { ptr: p(5) },
            Request::Takeover { ptr: p(6) },
            Request::Transfer {
                ptr: p(7),
                to: NewOwner::Identity(id),
            },
            Request::Transfer {
                ptr: p(7),
                to: NewOwner::Ip("10.1.2.3".parse().unwrap()),
            },
            Request::Transfer {
                ptr: p(7),
                to: NewOwner::Ip("2001:db8::1".parse().unwrap()),
            },
            Request::Info { ptr: p(8) },
            Request::Hello,
            Request::Watch {
                ptr: p(9),
                options: WatchOptions::default(),
            },
            Request::Watch {
                ptr: p(9),
                options: WatchOptions {
                    data: true,
                    state: false,
                    min_interval_ms: 50,
                },
            },
            Request::Watch {
                ptr: p(9),
                options: WatchOptions {
                    data: false,
                    state: true,
                    min_interval_ms: MAX_WATCH_INTERVAL_MS,
                },
            },
            Request::Unwatch { ptr: p(10) },
            Request::ReplaceIf {
                ptr: p(11),
                expected: 3,
                data: Bytes::from_static(b"new"),
            },
        ] {
            round_trip(req);
        }
    }

    #[test]
    fn transfer_to_mapped_v6_is_normalised_to_v4() {
        let mut payload = 1u64.to_be_bytes().to_vec();
        payload.extend_from_slice(&"::ffff:10.0.0.1".parse::<Ipv6Addr>().unwrap().octets());
        let r = Request::parse(0x07, 0, payload.into()).unwrap();
        assert_eq!(
            r,
            Request::Transfer {
                ptr: p(1),
                to: NewOwner::Ip("10.0.0.1".parse().unwrap())
            }
        );
    }

    #[test]
    fn malformed_reasons_are_precise() {
        let reason = |op, arg, payload: &[u8]| {
            Request::parse(op, arg, Bytes::copy_from_slice(payload))
                .unwrap_err()
                .0
                .into_owned()
        };
        assert_eq!(reason(0x0E, 0, b""), "unknown opcode 0x0e");
        assert!(reason(0x00, 0x08, b"").contains("reserved access bits"));
        assert!(reason(0x01, 0x80, &[0, 0, 0, 0, 0, 0, 0, 1]).contains("reserved access bits"));
        assert_eq!(reason(0x02, 1, &[0; 8]), "READ: ARG must be 0, got 0x01");
        assert!(reason(0x02, 0, &[0; 9]).starts_with("READ: payload must be 8 bytes"));
        assert_eq!(reason(0x05, 0, &[0; 8]), "DELETE: pointer 0 is never valid");
        assert_eq!(
            reason(0x05, 0, &[0; 7]),
            "DELETE: payload must be 8 bytes (a pointer), got 7"
        );
        assert!(reason(0x03, 0, &[0; 7]).starts_with("REPLACE: payload must be at least 8"));
        assert!(reason(0x04, 0, &[0; 15]).starts_with("WRITE_AT: payload must be at least 16"));
        assert!(reason(0x0C, 0, &[0; 15]).starts_with("REPLACE_IF: payload must be at least 16"));
        assert!(reason(0x07, 0, &[0; 13]).starts_with("TRANSFER: payload must be"));
        assert_eq!(
            reason(0x09, 0, b"x"),
            "HELLO: payload must be 0 bytes (empty), got 1"
        );
        let watch = |interval: u32| {
            let mut b = 1u64.to_be_bytes().to_vec();
            b.extend_from_slice(&interval.to_be_bytes());
            b
        };
        assert_eq!(
            reason(0x0A, 0x04, &[0, 0, 0, 0, 0, 0, 0, 1]),
            "WATCH: reserved bits set in ARG 0x04 (only 0x01 DATA, 0x02 STATE exist)"
        );
        assert!(reason(0x0A, 0x01, &[0; 10]).starts_with("WATCH: payload must be 8 bytes"));
        assert_eq!(
            reason(0x0A, 0x01, &watch(60_001)),
            "WATCH: minimum interval 60001 ms is over the limit of 60000 ms"
        );
        assert_eq!(reason(0x0A, 0, &[0; 12]), "WATCH: pointer 0 is never valid");
        // A v1 WATCH is still exactly that.
        assert_eq!(
            Request::parse(0x0A, 0, Bytes::from(watch(0)[..8].to_vec())).unwrap(),
            Request::Watch {
                ptr: p(1),
                options: WatchOptions::default()
            }
        );
    }

    #[test]
    fn replies_round_trip() {
        let cases: Vec<(Option<Opcode>, Reply)> = vec![
            (Some(Opcode::Create), Reply::Created(p(0xabc))),
            (Some(Opcode::Delete), Reply::Done),
            (Some(Opcode::WriteAt), Reply::Written(42)),
            (Some(Opcode::Read), Reply::Data(Bytes::from_static(b"abc"))),
            (
                Some(Opcode::Info),
                Reply::Info(RecordInfo {
                    size: 5,
                    version: 2,
                    access: Access::READ,
                    owned: true,
                }),
            ),
            (
                Some(Opcode::Hello),
                Reply::Hello(HelloInfo {
                    protocol: 1,
                    max_record_bytes: 64,
                    max_message_bytes: 80,
                    orphan_grace_secs: 300,
                    identity: Identity([3; 32]),
                }),
            ),
            (Some(Opcode::ReplaceIf), Reply::Conflict(7)),
            (
                None,
                Reply::Notify {
                    event: Event::OwnerChanged,
                    ptr: p(5),
                    version: 9,
                    delta: None,
                },
            ),
            (Some(Opcode::Watch), Reply::Done),
            (
                Some(Opcode::Watch),
                Reply::Watching(
                    RecordInfo {
                        size: 3,
                        version: 4,
                        access: Access::READ,
                        owned: false,
                    },
                    Bytes::from_static(b"abc"),
                ),
            ),
            (
                None,
                Reply::Notify {
                    event: Event::Changed,
                    ptr: p(5),
                    version: 10,
                    delta: Some(Delta {
                        base: 9,
                        size: 100,
                        ranges: vec![(4, Bytes::from_static(b"xyz"))],
                    }),
                },
            ),
            (
                None,
                Reply::Notify {
                    event: Event::Changed,
                    ptr: p(5),
                    version: 12,
                    delta: Some(Delta {
                        base: 9,
                        size: 6,
                        ranges: vec![
                            (0, Bytes::from_static(b"ab")),
                            (3, Bytes::from_static(b"cde")),
                        ],
                    }),
                },
            ),
            (
                None,
                Reply::Notify {
                    event: Event::Changed,
                    ptr: p(5),
                    version: 2,
                    delta: Some(Delta {
                        base: 1,
                        size: 0,
                        ranges: vec![],
                    }),
                },
            ),
            (
                Some(Opcode::Read),
                Reply::error(Status::AddressFault, "no such record"),
            ),
        ];
        for (req, reply) in cases {
            let m = reply.encode(1);
            assert_eq!(Reply::parse(req, m.op, m.arg, m.payload()).unwrap(), reply);
        }
    }

    #[test]
    fn bad_replies_are_errors_not_panics() {
        assert!(Reply::parse(Some(Opcode::Create), 0, 0, Bytes::from_static(b"123")).is_err());
        assert!(Reply::parse(None, 0x0B, 0, Bytes::new()).is_err());
        assert!(Reply::parse(None, 0x08, 9, Bytes::from_static(&[1; 16])).is_err());
        assert!(Reply::parse(Some(Opcode::Hello), 0, 0, Bytes::from_static(&[1; 52])).is_err());
        assert!(Reply::parse(Some(Opcode::Watch), 0, 0, Bytes::from_static(&[1; 17])).is_err());
        let delta = |tail: &[u8]| {
            let mut b = Vec::new();
            for v in [5u64, 3, 2, 10] {
                b.extend_from_slice(&v.to_be_bytes()); // ptr, version, base, size
            }
            b.extend_from_slice(tail);
            Reply::parse(None, 0x08, EVENT_DELTA, Bytes::from(b))
        };
        assert!(delta(&[]).is_ok());
        assert!(delta(&[0; 11]).is_err(), "a cut range header");
        assert!(
            delta(&[0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 2, 1]).is_err(),
            "cut bytes"
        );
        assert!(
            delta(&[0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 2, 1, 1]).is_err(),
            "past the size"
        );
        let overlapping = [
            &[0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 2, 1, 1][..],
            &[0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 1, 1][..],
        ]
        .concat();
        assert!(delta(&overlapping).is_err(), "overlapping ranges");
        let mut backwards = vec![0u8; 32];
        backwards[7] = 5;
        backwards[15] = 2;
        backwards[23] = 2; // base == version
        assert!(Reply::parse(None, 0x08, EVENT_DELTA, Bytes::from(backwards.clone())).is_err());
        // A size no record can have would make a mirror allocate it.
        let mut huge = backwards;
        huge[23] = 1;
        huge[24..32].copy_from_slice(&(MAX_MESSAGE + 1).to_be_bytes());
        assert!(Reply::parse(None, 0x08, EVENT_DELTA, Bytes::from(huge.clone())).is_err());
        huge[24..32].copy_from_slice(&MAX_MESSAGE.to_be_bytes());
        assert!(Reply::parse(None, 0x08, EVENT_DELTA, Bytes::from(huge)).is_ok());
    }

    #[test]
    fn a_delta_applied_to_its_base_gives_the_new_bytes() {
        let mut copy = b"hello world".to_vec();
        Delta {
            base: 1,
            size: 13,
            ranges: vec![
                (0, Bytes::from_static(b"J")),
                (11, Bytes::from_static(b"!!")),
            ],
        }
        .apply_to(&mut copy);
        assert_eq!(copy, b"Jello world!!");
        Delta {
            base: 2,
            size: 3,
            ranges: vec![],
        }
        .apply_to(&mut copy);
        assert_eq!(copy, b"Jel");
    }
}
