//! How many bytes of records a connection may have fetched from Redis for replies
//! it has not been sent yet: its `--max-output-bytes` for small replies, and as much
//! for large ones.
//!
//! The embedded store answers a READ with the record's own bytes, shared, so a client
//! that pipelines a thousand READs of a 4 MiB record and reads none of the replies
//! costs the server one record. A gateway gets a copy from Redis per READ: without a
//! bound, the replies it fetched piled up in the connection's output (a test client
//! made one gateway hold 3.7 GiB, docs/RELIABILITY.md). So each READ reserves its
//! bytes here before it fetches them (or, for the few kilobytes that come with a
//! load, once they came), and the reservation goes with the reply's bytes: it is
//! given back when the connection has sent them and dropped the last reference. A
//! connection whose client does not read stops fetching at its budget; its requests
//! wait here, holding nothing, and the connection stops reading requests at its
//! in-flight limit as usual.
//!
//! Small replies (up to [`MAX_INLINE`], the bytes a load brings) and large ones have
//! a budget each, so that a small reply never waits for a large one to be sent (the
//! protocol's promise that a small reply is not held behind a large one), and a large
//! reply reserves at most half of its budget, so that one huge reply does not hold
//! up the next large one either: at most two large replies over half the budget wait
//! unsent at once. Large replies also reserve their whole size of their address's
//! share (a quarter; an address is an IPv4 address or an IPv6 /64, [`Shares`]) of the
//! gateway's budget across connections
//! (`--redis-max-reply-bytes`), and of that budget, so that many connections (256
//! per address) holding two 64 MiB replies each cannot exhaust memory, and one
//! address cannot take all of it from the others: past either, a large READ gets BUSY
//! at once, as an upload past `--max-partial-bytes-per-ip` or
//! `--max-total-partial-bytes` does. It does not wait: the replies holding that
//! budget are sent only when their clients read, which may be never.

use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use hashbrown::HashMap;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::MAX_INLINE;
use crate::hub::NetKey;

/// A budget: a semaphore of bytes, and its size.
#[derive(Clone, Debug)]
struct Budget {
    bytes: Arc<Semaphore>,
    size: u32,
}

impl Budget {
    /// `bytes`, at least `min`, at most 4 GiB.
    fn new(bytes: usize, min: usize) -> Budget {
        let size = bytes.clamp(min, u32::MAX as usize) as u32;
        Budget {
            bytes: Arc::new(Semaphore::new(size as usize)),
            size,
        }
    }

    /// Waits for `n` bytes, at most the whole budget, and holds them.
    async fn take(&self, n: u64) -> OwnedSemaphorePermit {
        let n = n.min(u64::from(self.size)) as u32;
        self.bytes
            .clone()
            .acquire_many_owned(n)
            .await
            .expect("the semaphore is never closed")
    }

    /// Holds `n` bytes, at most the whole budget, if they are free now.
    fn try_take(&self, n: u64) -> Option<OwnedSemaphorePermit> {
        let n = n.min(u64::from(self.size)) as u32;
        self.bytes.clone().try_acquire_many_owned(n).ok()
    }
}

/// The address's share or the gateway's budget of large replies is taken: the READ
/// gets BUSY.
#[derive(Debug)]
pub(crate) enum Full {
    /// The address's share.
    Address,
    /// The gateway's budget.
    Gateway,
}

/// The gateway's budget of fetched, unsent bytes of large replies, across its
/// connections (`--redis-max-reply-bytes`).
#[derive(Clone, Debug)]
pub(crate) struct GatewayBudget(Budget);

impl GatewayBudget {
    /// A budget of `bytes` (at least 1 MiB, at most 4 GiB).
    pub fn new(bytes: usize) -> GatewayBudget {
        GatewayBudget(Budget::new(bytes, 1 << 20))
    }

    /// One address's share of it: a quarter.
    pub fn share(&self) -> GatewayBudget {
        GatewayBudget(Budget::new(self.0.size as usize / 4, 1 << 20))
    }

    /// Bytes of it held now by replies not sent yet.
    pub fn held(&self) -> u64 {
        u64::from(self.0.size) - self.0.bytes.available_permits() as u64
    }
}

/// The shares of a gateway's budget of the networks that have connections: one per
/// IPv4 address or IPv6 /64 (`hub::NetKey`, as the budget of unfinished uploads), so
/// that an attacker cannot take a share per address of its /64. A network's share
/// lives while it has connections.
#[derive(Debug, Default)]
pub(crate) struct Shares(HashMap<NetKey, (u32, GatewayBudget)>);

impl Shares {
    /// A connection from `ip` opens: its network's share of `gateway`.
    pub fn join(&mut self, ip: IpAddr, gateway: &GatewayBudget) -> GatewayBudget {
        let e = self
            .0
            .entry(NetKey::of(ip))
            .or_insert_with(|| (0, gateway.share()));
        e.0 += 1;
        e.1.clone()
    }

    /// A connection from `ip` closed (or did not open after all).
    pub fn leave(&mut self, ip: IpAddr) {
        let net = NetKey::of(ip);
        if let Some(e) = self.0.get_mut(&net) {
            e.0 -= 1;
            if e.0 == 0 {
                self.0.remove(&net);
            }
        }
    }
}

/// One connection's budgets of fetched, unsent reply bytes: small and large replies.
#[derive(Clone, Debug)]
pub(crate) struct ReplyBudget {
    small: Budget,
    large: Budget,
    address: GatewayBudget,
    gateway: GatewayBudget,
}

impl ReplyBudget {
    /// Budgets of `bytes` each (at least twice [`MAX_INLINE`], at most 4 GiB), within
    /// the `address`'s share of the `gateway`'s.
    pub fn new(bytes: usize, address: &GatewayBudget, gateway: &GatewayBudget) -> ReplyBudget {
        ReplyBudget {
            small: Budget::new(bytes, 2 * MAX_INLINE),
            large: Budget::new(bytes, 2 * MAX_INLINE),
            address: address.clone(),
            gateway: gateway.clone(),
        }
    }

    /// Waits until `n` more bytes may be held by the connection, and holds them. A
    /// large reply holds at most half of its connection's budget, and its size (at
    /// most all) of its address's share and of the gateway's, or gets [`Full`] when
    /// one of them is taken.
    pub async fn reserve(&self, n: u64) -> Result<Held, Full> {
        if n == 0 {
            return Ok(Held {
                own: None,
                _shared: None,
            });
        }
        if n <= MAX_INLINE as u64 {
            return Ok(Held {
                own: Some(self.small.take(n).await),
                _shared: None,
            });
        }
        let own = self.large.take(n.min(u64::from(self.large.size / 2))).await;
        // A reply larger than the whole share takes all of it, and as much of the
        // gateway's: an address never holds more than its share.
        let shared = n.min(u64::from(self.address.0.size));
        let address = self.address.0.try_take(shared).ok_or(Full::Address)?;
        let gateway = self.gateway.0.try_take(shared).ok_or(Full::Gateway)?;
        Ok(Held {
            own: Some(own),
            _shared: Some((address, gateway)),
        })
    }

    /// Bytes that may be reserved now without waiting: small, large, the address's,
    /// the gateway's.
    #[cfg(test)]
    pub fn available(&self) -> (usize, usize, usize, usize) {
        (
            self.small.bytes.available_permits(),
            self.large.bytes.available_permits(),
            self.address.0.bytes.available_permits(),
            self.gateway.0.bytes.available_permits(),
        )
    }
}

/// Bytes reserved of a [`ReplyBudget`] (the connection's; the address's and the
/// gateway's); given back when dropped.
#[derive(Debug)]
pub(crate) struct Held {
    own: Option<OwnedSemaphorePermit>,
    _shared: Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)>,
}

impl Held {
    /// `data`, holding the reservation until the last reference to it is dropped.
    pub fn attach(self, data: Bytes) -> Bytes {
        if self.own.is_none() || data.is_empty() {
            return data;
        }
        Bytes::from_owner(Owned { data, _held: self })
    }
}

/// Reply bytes and the reservation they hold.
struct Owned {
    data: Bytes,
    _held: Held,
}

impl AsRef<[u8]> for Owned {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const SIZE: usize = 1 << 20;

    async fn finishes<T>(f: &tokio::task::JoinHandle<T>) -> bool {
        tokio::time::sleep(Duration::from_millis(50)).await;
        f.is_finished()
    }

    #[tokio::test]
    async fn bytes_are_given_back_when_the_last_reference_is_dropped() {
        let gateway = GatewayBudget::new(1 << 30);
        let budget = ReplyBudget::new(SIZE, &gateway.share(), &gateway);
        let data = budget
            .reserve(600)
            .await
            .unwrap()
            .attach(Bytes::from(vec![7u8; 600]));
        assert_eq!(budget.available(), (SIZE - 600, SIZE, 1 << 28, 1 << 30));
        let frame = data.slice(10..20);
        drop(data);
        assert_eq!(budget.available().0, SIZE - 600, "a slice still holds them");
        assert_eq!(&frame[..], &[7u8; 10][..]);
        drop(frame);
        assert_eq!(budget.available(), (SIZE, SIZE, 1 << 28, 1 << 30));
        // Nothing to hold: no reservation, the bytes as they are.
        let empty = budget.reserve(0).await.unwrap().attach(Bytes::new());
        assert!(empty.is_empty());
        assert_eq!(budget.available(), (SIZE, SIZE, 1 << 28, 1 << 30));
    }

    #[tokio::test]
    async fn large_replies_wait_for_room_and_small_ones_never_wait_for_them() {
        let gateway = GatewayBudget::new(1 << 30);
        let budget = ReplyBudget::new(SIZE, &gateway.share(), &gateway);
        let reserve = |n: u64| {
            let budget = budget.clone();
            tokio::spawn(async move { budget.reserve(n).await.unwrap() })
        };
        // Two huge replies hold half of the large budget each; a third waits.
        let first = reserve(20 << 20).await.unwrap();
        let second = reserve(20 << 20).await.unwrap();
        let third = reserve(100_000);
        assert!(!finishes(&third).await, "the large budget is taken");
        // A small reply does not wait for them.
        let small = reserve(4);
        assert!(
            finishes(&small).await,
            "a small reply waited for large ones"
        );
        drop(small.await.unwrap());
        drop(first);
        let third = third.await.unwrap();
        assert_eq!(budget.available().1, SIZE / 2 - 100_000);
        assert_eq!(budget.available().3, (1 << 30) - (20 << 20) - 100_000);
        drop((second, third));
        assert_eq!(budget.available().1, SIZE);
        assert_eq!(budget.available().3, 1 << 30);
        // Small replies have a budget of their own, and wait for room in it.
        let held: Vec<Held> = futures_util::future::join_all(
            (0..SIZE / MAX_INLINE)
                .map(|_| async { budget.reserve(MAX_INLINE as u64).await.unwrap() }),
        )
        .await;
        let more = reserve(1);
        assert!(!finishes(&more).await, "the small budget is taken");
        drop(held);
        more.await.unwrap();
    }

    #[test]
    fn an_ipv6_64_has_one_share_and_it_goes_with_its_last_connection() {
        let gateway = GatewayBudget::new(64 * SIZE);
        let mut shares = Shares::default();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let a = shares.join(ip("2001:db8:1:2::1"), &gateway);
        let b = shares.join(ip("2001:db8:1:2:ffff::9"), &gateway);
        let other = shares.join(ip("2001:db8:1:3::1"), &gateway);
        let v4 = shares.join(ip("192.0.2.1"), &gateway);
        let v4_other = shares.join(ip("192.0.2.2"), &gateway);
        let _held = a.0.try_take(SIZE as u64).unwrap();
        let free = |s: &GatewayBudget| s.0.bytes.available_permits();
        assert_eq!(free(&b), 15 * SIZE, "one /64, one share");
        assert_eq!(free(&other), 16 * SIZE, "another /64, another share");
        let _v4_held = v4.0.try_take(SIZE as u64).unwrap();
        assert_eq!(free(&v4_other), 16 * SIZE, "each IPv4 address has its own");
        shares.leave(ip("2001:db8:1:2::1"));
        assert_eq!(
            free(&shares.join(ip("2001:db8:1:2::7"), &gateway)),
            15 * SIZE,
            "the /64 still has a connection: the same share"
        );
        shares.leave(ip("2001:db8:1:2::7"));
        shares.leave(ip("2001:db8:1:2:ffff::9"));
        assert_eq!(
            free(&shares.join(ip("2001:db8:1:2::1"), &gateway)),
            16 * SIZE,
            "its last connection gone, the /64 starts afresh"
        );
    }

    #[tokio::test]
    async fn large_replies_stay_within_their_addresss_share_and_the_gateways_budget() {
        let gateway = GatewayBudget::new(16 << 20);
        let (one, other, third) = (gateway.share(), gateway.share(), gateway.share());
        let a = ReplyBudget::new(SIZE, &one, &gateway);
        let a2 = ReplyBudget::new(SIZE, &one, &gateway);
        let b = ReplyBudget::new(SIZE, &other, &gateway);
        let c = ReplyBudget::new(SIZE, &third, &gateway);
        // An address's share is a quarter: 4 MiB, on all its connections together.
        let first = a.reserve(3 << 20).await.unwrap();
        assert!(
            matches!(a2.reserve(3 << 20).await, Err(Full::Address)),
            "3 + 3 MiB is over the address's 4: BUSY, not a wait"
        );
        assert_eq!(
            a2.available(),
            (SIZE, SIZE, 1 << 20, 13 << 20),
            "nothing kept"
        );
        // Other addresses are not held up by it, until the gateway's budget is taken.
        let held: Vec<Held> = vec![
            b.reserve(4 << 20).await.unwrap(),
            c.reserve(4 << 20).await.unwrap(),
        ];
        let fourth = ReplyBudget::new(SIZE, &gateway.share(), &gateway);
        let last = fourth.reserve(4 << 20).await.unwrap();
        assert!(matches!(
            ReplyBudget::new(SIZE, &gateway.share(), &gateway)
                .reserve(2 << 20)
                .await,
            Err(Full::Gateway)
        ));
        // Small replies count against neither.
        let small = b.reserve(MAX_INLINE as u64).await.unwrap();
        drop((first, held, last, small));
        assert_eq!(a.available(), (SIZE, SIZE, 4 << 20, 16 << 20));
        // One larger than the whole share takes all of it.
        let huge = a.reserve(1 << 30).await.unwrap();
        assert_eq!(a.available().2, 0);
        assert_eq!(a.available().3, 12 << 20);
        drop(huge);
    }
}
