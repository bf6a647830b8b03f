//! # netswap-proto
//!
//! Everything about netswap that does not touch a socket or a clock: the 10-byte
//! frame header ([`frame`]), reassembly of multi-frame messages ([`Reassembler`]),
//! fair fragmentation of outgoing messages ([`OutQueue`]), typed requests and replies
//! ([`Request`], [`Reply`]), salted SHA-256 identities ([`Identity`]) and the record
//! store with its ownership and permission state machine ([`Store`]).
//!
//! The server and every client stand on this crate. It is driven like quinn-proto:
//! bytes, events and "now" go in; messages, replies, notifications and deadlines come
//! out. The wire contract it implements is `docs/PROTOCOL.md`.
//!
//! ```
//! use bytes::BytesMut;
//! use netswap_proto::{decode_frame, OutQueue, Reassembler, ReassemblyLimits, Inbound, Request, Access};
//!
//! // A client encodes a CREATE; the server decodes and reassembles it.
//! let req = Request::Create { access: Access::READ, data: "hello".into() };
//! let mut q = OutQueue::new();
//! q.push(req.encode(1)).unwrap();
//! let mut wire = BytesMut::new();
//! q.write_to(&mut wire, usize::MAX);
//!
//! let mut r = Reassembler::new(ReassemblyLimits::default());
//! let frame = decode_frame(&mut wire).unwrap().unwrap();
//! let Some(Inbound::Message(m)) = r.push(frame).unwrap() else { panic!() };
//! assert_eq!(Request::parse(m.op, m.arg, m.payload).unwrap(), req);
//! ```

#![warn(missing_docs)]

pub mod frame;
pub mod identity;
pub mod message;
pub mod notify;
pub mod outbound;
pub mod reassembly;
pub mod receive;
pub mod rules;
pub mod snapshot;
pub mod store;
pub mod types;

pub use frame::{
    Frame, FrameHeader, FramingError, HEADER_LEN, MAX_FRAME, MAX_FRAMES, MAX_MESSAGE, MAX_PAYLOAD,
    RESERVED_XID, decode_frame,
};
pub use identity::{Identity, IdentityKey, ParseIdentityError};
pub use message::{
    BadReply, DELTA_HEAD, DELTA_RANGE_HEAD, Delta, EVENT_DELTA, HEAD_CAPACITY, Head, HelloInfo,
    MAX_WATCH_INTERVAL_MS, Malformed, NewOwner, OutMessage, RecordInfo, Reply, Request, WATCH_DATA,
    WATCH_STATE, WATCH_STATE_LEN, WatchOptions,
};
pub use notify::{NotifyQueue, Pushed, WatchConfig};
pub use outbound::{LARGE_MESSAGE, MAX_INTERLEAVED, OutFrame, OutQueue, WriteBuf};
pub use reassembly::{InMessage, Inbound, Reassembler, ReassemblyLimits, SharedBudget};
pub use receive::{ReceiveError, Receiver};
pub use store::{
    Applied, ConnId, INLINE_VALUE, Located, Notification, Reaped, Session, Store, StoreConfig,
    StoreStats,
};
pub use types::{Access, Event, Opcode, ParsePointerError, Pointer, Status, Version};

/// The protocol version HELLO reports.
pub const PROTOCOL_VERSION: u8 = 1;
/// Default largest record: 64 MiB.
pub const DEFAULT_MAX_RECORD_BYTES: u64 = 64 * 1024 * 1024;
/// Unsent bytes a sender should let the kernel hold per connection (Linux's
/// `TCP_NOTSENT_LOWAT`): beyond it, frames wait in the application's fair queue, so a
/// small reply is not stuck behind megabytes of a large one already handed to the
/// kernel.
pub const NOTSENT_LOWAT: u32 = 128 * 1024;
/// Bytes a sender hands the kernel per write call, at most: under one TCP
/// segmentation-offload packet (64 KiB with its headers), so each write becomes one
/// full packet and never a full one plus a short tail. Measured on loopback
/// (docs/BENCHMARKS.md): writes of 65,484 bytes (one byte over the packet) moved 1 MiB
/// reads at less than half the speed of writes of 64,000, and every size that left a
/// short tail was slow, whatever the number of writes.
pub const MAX_WRITE: usize = 64_000;

/// Default listen address of the server.
pub const DEFAULT_PORT: u16 = 7420;
