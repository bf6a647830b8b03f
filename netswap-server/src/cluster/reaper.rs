//! Orphans across gateways. One gateway at a time is the reaper (a lock key with a
//! TTL, renewed while it works). It looks at the identities and records whose time has
//! come in `ns:{reap}` and deletes what [`rules::orphan_expiry`] says has expired:
//! an identity with no live lease on any gateway, offline for the grace period, loses
//! its records, except those handed to it while it was away, which keep their own,
//! later deadline. Every deletion is a compare-and-set like any other, so a reaper
//! racing with a TAKEOVER loses cleanly.

use std::time::Duration;

use futures_util::StreamExt;

use netswap_proto::rules;
use netswap_proto::{Identity, Pointer};
use redis::Value;
use tracing::info;

use super::{AttemptError, ClusterStore, MAX_ATTEMPTS, fault_point};
use super::{redis_io, scripts};

/// How long the reaper lock lasts unless renewed.
const LOCK_TTL: Duration = Duration::from_secs(10);
/// Schedule entries looked at per round.
const BATCH: usize = 200;
/// Records of one identity reaped at once (their loads and deletes go to Redis in
/// pipelines, `batch.rs`).
const REAP_AT_ONCE: usize = 64;
/// Records of one identity reaped on one look at its liveness: before each further
/// chunk the reaper looks again, and stops if the identity came back.
const REAP_PER_LOOK: usize = 4 * REAP_AT_ONCE;
/// Schedule entries (identities, records) looked at at once in a round. One by one, a
/// gateway looked at ~200 a second: 5,000 identities that left together were reaped
/// over 25 s after their grace.
const DUE_AT_ONCE: usize = 16;
/// When a record kept changing under the reaper (`MAX_ATTEMPTS` lost races: others
/// write it through other gateways), its entry is looked at again this much later.
/// It used to leave the schedule: the orphan outlived its grace for ever.
const CONTENDED_RETRY: Duration = Duration::from_secs(1);

/// What the reaper did with one record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reaping {
    /// Deleted.
    Reaped,
    /// Not its time (or gone, or someone else's): nothing to do now.
    Kept,
    /// It kept changing under the reaper: look again later.
    Contended,
}

/// What a round of reaping did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Round {
    /// Records deleted.
    pub reaped: usize,
    /// The round took as many entries as it may: more may be due now.
    pub more: bool,
}

impl ClusterStore {
    /// One round of reaping, if this gateway is (or becomes) the reaper: up to
    /// [`BATCH`] entries of the schedule that are due, [`DUE_AT_ONCE`] at a time.
    pub async fn reap_once(&self) -> Result<Round, AttemptError> {
        let mut redis = self.redis();
        let got: Option<String> = redis::cmd("SET")
            .arg(self.keys.reap_lock())
            .arg(&self.gateway)
            .arg("NX")
            .arg("PX")
            .arg(redis_io::ms(LOCK_TTL))
            .query_async(&mut redis)
            .await?;
        if got.is_none() {
            let holder: Option<String> = redis::cmd("GET")
                .arg(self.keys.reap_lock())
                .query_async(&mut redis)
                .await?;
            if holder.as_deref() != Some(self.gateway.as_str()) {
                return Ok(Round::default());
            }
            let _: Value = redis::cmd("PEXPIRE")
                .arg(self.keys.reap_lock())
                .arg(redis_io::ms(LOCK_TTL))
                .query_async(&mut redis)
                .await?;
        }
        let (now, _) = redis_io::redis_now(&self.redis()).await?;
        self.note_clock(now);
        let due: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(self.keys.reap())
            .arg("-inf")
            .arg(now)
            .arg("LIMIT")
            .arg(0)
            .arg(BATCH)
            .query_async(&mut redis)
            .await?;
        let more = due.len() == BATCH;
        let mut reaped = 0;
        let mut each = futures_util::stream::iter(due)
            .map(|member| self.reap_due(member))
            .buffer_unordered(DUE_AT_ONCE);
        while let Some(n) = each.next().await {
            reaped += n?;
        }
        if reaped > 0 {
            info!(records = reaped, "reaped orphaned records");
        }
        Ok(Round { reaped, more })
    }

    /// Looks at one due entry of the schedule: the records deleted.
    async fn reap_due(&self, member: String) -> Result<usize, AttemptError> {
        if let Some(hex) = member.strip_prefix("i:") {
            if let Ok(id) = hex.parse::<Identity>() {
                return self.reap_identity(&member, &id).await;
            }
        } else if let Some(hex) = member.strip_prefix("r:")
            && let Ok(ptr) = hex.parse::<Pointer>()
        {
            return self.reap_record(&member, ptr).await;
        }
        let _: Value = redis::cmd("ZREM")
            .arg(self.keys.reap())
            .arg(&member)
            .query_async(&mut self.redis())
            .await?;
        Ok(0)
    }

    async fn reschedule(&self, member: &str, at: Option<u64>) -> redis::RedisResult<()> {
        let mut redis = self.redis();
        match at {
            Some(t) => {
                let _: Value = redis::cmd("ZADD")
                    .arg(self.keys.reap())
                    .arg(t)
                    .arg(member)
                    .query_async(&mut redis)
                    .await?;
            }
            None => {
                let _: Value = redis::cmd("ZREM")
                    .arg(self.keys.reap())
                    .arg(member)
                    .query_async(&mut redis)
                    .await?;
            }
        }
        Ok(())
    }

    /// Whether an identity's records may be reaped now, by what `live` says of it:
    /// `Some(its deadline)`, or `None` once it is rescheduled (connected: for a TTL
    /// and the grace from now at the latest; offline but not for its grace yet: for
    /// then).
    ///
    /// A connected identity stays on the schedule (`ZADD LT`: an earlier entry
    /// stands). It used to be taken off, and a release that landed between the look
    /// at its liveness and that removal lost its entry with it: the identity was not
    /// reaped until it came and left again (test
    /// `an_identity_that_leaves_while_the_reaper_finds_it_connected_is_still_reaped`).
    async fn due_now(
        &self,
        member: &str,
        live: &super::Liveness,
    ) -> Result<Option<Option<u64>>, AttemptError> {
        if live.live {
            if fault_point("reap-live-pause") {
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            }
            let at = live.now + redis_io::ms(self.opts.lease_ttl + self.cfg.orphan_grace);
            let _: Value = redis::cmd("ZADD")
                .arg(self.keys.reap())
                .arg("LT")
                .arg(at)
                .arg(member)
                .query_async(&mut self.redis())
                .await?;
            return Ok(None);
        }
        let owner_deadline = live
            .offline_since
            .map(|t| t + redis_io::ms(self.cfg.orphan_grace));
        if let Some(d) = owner_deadline.filter(|d| *d > live.now) {
            self.reschedule(member, Some(d)).await?;
            return Ok(None);
        }
        Ok(Some(owner_deadline))
    }

    /// Reaps the records of an identity whose grace has passed, [`REAP_PER_LOOK`] at
    /// a time, looking at its liveness again before each further chunk. With one look
    /// for all of them, an identity that came back while its records were being
    /// reaped lost the rest of them too, although connected (test
    /// `an_identity_that_comes_back_while_it_is_reaped_keeps_what_is_left`).
    async fn reap_identity(&self, member: &str, id: &Identity) -> Result<usize, AttemptError> {
        let mut live = self.liveness(id).await?;
        let Some(mut owner_deadline) = self.due_now(member, &live).await? else {
            return Ok(0);
        };
        let k = self.keys.identity(id);
        let owned: Vec<String> = redis::cmd("SMEMBERS")
            .arg(&k.owned)
            .query_async(&mut self.redis())
            .await?;
        let (mut reaped, mut contended) = (0, false);
        for (i, chunk) in owned.chunks(REAP_PER_LOOK).enumerate() {
            if i > 0 {
                if fault_point("reap-pause") {
                    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                }
                live = self.liveness(id).await?;
                match self.due_now(member, &live).await? {
                    Some(d) => owner_deadline = d,
                    None => return Ok(reaped),
                }
            }
            // Many at once: one by one, each record's load and delete waited for the
            // last one's, and a gateway reaped ~3,300 records a second (`soak --store`).
            let mut each = futures_util::stream::iter(chunk.iter().cloned())
                .map(|s| self.reap_owned(&k.owned, s, id, owner_deadline, &live))
                .buffer_unordered(REAP_AT_ONCE);
            while let Some(r) = each.next().await {
                match r? {
                    Reaping::Reaped => reaped += 1,
                    Reaping::Kept => {}
                    Reaping::Contended => contended = true,
                }
            }
        }
        self.quota.repair(&self.redis(), id, live.now).await?;
        if contended {
            let again = live.now + redis_io::ms(CONTENDED_RETRY);
            self.reschedule(member, Some(again)).await?;
            return Ok(reaped);
        }
        // Nothing of it left: nothing of it stays in Redis (the script checks).
        redis_io::run(
            &self.redis(),
            &scripts::FORGET_IDENTITY,
            &[&k.leases, &k.quota, &k.owned, &k.parked],
            &[],
        )
        .await?;
        self.reschedule(member, None).await?;
        Ok(reaped)
    }

    /// Reaps one record of the offline identity `id` (`s`, from its set `owned`) if
    /// its time has come.
    async fn reap_owned(
        &self,
        owned: &str,
        s: String,
        id: &Identity,
        owner_deadline: Option<u64>,
        live: &super::Liveness,
    ) -> Result<Reaping, AttemptError> {
        let Ok(ptr) = s.parse::<Pointer>() else {
            return Ok(Reaping::Kept);
        };
        // After the changes of the record this gateway has in flight (`serial`).
        let _turn = self.serial.enter(ptr).await;
        for _ in 0..MAX_ATTEMPTS {
            let loaded = self.load(ptr, None, 0, false).await?;
            let Some(rec) = loaded.filter(|r| r.owner == *id) else {
                // Gone, or someone else's now: off the identity's index.
                let _: Value = redis::cmd("SREM")
                    .arg(owned)
                    .arg(&s)
                    .query_async(&mut self.redis())
                    .await?;
                return Ok(Reaping::Kept);
            };
            let own = rec
                .deadline
                .filter(|&(_, g)| g == live.generation)
                .map(|(x, _)| x);
            if rules::orphan_expiry(owner_deadline, own).is_some_and(|e| e > live.now) {
                return Ok(Reaping::Kept); // its own, later deadline is on the schedule
            }
            if self
                .delete(ptr, &rec, &mut super::turns::Turn::none())
                .await?
                == super::redis_io::Committed::Yes
            {
                return Ok(Reaping::Reaped);
            }
        }
        Ok(Reaping::Contended)
    }

    async fn reap_record(&self, member: &str, ptr: Pointer) -> Result<usize, AttemptError> {
        let _turn = self.serial.enter(ptr).await;
        let mut now = None;
        for _ in 0..MAX_ATTEMPTS {
            let Some(rec) = self.load(ptr, None, 0, false).await? else {
                self.reschedule(member, None).await?;
                return Ok(0);
            };
            let owner = self.liveness(&rec.owner).await?;
            now = Some(owner.now);
            let own = rec
                .deadline
                .filter(|&(_, g)| g == owner.generation && !owner.live)
                .map(|(x, _)| x);
            let Some(own) = own else {
                // The owner connected since the record was handed to it: the record
                // follows its owner's lifetime now.
                self.reschedule(member, None).await?;
                return Ok(0);
            };
            let owner_deadline = owner
                .offline_since
                .map(|t| t + redis_io::ms(self.cfg.orphan_grace));
            let expiry = rules::orphan_expiry(owner_deadline, Some(own)).expect("a deadline");
            if expiry > owner.now {
                self.reschedule(member, Some(expiry)).await?;
                return Ok(0);
            }
            if self
                .delete(ptr, &rec, &mut super::turns::Turn::none())
                .await?
                == super::redis_io::Committed::Yes
            {
                self.reschedule(member, None).await?;
                return Ok(1);
            }
        }
        // It kept changing: looked at again a little later, not in every round.
        if let Some(now) = now {
            self.reschedule(member, Some(now + redis_io::ms(CONTENDED_RETRY)))
                .await?;
        }
        Ok(0)
    }
}
