//! The snapshot file format of the embedded store (`docs/SNAPSHOT.md`).
//!
//! A snapshot is a 64-byte header and a sequence of checksummed blocks:
//! record blocks, then one end block with the totals. Records are entries inside
//! record blocks; a large record's data continues in the entries of the blocks after
//! it, so no block is larger than [`BLOCK_BYTES`] (plus one entry header).
//!
//! The reader treats the file as hostile input: every checksum is verified before a
//! byte of a block is used, every size is checked against the configured limits
//! before anything is allocated for it, and every error names the byte offset in the
//! file where the bad block or entry starts. No clock and no file handling here: the
//! server opens, fsyncs and renames files; this module only encodes and decodes.

use std::io::{self, Read, Write};

use bytes::{Bytes, BytesMut};
use sha2::{Digest, Sha256};

use crate::identity::{Identity, IdentityKey};
use crate::types::{Access, Pointer, Version};

/// The first 8 bytes of every snapshot.
pub const MAGIC: [u8; 8] = *b"NSWPSNAP";
/// The format version this crate writes and reads.
pub const FORMAT_VERSION: u16 = 1;
/// Header size.
pub const HEADER_BYTES: usize = 64;
/// Payload bytes the writer puts in one block, at most.
pub const BLOCK_BYTES: usize = 1 << 20;
/// Largest block payload the reader accepts (room for a block of [`BLOCK_BYTES`]
/// plus its last entry's header).
pub const MAX_BLOCK_PAYLOAD: u32 = BLOCK_BYTES as u32 + 4096;

const BLOCK_RECORDS: u8 = 1;
const BLOCK_END: u8 = 2;
const ENTRY_RECORD: u8 = 1;
const ENTRY_DATA: u8 = 2;
/// kind u8, payload length u32.
const BLOCK_HEADER: usize = 5;
/// Entry tag, pointer, owner, payer flag, access, version, size, bytes here.
const RECORD_ENTRY_FIXED: usize = 1 + 8 + 32 + 1 + 1 + 8 + 8 + 4;

/// One record as stored in a snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotRecord {
    /// Its pointer.
    pub ptr: Pointer,
    /// Its owner.
    pub owner: Identity,
    /// Who pays for it when that is not the owner (a record handed to an identity
    /// that had not connected since).
    pub payer: Option<Identity>,
    /// Access bits for others.
    pub access: Access,
    /// Its version.
    pub version: Version,
    /// Its data.
    pub data: Bytes,
}

/// What an end block says, checked against what was read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SnapshotTotals {
    /// Records in the snapshot.
    pub records: u64,
    /// Data bytes in the snapshot.
    pub bytes: u64,
}

/// Limits the reader enforces on a snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotLimits {
    /// Largest record (the server's `--max-record-bytes`).
    pub max_record_bytes: u64,
}

/// Why a snapshot cannot be loaded: what is wrong, and at which byte of the file.
#[derive(Debug, thiserror::Error)]
#[error("at byte {offset}: {what}")]
pub struct SnapshotError {
    /// Offset in the file of the header, block or entry at fault.
    pub offset: u64,
    /// What is wrong.
    pub what: String,
    /// The I/O error, when reading failed.
    #[source]
    pub io: Option<io::Error>,
}

impl SnapshotError {
    fn at(offset: u64, what: impl Into<String>) -> SnapshotError {
        SnapshotError {
            offset,
            what: what.into(),
            io: None,
        }
    }
}

/// A fingerprint of the identity key, stored in the header: a snapshot written with
/// another key would map every address to another identity, so it is refused.
pub fn key_fingerprint(key: &IdentityKey) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"netswap snapshot identity key v1");
    h.update(key.as_bytes());
    h.finalize().into()
}

/// Writes a snapshot to `W`. Call [`SnapshotWriter::finish`] at the end: without the
/// end block, a reader reports the file as truncated.
#[derive(Debug)]
pub struct SnapshotWriter<W: Write> {
    out: W,
    block: Vec<u8>,
    totals: SnapshotTotals,
}

impl<W: Write> SnapshotWriter<W> {
    /// Writes the header. `created_unix_ms` is informational.
    pub fn new(mut out: W, key: &IdentityKey, created_unix_ms: u64) -> io::Result<Self> {
        let mut h = [0u8; HEADER_BYTES];
        h[..8].copy_from_slice(&MAGIC);
        h[8..10].copy_from_slice(&FORMAT_VERSION.to_be_bytes());
        // 10..12 flags, 12..20 reserved: zero.
        h[20..52].copy_from_slice(&key_fingerprint(key));
        h[52..60].copy_from_slice(&created_unix_ms.to_be_bytes());
        let crc = crc32fast::hash(&h[..60]);
        h[60..64].copy_from_slice(&crc.to_be_bytes());
        out.write_all(&h)?;
        Ok(SnapshotWriter {
            out,
            block: Vec::with_capacity(BLOCK_BYTES + RECORD_ENTRY_FIXED + 32),
            totals: SnapshotTotals::default(),
        })
    }

    /// Adds one record.
    pub fn write(&mut self, r: &SnapshotRecord) -> io::Result<()> {
        let b = &mut self.block;
        b.push(ENTRY_RECORD);
        b.extend_from_slice(&r.ptr.to_be_bytes());
        b.extend_from_slice(&r.owner.0);
        match &r.payer {
            Some(p) => {
                b.push(1);
                b.extend_from_slice(&p.0);
            }
            None => b.push(0),
        }
        b.push(r.access.bits());
        b.extend_from_slice(&r.version.to_be_bytes());
        b.extend_from_slice(&(r.data.len() as u64).to_be_bytes());
        let room = BLOCK_BYTES.saturating_sub(b.len() + 4);
        let here = r.data.len().min(room);
        b.extend_from_slice(&(here as u32).to_be_bytes());
        b.extend_from_slice(&r.data[..here]);
        let mut rest = &r.data[here..];
        while !rest.is_empty() {
            self.flush_block()?;
            let n = rest.len().min(BLOCK_BYTES - 5);
            self.block.push(ENTRY_DATA);
            self.block.extend_from_slice(&(n as u32).to_be_bytes());
            self.block.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
        }
        if self.block.len() >= BLOCK_BYTES - RECORD_ENTRY_FIXED - 32 {
            self.flush_block()?;
        }
        self.totals.records += 1;
        self.totals.bytes += r.data.len() as u64;
        Ok(())
    }

    fn write_block(&mut self, kind: u8) -> io::Result<()> {
        let mut header = [0u8; BLOCK_HEADER];
        header[0] = kind;
        header[1..5].copy_from_slice(&(self.block.len() as u32).to_be_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(&header);
        crc.update(&self.block);
        self.out.write_all(&header)?;
        self.out.write_all(&self.block)?;
        self.out.write_all(&crc.finalize().to_be_bytes())?;
        self.block.clear();
        Ok(())
    }

    fn flush_block(&mut self) -> io::Result<()> {
        if self.block.is_empty() {
            return Ok(());
        }
        self.write_block(BLOCK_RECORDS)
    }

    /// Writes the last records and the end block; returns the totals and the writer
    /// (the caller flushes and fsyncs it).
    pub fn finish(mut self) -> io::Result<(SnapshotTotals, W)> {
        self.flush_block()?;
        self.block
            .extend_from_slice(&self.totals.records.to_be_bytes());
        self.block
            .extend_from_slice(&self.totals.bytes.to_be_bytes());
        self.write_block(BLOCK_END)?;
        self.out.flush()?;
        Ok((self.totals, self.out))
    }
}

/// Reads a snapshot from `R`, record by record. See the module documentation.
#[derive(Debug)]
pub struct SnapshotReader<R: Read> {
    input: R,
    limits: SnapshotLimits,
    /// File offset of the next unread byte.
    offset: u64,
    /// The current block's payload, and where it started in the file.
    block: Bytes,
    block_at: u64,
    pos: usize,
    totals: SnapshotTotals,
    ended: bool,
    created_unix_ms: u64,
    /// Where the last record returned starts in the file.
    record_at: u64,
}

impl<R: Read> SnapshotReader<R> {
    /// Reads and checks the header: magic, format version, checksum, and that the
    /// snapshot was written with `key`.
    pub fn new(
        mut input: R,
        key: &IdentityKey,
        limits: SnapshotLimits,
    ) -> Result<Self, SnapshotError> {
        let mut h = [0u8; HEADER_BYTES];
        read_exact(&mut input, &mut h, 0, "the header")?;
        if h[..8] != MAGIC {
            return Err(SnapshotError::at(0, "not a netswap snapshot (bad magic)"));
        }
        let version = u16::from_be_bytes([h[8], h[9]]);
        if crc32fast::hash(&h[..60]) != u32::from_be_bytes(h[60..64].try_into().expect("4")) {
            return Err(SnapshotError::at(
                0,
                "header checksum mismatch (corrupt header)",
            ));
        }
        if version != FORMAT_VERSION {
            return Err(SnapshotError::at(
                8,
                format!("format version {version}; this server reads version {FORMAT_VERSION}"),
            ));
        }
        if h[20..52] != key_fingerprint(key) {
            return Err(SnapshotError::at(
                20,
                "written with another identity key: every address would map to another identity (start with the --identity-key file the snapshot was written with)",
            ));
        }
        Ok(SnapshotReader {
            input,
            limits,
            offset: HEADER_BYTES as u64,
            block: Bytes::new(),
            block_at: HEADER_BYTES as u64,
            pos: 0,
            totals: SnapshotTotals::default(),
            ended: false,
            created_unix_ms: u64::from_be_bytes(h[52..60].try_into().expect("8")),
            record_at: 0,
        })
    }

    /// When the snapshot was written (milliseconds since the Unix epoch, as the
    /// writer said).
    pub fn created_unix_ms(&self) -> u64 {
        self.created_unix_ms
    }

    /// What has been read so far.
    pub fn totals(&self) -> SnapshotTotals {
        self.totals
    }

    /// The file offset where the last record returned starts (for errors found
    /// after decoding, e.g. a pointer that appears twice).
    pub fn record_offset(&self) -> u64 {
        self.record_at
    }

    /// Reads the next block into `self.block`. Returns false at the end block (after
    /// checking it and that nothing follows).
    fn next_block(&mut self) -> Result<bool, SnapshotError> {
        let at = self.offset;
        let mut header = [0u8; BLOCK_HEADER];
        read_exact(
            &mut self.input,
            &mut header,
            at,
            "a block header (truncated: no end block)",
        )?;
        let kind = header[0];
        let len = u32::from_be_bytes(header[1..5].try_into().expect("4"));
        if kind != BLOCK_RECORDS && kind != BLOCK_END {
            return Err(SnapshotError::at(at, format!("unknown block kind {kind}")));
        }
        if len > MAX_BLOCK_PAYLOAD {
            return Err(SnapshotError::at(
                at,
                format!("block of {len} bytes is over the limit of {MAX_BLOCK_PAYLOAD}"),
            ));
        }
        let mut payload = BytesMut::zeroed(len as usize);
        read_exact(
            &mut self.input,
            &mut payload,
            at + BLOCK_HEADER as u64,
            "a block (truncated)",
        )?;
        let mut crc = [0u8; 4];
        read_exact(
            &mut self.input,
            &mut crc,
            at + BLOCK_HEADER as u64 + len as u64,
            "a block checksum (truncated)",
        )?;
        let mut h = crc32fast::Hasher::new();
        h.update(&header);
        h.update(&payload);
        if h.finalize() != u32::from_be_bytes(crc) {
            return Err(SnapshotError::at(
                at,
                "block checksum mismatch (corrupt block)",
            ));
        }
        self.offset = at + BLOCK_HEADER as u64 + len as u64 + 4;
        self.block_at = at + BLOCK_HEADER as u64;
        self.block = payload.freeze();
        self.pos = 0;
        if kind == BLOCK_END {
            if len != 16 {
                return Err(SnapshotError::at(at, "end block of the wrong size"));
            }
            let records = u64::from_be_bytes(self.block[..8].try_into().expect("8"));
            let bytes = u64::from_be_bytes(self.block[8..16].try_into().expect("8"));
            if (records, bytes) != (self.totals.records, self.totals.bytes) {
                return Err(SnapshotError::at(
                    at,
                    format!(
                        "the end block counts {records} records / {bytes} bytes, the file holds {} / {}",
                        self.totals.records, self.totals.bytes
                    ),
                ));
            }
            let mut extra = [0u8; 1];
            match self.input.read(&mut extra) {
                Ok(0) => {}
                Ok(_) => return Err(SnapshotError::at(self.offset, "bytes after the end block")),
                Err(e) => return Err(io_error(self.offset, e)),
            }
            self.ended = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn entry_at(&self) -> u64 {
        self.block_at + self.pos as u64
    }

    fn take(&mut self, n: usize, what: &str) -> Result<Bytes, SnapshotError> {
        if self.block.len() - self.pos < n {
            return Err(SnapshotError::at(
                self.entry_at(),
                format!("{what} runs past the end of its block"),
            ));
        }
        let b = self.block.slice(self.pos..self.pos + n);
        self.pos += n;
        Ok(b)
    }

    fn u64(&mut self, what: &str) -> Result<u64, SnapshotError> {
        Ok(u64::from_be_bytes(
            self.take(8, what)?[..].try_into().expect("8"),
        ))
    }

    fn u32(&mut self, what: &str) -> Result<u32, SnapshotError> {
        Ok(u32::from_be_bytes(
            self.take(4, what)?[..].try_into().expect("4"),
        ))
    }

    fn identity(&mut self, what: &str) -> Result<Identity, SnapshotError> {
        Ok(Identity(self.take(32, what)?[..].try_into().expect("32")))
    }

    /// The next record, or `None` after the end block. Any error means the file must
    /// not be loaded.
    pub fn next_record(&mut self) -> Result<Option<SnapshotRecord>, SnapshotError> {
        if self.ended {
            return Ok(None);
        }
        while self.pos == self.block.len() {
            if !self.next_block()? {
                return Ok(None);
            }
        }
        let at = self.entry_at();
        self.record_at = at;
        let tag = self.take(1, "an entry")?[0];
        if tag != ENTRY_RECORD {
            return Err(SnapshotError::at(
                at,
                format!("entry tag {tag} where a record starts"),
            ));
        }
        let raw = self.u64("a pointer")?;
        let ptr = Pointer::new(raw).ok_or_else(|| SnapshotError::at(at, "pointer 0"))?;
        let owner = self.identity("an owner")?;
        let payer = match self.take(1, "a payer flag")?[0] {
            0 => None,
            1 => Some(self.identity("a payer")?),
            f => return Err(SnapshotError::at(at, format!("payer flag {f}"))),
        };
        let bits = self.take(1, "access bits")?[0];
        let access = Access::from_wire(bits)
            .ok_or_else(|| SnapshotError::at(at, format!("reserved access bits {bits:#04x}")))?;
        let version = self.u64("a version")?;
        if version == 0 {
            return Err(SnapshotError::at(at, "version 0"));
        }
        let size = self.u64("a size")?;
        if size > self.limits.max_record_bytes {
            return Err(SnapshotError::at(
                at,
                format!(
                    "record {ptr} claims {size} bytes, over --max-record-bytes {}",
                    self.limits.max_record_bytes
                ),
            ));
        }
        let here = self.u32("a data length")? as u64;
        if here > size {
            return Err(SnapshotError::at(at, "more data than the record's size"));
        }
        let first = self.take(here as usize, "record data")?;
        let data = if here == size {
            first
        } else {
            let mut data = BytesMut::with_capacity(size as usize);
            data.extend_from_slice(&first);
            while (data.len() as u64) < size {
                while self.pos == self.block.len() {
                    if !self.next_block()? {
                        return Err(SnapshotError::at(
                            self.offset,
                            format!("the end block came before the rest of record {ptr}"),
                        ));
                    }
                }
                let at = self.entry_at();
                let tag = self.take(1, "an entry")?[0];
                if tag != ENTRY_DATA {
                    return Err(SnapshotError::at(
                        at,
                        format!("entry tag {tag} where the rest of record {ptr} continues"),
                    ));
                }
                let n = self.u32("a data length")? as u64;
                if data.len() as u64 + n > size {
                    return Err(SnapshotError::at(at, "more data than the record's size"));
                }
                let chunk = self.take(n as usize, "record data")?;
                data.extend_from_slice(&chunk);
            }
            data.freeze()
        };
        self.totals.records += 1;
        self.totals.bytes += size;
        Ok(Some(SnapshotRecord {
            ptr,
            owner,
            payer,
            access,
            version,
            data,
        }))
    }
}

fn io_error(offset: u64, e: io::Error) -> SnapshotError {
    SnapshotError {
        offset,
        what: format!("read failed: {e}"),
        io: Some(e),
    }
}

fn read_exact(r: &mut impl Read, buf: &mut [u8], at: u64, what: &str) -> Result<(), SnapshotError> {
    match r.read_exact(buf) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(SnapshotError::at(
            at,
            format!("the file ends inside {what}"),
        )),
        Err(e) => Err(io_error(at, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> IdentityKey {
        IdentityKey::new(*b"snapshot test key")
    }

    const LIMITS: SnapshotLimits = SnapshotLimits {
        max_record_bytes: 64 << 20,
    };

    fn rec(ptr: u64, len: usize, payer: bool) -> SnapshotRecord {
        SnapshotRecord {
            ptr: Pointer::new(ptr).unwrap(),
            owner: Identity([ptr as u8; 32]),
            payer: payer.then_some(Identity([0xEE; 32])),
            access: Access::from_bits_truncate(ptr as u8),
            version: ptr * 3 + 1,
            data: Bytes::from(
                (0..len)
                    .map(|i| (i * 7 + ptr as usize) as u8)
                    .collect::<Vec<_>>(),
            ),
        }
    }

    fn write(records: &[SnapshotRecord]) -> Vec<u8> {
        let mut w = SnapshotWriter::new(Vec::new(), &key(), 1234).unwrap();
        for r in records {
            w.write(r).unwrap();
        }
        w.finish().unwrap().1
    }

    fn read(file: &[u8]) -> Result<Vec<SnapshotRecord>, SnapshotError> {
        let mut r = SnapshotReader::new(file, &key(), LIMITS)?;
        let mut out = Vec::new();
        while let Some(x) = r.next_record()? {
            out.push(x);
        }
        Ok(out)
    }

    fn sample() -> Vec<SnapshotRecord> {
        vec![
            rec(1, 0, false),
            rec(2, 64, true),
            rec(3, 5000, false),
            rec(4, 3 * BLOCK_BYTES + 17, true),
            rec(5, 1, false),
            rec(6, BLOCK_BYTES - 100, false),
        ]
    }

    #[test]
    fn round_trip_of_every_size_class() {
        let records = sample();
        let file = write(&records);
        assert_eq!(read(&file).unwrap(), records);
        let empty = write(&[]);
        assert_eq!(read(&empty).unwrap(), vec![]);
    }

    #[test]
    fn any_flipped_byte_or_truncation_is_refused_with_its_offset() {
        let file = write(&[
            rec(1, 10, false),
            rec(2, 3000, true),
            rec(3, BLOCK_BYTES + 5, false),
        ]);
        // Every truncation point.
        for cut in (0..file.len()).step_by(997).chain([file.len() - 1]) {
            let e = read(&file[..cut]).expect_err("truncated");
            assert!(e.offset <= cut as u64, "{e} for a cut at {cut}");
        }
        // A flipped bit anywhere.
        for at in (0..file.len()).step_by(1013) {
            let mut bad = file.clone();
            bad[at] ^= 0x10;
            assert!(read(&bad).is_err(), "a flip at {at} went unnoticed");
        }
        // Trailing bytes.
        let mut long = file.clone();
        long.push(0);
        assert!(read(&long).unwrap_err().what.contains("after the end"));
    }

    #[test]
    fn wrong_version_key_and_oversized_claims_are_refused() {
        let file = write(&[rec(1, 100, false)]);
        let mut v2 = file.clone();
        v2[9] = 2;
        let crc = crc32fast::hash(&v2[..60]);
        v2[60..64].copy_from_slice(&crc.to_be_bytes());
        assert!(read(&v2).unwrap_err().what.contains("format version 2"));
        let other = SnapshotReader::new(&file[..], &IdentityKey::new(*b"other"), LIMITS);
        assert!(other.unwrap_err().what.contains("another identity key"));
        let small = SnapshotLimits {
            max_record_bytes: 99,
        };
        let mut r = SnapshotReader::new(&file[..], &key(), small).unwrap();
        let e = r.next_record().unwrap_err();
        assert!(e.what.contains("over --max-record-bytes 99"), "{e}");
        assert_eq!(e.offset, (HEADER_BYTES + BLOCK_HEADER) as u64);
    }

    #[test]
    fn a_block_claiming_a_huge_length_is_refused_before_allocating() {
        let mut file = write(&[rec(1, 100, false)]);
        file[HEADER_BYTES + 1..HEADER_BYTES + 5].copy_from_slice(&u32::MAX.to_be_bytes());
        let e = read(&file).unwrap_err();
        assert!(e.what.contains("over the limit"), "{e}");
        assert_eq!(e.offset, HEADER_BYTES as u64);
    }
}
