//! The 10-byte frame header and frame decoding/encoding.
//!
//! Decoding is two-phase, as in mini-redis: [`decode_frame`] first checks that a
//! whole frame is buffered (a partial frame is `Ok(None)`, "need more bytes"), then
//! splits it off the buffer without copying its payload.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use nom::IResult;
use nom::Parser;
use nom::number::streaming::{be_u8, be_u16, be_u32};

/// Size of the frame header in bytes.
pub const HEADER_LEN: usize = 10;
/// Largest payload one frame may carry.
pub const MAX_PAYLOAD: usize = 1390;
/// Largest frame on the wire: header plus a full payload.
pub const MAX_FRAME: usize = HEADER_LEN + MAX_PAYLOAD;
/// Largest number of frames in one message (`REMAINING` is a u16, plus the first).
pub const MAX_FRAMES: usize = u16::MAX as usize + 1;
/// Largest message the framing can express: 65,536 × 1,390 bytes.
pub const MAX_MESSAGE: u64 = MAX_FRAMES as u64 * MAX_PAYLOAD as u64;
/// The XID the server uses for messages not tied to a request. Clients never use it.
pub const RESERVED_XID: u32 = 0xFFFF_FFFF;

/// The fixed header in front of every frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FrameHeader {
    /// Transaction id: chosen by the client, echoed on every frame of the reply.
    pub xid: u32,
    /// How many more frames of this message follow this one; 0 on the last.
    pub remaining: u16,
    /// Opcode on requests, status code on replies.
    pub op: u8,
    /// Opcode-specific argument, identical on every frame of a message.
    pub arg: u8,
    /// Payload bytes in this frame, `0..=1390`.
    pub len: u16,
}

impl FrameHeader {
    /// Appends the 10 header bytes to `dst`.
    #[inline]
    pub fn encode(&self, dst: &mut BytesMut) {
        dst.reserve(HEADER_LEN);
        dst.put_u32(self.xid);
        dst.put_u16(self.remaining);
        dst.put_u8(self.op);
        dst.put_u8(self.arg);
        dst.put_u16(self.len);
    }

    /// The header as its 10 wire bytes.
    #[inline]
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&self.xid.to_be_bytes());
        b[4..6].copy_from_slice(&self.remaining.to_be_bytes());
        b[6] = self.op;
        b[7] = self.arg;
        b[8..10].copy_from_slice(&self.len.to_be_bytes());
        b
    }
}

/// One frame: its header and its payload (a cheap, reference-counted slice).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// The decoded header.
    pub header: FrameHeader,
    /// `header.len` payload bytes.
    pub payload: Bytes,
}

impl Frame {
    /// Appends the whole frame (header and payload) to `dst`.
    pub fn encode(&self, dst: &mut BytesMut) {
        debug_assert_eq!(self.header.len as usize, self.payload.len());
        self.header.encode(dst);
        dst.extend_from_slice(&self.payload);
    }
}

/// The byte stream cannot be read as frames any more: the peer gets PROTOCOL_ERROR and
/// the connection is closed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    /// `LEN` over 1,390.
    #[error("frame LEN {len} is over the maximum of 1390")]
    LengthTooLarge {
        /// The offending LEN.
        len: u16,
    },
    /// A frame that is not the last of its message carries fewer than 1,390 bytes.
    #[error("frame of XID {xid} is not the last of its message but carries {len} bytes, not 1390")]
    ShortFrame {
        /// The message's XID.
        xid: u32,
        /// The frame's LEN.
        len: u16,
    },
    /// `REMAINING` does not count down by one from the previous frame of the XID.
    #[error("frame of XID {xid} has REMAINING {got}, expected {expected}")]
    BadRemaining {
        /// The message's XID.
        xid: u32,
        /// What the previous frame implied.
        expected: u16,
        /// What this frame carried.
        got: u16,
    },
    /// `OP` or `ARG` changed between frames of one message.
    #[error("OP or ARG of XID {xid} changed between frames of one message")]
    HeaderChanged {
        /// The message's XID.
        xid: u32,
    },
    /// More refused messages are being discarded than the connection may hold open.
    #[error("over {limit} refused messages are unfinished on this connection")]
    TooManyUnfinished {
        /// The bound (`max_partial_messages`).
        limit: usize,
    },
}

/// Parses the 10-byte header. Streaming: fewer than 10 bytes is `Err::Incomplete`.
pub fn parse_header(input: &[u8]) -> IResult<&[u8], FrameHeader> {
    let (rest, (xid, remaining, op, arg, len)) =
        (be_u32, be_u16, be_u8, be_u8, be_u16).parse(input)?;
    Ok((
        rest,
        FrameHeader {
            xid,
            remaining,
            op,
            arg,
            len,
        },
    ))
}

/// Takes one whole frame off the front of `buf`.
///
/// Returns `Ok(None)` when `buf` holds less than a whole frame (read more and call
/// again), and an error as soon as the header shows a `LEN` over 1,390, before its
/// payload is buffered. The payload is split off `buf` without copying.
#[inline]
pub fn decode_frame(buf: &mut BytesMut) -> Result<Option<Frame>, FramingError> {
    let header = match parse_header(buf) {
        Ok((_, h)) => h,
        Err(_) => return Ok(None), // only Incomplete is possible for fixed-size fields
    };
    if header.len as usize > MAX_PAYLOAD {
        return Err(FramingError::LengthTooLarge { len: header.len });
    }
    let total = HEADER_LEN + header.len as usize;
    if buf.len() < total {
        // Reserve the rest of this frame so the next read can complete it.
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let mut frame = buf.split_to(total);
    frame.advance(HEADER_LEN);
    let payload = frame.freeze();
    Ok(Some(Frame { header, payload }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_layout() {
        let h = FrameHeader {
            xid: 0x0102_0304,
            remaining: 0x0506,
            op: 7,
            arg: 8,
            len: 0x0009,
        };
        let mut b = BytesMut::new();
        h.encode(&mut b);
        assert_eq!(&b[..], &[1, 2, 3, 4, 5, 6, 7, 8, 0, 9]);
        assert_eq!(h.to_bytes(), b[..]);
        assert_eq!(parse_header(&b).unwrap().1, h);
    }

    #[test]
    fn partial_header_and_partial_payload_need_more() {
        let mut b = BytesMut::from(&[0u8, 0, 0, 1, 0][..]);
        assert_eq!(decode_frame(&mut b), Ok(None));
        let mut b = BytesMut::from(&[0u8, 0, 0, 1, 0, 0, 2, 0, 0, 3, 0xAA][..]);
        assert_eq!(decode_frame(&mut b), Ok(None));
        assert_eq!(b.len(), 11, "nothing consumed while incomplete");
        b.extend_from_slice(&[0xBB, 0xCC, 0xDD]);
        let f = decode_frame(&mut b).unwrap().unwrap();
        assert_eq!(f.header.xid, 1);
        assert_eq!(f.header.op, 2);
        assert_eq!(&f.payload[..], &[0xAA, 0xBB, 0xCC]);
        assert_eq!(&b[..], &[0xDD]);
    }

    #[test]
    fn len_over_limit_is_refused_from_the_header_alone() {
        let h = FrameHeader {
            xid: 1,
            remaining: 0,
            op: 2,
            arg: 0,
            len: 1391,
        };
        let mut b = BytesMut::from(&h.to_bytes()[..]);
        assert_eq!(
            decode_frame(&mut b),
            Err(FramingError::LengthTooLarge { len: 1391 })
        );
    }

    #[test]
    fn exactly_max_payload_is_accepted() {
        let h = FrameHeader {
            xid: 9,
            remaining: 0,
            op: 0,
            arg: 0,
            len: 1390,
        };
        let mut b = BytesMut::new();
        h.encode(&mut b);
        b.extend_from_slice(&[0x5A; 1390]);
        let f = decode_frame(&mut b).unwrap().unwrap();
        assert_eq!(f.payload.len(), 1390);
        assert!(b.is_empty());
    }
}
