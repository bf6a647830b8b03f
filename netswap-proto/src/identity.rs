//! Client identities: `SHA-256(server_key || ip_bytes)`.
//!
//! An identity names everything a client owns. It is derived from the client's IP
//! address alone (by design: no tokens, no certificates), salted with a per-server
//! secret so that an identity does not reveal the address behind it. IPv4-mapped IPv6
//! addresses (`::ffff:a.b.c.d`) are the IPv4 address they map.

use std::fmt;
use std::net::IpAddr;

use sha2::{Digest, Sha256};

/// A 32-byte client identity.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity(pub [u8; 32]);

impl Identity {
    /// The identity of `ip` under `key`.
    pub fn derive(key: &IdentityKey, ip: IpAddr) -> Identity {
        let mut h = Sha256::new();
        h.update(&key.0);
        match normalize_ip(ip) {
            IpAddr::V4(v4) => h.update(v4.octets()),
            IpAddr::V6(v6) => h.update(v6.octets()),
        }
        Identity(h.finalize().into())
    }

    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Identity({self})")
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Why a string is not an [`Identity`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("an identity is 64 hex digits")]
pub struct ParseIdentityError;

impl std::str::FromStr for Identity {
    type Err = ParseIdentityError;
    fn from_str(s: &str) -> Result<Identity, ParseIdentityError> {
        if s.len() != 64 || !s.is_ascii() {
            return Err(ParseIdentityError);
        }
        let mut out = [0u8; 32];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| ParseIdentityError)?;
        }
        Ok(Identity(out))
    }
}

/// The per-server secret salting identities. Any length; 32 random bytes by default.
#[derive(Clone, PartialEq, Eq)]
pub struct IdentityKey(Vec<u8>);

impl IdentityKey {
    /// A key from raw bytes (e.g. the contents of `--identity-key FILE`).
    pub fn new(bytes: impl Into<Vec<u8>>) -> IdentityKey {
        IdentityKey(bytes.into())
    }
    /// The raw key bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for IdentityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IdentityKey({} bytes)", self.0.len())
    }
}

/// IPv4-mapped IPv6 addresses become IPv4; everything else is unchanged.
pub fn normalize_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_v6_is_the_same_identity_as_v4() {
        let k = IdentityKey::new(*b"k");
        let a = Identity::derive(&k, "127.0.0.2".parse().unwrap());
        let b = Identity::derive(&k, "::ffff:127.0.0.2".parse().unwrap());
        assert_eq!(a, b);
        let c = Identity::derive(&k, "127.0.0.3".parse().unwrap());
        assert_ne!(a, c);
        let other_key = Identity::derive(&IdentityKey::new(*b"j"), "127.0.0.2".parse().unwrap());
        assert_ne!(a, other_key);
    }

    #[test]
    fn identity_hex_round_trips() {
        let id = Identity([0xab; 32]);
        assert_eq!(id.to_string().parse::<Identity>(), Ok(id));
        assert!("ab".parse::<Identity>().is_err());
        assert!("zz".repeat(32).parse::<Identity>().is_err());
    }

    #[test]
    fn matches_plain_sha256_of_key_then_address() {
        // SHA-256("key" || 7f 00 00 01), computed independently.
        let id = Identity::derive(&IdentityKey::new(*b"key"), "127.0.0.1".parse().unwrap());
        let mut h = Sha256::new();
        h.update([b'k', b'e', b'y', 127, 0, 0, 1]);
        assert_eq!(id.0, <[u8; 32]>::from(h.finalize()));
    }
}
