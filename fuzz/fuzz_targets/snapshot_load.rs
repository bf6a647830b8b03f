//! Treats a snapshot file as hostile input. Two shapes of input:
//! - raw bytes after a valid header (so the fuzzer reaches the block parser), and
//! - a valid snapshot written from arbitrary records, then damaged by arbitrary byte
//!   flips and a truncation (so it reaches record entries behind valid checksums).
//!
//! Checks: loading never panics and never allocates for a size over the limits (a
//! size is checked before anything is allocated for it); an undamaged snapshot loads
//! back exactly; whatever loads restores into a store whose books balance.
#![no_main]

use std::time::Instant;

use arbitrary::Arbitrary;
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use netswap_proto::snapshot::{SnapshotLimits, SnapshotReader, SnapshotRecord, SnapshotWriter};
use netswap_proto::{Access, Identity, IdentityKey, Pointer, Store, StoreConfig};

#[derive(Arbitrary, Debug)]
struct Rec {
    ptr: u64,
    owner: u8,
    payer: Option<u8>,
    access: u8,
    version: u64,
    len: u16,
    fill: u8,
}

#[derive(Arbitrary, Debug)]
enum Input {
    Raw(Vec<u8>),
    Damaged {
        records: Vec<Rec>,
        flips: Vec<(u32, u8)>,
        cut: Option<u32>,
    },
}

const LIMITS: SnapshotLimits = SnapshotLimits { max_record_bytes: 100_000 };

fn load(file: &[u8], key: &IdentityKey) -> Result<Vec<SnapshotRecord>, String> {
    let mut r = SnapshotReader::new(file, key, LIMITS).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    while let Some(x) = r.next_record().map_err(|e| e.to_string())? {
        assert!(x.data.len() as u64 <= LIMITS.max_record_bytes);
        out.push(x);
    }
    Ok(out)
}

fn restore(records: Vec<SnapshotRecord>, key: &IdentityKey) {
    let store = Store::new(StoreConfig { shards: 4, ..StoreConfig::default() }, key.clone());
    let mut r = store.restore();
    for rec in records {
        let _ = r.add(rec); // duplicates are refused, never a panic
    }
    r.finish(Instant::now());
    store.audit().expect("books balance after a restore");
}

fuzz_target!(|input: Input| {
    let key = IdentityKey::new(*b"fuzz key");
    match input {
        Input::Raw(body) => {
            let mut file = SnapshotWriter::new(Vec::new(), &key, 0).unwrap().finish().unwrap().1;
            file.truncate(netswap_proto::snapshot::HEADER_BYTES);
            file.extend_from_slice(&body);
            if let Ok(records) = load(&file, &key) {
                restore(records, &key);
            }
        }
        Input::Damaged { records, flips, cut } => {
            let records: Vec<SnapshotRecord> = records
                .iter()
                .take(64)
                .filter_map(|r| {
                    Some(SnapshotRecord {
                        ptr: Pointer::new(r.ptr)?,
                        owner: Identity([r.owner; 32]),
                        payer: r.payer.map(|p| Identity([p; 32])),
                        access: Access::from_bits_truncate(r.access),
                        version: r.version.max(1),
                        data: Bytes::from(vec![r.fill; r.len as usize]),
                    })
                })
                .collect();
            let mut w = SnapshotWriter::new(Vec::new(), &key, 0).unwrap();
            for r in &records {
                w.write(r).unwrap();
            }
            let mut file = w.finish().unwrap().1;
            let original = file.clone();
            for (at, x) in flips.iter().take(8) {
                if !file.is_empty() {
                    let i = *at as usize % file.len();
                    file[i] ^= x;
                }
            }
            if let Some(c) = cut {
                file.truncate(c as usize % (file.len() + 1));
            }
            let pristine = file == original;
            match load(&file, &key) {
                Ok(got) => {
                    if pristine {
                        assert_eq!(got, records);
                    }
                    restore(got, &key);
                }
                Err(e) => assert!(!pristine, "an undamaged snapshot failed: {e}"),
            }
        }
    }
});
