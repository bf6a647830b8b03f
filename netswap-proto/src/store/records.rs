//! Compact record storage for one shard.
//!
//! Records live in fixed-size pages (dense, never reallocated, freed slots reused);
//! an open-addressing index maps pointers to slot numbers (4 bytes per bucket plus
//! hashbrown's control byte). Values up to [`INLINE`] bytes are stored inside the
//! record, larger ones as shared [`Bytes`] that replies send without copying. At a
//! million 64-byte records this is about 115 bytes per record, against about 215 for a
//! hash map of records with one allocation per value.

use std::sync::Arc;

use bytes::Bytes;
use hashbrown::HashTable;

use super::account::Account;
use crate::types::{Access, Version};

/// Values up to this size are held inline in the record.
pub(crate) const INLINE: usize = 64;
/// Records per page.
const PAGE: usize = 1024;

/// A record's bytes: inline when small, shared when large.
#[derive(Clone, Debug)]
pub(crate) enum Data {
    Inline { len: u8, buf: [u8; INLINE] },
    Shared(Bytes),
}

impl Data {
    /// Small values are copied in; large ones go through `own`, which makes sure they
    /// do not pin a larger network buffer.
    pub(crate) fn from_bytes(bytes: Bytes, own: impl FnOnce(Bytes) -> Bytes) -> Data {
        if bytes.len() <= INLINE {
            Data::new(&bytes, || unreachable!("small values are inline"))
        } else {
            Data::Shared(own(bytes))
        }
    }

    /// Small values are copied in; large ones are made by `shared`.
    pub(crate) fn new(bytes: &[u8], shared: impl FnOnce() -> Bytes) -> Data {
        if bytes.len() <= INLINE {
            let mut buf = [0u8; INLINE];
            buf[..bytes.len()].copy_from_slice(bytes);
            Data::Inline {
                len: bytes.len() as u8,
                buf,
            }
        } else {
            Data::Shared(shared())
        }
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        match self {
            Data::Inline { len, buf } => &buf[..*len as usize],
            Data::Shared(b) => b,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.as_slice().len()
    }

    /// The bytes from `start` to `end`, for a reply: large values are shared, small
    /// ones copied.
    pub(crate) fn slice(&self, start: usize, end: usize) -> Bytes {
        match self {
            Data::Shared(b) if end - start > INLINE => b.slice(start..end),
            _ => Bytes::copy_from_slice(&self.as_slice()[start..end]),
        }
    }

    /// Writes `src` at `off` (growing the value), in place when possible:
    /// copy-on-write when a reply still being sent holds the shared bytes.
    pub(crate) fn patch(&mut self, off: usize, src: &[u8]) {
        let end = off + src.len();
        match self {
            Data::Inline { len, buf } if end <= INLINE => {
                buf[off..end].copy_from_slice(src);
                *len = (*len as usize).max(end) as u8;
            }
            Data::Shared(b) => {
                let shared = std::mem::take(b);
                *b = match shared.try_into_mut() {
                    Ok(mut m) => {
                        if end > m.len() {
                            m.resize(end, 0);
                        }
                        m[off..end].copy_from_slice(src);
                        m.freeze()
                    }
                    Err(shared) => grown(&shared, off, src),
                };
            }
            Data::Inline { .. } => *self = Data::Shared(grown(self.as_slice(), off, src)),
        }
    }
}

fn grown(old: &[u8], off: usize, src: &[u8]) -> Bytes {
    let end = off + src.len();
    let mut v = Vec::with_capacity(old.len().max(end));
    v.extend_from_slice(old);
    if end > v.len() {
        v.resize(end, 0);
    }
    v[off..end].copy_from_slice(src);
    Bytes::from(v)
}

/// One record.
#[derive(Debug)]
pub(crate) struct Record {
    pub ptr: u64,
    pub version: Version,
    pub owner: Arc<Account>,
    pub access: Access,
    pub data: Data,
}

/// The records of one shard.
#[derive(Debug, Default)]
pub(crate) struct Records {
    index: HashTable<u32>,
    pages: Vec<Vec<Option<Record>>>,
    free: Vec<u32>,
}

impl Records {
    fn slot(&self, slot: u32) -> &Option<Record> {
        &self.pages[slot as usize / PAGE][slot as usize % PAGE]
    }

    fn slot_mut(&mut self, slot: u32) -> &mut Option<Record> {
        &mut self.pages[slot as usize / PAGE][slot as usize % PAGE]
    }

    fn find(&self, ptr: u64) -> Option<u32> {
        // Pointers are random: they are their own hash.
        let pages = &self.pages;
        self.index
            .find(ptr, |&s| {
                pages[s as usize / PAGE][s as usize % PAGE]
                    .as_ref()
                    .is_some_and(|r| r.ptr == ptr)
            })
            .copied()
    }

    pub(crate) fn len(&self) -> usize {
        self.index.len()
    }

    pub(crate) fn contains_key(&self, ptr: u64) -> bool {
        self.find(ptr).is_some()
    }

    pub(crate) fn get(&self, ptr: u64) -> Option<&Record> {
        let s = self.find(ptr)?;
        self.slot(s).as_ref()
    }

    pub(crate) fn get_mut(&mut self, ptr: u64) -> Option<&mut Record> {
        let s = self.find(ptr)?;
        self.slot_mut(s).as_mut()
    }

    /// Inserts a record whose pointer is not present.
    pub(crate) fn insert(&mut self, record: Record) {
        let ptr = record.ptr;
        let slot = match self.free.pop() {
            Some(s) => {
                *self.slot_mut(s) = Some(record);
                s
            }
            None => {
                if self.pages.last().is_none_or(|p| p.len() == PAGE) {
                    self.pages.push(Vec::with_capacity(PAGE));
                }
                let page = self.pages.len() - 1;
                let p = self.pages.last_mut().expect("a page");
                p.push(Some(record));
                (page * PAGE + p.len() - 1) as u32
            }
        };
        let pages = &self.pages;
        self.index.insert_unique(ptr, slot, |&s| {
            pages[s as usize / PAGE][s as usize % PAGE]
                .as_ref()
                .map_or(0, |r| r.ptr)
        });
    }

    pub(crate) fn remove(&mut self, ptr: u64) -> Option<Record> {
        let pages = &self.pages;
        let entry = self
            .index
            .find_entry(ptr, |&s| {
                pages[s as usize / PAGE][s as usize % PAGE]
                    .as_ref()
                    .is_some_and(|r| r.ptr == ptr)
            })
            .ok()?;
        let (slot, _) = entry.remove();
        let record = self.slot_mut(slot).take();
        self.free.push(slot);
        record
    }

    /// Number of pages (for walking the records a page at a time).
    pub(crate) fn pages(&self) -> usize {
        self.pages.len()
    }

    /// The records of page `i` (up to 1,024).
    pub(crate) fn page(&self, i: usize) -> impl Iterator<Item = &Record> {
        self.pages
            .get(i)
            .into_iter()
            .flatten()
            .filter_map(Option::as_ref)
    }

    /// Every record, in no particular order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Record> {
        self.pages.iter().flatten().filter_map(Option::as_ref)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;

    fn rec(ptr: u64, data: &[u8]) -> Record {
        Record {
            ptr,
            version: 1,
            owner: Arc::new(Account::new(Identity([0; 32]))),
            access: Access::empty(),
            data: Data::new(data, || Bytes::copy_from_slice(data)),
        }
    }

    #[test]
    fn insert_find_remove_and_reuse_slots() {
        let mut r = Records::default();
        for p in 1..=3000u64 {
            r.insert(rec(p.wrapping_mul(0x9E37_79B9_7F4A_7C15), &p.to_be_bytes()));
        }
        assert_eq!(r.len(), 3000);
        let key = |p: u64| p.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        assert_eq!(
            r.get(key(77)).unwrap().data.as_slice(),
            &77u64.to_be_bytes()
        );
        assert!(r.remove(key(77)).is_some());
        assert!(r.remove(key(77)).is_none());
        assert!(!r.contains_key(key(77)));
        r.insert(rec(key(5000), b"reuses the freed slot"));
        assert_eq!(r.pages.iter().map(Vec::len).sum::<usize>(), 3000);
        assert_eq!(r.iter().count(), 3000);
        assert_eq!(
            r.get(key(2999)).unwrap().data.as_slice(),
            &2999u64.to_be_bytes()
        );
    }

    #[test]
    fn data_moves_between_inline_and_shared() {
        let mut d = Data::new(b"abc", || unreachable!());
        d.patch(1, b"XY");
        assert_eq!(d.as_slice(), b"aXY");
        d.patch(3, &[7; 100]);
        assert!(matches!(d, Data::Shared(_)));
        assert_eq!(d.len(), 103);
        let held = d.slice(0, 103);
        d.patch(0, b"Z");
        assert_eq!(held[0], b'a', "a reply in flight keeps its bytes");
        assert_eq!(d.as_slice()[0], b'Z');
        assert_eq!(&d.slice(1, 3)[..], b"XY");
    }
}
