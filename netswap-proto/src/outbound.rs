//! Fragmentation of outgoing messages with a fair (round-robin) frame scheduler.
//!
//! Each queued message sends one frame per turn, so a small message queued behind a
//! 64 MiB one waits for at most one frame of each message ahead of it, never for the
//! whole of them.

use std::collections::VecDeque;

use std::io::IoSlice;

use bytes::{Buf, Bytes, BytesMut};

use crate::frame::{FrameHeader, HEADER_LEN, MAX_FRAME, MAX_MESSAGE, MAX_PAYLOAD};
use crate::message::{Head, OutMessage, Reply};
use crate::types::Status;

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

/// Multi-frame messages an [`OutQueue`] interleaves at once, at most; the others wait
/// their turn unstarted. The receiver holds every started message until its last frame
/// (a netswap server refuses more than `max_partial_messages`, 64 by default, and
/// closes a connection that goes on sending the frames of more than that many refused
/// ones): a client pipelining hundreds of 4 KiB writes must not start them all at once.
pub const MAX_INTERLEAVED: usize = 16;

/// A queue of outgoing messages that yields their frames round-robin, interleaving at
/// most [`MAX_INTERLEAVED`] multi-frame messages at a time (single-frame messages always
/// take their turn in the rotation at once).
#[derive(Debug, Default)]
pub struct OutQueue {
    /// Messages in the rotation.
    queue: VecDeque<Sending>,
    /// Multi-frame messages in `queue`.
    multi: usize,
    /// Multi-frame messages waiting for a place in the rotation, in arrival order.
    held: VecDeque<Sending>,
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
        let s = Sending {
            msg,
            sent: 0,
            remaining,
        };
        if remaining == 0 {
            self.queue.push_back(s);
        } else if self.multi < MAX_INTERLEAVED {
            self.multi += 1;
            self.queue.push_back(s);
        } else {
            self.held.push_back(s);
        }
        Ok(())
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty() && self.held.is_empty()
    }

    /// Takes back the message with this XID if none of its frames was produced yet
    /// (a request cancelled before it left: the peer never sees it). True when it was
    /// removed.
    pub fn remove_unstarted(&mut self, xid: u32) -> bool {
        let unstarted = |s: &Sending| {
            s.msg.xid == xid && s.sent == 0 && s.remaining as usize + 1 == frame_count(s.msg.len())
        };
        let s = if let Some(i) = self.held.iter().position(unstarted) {
            self.held.remove(i).expect("found")
        } else if let Some(i) = self.queue.iter().position(unstarted) {
            let s = self.queue.remove(i).expect("found");
            if s.remaining > 0 {
                self.end_multi();
            }
            s
        } else {
            return false;
        };
        let len = s.msg.len();
        let wire = len + frame_count(len) * HEADER_LEN;
        self.pending_bytes -= wire;
        if len >= LARGE_MESSAGE {
            self.large -= 1;
        } else {
            self.small_pending -= wire;
        }
        true
    }

    /// Messages not yet completely framed.
    pub fn len(&self) -> usize {
        self.queue.len() + self.held.len()
    }

    /// A multi-frame message left the rotation: the next held one takes its place.
    fn end_multi(&mut self) {
        match self.held.pop_front() {
            Some(s) => self.queue.push_back(s),
            None => self.multi -= 1,
        }
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
        self.pop_frame_with(|header, first, body, range| OutFrame {
            header: *header,
            first: Head::from_slice(first),
            second: if range.len() == body.len() {
                body.clone()
            } else {
                body.slice(range)
            },
        })
    }

    /// The next frame in round-robin order, lent to `f` as its header, the part of the
    /// message's head it carries, and the message's body with the range it carries:
    /// no reference count is taken unless `f` takes one.
    pub fn pop_frame_with<R>(
        &mut self,
        f: impl FnOnce(&FrameHeader, &[u8], &Bytes, std::ops::Range<usize>) -> R,
    ) -> Option<R> {
        let s = self.queue.front_mut()?;
        let total = s.msg.len();
        let n = (total - s.sent).min(MAX_PAYLOAD);
        let (start, end) = (s.sent, s.sent + n);
        let head_len = s.msg.head.len();
        let first = if start < head_len {
            &s.msg.head[start..end.min(head_len)]
        } else {
            &[]
        };
        let range = if end > head_len {
            start.max(head_len) - head_len..end - head_len
        } else {
            0..0
        };
        let header = FrameHeader {
            xid: s.msg.xid,
            remaining: s.remaining,
            op: s.msg.op,
            arg: s.msg.arg,
            len: n as u16,
        };
        let out = f(&header, first, &s.msg.body, range);
        self.pending_bytes -= n + HEADER_LEN;
        let large = total >= LARGE_MESSAGE;
        if !large {
            self.small_pending -= n + HEADER_LEN;
        }
        if s.remaining > 0 {
            s.sent = end;
            s.remaining -= 1;
            if self.queue.len() > 1 {
                // Its turn is over: to the back (a lone message stays where it is).
                let s = self.queue.pop_front().expect("front exists");
                self.queue.push_back(s);
            }
        } else {
            let done = self.queue.pop_front().expect("front exists");
            if large {
                self.large -= 1;
            }
            if frame_count(done.msg.len()) > 1 {
                self.end_multi();
            }
        }
        Some(out)
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

/// Bodies at least this long are written from where they are, not staged (their
/// frames' slices of at least half a frame): below it, copying is cheaper than a
/// reference and a separate slice per frame.
const IN_PLACE: usize = 8 * 1024;
/// Staging memory is reserved in blocks of this size.
const STAGE_BLOCK: usize = 16 * 1024;

/// Frames taken from an [`OutQueue`] on their way to a socket, as a [`Buf`] for
/// vectored writes: headers and short payloads are staged into one buffer, longer
/// payload slices (record data shared with the store) are written from where they
/// are, without a copy. A partial write just advances it.
///
/// Per frame it stores two (pointer, length) pairs and nothing else: the memory they
/// point into is kept alive by one reference per staging block and per message body,
/// taken once per [`WriteBuf::fill`], not once per frame.
#[derive(Debug, Default)]
pub struct WriteBuf {
    /// Slices still to write, in order. Each points into a holder below.
    segs: VecDeque<Seg>,
    /// What keeps the memory of `segs` alive, with the sequence number of the last
    /// slice that points into it.
    holders: VecDeque<(u64, Bytes)>,
    /// Staging block being filled (its filled part is not yet a holder).
    stage: BytesMut,
    /// Sequence number of `segs[0]`.
    first_seq: u64,
    /// The last slice points into the unsealed staging block (a staged slice may be
    /// merged into it).
    stage_open: bool,
    len: usize,
}

#[derive(Clone, Copy, Debug)]
struct Seg {
    ptr: *const u8,
    len: usize,
}

// SAFETY: the raw pointers point into memory owned through `Bytes`/`BytesMut` held by
// the same `WriteBuf` (both are `Send`); they are only read, and only through `&self`.
unsafe impl Send for WriteBuf {}
// SAFETY: as above; shared access only reads.
unsafe impl Sync for WriteBuf {}

impl WriteBuf {
    /// An empty buffer.
    pub fn new() -> WriteBuf {
        WriteBuf::default()
    }

    /// Bytes waiting to be written.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends a slice. Staged slices that follow each other in the unsealed block
    /// become one (many small replies: one slice), never slices of different holders.
    fn push_seg(&mut self, ptr: *const u8, len: usize, staged: bool) {
        if staged
            && self.stage_open
            && let Some(last) = self.segs.back_mut()
            && last.ptr.wrapping_add(last.len) == ptr
        {
            last.len += len;
        } else {
            self.segs.push_back(Seg { ptr, len });
        }
        self.stage_open = staged;
        self.len += len;
    }

    /// Sequence number of the last slice.
    fn last_seq(&self) -> u64 {
        (self.first_seq + self.segs.len() as u64).saturating_sub(1)
    }

    /// Freezes the staged bytes into a holder held until slice `last` is written
    /// (their slices already point into them).
    fn seal_stage(&mut self, last: u64) {
        if !self.stage.is_empty() {
            let block = self.stage.split().freeze();
            self.holders.push_back((last, block));
        }
        self.stage_open = false;
    }

    /// Takes frames from `q`, in its fair order, until at least `limit` bytes wait or
    /// `q` is empty. Returns the number of frames taken. Does nothing when `q` is empty
    /// or `limit` bytes already wait (writers top up before every write).
    pub fn fill(&mut self, q: &mut OutQueue, limit: usize) -> usize {
        if q.is_empty() || self.len >= limit {
            return 0;
        }
        let mut frames = 0;
        // Room for the slices this fill will add (two per large frame), up front.
        let expect = limit.min(q.pending_bytes()) / MAX_FRAME + q.len();
        self.segs.reserve(2 * expect.min(1024));
        while self.len < limit {
            let room = self.stage.capacity() - self.stage.len();
            if room < MAX_FRAME {
                // A new block: the staged slices point into this one, so it is never
                // grown (which could move it), only sealed and replaced.
                self.seal_stage(self.last_seq());
                self.stage.reserve(STAGE_BLOCK);
            }
            let taken = q.pop_frame_with(|header, first, body, range| {
                let in_place = body.len() >= IN_PLACE && range.len() >= MAX_PAYLOAD / 2;
                let at = self.stage.len();
                self.stage.extend_from_slice(&header.to_bytes());
                self.stage.extend_from_slice(first);
                if !in_place {
                    self.stage.extend_from_slice(&body[range.clone()]);
                }
                let staged = self.stage.len() - at;
                // SAFETY: `at..at + staged` is inside the block's filled part.
                let ptr = unsafe { self.stage.as_ptr().add(at) };
                self.push_seg(ptr, staged, true);
                if in_place {
                    let same = self
                        .holders
                        .back()
                        .is_some_and(|(_, h)| h.as_ptr() == body.as_ptr() && h.len() == body.len());
                    // SAFETY: `range` is inside `body`.
                    let ptr = unsafe { body.as_ptr().add(range.start) };
                    if !same {
                        // Seal the staged slices so far: holders stay in the order of
                        // their last slices, and are released in that order.
                        self.seal_stage(self.last_seq());
                    }
                    self.push_seg(ptr, range.len(), false);
                    let seq = self.last_seq();
                    if same {
                        self.holders.back_mut().expect("checked").0 = seq;
                    } else {
                        self.holders.push_back((seq, body.clone()));
                    }
                }
            });
            if taken.is_none() {
                break;
            }
            frames += 1;
        }
        self.seal_stage(self.last_seq());
        frames
    }

    /// Appends a message that fits one frame and has a small body straight after what
    /// waits, as an [`OutQueue`] holding nothing else would produce it: a server
    /// answering small requests while nothing is queued skips the queue. Returns false,
    /// doing nothing, for any other message.
    pub fn push_message(&mut self, msg: &OutMessage) -> bool {
        if msg.body.len() >= IN_PLACE {
            return false;
        }
        self.push_frame(msg.xid, msg.op, msg.arg, &[&msg.head, &msg.body])
    }

    /// Appends the DATA reply to `xid` carrying `data`, as [`WriteBuf::push_message`]
    /// would append `Reply::Data(data).encode(xid)`, copying the bytes from where they
    /// are (a server copies a READ's bytes from the record, with no handle to share).
    /// Returns false, doing nothing, when they do not fit one frame.
    pub fn push_data(&mut self, xid: u32, data: &[u8]) -> bool {
        self.push_frame(xid, Status::Data as u8, 0, &[data])
    }

    /// Appends a reply made of a few fixed bytes (WRITTEN or CONFLICT and a version,
    /// CREATED and a pointer, DONE) as [`WriteBuf::push_message`] would append
    /// `reply.encode(xid)`, without building the message first (what a write's reply
    /// cost a server: docs/BENCHMARKS.md). Returns false, doing nothing, for any
    /// other reply.
    pub fn push_reply(&mut self, xid: u32, reply: &Reply) -> bool {
        let status = reply.status() as u8;
        match reply {
            Reply::Written(v) | Reply::Conflict(v) => {
                self.push_frame(xid, status, 0, &[&v.to_be_bytes()])
            }
            Reply::Created(p) => self.push_frame(xid, status, 0, &[&p.to_be_bytes()]),
            Reply::Done => self.push_frame(xid, status, 0, &[]),
            _ => false,
        }
    }

    fn push_frame(&mut self, xid: u32, op: u8, arg: u8, parts: &[&[u8]]) -> bool {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if len > MAX_PAYLOAD {
            return false;
        }
        if self.stage.capacity() - self.stage.len() < HEADER_LEN + len {
            self.seal_stage(self.last_seq());
            self.stage.reserve(STAGE_BLOCK);
        }
        let header = FrameHeader {
            xid,
            remaining: 0,
            op,
            arg,
            len: len as u16,
        };
        let at = self.stage.len();
        self.stage.extend_from_slice(&header.to_bytes());
        for p in parts {
            self.stage.extend_from_slice(p);
        }
        // SAFETY: `at..` is inside the block's filled part, which is never moved.
        let ptr = unsafe { self.stage.as_ptr().add(at) };
        self.push_seg(ptr, HEADER_LEN + len, true);
        true
    }

    /// Fills `dst` with the slices of the next `max_bytes` bytes at most (the last
    /// slice cut short where that limit falls inside it) and returns how many it
    /// filled: one vectored write of a bounded size (see [`crate::MAX_WRITE`]).
    pub fn io_slices<'a>(&'a self, dst: &mut [IoSlice<'a>], max_bytes: usize) -> usize {
        let mut n = 0;
        let mut left = max_bytes;
        for (d, s) in dst.iter_mut().zip(&self.segs) {
            if left == 0 {
                break;
            }
            let len = s.len.min(left);
            // SAFETY: as in `chunk`; `len` is at most the slice's length.
            *d = IoSlice::new(unsafe { std::slice::from_raw_parts(s.ptr, len) });
            left -= len;
            n += 1;
        }
        n
    }

    /// Gives back the staging memory when nothing waits (idle connections).
    pub fn release_idle_buffer(&mut self) {
        if self.is_empty() {
            *self = WriteBuf {
                first_seq: self.first_seq,
                ..WriteBuf::default()
            };
        }
    }
}

impl Buf for WriteBuf {
    fn remaining(&self) -> usize {
        self.len
    }

    fn chunk(&self) -> &[u8] {
        match self.segs.front() {
            // SAFETY: a holder keeps the slice's memory alive until it is consumed.
            Some(s) => unsafe { std::slice::from_raw_parts(s.ptr, s.len) },
            None => &[],
        }
    }

    fn chunks_vectored<'a>(&'a self, dst: &mut [IoSlice<'a>]) -> usize {
        self.io_slices(dst, usize::MAX)
    }

    fn advance(&mut self, mut cnt: usize) {
        assert!(cnt <= self.len, "advance past the end of a WriteBuf");
        self.len -= cnt;
        while cnt > 0 {
            let front = self.segs.front_mut().expect("bytes remain");
            if cnt < front.len {
                front.ptr = front.ptr.wrapping_add(cnt);
                front.len -= cnt;
                break;
            }
            cnt -= front.len;
            self.segs.pop_front();
            self.first_seq += 1;
        }
        while self
            .holders
            .front()
            .is_some_and(|(last, _)| *last < self.first_seq)
        {
            self.holders.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{HEAD_CAPACITY, Reply};

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

    /// A queue holding `msgs`, and the bytes it produces (encoded by `write_to`).
    fn queued_with_wire(msgs: &[OutMessage]) -> (OutQueue, BytesMut) {
        let mut q = OutQueue::new();
        for m in msgs {
            q.push(m.clone()).unwrap();
        }
        let mut want = BytesMut::new();
        q.write_to(&mut want, usize::MAX);
        for m in msgs {
            q.push(m.clone()).unwrap();
        }
        (q, want)
    }

    #[test]
    fn write_buf_yields_the_same_bytes_as_encoding_through_any_partial_writes() {
        let msgs = [
            msg(1, 5000),
            msg(2, 10),
            msg(3, 0),
            msg(4, 3 * MAX_PAYLOAD + 1),
        ];
        let (mut q, want) = queued_with_wire(&msgs);
        let mut wb = WriteBuf::new();
        let mut got = Vec::new();
        let mut step = 1;
        while !q.is_empty() || !wb.is_empty() {
            if wb.len() < 3000 {
                wb.fill(&mut q, 3000);
            }
            // A "socket" taking at most 3 slices and `step` bytes per write.
            let mut io = [IoSlice::new(&[]); 3];
            let k = wb.chunks_vectored(&mut io);
            let mut n = 0;
            for s in &io[..k] {
                let take = s.len().min(step - n);
                got.extend_from_slice(&s[..take]);
                n += take;
            }
            wb.advance(n);
            step = step % 4000 + 777;
        }
        assert_eq!(got, want.to_vec());
        assert_eq!(wb.remaining(), 0);
    }

    #[test]
    fn io_slices_hand_over_at_most_the_limit_and_lose_nothing() {
        let msgs = [msg(1, 3 * MAX_PAYLOAD + 7), msg(2, 10), msg(3, IN_PLACE)];
        let (mut q, want) = queued_with_wire(&msgs);
        let mut wb = WriteBuf::new();
        let mut got = Vec::new();
        let mut limit = 1;
        while !q.is_empty() || !wb.is_empty() {
            wb.fill(&mut q, 5000);
            let mut io = [IoSlice::new(&[]); 8];
            let k = wb.io_slices(&mut io, limit);
            let n: usize = io[..k].iter().map(|s| s.len()).sum();
            assert!(n <= limit, "{n} bytes handed over for a limit of {limit}");
            assert!(
                n == limit || n == wb.len() || k == io.len(),
                "stopped early"
            );
            for s in &io[..k] {
                got.extend_from_slice(s);
            }
            wb.advance(n);
            limit = limit * 3 % 7001 + 1;
        }
        assert_eq!(got, want.to_vec());
    }

    #[test]
    fn push_message_writes_what_the_queue_would() {
        let small = [msg(1, 10), msg(2, 0), msg(3, MAX_PAYLOAD)];
        let mut q = OutQueue::new();
        let mut want = BytesMut::new();
        for m in &small {
            q.push(m.clone()).unwrap();
        }
        q.write_to(&mut want, usize::MAX);
        let mut wb = WriteBuf::new();
        for m in &small {
            assert!(wb.push_message(m));
        }
        assert!(!wb.push_message(&msg(4, MAX_PAYLOAD + 1)), "two frames");
        assert!(!wb.push_message(&msg(5, IN_PLACE)), "a large body");
        let mut got = Vec::new();
        while wb.has_remaining() {
            got.extend_from_slice(wb.chunk());
            let n = wb.chunk().len();
            wb.advance(n);
        }
        assert_eq!(got, want.to_vec());
    }

    #[test]
    fn a_fill_with_nothing_to_take_changes_nothing() {
        let mut q = OutQueue::new();
        let mut wb = WriteBuf::new();
        assert!(wb.push_message(&msg(1, 10)));
        assert_eq!(wb.fill(&mut q, 1 << 20), 0);
        // The staged reply stays open: the next small one joins its slice.
        assert!(wb.push_message(&msg(2, 10)));
        let mut io = [IoSlice::new(&[]); 4];
        assert_eq!(wb.chunks_vectored(&mut io), 1);
        // Nor does a fill when `limit` bytes already wait.
        q.push(msg(3, 10)).unwrap();
        assert_eq!(wb.fill(&mut q, wb.len()), 0);
        assert_eq!(q.len(), 1);
        assert_eq!(wb.fill(&mut q, usize::MAX), 1);
        assert!(q.is_empty());
    }

    #[test]
    fn a_fixed_reply_pushed_without_its_message_is_the_message_s_bytes() {
        let ptr = crate::Pointer::new(0x0123_4567_89ab_cdef).unwrap();
        for reply in [
            Reply::Written(7),
            Reply::Written(u64::MAX),
            Reply::Conflict(3),
            Reply::Created(ptr),
            Reply::Done,
        ] {
            let mut want = WriteBuf::new();
            assert!(want.push_message(&reply.encode(42)));
            let mut got = WriteBuf::new();
            assert!(got.push_reply(42, &reply), "{reply:?}");
            assert_eq!(
                got.copy_to_bytes(got.remaining()),
                want.copy_to_bytes(want.remaining()),
                "{reply:?}"
            );
        }
        let mut wb = WriteBuf::new();
        for other in [
            Reply::Data(Bytes::from_static(b"abc")),
            Reply::error(Status::AddressFault, "no such record"),
        ] {
            assert!(!wb.push_reply(1, &other), "{other:?}");
        }
        assert!(wb.is_empty());
    }

    #[test]
    fn a_payload_pushed_from_where_it_is_is_the_reply_it_stands_for() {
        for len in [0, 10, HEAD_CAPACITY, HEAD_CAPACITY + 1, 1024, MAX_PAYLOAD] {
            let value = Bytes::from(vec![len as u8; len]);
            let mut want = WriteBuf::new();
            assert!(want.push_message(&Reply::Data(value.clone()).encode(9)));
            let mut got = WriteBuf::new();
            assert!(got.push_data(9, &value));
            assert_eq!(
                got.copy_to_bytes(got.remaining()),
                want.copy_to_bytes(want.remaining())
            );
        }
        let mut wb = WriteBuf::new();
        assert!(!wb.push_data(9, &[0; MAX_PAYLOAD + 1]), "two frames");
        assert!(wb.is_empty());
    }

    #[test]
    fn a_message_is_taken_back_only_before_its_first_frame() {
        let mut q = OutQueue::new();
        q.push(msg(1, 3000)).unwrap();
        q.push(msg(2, 10)).unwrap();
        q.push(msg(3, 10)).unwrap();
        let before = q.pending_bytes();
        assert!(q.remove_unstarted(3));
        assert_eq!(q.pending_bytes(), before - 20);
        assert!(!q.remove_unstarted(3), "gone");
        q.pop_frame(); // first frame of 1
        assert!(!q.remove_unstarted(1), "started: it must finish");
        assert!(q.remove_unstarted(2));
        while q.pop_frame().is_some() {}
        assert_eq!((q.pending_bytes(), q.small_pending_bytes()), (0, 0));
    }

    #[test]
    fn at_most_max_interleaved_messages_are_started_and_a_server_with_default_limits_takes_all() {
        use crate::frame::decode_frame;
        use crate::reassembly::{Inbound, Reassembler, ReassemblyLimits};
        let mut q = OutQueue::new();
        for xid in 0..100 {
            q.push(msg(xid, 3 * MAX_PAYLOAD)).unwrap();
        }
        q.push(msg(1000, 10)).unwrap();
        q.push(msg(1001, 4 * MAX_PAYLOAD)).unwrap();
        assert_eq!(q.len(), 102);
        assert!(q.remove_unstarted(1001), "a held message is taken back");
        assert!(q.remove_unstarted(99));
        // A server's default limits.
        let mut rx = Reassembler::new(ReassemblyLimits::default());
        let mut got = Vec::new();
        let mut frames = 0;
        let mut started = std::collections::HashSet::new();
        while let Some(f) = q.pop_frame() {
            frames += 1;
            if f.header.remaining > 0 {
                started.insert(f.header.xid);
            } else {
                started.remove(&f.header.xid);
            }
            assert!(
                started.len() <= MAX_INTERLEAVED,
                "{} started",
                started.len()
            );
            if f.header.xid == 1000 {
                assert!(
                    frames <= MAX_INTERLEAVED + 1,
                    "the small one waited {frames} frames"
                );
            }
            let mut wire = BytesMut::new();
            f.encode(&mut wire);
            let frame = decode_frame(&mut wire).unwrap().unwrap();
            match rx.push(frame).unwrap() {
                Some(Inbound::Message(m)) => {
                    assert!(m.payload.iter().all(|&b| b == m.xid as u8));
                    got.push(m.xid);
                }
                Some(other) => panic!("refused: {other:?}"),
                None => {}
            }
        }
        got.sort();
        assert_eq!(got, (0..99).chain([1000]).collect::<Vec<_>>());
        assert_eq!(
            (q.pending_bytes(), q.small_pending_bytes(), q.len()),
            (0, 0, 0)
        );
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
