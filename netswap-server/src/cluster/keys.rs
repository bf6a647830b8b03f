//! Where everything lives in Redis Cluster. Every key carries a hash tag, so that all
//! the keys of one record (or of one identity) are in one hash slot and a script can
//! change them atomically.
//!
//! | key | type | what |
//! |---|---|---|
//! | `ns:{r:PTR}:m` | hash | a record's state: `o` owner, `p` payer (absent: the owner pays), `a` access bits, `v` version, `r` revision (+1 on every change), `x`/`g` its own orphan deadline (ms) and its owner's generation then (a record handed to an absent identity), `l` the last change's operation id, `d` the data when at most `scripts::IN_HASH` bytes (or a write grew them while the slot migrated away, see `redis_io::commit`), `w` watched (some gateway subscribes to its events), `m:OPID` "change OPID was committed" for the changes that move quota charges, until their quota entries are settled (for repairing quotas). A deleted record's hash stays as a tombstone of its markers only (no `r`; 7-day TTL) until they are settled |
//! | `ns:{r:PTR}:d` | string | the record's data when larger (absent otherwise) |
//! | `ns:{r:PTR}:e` | sharded channel | events of the record (SPUBLISHed by the commit) |
//! | `ns:{r:PTR}:E` | sharded channel | the same events with the bytes each data change wrote, published only while a gateway subscribes (it has data watches on the record) |
//! | `ns:{i:ID}:q` | hash | an identity's quota usage `n` records, `b` bytes, revision `r`, generation `g` (raised at each connect to Redis time in ms, or by 1 if that is later: it never repeats), offline-since `off` (ms), pending charges `p:OPID` |
//! | `ns:{i:ID}:l` | sorted set | the identity's leases: gateway id → lease expiry (ms) |
//! | `ns:{i:ID}:o` | set | pointers it owns (an index for reaping; may hold stale entries) |
//! | `ns:{i:ID}:k` | set | pointers it owns that another identity still pays for ("parked") |
//! | `ns:{reap}` | sorted set | `i:ID` or `r:PTR` → when to look at it for reaping (ms) |
//! | `ns:{reap}:lock` | string, TTL | which gateway is the reaper now |
//! | `ns:{b:N}` | never written | a key the read cache's barriers ask `EXISTS` of: one on a slot of the primary asked (`reads`) |
//!
//! `PTR` is 16 lowercase hex digits, `ID` 64. Times are Redis server time
//! (`TIME`) in milliseconds, so gateways' clocks do not matter. `ns` is the prefix
//! (`--redis-prefix`): several netswap deployments can share one cluster.

use netswap_proto::{Identity, Pointer};

/// The key names of one deployment (one prefix).
#[derive(Clone, Debug)]
pub(crate) struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.to_string(),
        }
    }

    pub fn record(&self, ptr: Pointer) -> RecordKeys {
        RecordKeys::of(&self.prefix, ptr)
    }

    pub fn identity(&self, id: &Identity) -> IdentityKeys {
        IdentityKeys::of(&self.prefix, id)
    }

    /// The reaper's schedule.
    pub fn reap(&self) -> String {
        format!("{}:{{reap}}", self.prefix)
    }

    /// Who reaps.
    pub fn reap_lock(&self) -> String {
        format!("{}:{{reap}}:lock", self.prefix)
    }

    /// The `n`th key the read cache may probe for (`EXISTS`) to learn that a node
    /// still serves its slot: `PREFIX:{b:N}`, never written.
    pub fn probe(&self, n: u32) -> String {
        format!("{}:{{b:{n}}}", self.prefix)
    }

    /// The pointer whose record's key `key` is (its state hash or its data).
    pub fn record_of(&self, key: &[u8]) -> Option<Pointer> {
        let s = std::str::from_utf8(key).ok()?;
        let rest = s.strip_prefix(self.prefix.as_str())?.strip_prefix(":{r:")?;
        let hex = rest
            .strip_suffix("}:m")
            .or_else(|| rest.strip_suffix("}:d"))?;
        if hex.len() != 16 {
            return None;
        }
        Pointer::new(u64::from_str_radix(hex, 16).ok()?)
    }

    /// The pointer a record event channel names, and whether it is the channel with
    /// the changed bytes (`…:E`).
    pub fn channel(&self, channel: &[u8]) -> Option<(Pointer, bool)> {
        let s = std::str::from_utf8(channel).ok()?;
        let rest = s.strip_prefix(self.prefix.as_str())?.strip_prefix(":{r:")?;
        let (hex, data) = match rest.strip_suffix("}:e") {
            Some(h) => (h, false),
            None => (rest.strip_suffix("}:E")?, true),
        };
        Some((hex.parse().ok()?, data))
    }
}

/// Keys of one record. Only the two every request uses are made up front (a READ
/// needs nothing else); the rest on demand.
pub(crate) struct RecordKeys {
    pub meta: String,
    pub data: String,
}

impl RecordKeys {
    fn of(prefix: &str, ptr: Pointer) -> RecordKeys {
        // `{prefix}:{r:PTR}:m`, PTR in 16 hex digits as `Pointer` displays it, built
        // without `format!`: its machinery was ~2% of a gateway's time per READ.
        let mut meta = String::with_capacity(prefix.len() + 24);
        meta.push_str(prefix);
        meta.push_str(":{r:");
        let v = ptr.get();
        meta.extend(
            (0..16)
                .rev()
                .map(|i| char::from_digit(((v >> (4 * i)) & 0xf) as u32, 16).expect("a hex digit")),
        );
        meta.push_str("}:m");
        let mut data = meta.clone();
        data.pop();
        data.push('d');
        RecordKeys { meta, data }
    }

    /// `PREFIX:{r:PTR}:` followed by `suffix`.
    fn with(&self, suffix: &str) -> String {
        let tag = &self.meta[..self.meta.len() - 1];
        let mut k = String::with_capacity(tag.len() + suffix.len());
        k.push_str(tag);
        k.push_str(suffix);
        k
    }

    /// The record's channel of events.
    pub fn events(&self) -> String {
        self.with("e")
    }

    /// The channel of events with the changed bytes.
    pub fn data_events(&self) -> String {
        self.with("E")
    }
}

/// The hash slot of every key of the record `ptr` (their hash tag, `r:PTR`, is the
/// same whatever the prefix), without building one.
pub(crate) fn record_slot(ptr: Pointer) -> u16 {
    use std::io::Write;
    let mut tag = [0u8; 18];
    write!(&mut tag[..], "r:{ptr}").expect("18 bytes: `r:` and 16 hex digits");
    redis_protocol::redis_keyslot(&tag)
}

/// The hash slot of every key of the identity `id` (their hash tag, `i:ID`), without
/// building one.
pub(crate) fn identity_slot(id: &Identity) -> u16 {
    use std::io::Write;
    let mut tag = [0u8; 66];
    write!(&mut tag[..], "i:{id}").expect("66 bytes: `i:` and 64 hex digits");
    redis_protocol::redis_keyslot(&tag)
}

/// Keys of one identity.
pub(crate) struct IdentityKeys {
    pub quota: String,
    pub leases: String,
    pub owned: String,
    pub parked: String,
}

impl IdentityKeys {
    fn of(prefix: &str, id: &Identity) -> IdentityKeys {
        let tag = format!("{prefix}:{{i:{id}}}");
        IdentityKeys {
            quota: format!("{tag}:q"),
            leases: format!("{tag}:l"),
            owned: format!("{tag}:o"),
            parked: format!("{tag}:k"),
        }
    }
}

/// A member of the reaper's schedule ([`Keys::reap`]) for an identity.
pub(crate) fn reap_identity(id: &Identity) -> String {
    format!("i:{id}")
}

/// A member of the reaper's schedule ([`Keys::reap`]) for a record with its own deadline.
pub(crate) fn reap_record(ptr: Pointer) -> String {
    format!("r:{ptr}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_records_slot_is_that_of_its_keys() {
        for p in [1, 0xabc, u64::MAX, 0x0123_4567_89ab_cdef] {
            let p = Pointer::new(p).unwrap();
            let meta = Keys::new("some:prefix").record(p).meta;
            assert_eq!(record_slot(p), crate::cluster::redis_io::slot_of(&meta));
        }
    }

    #[test]
    fn an_identitys_slot_is_that_of_its_keys() {
        let key = netswap_proto::IdentityKey::new([7; 32]);
        for last in [1, 2, 200] {
            let id = Identity::derive(&key, std::net::IpAddr::from([10, 0, 0, last]));
            let quota = Keys::new("some:prefix").identity(&id).quota;
            assert_eq!(
                identity_slot(&id),
                crate::cluster::redis_io::slot_of(&quota)
            );
        }
    }

    #[test]
    fn a_records_keys_share_one_slot_and_its_channel_names_it() {
        let p = Pointer::new(0xabc).unwrap();
        let keys = Keys::new("ns");
        let k = keys.record(p);
        assert_eq!(k.meta, "ns:{r:0000000000000abc}:m");
        assert_eq!(k.data, "ns:{r:0000000000000abc}:d");
        assert_eq!(k.events(), "ns:{r:0000000000000abc}:e");
        // The commit scripts make the channels so (`scripts::PUBLISH`).
        let tag = &k.meta[..k.meta.len() - 1];
        assert_eq!(k.events(), format!("{tag}e"));
        assert_eq!(k.data_events(), format!("{tag}E"));
        assert_eq!(keys.channel(k.events().as_bytes()), Some((p, false)));
        assert_eq!(keys.channel(k.data_events().as_bytes()), Some((p, true)));
        assert_eq!(keys.channel(b"ns:{r:zz}:e"), None);
        assert_eq!(keys.channel(b"ns:{r:0000000000000abc}:x"), None);
        assert_eq!(Keys::new("other").channel(k.events().as_bytes()), None);
        assert_eq!(keys.reap(), "ns:{reap}");
        assert_eq!(keys.record_of(k.meta.as_bytes()), Some(p));
        assert_eq!(keys.record_of(k.data.as_bytes()), Some(p));
        assert_eq!(keys.record_of(k.events().as_bytes()), None);
        assert_eq!(keys.record_of(b"ns:{r:abc}:m"), None);
        assert_eq!(
            keys.record_of(b"ns:{r:0000000000000000}:m"),
            None,
            "no null pointer"
        );
        assert_eq!(Keys::new("other").record_of(k.meta.as_bytes()), None);
        // Built by hand: the pointer as it displays, for any value.
        for v in [1, 0xfedc_ba98_7654_3210, u64::MAX, 0x8000_0000_0000_000a] {
            let p = Pointer::new(v).unwrap();
            assert_eq!(keys.record(p).meta, format!("ns:{{r:{p}}}:m"));
            assert_eq!(keys.record(p).data, format!("ns:{{r:{p}}}:d"));
        }
    }
}
