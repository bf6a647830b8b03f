//! Frame-level I/O for tools that speak the protocol themselves (`netswap-bench`).

use std::io;
use std::mem::MaybeUninit;

use netswap_proto::Receiver;
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Waits until `stream` is readable and reads once into `rx`, large messages straight
/// into their buffers (see [`Receiver`]). Returns the bytes read; 0 at end of stream.
/// Afterwards take what arrived with [`Receiver::next_inbound`].
pub async fn read_frames(stream: &TcpStream, rx: &mut Receiver) -> io::Result<usize> {
    let sock = socket2::SockRef::from(stream);
    loop {
        stream.readable().await?;
        match stream.try_io(Interest::READABLE, || {
            rx.read_with(|bufs| recv_into(&sock, bufs))
        }) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            other => return other,
        }
    }
}

/// One non-blocking `recvmsg` into a receiver's (possibly uninitialised) buffers.
pub fn recv_into(sock: &socket2::Socket, bufs: &mut [&mut [MaybeUninit<u8>]]) -> io::Result<usize> {
    if let [one] = bufs {
        // The common case (no large message arriving): no allocation.
        return sock.recv(one);
    }
    let mut slices: Vec<socket2::MaybeUninitSlice<'_>> = bufs
        .iter_mut()
        .map(|b| socket2::MaybeUninitSlice::new(b))
        .collect();
    sock.recv_vectored(&mut slices).map(|(n, _)| n)
}
