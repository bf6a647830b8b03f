//! Writes of one record that queued together on a gateway, committed together.
//!
//! A gateway changes a record one change at a time (`serial`), one Redis round trip
//! each, so a record written by many connections at once took at most one write per
//! round trip, and the writes queued behind it waited for every one before them
//! (REPLACE by Zipf's law: half the writes per second of writes spread evenly, and a
//! p99 of a quarter of a second; docs/BENCHMARKS.md). Now the small writes (REPLACE,
//! REPLACE_IF and WRITE_AT within the first `scripts::IN_HASH` bytes) that queue
//! behind a change of their record join one *group*; its leader, once it has the
//! record's turn, decides them in the order they came, each on the state the one
//! before leaves (the rules of `netswap_proto::rules`, as for one write), and commits
//! them with one compare-and-set on the revision they were decided on
//! (`scripts::COMMIT_GROUP`): all or none. Each write still raises the version by
//! one and sends its own event, in order, and gets its own reply; a REPLACE_IF whose
//! version an earlier member already raised gets its CONFLICT, decided in the same
//! order it would have been one at a time. Other changes, and writes that change the
//! record's size (quota charges, a fence), end the group's prefix and go one at a
//! time as before.
//!
//! A group is decided only on the state the gateway remembers (`states`): the commit
//! checks the revision, so a stale state costs one lost race, after which the state
//! the commit found is remembered and the group decided again. With no state
//! remembered the first member goes alone (its load remembers one).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use netswap_proto::rules::{self, Decision, WriteKind};
use netswap_proto::{Event, Pointer, Reply, Request, Status};
use tokio::sync::oneshot;

use super::events::{EventInfo, delta_head};
use super::ops::{outcome_unknown, view};
use super::redis_io::{Change, Committed, DataOp, GroupWrite, Stored, unavailable};
use super::serial::{Entered, Turn};
use super::{Caller, ClusterStore, MAX_ATTEMPTS, Outcome, lock, scripts};

/// The most writes one commit applies (the leader's and those that joined it).
pub(crate) const MAX_GROUP: usize = 32;

/// A write waiting in a group: who asked, what, and where its outcome goes.
pub(crate) struct Member {
    caller: Caller,
    request: Request,
    reply: oneshot::Sender<Outcome>,
}

impl Member {
    /// A member for `caller`'s `request`, and where its outcome will come.
    fn new(caller: Caller, request: Request) -> (Member, oneshot::Receiver<Outcome>) {
        let (reply, outcome) = oneshot::channel();
        let member = Member {
            caller,
            request,
            reply,
        };
        (member, outcome)
    }
}

/// Whether `request` may be committed with other writes of its record: a REPLACE,
/// REPLACE_IF or WRITE_AT of bytes that fit in a state hash.
pub(crate) fn groupable(request: &Request) -> bool {
    match request {
        Request::Replace { data, .. } | Request::ReplaceIf { data, .. } => {
            data.len() <= scripts::IN_HASH
        }
        Request::WriteAt { offset, data, .. } => {
            offset.saturating_add(data.len() as u64) <= scripts::IN_HASH as u64
        }
        _ => false,
    }
}

/// A group's members decided on one state: the replies of the first
/// `replies.len()` members, if `change` (their writes) commits.
struct Decided {
    replies: Vec<Reply>,
    change: Change,
    /// The record after the change.
    after: Stored,
    /// Writes in the change.
    writes: usize,
}

impl ClusterStore {
    /// Takes the record's turn for a groupable write ([`groupable`]): joins the
    /// record's open group, or leads a new one and applies it when the record's turn
    /// comes (`Err`: the write's outcome), or, if nothing joined it, returns the turn
    /// for the caller to apply the write alone as any change.
    ///
    /// Only the turn: a request's future is `apply`'s whichever request it is, and
    /// holds room for the largest branch, so a second way to apply one request here
    /// made every request's future 368 bytes larger (docs/BENCHMARKS.md, "A READ's
    /// future").
    pub(super) async fn enter_grouped(
        self: &Arc<Self>,
        caller: &Caller,
        ptr: Pointer,
        request: &Request,
    ) -> Result<Turn<'_, Pointer, Member>, Outcome> {
        // A member is made only if the write joins a group.
        let mut outcome = None;
        let entered = self
            .serial
            .enter_group(ptr, MAX_GROUP, || {
                let (member, receiver) = Member::new(caller.clone(), request.clone());
                outcome = Some(receiver);
                member
            })
            .await;
        match entered {
            Entered::Joined => {}
            Entered::Lead(turn, members) if members.is_empty() => return Ok(turn),
            Entered::Lead(turn, members) => {
                let (me, receiver) = Member::new(caller.clone(), request.clone());
                outcome = Some(receiver);
                let mut all = Vec::with_capacity(1 + members.len());
                all.push(me);
                all.extend(members);
                self.spawn_group(ptr, turn, all);
            }
        }
        let outcome = outcome.expect("a member made");
        Err(outcome.await.unwrap_or_else(|_| {
            Reply::error(
                Status::Busy,
                "this write was not applied: the write it was queued with ended first; retry",
            )
            .into()
        }))
    }

    /// Applies writes of one record that one connection sent one after the other
    /// (`Conn` hands them over together: a burst that came in one batch, or the
    /// writes that queued behind its request on the record), after the record's
    /// changes before them on this gateway, committed together as a group's; their
    /// outcomes in order. They join the record's open group together if it has room
    /// for all, else lead one that later writes may join, as a single write does
    /// ([`ClusterStore::enter_grouped`]). Entering as a plain change instead closed
    /// the open group each time: with records picked by Zipf's law, every connection's
    /// writes of the hottest record split the groups of the others, and REPLACE at
    /// pipeline 16 fell from 96k to 73k/s, its p99 from 28 to 120 ms
    /// (docs/BENCHMARKS.md).
    pub(crate) async fn apply_writes(
        self: &Arc<Self>,
        ptr: Pointer,
        writes: Vec<(Caller, Request)>,
    ) -> Vec<Outcome> {
        let mut members = Vec::with_capacity(writes.len());
        let mut outcomes = Vec::with_capacity(writes.len());
        for (caller, request) in writes {
            let (member, outcome) = Member::new(caller, request);
            members.push(member);
            outcomes.push(outcome);
        }
        let own = members.len();
        match self.serial.enter_group_many(ptr, MAX_GROUP, members).await {
            Entered::Joined => {}
            Entered::Lead(turn, all) if all.len() == own => {
                let _turn = turn;
                self.apply_group(ptr, all).await;
            }
            Entered::Lead(turn, all) => self.spawn_group(ptr, turn, all),
        }
        let mut done = Vec::with_capacity(outcomes.len());
        for outcome in outcomes {
            done.push(outcome.await.unwrap_or_else(|_| {
                Reply::error(Status::Busy, "this write was not applied; retry").into()
            }));
        }
        done
    }

    /// Applies a group that others joined in a task of its own, holding `turn`: the
    /// members' connections get their outcomes whatever becomes of the leader's.
    fn spawn_group(
        self: &Arc<Self>,
        ptr: Pointer,
        turn: Turn<'_, Pointer, Member>,
        all: Vec<Member>,
    ) {
        let turn = turn.detach(self.serial.clone());
        let store = self.clone();
        tokio::spawn(async move {
            let _turn = turn;
            store.apply_group(ptr, all).await
        });
    }

    /// Applies a group's members in order, while the caller holds the record's turn:
    /// the longest prefix that can be decided together in one commit, else the first
    /// alone.
    async fn apply_group(&self, ptr: Pointer, members: Vec<Member>) {
        let slot = super::keys::record_slot(ptr);
        let mut turn = self.turn(slot).await;
        let mut queue: VecDeque<Member> = members.into();
        let mut lost = 0;
        while !queue.is_empty() {
            let decided = match lock(&self.states).get(ptr) {
                Some(rec) if queue.len() > 1 => self.decide_group(&rec, &queue),
                _ => None,
            };
            let Some(d) = decided else {
                let m = queue.pop_front().expect("not empty");
                let done = self
                    .apply_in_turn(&m.caller, ptr, &m.request, &mut turn)
                    .await;
                let _ = m.reply.send(done);
                lost = 0;
                continue;
            };
            // (A write alone may have moved the turn to its payer's primary.)
            turn.move_to(slot).await;
            let failed = match self.commit(ptr, &d.change).await {
                Ok(Committed::Yes) => {
                    lock(&self.states).seen(ptr, &d.after);
                    self.grouped_writes
                        .fetch_add(d.writes as u64 - 1, Ordering::Relaxed);
                    let n = d.replies.len();
                    for (m, r) in queue.drain(..n).zip(d.replies) {
                        let _ = m.reply.send(r.into());
                    }
                    lost = 0;
                    continue;
                }
                // Decided again on the state the commit found (remembered by
                // `commit`), or, if it brought none, the first alone.
                Ok(Committed::Changed(_) | Committed::Fenced) => {
                    lost += 1;
                    if lost < MAX_ATTEMPTS {
                        continue;
                    }
                    Reply::error(
                        Status::Busy,
                        "the record kept changing under this request; retry later",
                    )
                }
                Ok(Committed::Unknown) => outcome_unknown(),
                Err(e) => unavailable(&e),
            };
            lost = 0;
            for m in queue.drain(..d.replies.len()) {
                let _ = m.reply.send(failed.clone().into());
            }
        }
    }

    /// Decides the longest prefix of `queue` that one commit can apply, on `rec`:
    /// writes that keep the record's size, in its state hash, and the
    /// answers (CONFLICT, ACCESS_VIOLATION, …) between them, which the commit's
    /// compare-and-set shows were decided on the record as it was. `None` when that
    /// is fewer than two members or holds no write.
    fn decide_group(&self, rec: &Stored, queue: &VecDeque<Member>) -> Option<Decided> {
        if rec.legacy || !rec.inline || rec.size > scripts::IN_HASH as u64 {
            return None;
        }
        let mut cur = rec.clone();
        let mut replies = Vec::new();
        let mut writes: Vec<GroupWrite> = Vec::new();
        for m in queue {
            let me = m.caller.identity;
            let (Request::Replace { data, .. }
            | Request::ReplaceIf { data, .. }
            | Request::WriteAt { data, .. }) = &m.request
            else {
                break;
            };
            match rules::decide(&m.request, Some(&view(&cur, &me)), &me, None, &self.cfg) {
                Decision::Write(w)
                    if w.bytes_delta == 0 && w.new_size <= scripts::IN_HASH as u64 =>
                {
                    let (offset, at) = match w.kind {
                        WriteKind::Replace => (None, 0),
                        WriteKind::At(off) => (Some(off), off),
                    };
                    let rev = cur.rev + 1;
                    writes.push(GroupWrite {
                        event: EventInfo::new(
                            Event::Changed,
                            w.new_version,
                            rev,
                            cur.owner,
                            cur.access,
                        )
                        .encode(),
                        head: delta_head(w.new_size, at),
                        bytes: data.clone(),
                        offset,
                    });
                    cur = Stored {
                        rev,
                        version: w.new_version,
                        size: w.new_size,
                        ..cur
                    };
                    replies.push(Reply::Written(w.new_version));
                }
                Decision::Answer(r) => replies.push(r),
                _ => break,
            }
        }
        if writes.is_empty() || replies.len() < 2 {
            return None;
        }
        let n = writes.len();
        let last = writes.last().expect("one write at least");
        // One REPLACE alone (with answers) is `scripts::COMMIT_BYTES`'s; the rest go
        // in `group`, and the script makes the bytes from them (`data` is only what
        // makes the commit a lean one, `redis_io::Plan`).
        let alone = n == 1 && last.offset.is_none();
        let change = Change {
            expected: Some(rec.rev),
            event: Some(last.event.clone()),
            data: DataOp::Set(if alone {
                last.bytes.clone()
            } else {
                Bytes::new()
            }),
            set: vec![("r", cur.rev.to_string().into_bytes()), cur.state_field()],
            op: self.op_id(),
            new_size: Some(cur.size),
            inline: true,
            group: if alone { Vec::new() } else { writes },
            ..Change::default()
        };
        Some(Decided {
            replies,
            change,
            after: cur,
            writes: n,
        })
    }
}
