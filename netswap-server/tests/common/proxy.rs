//! A TCP proxy between a client and a server, for the network's misbehaviours.

use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

/// A TCP proxy on 127.0.0.1 to a server, whose connections out come from 127.0.0.`from`
/// (the identity the server sees). [`Proxy::cut`] drops every connection through it
/// so far, as a network blip would, and it accepts new ones; [`Proxy::hold`] stops
/// what the server sends from reaching the clients (a slow path, a stalled peer)
/// until [`Proxy::release`], while what the clients send still goes through.
pub struct Proxy {
    pub addr: SocketAddr,
    cut: watch::Sender<u64>,
    held: watch::Sender<bool>,
}

impl Proxy {
    pub async fn start(to: SocketAddr, from: u8) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (cut, cuts) = watch::channel(0u64);
        let (held, holds) = watch::channel(false);
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let mut cuts = cuts.clone();
                cuts.mark_unchanged();
                let holds = holds.clone();
                tokio::spawn(async move {
                    let sock = tokio::net::TcpSocket::new_v4().unwrap();
                    sock.bind(SocketAddr::from(([127, 0, 0, from], 0))).unwrap();
                    let Ok(outbound) = sock.connect(to).await else {
                        return;
                    };
                    let (client_r, client_w) = inbound.into_split();
                    let (server_r, server_w) = outbound.into_split();
                    tokio::select! {
                        _ = pass(client_r, server_w, None) => {}
                        _ = pass(server_r, client_w, Some(holds)) => {}
                        _ = cuts.changed() => {}
                    }
                });
            }
        });
        Proxy { addr, cut, held }
    }

    /// Drops every connection through the proxy now.
    pub fn cut(&self) {
        self.cut.send_modify(|n| *n += 1);
    }

    /// From now on, bytes from the server wait in the proxy (also those it has
    /// already read), until [`Proxy::release`].
    pub fn hold(&self) {
        self.held.send_replace(true);
    }

    /// Lets the bytes from the server through again, those held first.
    pub fn release(&self) {
        self.held.send_replace(false);
    }
}

/// Copies `from` to `to` until either ends, waiting while `held` (if any) says so.
async fn pass(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    mut held: Option<watch::Receiver<bool>>,
) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let Ok(n) = from.read(&mut buf).await else {
            return;
        };
        if n == 0 {
            return;
        }
        if let Some(h) = &mut held
            && h.wait_for(|held| !*held).await.is_err()
        {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
