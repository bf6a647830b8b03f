//! Fragmentation of outgoing messages with a fair (round-robin) frame scheduler.
//!
//! Each queued message sends one frame per turn, so a small message queued behind a
//! 64 MiB one waits for at most one frame of each message ahead of it, never for the
//! whole of them.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};

use crate::frame::{FrameHeader, HEADER_LEN, MAX_MESSAGE, MAX_PAYLOAD};
use crate::message::{Head, OutMessage};

/// One outgoing frame: a header and its payload as the part of the message's inline
/// head it carries and a shared slice of its body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutFrame {
    /// The frame header.
    pub header: FrameHeader,
    /// First part of the payload (from the message's head).
    pub first: Head,
    /// Second part of the payload (from the message's body).
    pub second: Bytes,
}

impl OutFrame {
    /// Appends header and payload to `dst`.
    pub fn encode(&self, dst: &mut BytesMut) {
        dst.reserve(HEADER_LEN + self.first.len() + self.second.len());
        self.header.encode(dst);
        dst.extend_from_slice(&self.first);
        dst.extend_from_slice(&self.second);
    }
}

/// The message is larger than 65,536 frames can carry.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("message of {0} bytes is over the framing limit of 91,095,040 bytes")]
pub struct MessageTooLarge(pub usize);

#[derive(Debug)]
struct Sending {
    msg: OutMessage,
    /// Payload bytes already framed.
    sent: usize,
    /// REMAINING of the next frame.
    remaining: u16,
}

/// Messages of at least this many payload bytes count as large in
/// [`OutQueue::large_messages`]; the rest count by bytes in
/// [`OutQueue::small_pending_bytes`].
pub const LARGE_MESSAGE: usize = 1 << 20;

/// A queue of outgoing messages that yields their frames round-robin.
#[derive(Debug, Default)]
pub struct OutQueue {
    queue: VecDeque<Sending>,
    pending_bytes: usize,
    small_pending: usize,
    large: usize,
}

/// Frames needed for a payload of `len` bytes (an empty payload is one empty frame).
pub fn frame_count(len: usize) -> usize {
    len.div_ceil(MAX_PAYLOAD).max(1)
}

impl OutQueue {
    /// An empty queue.
    pub fn new() -> OutQueue {
        OutQueue::default()
    }

    /// Queues a message behind the others.
    pub fn push(&mut self, msg: OutMessage) -> Result<(), MessageTooLarge> {
        let len = msg.len();
        if len as u64 > MAX_MESSAGE {
            return Err(MessageTooLarge(len));
        }
        let remaining = (frame_count(len) - 1) as u16;
        self.pending_bytes += len + frame_count(len) * HEADER_LEN;
        if len >= LARGE_MESSAGE {
            self.large += 1;
        } else {
            self.small_pending += len + frame_count(len) * HEADER_LEN;
        }
        self.queue.push_back(Sending {
            msg,
            sent: 0,
            remaining,
        });
        Ok(())
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Messages not yet completely framed.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Wire bytes (headers included) still to be produced.
    pub fn pending_bytes(&self) -> usize {
        self.pending_bytes
    }

    /// Wire bytes still to be produced for messages smaller than [`LARGE_MESSAGE`].
    ///
    /// Large replies usually share their bytes with the store, so a server applies
    /// backpressure on this figure and on [`OutQueue::large_messages`] separately:
    /// one large reply in flight must not stop it from reading small requests.
    pub fn small_pending_bytes(&self) -> usize {
        self.small_pending
    }

    /// Messages of at least [`LARGE_MESSAGE`] bytes not yet completely framed.
    pub fn large_messages(&self) -> usize {
        self.large
    }

    /// The next frame in round-robin order.
    pub fn pop_frame(&mut self) -> Option<OutFrame> {
        let mut s = self.queue.pop_front()?;
        let total = s.msg.len();
        let n = (total - s.sent).min(MAX_PAYLOAD);
        let (start, end) = (s.sent, s.sent + n);
        let head_len = s.msg.head.len();
        let first = if start < head_len {
            Head::from_slice(&s.msg.head[start..end.min(head_len)])
        } else {
            Head::new()
        };
        let second = if end > head_len {
            let from = start.max(head_len) - head_len;
            if from == 0 && end - head_len == s.msg.body.len() {
                s.msg.body.clone()
            } else {
                s.msg.body.slice(from..end - head_len)
            }
        } else {
            Bytes::new()
        };
        let frame = OutFrame {
            header: FrameHeader {
                xid: s.msg.xid,
                remaining: s.remaining,
                op: s.msg.op,
                arg: s.msg.arg,
                len: n as u16,
            },
            first,
            second,
        };
        self.pending_bytes -= n + HEADER_LEN;
        let large = total >= LARGE_MESSAGE;
        if !large {
            self.small_pending -= n + HEADER_LEN;
        }
        if s.remaining > 0 {
            s.sent = end;
            s.remaining -= 1;
            self.queue.push_back(s);
        } else if large {
            self.large -= 1;
        }
        Some(frame)
    }

    /// Encodes frames into `dst` until it holds at least `limit` bytes or the queue is
    /// empty. Returns the number of frames written.
    pub fn write_to(&mut self, dst: &mut BytesMut, limit: usize) -> usize {
        let mut frames = 0;
        while dst.len() < limit {
            match self.pop_frame() {
                Some(f) => {
                    f.encode(dst);
                    frames += 1;
                }
                None => break,
            }
        }
        frames
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(xid: u32, len: usize) -> OutMessage {
        OutMessage {
            xid,
            op: 3,
            arg: 0,
            head: Head::new(),
            body: Bytes::from(vec![xid as u8; len]),
        }
    }

    #[test]
    fn small_message_is_not_stuck_behind_a_large_one() {
        let mut q = OutQueue::new();
        q.push(msg(1, 755 * MAX_PAYLOAD)).unwrap();
        q.push(msg(2, 10)).unwrap();
        assert_eq!(q.small_pending_bytes(), HEADER_LEN + 10);
        let first = q.pop_frame().unwrap();
        assert_eq!(first.header.xid, 1);
        assert_eq!(first.header.remaining, 754);
        let second = q.pop_frame().unwrap();
        assert_eq!(second.header.xid, 2, "the small reply goes out second");
        assert_eq!(second.header.remaining, 0);
        assert_eq!((q.large_messages(), q.small_pending_bytes()), (1, 0));
        let rest: Vec<_> = std::iter::from_fn(|| q.pop_frame()).collect();
        assert_eq!(rest.len(), 754);
        assert_eq!((q.large_messages(), q.small_pending_bytes()), (0, 0));
        assert!(rest.iter().all(|f| f.header.xid == 1));
        assert_eq!(rest.last().unwrap().header.remaining, 0);
        assert_eq!(q.pending_bytes(), 0);
    }

    #[test]
    fn frames_span_head_and_body_and_are_full_but_the_last() {
        let mut q = OutQueue::new();
        q.push(OutMessage {
            xid: 7,
            op: 3,
            arg: 0,
            head: Head::from_slice(&[1; 16]),
            body: Bytes::from(vec![2; 2 * MAX_PAYLOAD]),
        })
        .unwrap();
        let mut out = BytesMut::new();
        assert_eq!(q.write_to(&mut out, usize::MAX), 3);
        assert_eq!(out.len(), 3 * HEADER_LEN + 16 + 2 * MAX_PAYLOAD);
        let mut buf = out;
        let mut payload = Vec::new();
        let mut lens = Vec::new();
        while let Some(f) = crate::frame::decode_frame(&mut buf).unwrap() {
            lens.push((f.header.remaining, f.header.len));
            payload.extend_from_slice(&f.payload);
        }
        assert_eq!(lens, vec![(2, 1390), (1, 1390), (0, 16)]);
        assert_eq!(&payload[..16], &[1; 16]);
        assert!(payload[16..].iter().all(|&b| b == 2));
    }

    #[test]
    fn empty_message_is_one_empty_frame() {
        let mut q = OutQueue::new();
        q.push(msg(1, 0)).unwrap();
        let f = q.pop_frame().unwrap();
        assert_eq!((f.header.remaining, f.header.len), (0, 0));
        assert!(q.is_empty());
    }

    #[test]
    fn exact_multiple_has_no_trailing_empty_frame() {
        assert_eq!(frame_count(MAX_PAYLOAD), 1);
        assert_eq!(frame_count(MAX_PAYLOAD + 1), 2);
        assert_eq!(frame_count(2 * MAX_PAYLOAD), 2);
    }
}
