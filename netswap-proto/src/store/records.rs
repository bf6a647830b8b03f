//! Compact record storage for one shard.
//!
//! Records live in fixed-size pages of 86-byte slots (dense, never reallocated, freed
//! slots reused). A record's pointer says which slot it is in (see [`super::place`]):
//! a lookup decrypts it and compares the slot's pointer, with no index. Records that
//! came with pointers of an earlier run (restored from a snapshot) are found through
//! a small index of those "foreign" pointers instead. A slot holds the pointer, the
//! version, the access bits, a 4-byte reference to its owner in the shard's owner
//! table (each owner's `Arc` once per shard, not once per record) and the value:
//! inline up to [`INLINE`] bytes, else a 4-byte index into the shard's table of large
//! values, shared [`Bytes`] that replies send without copying. At a million 64-byte
//! records this is about 90 bytes per record, against about 215 for a hash map of
//! records with one allocation per value.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use hashbrown::HashTable;

use super::account::Account;
use super::place::{Place, PlaceCodec};
use crate::types::{Access, Version};

/// Values up to this size are held inline in the record.
pub(crate) const INLINE: usize = 64;
/// Records per page. Small pages let the allocator reuse what growing tables free
/// (99 against 101 bytes per record at a million with 1,024 slots). 285 slots are
/// 24,510 bytes, just under one of mimalloc's size classes (24 KiB): with 256 slots
/// (22,016 bytes) mimalloc rounded every page up by 11.6%, and the server (built with
/// mimalloc) took 100.2 instead of 89.6 bytes per 64 B record at a million; glibc,
/// which does not round pages up, takes 86.6 either way (docs/BENCHMARKS.md).
pub(crate) const PAGE: usize = 285;
/// `Slot::len` of a value held in the large-value table.
const LARGE: u8 = u8::MAX;
/// Values from this size up that the store lets go of are retired (freed after the
/// shard's lock is released, by [`Store::set_retire`](super::Store::set_retire)'s hook
/// when there is one) instead of where they were let go: freeing 64 MiB (`munmap` of its pages) took 1.3–2.8 ms of the event loop,
/// with the shard locked, in front of every other request (docs/BENCHMARKS.md).
pub(crate) const RETIRE_MIN: usize = 256 * 1024;

/// A record's bytes, outside the store (what goes in and comes out).
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
}

/// A stored record's bytes, borrowed.
#[derive(Clone, Copy, Debug)]
pub(crate) enum DataRef<'a> {
    Inline(&'a [u8]),
    Shared(&'a Bytes),
}

impl<'a> DataRef<'a> {
    pub(crate) fn as_slice(&self) -> &'a [u8] {
        match *self {
            DataRef::Inline(b) => b,
            DataRef::Shared(b) => b,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.as_slice().len()
    }

    /// The bytes from `start` to `end`, for a reply: large values are shared, small
    /// ones copied.
    pub(crate) fn slice(&self, start: usize, end: usize) -> Bytes {
        match *self {
            DataRef::Shared(b) if end - start > INLINE => b.slice(start..end),
            _ => Bytes::copy_from_slice(&self.as_slice()[start..end]),
        }
    }
}

/// Stores `item` in a free entry of `items` (an index from `free`) or a new one at the
/// end, and returns its index (the large-value and owner tables reuse freed entries).
fn put<T>(items: &mut Vec<T>, free: &mut Vec<u32>, item: T) -> u32 {
    match free.pop() {
        Some(i) => {
            items[i as usize] = item;
            i
        }
        None => {
            items.push(item);
            (items.len() - 1) as u32
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

/// A hint to the CPU to load the cache line of `p` (nothing is read; any address).
#[inline(always)]
fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch never faults and reads nothing the program can observe.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// A record going into the store or coming out of it.
#[derive(Debug)]
pub(crate) struct Record {
    pub ptr: u64,
    pub version: Version,
    pub owner: Arc<Account>,
    pub access: Access,
    pub data: Data,
}

/// A stored record, borrowed.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RecordRef<'a> {
    pub ptr: u64,
    pub version: Version,
    pub owner: &'a Arc<Account>,
    pub access: Access,
    pub data: DataRef<'a>,
}

/// One stored record: 86 bytes. `ptr` 0 is a free slot (pointers are never 0); a free
/// slot's `version` is the generation its next record gets, or [`RETIRED`].
#[derive(Clone, Copy)]
#[repr(C, packed(2))]
struct Slot {
    ptr: u64,
    version: u64,
    /// Index in the shard's owner table.
    owner: u32,
    access: u8,
    /// Length of the inline value, or [`LARGE`]: `buf[..4]` is then an index in the
    /// large-value table.
    len: u8,
    buf: [u8; INLINE],
}

/// `Slot::version` of a free slot whose generations ran out: it is never used again.
const RETIRED: u64 = u64::MAX;

/// A free slot whose next record gets `generation`.
const fn free_slot(generation: u64) -> Slot {
    Slot {
        ptr: 0,
        version: generation,
        owner: 0,
        access: 0,
        len: 0,
        buf: [0; INLINE],
    }
}

impl Slot {
    fn large(&self) -> Option<u32> {
        (self.len == LARGE).then(|| u32::from_le_bytes(self.buf[..4].try_into().expect("4 bytes")))
    }
}

/// An owner in the shard's table, with the number of its records there.
#[derive(Debug)]
struct Owner {
    account: Option<Arc<Account>>,
    records: u32,
}

/// The records of one shard.
pub(crate) struct Records {
    codec: PlaceCodec,
    /// This shard's number (in the pointers of its records).
    shard: usize,
    live: usize,
    pages: Vec<Vec<Slot>>,
    /// Free slots, each with its next generation in the slot.
    free: Vec<u32>,
    /// Records whose pointers do not say where they are (they came from a snapshot of
    /// an earlier run, whose key is gone): pointer → slot.
    foreign: HashTable<u32>,
    large: Vec<Bytes>,
    large_free: Vec<u32>,
    /// Large values let go of, to be freed outside the shard's lock ([`RETIRE_MIN`]).
    retired: Vec<Bytes>,
    owners: Vec<Owner>,
    owner_ids: HashMap<usize, u32>,
    owner_free: Vec<u32>,
}

impl std::fmt::Debug for Records {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Records")
            .field("shard", &self.shard)
            .field("len", &self.len())
            .field("foreign", &self.foreign.len())
            .finish()
    }
}

impl Records {
    /// The records of shard `shard`, whose pointers `codec` makes.
    pub(crate) fn new(codec: PlaceCodec, shard: usize) -> Records {
        Records {
            codec,
            shard,
            live: 0,
            pages: Vec::new(),
            free: Vec::new(),
            foreign: HashTable::new(),
            large: Vec::new(),
            large_free: Vec::new(),
            retired: Vec::new(),
            owners: Vec::new(),
            owner_ids: HashMap::new(),
            owner_free: Vec::new(),
        }
    }

    fn slot(&self, slot: u32) -> &Slot {
        &self.pages[slot as usize / PAGE][slot as usize % PAGE]
    }

    fn slot_mut(&mut self, slot: u32) -> &mut Slot {
        &mut self.pages[slot as usize / PAGE][slot as usize % PAGE]
    }

    /// The slot of record `ptr`, where `at` is the slot its pointer names (from
    /// [`PlaceCodec::decode`]): look it up once, then use [`Records::at`] and the
    /// setters.
    pub(crate) fn find_at(&self, ptr: u64, at: u32) -> Option<u32> {
        if self.named(at).is_some_and(|s| s.ptr == ptr) {
            return Some(at);
        }
        self.find_foreign(ptr)
    }

    fn find_foreign(&self, ptr: u64) -> Option<u32> {
        if self.foreign.is_empty() {
            return None;
        }
        let pages = &self.pages;
        self.foreign
            .find(ptr, |&s| {
                pages[s as usize / PAGE][s as usize % PAGE].ptr == ptr
            })
            .copied()
    }

    /// Slot `at`, if there is one (any number may come from a pointer).
    fn named(&self, at: u32) -> Option<&Slot> {
        self.pages
            .get(at as usize / PAGE)
            .and_then(|p| p.get(at as usize % PAGE))
    }

    /// Asks the CPU to start loading slot `at` (a hint: nothing is read).
    pub(crate) fn prefetch_slot(&self, at: u32) {
        if let Some(slot) = self.named(at) {
            let p = (slot as *const Slot).cast::<u8>();
            prefetch(p);
            // An 86-byte slot may end in the next cache line.
            prefetch(p.wrapping_add(std::mem::size_of::<Slot>() - 1));
        }
    }

    /// Asks the CPU to start loading the first `bytes` bytes of the value of record
    /// `ptr` in slot `at`, if it is there and held outside its slot.
    pub(crate) fn prefetch_value(&self, ptr: u64, at: u32, bytes: usize) {
        if let Some(i) = self
            .named(at)
            .filter(|s| s.ptr == ptr)
            .and_then(|s| s.large())
        {
            let value = &self.large[i as usize];
            let p = value.as_ptr();
            for off in (0..value.len().min(bytes)).step_by(64) {
                prefetch(p.wrapping_add(off));
            }
        }
    }

    /// The slot of record `ptr` (decrypting the pointer: where the caller has already
    /// done so, [`Records::find_at`]).
    pub(crate) fn find(&self, ptr: u64) -> Option<u32> {
        self.find_at(ptr, self.codec.decode(ptr).slot)
    }

    /// The record in `slot` (from [`Records::find`]).
    pub(crate) fn at(&self, slot: u32) -> RecordRef<'_> {
        let s = self.slot(slot);
        let data = match s.large() {
            Some(i) => DataRef::Shared(&self.large[i as usize]),
            None => DataRef::Inline(&s.buf[..s.len as usize]),
        };
        RecordRef {
            ptr: s.ptr,
            version: s.version,
            owner: self.owners[s.owner as usize]
                .account
                .as_ref()
                .expect("a record's owner is in the table"),
            access: Access::from_bits_retain(s.access),
            data,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.live
    }

    pub(crate) fn contains_key(&self, ptr: u64) -> bool {
        self.find(ptr).is_some()
    }

    pub(crate) fn get(&self, ptr: u64) -> Option<RecordRef<'_>> {
        self.find(ptr).map(|s| self.at(s))
    }

    pub(crate) fn set_version(&mut self, slot: u32, version: Version) {
        self.slot_mut(slot).version = version;
    }

    pub(crate) fn set_access(&mut self, slot: u32, access: Access) {
        self.slot_mut(slot).access = access.bits();
    }

    pub(crate) fn set_owner(&mut self, slot: u32, owner: Arc<Account>) {
        let old = self.slot(slot).owner;
        let new = self.intern(owner);
        self.slot_mut(slot).owner = new;
        self.unintern(old);
    }

    /// Lets go of a value: large ones wait in [`Records::take_retired`].
    pub(crate) fn retire(&mut self, b: Bytes) {
        if b.len() >= RETIRE_MIN {
            self.retired.push(b);
        }
    }

    /// The large values let go of since the last call.
    pub(crate) fn take_retired(&mut self) -> Vec<Bytes> {
        std::mem::take(&mut self.retired)
    }

    /// Replaces the value.
    pub(crate) fn set_data(&mut self, slot: u32, data: Data) {
        match data {
            Data::Inline { len, buf } => {
                if let Some(old) = self.free_large(slot) {
                    self.retire(old);
                }
                let s = self.slot_mut(slot);
                s.len = len;
                s.buf = buf;
            }
            Data::Shared(b) => match self.slot(slot).large() {
                Some(i) => {
                    let old = std::mem::replace(&mut self.large[i as usize], b);
                    self.retire(old);
                }
                None => {
                    let i = put(&mut self.large, &mut self.large_free, b);
                    let s = self.slot_mut(slot);
                    s.len = LARGE;
                    s.buf[..4].copy_from_slice(&i.to_le_bytes());
                }
            },
        }
    }

    /// Writes `src` at `off` (growing the value), in place when possible:
    /// copy-on-write when a reply still being sent holds the shared bytes.
    pub(crate) fn patch(&mut self, slot: u32, off: usize, src: &[u8]) {
        let end = off + src.len();
        match self.slot(slot).large() {
            None if end <= INLINE => {
                let s = self.slot_mut(slot);
                s.buf[off..end].copy_from_slice(src);
                s.len = (s.len as usize).max(end) as u8;
            }
            None => {
                let s = self.slot(slot);
                let b = grown(&s.buf[..s.len as usize], off, src);
                self.set_data(slot, Data::Shared(b));
            }
            Some(i) => {
                let shared = std::mem::take(&mut self.large[i as usize]);
                self.large[i as usize] = match shared.try_into_mut() {
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
        }
    }

    fn free_large(&mut self, slot: u32) -> Option<Bytes> {
        let i = self.slot(slot).large()?;
        self.slot_mut(slot).len = 0;
        self.large_free.push(i);
        Some(std::mem::take(&mut self.large[i as usize]))
    }

    fn intern(&mut self, owner: Arc<Account>) -> u32 {
        let key = Arc::as_ptr(&owner) as usize;
        if let Some(&i) = self.owner_ids.get(&key) {
            self.owners[i as usize].records += 1;
            return i;
        }
        let entry = Owner {
            account: Some(owner),
            records: 1,
        };
        let i = put(&mut self.owners, &mut self.owner_free, entry);
        self.owner_ids.insert(key, i);
        i
    }

    /// One record fewer for owner `i`; returns its account.
    fn unintern(&mut self, i: u32) -> Arc<Account> {
        let o = &mut self.owners[i as usize];
        o.records -= 1;
        if o.records > 0 {
            return o.account.clone().expect("an owner in use");
        }
        let account = o.account.take().expect("an owner in use");
        self.owner_ids.remove(&(Arc::as_ptr(&account) as usize));
        self.owner_free.push(i);
        account
    }

    /// A free slot: a freed one (with its next generation) or a new one
    /// (generation 0). `reuse`: false takes a new one (for foreign records: the slot
    /// of a foreign record has had no generation, so it is free at 0 again after).
    fn alloc(&mut self, reuse: bool) -> (u32, u32) {
        if reuse && let Some(s) = self.free.pop() {
            return (s, self.slot(s).version as u32);
        }
        if self.pages.last().is_none_or(|p| p.len() == PAGE) {
            self.pages.push(Vec::with_capacity(PAGE));
        }
        let page = self.pages.len() - 1;
        let p = self.pages.last_mut().expect("a page");
        p.push(free_slot(0));
        let slot = page * PAGE + p.len() - 1;
        (
            u32::try_from(slot).expect("fewer than 2^32 records in one shard"),
            0,
        )
    }

    /// Puts `record` (its `ptr` ignored) in a free slot and returns its new pointer:
    /// the encryption of where it is, a pointer no record had before in this store.
    pub(crate) fn create(&mut self, record: Record) -> u64 {
        let max = u64::from(self.codec.max_generation());
        let (slot, ptr) = loop {
            let (slot, generation) = self.alloc(true);
            let mut g = u64::from(generation);
            let ptr = loop {
                if g > max {
                    break None;
                }
                let p = self.codec.encode(Place {
                    shard: self.shard,
                    slot,
                    generation: g as u32,
                });
                // 0 is not a pointer; a foreign pointer may already name this place.
                if p != 0 && self.find_foreign(p).is_none() {
                    break Some(p);
                }
                g += 1;
            };
            match ptr {
                Some(p) => break (slot, p),
                None => *self.slot_mut(slot) = free_slot(RETIRED),
            }
        };
        self.fill(slot, Record { ptr, ..record });
        ptr
    }

    /// Inserts a record that keeps its pointer, from an earlier run (a snapshot). The
    /// caller makes sure the pointer is not present.
    pub(crate) fn insert_foreign(&mut self, record: Record) {
        let ptr = record.ptr;
        debug_assert!(ptr != 0, "pointers are never 0");
        let (slot, _) = self.alloc(false);
        self.fill(slot, record);
        let pages = &self.pages;
        self.foreign.insert_unique(ptr, slot, |&s| {
            pages[s as usize / PAGE][s as usize % PAGE].ptr
        });
    }

    fn fill(&mut self, slot: u32, record: Record) {
        let owner = self.intern(record.owner);
        *self.slot_mut(slot) = Slot {
            ptr: record.ptr,
            version: record.version,
            owner,
            access: record.access.bits(),
            len: 0,
            buf: [0; INLINE],
        };
        self.set_data(slot, record.data);
        self.live += 1;
    }

    /// Takes the record in `slot` (from [`Records::find`]) out; the slot's next record
    /// gets the next generation.
    pub(crate) fn remove_at(&mut self, slot: u32) -> Record {
        let ptr = self.slot(slot).ptr;
        let pages = &self.pages;
        let foreign = !self.foreign.is_empty()
            && match self.foreign.find_entry(ptr, |&s| {
                pages[s as usize / PAGE][s as usize % PAGE].ptr == ptr
            }) {
                Ok(e) => {
                    e.remove();
                    true
                }
                Err(_) => false,
            };
        let next = if foreign {
            // Its slot was new: no generation of it was ever handed out.
            0
        } else {
            let place = self.codec.decode(ptr);
            debug_assert_eq!((place.shard, place.slot), (self.shard, slot));
            u64::from(place.generation) + 1
        };
        let data = match self.free_large(slot) {
            Some(b) => Data::Shared(b),
            None => {
                let s = self.slot(slot);
                Data::Inline {
                    len: s.len,
                    buf: s.buf,
                }
            }
        };
        let s = *self.slot(slot);
        let owner = self.unintern(s.owner);
        self.live -= 1;
        if next > u64::from(self.codec.max_generation()) {
            *self.slot_mut(slot) = free_slot(RETIRED);
        } else {
            *self.slot_mut(slot) = free_slot(next);
            self.free.push(slot);
        }
        Record {
            ptr: s.ptr,
            version: s.version,
            owner,
            access: Access::from_bits_retain(s.access),
            data,
        }
    }

    /// Takes record `ptr` out, if it is here.
    #[cfg(test)]
    pub(crate) fn remove(&mut self, ptr: u64) -> Option<Record> {
        let slot = self.find(ptr)?;
        Some(self.remove_at(slot))
    }

    /// Number of pages (for walking the records a page at a time).
    pub(crate) fn pages(&self) -> usize {
        self.pages.len()
    }

    /// The records of page `i` (up to [`PAGE`]).
    pub(crate) fn page(&self, i: usize) -> impl Iterator<Item = RecordRef<'_>> {
        let start = i * PAGE;
        let len = self.pages.get(i).map_or(0, Vec::len);
        (0..len)
            .filter(move |k| self.pages[i][*k].ptr != 0)
            .map(move |k| self.at((start + k) as u32))
    }

    /// Every record, in no particular order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = RecordRef<'_>> {
        (0..self.pages.len()).flat_map(move |i| self.page(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;

    fn rec(ptr: u64, data: &[u8], owner: &Arc<Account>) -> Record {
        Record {
            ptr,
            version: 1,
            owner: owner.clone(),
            access: Access::empty(),
            data: Data::new(data, || Bytes::copy_from_slice(data)),
        }
    }

    fn records(shards: usize) -> Records {
        Records::new(PlaceCodec::new([9; 16], shards), 0)
    }

    #[test]
    fn a_slot_is_86_bytes() {
        assert_eq!(std::mem::size_of::<Slot>(), 86);
    }

    #[test]
    fn create_find_remove_and_reuse_slots() {
        let a = Arc::new(Account::new(Identity([1; 32])));
        let b = Arc::new(Account::new(Identity([2; 32])));
        let mut r = records(64);
        let mut ptrs = vec![0];
        for p in 1..=3000u64 {
            ptrs.push(r.create(rec(0, &p.to_be_bytes(), if p % 2 == 0 { &a } else { &b })));
        }
        assert_eq!(r.len(), 3000);
        assert_eq!(r.owners.iter().filter(|o| o.account.is_some()).count(), 2);
        // The pointer names the slot: a lookup goes straight there.
        let s77 = r.find(ptrs[77]).unwrap();
        assert_eq!(r.codec.decode(ptrs[77]).slot, s77);
        assert_eq!(r.at(s77).data.as_slice(), &77u64.to_be_bytes());
        assert!(Arc::ptr_eq(r.at(s77).owner, &b));
        let gone = r.remove(ptrs[77]).unwrap();
        assert_eq!(
            (gone.ptr, gone.data.as_slice()),
            (ptrs[77], &77u64.to_be_bytes()[..])
        );
        drop(gone);
        assert!(r.remove(ptrs[77]).is_none());
        assert!(!r.contains_key(ptrs[77]));
        // The freed slot is used again, under a new pointer; the old one names nothing.
        let again = r.create(rec(0, b"reuses the freed slot", &a));
        assert_ne!(again, ptrs[77]);
        assert_eq!(r.find(again), Some(s77));
        assert_eq!(r.codec.decode(again).generation, 1);
        assert!(r.get(ptrs[77]).is_none());
        assert_eq!(r.pages.iter().map(Vec::len).sum::<usize>(), 3000);
        assert_eq!(r.iter().count(), 3000);
        assert_eq!(
            r.get(ptrs[2999]).unwrap().data.as_slice(),
            &2999u64.to_be_bytes()
        );
        // Owners are counted: the last record of one takes it out of the table.
        for p in (1..=3000usize).filter(|p| p % 2 == 1 && *p != 77) {
            r.remove(ptrs[p]).unwrap();
        }
        assert_eq!(Arc::strong_count(&b), 1, "the table let go of b");
        let s = r.find(again).unwrap();
        r.set_owner(s, b.clone());
        assert!(Arc::ptr_eq(r.at(s).owner, &b));
        r.set_version(s, 9);
        r.set_access(s, Access::READ);
        let got = r.at(s);
        assert_eq!((got.version, got.access), (9, Access::READ));
        // Made-up pointers, and pointers naming slots past the end, name nothing.
        for guess in [1u64, u64::MAX, 0x1234_5678_9abc_def0] {
            assert!(r.get(guess).is_none());
        }
        assert!(r.find_at(again, u32::MAX).is_none());
    }

    #[test]
    fn a_slot_never_gives_the_same_pointer_twice_and_retires_when_out_of_generations() {
        // 256 shards: 24-bit generations. Make the slot's next generation the last
        // but one, then churn it.
        let a = Arc::new(Account::new(Identity([1; 32])));
        let mut r = records(256);
        let max = r.codec.max_generation();
        assert_eq!(max, (1 << 24) - 1);
        let first = r.create(rec(0, b"x", &a));
        let slot = r.find(first).unwrap();
        r.remove_at(slot);
        r.slot_mut(slot).version = u64::from(max - 1);
        let mut seen = std::collections::HashSet::from([first]);
        for _ in 0..2 {
            let p = r.create(rec(0, b"y", &a));
            assert_eq!(r.find(p), Some(slot));
            assert!(seen.insert(p), "a pointer came back");
            r.remove(p).unwrap();
        }
        // Generation `max` was the last: the slot is retired, the next record gets a
        // new one, and no old pointer names anything.
        assert!(r.free.is_empty());
        let p = r.create(rec(0, b"z", &a));
        assert_ne!(r.find(p), Some(slot));
        assert!(seen.iter().all(|&old| r.get(old).is_none()));
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn foreign_pointers_are_found_through_their_index_and_their_slots_reused() {
        let a = Arc::new(Account::new(Identity([1; 32])));
        let mut r = records(1);
        let native = r.create(rec(0, b"native", &a));
        let foreign: Vec<u64> = (1..=500u64)
            .map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15))
            .collect();
        for &f in &foreign {
            r.insert_foreign(rec(f, &f.to_le_bytes(), &a));
        }
        assert_eq!(r.len(), 501);
        for &f in &foreign {
            assert_eq!(r.get(f).unwrap().data.as_slice(), &f.to_le_bytes());
        }
        assert_eq!(r.get(native).unwrap().data.as_slice(), b"native");
        // A native pointer never equals a foreign one: make a foreign pointer name
        // the place the next record will take (the slot after the one the foreign
        // record itself takes), and see creation skip that generation.
        let next_slot = r.pages.iter().map(Vec::len).sum::<usize>() as u32 + 1;
        let clash = r.codec.encode(Place {
            shard: 0,
            slot: next_slot,
            generation: 0,
        });
        r.insert_foreign(rec(clash, b"clash", &a));
        let fresh = r.create(rec(0, b"fresh", &a));
        assert_ne!(fresh, clash);
        assert_eq!(
            r.codec.decode(fresh),
            Place {
                shard: 0,
                slot: next_slot,
                generation: 1
            }
        );
        assert_eq!(r.get(clash).unwrap().data.as_slice(), b"clash");
        assert_eq!(r.get(fresh).unwrap().data.as_slice(), b"fresh");
        // Removing foreign records empties their index and frees their slots.
        for &f in &foreign {
            r.remove(f).unwrap();
        }
        r.remove(clash).unwrap();
        assert!(r.foreign.is_empty());
        assert_eq!(r.len(), 2);
        let before = r.pages.iter().map(Vec::len).sum::<usize>();
        for _ in 0..501 {
            r.create(rec(0, b"reuse", &a));
        }
        assert_eq!(r.pages.iter().map(Vec::len).sum::<usize>(), before);
    }

    #[test]
    fn data_moves_between_inline_and_shared() {
        let a = Arc::new(Account::new(Identity([1; 32])));
        let mut r = records(64);
        let p5 = r.create(rec(0, b"abc", &a));
        let s = r.find(p5).unwrap();
        r.patch(s, 1, b"XY");
        assert_eq!(r.at(s).data.as_slice(), b"aXY");
        r.patch(s, 3, &[7; 100]);
        assert!(matches!(r.at(s).data, DataRef::Shared(_)));
        assert_eq!(r.at(s).data.len(), 103);
        let held = r.at(s).data.slice(0, 103);
        r.patch(s, 0, b"Z");
        assert_eq!(held[0], b'a', "a reply in flight keeps its bytes");
        assert_eq!(r.at(s).data.as_slice()[0], b'Z');
        assert_eq!(&r.at(s).data.slice(1, 3)[..], b"XY");
        // Back to inline: the large value's entry is reused by the next one.
        r.set_data(s, Data::new(b"small", || unreachable!()));
        assert_eq!(r.at(s).data.as_slice(), b"small");
        assert_eq!(r.large_free.len(), 1);
        let p6 = r.create(rec(0, &[1; 200], &a));
        assert!(r.large_free.is_empty());
        assert_eq!(r.get(p6).unwrap().data.len(), 200);
        let gone = r.remove(p6).unwrap();
        assert!(matches!(gone.data, Data::Shared(ref b) if b.len() == 200));
    }
}
