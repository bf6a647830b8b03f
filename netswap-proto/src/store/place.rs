//! Pointers that say where their record is.
//!
//! A pointer the embedded store hands out is the encryption, under a key drawn at
//! random when the store is made, of where the record lives: its shard, its slot in
//! that shard, and the slot's generation (how many records the slot held before).
//! The cipher is Speck64/128 (RustCrypto's `speck-cipher`), a 64-bit block cipher: a
//! keyed permutation of the 64-bit numbers. So
//!
//! - a lookup decrypts the pointer and goes straight to the slot; the slot stores the
//!   whole pointer, so one comparison tells a live record from a stale or made-up
//!   pointer. No index: no memory for one and no cache misses walking it.
//! - pointers are exactly as hard to guess as random ones. Without the key the
//!   pointers of live records are indistinguishable from random 64-bit numbers; a
//!   guess names a live record with probability `live / 2^64`, as before.
//! - a slot used again gets the next generation, so a pointer to a deleted record
//!   never names the record that takes its slot. A slot whose generations run out is
//!   retired (never used again; 86 bytes per 2^24 or more reuses of one slot).
//! - the key lives only in memory. After a restart, pointers of the previous run (of
//!   records restored from a snapshot, or of records a crash lost) decrypt under the
//!   new key to random places: restored records are found through a small index of
//!   "foreign" pointers, and a lost record's pointer names nothing, with the same odds
//!   as a guess. Persisting the key would need every slot's generation persisted too
//!   (else a pointer lost in a crash would name the record that reuses its slot).
//!
//! The plaintext is `generation << (32 + s) | slot << s | shard`, with `s` the bits
//! of the shard count (at most [`MAX_SHARD_BITS`]); generations have `32 - s` bits.

use speck_cipher::Speck64_128;
use speck_cipher::cipher::{BlockCipherDecrypt, BlockCipherEncrypt, KeyInit};

/// At most 2^8 = 256 shards.
pub(crate) const MAX_SHARD_BITS: u32 = 8;

/// Where a pointer says its record is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Place {
    pub shard: usize,
    pub slot: u32,
    pub generation: u32,
}

/// Encrypts places into pointers and back.
#[derive(Clone)]
pub(crate) struct PlaceCodec {
    cipher: Speck64_128,
    shard_bits: u32,
}

impl std::fmt::Debug for PlaceCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlaceCodec")
            .field("shard_bits", &self.shard_bits)
            .finish_non_exhaustive()
    }
}

impl PlaceCodec {
    /// A codec for `shards` shards (a power of two, at most 2^[`MAX_SHARD_BITS`]),
    /// keyed by `key`.
    pub fn new(key: [u8; 16], shards: usize) -> PlaceCodec {
        assert!(shards.is_power_of_two() && shards <= 1 << MAX_SHARD_BITS);
        PlaceCodec {
            cipher: Speck64_128::new(&key.into()),
            shard_bits: shards.trailing_zeros(),
        }
    }

    /// A codec with a key from the operating system's random source.
    pub fn random(shards: usize) -> PlaceCodec {
        PlaceCodec::new(rand::random(), shards)
    }

    /// The largest generation a slot can have.
    pub fn max_generation(&self) -> u32 {
        u32::MAX >> self.shard_bits
    }

    /// The pointer of `place` (0 is possible and is not a valid pointer: the caller
    /// then uses the next generation).
    pub fn encode(&self, place: Place) -> u64 {
        debug_assert!(place.shard < 1 << self.shard_bits);
        debug_assert!(place.generation <= self.max_generation());
        let s = self.shard_bits;
        let plain = (u64::from(place.generation) << (32 + s))
            | (u64::from(place.slot) << s)
            | place.shard as u64;
        let mut block = plain.to_le_bytes().into();
        self.cipher.encrypt_block(&mut block);
        u64::from_le_bytes(block.into())
    }

    /// Where `ptr` says its record is (any 64-bit number decodes to some place).
    pub fn decode(&self, ptr: u64) -> Place {
        let mut block = ptr.to_le_bytes().into();
        self.cipher.decrypt_block(&mut block);
        let plain = u64::from_le_bytes(block.into());
        let s = self.shard_bits;
        Place {
            shard: (plain & ((1 << s) - 1)) as usize,
            slot: (plain >> s) as u32,
            generation: (plain >> (32 + s)) as u32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn places_round_trip_for_every_shard_layout() {
        for bits in 0..=MAX_SHARD_BITS {
            let c = PlaceCodec::new([7; 16], 1 << bits);
            let max = c.max_generation();
            assert_eq!(u64::from(max) + 1, 1 << (32 - bits));
            for (shard, slot, generation) in [
                (0, 0, 0),
                ((1 << bits) - 1, u32::MAX, max),
                (0, 12_345, 1),
                ((1 << bits) / 2, 1, max / 2),
            ] {
                let p = Place {
                    shard,
                    slot,
                    generation,
                };
                assert_eq!(c.decode(c.encode(p)), p, "{bits} shard bits: {p:?}");
            }
        }
    }

    #[test]
    fn neighbouring_places_give_unrelated_pointers() {
        let c = PlaceCodec::new([1; 16], 64);
        let mut seen = HashSet::new();
        let mut ones = 0u64;
        let n = 10_000u32;
        for slot in 0..n {
            let p = c.encode(Place {
                shard: 3,
                slot,
                generation: 0,
            });
            assert!(seen.insert(p));
            ones += u64::from(p.count_ones());
        }
        // Each bit set about half the time: nothing of the slot number shows.
        let mean = ones as f64 / f64::from(n);
        assert!((31.0..33.0).contains(&mean), "mean bits set {mean}");
        // Another key, other pointers.
        let d = PlaceCodec::new([2; 16], 64);
        let p = Place {
            shard: 3,
            slot: 5,
            generation: 0,
        };
        assert_ne!(c.encode(p), d.encode(p));
        assert_ne!(d.decode(c.encode(p)), p);
    }
}
