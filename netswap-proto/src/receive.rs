//! The receiving side of a connection: read buffer, frame decoding and reassembly,
//! with large messages read straight into their final buffer.
//!
//! A plain receiver reads into a buffer, splits frames off it and copies each payload
//! of a multi-frame message into that message's buffer: every byte of a 1 MiB upload
//! is copied twice (by the kernel, then by the receiver). [`Receiver`] removes the
//! second copy. While a large message is arriving, the next read is *scattered*: the
//! rest of the current frame's payload goes straight into the message's buffer, then,
//! for each further frame of that message, 10 bytes into a header slot and 1,390 into
//! the message's buffer; whatever follows lands in the read buffer. After the read,
//! each header slot is checked as [`Reassembler::push`] would check it. The first one
//! that is not the next full frame of that message (a frame of another XID, the short
//! last frame, a broken header) and every byte after it are moved to the read buffer
//! and go through the ordinary path, so the result is the same byte for byte, only
//! cheaper when the sender sends one large message's frames back to back.
//!
//! No I/O: the caller does the read with the buffers [`Receiver::read_with`] lends.

use std::mem::MaybeUninit;
use std::time::Instant;

use bytes::BytesMut;

use crate::frame::{FramingError, HEADER_LEN, MAX_PAYLOAD, decode_frame, parse_header};
use crate::reassembly::{Inbound, Reassembler};

/// Full frames of one message placed directly by one read, at most.
const MAX_DIRECT_FRAMES: usize = 120;
/// A header slot and a full payload.
const MAX_FRAME_LEN: usize = HEADER_LEN + MAX_PAYLOAD;
/// Plain reads after a scattered read that guessed wrong.
const COOLDOWN: u8 = 8;

/// A framing error and the XID it concerns (the reserved XID when unknown).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReceiveError {
    /// XID of the offending frame, or [`crate::RESERVED_XID`].
    pub xid: u32,
    /// What was wrong.
    pub error: FramingError,
}

/// Inside the payload of a frame being placed directly.
#[derive(Clone, Copy, Debug)]
struct Current {
    xid: u32,
    /// Payload bytes of the frame still to come.
    left: usize,
}

/// One connection's receiving side: read buffer, frame decoding, reassembly.
#[derive(Debug)]
pub struct Receiver {
    reasm: Reassembler,
    rbuf: BytesMut,
    current: Option<Current>,
    /// Header slots of a scattered read.
    headers: Box<[u8]>,
    read_chunk: usize,
    /// Reads left before scattering is tried again after it guessed wrong (frames of
    /// several messages interleaved: scattering would only add a copy).
    cooldown: u8,
    direct: u64,
    /// The last read returned less than the room it was lent.
    drained: bool,
    /// "Now" as the caller last said.
    now: Option<Instant>,
    /// Frames completed so far (decoded, or placed directly).
    frames: u64,
    /// `frames` when the partial frame was last looked at.
    frames_seen: u64,
    /// Since when the frame now partly read has been waiting for the rest of itself.
    frame_since: Option<Instant>,
}

impl Receiver {
    /// A receiver around `reasm` that reads at least `read_chunk` bytes at a time.
    pub fn new(reasm: Reassembler, read_chunk: usize) -> Receiver {
        Receiver {
            reasm,
            rbuf: BytesMut::new(),
            current: None,
            headers: Box::default(),
            read_chunk: read_chunk.max(crate::frame::MAX_FRAME),
            cooldown: 0,
            direct: 0,
            drained: false,
            now: None,
            frames: 0,
            frames_seen: 0,
            frame_since: None,
        }
    }

    /// Tells the receiver the time before the bytes of a read are processed, so that
    /// it can say how long a partial frame or an unfinished message has been waiting
    /// ([`Receiver::stalled_since`]). There is no clock inside.
    pub fn set_now(&mut self, now: Instant) {
        self.now = Some(now);
        self.reasm.set_now(now);
    }

    /// The earliest moment from which something has waited for more bytes without
    /// progress: a frame read in part, or an unfinished message waiting for its next
    /// frame. Each counts on its own, so other traffic on the connection (keepalives)
    /// does not hide a stalled message, and a frame trickled a byte at a time is as
    /// old as its first byte. `None` when nothing is unfinished.
    pub fn stalled_since(&self) -> Option<Instant> {
        match (self.frame_since, self.reasm.oldest_progress()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Notes whether a frame is partly read, and since when (called whenever the
    /// decoded frames run out).
    fn mark_partial_frame(&mut self) {
        let partial = self.current.is_some() || !self.rbuf.is_empty();
        if !partial {
            self.frame_since = None;
        } else if self.frames != self.frames_seen || self.frame_since.is_none() {
            // A new frame started (the previous one completed since we last looked).
            self.frame_since = self.now;
        }
        self.frames_seen = self.frames;
    }

    /// The reassembler (limits and what it holds).
    pub fn reassembler(&self) -> &Reassembler {
        &self.reasm
    }

    /// True when the last read returned less than the room it was lent: the source had
    /// nothing more at that moment (a socket reader may skip the read that would only
    /// report would-block).
    pub fn drained(&self) -> bool {
        self.drained
    }

    /// Payload bytes read straight into their message's buffer so far.
    pub fn direct_bytes(&self) -> u64 {
        self.direct
    }

    /// Bytes read but not yet decoded (a partial frame at most, after [`Receiver::next_inbound`]
    /// returned `None`).
    pub fn buffered(&self) -> usize {
        self.rbuf.len()
    }

    /// True when a frame has started but not finished, or a message is unfinished.
    pub fn is_mid_message(&self) -> bool {
        self.current.is_some() || !self.rbuf.is_empty() || self.reasm.has_unfinished()
    }

    /// Drops what has been read and not decoded and every unfinished message (giving
    /// back their promises), for a connection that is closing: it must not be fed
    /// again.
    pub fn discard_input(&mut self) {
        self.rbuf.clear();
        self.current = None;
        self.frame_since = None;
        self.reasm.abandon_all();
    }

    /// Gives back the read buffer's memory when it holds nothing (idle connections).
    pub fn release_idle_buffer(&mut self) {
        if self.rbuf.is_empty() {
            self.rbuf = BytesMut::new();
        }
    }

    /// The next message or refusal from what has been read, `None` when more bytes
    /// are needed. An error means the byte stream is broken: close the connection.
    pub fn next_inbound(&mut self) -> Result<Option<Inbound>, ReceiveError> {
        if self.current.is_some() {
            self.mark_partial_frame();
            return Ok(None);
        }
        loop {
            let frame = match decode_frame(&mut self.rbuf) {
                Ok(Some(f)) => f,
                Ok(None) => {
                    self.mark_partial_frame();
                    return Ok(None);
                }
                Err(error) => {
                    let xid = match self.rbuf.get(..4) {
                        Some(b) => u32::from_be_bytes(b.try_into().expect("4 bytes")),
                        None => crate::RESERVED_XID,
                    };
                    return Err(ReceiveError { xid, error });
                }
            };
            let xid = frame.header.xid;
            self.frames += 1;
            match self.reasm.push(frame) {
                Ok(None) => {}
                Ok(Some(inbound)) => return Ok(Some(inbound)),
                Err(error) => return Err(ReceiveError { xid, error }),
            }
        }
    }

    /// Lends buffers for one read to `read`, which fills them in order and returns how
    /// many bytes it put there (0 at end of stream). Call it when [`Receiver::next_inbound`]
    /// has returned `None`; afterwards call `next_inbound` again. An error from `read` (e.g.
    /// would-block) leaves the receiver as it was.
    pub fn read_with<E>(
        &mut self,
        read: impl FnOnce(&mut [&mut [MaybeUninit<u8>]]) -> Result<usize, E>,
    ) -> Result<usize, E> {
        self.start_direct_frame();
        let Some((xid, first, frames, more)) = self.direct_plan() else {
            if self.rbuf.capacity() - self.rbuf.len() < crate::frame::MAX_FRAME {
                self.rbuf.reserve(self.read_chunk);
            }
            let spare = self.rbuf.spare_capacity_mut();
            let room = spare.len();
            let n = read(&mut [spare])?;
            self.drained = n < room;
            // SAFETY: `read` initialised the first `n` bytes of the spare capacity.
            unsafe { self.rbuf.set_len(self.rbuf.len() + n) };
            return Ok(n);
        };
        debug_assert!(self.rbuf.is_empty());
        self.rbuf.reserve(self.read_chunk);
        if self.headers.len() < frames * HEADER_LEN {
            self.headers = vec![0u8; MAX_DIRECT_FRAMES * HEADER_LEN].into_boxed_slice();
        }
        let buf = self
            .reasm
            .direct_buf(xid)
            .expect("direct target is buffered");
        let (mut payload, _) = buf
            .spare_capacity_mut()
            .split_at_mut(first + frames * MAX_PAYLOAD);
        let mut bufs: Vec<&mut [MaybeUninit<u8>]> = Vec::with_capacity(2 * frames + 2);
        if first > 0 {
            let (a, b) = payload.split_at_mut(first);
            bufs.push(a);
            payload = b;
        }
        let mut headers = &mut self.headers[..frames * HEADER_LEN];
        for _ in 0..frames {
            let (h, rest_h) = headers.split_at_mut(HEADER_LEN);
            let (p, rest_p) = payload.split_at_mut(MAX_PAYLOAD);
            bufs.push(as_uninit(h));
            bufs.push(p);
            headers = rest_h;
            payload = rest_p;
        }
        // When more frames of the message follow, what comes after is most likely them:
        // keep the plain tail small, so the next read places them directly.
        let tail = if more {
            2 * crate::frame::MAX_FRAME
        } else {
            self.read_chunk
        };
        bufs.push(&mut self.rbuf.spare_capacity_mut()[..tail]);
        let room = first + frames * MAX_FRAME_LEN + tail;
        let n = read(&mut bufs)?;
        drop(bufs);
        self.drained = n < room;
        self.place(xid, first, frames, n);
        Ok(n)
    }

    /// Reads from bytes in memory instead of a socket (tests, benchmarks, transports
    /// that hand over buffers): takes as much of `src` as one read would. Returns how
    /// many bytes it took.
    pub fn read_from_slice(&mut self, src: &[u8]) -> usize {
        let read = self.read_with(|bufs| {
            let mut n = 0;
            for b in bufs.iter_mut() {
                let k = b.len().min(src.len() - n);
                // SAFETY: `u8` and `MaybeUninit<u8>` have the same layout.
                let from = unsafe { &*(&src[n..n + k] as *const [u8] as *const [MaybeUninit<u8>]) };
                b[..k].copy_from_slice(from);
                n += k;
                if n == src.len() {
                    break;
                }
            }
            Ok::<_, std::convert::Infallible>(n)
        });
        match read {
            Ok(n) => n,
            Err(never) => match never {},
        }
    }

    /// When the read buffer holds the start of a full frame of the message being
    /// buffered, takes it over: its header is checked and consumed, the payload bytes
    /// present are appended, and the rest of its payload can be read directly.
    fn start_direct_frame(&mut self) {
        if self.current.is_some() || self.rbuf.len() < HEADER_LEN {
            return;
        }
        let Ok((_, h)) = parse_header(&self.rbuf) else {
            return;
        };
        let present = self.rbuf.len() - HEADER_LEN;
        if present >= MAX_PAYLOAD || !self.reasm.accept_direct(&h) {
            return;
        }
        self.frames += 1;
        let buf = self
            .reasm
            .direct_buf(h.xid)
            .expect("accepted frames are buffered");
        buf.extend_from_slice(&self.rbuf[HEADER_LEN..]);
        self.reasm.add_buffered(present);
        self.rbuf.clear();
        self.current = Some(Current {
            xid: h.xid,
            left: MAX_PAYLOAD - present,
        });
    }

    /// Where a direct read goes: the message, the payload bytes still due for the
    /// current frame, how many further full frames to expect, and whether even more
    /// are due after those.
    fn direct_plan(&mut self) -> Option<(u32, usize, usize, bool)> {
        let (xid, first) = match self.current {
            Some(c) => (c.xid, c.left),
            None if self.rbuf.is_empty() => (self.reasm.direct_target()?.0, 0),
            None => return None,
        };
        let due = self
            .reasm
            .direct_target()
            .map_or(0, |(x, d)| if x == xid { d as usize } else { 0 });
        let frames = if self.cooldown > 0 {
            self.cooldown -= 1;
            0
        } else {
            due.min(MAX_DIRECT_FRAMES)
        };
        let spare = self.reasm.direct_buf(xid)?.spare_capacity_mut().len();
        if first + frames * MAX_PAYLOAD > spare {
            // Never happens: a message's buffer holds all the payload it was promised.
            return None;
        }
        (first > 0 || frames > 0).then_some((xid, first, frames, frames > 0 && due > frames))
    }

    /// Accounts for `n` bytes read into the layout of a direct read.
    fn place(&mut self, xid: u32, first: usize, frames: usize, mut n: usize) {
        let mut placed = 0;
        if first > 0 {
            let k = n.min(first);
            placed += k;
            n -= k;
            if k < first {
                self.current = Some(Current {
                    xid,
                    left: first - k,
                });
                return self.commit(xid, placed);
            }
            self.current = None;
        }
        for i in 0..frames {
            if n == 0 {
                break;
            }
            let slot = &self.headers[i * HEADER_LEN..(i + 1) * HEADER_LEN];
            if n < HEADER_LEN {
                // The read ended inside a header: not a wrong guess.
                let at = i * HEADER_LEN;
                self.commit(xid, placed);
                self.rbuf.extend_from_slice(&self.headers[at..at + n]);
                return;
            }
            let accepted =
                parse_header(slot).is_ok_and(|(_, h)| h.xid == xid && self.reasm.accept_direct(&h));
            if !accepted {
                self.commit(xid, placed);
                return self.misplaced(xid, i, frames, n);
            }
            self.frames += 1;
            n -= HEADER_LEN;
            let k = n.min(MAX_PAYLOAD);
            placed += k;
            n -= k;
            if k < MAX_PAYLOAD {
                self.current = Some(Current {
                    xid,
                    left: MAX_PAYLOAD - k,
                });
                return self.commit(xid, placed);
            }
        }
        self.commit(xid, placed);
        // SAFETY: the read initialised the first `n` bytes of the spare capacity.
        unsafe { self.rbuf.set_len(n) };
    }

    fn commit(&mut self, xid: u32, placed: usize) {
        let buf = self
            .reasm
            .direct_buf(xid)
            .expect("direct target is buffered");
        // SAFETY: the read initialised these bytes of the spare capacity, in order.
        unsafe { buf.set_len(buf.len() + placed) };
        self.reasm.add_buffered(placed);
        self.direct += placed as u64;
    }

    /// The `n` bytes read from header slot `from` on are not the next frames of the
    /// message: put them, in stream order, in front of the read buffer.
    fn misplaced(&mut self, xid: u32, from: usize, frames: usize, mut n: usize) {
        let mut moved = BytesMut::with_capacity(n + self.read_chunk);
        let buf = self
            .reasm
            .direct_buf(xid)
            .expect("direct target is buffered");
        let spare = buf.spare_capacity_mut();
        for i in from..frames {
            if n == 0 {
                break;
            }
            let k = n.min(HEADER_LEN);
            moved.extend_from_slice(&self.headers[i * HEADER_LEN..i * HEADER_LEN + k]);
            n -= k;
            let k = n.min(MAX_PAYLOAD);
            let at = (i - from) * MAX_PAYLOAD;
            // SAFETY: the read initialised these bytes.
            moved.extend_from_slice(unsafe { assume_init(&spare[at..at + k]) });
            n -= k;
        }
        // SAFETY: the read initialised the first `n` bytes of the read buffer's spare.
        unsafe { self.rbuf.set_len(n) };
        moved.extend_from_slice(&self.rbuf);
        self.rbuf = moved;
        self.current = None;
        self.cooldown = COOLDOWN;
    }
}

fn as_uninit(b: &mut [u8]) -> &mut [MaybeUninit<u8>] {
    // SAFETY: same layout; initialised bytes are valid MaybeUninit, and only
    // initialised bytes are written through the result (by a read).
    unsafe { &mut *(b as *mut [u8] as *mut [MaybeUninit<u8>]) }
}

/// # Safety
/// Every byte of `b` must be initialised.
unsafe fn assume_init(b: &[MaybeUninit<u8>]) -> &[u8] {
    // SAFETY: guaranteed by the caller.
    unsafe { &*(b as *const [MaybeUninit<u8>] as *const [u8]) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reassembly::ReassemblyLimits;
    use crate::{Head, OutMessage, OutQueue};
    use bytes::Bytes;

    /// Feeds `stream` through `rx` with reads of the given sizes; returns what came out.
    fn run(rx: &mut Receiver, stream: &[u8], sizes: &[usize]) -> Vec<Inbound> {
        let mut out = Vec::new();
        let mut at = 0;
        let mut i = 0;
        while at < stream.len() {
            let want = sizes[i % sizes.len()].max(1);
            i += 1;
            at += rx.read_from_slice(&stream[at..(at + want).min(stream.len())]);
            while let Some(m) = rx.next_inbound().unwrap() {
                out.push(m);
            }
        }
        out
    }

    fn wire(msgs: &[OutMessage]) -> BytesMut {
        let mut q = OutQueue::new();
        for m in msgs {
            q.push(m.clone()).unwrap();
        }
        let mut w = BytesMut::new();
        q.write_to(&mut w, usize::MAX);
        w
    }

    fn msg(xid: u32, len: usize) -> OutMessage {
        OutMessage {
            xid,
            op: 5,
            arg: 0,
            head: Head::new(),
            body: Bytes::from(
                (0..len)
                    .map(|i| (i * 7 + xid as usize) as u8)
                    .collect::<Vec<_>>(),
            ),
        }
    }

    fn payloads(v: Vec<Inbound>) -> Vec<(u32, Bytes)> {
        v.into_iter()
            .map(|m| match m {
                Inbound::Message(m) => (m.xid, m.payload),
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_large_message_is_placed_directly_and_arrives_whole() {
        for (len, sizes) in [
            (1 << 20, &[65536][..]),
            (1 << 20, &[1 << 21]),
            (1 << 20, &[10, 1390, 7, 3000]),
            (100_000, &[1400]),
            (20_000, &[1]),
        ] {
            let m = msg(1, len);
            let w = wire(std::slice::from_ref(&m));
            let mut rx = Receiver::new(Reassembler::new(ReassemblyLimits::default()), 65536);
            let got = payloads(run(&mut rx, &w, sizes));
            assert_eq!(got, vec![(1, m.payload())], "reads of {sizes:?}");
            assert_eq!(rx.reassembler().buffered_bytes(), 0);
            assert!(!rx.is_mid_message());
            // All but the first frame (read before the message was known) and the
            // last (never guessed: its length is unknown) go straight to the buffer.
            let want = (len - MAX_PAYLOAD - len % MAX_PAYLOAD) as u64;
            assert!(
                rx.direct_bytes() >= want * 9 / 10,
                "{} of {want} direct with reads of {sizes:?}",
                rx.direct_bytes()
            );
        }
    }

    #[test]
    fn interleaved_small_messages_are_moved_back_and_not_lost() {
        // Round-robin: a small message's frame sits between the large one's frames.
        let msgs = [msg(1, 100_000), msg(2, 10), msg(3, 3000), msg(4, 0)];
        let w = wire(&msgs);
        for sizes in [&[65536][..], &[2800], &[5000, 13, 1401]] {
            let mut rx = Receiver::new(Reassembler::new(ReassemblyLimits::default()), 4096);
            let mut got = payloads(run(&mut rx, &w, sizes));
            got.sort_by_key(|(x, _)| *x);
            let want: Vec<_> = msgs.iter().map(|m| (m.xid, m.payload())).collect();
            assert_eq!(got, want, "reads of {sizes:?}");
        }
    }

    #[test]
    fn drained_says_whether_a_read_filled_what_it_was_lent() {
        let w = wire(&[msg(1, 1 << 20)]);
        let mut rx = Receiver::new(Reassembler::new(ReassemblyLimits::default()), 4096);
        // Far more than one read takes: the read is full, the source not drained.
        let n = rx.read_from_slice(&w);
        assert!(n < w.len() && !rx.drained());
        while rx.next_inbound().unwrap().is_some() {}
        // Then a direct read (the message is known) of only 100 bytes: drained.
        assert_eq!(rx.read_from_slice(&w[n..n + 100]), 100);
        assert!(rx.drained());
        assert!(rx.direct_bytes() > 0 || rx.buffered() > 0);
    }

    #[test]
    fn a_trickled_frame_is_as_old_as_its_first_byte() {
        use std::time::{Duration, Instant};
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let w = wire(&[msg(1, 100), msg(2, 100)]);
        let one = HEADER_LEN + 100;
        let mut rx = Receiver::new(Reassembler::new(ReassemblyLimits::default()), 4096);
        // One byte a second: the partial frame keeps its first byte's time.
        for (i, b) in w[..5].iter().enumerate() {
            rx.set_now(at(i as u64));
            rx.read_from_slice(std::slice::from_ref(b));
            assert_eq!(rx.next_inbound().unwrap(), None);
            assert_eq!(rx.stalled_since(), Some(t0));
        }
        // The rest of frame 1 and the start of frame 2: frame 2 is new.
        rx.set_now(at(10));
        rx.read_from_slice(&w[5..one + 3]);
        assert!(rx.next_inbound().unwrap().is_some());
        assert_eq!(rx.next_inbound().unwrap(), None);
        assert_eq!(rx.stalled_since(), Some(at(10)));
        rx.set_now(at(11));
        rx.read_from_slice(&w[one + 3..]);
        assert!(rx.next_inbound().unwrap().is_some());
        assert_eq!(rx.next_inbound().unwrap(), None);
        assert_eq!(rx.stalled_since(), None);
    }

    #[test]
    fn a_stalled_message_stays_stalled_while_other_messages_flow() {
        use std::time::{Duration, Instant};
        let t0 = Instant::now();
        let big = wire(&[msg(1, 3 * MAX_PAYLOAD)]);
        let mut rx = Receiver::new(Reassembler::new(ReassemblyLimits::default()), 4096);
        rx.set_now(t0);
        rx.read_from_slice(&big[..MAX_FRAME_LEN]);
        assert_eq!(rx.next_inbound().unwrap(), None);
        for s in 1..10 {
            rx.set_now(t0 + Duration::from_secs(s));
            rx.read_from_slice(&wire(&[msg(100 + s as u32, 0)]));
            assert!(rx.next_inbound().unwrap().is_some());
            assert_eq!(rx.next_inbound().unwrap(), None);
            assert_eq!(rx.stalled_since(), Some(t0), "keepalives are not progress");
        }
    }

    #[test]
    fn a_broken_frame_inside_a_direct_read_is_still_an_error() {
        let mut w = wire(&[msg(1, 10 * MAX_PAYLOAD)]);
        // Corrupt the third frame's REMAINING.
        let third = 2 * (HEADER_LEN + MAX_PAYLOAD);
        w[third + 5] ^= 1;
        let mut rx = Receiver::new(Reassembler::new(ReassemblyLimits::default()), 4096);
        let mut err = None;
        let mut at = 0;
        while at < w.len() && err.is_none() {
            at += rx.read_from_slice(&w[at..]);
            err = rx.next_inbound().err();
        }
        let err = err.expect("the broken REMAINING is found");
        assert_eq!(err.xid, 1);
        assert!(
            matches!(err.error, FramingError::BadRemaining { .. }),
            "{err:?}"
        );
    }
}
