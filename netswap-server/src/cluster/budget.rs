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
//! unsent at once.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::MAX_INLINE;

/// One connection's budgets of fetched, unsent reply bytes: small and large replies.
#[derive(Clone, Debug)]
pub(crate) struct ReplyBudget {
    small: Arc<Semaphore>,
    large: Arc<Semaphore>,
    size: u32,
}

impl ReplyBudget {
    /// Budgets of `bytes` each (at most 4 GiB, at least twice [`MAX_INLINE`]).
    pub fn new(bytes: usize) -> ReplyBudget {
        let size = bytes.clamp(2 * MAX_INLINE, u32::MAX as usize) as u32;
        ReplyBudget {
            small: Arc::new(Semaphore::new(size as usize)),
            large: Arc::new(Semaphore::new(size as usize)),
            size,
        }
    }

    /// Waits until `n` more bytes may be held, and holds them. A large reply holds at
    /// most half of its budget.
    pub async fn reserve(&self, n: u64) -> Held {
        if n == 0 {
            return Held(None);
        }
        let (budget, n) = if n <= MAX_INLINE as u64 {
            (&self.small, n as u32)
        } else {
            (&self.large, n.min(u64::from(self.size / 2)) as u32)
        };
        let permit = budget
            .clone()
            .acquire_many_owned(n)
            .await
            .expect("the semaphore is never closed");
        Held(Some(permit))
    }

    /// Bytes that may be reserved now without waiting: small, large.
    #[cfg(test)]
    pub fn available(&self) -> (usize, usize) {
        (
            self.small.available_permits(),
            self.large.available_permits(),
        )
    }
}

/// Bytes reserved of a [`ReplyBudget`]; given back when dropped.
#[derive(Debug)]
pub(crate) struct Held(Option<OwnedSemaphorePermit>);

impl Held {
    /// `data`, holding the reservation until the last reference to it is dropped.
    pub fn attach(self, data: Bytes) -> Bytes {
        if self.0.is_none() || data.is_empty() {
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
        let budget = ReplyBudget::new(SIZE);
        let data = budget
            .reserve(600)
            .await
            .attach(Bytes::from(vec![7u8; 600]));
        assert_eq!(budget.available(), (SIZE - 600, SIZE));
        let frame = data.slice(10..20);
        drop(data);
        assert_eq!(budget.available().0, SIZE - 600, "a slice still holds them");
        assert_eq!(&frame[..], &[7u8; 10][..]);
        drop(frame);
        assert_eq!(budget.available(), (SIZE, SIZE));
        // Nothing to hold: no reservation, the bytes as they are.
        let empty = budget.reserve(0).await.attach(Bytes::new());
        assert!(empty.is_empty());
        assert_eq!(budget.available(), (SIZE, SIZE));
    }

    #[tokio::test]
    async fn large_replies_wait_for_room_and_small_ones_never_wait_for_them() {
        let budget = ReplyBudget::new(SIZE);
        let reserve = |n: u64| {
            let budget = budget.clone();
            tokio::spawn(async move { budget.reserve(n).await })
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
        drop((second, third));
        assert_eq!(budget.available().1, SIZE);
        // Small replies have a budget of their own, and wait for room in it.
        let held: Vec<Held> = futures_util::future::join_all(
            (0..SIZE / MAX_INLINE).map(|_| budget.reserve(MAX_INLINE as u64)),
        )
        .await;
        let more = reserve(1);
        assert!(!finishes(&more).await, "the small budget is taken");
        drop(held);
        more.await.unwrap();
    }
}
