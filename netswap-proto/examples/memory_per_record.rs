//! Measures the store's memory per record: creates N records of S bytes and reports the
//! growth of this process's resident set divided by N.
//!
//! Run: `cargo run --release -p netswap-proto --example memory_per_record -- 1000000 64`

use std::net::IpAddr;
use std::time::Instant;

use bytes::Bytes;
use netswap_proto::*;
use rand::SeedableRng;
use rand::rngs::StdRng;

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("Linux /proc");
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

fn main() {
    let mut args = std::env::args().skip(1);
    let n: u64 = args
        .next()
        .map_or(1_000_000, |a| a.parse().expect("record count"));
    let size: usize = args.next().map_or(64, |a| a.parse().expect("value size"));
    let store = Store::new(
        StoreConfig {
            quota_records: u64::MAX,
            quota_bytes: u64::MAX,
            ..StoreConfig::default()
        },
        IdentityKey::new(*b"memory"),
    );
    let mut rng = StdRng::seed_from_u64(1);
    let mut s = store.connect(IpAddr::from([127, 0, 0, 2]));
    let value = vec![0xA5u8; size];
    let before = rss_bytes();
    let now = Instant::now();
    for _ in 0..n {
        // A fresh buffer per request, as the network would deliver it.
        let data = Bytes::copy_from_slice(&value);
        let r = store.apply(
            &mut s,
            0,
            Request::Create {
                access: Access::READ,
                data,
            },
            now,
            &mut rng,
        );
        assert!(matches!(r.reply, Reply::Created(_)));
    }
    let after = rss_bytes();
    let per = (after - before) as f64 / n as f64;
    println!(
        "{n} records of {size} B: RSS grew {:.1} MiB, {per:.1} bytes per record ({:.1} overhead)",
        (after - before) as f64 / (1 << 20) as f64,
        per - size as f64
    );
}
