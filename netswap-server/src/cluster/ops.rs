//! The requests that name a record, on the Redis Cluster backend: load the record,
//! let `netswap_proto::rules` decide, apply the decision with a compare-and-set.

use std::sync::atomic::Ordering;

use netswap_proto::rules::{self, Decision, Payer, RecordView, Usage, Write, WriteKind};
use netswap_proto::{Applied, Event, Identity, Pointer, Reply, Request};
use redis::Value;

use super::budget::Held;
use super::events::EventInfo;
use super::keys;
use super::redis_io::{self, Change, Committed, DataOp, Stored};
use super::scripts;
use super::turns::Turn;
use super::{
    AttemptError, Caller, ClusterStore, FENCE, Full, MAX_INLINE, Outcome, WatchChange, lock,
};

/// `Ok(None)`: the record changed under the attempt; decide again.
type Attempt = Result<Option<Outcome>, AttemptError>;

/// The reply when a change's outcome cannot be told (see `Committed::Unknown`).
pub(super) fn outcome_unknown() -> Reply {
    Reply::error(
        netswap_proto::Status::Busy,
        "the cluster failed over while this change was applied, and the record changed since: read it to see whether the change was applied",
    )
}

fn done(reply: Reply) -> Attempt {
    Ok(Some(reply.into()))
}

impl ClusterStore {
    /// The BUSY of a large reply (a READ, a data watch's first) while the caller's
    /// address holds its share, or the gateway holds `--redis-max-reply-bytes`, of
    /// large replies their clients have not read yet (`budget`); counted for
    /// `/metrics`.
    fn replies_held(&self, full: Full) -> Reply {
        let (counter, reason) = match full {
            Full::Address => (
                &self.refused_address,
                "large replies to this address that it has not read hold its share of this gateway's memory; retry later",
            ),
            Full::Gateway => (
                &self.refused_gateway,
                "this gateway holds too many large replies that their clients have not read; retry later",
            ),
        };
        counter.fetch_add(1, Ordering::Relaxed);
        Reply::error(netswap_proto::Status::Busy, reason)
    }

    /// Loads `ptr` for `request` (with the bytes of `range`), reserving the reply
    /// budget first for a large READ known to be allowed. `Err`: what the attempt
    /// ends with.
    async fn load_for(
        &self,
        caller: &Caller,
        ptr: Pointer,
        request: &Request,
        range: Option<(u64, u64)>,
    ) -> Result<(Option<Stored>, Option<Held>), Attempt> {
        let me = caller.identity;
        // How many bytes may come with the load: up to MAX_INLINE, so that a caller
        // who may not read a big record does not make Redis send it; all of a read
        // the remembered state allows (decided again on the loaded state).
        let known = lock(&self.states).get(ptr);
        let inline = match &known {
            Some(known) if range.is_some() => {
                match rules::decide(request, Some(&view(known, &me)), &me, None, &self.cfg) {
                    Decision::Read { .. } => usize::MAX,
                    _ if known.size > MAX_INLINE as u64 => 0,
                    _ => MAX_INLINE,
                }
            }
            _ => MAX_INLINE,
        };
        // Bytes of a large record that come with the load are reserved of the
        // connection's reply budget first (`budget`); a few kilobytes that come with
        // it are reserved once they came.
        let held = match (&known, range) {
            (Some(known), Some((off, n))) if inline == usize::MAX => {
                let expect = known.size.saturating_sub(off).min(n);
                if expect > MAX_INLINE as u64 {
                    match caller.budget.reserve(expect).await {
                        Ok(held) => Some(held),
                        Err(full) => return Err(done(self.replies_held(full))),
                    }
                } else {
                    None
                }
            }
            _ => None,
        };
        let in_hash = known.is_some_and(|k| k.inline);
        match self.load(ptr, range, inline, in_hash).await {
            Ok(loaded) => Ok((loaded, held)),
            Err(e) => Err(Err(e.into())),
        }
    }

    /// The bytes `[start, end)` of a loaded record for a reply that carries them (a
    /// READ's, a data watch's first), reserved of the caller's reply budget first
    /// (`held`: when they were reserved before the load), so that a client that reads
    /// nothing cannot make the gateway hold a copy per request; fetched unless they
    /// came with the load. `Err`: what the attempt ends with (BUSY when the budget is
    /// full; `Ok(None)`, attempt again, when the record changed since the load).
    async fn reply_bytes(
        &self,
        caller: &Caller,
        ptr: Pointer,
        rec: &Stored,
        held: Option<Held>,
        (start, end): (u64, u64),
    ) -> Result<bytes::Bytes, Attempt> {
        let held = match held {
            Some(held) => held,
            None => match caller.budget.reserve(end - start).await {
                Ok(held) => held,
                Err(full) => return Err(done(self.replies_held(full))),
            },
        };
        let data = match &rec.data {
            Some(d) if d.len() as u64 == end - start => d.clone(),
            _ => match redis_io::range(&self.redis(), &self.keys.record(ptr), rec.rev, start, end)
                .await
            {
                Ok(Some(d)) => d,
                Ok(None) => return Err(Ok(None)),
                Err(e) => return Err(Err(e.into())),
            },
        };
        Ok(held.attach(data))
    }
}

/// What the rules see of a record, for `caller`.
pub(super) fn view(rec: &Stored, caller: &Identity) -> RecordView {
    RecordView {
        owned_by_caller: rec.owner == *caller,
        access: rec.access,
        version: rec.version,
        size: rec.size,
    }
}

impl ClusterStore {
    /// One attempt at a request that names `ptr`. `remembered`: a write may be
    /// decided on the record's last seen state (see `states`) instead of a load.
    pub(super) async fn attempt(
        &self,
        caller: &Caller,
        ptr: Pointer,
        request: &Request,
        transfer_to: Option<&Identity>,
        remembered: bool,
        turn: &mut Turn<'_>,
    ) -> Attempt {
        let me = caller.identity;
        let is_write = matches!(
            request,
            Request::Replace { .. } | Request::ReplaceIf { .. } | Request::WriteAt { .. }
        );
        let remembered_asked = remembered;
        let remembered = if remembered && is_write {
            lock(&self.states).get(ptr)
        } else {
            None
        };
        if let Some(rec) = remembered
            && let Decision::Write(w) =
                rules::decide(request, Some(&view(&rec, &me)), &me, transfer_to, &self.cfg)
        {
            // The commit checks the revision: a stale state fails it, and the next
            // attempt loads. Any other decision is taken again on a fresh load.
            // Boxed, as every change below: every request's future holds room for
            // the largest branch it may take, and a write's (1.9 KB) made a READ's
            // future 3.7 KB instead of 2.2 (READs +4.5% and REPLACEs +9% at
            // pipeline 16; docs/BENCHMARKS.md, "A READ's future").
            let done = Box::pin(self.write(ptr, &rec, w, request, turn)).await;
            let counter = match &done {
                Ok(Some(_)) => &self.cache_hits,
                Ok(None) => &self.cache_stale,
                Err(_) => return done,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            return done;
        }
        if remembered_asked && is_write {
            self.cache_misses.fetch_add(1, Ordering::Relaxed);
        }
        let range = match request {
            Request::Read { range: None, .. } => Some((0, redis_io::WHOLE)),
            Request::Read {
                range: Some((off, n)),
                ..
            } => Some((*off, *n as u64)),
            Request::Watch { options, .. } if options.data => Some((0, redis_io::WHOLE)),
            _ => None,
        };
        // A small record held by the read cache, shown current by a barrier: no load
        // (`reads`). Its state is remembered already (the fill was a load).
        let cached = match &self.reads {
            Some(cache) => cache.get(ptr, range).await,
            None => None,
        };
        let (loaded, held) = match cached {
            Some(rec) => (Some(rec), None),
            None => {
                let (loaded, held) = match self.load_for(caller, ptr, request, range).await {
                    Ok(got) => got,
                    Err(ends) => return ends,
                };
                if let Some(rec) = &loaded {
                    lock(&self.states).seen(ptr, rec);
                }
                (loaded, held)
            }
        };
        let Some(rec) = loaded else {
            lock(&self.states).forget(ptr);
            return Ok(Some(Outcome {
                applied: Applied::missing(),
                watch: WatchChange::None,
            }));
        };
        match rules::decide(request, Some(&view(&rec, &me)), &me, transfer_to, &self.cfg) {
            Decision::Missing => unreachable!("the record exists"),
            Decision::Answer(r) => done(r),
            Decision::Info(i) => done(Reply::Info(i)),
            Decision::Read { start, end } => {
                match self
                    .reply_bytes(caller, ptr, &rec, held, (start, end))
                    .await
                {
                    Ok(data) => done(Reply::Data(data)),
                    Err(ends) => ends,
                }
            }
            Decision::Write(w) => Box::pin(self.write(ptr, &rec, w, request, turn)).await,
            Decision::SetAccess(access) => {
                let rev = rec.rev + 1;
                let change = Change {
                    expected: Some(rec.rev),
                    event: Some(
                        EventInfo::new(Event::AccessChanged, rec.version, rev, rec.owner, access)
                            .encode(),
                    ),
                    set: vec![
                        ("r", rev.to_string().into_bytes()),
                        Stored {
                            access,
                            ..rec.clone()
                        }
                        .state_field(),
                    ],
                    del: rec.legacy_fields().to_vec(),
                    op: self.op_id(),
                    ..Change::default()
                };
                Box::pin(self.commit_or_retry(ptr, change, Reply::Done)).await
            }
            // Boxed, as the writes above: every request's future holds room for the
            // largest branch it may take.
            Decision::Delete => match Box::pin(self.delete(ptr, &rec, turn)).await? {
                Committed::Yes => done(Reply::Done),
                Committed::Unknown => done(outcome_unknown()),
                Committed::Changed(_) | Committed::Fenced => Ok(None),
            },
            Decision::TakeOver => Box::pin(self.change_owner(ptr, &rec, me, true, turn)).await,
            Decision::Transfer(to) => Box::pin(self.change_owner(ptr, &rec, to, false, turn)).await,
            Decision::Watch(state) => {
                if let Err(r) =
                    rules::admit_watch(caller.watching, caller.watch_xid.is_some(), &self.cfg)
                {
                    return done(r);
                }
                let data = matches!(request, Request::Watch { options, .. } if options.data);
                // A data watch starts from the whole value at the revision it is
                // registered on, in a reply like a READ's.
                let bytes = if data {
                    match self
                        .reply_bytes(caller, ptr, &rec, held, (0, rec.size))
                        .await
                    {
                        Ok(bytes) => bytes,
                        Err(ends) => return ends,
                    }
                } else {
                    bytes::Bytes::new()
                };
                self.register_watch(ptr, caller.conn, caller.xid, data, &rec);
                let reply = match state {
                    Some(info) => Reply::Watching(info, bytes),
                    None => Reply::Done,
                };
                Ok(Some(Outcome {
                    applied: reply.into(),
                    watch: WatchChange::Added(ptr, caller.xid),
                }))
            }
            Decision::Unwatch => {
                if caller.watch_xid.is_none() {
                    return done(rules::no_such_watch());
                }
                self.unregister_watch(ptr, caller.conn);
                Ok(Some(Outcome {
                    applied: Reply::Done.into(),
                    watch: WatchChange::Removed(ptr),
                }))
            }
        }
    }

    async fn commit_or_retry(&self, ptr: Pointer, change: Change, reply: Reply) -> Attempt {
        match self.commit(ptr, &change).await? {
            Committed::Yes => done(reply),
            Committed::Unknown => done(outcome_unknown()),
            Committed::Changed(_) | Committed::Fenced => Ok(None),
        }
    }

    /// REPLACE, REPLACE_IF, WRITE_AT: growth is charged to whoever pays for the
    /// record (reserve, commit, settle); shrinking gives back after the commit.
    /// `turn` is moved to the payer's primary for its quota, and back.
    async fn write(
        &self,
        ptr: Pointer,
        rec: &Stored,
        w: Write,
        request: &Request,
        turn: &mut Turn<'_>,
    ) -> Attempt {
        let data = match request {
            Request::Replace { data, .. }
            | Request::ReplaceIf { data, .. }
            | Request::WriteAt { data, .. } => data.clone(),
            _ => unreachable!("only writes decide a write"),
        };
        let payer = rec.payer();
        let rev = rec.rev + 1;
        let mut change = Change {
            expected: Some(rec.rev),
            event: Some(
                EventInfo::new(Event::Changed, w.new_version, rev, rec.owner, rec.access).encode(),
            ),
            data: match w.kind {
                WriteKind::Replace => DataOp::Set(data),
                WriteKind::At(off) => DataOp::Range(off, data),
            },
            set: vec![
                ("r", rev.to_string().into_bytes()),
                Stored {
                    version: w.new_version,
                    ..rec.clone()
                }
                .state_field(),
            ],
            del: rec.legacy_fields().to_vec(),
            op: self.op_id(),
            new_size: Some(w.new_size),
            inline: rec.inline,
            ..Change::default()
        };
        let mut pending = None;
        if w.bytes_delta != 0 {
            turn.move_to(keys::identity_slot(&payer)).await;
            let op = self.op_id();
            let now = self.now_ms();
            let deadline = now + redis_io::ms(FENCE);
            let amount = Usage {
                records: 0,
                bytes: w.bytes_delta.unsigned_abs(),
            };
            // Boxed (writes that change a record's size are the rarer ones).
            let noted = if w.bytes_delta > 0 {
                Box::pin(self.quota.reserve(
                    &self.redis(),
                    &self.cfg,
                    &payer,
                    &op,
                    ptr,
                    amount,
                    deadline,
                    false,
                    now,
                ))
                .await
            } else {
                Box::pin(
                    self.quota
                        .note_release(&self.redis(), &payer, &op, ptr, amount, deadline),
                )
                .await
            };
            match noted {
                Ok(()) => {}
                Err(super::QuotaError::Exceeded(kind)) => return done(kind.reply(&self.cfg)),
                Err(super::QuotaError::Redis(e)) => return Err(e.into()),
            }
            change.fence = deadline;
            change.op = op.clone();
            change.mark = true;
            pending = Some(op);
            turn.move_to(keys::record_slot(ptr)).await;
        }
        let committed = self.commit_placing(ptr, &change).await;
        let in_hash = matches!(committed, Ok((_, true)));
        let committed = committed.map(|(c, _)| c);
        if pending.is_some() && matches!(committed, Ok(Committed::Yes)) {
            super::crash_point("resize-after-commit");
        }
        if let Some(op) = pending {
            match &committed {
                // Unknown outcome: the repair pass settles it from the marker.
                Err(_) | Ok(Committed::Unknown) => {}
                Ok(c) => self.settle_later(ptr, op, vec![payer], *c == Committed::Yes),
            }
        }
        match committed? {
            Committed::Yes => {
                lock(&self.states).seen(
                    ptr,
                    &Stored {
                        rev,
                        version: w.new_version,
                        size: w.new_size,
                        data: None,
                        // Where the script put the bytes (`scripts::COMMIT`).
                        inline: in_hash
                            || (w.new_size <= scripts::IN_HASH as u64
                                && (rec.inline || matches!(w.kind, WriteKind::Replace))),
                        legacy: false,
                        ..rec.clone()
                    },
                );
                done(Reply::Written(w.new_version))
            }
            Committed::Unknown => done(outcome_unknown()),
            Committed::Changed(_) | Committed::Fenced => Ok(None),
        }
    }

    /// Deletes a record (DELETE, or the reaper): the payer gets its charge back, the
    /// watchers a "deleted" event. `turn` is moved to the payer's primary, and back.
    pub(super) async fn delete(
        &self,
        ptr: Pointer,
        rec: &Stored,
        turn: &mut Turn<'_>,
    ) -> Result<Committed, AttemptError> {
        let payer = rec.payer();
        turn.move_to(keys::identity_slot(&payer)).await;
        let op = self.op_id();
        let now = self.now_ms();
        let deadline = now + redis_io::ms(FENCE);
        let back = Usage {
            records: 1,
            bytes: rec.size,
        };
        self.quota
            .note_release(&self.redis(), &payer, &op, ptr, back, deadline)
            .await?;
        let change = Change {
            expected: Some(rec.rev),
            fence: deadline,
            op: op.clone(),
            mark: true,
            data: DataOp::DeleteRecord,
            // Bytes in the hash: no data key to delete (nor to declare).
            inline: rec.inline,
            event: Some(
                EventInfo::new(
                    Event::Deleted,
                    rec.version,
                    rec.rev + 1,
                    rec.owner,
                    rec.access,
                )
                .encode(),
            ),
            ..Change::default()
        };
        turn.move_to(keys::record_slot(ptr)).await;
        let committed = self.commit(ptr, &change).await;
        if matches!(committed, Ok(Committed::Yes)) {
            super::crash_point("delete-after-commit");
        }
        match &committed {
            Err(_) | Ok(Committed::Unknown) => {}
            Ok(c) => self.settle_later(ptr, op, vec![payer], *c == Committed::Yes),
        }
        if matches!(committed, Ok(Committed::Yes)) {
            // The indexes may keep stale entries (the reaper and claims skip those),
            // so they are cleaned up after the reply.
            let owner = self.keys.identity(&rec.owner);
            let mut cmds = vec![
                redis::cmd("SREM")
                    .arg(&owner.owned)
                    .arg(ptr.to_string())
                    .take(),
            ];
            if rec.payer.is_some() {
                cmds.push(
                    redis::cmd("SREM")
                        .arg(&owner.parked)
                        .arg(ptr.to_string())
                        .take(),
                );
            }
            self.send_later(owner.owned, cmds);
        }
        Ok(committed?)
    }

    /// TAKEOVER (`takeover`: the caller takes it and pays, the TAKEOVER bit is
    /// cleared) or TRANSFER to `to` (who pays when connected anywhere; else the payer
    /// so far keeps paying and the record gets its own orphan deadline). `turn` is
    /// moved to each primary in turn: the receiver's, the old payer's, the
    /// reaper's schedule's, the record's.
    async fn change_owner(
        &self,
        ptr: Pointer,
        rec: &Stored,
        to: Identity,
        takeover: bool,
        turn: &mut Turn<'_>,
    ) -> Attempt {
        let old_payer = rec.payer();
        let to_slot = keys::identity_slot(&to);
        turn.move_to(to_slot).await;
        let receiver = self.liveness(&to).await?;
        let payer = if takeover {
            Payer::NewOwner
        } else {
            rules::payer_after_transfer(receiver.live)
        };
        let charge = Usage {
            records: 1,
            bytes: rec.size,
        };
        let op = self.op_id();
        let now = receiver.now;
        let deadline = now + redis_io::ms(FENCE);
        let moves = payer == Payer::NewOwner && to != old_payer;
        if moves {
            match self
                .quota
                .reserve(
                    &self.redis(),
                    &self.cfg,
                    &to,
                    &op,
                    ptr,
                    charge,
                    deadline,
                    false,
                    now,
                )
                .await
            {
                Ok(()) => {}
                Err(super::QuotaError::Exceeded(kind)) => return done(kind.reply(&self.cfg)),
                Err(super::QuotaError::Redis(e)) => return Err(e.into()),
            }
            turn.move_to(keys::identity_slot(&old_payer)).await;
            if let Err(e) = self
                .quota
                .note_release(&self.redis(), &old_payer, &op, ptr, charge, deadline)
                .await
            {
                turn.move_to(to_slot).await;
                let _ = self.quota.settle(&self.redis(), &to, &op, false).await;
                return Err(e.into());
            }
        }
        let rev = rec.rev + 1;
        let access = if takeover {
            rec.access - netswap_proto::Access::TAKEOVER
        } else {
            rec.access
        };
        let own_deadline =
            (!takeover && !receiver.live).then(|| now + redis_io::ms(self.cfg.orphan_grace));
        let set = vec![
            ("r", rev.to_string().into_bytes()),
            Stored {
                owner: to,
                payer: match payer {
                    Payer::NewOwner => None,
                    Payer::Unchanged => Some(old_payer),
                },
                access,
                deadline: own_deadline.map(|x| (x, receiver.generation)),
                ..rec.clone()
            }
            .state_field(),
        ];
        let del = rec.legacy_fields().to_vec();
        // Index first, so that the reaper and claims always find the record (and the
        // reaper does not forget the identity while the record is on its way).
        let tk = self.keys.identity(&to);
        turn.move_to(to_slot).await;
        let indexed = redis_io::run(
            &self.redis(),
            &scripts::INDEX_OWNED,
            &[&tk.owned, &tk.parked, &tk.quota],
            &[
                ptr.to_string().as_bytes(),
                if payer == Payer::Unchanged {
                    b"1"
                } else {
                    b"0"
                },
            ],
        )
        .await;
        let generation = match indexed {
            Ok(v) => redis_io::as_int(&v).unwrap_or(0) as u64,
            Err(e) => {
                if moves {
                    self.settle_later(ptr, op, vec![to, old_payer], false);
                }
                return Err(e.into());
            }
        };
        if own_deadline.is_some() && generation != receiver.generation {
            // The deadline would carry a generation the receiver no longer has.
            if moves {
                self.settle_later(ptr, op, vec![to, old_payer], false);
            }
            return Ok(None);
        }
        if let Some(x) = own_deadline {
            turn.move_to(redis_io::slot_of(&self.keys.reap())).await;
            let _: redis::RedisResult<Value> = redis::cmd("ZADD")
                .arg(self.keys.reap())
                .arg(x)
                .arg(keys::reap_record(ptr))
                .query_async(&mut self.redis())
                .await;
        }
        let change = Change {
            expected: Some(rec.rev),
            fence: if moves { deadline } else { 0 },
            op: op.clone(),
            mark: moves,
            event: Some(EventInfo::new(Event::OwnerChanged, rec.version, rev, to, access).encode()),
            set,
            del,
            ..Change::default()
        };
        turn.move_to(keys::record_slot(ptr)).await;
        let committed = self.commit(ptr, &change).await;
        if moves {
            match &committed {
                Err(_) | Ok(Committed::Unknown) => {}
                Ok(c) => {
                    self.settle_later(ptr, op.clone(), vec![to, old_payer], *c == Committed::Yes)
                }
            }
        }
        if matches!(committed, Ok(Committed::Yes)) {
            let old = self.keys.identity(&rec.owner);
            turn.move_to(keys::identity_slot(&rec.owner)).await;
            let mut pipe = redis::pipe();
            pipe.cmd("SREM")
                .arg(&old.owned)
                .arg(ptr.to_string())
                .ignore();
            if rec.payer.is_some() {
                pipe.cmd("SREM")
                    .arg(&old.parked)
                    .arg(ptr.to_string())
                    .ignore();
            }
            let _ = pipe.query_async::<Value>(&mut self.redis()).await;
        }
        match committed? {
            Committed::Yes => done(Reply::Done),
            Committed::Unknown => done(outcome_unknown()),
            Committed::Changed(_) | Committed::Fenced => Ok(None),
        }
    }
}
