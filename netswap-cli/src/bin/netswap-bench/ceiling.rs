//! `netswap-bench ceiling`: a server that only frames replies, the ceiling netswap's
//! server is compared with.
//!
//! It reads, reassembles and writes exactly as `netswap-server` does (the same
//! `Receiver`, `WriteBuf` and fair queue, the same socket options, one task per
//! connection on a single-threaded runtime, `writev` batches) but keeps no records and
//! parses no payloads: a READ gets the same canned value every time, a write gets
//! "version 1", a CREATE a new pointer, a HELLO the usual limits. What is left between
//! it and the real server is the cost of the store, the rules and the bookkeeping.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use netswap_proto::{
    HelloInfo, Identity, Inbound, MAX_MESSAGE, MAX_WRITE, OutQueue, Pointer, Reassembler,
    ReassemblyLimits, Receiver, Reply, WriteBuf,
};
use tokio::net::{TcpListener, TcpStream};

use netswap_proto::Opcode;

/// Bytes per write batch, as the server's (`netswap-server`'s `WRITE_CHUNK`): the
/// batch is refilled to it before each write of at most `MAX_WRITE` bytes, as the
/// server does.
const WRITE_CHUNK: usize = 64 * 1024;

/// Serves until killed. Prints `netswap-bench ceiling listening on ADDR` once ready.
pub(super) fn run(listen: SocketAddr, size: usize, threads: usize) -> Result<(), String> {
    let rt = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    }
    .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        println!("netswap-bench ceiling listening on {addr}");
        let value = Bytes::from(vec![0x5Au8; size]);
        let next_ptr = Arc::new(AtomicU64::new(1));
        loop {
            let (stream, _) = listener.accept().await.map_err(|e| e.to_string())?;
            tokio::spawn(serve(stream, value.clone(), next_ptr.clone()));
        }
    })
}

fn canned(op: u8, value: &Bytes, next_ptr: &AtomicU64) -> Reply {
    match Opcode::from_u8(op) {
        Some(Opcode::Read) => Reply::Data(value.clone()),
        Some(Opcode::Replace | Opcode::WriteAt | Opcode::ReplaceIf) => Reply::Written(1),
        Some(Opcode::Create) => Reply::Created(
            Pointer::new(next_ptr.fetch_add(1, Ordering::Relaxed)).expect("not zero"),
        ),
        Some(Opcode::Hello) => Reply::Hello(HelloInfo {
            protocol: 1,
            max_record_bytes: 64 << 20,
            max_message_bytes: (64 << 20) + 16,
            orphan_grace_secs: 300,
            identity: Identity([0; 32]),
        }),
        _ => Reply::Done,
    }
}

async fn serve(stream: TcpStream, value: Bytes, next_ptr: Arc<AtomicU64>) {
    let _ = stream.set_nodelay(true);
    let _ = socket2::SockRef::from(&stream).set_tcp_notsent_lowat(netswap_proto::NOTSENT_LOWAT);
    let mut stream = stream;
    let mut rx = Receiver::new(
        Reassembler::new(ReassemblyLimits {
            max_message_bytes: MAX_MESSAGE,
            max_partial_messages: 64,
            max_partial_bytes: 2 * MAX_MESSAGE,
        }),
        64 * 1024,
    );
    let mut outq = OutQueue::new();
    let mut wbuf = WriteBuf::new();
    loop {
        match netswap_client::raw::read_frames(&stream, &mut rx).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        loop {
            match rx.next_inbound() {
                Ok(Some(Inbound::Message(m))) => {
                    let msg = canned(m.op, &value, &next_ptr).encode(m.xid);
                    if !(outq.is_empty() && wbuf.push_message(&msg)) {
                        let _ = outq.push(msg);
                    }
                }
                Ok(Some(Inbound::Refused { .. })) => {}
                Ok(None) => break,
                Err(_) => return,
            }
        }
        let written = netswap_client::raw::write_frames(&mut stream, &mut wbuf, MAX_WRITE, |b| {
            b.fill(&mut outq, WRITE_CHUNK);
        });
        if written.await.is_err() {
            return;
        }
        rx.release_idle_buffer();
        wbuf.release_idle_buffer();
    }
}
