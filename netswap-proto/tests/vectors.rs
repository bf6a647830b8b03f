//! Checks the codec against `tests/vectors/`, written by an independent encoder
//! (`scripts/gen_vectors.py`): decoding the bytes gives the fields, and encoding the
//! fields gives the bytes.

use std::net::IpAddr;
use std::path::PathBuf;

use bytes::{Bytes, BytesMut};
use netswap_proto::*;
use serde_json::Value;

fn vectors(file: &str) -> Vec<Value> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/vectors")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let v: Value = serde_json::from_str(&text).unwrap();
    v["vectors"].as_array().unwrap().clone()
}

fn hex_of(v: &Value) -> Bytes {
    Bytes::from(hex::decode(v.as_str().unwrap()).unwrap())
}

fn u64_of(v: &Value) -> u64 {
    v.as_str().unwrap().parse().unwrap()
}

fn ptr_of(v: &Value) -> Pointer {
    v.as_str().unwrap().parse().unwrap()
}

fn access_of(v: &Value) -> Access {
    Access::from_bits(v.as_u64().unwrap() as u8).unwrap()
}

fn encode_all(msg: OutMessage) -> Vec<u8> {
    let mut q = OutQueue::new();
    q.push(msg).unwrap();
    let mut out = BytesMut::new();
    q.write_to(&mut out, usize::MAX);
    out.to_vec()
}

fn reassemble(wire: &[u8]) -> Result<Vec<Inbound>, FramingError> {
    let mut r = Reassembler::new(ReassemblyLimits::default());
    let mut buf = BytesMut::from(wire);
    let mut out = Vec::new();
    while let Some(f) = decode_frame(&mut buf)? {
        if let Some(m) = r.push(f)? {
            out.push(m);
        }
    }
    assert!(buf.is_empty(), "whole frames only");
    Ok(out)
}

fn request_from_fields(op: &str, f: &Value) -> Request {
    let ptr = || ptr_of(&f["ptr"]);
    match op {
        "CREATE" => Request::Create {
            access: access_of(&f["access"]),
            data: hex_of(&f["data"]),
        },
        "SET_ACCESS" => Request::SetAccess {
            ptr: ptr(),
            access: access_of(&f["access"]),
        },
        "READ" => Request::Read {
            ptr: ptr(),
            range: f
                .get("offset")
                .map(|o| (u64_of(o), f["length"].as_u64().unwrap() as u32)),
        },
        "REPLACE" => Request::Replace {
            ptr: ptr(),
            data: hex_of(&f["data"]),
        },
        "WRITE_AT" => Request::WriteAt {
            ptr: ptr(),
            offset: u64_of(&f["offset"]),
            data: hex_of(&f["data"]),
        },
        "DELETE" => Request::Delete { ptr: ptr() },
        "TAKEOVER" => Request::Takeover { ptr: ptr() },
        "TRANSFER" => Request::Transfer {
            ptr: ptr(),
            to: match (f.get("to_ip"), f.get("to_identity")) {
                (Some(ip), _) => NewOwner::Ip(ip.as_str().unwrap().parse::<IpAddr>().unwrap()),
                (_, Some(id)) => NewOwner::Identity(Identity(hex_of(id)[..].try_into().unwrap())),
                _ => panic!("transfer without target"),
            },
        },
        "INFO" => Request::Info { ptr: ptr() },
        "HELLO" => Request::Hello,
        "STATS" => Request::Stats,
        "WATCH" => Request::Watch {
            ptr: ptr(),
            options: WatchOptions {
                data: f.get("data").is_some_and(|d| d.as_bool().unwrap()),
                state: f.get("state").is_some_and(|d| d.as_bool().unwrap()),
                min_interval_ms: f
                    .get("min_interval_ms")
                    .map_or(0, |m| m.as_u64().unwrap() as u32),
            },
        },
        "UNWATCH" => Request::Unwatch { ptr: ptr() },
        "REPLACE_IF" => Request::ReplaceIf {
            ptr: ptr(),
            expected: u64_of(&f["version"]),
            data: hex_of(&f["data"]),
        },
        other => panic!("unknown op {other}"),
    }
}

#[test]
fn requests_decode_to_their_fields_and_encode_to_their_bytes() {
    let vs = vectors("requests.json");
    assert!(vs.len() >= 19);
    for v in vs {
        let name = v["name"].as_str().unwrap();
        let wire = hex_of(&v["wire"]);
        let want = request_from_fields(v["op_name"].as_str().unwrap(), &v["fields"]);
        let xid = v["xid"].as_u64().unwrap() as u32;
        assert_eq!(
            encode_all(want.encode(xid)),
            wire.to_vec(),
            "{name}: encoding"
        );
        let got = reassemble(&wire).unwrap();
        let [Inbound::Message(m)] = &got[..] else {
            panic!("{name}: {got:?}")
        };
        assert_eq!(m.xid, xid, "{name}");
        assert_eq!(m.payload, hex_of(&v["payload"]), "{name}");
        let parsed = Request::parse(m.op, m.arg, m.payload.clone()).unwrap();
        assert_eq!(parsed, want, "{name}: decoding");
    }
}

fn reply_from_fields(status: &str, f: &Value) -> Reply {
    match status {
        "OK" if f.get("ptr").is_some() => Reply::Created(ptr_of(&f["ptr"])),
        "OK" if f.get("stats").is_some() => Reply::Stats(
            f["stats"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| (e[0].as_str().unwrap().to_owned(), u64_of(&e[1])))
                .collect(),
        ),
        "OK" if f.get("identity").is_some() => Reply::Hello(HelloInfo {
            protocol: f["protocol"].as_u64().unwrap() as u8,
            max_record_bytes: u64_of(&f["max_record_bytes"]),
            max_message_bytes: u64_of(&f["max_message_bytes"]),
            orphan_grace_secs: f["orphan_grace_secs"].as_u64().unwrap() as u32,
            identity: Identity(hex_of(&f["identity"])[..].try_into().unwrap()),
        }),
        "OK" if f.get("watching").is_some() => Reply::Watching(
            RecordInfo {
                size: u64_of(&f["size"]),
                version: u64_of(&f["version"]),
                access: access_of(&f["access"]),
                owned: f["owned"].as_bool().unwrap(),
            },
            f.get("data").map(hex_of).unwrap_or_default(),
        ),
        "OK" if f.get("size").is_some() => Reply::Info(RecordInfo {
            size: u64_of(&f["size"]),
            version: u64_of(&f["version"]),
            access: access_of(&f["access"]),
            owned: f["owned"].as_bool().unwrap(),
        }),
        "OK" if f.get("version").is_some() => Reply::Written(u64_of(&f["version"])),
        "OK" => Reply::Done,
        "DATA" => Reply::Data(hex_of(&f["data"])),
        "CONFLICT" => Reply::Conflict(u64_of(&f["version"])),
        "NOTIFY" if f["event"].as_u64() == Some(EVENT_DELTA as u64) => Reply::Notify {
            event: Event::Changed,
            ptr: ptr_of(&f["ptr"]),
            version: u64_of(&f["version"]),
            delta: Some(Delta {
                base: u64_of(&f["base"]),
                size: u64_of(&f["size"]),
                ranges: f["ranges"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| (u64_of(&r[0]), hex_of(&r[1])))
                    .collect(),
            }),
        },
        "NOTIFY" => Reply::Notify {
            event: Event::from_u8(f["event"].as_u64().unwrap() as u8).unwrap(),
            ptr: ptr_of(&f["ptr"]),
            version: u64_of(&f["version"]),
            delta: None,
        },
        s => Reply::error(
            Status::ALL.into_iter().find(|x| x.name() == s).unwrap(),
            f["reason"].as_str().unwrap().to_owned(),
        ),
    }
}

#[test]
fn replies_decode_to_their_fields_and_encode_to_their_bytes() {
    for v in vectors("replies.json") {
        let name = v["name"].as_str().unwrap();
        let want = reply_from_fields(v["status_name"].as_str().unwrap(), &v["fields"]);
        let xid = v["xid"].as_u64().unwrap() as u32;
        let wire = hex_of(&v["wire"]);
        assert_eq!(
            encode_all(want.encode(xid)),
            wire.to_vec(),
            "{name}: encoding"
        );
        let request = v["request_op"]
            .as_str()
            .map(|n| Opcode::ALL.into_iter().find(|o| o.name() == n).unwrap());
        let [Inbound::Message(m)] = &reassemble(&wire).unwrap()[..] else {
            panic!("{name}")
        };
        let got = Reply::parse(request, m.op, m.arg, m.payload.clone()).unwrap();
        assert_eq!(got, want, "{name}: decoding");
    }
}

/// Every delta vector says what a mirror holds before and after applying it.
#[test]
fn deltas_turn_their_before_into_their_after() {
    let mut checked = 0;
    for v in vectors("replies.json") {
        let Some(mirror) = v.get("mirror") else {
            continue;
        };
        let name = v["name"].as_str().unwrap();
        let Reply::Notify {
            delta: Some(delta), ..
        } = reply_from_fields("NOTIFY", &v["fields"])
        else {
            panic!("{name}: a mirror vector is a delta")
        };
        let mut copy = hex_of(&mirror["before"]).to_vec();
        delta.apply_to(&mut copy);
        assert_eq!(copy, hex_of(&mirror["after"]).to_vec(), "{name}");
        checked += 1;
    }
    assert!(checked >= 5);
}

#[test]
fn malformed_requests_are_refused_with_their_reasons() {
    for v in vectors("malformed.json") {
        let name = v["name"].as_str().unwrap();
        let [Inbound::Message(m)] = &reassemble(&hex_of(&v["wire"])).unwrap()[..] else {
            panic!("{name}")
        };
        let err = Request::parse(m.op, m.arg, m.payload.clone())
            .expect_err(name)
            .0;
        if let Some(reason) = v["reason"].as_str() {
            assert_eq!(err, reason, "{name}");
        }
    }
}

#[test]
fn streams_give_their_messages_or_their_framing_error() {
    for v in vectors("streams.json") {
        let name = v["name"].as_str().unwrap();
        let wire = hex_of(&v["wire"]);
        match v.get("error").and_then(Value::as_str) {
            Some(kind) => {
                let err = reassemble(&wire).expect_err(name);
                let matches = match kind {
                    "LEN" => matches!(err, FramingError::LengthTooLarge { .. }),
                    "SHORT_FRAME" => matches!(err, FramingError::ShortFrame { .. }),
                    "REMAINING" => matches!(err, FramingError::BadRemaining { .. }),
                    "HEADER_CHANGED" => matches!(err, FramingError::HeaderChanged { .. }),
                    _ => false,
                };
                assert!(matches, "{name}: got {err:?}, want {kind}");
            }
            None => {
                let got: Vec<(u32, u8, u8, Bytes)> = reassemble(&wire)
                    .unwrap()
                    .into_iter()
                    .map(|m| match m {
                        Inbound::Message(m) => (m.xid, m.op, m.arg, m.payload),
                        r => panic!("{name}: {r:?}"),
                    })
                    .collect();
                let want: Vec<(u32, u8, u8, Bytes)> = v["messages"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|m| {
                        (
                            m["xid"].as_u64().unwrap() as u32,
                            m["op"].as_u64().unwrap() as u8,
                            m["arg"].as_u64().unwrap() as u8,
                            hex_of(&m["payload"]),
                        )
                    })
                    .collect();
                assert_eq!(got, want, "{name}");
            }
        }
    }
}

#[test]
fn identities_match() {
    for v in vectors("identities.json") {
        let key = IdentityKey::new(hex_of(&v["key"]).to_vec());
        let ip: IpAddr = v["ip"].as_str().unwrap().parse().unwrap();
        assert_eq!(
            Identity::derive(&key, ip).to_string(),
            v["identity"].as_str().unwrap()
        );
    }
}
