//! Talking to Redis Cluster: the connection, typed loads and commits of records,
//! and errors turned into BUSY replies. Slot routing, pipelining, topology changes and
//! reconnects are the `redis` crate's (`cluster-async`).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use netswap_proto::{Access, Identity, Reply, Status, Version};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{ErrorKind, RedisError, RedisResult, Script, ServerErrorKind, Value};

use super::Replaceable;
use super::batch::Batcher;
use super::keys::RecordKeys;
use super::scripts;

/// A record as stored in Redis.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Stored {
    /// Revision: +1 on every committed change (the compare-and-set token).
    pub rev: u64,
    pub owner: Identity,
    /// `None`: the owner pays.
    pub payer: Option<Identity>,
    pub access: Access,
    pub version: Version,
    /// Its own orphan deadline (ms) and its owner's generation then.
    pub deadline: Option<(u64, u64)>,
    pub size: u64,
    /// The bytes asked for, when they were small enough to come with the load.
    pub data: Option<Bytes>,
    /// The bytes are in the state hash (field `d`), not in the data key.
    pub inline: bool,
    /// Stored by a gateway of an earlier version: the state in the fields
    /// [`LEGACY_FIELDS`] instead of `s`; the next commit converts it.
    pub legacy: bool,
}

impl Stored {
    /// Who pays for the record.
    pub fn payer(&self) -> Identity {
        self.payer.unwrap_or(self.owner)
    }

    /// The field `s` for this state (see [`pack_state`]), to set in a commit.
    pub fn state_field(&self) -> (&'static str, Vec<u8>) {
        (
            STATE,
            pack_state(
                &self.owner,
                self.payer.as_ref(),
                self.access,
                self.version,
                self.deadline,
            ),
        )
    }

    /// The fields a commit deletes to convert a record of the earlier layout (none
    /// for one in the current layout).
    pub fn legacy_fields(&self) -> &'static [&'static str] {
        if self.legacy { &LEGACY_FIELDS } else { &[] }
    }
}

/// The field of a record's state hash that holds everything the rules decide on but
/// the revision (`r`, which scripts compare): owner, payer, access bits, version and
/// its own orphan deadline, packed by [`pack_state`]. One field instead of six: a
/// load's `HMGET` returns 4 values instead of 9, and the `redis` crate's reply parser
/// (an allocation and a parse per value) was the gateway's largest cost per READ
/// (docs/BENCHMARKS.md).
pub(crate) const STATE: &str = "s";

/// The state's fields in the layout of earlier versions (one each; no `s`).
pub(crate) const LEGACY_FIELDS: [&str; 6] = ["o", "p", "a", "v", "x", "g"];

/// Format byte of a packed state.
const STATE_FORMAT: u8 = 1;
/// Flags of a packed state: a payer follows the owner; a deadline follows.
const HAS_PAYER: u8 = 1;
const HAS_DEADLINE: u8 = 2;

/// A record's state as the field `s`: format `1`, flags (1: payer, 2: deadline),
/// access bits, version (u64, big-endian), owner (32 bytes), then the payer (32
/// bytes) and the deadline and generation (two u64) when the flags say so. 43 to 91
/// bytes.
pub(crate) fn pack_state(
    owner: &Identity,
    payer: Option<&Identity>,
    access: Access,
    version: Version,
    deadline: Option<(u64, u64)>,
) -> Vec<u8> {
    let mut b = Vec::with_capacity(91);
    let flags = if payer.is_some() { HAS_PAYER } else { 0 }
        | if deadline.is_some() { HAS_DEADLINE } else { 0 };
    b.extend_from_slice(&[STATE_FORMAT, flags, access.bits()]);
    b.extend_from_slice(&version.to_be_bytes());
    b.extend_from_slice(&owner.0);
    if let Some(p) = payer {
        b.extend_from_slice(&p.0);
    }
    if let Some((x, g)) = deadline {
        b.extend_from_slice(&x.to_be_bytes());
        b.extend_from_slice(&g.to_be_bytes());
    }
    b
}

/// A record's state but its revision: owner, payer, access, version, deadline.
pub(crate) type State = (
    Identity,
    Option<Identity>,
    Access,
    Version,
    Option<(u64, u64)>,
);

/// What [`pack_state`] packed. `None`: not a packed state of this format (wrong
/// length, format or flags).
pub(crate) fn unpack_state(b: &[u8]) -> Option<State> {
    let (&[format, flags, access], rest) = b.split_first_chunk::<3>()?;
    if format != STATE_FORMAT || flags & !(HAS_PAYER | HAS_DEADLINE) != 0 {
        return None;
    }
    let (version, rest) = rest.split_first_chunk::<8>()?;
    let (owner, mut rest) = rest.split_first_chunk::<32>()?;
    let payer = if flags & HAS_PAYER != 0 {
        let (p, r) = rest.split_first_chunk::<32>()?;
        rest = r;
        Some(Identity(*p))
    } else {
        None
    };
    let deadline = if flags & HAS_DEADLINE != 0 {
        let (x, r) = rest.split_first_chunk::<8>()?;
        let (g, r) = r.split_first_chunk::<8>()?;
        rest = r;
        Some((u64::from_be_bytes(*x), u64::from_be_bytes(*g)))
    } else {
        None
    };
    rest.is_empty().then(|| {
        (
            Identity(*owner),
            payer,
            Access::from_bits_truncate(access),
            u64::from_be_bytes(*version),
            deadline,
        )
    })
}

/// How a commit went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Committed {
    Yes,
    /// The record changed (or exists, or is gone) since it was loaded: decide again,
    /// on its state as the commit found it when it came back (`scripts::CHANGED`).
    Changed(Option<Box<Stored>>),
    /// The fence passed: the change was not applied and never will be.
    Fenced,
    /// A reply was lost (a failover) and by the time a re-send got an answer the
    /// record had changed: whether this change was applied cannot be told.
    Unknown,
}

/// What a commit changes (see `scripts::COMMIT`).
#[derive(Clone, Debug, Default)]
pub(crate) struct Change {
    /// Expected revision; `None`: the record must not exist (a create).
    pub expected: Option<u64>,
    /// Redis time (ms) after which the change must not apply (0 = none).
    pub fence: u64,
    /// Event to publish to watchers.
    pub event: Option<Vec<u8>>,
    pub data: DataOp,
    /// The operation id (makes the commit idempotent).
    pub op: String,
    /// Also leave a marker (field `m:OP` of the state hash, kept until the quota
    /// entries are settled), for changes that move quota charges.
    pub mark: bool,
    /// A data change: the record's size afterwards (the channel of events with bytes
    /// carries it with the offset and the bytes).
    pub new_size: Option<u64>,
    pub set: Vec<(&'static str, Vec<u8>)>,
    pub del: Vec<&'static str>,
    /// The record's bytes are in its state hash now, or it is new (see
    /// `scripts::COMMIT`'s data ops).
    pub inline: bool,
    /// Claim the record for this gateway if the commit loses (`scripts::CLAIM`): the
    /// gateway's id.
    pub claim: Option<std::sync::Arc<str>>,
    /// Writes applied together (`group`): each one's event, in order; `data` is the
    /// last one's bytes. Empty for one change (`event`).
    pub group: Vec<GroupWrite>,
}

/// One of the writes of a group's commit (`scripts::COMMIT_GROUP`).
#[derive(Clone, Debug)]
pub(crate) struct GroupWrite {
    /// Its event.
    pub event: Vec<u8>,
    /// Its delta head (`events::delta_head`).
    pub head: Vec<u8>,
    /// Its bytes: the record's (a REPLACE), or those written at `offset`.
    pub bytes: Bytes,
    /// Where a WRITE_AT writes `bytes`; `None`: they replace the record's.
    pub offset: Option<u64>,
}

#[derive(Clone, Debug, Default)]
pub(crate) enum DataOp {
    #[default]
    None,
    Set(Bytes),
    Range(u64, Bytes),
    DeleteRecord,
}

/// The BUSY reply for a store that cannot be reached or answered with an error.
pub(crate) fn unavailable(e: &RedisError) -> Reply {
    Reply::error(
        Status::Busy,
        format!("the store (Redis Cluster) is unavailable: {e}; retry later"),
    )
}

/// Runs `script` with `keys` and `args`: `EVALSHA` to the primary of the first key's
/// slot, or to any primary for a script without keys (loading the script there first
/// if it does not know it yet).
///
/// Built here rather than with `Script::prepare_invoke`, which copies every argument
/// twice more before sending (a REPLACE's data among them), and whose cluster call
/// copies the command once more to keep it for retries.
pub(crate) async fn run(
    conn: &ClusterConnection,
    script: &Script,
    keys: &[&str],
    args: &[&[u8]],
) -> RedisResult<Value> {
    following_moves(|| run_once(conn, script, keys, args)).await
}

/// [`run`], without following a slot that keeps moving.
async fn run_once(
    conn: &ClusterConnection,
    script: &Script,
    keys: &[&str],
    args: &[&[u8]],
) -> RedisResult<Value> {
    // A script without keys (the clock) goes to any primary. Without a route the
    // client library may pick a replica and, on `NOSCRIPT`, load the script there:
    // scripts belong on primaries only (a promoted replica gets them from the
    // gateway that sees it promoted, `load_scripts_on`).
    let route = || {
        RoutingInfo::SingleNode(match keys.first() {
            Some(first) => {
                SingleNodeRoutingInfo::SpecificNode(Route::with_key(first, SlotAddr::Master))
            }
            None => SingleNodeRoutingInfo::RandomPrimary,
        })
    };
    let evalsha = || evalsha(script, keys, args);
    let mut sent_at = Instant::now();
    let mut sent = match conn.clone().route_command(evalsha(), route()).await {
        // Redirected to the node importing the slot and not let in there (see `ask`).
        Err(e) => match redirect(&e) {
            Some(to) => ask(conn, to, vec![evalsha()])
                .await?
                .pop()
                .ok_or_else(|| bad("EVALSHA"))?,
            None => return Err(e),
        },
        Ok(v) => v,
    };
    let mut tries = 0;
    loop {
        match sent.extract_error() {
            Err(e) if no_script(&e) && tries < 2 => {
                reload_scripts(conn, (tries == 0).then_some(sent_at)).await?;
                tries += 1;
                sent_at = Instant::now();
                sent = conn.clone().route_command(evalsha(), route()).await?;
            }
            other => return other,
        }
    }
}

/// Loads every script a gateway runs on every primary the client library knows of
/// (`SCRIPT LOAD` goes to all of them).
pub(crate) async fn load_scripts(conn: &ClusterConnection) -> RedisResult<()> {
    for script in scripts::all() {
        script
            .prepare_invoke()
            .load_async(&mut conn.clone())
            .await?;
    }
    Ok(())
}

/// Loads every script a gateway runs on the node at `host:port` (a primary that
/// `CLUSTER NODES` shows for the first time: a promoted replica has none of them,
/// as `SCRIPT LOAD` is not replicated).
pub(crate) async fn load_scripts_on(
    conn: &ClusterConnection,
    host: &str,
    port: u16,
) -> RedisResult<()> {
    for script in scripts::all() {
        let cmd = redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg(script.source())
            .clone();
        let to = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
            host: host.to_string(),
            port,
        });
        conn.clone().route_command(cmd, to).await?.extract_error()?;
    }
    Ok(())
}

/// Whether Redis answered `NOSCRIPT` (it does not know the script: a restarted node,
/// a promoted replica, `SCRIPT FLUSH`).
pub(crate) fn no_script(e: &RedisError) -> bool {
    e.kind() == ErrorKind::Server(ServerErrorKind::NoScript)
}

/// After a `NOSCRIPT` to a command sent at `sent`: loads every script on every
/// primary, once for all the requests that met it at about the same time. A load
/// that started after `sent` finished while this request waited covers it (its
/// `SCRIPT LOAD` reached the node after the command that failed), so the request
/// only sends its command again; `None`: load whatever happened meanwhile (the
/// command failed again). Before, every commit in flight when a primary forgot the
/// scripts loaded them again itself.
pub(crate) async fn reload_scripts(
    conn: &ClusterConnection,
    sent: Option<Instant>,
) -> RedisResult<()> {
    // When the last load that succeeded started.
    static LAST: tokio::sync::Mutex<Option<Instant>> = tokio::sync::Mutex::const_new(None);
    let mut last = LAST.lock().await;
    if let (Some(sent), Some(loaded)) = (sent, *last)
        && loaded > sent
    {
        return Ok(());
    }
    let started = Instant::now();
    load_scripts(conn).await?;
    *last = Some(started);
    Ok(())
}

/// `EVALSHA` of `script` with `keys` and `args`.
fn evalsha(script: &Script, keys: &[&str], args: &[&[u8]]) -> redis::Cmd {
    let bytes =
        keys.iter().map(|k| k.len()).sum::<usize>() + args.iter().map(|a| a.len()).sum::<usize>();
    // The script's hash (40 hex digits) and the key count, then the keys and args.
    let mut cmd = sized_cmd("EVALSHA", 2 + keys.len() + args.len(), 40 + 4 + bytes);
    cmd.arg(script.get_hash()).arg(keys.len()).arg(keys);
    for a in args {
        cmd.arg(*a);
    }
    cmd
}

/// The error of a commit sent with others in a pipeline that failed as a whole (a
/// slot moved since the gateway last read the layout): whether it was applied is not
/// known, so the caller sends it again alone, as after a lost reply.
pub(crate) fn group_failed() -> RedisError {
    RedisError::from((
        redis::ErrorKind::Io,
        "a pipeline of commits failed as a whole",
        GROUP_FAILED.to_string(),
    ))
}

const GROUP_FAILED: &str = "sent again alone";

/// Whether `e` is [`group_failed`].
pub(crate) fn is_group_failed(e: &RedisError) -> bool {
    e.detail() == Some(GROUP_FAILED)
}

/// `replies`, or the first error among them (without copying them into a new vector,
/// as collecting `Value::extract_error`s would).
fn first_error(mut replies: Vec<Value>) -> RedisResult<Vec<Value>> {
    match replies
        .iter()
        .position(|v| matches!(v, Value::ServerError(_)))
    {
        Some(i) => Err(replies.swap_remove(i).extract_error().unwrap_err()),
        None => Ok(replies),
    }
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

fn bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        _ => None,
    }
}

fn identity(v: &Value) -> Option<Identity> {
    Some(Identity(bytes(v)?.try_into().ok()?))
}

fn bad(what: &str) -> RedisError {
    RedisError::from((
        redis::ErrorKind::Parse,
        "unexpected reply from Redis",
        what.to_string(),
    ))
}

/// Sends the commands `build` makes (on keys in `slot`) to that slot's primary as one
/// pipeline, in one write, and returns their replies, errors left in place.
/// (`Pipeline::query_async` on a cluster connection would copy the pipeline and hash
/// every command's key to route it.) Where the slot is being migrated and Redis
/// answers `ASK` for keys that have moved, the commands so answered are sent again
/// to the importing node, each after `ASKING`, in one pipeline ([`ask`]).
pub(crate) async fn on_slot(
    conn: &ClusterConnection,
    slot: u16,
    build: impl Fn() -> Vec<redis::Cmd>,
) -> RedisResult<Vec<Value>> {
    following_moves(|| on_slot_once(conn, slot, &build)).await
}

/// Redis answered that the command's slot is served elsewhere (`MOVED`) or cannot
/// take it yet (`TRYAGAIN`, a multi-key command while its slot migrates): it ran
/// none of it.
pub(crate) fn slot_moving(e: &RedisError) -> bool {
    matches!(
        e.kind(),
        ErrorKind::Server(ServerErrorKind::Moved | ServerErrorKind::TryAgain)
    )
}

/// Pauses before each of [`following_moves`]' new tries: 630 ms in all.
const MOVE_PAUSES_MS: [u64; 6] = [10, 20, 40, 80, 160, 320];

/// Runs `send`, and again after a pause while Redis answers that the slot moved.
///
/// The `redis` crate follows `MOVED` and `ASK` itself, but only twice per request
/// (`retries(2)`: more would hold requests for long while a node is down), and a
/// slot that moved twice since the crate last read the layout takes three hops: to
/// the old owner (`MOVED`), to the new one (`ASK`, the slot migrating on), to the
/// next after one `ASKING`, which lets only the first command of a pipeline in
/// (`MOVED` back). The crate then gives up with that `MOVED`, and a READ was answered
/// BUSY under resharding (test `a_record_whose_slot_moved_twice_…`). A command
/// answered `MOVED` or `TRYAGAIN` did not run (in a pipeline, those before it may
/// have: every pipeline sent here may run twice, as loads only read and a commit
/// carries an operation id); each `MOVED` also made the crate read the layout again,
/// so the next try starts closer.
async fn following_moves<T, F: Future<Output = RedisResult<T>>>(
    mut send: impl FnMut() -> F,
) -> RedisResult<T> {
    let mut pauses = MOVE_PAUSES_MS.iter();
    loop {
        match send().await {
            Err(e) if slot_moving(&e) => match pauses.next() {
                Some(&ms) => {
                    tracing::debug!(error = %e, "the slot moved; sending again");
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                None => return Err(e),
            },
            other => return other,
        }
    }
}

/// [`on_slot`], without following a slot that keeps moving.
async fn on_slot_once(
    conn: &ClusterConnection,
    slot: u16,
    build: &impl Fn() -> Vec<redis::Cmd>,
) -> RedisResult<Vec<Value>> {
    let (pipe, count) = pipeline(build());
    let route = SingleNodeRoutingInfo::SpecificNode(Route::new(slot, SlotAddr::Master));
    let replies = conn.clone().route_pipeline(pipe, 0, count, route).await;
    if !asked(&replies) {
        return replies;
    }
    let (mut replies, again, to) = match replies {
        // One command, answered `ASK`: it goes to the importing node.
        Err(e) if count == 1 => {
            let Some(to) = redirect(&e) else {
                return Err(e);
            };
            (vec![Value::Nil], vec![0], to)
        }
        // Several, and the crate tells only that one of them was answered `ASK`:
        // each goes again on its own, in order. Sending them all to the importing
        // node made a load read a record as missing: its data key (absent when the
        // bytes are in the state hash) was the one answered `ASK`, while the state
        // hash had not moved yet, and the importing node, told `ASKING`, serves a
        // key it does not have as missing: a READ was answered ADDRESS_FAULT, a
        // watch told the record was deleted (tests
        // `records_whose_slot_is_migrating_are_found_before_their_keys_move`,
        // `watches_learn_what_changed_while_their_records_slot_was_migrating`).
        Err(e) if redirect(&e).is_some() => {
            let mut replies = Vec::with_capacity(count);
            for c in build() {
                replies.push(Box::pin(one_on_slot(conn, slot, c)).await?);
            }
            return Ok(replies);
        }
        Err(e) => return Err(e),
        Ok(replies) => {
            let again: Vec<usize> = (0..count)
                .filter(|&i| ask_target(&replies[i]).is_some())
                .collect();
            // (None: an ASK without a readable address, left in place as an error.)
            let Some(to) = again.first().and_then(|&i| ask_target(&replies[i])) else {
                return Ok(replies);
            };
            (replies, again, to)
        }
    };
    let resend = build()
        .into_iter()
        .enumerate()
        .filter(|(i, _)| again.contains(i))
        .map(|(_, c)| c)
        .collect();
    for (i, v) in again.into_iter().zip(ask(conn, to, resend).await?) {
        replies[i] = v;
    }
    Ok(replies)
}

/// One command on `slot`'s primary, sent again to the importing node after
/// `ASKING` when it is answered `ASK`.
async fn one_on_slot(conn: &ClusterConnection, slot: u16, cmd: redis::Cmd) -> RedisResult<Value> {
    let route = SingleNodeRoutingInfo::SpecificNode(Route::new(slot, SlotAddr::Master));
    let reply = conn
        .clone()
        .route_pipeline(pipeline(vec![cmd.clone()]).0, 0, 1, route)
        .await
        .map(|mut v| v.pop().unwrap_or(Value::Nil));
    let to = match &reply {
        Err(e) => redirect(e),
        Ok(v) => ask_target(v),
    };
    match to {
        Some(to) => Ok(ask(conn, to, vec![cmd]).await?.pop().unwrap_or(Value::Nil)),
        None => reply,
    }
}

/// `cmds` as one pipeline, and how many they are.
fn pipeline(cmds: Vec<redis::Cmd>) -> (redis::Pipeline, usize) {
    let count = cmds.len();
    let mut pipe = redis::Pipeline::with_capacity(count);
    for c in cmds {
        pipe.add_command(c);
    }
    (pipe, count)
}

/// Sends `cmds` to the node at `to` (importing a slot being migrated), each after
/// `ASKING`, in one pipeline, and returns their replies. `ASKING` lets only the next
/// command on a connection through; the `redis` crate follows `ASK` by sending it as a
/// request of its own, so on the shared connection another request can take it (seen
/// in the tests with two requests redirected at once: the second then bounced between
/// the two nodes until the crate gave up). In one pipeline nothing comes in between.
pub(crate) async fn ask(
    conn: &ClusterConnection,
    to: (String, u16),
    cmds: Vec<redis::Cmd>,
) -> RedisResult<Vec<Value>> {
    let mut pipe = redis::Pipeline::with_capacity(2 * cmds.len());
    for c in cmds {
        pipe.add_command(redis::cmd("ASKING"));
        pipe.add_command(c);
    }
    let count = pipe.len();
    let route = SingleNodeRoutingInfo::ByAddress {
        host: to.0,
        port: to.1,
    };
    let replies = conn.clone().route_pipeline(pipe, 0, count, route).await?;
    Ok(replies.into_iter().skip(1).step_by(2).collect())
}

/// Where an `ASK` reply redirects to (host, port); `None` for any other reply.
pub(crate) fn ask_target(v: &Value) -> Option<(String, u16)> {
    match v {
        Value::ServerError(e) if e.kind() == Some(ServerErrorKind::Ask) => {
            redirect(&RedisError::from(e.clone()))
        }
        _ => None,
    }
}

/// Where an `ASK` error redirects to (host, port).
fn redirect(e: &RedisError) -> Option<(String, u16)> {
    if e.kind() != ErrorKind::Server(ServerErrorKind::Ask) {
        return None;
    }
    let (addr, _) = e.redirect_node()?;
    let (host, port) = addr.rsplit_once(':')?;
    Some((host.to_string(), port.parse().ok()?))
}

/// Whether Redis answered `ASK` (a slot being migrated) to a pipeline.
pub(crate) fn asked(replies: &RedisResult<Vec<Value>>) -> bool {
    let ask = Some(ServerErrorKind::Ask);
    match replies {
        Err(e) => e.kind() == ErrorKind::Server(ServerErrorKind::Ask),
        Ok(values) => values
            .iter()
            .any(|v| matches!(v, Value::ServerError(e) if e.kind() == ask)),
    }
}

/// How a gateway's loads went (for `/metrics`).
#[derive(Debug, Default)]
pub(crate) struct LoadCounters {
    /// Loads answered by plain commands.
    pub plain: AtomicU64,
    /// Tries with plain commands that saw a change come in between (read again).
    pub retries: AtomicU64,
    /// Loads that ran the `LOAD` script after `PLAIN_TRIES` such tries.
    pub script: AtomicU64,
}

/// How many times `load` and `range` read with plain commands before they fall back to
/// the atomic scripts (each try that saw a change in between costs one round trip).
const PLAIN_TRIES: usize = 3;

/// The fields of a record's state hash a load reads, in this order: the revision, the
/// packed state ([`STATE`]), the bytes when they are in the hash, and the last
/// change's operation id (which a load of bytes known to be in the hash, one atomic
/// `HMGET`, does not need: it reads the first [`HASH_FIELDS`]).
const STATE_FIELDS: [&str; 4] = ["r", STATE, "d", "l"];
/// How many of [`STATE_FIELDS`] a load of bytes in the hash reads: each value read
/// costs the `redis` crate's parser about 0.2 us (docs/BENCHMARKS.md).
const HASH_FIELDS: usize = 3;
/// Where [`STATE_FIELDS`] are in an `HMGET`'s reply.
const F_REV: usize = 0;
const F_STATE: usize = 1;
const F_DATA: usize = 2;
const F_LAST: usize = 3;

/// One try of a load with plain commands.
#[derive(Debug, PartialEq, Eq)]
enum Plain {
    /// The record (`None`: there is none).
    Found(Option<Stored>),
    /// It changed between the first command and the last: read again.
    Changed,
    /// It is in the layout of earlier versions ([`LEGACY_FIELDS`]), which only the
    /// `LOAD` script reads.
    Legacy,
}

/// Loads a record, with the bytes of `[start, start+len)` when they are at most
/// `max_inline` (`len` `None`: no bytes; `max_inline` `usize::MAX`: whatever their
/// size, for a caller already known to be allowed them).
///
/// One round trip of plain commands, no script: `HMGET` of the state (with `l`, the
/// last change's operation id), `STRLEN` and `GETRANGE` of the data (or one `GET`
/// for all of it), then `HGET` of `l` again. Every committed change sets `l` to its
/// own operation id in the same atomic script that changes the data, and operation
/// ids are never reused (a record deleted and created again under the same pointer
/// has a new one; a deleted record has none), so when `l` read last equals `l` read
/// first, no change was committed between the first and the last command and the
/// replies are one consistent snapshot. (Checking the revision too cost 2.5–5% of
/// the gateway's READs/s and adds nothing: a commit always changes `l`.) When they
/// differ (a write came in between), it reads again; after `PLAIN_TRIES` such
/// tries it runs the `LOAD` script, which is atomic. A Lua call costs Redis about
/// 4 us of CPU more than the plain commands (docs/BENCHMARKS.md).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn load(
    conn: &Replaceable,
    batch: Option<&Batcher>,
    k: &RecordKeys,
    range: Option<(u64, u64)>,
    max_inline: usize,
    in_hash: bool,
    counters: &LoadCounters,
) -> RedisResult<Option<Stored>> {
    // Bytes last seen in the state hash: one `HMGET` reads the record atomically.
    let mut got = if in_hash {
        load_hash(conn, batch, k, range).await?
    } else {
        Plain::Changed
    };
    let mut tries = 0;
    while got == Plain::Changed && tries < PLAIN_TRIES {
        got = load_plain(conn, batch, k, range, max_inline).await?;
        tries += 1;
        if got == Plain::Changed {
            counters.retries.fetch_add(1, Ordering::Relaxed);
        }
    }
    if let Plain::Found(found) = got {
        counters.plain.fetch_add(1, Ordering::Relaxed);
        return Ok(found);
    }
    // Changed every time, or a record of the earlier layout.
    counters.script.fetch_add(1, Ordering::Relaxed);
    // Boxed, like every rare path here: a future holds room for the largest of its
    // awaits, and every request's future would otherwise carry this one's.
    Box::pin(load_script(conn, k, range, max_inline)).await
}

/// The bytes a load returns: `[start, min(start+len, size))` if that is at most
/// `max_inline` bytes (`fetched` holds the first `max_inline` bytes from `start`).
fn inline_bytes(
    range: Option<(u64, u64)>,
    size: u64,
    max_inline: usize,
    fetched: Option<Vec<u8>>,
) -> RedisResult<Option<Bytes>> {
    let Some((s, n)) = range else {
        return Ok(None);
    };
    if s > size {
        return Ok(None);
    }
    let e = s.saturating_add(n).min(size);
    if e == s {
        return Ok(Some(Bytes::new()));
    }
    if e - s > max_inline as u64 {
        return Ok(None);
    }
    match fetched {
        Some(b) if b.len() as u64 == e - s => Ok(Some(Bytes::from(b))),
        _ => Err(bad("GETRANGE returned fewer bytes than STRLEN promised")),
    }
}

/// What a plain load reads of the data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DataRead {
    /// `STRLEN`.
    Size,
    /// `STRLEN`, `GETRANGE` of `n > 0` bytes from `start`.
    Range(u64, u64),
    /// `GET`: all of it.
    Whole,
}

/// Whole records: the length of the range that the requests reading all of a record
/// ask `load` for (a load of `(0, WHOLE)` with no inline limit is one `GET`).
pub(crate) const WHOLE: u64 = 1 << 53;

/// One try of `load` with plain commands. With a batcher, the commands go with other
/// loads' (`batch.rs`).
async fn load_plain(
    conn: &Replaceable,
    batch: Option<&Batcher>,
    k: &RecordKeys,
    range: Option<(u64, u64)>,
    max_inline: usize,
) -> RedisResult<Plain> {
    // At most `max_inline` bytes; a start beyond any record's size reads none.
    let read = match range {
        Some((0, n)) if n >= WHOLE && max_inline == usize::MAX => DataRead::Whole,
        Some((s, n)) if s < WHOLE && n > 0 && max_inline > 0 => {
            DataRead::Range(s, n.min(max_inline as u64).min(WHOLE))
        }
        _ => DataRead::Size,
    };
    let build = || load_commands(k, read);
    let replies = Batcher::send_idempotent(batch, conn, &k.meta, build).await?;
    snapshot(first_error(replies)?, read, range, max_inline)
}

/// A load of a record whose bytes were last seen in its state hash: one `HMGET` of
/// the state with the bytes. `Changed`: they are not there (any more): load as usual.
async fn load_hash(
    conn: &Replaceable,
    batch: Option<&Batcher>,
    k: &RecordKeys,
    range: Option<(u64, u64)>,
) -> RedisResult<Plain> {
    let build = || vec![hash_load_command(k)];
    let replies = Batcher::send_idempotent(batch, conn, &k.meta, build).await?;
    let Some(state) = first_error(replies)?.pop() else {
        return Err(bad("HMGET"));
    };
    hash_load_reply(state, range)
}

/// The one command of a load of a record whose bytes are in its state hash.
pub(crate) fn hash_load_command(k: &RecordKeys) -> redis::Cmd {
    state_command(k, HASH_FIELDS)
}

/// Reads the reply to [`hash_load_command`]: `Found`, or `Changed` when the bytes are
/// not in the hash (any more), or `Legacy`.
fn hash_load_reply(state: Value, range: Option<(u64, u64)>) -> RedisResult<Plain> {
    let Value::Array(state) = state else {
        return Err(bad("HMGET"));
    };
    if state.len() != HASH_FIELDS {
        return Err(bad("HMGET"));
    }
    if state[F_REV] == Value::Nil {
        return Ok(Plain::Found(None));
    }
    if state[F_STATE] == Value::Nil {
        return Ok(Plain::Legacy);
    }
    Ok(match in_hash_record(&state, range)? {
        Some(rec) => Plain::Found(Some(rec)),
        None => Plain::Changed,
    })
}

/// Reads the reply to [`hash_load_command`] with all of the record's bytes: the
/// record (`None`: there is none), or `Ok(None)` when its bytes are not in the
/// hash or it is of the earlier layout (a load as usual answers those).
pub(crate) fn hash_load_whole(state: Value) -> RedisResult<Option<Option<Stored>>> {
    Ok(match hash_load_reply(state, Some((0, WHOLE)))? {
        Plain::Found(found) => Some(found),
        Plain::Changed | Plain::Legacy => None,
    })
}

/// `rec`, which holds all of its bytes, with only those of `range` (as a load of
/// `range` returns them: none when it starts beyond the end).
pub(crate) fn ranged(rec: &Stored, range: Option<(u64, u64)>) -> Stored {
    let data = match (range, &rec.data) {
        (Some((s, n)), Some(all)) if s <= rec.size => {
            let e = s.saturating_add(n).min(rec.size);
            Some(all.slice(s as usize..e as usize))
        }
        _ => None,
    };
    // Field by field: `..rec.clone()` would clone the bytes only to drop them.
    Stored {
        rev: rec.rev,
        owner: rec.owner,
        payer: rec.payer,
        access: rec.access,
        version: rec.version,
        deadline: rec.deadline,
        size: rec.size,
        data,
        inline: rec.inline,
        legacy: rec.legacy,
    }
}

/// The record of an `HMGET` of (at least the first [`HASH_FIELDS`] of)
/// `STATE_FIELDS`, with `s`, whose bytes are in the hash (`None`: they are not), with
/// the bytes of `range`.
fn in_hash_record(state: &[Value], range: Option<(u64, u64)>) -> RedisResult<Option<Stored>> {
    let Value::BulkString(bytes) = &state[F_DATA] else {
        return Ok(None);
    };
    let size = bytes.len() as u64;
    let data = range.and_then(|(s, n)| {
        (s <= size).then(|| {
            let e = s.saturating_add(n).min(size);
            Bytes::copy_from_slice(&bytes[s as usize..e as usize])
        })
    });
    let mut rec = stored(state, size, data)?;
    rec.inline = true;
    Ok(Some(rec))
}

/// A command `name` with room for `args` more arguments of `bytes` bytes in all:
/// sized up front, a command grows its two vectors argument by argument otherwise.
fn sized_cmd(name: &str, args: usize, bytes: usize) -> redis::Cmd {
    let mut c = redis::Cmd::with_capacity(args + 1, name.len() + bytes);
    c.arg(name);
    c
}

/// `HMGET` of the first `n` of a record's `STATE_FIELDS`.
fn state_command(k: &RecordKeys, n: usize) -> redis::Cmd {
    let mut c = sized_cmd("HMGET", 1 + n, k.meta.len() + 16);
    c.arg(&k.meta).arg(&STATE_FIELDS[..n]);
    c
}

/// A plain load's commands: `HMGET` of the state, the data's as `read` says, and
/// `HGET l` last.
fn load_commands(k: &RecordKeys, read: DataRead) -> Vec<redis::Cmd> {
    let cmd = sized_cmd;
    let (meta, data) = (k.meta.len(), k.data.len());
    let mut cmds = Vec::with_capacity(4);
    cmds.push(state_command(k, STATE_FIELDS.len()));
    match read {
        DataRead::Whole => cmds.push(cmd("GET", 1, data).arg(&k.data).take()),
        DataRead::Range(s, n) => {
            cmds.push(cmd("STRLEN", 1, data).arg(&k.data).take());
            cmds.push(
                cmd("GETRANGE", 3, data + 40)
                    .arg(&k.data)
                    .arg(s)
                    .arg(s + n - 1)
                    .take(),
            );
        }
        DataRead::Size => cmds.push(cmd("STRLEN", 1, data).arg(&k.data).take()),
    }
    cmds.push(cmd("HGET", 2, meta + 1).arg(&k.meta).arg("l").take());
    cmds
}

/// Reads the replies of `load_plain`'s commands (`HMGET` state, the data's as `read`
/// says, `HGET l`).
fn snapshot(
    replies: Vec<Value>,
    read: DataRead,
    range: Option<(u64, u64)>,
    max_inline: usize,
) -> RedisResult<Plain> {
    let mut replies = replies.into_iter();
    let Some(Value::Array(state)) = replies.next() else {
        return Err(bad("HMGET"));
    };
    let (size, fetched) = match (read, replies.next()) {
        (DataRead::Whole, Some(Value::BulkString(b))) => (b.len() as u64, Some(b)),
        (DataRead::Whole, Some(Value::Nil)) => (0, Some(Vec::new())),
        (DataRead::Size, Some(n)) => (int(&n).ok_or_else(|| bad("STRLEN"))? as u64, None),
        (DataRead::Range(..), Some(n)) => match replies.next() {
            Some(Value::BulkString(b)) => (int(&n).ok_or_else(|| bad("STRLEN"))? as u64, Some(b)),
            _ => return Err(bad("GETRANGE")),
        },
        _ => return Err(bad("GET/STRLEN")),
    };
    let Some(last) = replies.next() else {
        return Err(bad("HGET l"));
    };
    if state.len() != STATE_FIELDS.len() {
        return Err(bad("HMGET"));
    }
    if state[F_REV] != Value::Nil && state[F_STATE] == Value::Nil {
        return Ok(Plain::Legacy);
    }
    // Bytes in the hash: the `HMGET` alone was one consistent state.
    if state[F_REV] != Value::Nil
        && let Some(rec) = in_hash_record(&state, range)?
    {
        return Ok(Plain::Found(Some(rec)));
    }
    if state[F_REV] == Value::Nil && last == Value::Nil {
        return Ok(Plain::Found(None));
    }
    if state[F_REV] == Value::Nil || state[F_LAST] != last {
        return Ok(Plain::Changed);
    }
    let data = inline_bytes(range, size, max_inline, fetched)?;
    Ok(Plain::Found(Some(stored(&state, size, data)?)))
}

/// A record at revision `rev` in `state`, of the layout of earlier versions or not.
fn record(rev: u64, state: State, size: u64, data: Option<Bytes>, legacy: bool) -> Stored {
    let (owner, payer, access, version, deadline) = state;
    Stored {
        rev,
        owner,
        payer,
        access,
        version,
        deadline,
        size,
        data,
        inline: false,
        legacy,
    }
}

/// A record's state from the fields `r` and `s` (the first two of `STATE_FIELDS`).
fn stored(items: &[Value], size: u64, data: Option<Bytes>) -> RedisResult<Stored> {
    let rev = int(&items[F_REV]).ok_or_else(|| bad("rev"))? as u64;
    let state = bytes(&items[F_STATE])
        .and_then(unpack_state)
        .ok_or_else(|| bad("packed state"))?;
    Ok(record(rev, state, size, data, false))
}

/// A record's state from the layout of earlier versions: the revision, then the
/// fields [`LEGACY_FIELDS`] in their order.
fn stored_legacy(items: &[Value], size: u64, data: Option<Bytes>) -> RedisResult<Stored> {
    let rev = int(&items[0]).ok_or_else(|| bad("rev"))? as u64;
    let owner = identity(&items[1]).ok_or_else(|| bad("owner"))?;
    let payer = match &items[2] {
        Value::Nil => None,
        v => Some(identity(v).ok_or_else(|| bad("payer"))?),
    };
    let access = Access::from_bits_truncate(int(&items[3]).ok_or_else(|| bad("access"))? as u8);
    let version = int(&items[4]).ok_or_else(|| bad("version"))? as u64;
    let deadline = match (int(&items[5]), int(&items[6])) {
        (Some(x), Some(g)) => Some((x as u64, g as u64)),
        _ => None,
    };
    let state = (owner, payer, access, version, deadline);
    Ok(record(rev, state, size, data, true))
}

/// `load` in one atomic script (the fallback when plain reads keep seeing changes).
async fn load_script(
    conn: &Replaceable,
    k: &RecordKeys,
    range: Option<(u64, u64)>,
    max_inline: usize,
) -> RedisResult<Option<Stored>> {
    let (start, len) = match range {
        Some((s, n)) => (s.to_string(), n.to_string()),
        None => ("0".into(), "-1".into()),
    };
    let v = run(
        &conn.get(),
        &scripts::LOAD,
        &[&k.meta, &k.data],
        &[
            start.as_bytes(),
            len.as_bytes(),
            max_inline.to_string().as_bytes(),
        ],
    )
    .await?;
    let mut items = match v {
        Value::Nil => return Ok(None),
        Value::Array(items) if items.len() == 11 => items,
        Value::Boolean(false) => return Ok(None),
        other => return Err(bad(&format!("LOAD gave {other:?}"))),
    };
    let inline = items.pop().and_then(|v| int(&v)) == Some(1);
    let data = match items.pop() {
        Some(Value::BulkString(b)) => Some(Bytes::from(b)),
        _ => None,
    };
    let size = int(&items[8]).ok_or_else(|| bad("size"))? as u64;
    let mut rec = if items[F_STATE] == Value::Nil {
        // `r`, then the legacy fields.
        items.remove(F_STATE);
        stored_legacy(&items[..7], size, data)?
    } else {
        stored(&items[..2], size, data)?
    };
    rec.inline = inline;
    Ok(Some(rec))
}

/// Reads `[start, end)` of a record still at revision `rev` (`None`: it changed).
///
/// Plain commands like `load`: `GETRANGE`, then `HGET` of the revision; the caller
/// saw `rev` before the `GETRANGE`, so the same revision after it means the bytes are
/// the record's at `rev`.
pub(crate) async fn range(
    conn: &ClusterConnection,
    k: &RecordKeys,
    rev: u64,
    start: u64,
    end: u64,
) -> RedisResult<Option<Bytes>> {
    let build = || {
        let mut cmds = Vec::with_capacity(2);
        if end > start {
            cmds.push(
                redis::cmd("GETRANGE")
                    .arg(&k.data)
                    .arg(start)
                    .arg(end - 1)
                    .take(),
            );
        }
        cmds.push(redis::cmd("HGET").arg(&k.meta).arg("r").take());
        cmds
    };
    let replies = Box::pin(on_slot(conn, slot_of(&k.meta), build)).await?;
    let mut replies = first_error(replies)?;
    let now = replies.pop().ok_or_else(|| bad("HGET r"))?;
    if int(&now) != Some(rev as i64) {
        return Ok(None);
    }
    match replies.pop() {
        None => Ok(Some(Bytes::new())),
        Some(Value::BulkString(b)) if b.len() as u64 == end - start => Ok(Some(Bytes::from(b))),
        Some(_) => Err(bad("GETRANGE")),
    }
}

/// Applies a decided change to a record if it is at the expected revision. With
/// `wait_replicas > 0` the commit is followed, on the same connection to the
/// record's primary, by `WAIT`, so that the change is on that many replicas before
/// it is acknowledged.
///
/// A commit that makes a record's data key (a create of a record over
/// `scripts::IN_HASH` bytes, or bytes growing out of the state hash) names it
/// instead of declaring it (see `scripts::COMMIT`). Where the record's slot is
/// migrating away and its keys are still on the old node, that node refuses the new
/// key ("non local key", before the script writes anything): the commit is then sent
/// again with the bytes kept in the state hash, where loads find them whatever their
/// size, until a later write moves them out; the second value is true then.
pub(crate) async fn commit(
    conn: &Replaceable,
    batch: Option<&Batcher>,
    k: &RecordKeys,
    change: &Change,
    wait: Wait,
) -> RedisResult<(Committed, bool)> {
    match commit_as(conn, batch, k, change, wait.clone(), false).await {
        Err(e) if is_non_local_key(&e) && names_data_key(change) => {
            tracing::debug!(key = %k.meta, "a new data key is refused while its slot migrates; the bytes stay in the hash");
            let c = Box::pin(commit_as(conn, None, k, change, wait, true)).await?;
            Ok((c, true))
        }
        other => other.map(|c| (c, false)),
    }
}

/// Whether `commit` names (creates) the record's data key rather than declaring it.
fn names_data_key(change: &Change) -> bool {
    Plan::of(change, false).new_key
}

/// A script's error for a key its node does not serve (a new key of a slot
/// migrating away).
fn is_non_local_key(e: &RedisError) -> bool {
    e.to_string().contains("non local key")
}

/// Where a commit puts a record's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Plan {
    /// `scripts::COMMIT`'s data op.
    op: &'static [u8],
    /// The script uses the data key.
    uses_data: bool,
    /// The bytes leave the hash (`d` deleted).
    moved_out: bool,
    /// The data key is new: named in ARGV, not declared.
    new_key: bool,
}

impl Plan {
    /// Whether `change` under this plan is one `scripts::COMMIT_BYTES` applies: new
    /// bytes into the state hash of an existing record whose bytes are there (data op
    /// `h`, which [`Plan::of`] gives only for bytes in the hash and no data key), with
    /// no fence, no marker and nothing deleted.
    fn bytes_only(&self, change: &Change) -> bool {
        self.op == b"h"
            && change.expected.is_some()
            && change.fence == 0
            && !change.mark
            && change.del.is_empty()
    }

    /// The plan for `change`; `in_hash`: bytes that would make a new data key stay
    /// in the hash instead.
    fn of(change: &Change, in_hash: bool) -> Plan {
        let small = |b: &Bytes| b.len() <= scripts::IN_HASH;
        let (op, uses_data, moved_out): (&'static [u8], bool, bool) =
            match (&change.data, change.inline) {
                (DataOp::None, _) => (b"n", false, false),
                (DataOp::Set(b), true) if small(b) => (b"h", false, false),
                (DataOp::Set(b), false) if small(b) => (b"H", true, false),
                // A create, or bytes growing out of the hash: a new data key.
                (DataOp::Set(_), true) if in_hash => (b"h", false, false),
                (DataOp::Set(_), inline) => (b"s", true, inline && change.expected.is_some()),
                (DataOp::Range(..), false) => (b"r", true, false),
                (DataOp::Range(..), true) => {
                    let may_grow_out = change.new_size.is_none_or(|n| n > scripts::IN_HASH as u64);
                    (b"R", may_grow_out && !in_hash, false)
                }
                (DataOp::DeleteRecord, inline) => (b"x", !inline, false),
            };
        Plan {
            op,
            uses_data,
            moved_out,
            new_key: uses_data && (op == b"R" || (op == b"s" && change.inline)),
        }
    }
}

/// One `commit`, with the bytes kept in the hash or not (see `Plan`).
async fn commit_as(
    conn: &Replaceable,
    batch: Option<&Batcher>,
    k: &RecordKeys,
    change: &Change,
    wait: Wait,
    in_hash: bool,
) -> RedisResult<Committed> {
    let expected = change.expected.map(|r| r.to_string()).unwrap_or_default();
    // The data key is declared only when the script uses it and it exists (or may: a
    // range write of bytes in the data key), and `d` is deleted from the hash when
    // the bytes of an existing record leave it. A data key the commit makes is named
    // in ARGV[11]: declaring a missing key is `TRYAGAIN` while the slot moves.
    let plan = Plan::of(change, in_hash);
    let Plan {
        op: data_op,
        uses_data,
        moved_out,
        new_key,
    } = plan;
    let (offset, data) = match &change.data {
        DataOp::Set(b) => (0, b.clone()),
        DataOp::Range(off, b) => (*off, b.clone()),
        DataOp::None | DataOp::DeleteRecord => (0, Bytes::new()),
    };
    let event: &[u8] = change.event.as_deref().unwrap_or_default();
    let claim: &[u8] = change.claim.as_deref().unwrap_or_default().as_bytes();
    let delta_head: Vec<u8> = match (&change.data, change.new_size) {
        (DataOp::Set(_), Some(size)) => super::events::delta_head(size, 0),
        (DataOp::Range(off, _), Some(size)) => super::events::delta_head(size, *off),
        _ => Vec::new(),
    };
    let mut keys = Vec::with_capacity(2);
    keys.push(k.meta.as_str());
    if uses_data && !new_key {
        keys.push(k.data.as_str());
    }
    let lean = plan.bytes_only(change);
    let grouped = lean && !change.group.is_empty();
    let script: &scripts::Lua = if grouped {
        &scripts::COMMIT_GROUP
    } else if lean {
        &scripts::COMMIT_BYTES
    } else {
        &scripts::COMMIT
    };
    let mut args: Vec<&[u8]> =
        Vec::with_capacity(13 + 2 * change.set.len() + change.del.len() + 3 * change.group.len());
    // Numbers only `COMMIT` and `COMMIT_GROUP` take, made only for them.
    let (fence, at, n_set): (String, String, String);
    let n_writes: String;
    let offsets: Vec<String>;
    if grouped {
        n_writes = change.group.len().to_string();
        args.extend_from_slice(&[
            expected.as_bytes(),
            change.op.as_bytes(),
            claim,
            n_writes.as_bytes(),
        ]);
        offsets = change
            .group
            .iter()
            .map(|w| w.offset.map(|o| o.to_string()).unwrap_or_default())
            .collect();
        for (w, off) in change.group.iter().zip(&offsets) {
            args.extend_from_slice(&[&w.event, &w.head, &w.bytes, off.as_bytes()]);
        }
    } else if lean {
        args.extend_from_slice(&[
            expected.as_bytes(),
            change.op.as_bytes(),
            &data,
            event,
            &delta_head,
            claim,
        ]);
    } else {
        (fence, at, n_set) = (
            change.fence.to_string(),
            offset.to_string(),
            change.set.len().to_string(),
        );
        args.extend_from_slice(&[
            expected.as_bytes(),
            fence.as_bytes(),
            change.op.as_bytes(),
            data_op,
            if change.mark { b"1" } else { b"0" },
            at.as_bytes(),
            &data,
            event,
            &delta_head,
            n_set.as_bytes(),
            if new_key { k.data.as_bytes() } else { b"" },
            claim,
        ]);
    }
    for (f, v) in &change.set {
        args.push(f.as_bytes());
        args.push(v);
    }
    for f in &change.del {
        args.push(f.as_bytes());
    }
    if moved_out {
        args.push(b"d");
    }
    let v = match (wait.replicas, batch) {
        (0, Some(b)) => {
            let cmd = evalsha(script, &keys, &args);
            let sent = Instant::now();
            let Some(replies) = b.send(slot_of(keys[0]), vec![cmd]).await else {
                return Err(group_failed());
            };
            match replies?.pop().map(Value::extract_error) {
                Some(Err(e)) if no_script(&e) => {
                    let conn = conn.get();
                    reload_scripts(&conn, Some(sent)).await?;
                    Box::pin(run(&conn, script, &keys, &args)).await?
                }
                Some(v) => v?,
                None => return Err(bad("EVALSHA")),
            }
        }
        (0, None) => Box::pin(run(&conn.get(), script, &keys, &args)).await?,
        _ => Box::pin(commit_and_wait(&conn.get(), script, &keys, &args, wait)).await?,
    };
    match v {
        Value::Array(items) => match items.first().and_then(int) {
            Some(1) => Ok(Committed::Yes),
            Some(0) => Ok(Committed::Changed(found_changed(&items).map(Box::new))),
            Some(-1) => Ok(Committed::Fenced),
            _ => Err(bad("COMMIT")),
        },
        other => Err(bad(&format!("COMMIT gave {other:?}"))),
    }
}

/// The state a commit that found its record changed got back (`scripts::CHANGED`:
/// `{0, rev, packed state, size, in hash}`), if it did.
fn found_changed(items: &[Value]) -> Option<Stored> {
    let [_, rev, state, size, in_hash] = items else {
        return None;
    };
    let rev = u64::try_from(int(rev)?).ok()?;
    let size = u64::try_from(int(size)?).ok()?;
    let mut rec = record(rev, unpack_state(bytes(state)?)?, size, None, false);
    rec.inline = bytes(in_hash)? == b"1";
    Some(rec)
}

/// How many replicas must have a commit before it is acknowledged, and how long
/// `WAIT` may take (less than the response timeout, so a lagging replica gives a
/// warning, not a timeout).
#[derive(Clone, Debug)]
pub(crate) struct Wait {
    pub replicas: u32,
    pub ms: u64,
    /// Where each node is (id → host, port), to send `WAIT` to the node that applied
    /// the commit ([`Replicas::nodes`]).
    pub nodes: Arc<HashMap<String, (String, u16)>>,
}

/// The field of a record's state hash that says the change with operation id `op`
/// was committed (`scripts::COMMIT`'s marker).
pub(crate) fn marker(op: &str) -> String {
    format!("m:{op}")
}

/// The hash slot of a key (CRC16 of its hash tag, as Redis Cluster defines it).
pub(crate) fn slot_of(key: &str) -> u16 {
    redis_protocol::redis_keyslot(key.as_bytes())
}

/// For each slot range, how many replicas its primary has that are not failing
/// (from `CLUSTER NODES`, refreshed every second). `WAIT` is only sent where a replica
/// can answer it: `WAIT` blocks the connection it is sent on, and the gateway has one
/// multiplexed connection per node, so a `WAIT` that can only time out (a promoted
/// replica that has no replica of its own yet) would hold up every request to that
/// node.
#[derive(Debug, Default)]
pub(crate) struct Replicas {
    ranges: Vec<(u16, u16, u32)>,
    /// Every node's address by its id, as the `redis` crate names it (so that a
    /// command routed `ByAddress` finds the crate's connection to it): the endpoint
    /// `CLUSTER SLOTS` gives for a node that serves slots or replicates one that does
    /// ([`Replicas::name_as_routed`]), `CLUSTER NODES`' IP for any other.
    pub nodes: Arc<HashMap<String, (String, u16)>>,
    /// The ids of the primaries that are not failing.
    pub primaries: Vec<String>,
    /// The ids of the primaries that serve slots, failing or not (sorted): this
    /// changes when a replica takes over (not while a primary is only suspected
    /// down, nor when slots move between primaries that keep some).
    pub serving: Vec<String>,
}

impl Replicas {
    /// Reads the layout from Redis: `CLUSTER NODES` (roles, health, slots), then
    /// `CLUSTER SLOTS` for the nodes' addresses as the crate routes to them
    /// ([`Replicas::nodes`]). `None`: no readable answer.
    pub async fn read(conn: &ClusterConnection) -> Option<(Replicas, String)> {
        let mut conn = conn.clone();
        let random = || RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random);
        let nodes = conn
            .route_command(redis::cmd("CLUSTER").arg("NODES").clone(), random())
            .await
            .ok()
            .and_then(into_text)?;
        let mut layout = Replicas::parse(&nodes);
        // Without `CLUSTER SLOTS`, the names of `CLUSTER NODES` (what they were
        // before any node announced a hostname).
        if let Ok(slots) = conn
            .route_command(redis::cmd("CLUSTER").arg("SLOTS").clone(), random())
            .await
        {
            layout.name_as_routed(&slots);
        }
        Some((layout, nodes))
    }

    /// Names each node that `slots` (a `CLUSTER SLOTS` reply) lists by the endpoint
    /// given there, as the `redis` crate does: a node announcing a hostname with
    /// `cluster-preferred-endpoint-type hostname` is `CLUSTER NODES`' IP but the
    /// crate's hostname. An endpoint that is empty, `NULL`, a wildcard (the answering
    /// node's own address, for the crate) or `?` (unknown) leaves the node's name as
    /// it was.
    pub fn name_as_routed(&mut self, slots: &Value) {
        let Value::Array(ranges) = slots else {
            return;
        };
        let mut named = (*self.nodes).clone();
        for range in ranges {
            let Value::Array(range) = range else { continue };
            for node in range.iter().skip(2) {
                let Value::Array(node) = node else { continue };
                let (Some(host), Some(port), Some(id)) = (
                    node.first().and_then(as_bytes),
                    node.get(1).and_then(as_int),
                    node.get(2).and_then(as_bytes),
                ) else {
                    continue;
                };
                let host = String::from_utf8_lossy(host);
                let unnamed = matches!(host.as_ref(), "" | "?" | "0.0.0.0" | "::");
                let (Ok(port), false) = (u16::try_from(port), unnamed) else {
                    continue;
                };
                named.insert(
                    String::from_utf8_lossy(id).into_owned(),
                    (host.into_owned(), port),
                );
            }
        }
        self.nodes = Arc::new(named);
    }

    /// Replicas of the primary serving `key` (`None`: not known yet).
    pub fn of(&self, key: &str) -> Option<u32> {
        let slot = slot_of(key);
        self.ranges
            .iter()
            .find(|(a, b, _)| (*a..=*b).contains(&slot))
            .map(|r| r.2)
    }

    /// Reads `CLUSTER NODES`.
    pub fn parse(nodes: &str) -> Replicas {
        let lines: Vec<Vec<&str>> = nodes
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        let healthy_replicas = |id: &str| {
            lines
                .iter()
                .filter(|f| {
                    f.len() > 3 && f[2].contains("slave") && !f[2].contains("fail") && f[3] == id
                })
                .count() as u32
        };
        let mut ranges = Vec::new();
        for f in &lines {
            if f.len() < 9 || !f[2].contains("master") || f[2].contains("fail") {
                continue;
            }
            let n = healthy_replicas(f[0]);
            for r in &f[8..] {
                let (a, b) = match r.split_once('-') {
                    Some((a, b)) => (a.parse().ok(), b.parse().ok()),
                    None => (r.parse().ok(), r.parse().ok()),
                };
                if let (Some(a), Some(b)) = (a, b) {
                    ranges.push((a, b, n));
                }
            }
        }
        let nodes = lines
            .iter()
            .filter(|f| f.len() > 1)
            .filter_map(|f| {
                let (host, port) = f[1].split('@').next()?.rsplit_once(':')?;
                Some((f[0].to_string(), (host.to_string(), port.parse().ok()?)))
            })
            .collect();
        let primaries = lines
            .iter()
            .filter(|f| f.len() > 2 && f[2].contains("master") && !f[2].contains("fail"))
            .map(|f| f[0].to_string())
            .collect();
        let mut serving: Vec<String> = lines
            .iter()
            .filter(|f| {
                f.len() > 8 && f[2].contains("master") && f[8..].iter().any(|r| !r.starts_with('['))
            })
            .map(|f| f[0].to_string())
            .collect();
        serving.sort();
        Replicas {
            ranges,
            nodes: Arc::new(nodes),
            primaries,
            serving,
        }
    }
}

async fn commit_and_wait(
    conn: &ClusterConnection,
    script: &scripts::Lua,
    keys: &[&str],
    args: &[&[u8]],
    wait: Wait,
) -> RedisResult<Value> {
    // The commit, then `WAIT` on the connection to the node that applied it (it
    // waits for every write this gateway sent that node, ours included). Sent after
    // the commit's reply rather than with it, `WAIT` mostly finds the replica caught
    // up already and returns at once; sent in one pipeline with the commit, it always
    // blocked the connection and made the primary ask its replicas for
    // acknowledgements: measured 15% fewer writes/s and 40% more Redis CPU per write.
    // Which node applied the commit is not always the slot's primary: while the
    // record's slot is being migrated and its keys have moved, it is the importing
    // node (Redis answers `ASK`, which the client library follows by itself), and
    // `WAIT` on the old primary would count replicas that never see the write. So the
    // commit goes with `CLUSTER MYID` in one pipeline (the library sends a redirected
    // pipeline again as a whole), and `WAIT` goes to the node that answered.
    let build = || {
        vec![
            evalsha(script, keys, args),
            redis::cmd("CLUSTER").arg("MYID").clone(),
        ]
    };
    let slot = SingleNodeRoutingInfo::SpecificNode(Route::new(slot_of(keys[0]), SlotAddr::Master));
    let mut tries = 0;
    let (v, id) = loop {
        let sent = Instant::now();
        let (pipe, count) = pipeline(build());
        let route = slot.clone();
        let mut replies = conn.clone().route_pipeline(pipe, 0, count, route).await?;
        // Still `ASK` after the library's tries: both again, to the importing node.
        if let Some(to) = replies.first().and_then(ask_target) {
            replies = ask(conn, to, build()).await?;
        }
        let id = replies
            .pop()
            .and_then(|v| bytes(&v).map(|b| String::from_utf8_lossy(b).into_owned()));
        match replies.pop().ok_or_else(|| bad("EVALSHA"))?.extract_error() {
            Err(e) if no_script(&e) && tries < 2 => {
                reload_scripts(conn, (tries == 0).then_some(sent)).await?;
                tries += 1;
            }
            Err(e) => return Err(e),
            Ok(v) => break (v, id),
        }
    };
    let applied_on = match id.as_deref().and_then(|id| wait.nodes.get(id)) {
        Some((host, port)) => SingleNodeRoutingInfo::ByAddress {
            host: host.clone(),
            port: *port,
        },
        // A node the last look at the layout did not know yet: its slot's primary.
        None => slot,
    };
    let acked = conn
        .clone()
        .route_command(
            redis::cmd("WAIT").arg(wait.replicas).arg(wait.ms).clone(),
            RoutingInfo::SingleNode(applied_on),
        )
        .await?;
    if int(&acked).is_none_or(|n| n < wait.replicas as i64) {
        tracing::warn!(
            replicas = wait.replicas,
            "WAIT: fewer replicas than asked acknowledged a write within {} ms",
            wait.ms
        );
    }
    Ok(v)
}

/// Redis time in ms, and the local instant it was read at (the midpoint of the call).
pub(crate) async fn redis_now(conn: &ClusterConnection) -> RedisResult<(u64, Instant)> {
    let sent = Instant::now();
    let v = run(conn, &scripts::TIME, &[], &[]).await?;
    let got = Instant::now();
    let ms = int(&v).ok_or_else(|| bad("TIME"))? as u64;
    Ok((ms, sent + (got - sent) / 2))
}

/// Reads an integer reply.
pub(crate) fn as_int(v: &Value) -> Option<i64> {
    int(v)
}

/// Reads a bulk string reply.
pub(crate) fn as_bytes(v: &Value) -> Option<&[u8]> {
    bytes(v)
}

/// Reads a text reply (`CLUSTER NODES`, `CLIENT INFO`: a bulk string in RESP2, a
/// verbatim string in RESP3).
pub(crate) fn into_text(v: Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(&b).into_owned()),
        Value::VerbatimString { text, .. } | Value::SimpleString(text) => Some(text),
        _ => None,
    }
}

/// A deadline for a change (for fences), `ahead` from Redis time now as estimated.
pub(crate) fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where commits put the bytes: a data key that does not exist yet is named, not
    /// declared, and kept out of (bytes in the hash) when the node refuses it.
    #[test]
    fn a_new_data_key_is_named_and_can_be_done_without() {
        let big = Bytes::from(vec![0u8; scripts::IN_HASH + 1]);
        let small = Bytes::from_static(b"small");
        let change = |expected, inline, data, new_size| Change {
            expected,
            inline,
            data,
            new_size,
            ..Change::default()
        };
        let create = change(None, true, DataOp::Set(big.clone()), Some(1025));
        let grow = change(Some(3), true, DataOp::Set(big.clone()), Some(1025));
        let large = change(Some(3), false, DataOp::Set(big.clone()), Some(1025));
        let shrink = change(Some(3), false, DataOp::Set(small.clone()), Some(5));
        let range_in = change(Some(3), true, DataOp::Range(0, small.clone()), Some(5));
        let range_out = change(Some(3), true, DataOp::Range(1000, big.clone()), Some(2025));
        let range_large = change(Some(3), false, DataOp::Range(0, small), Some(2025));
        // (data op, uses the data key, `d` deleted, data key new)
        let plan = |c: &Change, in_hash| {
            let p = Plan::of(c, in_hash);
            (p.op, p.uses_data, p.moved_out, p.new_key)
        };
        assert_eq!(plan(&create, false), (&b"s"[..], true, false, true));
        assert_eq!(plan(&grow, false), (&b"s"[..], true, true, true));
        assert_eq!(plan(&large, false), (&b"s"[..], true, false, false));
        assert_eq!(plan(&shrink, false), (&b"H"[..], true, false, false));
        assert_eq!(plan(&range_in, false), (&b"R"[..], false, false, false));
        assert_eq!(plan(&range_out, false), (&b"R"[..], true, false, true));
        assert_eq!(plan(&range_large, false), (&b"r"[..], true, false, false));
        // Kept in the hash: nothing names a data key any more.
        assert_eq!(plan(&create, true), (&b"h"[..], false, false, false));
        assert_eq!(plan(&grow, true), (&b"h"[..], false, false, false));
        assert_eq!(plan(&range_out, true), (&b"R"[..], false, false, false));
        assert_eq!(plan(&large, true), plan(&large, false));
        assert_eq!(plan(&range_large, true), plan(&range_large, false));
        assert!(names_data_key(&grow) && !names_data_key(&large));
    }

    fn bulk(b: &[u8]) -> Value {
        Value::BulkString(b.to_vec())
    }

    /// `HMGET r s d l` of a record at revision `rev`, last changed by `op`, its
    /// bytes in the data key.
    fn state(rev: &str, op: &str) -> Value {
        state_with(rev, op, Value::Nil)
    }

    /// The same with `d`, the bytes in the hash (`Nil`: none).
    fn state_with(rev: &str, op: &str, d: Value) -> Value {
        let packed = pack_state(
            &Identity([7; 32]),
            None,
            Access::from_bits_truncate(3),
            5,
            None,
        );
        Value::Array(vec![
            bulk(rev.as_bytes()),
            bulk(&packed),
            d,
            bulk(op.as_bytes()),
        ])
    }

    /// A plain try as the `Option`s it replaced: `None` read again, `Some(None)` no
    /// record.
    fn found(p: RedisResult<Plain>) -> RedisResult<Option<Option<Stored>>> {
        p.map(|p| match p {
            Plain::Found(f) => Some(f),
            Plain::Changed => None,
            Plain::Legacy => panic!("not a legacy record"),
        })
    }

    #[test]
    fn packed_states_round_trip_and_bad_ones_are_refused() {
        let owner = Identity([1; 32]);
        let payer = Identity([2; 32]);
        let all = Access::READ | Access::WRITE | Access::TAKEOVER;
        for (p, d) in [
            (None, None),
            (Some(&payer), None),
            (None, Some((1_700_000_000_000, 9))),
            (Some(&payer), Some((u64::MAX, 0))),
        ] {
            for (access, version) in [(Access::empty(), 1), (all, u64::MAX)] {
                let b = pack_state(&owner, p, access, version, d);
                assert_eq!(b.len(), 43 + p.map_or(0, |_| 32) + d.map_or(0, |_| 16));
                assert_eq!(
                    unpack_state(&b),
                    Some((owner, p.copied(), access, version, d))
                );
                // Any byte less or more, another format or an unknown flag.
                assert_eq!(unpack_state(&b[..b.len() - 1]), None);
                assert_eq!(unpack_state(&[&b[..], &[0]].concat()), None);
                let mut other = b.clone();
                other[0] = 2;
                assert_eq!(unpack_state(&other), None);
                other = b.clone();
                other[1] |= 4;
                assert_eq!(unpack_state(&other), None);
            }
        }
        assert_eq!(unpack_state(b""), None);
        // A record's state field says the same as the record.
        let rec = Stored {
            rev: 3,
            owner,
            payer: Some(payer),
            access: all,
            version: 8,
            deadline: Some((5, 6)),
            size: 0,
            data: None,
            inline: true,
            legacy: false,
        };
        let (name, b) = rec.state_field();
        assert_eq!(name, "s");
        assert_eq!(
            unpack_state(&b),
            Some((owner, Some(payer), all, 8, Some((5, 6))))
        );
        assert!(rec.legacy_fields().is_empty());
        let old = Stored {
            legacy: true,
            ..rec
        };
        assert_eq!(old.legacy_fields(), LEGACY_FIELDS);
    }

    #[test]
    fn records_of_the_earlier_layout_go_to_the_script() {
        // `r` without `s`: the state is in the legacy fields, which only `LOAD` reads.
        let legacy = || Value::Array(vec![bulk(b"4"), Value::Nil, bulk(b"hello"), bulk(b"g-1")]);
        let replies = vec![legacy(), Value::Int(0), bulk(b""), last("g-1")];
        assert_eq!(
            snapshot(replies, DataRead::Range(0, 3), Some((0, 3)), 16).unwrap(),
            Plain::Legacy
        );
        // The LOAD script's legacy fields, in their order after `r`.
        let items = [
            bulk(b"4"),
            bulk(&[7; 32]),
            bulk(&[8; 32]),
            bulk(b"3"),
            bulk(b"5"),
            bulk(b"100"),
            bulk(b"2"),
        ];
        let rec = stored_legacy(&items, 5, None).unwrap();
        assert!(rec.legacy);
        assert_eq!(
            (rec.rev, rec.owner, rec.payer, rec.version, rec.deadline),
            (
                4,
                Identity([7; 32]),
                Some(Identity([8; 32])),
                5,
                Some((100, 2))
            )
        );
        // A packed state that is not one is an error, not a guess.
        let bad_state = Value::Array(vec![bulk(b"4"), bulk(b"xyz"), bulk(b"hi"), bulk(b"g-1")]);
        let replies = vec![bad_state, Value::Int(0), bulk(b""), last("g-1")];
        assert!(snapshot(replies, DataRead::Range(0, 3), Some((0, 3)), 16).is_err());
    }

    #[test]
    fn bytes_in_the_hash_are_one_consistent_state() {
        let hashed = || state_with("4", "g-1", bulk(b"hello"));
        // Whatever the data key's commands and the last operation id said.
        for end in [last("g-1"), last("g-2"), Value::Nil] {
            let replies = vec![hashed(), Value::Int(0), bulk(b""), end];
            let rec = found(snapshot(replies, DataRead::Range(1, 3), Some((1, 3)), 16))
                .unwrap()
                .unwrap()
                .unwrap();
            assert!(rec.inline);
            assert_eq!((rec.rev, rec.size), (4, 5));
            assert_eq!(rec.data.as_deref(), Some(&b"ell"[..]));
        }
        let Value::Array(st) = hashed() else {
            unreachable!()
        };
        let at = |r| in_hash_record(&st, r).unwrap().unwrap().data;
        assert_eq!(at(Some((0, WHOLE))).as_deref(), Some(&b"hello"[..]));
        assert_eq!(
            at(Some((3, 99))).as_deref(),
            Some(&b"lo"[..]),
            "cut at the end"
        );
        assert_eq!(at(Some((5, 1))).as_deref(), Some(&b""[..]), "at the end");
        assert_eq!(at(Some((6, 1))), None, "past the end");
        assert_eq!(at(None), None, "no bytes asked for");
        let Value::Array(external) = state("4", "g-1") else {
            unreachable!()
        };
        assert!(in_hash_record(&external, Some((0, 1))).unwrap().is_none());
    }

    /// `HGET l` of a record last changed by `op`.
    fn last(op: &str) -> Value {
        bulk(op.as_bytes())
    }

    #[test]
    fn plain_loads_are_snapshots_only_when_nothing_changed_in_between() {
        let whole = Some((0, WHOLE));
        let got = |replies: Vec<Value>, fetched: bool| {
            let read = match fetched {
                true => DataRead::Range(0, 16),
                false => DataRead::Size,
            };
            found(snapshot(replies, read, whole, 16))
        };
        // Unchanged: the state, the size and the bytes.
        let rec = got(
            vec![state("4", "g-1"), Value::Int(3), bulk(b"abc"), last("g-1")],
            true,
        )
        .unwrap()
        .unwrap()
        .unwrap();
        assert_eq!((rec.rev, rec.version, rec.size), (4, 5, 3));
        assert_eq!(rec.owner, Identity([7; 32]));
        assert_eq!(rec.access, Access::from_bits_truncate(3));
        assert_eq!(rec.data.as_deref(), Some(&b"abc"[..]));
        // A commit in between (another operation id: a write, or the record deleted
        // and created again under the same pointer), or deleted in between.
        for end in [last("g-2"), last("h-1"), Value::Nil] {
            let replies = vec![state("4", "g-1"), Value::Int(3), bulk(b"abc"), end];
            assert_eq!(got(replies, true).unwrap(), None, "changed: read again");
        }
        // Created in between: missing at the first command is a consistent answer.
        let created = vec![
            Value::Array(vec![Value::Nil; 4]),
            Value::Int(0),
            last("g-3"),
        ];
        assert_eq!(got(created, false).unwrap(), None);
        let missing = vec![Value::Array(vec![Value::Nil; 4]), Value::Int(0), Value::Nil];
        assert_eq!(got(missing, false).unwrap(), Some(None));
        // Replies of the wrong shape are errors, not guesses.
        assert!(got(vec![state("4", "g-1"), Value::Int(3)], false).is_err());
        let short = vec![state("4", "g-1"), Value::Int(3), bulk(b"ab"), last("g-1")];
        assert!(got(short, true).is_err(), "fewer bytes than STRLEN says");
        // All of it with GET (an empty record has no data key).
        let all = |d: Value| {
            let replies = vec![state("4", "g-1"), d, last("g-1")];
            found(snapshot(replies, DataRead::Whole, whole, usize::MAX))
                .unwrap()
                .unwrap()
                .unwrap()
        };
        let rec = all(bulk(&[1; 40_000]));
        assert_eq!((rec.size, rec.data.unwrap().len()), (40_000, 40_000));
        let rec = all(Value::Nil);
        assert_eq!((rec.size, rec.data), (0, Some(Bytes::new())));
    }

    #[test]
    fn plain_loads_inline_only_small_ranges() {
        let fetched = || Some(b"abcd".to_vec());
        // The whole of a small record, a range, a range cut at the end.
        assert_eq!(
            inline_bytes(Some((0, 99)), 4, 16, fetched())
                .unwrap()
                .as_deref(),
            Some(&b"abcd"[..])
        );
        assert_eq!(
            inline_bytes(Some((1, 2)), 4, 16, Some(b"bc".to_vec()))
                .unwrap()
                .as_deref(),
            Some(&b"bc"[..])
        );
        assert_eq!(
            inline_bytes(Some((2, 9)), 4, 16, Some(b"cd".to_vec()))
                .unwrap()
                .as_deref(),
            Some(&b"cd"[..])
        );
        // Empty ranges, past the end, too big to inline, no range.
        assert_eq!(
            inline_bytes(Some((4, 9)), 4, 16, None).unwrap(),
            Some(Bytes::new())
        );
        assert_eq!(
            inline_bytes(Some((1, 0)), 4, 16, None).unwrap(),
            Some(Bytes::new())
        );
        assert_eq!(inline_bytes(Some((5, 1)), 4, 16, None).unwrap(), None);
        assert_eq!(
            inline_bytes(Some((0, 99)), 40, 16, fetched()).unwrap(),
            None
        );
        assert_eq!(inline_bytes(None, 4, 16, None).unwrap(), None);
    }

    #[test]
    fn slots_are_redis_clusters() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(slot_of("foo"), 12182);
        assert_eq!(
            slot_of("{user1000}.following"),
            slot_of("{user1000}.followers")
        );
        assert_eq!(slot_of("{}x"), slot_of("{}x"));
        assert_eq!(
            slot_of("ns:{r:0000000000000001}:m"),
            slot_of("r:0000000000000001")
        );
    }

    #[test]
    fn replicas_per_slot_range_come_from_cluster_nodes() {
        let nodes = "\
a 127.0.0.1:1@2 myself,master - 0 0 1 connected 0-5460
b 127.0.0.1:3@4 master - 0 0 2 connected 5461-10922
c 127.0.0.1:5@6 master - 0 0 3 connected 10923-16383
d 127.0.0.1:7@8 slave a 0 0 1 connected
e 127.0.0.1:9@10 slave,fail b 0 0 2 connected
";
        let r = Replicas::parse(nodes);
        let key_in = |lo: u16, hi: u16| {
            (0..100_000)
                .map(|i| format!("k{i}"))
                .find(|k| (lo..=hi).contains(&slot_of(k)))
                .unwrap()
        };
        assert_eq!(r.of(&key_in(0, 5460)), Some(1));
        assert_eq!(
            r.of(&key_in(5461, 10922)),
            Some(0),
            "a failing replica does not count"
        );
        assert_eq!(r.of(&key_in(10923, 16383)), Some(0));
        assert_eq!(Replicas::default().of("x"), None);
    }

    #[test]
    fn nodes_are_named_as_cluster_slots_names_them() {
        let nodes = "\
a 127.0.0.1:1@2,cache-a myself,master - 0 0 1 connected 0-5460
b 127.0.0.1:3@4,cache-b master - 0 0 2 connected 5461-16383
c 127.0.0.1:5@6,cache-c slave a 0 0 1 connected
d 127.0.0.1:7@8 master - 0 0 3 connected
";
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let node = |host: Value, port: i64, id: &str| {
            Value::Array(vec![host, Value::Int(port), bulk(id), Value::Array(vec![])])
        };
        let slots = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(5460),
                node(bulk("cache-a"), 1, "a"),
                // Unknown to the answering node, and no address: the crate skips
                // these, and so do the names.
                node(bulk("?"), 5, "c"),
            ]),
            Value::Array(vec![
                Value::Int(5461),
                Value::Int(16383),
                node(Value::Nil, 3, "b"),
            ]),
            Value::Int(7),
        ]);
        let mut r = Replicas::parse(nodes);
        r.name_as_routed(&slots);
        let name = |id: &str| r.nodes.get(id).cloned();
        assert_eq!(
            name("a"),
            Some(("cache-a".into(), 1)),
            "the endpoint routed to"
        );
        assert_eq!(name("b"), Some(("127.0.0.1".into(), 3)), "NULL: as before");
        assert_eq!(name("c"), Some(("127.0.0.1".into(), 5)), "`?`: as before");
        assert_eq!(name("d"), Some(("127.0.0.1".into(), 7)), "serves no slot");
        let before = r.nodes.clone();
        r.name_as_routed(&Value::Nil);
        assert_eq!(r.nodes, before, "garbage changes nothing");
    }

    #[test]
    fn the_primaries_serving_slots_change_when_a_replica_takes_over_only() {
        let serving = |nodes: &str| Replicas::parse(nodes).serving;
        let before = serving(
            "\
a 127.0.0.1:1@2 myself,master - 0 0 1 connected 0-5460
b 127.0.0.1:3@4 master - 0 0 2 connected 5461-10922 [5461->-a]
c 127.0.0.1:5@6 master - 0 0 3 connected 10923-16383
d 127.0.0.1:7@8 slave b 0 0 2 connected
",
        );
        assert_eq!(before, ["a", "b", "c"]);
        // Suspected down, then failed: it still serves its slots until its replica
        // takes over.
        let suspected = serving(
            "\
a 127.0.0.1:1@2 myself,master - 0 0 1 connected 0-5460
b 127.0.0.1:3@4 master,fail? - 0 0 2 connected 5461-10922
c 127.0.0.1:5@6 master - 0 0 3 connected 10923-16383
d 127.0.0.1:7@8 slave b 0 0 2 connected
",
        );
        assert_eq!(suspected, before);
        // Slots moved between primaries that keep some: no change.
        let moved = serving(
            "\
a 127.0.0.1:1@2 myself,master - 0 0 1 connected 0-6000
b 127.0.0.1:3@4 master - 0 0 2 connected 6001-10922
c 127.0.0.1:5@6 master - 0 0 3 connected 10923-16383
",
        );
        assert_eq!(moved, before);
        let taken_over = serving(
            "\
a 127.0.0.1:1@2 myself,master - 0 0 1 connected 0-5460
b 127.0.0.1:3@4 master,fail - 0 0 2 connected
c 127.0.0.1:5@6 master - 0 0 3 connected 10923-16383
d 127.0.0.1:7@8 master - 0 0 4 connected 5461-10922
",
        );
        assert_eq!(taken_over, ["a", "c", "d"]);
    }
}
