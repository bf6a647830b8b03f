//! Criterion benchmarks: frame decoding with reassembly and parsing, reply encoding
//! through the fair queue, and the store's hot operations.
//!
//! Run: `cargo bench -p netswap-proto` (figures in docs/BENCHMARKS.md).

use std::net::IpAddr;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use netswap_proto::*;
use rand::SeedableRng;
use rand::rngs::SmallRng;

const BATCH: u64 = 1000;

fn decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Elements(BATCH));
    let mut wire = BytesMut::new();
    let mut q = OutQueue::new();
    for i in 0..BATCH as u32 {
        q.push(
            Request::Read {
                ptr: Pointer::new(0x1234_5678_9abc_def0 + i as u64).unwrap(),
                range: None,
            }
            .encode(i),
        )
        .unwrap();
    }
    q.write_to(&mut wire, usize::MAX);
    let wire = wire.freeze();
    g.bench_function("1000 READ requests: frame + reassemble + parse", |b| {
        let mut r = Reassembler::new(ReassemblyLimits::default());
        b.iter(|| {
            let mut buf = BytesMut::from(&wire[..]);
            let mut n = 0;
            while let Some(f) = decode_frame(&mut buf).unwrap() {
                if let Some(Inbound::Message(m)) = r.push(f).unwrap() {
                    let req = Request::parse(m.op, m.arg, m.payload).unwrap();
                    n += req.pointer().is_some() as u32;
                }
            }
            n
        })
    });
    let big = Bytes::from(vec![7u8; 1 << 20]);
    let mut q = OutQueue::new();
    q.push(
        Request::Replace {
            ptr: Pointer::new(1).unwrap(),
            data: big,
        }
        .encode(1),
    )
    .unwrap();
    let mut wire = BytesMut::new();
    q.write_to(&mut wire, usize::MAX);
    let wire = wire.freeze();
    g.throughput(Throughput::Bytes(1 << 20));
    g.bench_function("1 MiB REPLACE: frame + reassemble + parse", |b| {
        let mut r = Reassembler::new(ReassemblyLimits::default());
        b.iter(|| {
            let mut buf = BytesMut::from(&wire[..]);
            let mut got = None;
            while let Some(f) = decode_frame(&mut buf).unwrap() {
                if let Some(Inbound::Message(m)) = r.push(f).unwrap() {
                    got = Some(Request::parse(m.op, m.arg, m.payload).unwrap());
                }
            }
            got.unwrap()
        })
    });
    // The same message through a Receiver, in reads of at most 64 KiB (the closure's
    // copy stands for the kernel's): payloads land in place, no second copy.
    g.bench_function("1 MiB REPLACE: Receiver, 64 KiB reads + parse", |b| {
        let mut rx = Receiver::new(Reassembler::new(ReassemblyLimits::default()), 64 * 1024);
        b.iter(|| {
            let mut at = 0;
            let mut got = None;
            while at < wire.len() {
                at += rx.read_from_slice(&wire[at..(at + 64 * 1024).min(wire.len())]);
                while let Some(m) = rx.next_inbound().unwrap() {
                    if let Inbound::Message(m) = m {
                        got = Some(Request::parse(m.op, m.arg, m.payload).unwrap());
                    }
                }
            }
            got.unwrap()
        })
    });
    g.finish();
}

fn encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("encode");
    g.throughput(Throughput::Elements(BATCH));
    let data = Bytes::from(vec![1u8; 64]);
    g.bench_function("1000 64 B DATA replies through the fair queue", |b| {
        let mut q = OutQueue::new();
        let mut out = BytesMut::with_capacity(128 * 1024);
        b.iter(|| {
            for i in 0..BATCH as u32 {
                q.push(Reply::Data(data.clone()).encode(i)).unwrap();
            }
            out.clear();
            q.write_to(&mut out, usize::MAX)
        })
    });
    let big = Bytes::from(vec![1u8; 1 << 20]);
    g.throughput(Throughput::Bytes(1 << 20));
    g.bench_function("1 MiB DATA reply through the fair queue", |b| {
        let mut q = OutQueue::new();
        let mut out = BytesMut::with_capacity(2 << 20);
        b.iter(|| {
            q.push(Reply::Data(big.clone()).encode(1)).unwrap();
            out.clear();
            q.write_to(&mut out, usize::MAX)
        })
    });
    g.finish();
}

fn store(c: &mut Criterion) {
    let mut g = c.benchmark_group("store");
    let store = Store::new(StoreConfig::default(), IdentityKey::new(*b"bench"));
    let mut rng = SmallRng::seed_from_u64(1);
    let mut s = store.connect(IpAddr::from([127, 0, 0, 2]));
    let now = Instant::now();
    let value = Bytes::from(vec![5u8; 64]);
    let ptrs: Vec<Pointer> = (0..100_000)
        .map(|_| {
            match store
                .apply(
                    &mut s,
                    0,
                    Request::Create {
                        access: Access::READ,
                        data: value.clone(),
                    },
                    now,
                    &mut rng,
                )
                .reply
            {
                Reply::Created(p) => p,
                r => panic!("{r:?}"),
            }
        })
        .collect();
    let mut i = 0usize;
    g.bench_function("READ 64 B (100k records)", |b| {
        b.iter(|| {
            i = (i + 7919) % ptrs.len();
            store.apply(
                &mut s,
                1,
                Request::Read {
                    ptr: ptrs[i],
                    range: None,
                },
                now,
                &mut rng,
            )
        })
    });
    g.bench_function("REPLACE 64 B (100k records)", |b| {
        b.iter(|| {
            i = (i + 7919) % ptrs.len();
            store.apply(
                &mut s,
                1,
                Request::Replace {
                    ptr: ptrs[i],
                    data: value.clone(),
                },
                now,
                &mut rng,
            )
        })
    });
    g.bench_function("WRITE_AT 8 B into 64 B (100k records)", |b| {
        let patch = Bytes::from_static(b"12345678");
        b.iter(|| {
            i = (i + 7919) % ptrs.len();
            store.apply(
                &mut s,
                1,
                Request::WriteAt {
                    ptr: ptrs[i],
                    offset: 8,
                    data: patch.clone(),
                },
                now,
                &mut rng,
            )
        })
    });
    g.bench_function("CREATE + DELETE 64 B", |b| {
        b.iter_batched(
            || value.clone(),
            |v| {
                let Reply::Created(p) = store
                    .apply(
                        &mut s,
                        1,
                        Request::Create {
                            access: Access::empty(),
                            data: v,
                        },
                        now,
                        &mut rng,
                    )
                    .reply
                else {
                    unreachable!()
                };
                store.apply(&mut s, 2, Request::Delete { ptr: p }, now, &mut rng)
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, decode, encode, store);
criterion_main!(benches);
