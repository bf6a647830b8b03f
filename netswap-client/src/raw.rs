//! Frame-level I/O for tools that speak the protocol themselves (`netswap-bench`).

use std::io;
use std::mem::MaybeUninit;

use netswap_proto::Receiver;
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Waits until `stream` is readable and reads once into `rx`, large messages straight
/// into their buffers (see [`Receiver`]). Returns the bytes read; 0 at end of stream.
/// Afterwards take what arrived with [`Receiver::next_inbound`].
///
/// A read that returns less than there was room for has drained the socket: readiness
/// is then cleared as if it had returned would-block (tokio keeps it if data arrived
/// meanwhile), so the next call waits for data instead of making a `recv` only to
/// learn that the socket is empty.
pub async fn read_frames(stream: &TcpStream, rx: &mut Receiver) -> io::Result<usize> {
    let sock = socket2::SockRef::from(stream);
    loop {
        stream.readable().await?;
        let mut drained_n = None;
        let read = stream.try_io(Interest::READABLE, || {
            let n = rx.read_with(|bufs| recv_into(&sock, bufs))?;
            if n > 0 && rx.drained() {
                drained_n = Some(n);
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        });
        match (read, drained_n) {
            (Err(e), Some(n)) if e.kind() == io::ErrorKind::WouldBlock => return Ok(n),
            (Err(e), _) if e.kind() == io::ErrorKind::WouldBlock => continue,
            (other, _) => return other,
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
