//! Talking to Redis Cluster: the connection, typed loads and commits of records,
//! and errors turned into BUSY replies. Slot routing, pipelining, topology changes and
//! reconnects are the `redis` crate's (`cluster-async`).

use std::time::{Duration, Instant};

use bytes::Bytes;
use netswap_proto::{Access, Identity, Reply, Status, Version};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, SingleNodeRoutingInfo, SlotAddr};
use redis::{RedisError, RedisResult, Script, Value};

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
}

impl Stored {
    /// Who pays for the record.
    pub fn payer(&self) -> Identity {
        self.payer.unwrap_or(self.owner)
    }
}

/// How a commit went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Committed {
    Yes,
    /// The record changed (or exists, or is gone) since it was loaded: decide again.
    Changed,
    /// The fence passed: the change was not applied and never will be.
    Fenced,
}

/// What a commit changes (see `scripts::COMMIT`).
#[derive(Debug, Default)]
pub(crate) struct Change {
    /// Expected revision; `None`: the record must not exist (a create).
    pub expected: Option<u64>,
    /// Redis time (ms) after which the change must not apply (0 = none).
    pub fence: u64,
    /// Event to publish to watchers.
    pub event: Option<Vec<u8>>,
    pub data: DataOp,
    /// Marks the change as committed, for quota repair.
    pub op: Option<String>,
    pub set: Vec<(&'static str, Vec<u8>)>,
    pub del: Vec<&'static str>,
}

#[derive(Debug, Default)]
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

/// Runs `script` with `keys` and `args`.
pub(crate) async fn run(
    conn: &ClusterConnection,
    script: &Script,
    keys: &[&str],
    args: &[&[u8]],
) -> RedisResult<Value> {
    let mut inv = script.prepare_invoke();
    for k in keys {
        inv.key(*k);
    }
    for a in args {
        inv.arg(*a);
    }
    inv.invoke_async(&mut conn.clone()).await
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

/// Loads a record, with the bytes of `[start, start+len)` when they are at most
/// `max_inline` (`len` `None`: no bytes).
pub(crate) async fn load(
    conn: &ClusterConnection,
    k: &RecordKeys,
    range: Option<(u64, u64)>,
    max_inline: usize,
) -> RedisResult<Option<Stored>> {
    let (start, len) = match range {
        Some((s, n)) => (s.to_string(), n.to_string()),
        None => ("0".into(), "-1".into()),
    };
    let v = run(
        conn,
        &scripts::LOAD,
        &[&k.meta, &k.data],
        &[
            start.as_bytes(),
            len.as_bytes(),
            max_inline.to_string().as_bytes(),
        ],
    )
    .await?;
    let items = match v {
        Value::Nil => return Ok(None),
        Value::Array(items) if items.len() == 9 => items,
        Value::Boolean(false) => return Ok(None),
        other => return Err(bad(&format!("LOAD gave {other:?}"))),
    };
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
    let size = int(&items[7]).ok_or_else(|| bad("size"))? as u64;
    let data = match &items[8] {
        Value::BulkString(b) => Some(Bytes::from(b.clone())),
        _ => None,
    };
    Ok(Some(Stored {
        rev,
        owner,
        payer,
        access,
        version,
        deadline,
        size,
        data,
    }))
}

/// Reads `[start, end)` of a record still at revision `rev` (`None`: it changed).
pub(crate) async fn range(
    conn: &ClusterConnection,
    k: &RecordKeys,
    rev: u64,
    start: u64,
    end: u64,
) -> RedisResult<Option<Bytes>> {
    let v = run(
        conn,
        &scripts::RANGE,
        &[&k.meta, &k.data],
        &[
            rev.to_string().as_bytes(),
            start.to_string().as_bytes(),
            end.to_string().as_bytes(),
        ],
    )
    .await?;
    match v {
        Value::Array(items) => match items.as_slice() {
            [first] if int(first) == Some(0) => Ok(None),
            [first, Value::BulkString(b)] if int(first) == Some(1) => {
                Ok(Some(Bytes::from(b.clone())))
            }
            [first, _] if int(first) == Some(1) => Ok(Some(Bytes::new())),
            _ => Err(bad("RANGE")),
        },
        other => Err(bad(&format!("RANGE gave {other:?}"))),
    }
}

/// Applies a decided change to a record if it is at the expected revision. With
/// `wait_replicas > 0` the commit is followed, on the same connection to the
/// record's primary, by `WAIT`, so that the change is on that many replicas before
/// it is acknowledged.
pub(crate) async fn commit(
    conn: &ClusterConnection,
    k: &RecordKeys,
    change: Change,
    wait_replicas: u32,
) -> RedisResult<Committed> {
    let op_key = change.op.as_ref().map(|o| k.op(o));
    let keys = [
        k.meta.as_str(),
        k.data.as_str(),
        op_key.as_deref().unwrap_or(k.meta.as_str()),
        k.events.as_str(),
    ];
    let expected = change.expected.map(|r| r.to_string()).unwrap_or_default();
    let fence = change.fence.to_string();
    let (data_op, offset, data): (&[u8], String, Bytes) = match change.data {
        DataOp::None => (b"n", "0".into(), Bytes::new()),
        DataOp::Set(b) => (b"s", "0".into(), b),
        DataOp::Range(off, b) => (b"r", off.to_string(), b),
        DataOp::DeleteRecord => (b"d", "0".into(), Bytes::new()),
    };
    let n_set = change.set.len().to_string();
    let n_del = change.del.len().to_string();
    let event = change.event.unwrap_or_default();
    let op = change.op.unwrap_or_default();
    let mut args: Vec<&[u8]> = vec![
        expected.as_bytes(),
        fence.as_bytes(),
        &event,
        data_op,
        offset.as_bytes(),
        &data,
        op.as_bytes(),
        n_set.as_bytes(),
    ];
    for (f, v) in &change.set {
        args.push(f.as_bytes());
        args.push(v);
    }
    args.push(n_del.as_bytes());
    for f in &change.del {
        args.push(f.as_bytes());
    }
    let v = if wait_replicas == 0 {
        run(conn, &scripts::COMMIT, &keys, &args).await?
    } else {
        commit_and_wait(conn, &keys, &args, wait_replicas).await?
    };
    match v {
        Value::Array(items) => match items.first().and_then(int) {
            Some(1) => Ok(Committed::Yes),
            Some(0) => Ok(Committed::Changed),
            Some(-1) => Ok(Committed::Fenced),
            _ => Err(bad("COMMIT")),
        },
        other => Err(bad(&format!("COMMIT gave {other:?}"))),
    }
}

/// How long `WAIT` may wait for replicas.
const WAIT_MS: u64 = 1000;

async fn commit_and_wait(
    conn: &ClusterConnection,
    keys: &[&str],
    args: &[&[u8]],
    replicas: u32,
) -> RedisResult<Value> {
    let route = SingleNodeRoutingInfo::SpecificNode(Route::with_key(keys[0], SlotAddr::Master));
    for attempt in 0..2 {
        let mut inv = scripts::COMMIT.prepare_invoke();
        for k in keys {
            inv.key(*k);
        }
        for a in args {
            inv.arg(*a);
        }
        let mut pipe = redis::pipe();
        pipe.invoke_script(&inv)
            .cmd("WAIT")
            .arg(replicas)
            .arg(WAIT_MS);
        match conn.clone().route_pipeline(pipe, 0, 2, route.clone()).await {
            Ok(mut values) if values.len() == 2 => {
                if int(&values[1]).is_some_and(|n| n < replicas as i64) {
                    tracing::warn!(
                        replicas,
                        "WAIT: fewer replicas than asked acknowledged a write within {WAIT_MS} ms"
                    );
                }
                return Ok(values.swap_remove(0));
            }
            Ok(_) => return Err(bad("COMMIT+WAIT")),
            Err(e)
                if attempt == 0
                    && e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
            {
                inv.load_async(&mut conn.clone()).await?;
            }
            Err(e) => return Err(e),
        }
    }
    Err(bad("COMMIT+WAIT after loading the script"))
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

/// A deadline for a change (for fences), `ahead` from Redis time now as estimated.
pub(crate) fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}
