//! Feeds arbitrary bytes, cut into arbitrary reads, through frame decoding, reassembly
//! and request parsing (the server's side) and reply parsing (the client's side, with
//! NOTIFY deltas applied to a mirror), and checks the bounds reassembly promises.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use netswap_proto::{
    Inbound, Opcode, Reassembler, ReassemblyLimits, Reply, Request, decode_frame,
};

fuzz_target!(|input: &[u8]| {
    // The first byte chooses the read size, so splits are explored too.
    let Some((&step, stream)) = input.split_first() else {
        return;
    };
    let step = step as usize + 1;
    let limits = ReassemblyLimits {
        max_message_bytes: 20_000,
        max_partial_messages: 4,
        max_partial_bytes: 40_000,
    };
    let mut r = Reassembler::new(limits);
    let mut buf = BytesMut::new();
    for chunk in stream.chunks(step) {
        buf.extend_from_slice(chunk);
        loop {
            match decode_frame(&mut buf) {
                Ok(Some(frame)) => match r.push(frame) {
                    Ok(Some(Inbound::Message(m))) => {
                        assert!(m.payload.len() as u64 <= limits.max_message_bytes);
                        if let Ok(req) = Request::parse(m.op, m.arg, m.payload.clone()) {
                            // Whatever parses must encode back to an equal request.
                            let out = req.encode(m.xid);
                            assert_eq!(Request::parse(out.op, out.arg, out.payload()).unwrap(), req);
                        }
                        // The same message as a reply from a hostile server, to a
                        // request the XID chooses.
                        let asked = Opcode::ALL.get(m.xid as usize % (Opcode::ALL.len() + 1)).copied();
                        if let Ok(reply) = Reply::parse(asked, m.op, m.arg, m.payload) {
                            let out = reply.encode(m.xid);
                            assert_eq!(Reply::parse(asked, out.op, out.arg, out.payload()).unwrap(), reply);
                            // (Sizes up to the protocol's 87 MiB parse; a mebibyte keeps
                            // the runs fast.)
                            if let Reply::Notify { delta: Some(d), .. } = reply
                                && d.size <= 1 << 20
                            {
                                // A mirror of any size takes any delta that parses.
                                let mut copy = vec![7u8; step];
                                d.apply_to(&mut copy);
                                assert_eq!(copy.len() as u64, d.size);
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return, // PROTOCOL_ERROR: the server closes the connection
                },
                Ok(None) => break,
                Err(_) => return,
            }
            assert!(r.buffered_bytes() <= limits.max_partial_bytes);
            assert!(r.partial_messages() <= limits.max_partial_messages);
        }
    }
});
