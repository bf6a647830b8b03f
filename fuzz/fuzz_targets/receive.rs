//! Drives `Receiver` (scattered reads straight into message buffers) and the plain
//! decode-and-reassemble path with the same byte stream, cut into arbitrary reads, and
//! checks they agree: same messages, same refusals, same framing error.
//! The stream is built from arbitrary messages interleaved in arbitrary bursts, with
//! optional corruptions, so multi-frame messages (what the receiver places directly)
//! are common rather than left for the fuzzer to discover byte by byte.
#![no_main]

use std::collections::VecDeque;

use arbitrary::Arbitrary;
use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use netswap_proto::{
    FramingError, Head, Inbound, OutFrame, OutMessage, OutQueue, Reassembler, ReassemblyLimits,
    Receiver, decode_frame,
};

#[derive(Arbitrary, Debug)]
struct Input {
    /// (xid, payload length / 4) of each message.
    messages: Vec<(u8, u16)>,
    /// Frames taken from one message before moving to another, per turn.
    bursts: Vec<u8>,
    /// Read sizes, cycled.
    reads: Vec<u16>,
    /// (position, xor) corruptions of the stream.
    flips: Vec<(u32, u8)>,
    read_chunk: u16,
}

fuzz_target!(|input: Input| {
    let mut queues: Vec<VecDeque<OutFrame>> = input
        .messages
        .iter()
        .take(8)
        .enumerate()
        .map(|(i, &(xid, len))| {
            let mut q = OutQueue::new();
            let len = len as usize * 4 % 30_000;
            q.push(OutMessage {
                xid: xid as u32,
                op: 3,
                arg: 0,
                head: Head::new(),
                body: Bytes::from((0..len).map(|b| (b * 7 + i) as u8).collect::<Vec<_>>()),
            })
            .unwrap();
            std::iter::from_fn(|| q.pop_frame()).collect()
        })
        .collect();
    let mut wire = BytesMut::new();
    let mut turn = 0;
    while queues.iter().any(|q| !q.is_empty()) {
        let live: Vec<usize> = (0..queues.len()).filter(|&i| !queues[i].is_empty()).collect();
        let pick = live[turn % live.len()];
        let burst = input.bursts.get(turn % input.bursts.len().max(1)).copied().unwrap_or(1).max(1);
        for _ in 0..burst {
            if let Some(f) = queues[pick].pop_front() {
                f.encode(&mut wire);
            }
        }
        turn += 1;
    }
    for &(at, x) in input.flips.iter().take(4) {
        if !wire.is_empty() {
            let i = at as usize % wire.len();
            wire[i] ^= x;
        }
    }
    let limits = ReassemblyLimits {
        max_message_bytes: 20_000,
        max_partial_messages: 4,
        max_partial_bytes: 50_000,
    };

    // The plain path.
    let mut plain_r = Reassembler::new(limits);
    let mut buf = wire.clone();
    let plain: Result<Vec<Inbound>, FramingError> = (|| {
        let mut out = Vec::new();
        while let Some(f) = decode_frame(&mut buf)? {
            out.extend(plain_r.push(f)?);
        }
        Ok(out)
    })();

    // The receiver, with arbitrary read sizes.
    let mut rx = Receiver::new(Reassembler::new(limits), input.read_chunk as usize);
    let mut got = Vec::new();
    let mut at = 0;
    let mut k = 0;
    let direct: Result<Vec<Inbound>, FramingError> = loop {
        if at == wire.len() {
            break Ok(got);
        }
        let want = input.reads.get(k % input.reads.len().max(1)).copied().unwrap_or(1400).max(1) as usize;
        k += 1;
        at += rx.read_from_slice(&wire[at..(at + want).min(wire.len())]);
        let mut failed = None;
        loop {
            match rx.next_inbound() {
                Ok(Some(m)) => got.push(m),
                Ok(None) => break,
                Err(e) => {
                    failed = Some(e.error);
                    break;
                }
            }
        }
        if let Some(e) = failed {
            break Err(e);
        }
    };
    match (plain, direct) {
        (Ok(a), Ok(b)) => {
            assert_eq!(a, b);
            assert_eq!(rx.reassembler().buffered_bytes(), plain_r.buffered_bytes());
        }
        (Err(a), Err(b)) => assert_eq!(a, b),
        (a, b) => panic!("plain {:?} but receiver {:?}", a.map(|v| v.len()), b.map(|v| v.len())),
    }
});
