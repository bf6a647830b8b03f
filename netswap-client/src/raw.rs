//! Frame-level I/O for tools that speak the protocol themselves (`netswap-bench`), and
//! the client's own.

use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::pin::Pin;

use bytes::Buf;
use netswap_proto::{MAX_PAYLOAD, Receiver, WriteBuf};
use tokio::io::{AsyncWrite, Interest};
use tokio::net::TcpStream;

/// Bytes of frames a client keeps encoded ahead of its writes (`WriteBuf::fill`
/// before each write; the client's writer and `netswap-bench`).
pub const WRITE_CHUNK: usize = 256 * 1024;

/// Bytes a client hands the kernel per write, at most: four of a server's writes
/// ([`MAX_WRITE`](netswap_proto::MAX_WRITE)): three full TCP offload packets and a
/// long one (59,551 bytes on loopback, 60,520 on Ethernet), never a short tail. 1 MiB
/// REPLACEs went 25% faster in these than in tokio's `write_all_buf` (64 slices,
/// 44,800 bytes, per write) and 11% faster than in writes of 64,000 bytes, 64 KiB
/// ones 4% faster (docs/BENCHMARKS.md, "A client's uploads").
pub const MAX_CLIENT_WRITE: usize = 4 * netswap_proto::MAX_WRITE;

/// Slices per vectored write: room for [`WRITE_CHUNK`] bytes of full frames (a header
/// and a payload slice each) and then some.
const WRITE_SLICES: usize = 2 * (WRITE_CHUNK / MAX_PAYLOAD + 2);

/// Writes frames to `w` until `buf` is empty, as a server does: before each write
/// `refill` tops `buf` up (typically `buf.fill(queue, WRITE_CHUNK)`, which adds
/// nothing while `buf` holds that much), then one vectored write hands the kernel at
/// most `max_bytes` of it, with as many slices as that takes. Refilling first keeps
/// every write but the last of a burst full, never a full one and a short tail.
///
/// Not `write_all_buf`: tokio gives a vectored write at most 64 slices, which for the
/// frames of a large message (a header and a payload slice each) is 32 frames, 44,800
/// bytes, so a 1 MiB upload took 24 `writev`s (and the kernel a slice's start-up cost
/// per 1,390 bytes either way).
pub async fn write_frames<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    buf: &mut WriteBuf,
    max_bytes: usize,
    mut refill: impl FnMut(&mut WriteBuf),
) -> io::Result<()> {
    loop {
        refill(buf);
        if buf.is_empty() {
            return Ok(());
        }
        // The slices live on the stack of one poll, not in the future.
        let n = std::future::poll_fn(|cx| {
            let mut slices = [IoSlice::new(&[]); WRITE_SLICES];
            let k = buf.io_slices(&mut slices, max_bytes);
            Pin::new(&mut *w).poll_write_vectored(cx, &slices[..k])
        })
        .await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        buf.advance(n);
    }
}

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

#[cfg(test)]
mod tests {
    use std::task::{Context, Poll};

    use bytes::{Bytes, BytesMut};
    use netswap_proto::{MAX_WRITE, OutQueue, Reply};

    use super::*;

    /// A socket that takes at most `accept` bytes per write and notes, per write, the
    /// slices and bytes it was offered.
    struct Recorder {
        out: Vec<u8>,
        calls: Vec<(usize, usize)>,
        accept: usize,
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.poll_write_vectored(cx, &[IoSlice::new(buf)])
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let offered = bufs.iter().map(|b| b.len()).sum();
            self.calls.push((bufs.len(), offered));
            let mut left = self.accept;
            for b in bufs {
                let take = b.len().min(left);
                self.out.extend_from_slice(&b[..take]);
                left -= take;
            }
            Poll::Ready(Ok(self.accept - left))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// Writes a 1 MiB message (written from where it is: a header and a payload slice
    /// per frame) and two small ones through a socket taking `accept` bytes per write;
    /// returns the recorder, and checks the bytes are the queue's encoding.
    async fn upload(max_bytes: usize, accept: usize) -> Recorder {
        let msgs = [
            Reply::Data(Bytes::from(vec![7u8; 1 << 20])).encode(1),
            Reply::Data(Bytes::from_static(b"small")).encode(2),
            Reply::Done.encode(3),
        ];
        let mut q = OutQueue::new();
        let mut want = BytesMut::new();
        for m in &msgs {
            q.push(m.clone()).unwrap();
        }
        q.write_to(&mut want, usize::MAX);
        for m in &msgs {
            q.push(m.clone()).unwrap();
        }
        let mut w = Recorder {
            out: Vec::new(),
            calls: Vec::new(),
            accept,
        };
        let mut buf = WriteBuf::new();
        write_frames(&mut w, &mut buf, max_bytes, |b| {
            b.fill(&mut q, WRITE_CHUNK);
        })
        .await
        .unwrap();
        assert!(buf.is_empty() && q.is_empty());
        assert_eq!(w.out, want.to_vec(), "the bytes are the queue's encoding");
        w
    }

    #[tokio::test]
    async fn a_large_upload_goes_in_full_writes_with_every_slice_they_take() {
        let w = upload(MAX_CLIENT_WRITE, usize::MAX).await;
        // Every write but the last is full, with every slice it takes: tokio's
        // `write_all_buf` offered 64 (44,800 bytes) per write.
        let frames = ((1usize << 20) + 5).div_ceil(MAX_PAYLOAD) + 1;
        let total = (1 << 20) + 5 + frames * netswap_proto::HEADER_LEN;
        assert_eq!(
            w.calls.len(),
            total.div_ceil(MAX_CLIENT_WRITE),
            "{:?}",
            w.calls
        );
        for &(slices, bytes) in &w.calls[..w.calls.len() - 1] {
            assert_eq!(bytes, MAX_CLIENT_WRITE, "{:?}", w.calls);
            assert!(slices > 300, "{slices} slices");
        }
    }

    #[tokio::test]
    async fn writes_stop_at_the_limit_and_partial_writes_lose_nothing() {
        let w = upload(MAX_WRITE, usize::MAX).await;
        let (last, full) = w.calls.split_last().unwrap();
        assert!(
            full.iter().all(|&(_, bytes)| bytes == MAX_WRITE),
            "{:?}",
            w.calls
        );
        assert!(last.1 <= MAX_WRITE);
        // A socket that takes a little at a time, cutting slices anywhere.
        let w = upload(MAX_WRITE, 1_001).await;
        assert!(w.calls.iter().all(|&(_, bytes)| bytes <= MAX_WRITE));
        // No limit: what the buffer holds (a batch and less than a frame more).
        let w = upload(usize::MAX, 1_001).await;
        let most = WRITE_CHUNK + netswap_proto::MAX_FRAME;
        assert!(w.calls.iter().all(|&(_, bytes)| bytes < most));
    }

    #[tokio::test]
    async fn a_socket_that_takes_nothing_is_an_error_not_a_loop() {
        let mut w = Recorder {
            out: Vec::new(),
            calls: Vec::new(),
            accept: 0,
        };
        let mut buf = WriteBuf::new();
        assert!(buf.push_message(&Reply::Done.encode(1)));
        let e = write_frames(&mut w, &mut buf, MAX_WRITE, |_| {})
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WriteZero);
    }
}
