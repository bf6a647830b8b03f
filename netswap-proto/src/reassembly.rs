//! Reassembly of multi-frame messages, per connection.
//!
//! Frames of different XIDs may interleave. A message's first frame says how many
//! frames follow, so an oversized message is refused (TOO_LARGE) at its first frame
//! and the rest of it is then checked for framing but never buffered. The bytes that
//! unfinished messages may still grow to ("promised" bytes) and their number are
//! bounded per connection: past either bound a new message gets BUSY.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::{Bytes, BytesMut};

use crate::frame::{Frame, FrameHeader, FramingError, MAX_PAYLOAD};
use crate::types::Status;

/// Per-connection bounds on what reassembly may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReassemblyLimits {
    /// Largest request message accepted (`--max-message-bytes`).
    pub max_message_bytes: u64,
    /// Largest number of messages being reassembled at once; the next one gets BUSY.
    /// The same number bounds the refused messages whose frames are being discarded;
    /// past that the connection is closed with PROTOCOL_ERROR.
    pub max_partial_messages: usize,
    /// Largest sum of the sizes unfinished messages may reach (from their frame
    /// counts); a new message that would go over it gets BUSY.
    pub max_partial_bytes: u64,
}

impl Default for ReassemblyLimits {
    fn default() -> Self {
        ReassemblyLimits {
            max_message_bytes: crate::DEFAULT_MAX_RECORD_BYTES + 16,
            max_partial_messages: 64,
            max_partial_bytes: 2 * (crate::DEFAULT_MAX_RECORD_BYTES + 16),
        }
    }
}

/// A budget of bytes shared by the reassemblers of many connections, so that the
/// memory held by unfinished messages is bounded server-wide, not only per connection.
#[derive(Debug)]
pub struct SharedBudget {
    limit: u64,
    used: AtomicU64,
    /// The BUSY reason when this budget refuses a message.
    refusal: &'static str,
}

impl SharedBudget {
    /// A budget of `limit` bytes (the server-wide one).
    pub fn new(limit: u64) -> Arc<SharedBudget> {
        SharedBudget::with_refusal(
            limit,
            "the server's memory for unfinished messages is in use; retry later",
        )
    }

    /// A budget of `limit` bytes that refuses with `refusal` as the BUSY reason (for
    /// example one address's share of the server-wide budget).
    pub fn with_refusal(limit: u64, refusal: &'static str) -> Arc<SharedBudget> {
        Arc::new(SharedBudget {
            limit,
            used: AtomicU64::new(0),
            refusal,
        })
    }
    /// Bytes currently promised to unfinished messages.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }
    /// The limit.
    pub fn limit(&self) -> u64 {
        self.limit
    }
    fn acquire(&self, n: u64) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                u.checked_add(n).filter(|&t| t <= self.limit)
            })
            .is_ok()
    }
    fn release(&self, n: u64) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }
}

/// A whole request message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InMessage {
    /// Transaction id.
    pub xid: u32,
    /// Opcode byte (not yet checked).
    pub op: u8,
    /// Argument byte.
    pub arg: u8,
    /// The concatenated payload.
    pub payload: Bytes,
}

/// What one frame completed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Inbound {
    /// A whole message to apply.
    Message(InMessage),
    /// A message refused without being applied; answer it with `status` and `reason`.
    Refused {
        /// Its XID.
        xid: u32,
        /// TOO_LARGE or BUSY.
        status: Status,
        /// A short reason.
        reason: String,
    },
}

#[derive(Debug)]
struct Partial {
    op: u8,
    arg: u8,
    /// REMAINING the next frame must carry.
    next_remaining: u16,
    /// Bytes reserved in `promised` for this message.
    promised: u64,
    /// `None` while discarding a refused message.
    buf: Option<BytesMut>,
    /// When its last frame arrived (the clock the caller last gave).
    progress: Option<Instant>,
}

/// Reassembles frames into messages for one connection. No I/O, no clock.
#[derive(Debug)]
pub struct Reassembler {
    limits: ReassemblyLimits,
    /// Unfinished messages by XID: few at a time, so a vector beats a hash map.
    partial: Vec<(u32, Partial)>,
    buffering: usize,
    discarding: usize,
    promised: u64,
    buffered: u64,
    /// Budgets shared with other connections, all of which a promise draws from.
    shared: Vec<Arc<SharedBudget>>,
    /// The XID that last had a frame buffered (the likeliest sender of the next frame).
    last_xid: Option<u32>,
    /// "Now" as the caller last said ([`Reassembler::set_now`]).
    now: Option<Instant>,
}

impl Drop for Reassembler {
    fn drop(&mut self) {
        for b in &self.shared {
            b.release(self.promised);
        }
    }
}

impl Reassembler {
    /// Drops every unfinished message and gives back what was promised to them, to the
    /// shared budgets too (a connection being closed must not keep other clients'
    /// multi-frame messages BUSY while it says goodbye).
    pub fn abandon_all(&mut self) {
        for b in &self.shared {
            b.release(self.promised);
        }
        self.partial.clear();
        self.buffering = 0;
        self.discarding = 0;
        self.promised = 0;
        self.buffered = 0;
        self.last_xid = None;
    }

    /// A reassembler with these bounds.
    pub fn new(limits: ReassemblyLimits) -> Reassembler {
        Reassembler {
            limits,
            partial: Vec::new(),
            buffering: 0,
            discarding: 0,
            promised: 0,
            buffered: 0,
            shared: Vec::new(),
            last_xid: None,
            now: None,
        }
    }

    /// Tells the reassembler the time, so that it can say how long each unfinished
    /// message has waited for its next frame ([`Reassembler::oldest_progress`]).
    /// There is no clock inside: frames pushed count as arriving at the last time given.
    pub fn set_now(&mut self, now: Instant) {
        self.now = Some(now);
    }

    /// When the unfinished message that has waited longest for its next frame last
    /// received one (its first frame, for one that never progressed). A sender that
    /// keeps the connection busy with other traffic does not reset this: each message
    /// must progress by itself. `None` when no message is unfinished (or no time was
    /// ever given).
    pub fn oldest_progress(&self) -> Option<Instant> {
        self.partial.iter().filter_map(|(_, p)| p.progress).min()
    }

    /// A reassembler that also draws the bytes it promises to unfinished messages
    /// from `budget`, shared with other connections; when the budget is spent, a new
    /// multi-frame message gets BUSY. What it holds is given back as messages finish
    /// and when it is dropped.
    pub fn with_shared_budget(limits: ReassemblyLimits, budget: Arc<SharedBudget>) -> Reassembler {
        Reassembler::with_shared_budgets(limits, vec![budget])
    }

    /// Like [`Reassembler::with_shared_budget`] with several budgets (e.g. the share of
    /// the connection's address, then the server-wide one): a promise must fit all of
    /// them, and a refusal names the first that is spent.
    pub fn with_shared_budgets(
        limits: ReassemblyLimits,
        budgets: Vec<Arc<SharedBudget>>,
    ) -> Reassembler {
        let mut r = Reassembler::new(limits);
        r.shared = budgets;
        r
    }

    /// Draws `n` bytes from every shared budget, or from none: the reason of the first
    /// that has no room.
    fn acquire_shared(&self, n: u64) -> Result<(), &'static str> {
        for (i, b) in self.shared.iter().enumerate() {
            if !b.acquire(n) {
                for taken in &self.shared[..i] {
                    taken.release(n);
                }
                return Err(b.refusal);
            }
        }
        Ok(())
    }

    /// The bounds in force.
    pub fn limits(&self) -> &ReassemblyLimits {
        &self.limits
    }

    /// Number of messages being buffered (not counting refused ones being discarded).
    pub fn partial_messages(&self) -> usize {
        self.buffering
    }

    /// Bytes currently held in unfinished messages.
    pub fn buffered_bytes(&self) -> u64 {
        self.buffered
    }

    /// True when some message has started but not finished (a slow sender may be
    /// holding it open: the I/O layer times this out).
    pub fn has_unfinished(&self) -> bool {
        !self.partial.is_empty()
    }

    /// Feeds one frame. Returns a message or a refusal when this frame finishes one or
    /// refuses one, `None` when it was buffered or discarded, and an error when the
    /// framing is broken (the connection must be closed with PROTOCOL_ERROR).
    pub fn push(&mut self, frame: Frame) -> Result<Option<Inbound>, FramingError> {
        let h = frame.header;
        if h.len as usize > MAX_PAYLOAD {
            return Err(FramingError::LengthTooLarge { len: h.len });
        }
        let found = if self.partial.is_empty() {
            None
        } else {
            self.partial.iter().position(|(x, _)| *x == h.xid)
        };
        if let Some(i) = found {
            let p = &mut self.partial[i].1;
            if h.remaining != p.next_remaining {
                return Err(FramingError::BadRemaining {
                    xid: h.xid,
                    expected: p.next_remaining,
                    got: h.remaining,
                });
            }
            if h.op != p.op || h.arg != p.arg {
                return Err(FramingError::HeaderChanged { xid: h.xid });
            }
            if h.remaining > 0 && h.len as usize != MAX_PAYLOAD {
                return Err(FramingError::ShortFrame {
                    xid: h.xid,
                    len: h.len,
                });
            }
            if let Some(buf) = p.buf.as_mut() {
                buf.extend_from_slice(&frame.payload);
                self.buffered += frame.payload.len() as u64;
            }
            p.progress = self.now.or(p.progress);
            if h.remaining > 0 {
                p.next_remaining = h.remaining - 1;
                self.last_xid = Some(h.xid);
                return Ok(None);
            }
            let (_, p) = self.partial.swap_remove(i);
            self.promised -= p.promised;
            for b in &self.shared {
                b.release(p.promised);
            }
            let Some(buf) = p.buf else {
                self.discarding -= 1;
                return Ok(None);
            };
            self.buffering -= 1;
            self.buffered -= buf.len() as u64;
            if buf.len() as u64 > self.limits.max_message_bytes {
                return Ok(Some(Inbound::Refused {
                    xid: h.xid,
                    status: Status::TooLarge,
                    reason: format!(
                        "message of {} bytes is over the limit of {} bytes",
                        buf.len(),
                        self.limits.max_message_bytes
                    ),
                }));
            }
            return Ok(Some(Inbound::Message(InMessage {
                xid: h.xid,
                op: h.op,
                arg: h.arg,
                payload: buf.freeze(),
            })));
        }

        // The first frame of a message.
        if h.remaining == 0 {
            if frame.payload.len() as u64 > self.limits.max_message_bytes {
                return Ok(Some(too_large(
                    h.xid,
                    frame.payload.len() as u64,
                    &self.limits,
                )));
            }
            return Ok(Some(Inbound::Message(InMessage {
                xid: h.xid,
                op: h.op,
                arg: h.arg,
                payload: frame.payload,
            })));
        }
        if h.len as usize != MAX_PAYLOAD {
            return Err(FramingError::ShortFrame {
                xid: h.xid,
                len: h.len,
            });
        }
        let smallest = h.remaining as u64 * MAX_PAYLOAD as u64;
        let largest = smallest + MAX_PAYLOAD as u64;
        let refusal = if smallest > self.limits.max_message_bytes {
            Some(too_large(h.xid, smallest, &self.limits))
        } else if self.buffering >= self.limits.max_partial_messages {
            Some(Inbound::Refused {
                xid: h.xid,
                status: Status::Busy,
                reason: format!(
                    "{} messages are already being received on this connection",
                    self.buffering
                ),
            })
        } else if self.promised + largest > self.limits.max_partial_bytes {
            Some(Inbound::Refused {
                xid: h.xid,
                status: Status::Busy,
                reason: format!(
                    "unfinished messages on this connection would hold over {} bytes",
                    self.limits.max_partial_bytes
                ),
            })
        } else if let Err(reason) = self.acquire_shared(largest) {
            Some(Inbound::Refused {
                xid: h.xid,
                status: Status::Busy,
                reason: reason.into(),
            })
        } else {
            None
        };
        let next_remaining = h.remaining - 1;
        if refusal.is_some() {
            if self.discarding >= self.limits.max_partial_messages {
                return Err(FramingError::TooManyUnfinished {
                    limit: self.limits.max_partial_messages,
                });
            }
            self.discarding += 1;
            self.partial.push((
                h.xid,
                Partial {
                    op: h.op,
                    arg: h.arg,
                    next_remaining,
                    promised: 0,
                    buf: None,
                    progress: self.now,
                },
            ));
            return Ok(refusal);
        }
        // Reserve the promised size once: growing on demand re-copied the message
        // at every doubling (over a third of the server's time on 1 MiB uploads).
        // The promise is already bounded per connection and server-wide, and a large
        // allocation is only address space until the frames arrive and fill it.
        let mut buf = BytesMut::with_capacity(largest as usize);
        buf.extend_from_slice(&frame.payload);
        self.buffered += frame.payload.len() as u64;
        self.buffering += 1;
        self.promised += largest;
        self.last_xid = Some(h.xid);
        self.partial.push((
            h.xid,
            Partial {
                op: h.op,
                arg: h.arg,
                next_remaining,
                promised: largest,
                buf: Some(buf),
                progress: self.now,
            },
        ));
        Ok(None)
    }
}

/// Direct placement of payloads (see [`crate::receive`]): frames checked and consumed
/// by the caller, their payload written by the caller straight into the message's buffer.
impl Reassembler {
    /// The message whose next frames a read may place directly: the one that last
    /// had a frame buffered, if it is still being buffered and is due at least one more
    /// full (not last) frame. Returns its XID and how many full frames are still due.
    pub(crate) fn direct_target(&self) -> Option<(u32, u16)> {
        let xid = self.last_xid?;
        let p = &self.partial.iter().find(|(x, _)| *x == xid)?.1;
        (p.buf.is_some() && p.next_remaining > 0).then_some((xid, p.next_remaining))
    }

    /// Accepts `h` as the header of a full, not-last frame of a message being buffered,
    /// exactly when [`Reassembler::push`] would; its payload must then be appended with
    /// [`Reassembler::direct_buf`] and [`Reassembler::add_buffered`]. Without a match
    /// nothing changes and the frame must go through `push`.
    pub(crate) fn accept_direct(&mut self, h: &FrameHeader) -> bool {
        if h.remaining == 0 || h.len as usize != MAX_PAYLOAD {
            return false;
        }
        let Some((_, p)) = self.partial.iter_mut().find(|(x, _)| *x == h.xid) else {
            return false;
        };
        if p.buf.is_none() || h.remaining != p.next_remaining || h.op != p.op || h.arg != p.arg {
            return false;
        }
        p.next_remaining = h.remaining - 1;
        p.progress = self.now.or(p.progress);
        self.last_xid = Some(h.xid);
        true
    }

    /// The buffer of the message being buffered under `xid`.
    pub(crate) fn direct_buf(&mut self, xid: u32) -> Option<&mut BytesMut> {
        self.partial
            .iter_mut()
            .find(|(x, _)| *x == xid)
            .and_then(|(_, p)| p.buf.as_mut())
    }

    /// Counts `n` payload bytes appended through [`Reassembler::direct_buf`].
    pub(crate) fn add_buffered(&mut self, n: usize) {
        self.buffered += n as u64;
    }
}

fn too_large(xid: u32, at_least: u64, limits: &ReassemblyLimits) -> Inbound {
    Inbound::Refused {
        xid,
        status: Status::TooLarge,
        reason: format!(
            "message of at least {at_least} bytes is over the limit of {} bytes",
            limits.max_message_bytes
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::FrameHeader;

    fn frame(xid: u32, remaining: u16, op: u8, payload: &[u8]) -> Frame {
        Frame {
            header: FrameHeader {
                xid,
                remaining,
                op,
                arg: 0,
                len: payload.len() as u16,
            },
            payload: Bytes::copy_from_slice(payload),
        }
    }

    fn limits(max_message: u64) -> ReassemblyLimits {
        ReassemblyLimits {
            max_message_bytes: max_message,
            max_partial_messages: 2,
            max_partial_bytes: 10 * 1390,
        }
    }

    #[test]
    fn interleaved_messages_reassemble() {
        let mut r = Reassembler::new(limits(100_000));
        let full_a = [b'a'; 1390];
        let full_b = [b'b'; 1390];
        assert_eq!(r.push(frame(1, 1, 3, &full_a)), Ok(None));
        assert_eq!(r.push(frame(2, 2, 3, &full_b)), Ok(None));
        // A single-frame message in the middle is delivered at once.
        let got = r.push(frame(3, 0, 2, b"small")).unwrap().unwrap();
        assert!(matches!(got, Inbound::Message(ref m) if m.xid == 3 && &m.payload[..] == b"small"));
        let a = r.push(frame(1, 0, 3, b"end")).unwrap().unwrap();
        let Inbound::Message(a) = a else { panic!() };
        assert_eq!(a.payload.len(), 1393);
        assert_eq!(&a.payload[1390..], b"end");
        assert_eq!(r.push(frame(2, 1, 3, &full_b)), Ok(None));
        let Inbound::Message(b) = r.push(frame(2, 0, 3, b"")).unwrap().unwrap() else {
            panic!()
        };
        assert_eq!(b.payload.len(), 2780, "an empty last frame is valid");
        assert_eq!(r.buffered_bytes(), 0);
        assert!(!r.has_unfinished());
    }

    #[test]
    fn oversized_message_is_refused_at_first_frame_and_discarded() {
        let mut r = Reassembler::new(limits(2000));
        let full = [0u8; 1390];
        let refused = r.push(frame(5, 2, 3, &full)).unwrap().unwrap();
        assert!(matches!(
            refused,
            Inbound::Refused {
                xid: 5,
                status: Status::TooLarge,
                ..
            }
        ));
        assert_eq!(r.buffered_bytes(), 0);
        assert_eq!(r.push(frame(5, 1, 3, &full)), Ok(None));
        assert_eq!(r.push(frame(5, 0, 3, b"x")), Ok(None));
        assert_eq!(r.buffered_bytes(), 0);
        // The connection stays usable.
        assert!(matches!(
            r.push(frame(6, 0, 9, b"")),
            Ok(Some(Inbound::Message(_)))
        ));
    }

    #[test]
    fn last_band_overflow_is_refused_at_last_frame() {
        let mut r = Reassembler::new(limits(1400));
        let full = [0u8; 1390];
        assert_eq!(r.push(frame(5, 1, 3, &full)), Ok(None));
        let got = r.push(frame(5, 0, 3, &[0; 11])).unwrap().unwrap();
        assert!(matches!(
            got,
            Inbound::Refused {
                status: Status::TooLarge,
                ..
            }
        ));
        let got = r.push(frame(6, 1, 3, &full)).unwrap();
        assert_eq!(got, None);
        let got = r.push(frame(6, 0, 3, &[0; 10])).unwrap().unwrap();
        assert!(matches!(got, Inbound::Message(ref m) if m.payload.len() == 1400));
    }

    #[test]
    fn busy_past_partial_limits() {
        let mut r = Reassembler::new(limits(1_000_000));
        let full = [0u8; 1390];
        assert_eq!(r.push(frame(1, 1, 3, &full)), Ok(None));
        assert_eq!(r.push(frame(2, 1, 3, &full)), Ok(None));
        let got = r.push(frame(3, 1, 3, &full)).unwrap().unwrap();
        assert!(matches!(
            got,
            Inbound::Refused {
                xid: 3,
                status: Status::Busy,
                ..
            }
        ));
        // Promised bytes: a 9-frame message does not fit beside the two 2-frame ones.
        let mut r = Reassembler::new(limits(1_000_000));
        assert_eq!(r.push(frame(1, 1, 3, &full)), Ok(None));
        let got = r.push(frame(2, 8, 3, &full)).unwrap().unwrap();
        assert!(matches!(
            got,
            Inbound::Refused {
                xid: 2,
                status: Status::Busy,
                ..
            }
        ));
        assert_eq!(r.push(frame(2, 7, 3, &full)), Ok(None));
    }

    #[test]
    fn framing_errors() {
        let full = [0u8; 1390];
        let mut r = Reassembler::new(limits(100_000));
        assert_eq!(
            r.push(frame(1, 1, 3, b"short")),
            Err(FramingError::ShortFrame { xid: 1, len: 5 })
        );
        let mut r = Reassembler::new(limits(100_000));
        r.push(frame(1, 3, 3, &full)).unwrap();
        assert_eq!(
            r.push(frame(1, 1, 3, &full)),
            Err(FramingError::BadRemaining {
                xid: 1,
                expected: 2,
                got: 1
            })
        );
        let mut r = Reassembler::new(limits(100_000));
        r.push(frame(1, 3, 3, &full)).unwrap();
        assert_eq!(
            r.push(frame(1, 2, 4, &full)),
            Err(FramingError::HeaderChanged { xid: 1 })
        );
        let mut r = Reassembler::new(limits(100_000));
        r.push(frame(1, 2, 3, &full)).unwrap();
        assert_eq!(
            r.push(frame(1, 1, 3, b"x")),
            Err(FramingError::ShortFrame { xid: 1, len: 1 })
        );
    }

    #[test]
    fn a_shared_budget_bounds_all_connections_together() {
        let budget = SharedBudget::new(3 * 1390);
        let full = [0u8; 1390];
        let mut a = Reassembler::with_shared_budget(limits(1_000_000), budget.clone());
        let mut b = Reassembler::with_shared_budget(limits(1_000_000), budget.clone());
        assert_eq!(a.push(frame(1, 1, 3, &full)), Ok(None)); // promises 2 frames
        assert_eq!(budget.used(), 2 * 1390);
        let refused = b.push(frame(1, 1, 3, &full)).unwrap().unwrap();
        assert!(matches!(
            refused,
            Inbound::Refused {
                status: Status::Busy,
                ..
            }
        ));
        // Finishing a message gives its share back; so does dropping a connection.
        assert!(matches!(
            a.push(frame(1, 0, 3, b"x")),
            Ok(Some(Inbound::Message(_)))
        ));
        assert_eq!(budget.used(), 0);
        assert_eq!(b.push(frame(2, 1, 3, &full)), Ok(None));
        drop(b);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn abandoning_gives_every_promise_back_at_once_and_only_once() {
        let budget = SharedBudget::new(10 * 1390);
        let full = [0u8; 1390];
        let mut a = Reassembler::with_shared_budget(limits(1_000_000), budget.clone());
        assert_eq!(a.push(frame(1, 2, 3, &full)), Ok(None));
        assert_eq!(a.push(frame(2, 1, 3, &full)), Ok(None));
        assert_eq!(budget.used(), 5 * 1390);
        a.abandon_all();
        assert_eq!(budget.used(), 0);
        assert!(!a.has_unfinished());
        assert_eq!(a.oldest_progress(), None);
        // The whole budget is there again, and the accounting still adds up.
        assert_eq!(a.push(frame(7, 9, 3, &full)), Ok(None));
        assert_eq!(budget.used(), 10 * 1390);
        drop(a);
        assert_eq!(budget.used(), 0, "dropping does not give back twice");
    }

    #[test]
    fn a_promise_must_fit_every_budget_and_takes_from_none_when_one_is_spent() {
        let per_ip = SharedBudget::with_refusal(2 * 1390, "this address holds too much");
        let global = SharedBudget::new(10 * 1390);
        let full = [0u8; 1390];
        let mut a = Reassembler::with_shared_budgets(
            limits(1_000_000),
            vec![per_ip.clone(), global.clone()],
        );
        assert_eq!(a.push(frame(1, 1, 3, &full)), Ok(None));
        let Some(Inbound::Refused { status, reason, .. }) = a.push(frame(2, 1, 3, &full)).unwrap()
        else {
            panic!("refused")
        };
        assert_eq!(status, Status::Busy);
        assert_eq!(reason, "this address holds too much");
        assert_eq!(
            global.used(),
            2 * 1390,
            "nothing taken from the other budget"
        );
        // Another address has its own share of the same global budget.
        let other_ip = SharedBudget::with_refusal(2 * 1390, "x");
        let mut b =
            Reassembler::with_shared_budgets(limits(1_000_000), vec![other_ip, global.clone()]);
        assert_eq!(b.push(frame(1, 1, 3, &full)), Ok(None));
        assert_eq!(global.used(), 4 * 1390);
        drop(a);
        drop(b);
        assert_eq!((per_ip.used(), global.used()), (0, 0));
    }

    #[test]
    fn each_unfinished_message_reports_its_own_last_progress() {
        use std::time::{Duration, Instant};
        let t0 = Instant::now();
        let full = [0u8; 1390];
        let mut r = Reassembler::new(limits(1_000_000));
        assert_eq!(r.oldest_progress(), None);
        r.set_now(t0);
        r.push(frame(1, 2, 3, &full)).unwrap();
        r.set_now(t0 + Duration::from_secs(1));
        r.push(frame(2, 1, 3, &full)).unwrap();
        // Other traffic (a single-frame message) does not count as progress of 1.
        r.set_now(t0 + Duration::from_secs(5));
        r.push(frame(3, 0, 9, b"")).unwrap();
        assert_eq!(r.oldest_progress(), Some(t0));
        r.push(frame(1, 1, 3, &full)).unwrap();
        assert_eq!(r.oldest_progress(), Some(t0 + Duration::from_secs(1)));
        r.push(frame(2, 0, 3, b"x")).unwrap();
        assert_eq!(r.oldest_progress(), Some(t0 + Duration::from_secs(5)));
        r.push(frame(1, 0, 3, b"x")).unwrap();
        assert_eq!(r.oldest_progress(), None);
    }

    #[test]
    fn too_many_discarded_messages_is_a_protocol_error() {
        let mut r = Reassembler::new(limits(10));
        let full = [0u8; 1390];
        for xid in 0..2 {
            assert!(matches!(
                r.push(frame(xid, 5, 3, &full)),
                Ok(Some(Inbound::Refused { .. }))
            ));
        }
        assert_eq!(
            r.push(frame(9, 5, 3, &full)),
            Err(FramingError::TooManyUnfinished { limit: 2 })
        );
    }
}
