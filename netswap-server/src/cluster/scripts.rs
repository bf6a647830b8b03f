//! The few Lua scripts the Redis Cluster backend runs. None of them knows a rule of
//! records: they load state, compare-and-set it, and read Redis's clock. Every
//! decision (who may, what changes, which error, quotas, expiry) is made in Rust by
//! `netswap_proto::rules`, on state loaded first; a script only applies a decided
//! change if the state did not change in between (the revision still matches), and
//! the gateway decides again when it did.

use std::sync::LazyLock;

use redis::Script;

/// Records' bytes up to this size live in their state hash (field `d`), larger ones
/// in their own string key: a load of a small record is one `HMGET`, a commit one
/// `HSET` (docs/ARCHITECTURE.md).
pub(crate) const IN_HASH: usize = 1024;

/// Loads a record atomically: `{rev, state, owner, payer, access, version,
/// deadline, generation, size, data, inline}` or nil (`inline` 1: the bytes are in
/// the state hash). `state` is the packed state (`redis_io::STATE`); a record of
/// the layout of earlier versions has none, and its state in the six fields after
/// it (`redis_io::LEGACY_FIELDS`), which are false otherwise. The fallback of `redis_io::load`, which reads with
/// plain commands (cheaper for Redis) while no write comes in between. `data` is the range `[start, start+len)` (cut at the end) when it is
/// at most `max_inline` bytes and `len >= 0`, else nil (the gateway fetches it
/// separately, after deciding the caller may read it).
///
/// KEYS: meta, data. ARGV: start, len (-1: none), max_inline.
pub(crate) static LOAD: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        r#"
local m = redis.call('HMGET', KEYS[1], 'r', 's', 'o', 'p', 'a', 'v', 'x', 'g', 'd')
if not m[1] then return false end
local inline = m[9]
local size
if inline then size = #inline else size = redis.call('STRLEN', KEYS[2]) end
local d = false
local s = tonumber(ARGV[1])
local n = tonumber(ARGV[2])
if n >= 0 and s <= size then
  local e = s + n
  if e > size then e = size end
  if e <= s then
    d = ''
  elseif inline then
    d = string.sub(inline, s + 1, e)
  elseif e - s <= tonumber(ARGV[3]) then
    d = redis.call('GETRANGE', KEYS[2], s, e - 1)
  end
end
return {m[1], m[2] or false, m[3] or false, m[4] or false, m[5] or false, m[6] or false, m[7] or false, m[8] or false, size, d, inline and 1 or 0}
"#,
    )
});

/// Applies a decided change to a record if it is still at the expected revision.
/// Idempotent: the change's operation id is stored with the record (`l`, and for
/// changes that move quota charges a marker field `m:OPID`, removed once the quota
/// entries are settled), so a re-send after a lost reply finds it applied. A delete
/// that leaves a marker leaves the hash as a tombstone holding only its markers
/// (its own and those of earlier changes not settled yet; no `r`: the record does
/// not exist for any load), expiring in 7 days; the last marker's removal removes
/// it, and a create under the same pointer replaces it. Returns `{1}` when applied
/// (now or before), `{0, rev}` when the record
/// changed (or exists, for a create; or is gone: rev nil), `{-1}` when `fence` (ms,
/// Redis time) has passed. A change of an existing record that finds it changed gets
/// the record's state back with the revision (see [`CHANGED`]).
///
/// Events: only a record marked watched (field `w`, set by [`WATCHED`] when a
/// gateway subscribes to its channels) costs the commit a look at its subscribers
/// (`PUBSUB SHARDNUMSUB` on the slot's primary, where gateways subscribe); the event
/// goes to the record's channel while some gateway subscribes to it, and likewise to
/// the channel of events with bytes (data watches): the event, then the `delta head`
/// (the record's new size u64 and the offset u64 of a data change) and the bytes
/// written. When nobody subscribes any more, the commit clears the mark. A gateway
/// subscribes, then marks, then loads the record, so a commit that publishes nothing
/// was before the watch's starting state. Skipping the `SPUBLISH` of an unwatched
/// record saves Redis Cluster a cluster-bus message to each node of the shard per
/// write, and skipping the look at its subscribers one command (docs/BENCHMARKS.md).
///
/// Where the bytes go is decided by the gateway (`redis_io::commit`), by their size
/// and where they are now: bytes up to `IN_HASH` live in the hash's field `d`,
/// larger ones in the data key (except while a slot migrates, below), never both.
///
/// Only the keys the commit uses are declared, so that a commit in a slot being
/// migrated to another primary is not refused for a key that does not exist
/// (`TRYAGAIN`: Redis refuses a command with several keys there unless all of them
/// exist on the node): the data key only when the bytes are (or go) there; the
/// marker is a field of the state hash, not a key of its own, and the channels are
/// not keys (a script may publish on a channel of its keys' slot).
///
/// A commit that makes the data key (a create whose bytes go there, bytes growing
/// out of the hash) does not declare it either, and names it in ARGV instead: a
/// slot's importing node answers `TRYAGAIN` to a command that declares several keys
/// not all there, for the whole move; a script may write an undeclared key of its
/// keys' slot on a node that serves it (the importing node, after `ASKING`). That
/// `SET` is the script's first write, so if the node does not serve the new key (the
/// old node of a slot migrating away, where the record's state hash still is) it
/// fails before anything else is written, and the gateway sends the commit again
/// with the bytes kept in the hash (`redis_io::commit`): bytes in the hash may then
/// be over `IN_HASH` until a later write moves them out.
///
/// KEYS: meta, then the data key if the data op uses it. ARGV: expected rev ('' =
/// must not exist), fence (0 = none), op id, data op, mark ('1': leave the marker
/// field), offset, bytes, event payload ('' = none),
/// delta head ('' = not a data change), n, the data key a commit makes without
/// declaring it ('' = none), claim ([`CLAIM`]; '' = none), n field/value pairs to
/// set, then the fields to delete.
/// (The channels are made from `KEYS[1]`, see [`PUBLISH`].) Data ops: `n`
/// none; `x` delete the record (and its data key, if given); `h` bytes into the
/// hash; `H` the same, and delete the data key (they move in); `s` set the data
/// key; `r` set a range of the data key; `R` set a range of the bytes in the hash
/// (moved to the data key if they grow past `IN_HASH` and the data key is named).
pub(crate) static COMMIT: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        &r#"--[[PUBLISH]]
--[[CHANGED]]
--[[CLAIM]]
local marker = false
if ARGV[5] == '1' then marker = 'm:' .. ARGV[3] end
local lrw = redis.call('HMGET', KEYS[1], 'l', 'r', 'w', marker or 'l', 'c')
if lrw[1] == ARGV[3] then return {1} end
if marker and lrw[4] then return {1} end
local dk = KEYS[2] or false
local undeclared = not dk and ARGV[11] ~= ''
if undeclared then dk = ARGV[11] end
local cur = lrw[2]
if ARGV[1] == '' then
  if cur then return {0, cur} end
elseif cur ~= ARGV[1] then
  if cur then claim(ARGV[12], lrw[5]) end
  return changed(cur)
elseif yields(lrw[5], ARGV[12]) then
  return changed(cur)
end
if ARGV[2] ~= '0' then
  local t = redis.call('TIME')
  if tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) > tonumber(ARGV[2]) then return {-1} end
end
local op = ARGV[4]
-- First, so that a node that does not serve the undeclared key fails before any write.
if undeclared and op == 's' then redis.call('SET', dk, ARGV[7]) end
-- A deleted record's tombstone (its markers only, see 'x') under the same pointer.
if ARGV[1] == '' and redis.call('EXISTS', KEYS[1]) == 1 then redis.call('DEL', KEYS[1]) end
local last = 12 + 2 * tonumber(ARGV[10])
if op == 'x' then
  if dk then redis.call('DEL', dk) end
  if marker then
    -- The tombstone: every field but the markers (this one, and those of earlier
    -- changes not settled yet) goes.
    local gone = {}
    for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do
      if string.sub(f, 1, 2) ~= 'm:' then gone[#gone + 1] = f end
    end
    redis.call('HDEL', KEYS[1], unpack(gone))
    redis.call('HSET', KEYS[1], marker, '1')
    redis.call('EXPIRE', KEYS[1], 604800)
  else
    redis.call('DEL', KEYS[1])
  end
else
  if op == 'h' or op == 'H' then
    if op == 'H' then redis.call('DEL', dk) end
    redis.call('HSET', KEYS[1], 'l', ARGV[3], 'd', ARGV[7], unpack(ARGV, 13, last))
  elseif op == 'R' then
    local b = redis.call('HGET', KEYS[1], 'd') or ''
    local off = tonumber(ARGV[6])
    if off > #b then b = b .. string.rep('\0', off - #b) end
    b = string.sub(b, 1, off) .. ARGV[7] .. string.sub(b, off + #ARGV[7] + 1)
    if #b <= IN_HASH or not dk then
      redis.call('HSET', KEYS[1], 'l', ARGV[3], 'd', b, unpack(ARGV, 13, last))
    else
      redis.call('SET', dk, b)
      redis.call('HDEL', KEYS[1], 'd')
      redis.call('HSET', KEYS[1], 'l', ARGV[3], unpack(ARGV, 13, last))
    end
  else
    if op == 's' then
      if not undeclared then redis.call('SET', dk, ARGV[7]) end
    elseif op == 'r' then
      redis.call('SETRANGE', dk, tonumber(ARGV[6]), ARGV[7])
    end
    redis.call('HSET', KEYS[1], 'l', ARGV[3], unpack(ARGV, 13, last))
  end
  if #ARGV > last then redis.call('HDEL', KEYS[1], unpack(ARGV, last + 1)) end
end
if marker and op ~= 'x' then redis.call('HSET', KEYS[1], marker, '1') end
if lrw[5] and op ~= 'x' then redis.call('HDEL', KEYS[1], 'c', 'cn') end
if lrw[3] and ARGV[8] ~= '' then publish(ARGV[8], ARGV[9], ARGV[7], op ~= 'x') end
return {1}
"#
        .replace("IN_HASH", &IN_HASH.to_string())
        .replace("--[[PUBLISH]]", PUBLISH)
        .replace("--[[CHANGED]]", CHANGED)
        .replace("--[[CLAIM]]", &CLAIM),
    )
});

/// The events of a commit to a record marked watched (see [`COMMIT`]), as a Lua
/// function both commit scripts define: `publish(event, delta head, bytes, keep)`
/// sends the event to the record's channel while some gateway subscribes to it, and
/// to the channel of events with bytes the event, the delta head and the bytes
/// written (the event alone when the head is empty: not a data change); when nobody
/// subscribes any more it clears the mark (unless `keep` is false: the record is
/// gone). The channels are the state hash's key with `e` and `E` for its last `m`
/// (`keys::RecordKeys`), made here so that commits of records nobody watches do not
/// carry them.
///
/// One function: a script defines its functions anew on every call, and each costs
/// Redis a closure (`COMMIT_GROUP` has its own, [`PUBLISH_ALL`]).
const PUBLISH: &str = r#"
local function publish(event, head, bytes, keep)
  local base = string.sub(KEYS[1], 1, -2)
  local e, de = base .. 'e', base .. 'E'
  local subs = redis.call('PUBSUB', 'SHARDNUMSUB', e, de)
  if subs[2] > 0 then redis.call('SPUBLISH', e, event) end
  if subs[4] > 0 then
    if head ~= '' then
      redis.call('SPUBLISH', de, event .. head .. bytes)
    else
      redis.call('SPUBLISH', de, event)
    end
  end
  if subs[2] == 0 and subs[4] == 0 and keep then redis.call('HDEL', KEYS[1], 'w') end
end
"#;

/// [`PUBLISH`] for the writes of a group (`COMMIT_GROUP`): `publish_all(first,
/// last)` sends the events of the ARGV quadruples (event, delta head, bytes, offset)
/// from `first` to `last` in order, on one look at the subscribers.
const PUBLISH_ALL: &str = r#"
local function publish_all(first, last)
  local base = string.sub(KEYS[1], 1, -2)
  local e, de = base .. 'e', base .. 'E'
  local subs = redis.call('PUBSUB', 'SHARDNUMSUB', e, de)
  if subs[2] == 0 and subs[4] == 0 then redis.call('HDEL', KEYS[1], 'w') end
  for at = first, last, 4 do
    if subs[2] > 0 then redis.call('SPUBLISH', e, ARGV[at]) end
    if subs[4] > 0 then redis.call('SPUBLISH', de, ARGV[at] .. ARGV[at + 1] .. ARGV[at + 2]) end
  end
end
"#;

/// What both commit scripts answer when the record they change has changed since
/// it was loaded: `changed(rev)` is `{0, rev, packed state, size, in hash ('1'/'0')}`,
/// one consistent state of the record, so that the gateway decides again on it and
/// commits at once, in one round trip like the write that won (a write decided again
/// on a fresh load took two, and lost again to writers that took one: writers of one
/// record through other gateways got BUSY, docs/ARCHITECTURE.md). Only `{0, rev}` when
/// the size cannot be read (the bytes are in a data key the script did not declare),
/// or the record has the layout of earlier versions; `{0, false}` when it is gone.
const CHANGED: &str = r#"
local function changed(rev)
  if not rev then return {0, false} end
  local sd = redis.call('HMGET', KEYS[1], 's', 'd')
  if not sd[1] then return {0, rev} end
  if sd[2] then return {0, rev, sd[1], #sd[2], '1'} end
  if KEYS[2] then return {0, rev, sd[1], redis.call('STRLEN', KEYS[2]), '0'} end
  return {0, rev}
end
"#;

/// Claims, so that writers of one record through several gateways all get in. Each
/// gateway makes one change of a record at a time (`serial`), decided on the state
/// the last one left, so the gateway whose commit won last sends the next one first
/// and wins again: the others' changes lost race after race and were answered BUSY.
/// A gateway whose changes of a record lost [`CLAIM_AFTER`] races in a row sends its
/// next commit with a claim (its gateway id): if that commit loses too, it leaves the
/// claim on the record (fields `c`, the gateway, and `cn`), and until the claimant's
/// next commit of the record clears it, other gateways' commits `yield`: they apply
/// nothing and get the record's state back, as if they had lost. A claimant that
/// never comes back (it died, or its request was decided otherwise) costs others at
/// most [`CLAIM_YIELDS`] commits in all: then the claim is gone. `claim(token, held)`
/// leaves a claim unless there is one; `yields(held, token)` tells a commit whether it
/// must give way.
pub(crate) static CLAIM: LazyLock<String> = LazyLock::new(|| {
    format!(
        r#"
local function claim(token, held)
  if token ~= '' and not held then redis.call('HSET', KEYS[1], 'c', token, 'cn', {CLAIM_YIELDS}) end
end
local function yields(held, token)
  if not held or held == token then return false end
  if redis.call('HINCRBY', KEYS[1], 'cn', -1) <= 0 then redis.call('HDEL', KEYS[1], 'c', 'cn') end
  return true
end
"#
    )
});

/// Races in a row a gateway's changes of one record lose before its next commit
/// claims the record ([`CLAIM`]).
pub(crate) const CLAIM_AFTER: u32 = 3;

/// Commits of other gateways that give way to one claim at most ([`CLAIM`]).
pub(crate) const CLAIM_YIELDS: u32 = 32;

/// The start of [`COMMIT_BYTES`] and [`COMMIT_GROUP`]: reads the record's `l`, `r`,
/// `w` and `c` into `m`, and returns `{1}` if the commit was applied already (its
/// operation id, `ARGV[2]`), or the record's state (`CHANGED`) if it is not at the
/// expected revision (`ARGV[1]`) or gives way to a claim (`CLAIM`; the commit's own
/// in the argument `claim_arg`). `publish`: the Lua functions for its events.
fn lean_check(claim_arg: usize, publish: &str) -> String {
    let claim = &*CLAIM;
    format!(
        r#"{publish}{CHANGED}{claim}
local m = redis.call('HMGET', KEYS[1], 'l', 'r', 'w', 'c')
if m[1] == ARGV[2] then return {{1}} end
if m[2] ~= ARGV[1] then
  if m[2] then claim(ARGV[{claim_arg}], m[4]) end
  return changed(m[2])
end
if yields(m[4], ARGV[{claim_arg}]) then return changed(m[2]) end"#
    )
}

/// The commit of most writes, cheaper for Redis than [`COMMIT`]: new bytes (at most
/// `IN_HASH`) for an existing record whose bytes are in its state hash, with no
/// fence, no quota marker and no field deleted (a REPLACE or REPLACE_IF of a small
/// record that keeps its size). The same compare-and-set and idempotence as
/// [`COMMIT`]'s, and the same events, with 6 fewer arguments and none of its
/// branches: 9.5 against 11.7 us of Redis per call under a REPLACE load
/// (docs/BENCHMARKS.md, "A lean commit for the common write").
/// Returns what [`COMMIT`] returns (`{1}`, `{0, rev, …}`).
///
/// KEYS: meta. ARGV: expected rev, op id, bytes, event payload ('' = none), delta
/// head ('' = not a data change), claim ([`CLAIM`]; '' = none), then field/value
/// pairs to set.
pub(crate) static COMMIT_BYTES: LazyLock<Lua> = LazyLock::new(|| {
    let check = lean_check(6, PUBLISH);
    Lua::new(&format!(
        r#"{check}
redis.call('HSET', KEYS[1], 'l', ARGV[2], 'd', ARGV[3], unpack(ARGV, 7))
if m[4] then redis.call('HDEL', KEYS[1], 'c', 'cn') end
if m[3] and ARGV[4] ~= '' then publish(ARGV[4], ARGV[5], ARGV[3], true) end
return {{1}}
"#
    ))
});

/// Several writes of one record in one commit (`group`): [`COMMIT_BYTES`] for n
/// writes that keep the size of a record whose bytes are in its state hash, decided
/// one after the other on the expected revision, each with its own event, sent in
/// order. All or none: the same compare-and-set, idempotence and claims as
/// [`COMMIT_BYTES`]. The record's bytes are those of the writes applied in order (a
/// REPLACE's replace them, a WRITE_AT's are written at its offset; the record's own
/// are read only when the first write is a WRITE_AT), and the fields set say the
/// state after the last.
/// Returns what [`COMMIT`] returns (`{1}`, `{0, rev, …}`).
///
/// KEYS: meta. ARGV: expected rev, op id, claim ([`CLAIM`]; '' = none), n, then n
/// quadruples (event payload, delta head, bytes, offset: '' for a REPLACE), then
/// field/value pairs to set.
pub(crate) static COMMIT_GROUP: LazyLock<Lua> = LazyLock::new(|| {
    let check = lean_check(3, PUBLISH_ALL);
    Lua::new(&format!(
        r#"{check}
local fields = 5 + 4 * tonumber(ARGV[4])
local b
for at = 5, fields - 4, 4 do
  if ARGV[at + 3] == '' then
    b = ARGV[at + 2]
  else
    if not b then b = redis.call('HGET', KEYS[1], 'd') or '' end
    local off = tonumber(ARGV[at + 3])
    b = string.sub(b, 1, off) .. ARGV[at + 2] .. string.sub(b, off + #ARGV[at + 2] + 1)
  end
end
redis.call('HSET', KEYS[1], 'l', ARGV[2], 'd', b, unpack(ARGV, fields))
if m[4] then redis.call('HDEL', KEYS[1], 'c', 'cn') end
if m[3] then publish_all(5, fields - 4) end
return {{1}}
"#
    ))
});

/// Marks a record watched (field `w`, see [`COMMIT`]) if it exists; called after
/// the gateway's subscription to its channels is confirmed and before the record is
/// loaded for the watch.
///
/// KEYS: meta.
pub(crate) static WATCHED: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        r#"
local rw = redis.call('HMGET', KEYS[1], 'r', 'w')
if rw[1] and not rw[2] then redis.call('HSET', KEYS[1], 'w', '1') end
return 1
"#,
    )
});

/// Compare-and-set on a hash with a revision field `r`: sets and deletes fields if
/// `r` is still `expected` ('' = absent), and sets `r` to `next`. Returns `{1}`, or
/// `{0, HGETALL}` when it changed (so the caller can decide again at once).
///
/// KEYS: the hash. ARGV: expected, next, n, n pairs, k, k fields.
pub(crate) static CAS: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        r#"
local cur = redis.call('HGET', KEYS[1], 'r') or ''
if cur ~= ARGV[1] then return {0, redis.call('HGETALL', KEYS[1])} end
local n = tonumber(ARGV[3])
local i = 4
for j = 1, n do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  i = i + 2
end
local k = tonumber(ARGV[i])
for j = 1, k do
  redis.call('HDEL', KEYS[1], ARGV[i + j])
end
redis.call('HSET', KEYS[1], 'r', ARGV[2])
return {1}
"#,
    )
});

/// Redis's clock, in milliseconds.
const NOW: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"#;

/// Takes or renews a gateway's lease on an identity: `{now, generation, lapsed}`. A
/// new lease (`ARGV[3] == '1'`) raises the identity's generation (a connect voids
/// deadlines set before it) to Redis's time in ms, or one more than it was if that is
/// later: so it never repeats, even after [`FORGET_IDENTITY`] deleted the hash that
/// held it. A renewal (`'0'`) that finds this gateway's lease run out (its entry
/// expired, or gone with the identity's forgotten hash: the gateway was paused or cut
/// off from the cluster for longer than the TTL) is `lapsed` (1): for every other
/// gateway the identity was offline meanwhile, so it counts as a new lease, and the
/// gateway claims what was handed to the identity then.
///
/// KEYS: leases, quota hash. ARGV: gateway, ttl ms, new ('1'/'0').
pub(crate) static LEASE: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(&format!(
        r#"{NOW}
local lapsed = 0
if ARGV[3] ~= '1' then
  local held = redis.call('ZSCORE', KEYS[1], ARGV[1])
  if not held or tonumber(held) <= now then lapsed = 1 end
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
local g
if ARGV[3] == '1' or lapsed == 1 then
  g = math.max(now, tonumber(redis.call('HGET', KEYS[2], 'g') or '0') + 1)
  redis.call('HSET', KEYS[2], 'g', g)
else
  g = tonumber(redis.call('HGET', KEYS[2], 'g') or '0')
end
return {{now, g, lapsed}}
"#
    ))
});

/// Gives up a gateway's lease on an identity; when no live lease remains, notes the
/// time it went offline. Returns `{live leases left, now}`.
///
/// KEYS: leases, quota hash. ARGV: gateway.
pub(crate) static RELEASE: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(&format!(
        r#"{NOW}
redis.call('ZREM', KEYS[1], ARGV[1])
local live = redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')
if live == 0 then redis.call('HSET', KEYS[2], 'off', now) end
return {{live, now}}
"#
    ))
});

/// What the reaper needs to know about an identity:
/// `{live leases, latest lease expiry or false, offline since or false, generation, now}`.
///
/// KEYS: leases, quota hash.
pub(crate) static LIVENESS: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(&format!(
        r#"{NOW}
local live = redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')
local last = redis.call('ZRANGE', KEYS[1], 0, 0, 'REV', 'WITHSCORES')
local off = redis.call('HGET', KEYS[2], 'off')
local g = redis.call('HGET', KEYS[2], 'g') or '0'
return {{live, last[2] or false, off or false, g, now}}
"#
    ))
});

/// Deletes what an identity leaves in Redis once nothing of it is left: no live lease,
/// no records charged (`n`, `b` zero or absent) or pending (`p:` markers), nothing in
/// its indexes of owned and parked records. Its generation goes with it ([`LEASE`]
/// keeps generations from repeating). Without this, every identity ever seen kept
/// its quota hash (`g`, `off`) for good: identities made up by the thousand grew the
/// cluster. Returns 1 when deleted.
///
/// KEYS: leases, quota hash, owned, parked.
pub(crate) static FORGET_IDENTITY: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(&format!(
        r#"{NOW}
if redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf') > 0 then return 0 end
if redis.call('SCARD', KEYS[3]) > 0 or redis.call('SCARD', KEYS[4]) > 0 then return 0 end
local f = redis.call('HGETALL', KEYS[2])
for i = 1, #f, 2 do
  local k, v = f[i], f[i + 1]
  if k == 'n' or k == 'b' then
    if v ~= '0' then return 0 end
  elseif k ~= 'g' and k ~= 'off' and k ~= 'r' then
    return 0
  end
end
redis.call('DEL', KEYS[1], KEYS[2])
return 1
"#
    ))
});

/// Indexes a record as owned (and, with `ARGV[2] == '1'`, parked) by an identity,
/// and returns the identity's generation now: a change of owner that read another
/// one decides again (the identity connected, or was forgotten, in between).
///
/// KEYS: owned, parked, quota hash. ARGV: pointer, parked ('1'/'0').
pub(crate) static INDEX_OWNED: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        r#"
redis.call('SADD', KEYS[1], ARGV[1])
if ARGV[2] == '1' then redis.call('SADD', KEYS[2], ARGV[1]) end
return tonumber(redis.call('HGET', KEYS[3], 'g') or '0')
"#,
    )
});

/// Redis's clock: `now` in ms.
pub(crate) static TIME: LazyLock<Lua> = LazyLock::new(|| Lua::new(&format!("{NOW}\nreturn now")));

/// Every script a gateway runs, for loading them on a primary before they are needed
/// (`redis_io::load_scripts`).
pub(crate) fn all() -> [&'static Lua; 12] {
    [
        &*LOAD,
        &*COMMIT,
        &*COMMIT_BYTES,
        &*COMMIT_GROUP,
        &*WATCHED,
        &*CAS,
        &*LEASE,
        &*RELEASE,
        &*LIVENESS,
        &*TIME,
        &*FORGET_IDENTITY,
        &*INDEX_OWNED,
    ]
}

/// A script with its source, which `SCRIPT LOAD` on one node needs (a [`Script`]
/// keeps it to itself); used as the [`Script`] it is otherwise.
pub(crate) struct Lua {
    script: Script,
    source: String,
}

impl Lua {
    fn new(source: &str) -> Lua {
        Lua {
            script: Script::new(source),
            source: source.to_string(),
        }
    }

    /// The script's text.
    pub fn source(&self) -> &str {
        &self.source
    }
}

impl std::ops::Deref for Lua {
    type Target = Script;

    fn deref(&self) -> &Script {
        &self.script
    }
}
