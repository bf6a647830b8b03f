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
//! unsent at once. Large replies also reserve their whole size of the gateway's
//! budget across connections (`--redis-max-reply-bytes`), so that many connections
//! (256 per address) holding two 64 MiB replies each cannot exhaust memory: past it,
//! a large READ gets BUSY at once, as an upload past `--max-total-partial-bytes`
//! does. It does not wait: the replies holding that budget are sent only when their
//! clients read, which may be never.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::MAX_INLINE;

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

/// The gateway's budget of large replies is taken: the READ gets BUSY.
#[derive(Debug)]
pub(crate) struct GatewayFull;

/// The gateway's budget of fetched, unsent bytes of large replies, across its
/// connections (`--redis-max-reply-bytes`).
#[derive(Clone, Debug)]
pub(crate) struct GatewayBudget(Budget);

impl GatewayBudget {
    /// A budget of `bytes` (at least 1 MiB, at most 4 GiB).
    pub fn new(bytes: usize) -> GatewayBudget {
        GatewayBudget(Budget::new(bytes, 1 << 20))
    }
}

/// One connection's budgets of fetched, unsent reply bytes: small and large replies.
#[derive(Clone, Debug)]
pub(crate) struct ReplyBudget {
    small: Budget,
    large: Budget,
    gateway: GatewayBudget,
}

impl ReplyBudget {
    /// Budgets of `bytes` each (at least twice [`MAX_INLINE`], at most 4 GiB), within
    /// the gateway's.
    pub fn new(bytes: usize, gateway: &GatewayBudget) -> ReplyBudget {
        ReplyBudget {
            small: Budget::new(bytes, 2 * MAX_INLINE),
            large: Budget::new(bytes, 2 * MAX_INLINE),
            gateway: gateway.clone(),
        }
    }

    /// Waits until `n` more bytes may be held by the connection, and holds them. A
    /// large reply holds at most half of its connection's budget, and its size (at
    /// most all) of the gateway's, or gets [`GatewayFull`] when that is taken.
    pub async fn reserve(&self, n: u64) -> Result<Held, GatewayFull> {
        if n == 0 {
            return Ok(Held {
                own: None,
                _gateway: None,
            });
        }
        if n <= MAX_INLINE as u64 {
            return Ok(Held {
                own: Some(self.small.take(n).await),
                _gateway: None,
            });
        }
        let own = self.large.take(n.min(u64::from(self.large.size / 2))).await;
        let gateway = self.gateway.0.try_take(n).ok_or(GatewayFull)?;
        Ok(Held {
            own: Some(own),
            _gateway: Some(gateway),
        })
    }

    /// Bytes that may be reserved now without waiting: small, large, the gateway's.
    #[cfg(test)]
    pub fn available(&self) -> (usize, usize, usize) {
        (
            self.small.bytes.available_permits(),
            self.large.bytes.available_permits(),
            self.gateway.0.bytes.available_permits(),
        )
    }
}

/// Bytes reserved of a [`ReplyBudget`] (the connection's, the gateway's); given back
/// when dropped.
#[derive(Debug)]
pub(crate) struct Held {
    own: Option<OwnedSemaphorePermit>,
    _gateway: Option<OwnedSemaphorePermit>,
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
        let budget = ReplyBudget::new(SIZE, &GatewayBudget::new(1 << 30));
        let data = budget
            .reserve(600)
            .await
            .unwrap()
            .attach(Bytes::from(vec![7u8; 600]));
        assert_eq!(budget.available(), (SIZE - 600, SIZE, 1 << 30));
        let frame = data.slice(10..20);
        drop(data);
        assert_eq!(budget.available().0, SIZE - 600, "a slice still holds them");
        assert_eq!(&frame[..], &[7u8; 10][..]);
        drop(frame);
        assert_eq!(budget.available(), (SIZE, SIZE, 1 << 30));
        // Nothing to hold: no reservation, the bytes as they are.
        let empty = budget.reserve(0).await.unwrap().attach(Bytes::new());
        assert!(empty.is_empty());
        assert_eq!(budget.available(), (SIZE, SIZE, 1 << 30));
    }

    #[tokio::test]
    async fn large_replies_wait_for_room_and_small_ones_never_wait_for_them() {
        let budget = ReplyBudget::new(SIZE, &GatewayBudget::new(1 << 30));
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
        assert_eq!(budget.available().2, (1 << 30) - (20 << 20) - 100_000);
        drop((second, third));
        assert_eq!(budget.available().1, SIZE);
        assert_eq!(budget.available().2, 1 << 30);
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

    #[tokio::test]
    async fn large_replies_of_all_connections_stay_within_the_gateways_budget() {
        let gateway = GatewayBudget::new(8 << 20);
        let a = ReplyBudget::new(SIZE, &gateway);
        let b = ReplyBudget::new(SIZE, &gateway);
        let first = a.reserve(5 << 20).await.unwrap();
        assert!(
            b.reserve(5 << 20).await.is_err(),
            "5 + 5 MiB is over the gateway's 8: BUSY, not a wait"
        );
        assert_eq!(b.available(), (SIZE, SIZE, 3 << 20), "nothing kept");
        // Small replies do not count against it.
        let small = b.reserve(MAX_INLINE as u64).await.unwrap();
        drop(first);
        let second = b.reserve(5 << 20).await.unwrap();
        assert_eq!(b.available().2, 3 << 20);
        drop((small, second));
        // One larger than the gateway's whole budget takes all of it.
        let huge = a.reserve(1 << 30).await.unwrap();
        assert_eq!(b.available().2, 0);
        drop(huge);
        assert_eq!(b.available().2, 8 << 20);
    }
}
