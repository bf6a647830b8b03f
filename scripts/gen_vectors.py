#!/usr/bin/env python3
"""Writes tests/vectors/*.json: netswap v1 test vectors for every implementation.

This is an independent encoder written from docs/PROTOCOL.md with nothing but
`struct` and `hashlib`, so that the Rust, C, C# and Node tests check their own
encoders and decoders against bytes they did not produce themselves.

Conventions in the JSON files: byte strings are lowercase hex; pointers are 16 hex
digits; u64 values (offsets, versions, sizes) are decimal strings (JavaScript numbers
cannot hold every u64); small numbers are JSON numbers.

Run: python3 scripts/gen_vectors.py   (the output is checked in; tests fail if stale)
"""
import hashlib
import ipaddress
import json
import os
import struct
import sys

MAX_PAYLOAD = 1390
OPS = {name: i for i, name in enumerate([
    "CREATE", "SET_ACCESS", "READ", "REPLACE", "WRITE_AT", "DELETE", "TAKEOVER",
    "TRANSFER", "INFO", "HELLO", "WATCH", "UNWATCH", "REPLACE_IF", "STATS"])}
STATUS = {name: i for i, name in enumerate([
    "OK", "ACCESS_VIOLATION", "ADDRESS_FAULT", "DATA", "MALFORMED", "TOO_LARGE",
    "QUOTA_EXCEEDED", "CONFLICT", "NOTIFY", "PROTOCOL_ERROR", "BUSY"])}


def header(xid, remaining, op, arg, length):
    return struct.pack(">IHBBH", xid, remaining, op, arg, length)


def frames(xid, op, arg, payload):
    """Cuts a message into frames: every frame but the last is full."""
    chunks = [payload[i:i + MAX_PAYLOAD] for i in range(0, len(payload), MAX_PAYLOAD)] or [b""]
    out = b""
    for i, c in enumerate(chunks):
        out += header(xid, len(chunks) - 1 - i, op, arg, len(c)) + c
    return out


def ptr(p):
    return struct.pack(">Q", p)


def u64(v):
    return struct.pack(">Q", v)


def u32(v):
    return struct.pack(">I", v)


def h(b):
    return b.hex()


def request(name, xid, op, arg, payload, fields):
    return {
        "name": name, "xid": xid, "op": OPS[op], "op_name": op, "arg": arg,
        "payload": h(payload), "wire": h(frames(xid, OPS[op], arg, payload)),
        "fields": fields,
    }


def requests():
    P = 0x0123456789ABCDEF
    hx = "%016x" % P
    ident = bytes(range(32))
    v = [
        request("create-small", 1, "CREATE", 0x03, b"hello",
                {"access": 3, "data": h(b"hello")}),
        request("create-empty-no-access", 2, "CREATE", 0x00, b"", {"access": 0, "data": ""}),
        request("set-access", 3, "SET_ACCESS", 0x05, ptr(P), {"ptr": hx, "access": 5}),
        request("read-whole", 4, "READ", 0, ptr(P), {"ptr": hx}),
        request("read-range", 5, "READ", 0, ptr(P) + u64(10) + u32(100),
                {"ptr": hx, "offset": "10", "length": 100}),
        request("replace", 6, "REPLACE", 0, ptr(P) + b"new data",
                {"ptr": hx, "data": h(b"new data")}),
        request("write-at", 7, "WRITE_AT", 0, ptr(P) + u64(4) + b"xy",
                {"ptr": hx, "offset": "4", "data": h(b"xy")}),
        request("delete", 8, "DELETE", 0, ptr(P), {"ptr": hx}),
        request("takeover", 9, "TAKEOVER", 0, ptr(P), {"ptr": hx}),
        request("transfer-ipv4", 10, "TRANSFER", 0, ptr(P) + bytes([127, 0, 0, 3]),
                {"ptr": hx, "to_ip": "127.0.0.3"}),
        request("transfer-ipv6", 11, "TRANSFER", 0,
                ptr(P) + ipaddress.IPv6Address("2001:db8::7").packed,
                {"ptr": hx, "to_ip": "2001:db8::7"}),
        request("transfer-identity", 12, "TRANSFER", 0, ptr(P) + ident,
                {"ptr": hx, "to_identity": h(ident)}),
        request("info", 13, "INFO", 0, ptr(P), {"ptr": hx}),
        request("hello", 14, "HELLO", 0, b"", {}),
        request("watch", 15, "WATCH", 0, ptr(P), {"ptr": hx}),
        # Extensions of WATCH (docs/PROTOCOL.md): ARG 0x01 DATA, 0x02 STATE; an
        # optional minimum interval in ms after the pointer.
        request("watch-state", 19, "WATCH", 0x02, ptr(P),
                {"ptr": hx, "state": True}),
        request("watch-data", 20, "WATCH", 0x01, ptr(P),
                {"ptr": hx, "data": True}),
        request("watch-data-interval-50ms", 21, "WATCH", 0x01, ptr(P) + u32(50),
                {"ptr": hx, "data": True, "min_interval_ms": 50}),
        request("watch-interval-only", 22, "WATCH", 0x00, ptr(P) + u32(1000),
                {"ptr": hx, "min_interval_ms": 1000}),
        request("unwatch", 16, "UNWATCH", 0, ptr(P), {"ptr": hx}),
        request("replace-if", 17, "REPLACE_IF", 0, ptr(P) + u64(7) + b"cas",
                {"ptr": hx, "version": "7", "data": h(b"cas")}),
        request("stats", 18, "STATS", 0, b"", {}),
        request("xid-max-client", 0xFFFFFFFE, "HELLO", 0, b"", {}),
    ]
    # A 3-frame REPLACE: 8-byte pointer + 3000 data bytes = 3008 = 1390 + 1390 + 228.
    data = bytes((i * 7) % 256 for i in range(3000))
    v.append(request("replace-3-frames", 0x10, "REPLACE", 0, ptr(P) + data,
                     {"ptr": hx, "data": h(data)}))
    return v


def reply(name, xid, request_op, status, arg, payload, fields):
    return {
        "name": name, "xid": xid, "request_op": request_op, "status": STATUS[status],
        "status_name": status, "arg": arg, "payload": h(payload),
        "wire": h(frames(xid, STATUS[status], arg, payload)), "fields": fields,
    }


def delta_reply(name, p, version, base, size, ranges, before):
    """NOTIFY event 5, with what a mirror at `base` holds before and after applying it
    (resize to `size`, zero-filled, then write each range), for every client's mirror
    code to check itself against."""
    after = bytearray(before[:size].ljust(size, b"\0"))
    last = 0
    for off, data in ranges:
        assert off >= last and off + len(data) <= size, "ranges ascend and fit"
        after[off:off + len(data)] = data
        last = off + len(data)
    # Every byte past the old size is covered by a range.
    covered = set(i for off, data in ranges for i in range(off, off + len(data)))
    assert all(i in covered for i in range(len(before), size)), name
    payload = ptr(p) + u64(version) + u64(base) + u64(size)
    for off, data in ranges:
        payload += u64(off) + u32(len(data)) + data
    v = reply(name, 20, None, "NOTIFY", 5, payload,
              {"event": 5, "ptr": "%016x" % p, "version": str(version), "base": str(base),
               "size": str(size), "ranges": [[str(off), h(data)] for off, data in ranges]})
    v["mirror"] = {"before": h(before), "after": h(bytes(after))}
    return v


def replies():
    P = 0x0123456789ABCDEF
    hx = "%016x" % P
    ident = hashlib.sha256(b"example").digest()
    return [
        reply("created", 1, "CREATE", "OK", 0, ptr(P), {"ptr": hx}),
        reply("done", 3, "SET_ACCESS", "OK", 0, b"", {}),
        reply("written", 6, "REPLACE", "OK", 0, u64(2), {"version": "2"}),
        reply("data", 4, "READ", "DATA", 0, b"hello", {"data": h(b"hello")}),
        reply("data-empty", 5, "READ", "DATA", 0, b"", {"data": ""}),
        reply("info", 13, "INFO", "OK", 0, u64(5) + u64(3) + bytes([0x01, 0x01]),
              {"size": "5", "version": "3", "access": 1, "owned": True}),
        reply("hello", 14, "HELLO", "OK", 0,
              bytes([1]) + u64(67108864) + u64(67108880) + u32(300) + ident,
              {"protocol": 1, "max_record_bytes": "67108864",
               "max_message_bytes": "67108880", "orphan_grace_secs": 300,
               "identity": h(ident)}),
        reply("conflict", 17, "REPLACE_IF", "CONFLICT", 0, u64(9), {"version": "9"}),
        reply("stats", 18, "STATS", "OK", 0,
              struct.pack(">H", 2) + bytes([7]) + b"records" + u64(3)
              + bytes([10]) + b"your_bytes" + u64(12),
              {"stats": [["records", "3"], ["your_bytes", "12"]]}),
        reply("notify-changed", 15, None, "NOTIFY", 1, ptr(P) + u64(4),
              {"event": 1, "ptr": hx, "version": "4"}),
        reply("notify-deleted", 15, None, "NOTIFY", 2, ptr(P) + u64(4),
              {"event": 2, "ptr": hx, "version": "4"}),
        # A data watch: the OK carries INFO's fields (size, version, access, flags)
        # and then the whole value; each change comes as NOTIFY event 5 with
        # ptr, version, base version, size, then ranges of (offset u64, length u32,
        # bytes).
        reply("watching-state", 19, "WATCH", "OK", 0,
              u64(5) + u64(3) + bytes([0x01, 0x00]),
              {"size": "5", "version": "3", "access": 1, "owned": False, "watching": True}),
        reply("watching-data", 20, "WATCH", "OK", 0,
              u64(5) + u64(3) + bytes([0x03, 0x01]) + b"hello",
              {"size": "5", "version": "3", "access": 3, "owned": True, "watching": True,
               "data": h(b"hello")}),
        delta_reply("notify-delta-write-at", P, 4, 3, 5, [(1, b"EL")], b"hello"),
        delta_reply("notify-delta-replace-shrinks", P, 5, 4, 2, [(0, b"hi")], b"hELlo"),
        delta_reply("notify-delta-merged", P, 9, 5, 8, [(0, b"H"), (6, b"!!")], b"abcdefgh"),
        delta_reply("notify-delta-grows", P, 7, 6, 6, [(3, b"def")], b"abc"),
        delta_reply("notify-delta-empty", P, 6, 5, 0, [], b"hi"),
        reply("access-violation", 8, "DELETE", "ACCESS_VIOLATION", 0,
              b"only the owner may delete a record",
              {"reason": "only the owner may delete a record"}),
        reply("address-fault", 4, "READ", "ADDRESS_FAULT", 0, b"no such record",
              {"reason": "no such record"}),
        reply("malformed", 20, "HELLO", "MALFORMED", 0,
              b"HELLO: payload must be 0 bytes (empty), got 1",
              {"reason": "HELLO: payload must be 0 bytes (empty), got 1"}),
        reply("busy-reserved-xid", 0xFFFFFFFF, None, "BUSY", 0,
              b"too many connections from this address",
              {"reason": "too many connections from this address"}),
    ]


def malformed():
    """Request messages every server must answer with MALFORMED (and keep the connection)."""
    P = ptr(0x42)
    cases = [
        ("unknown-opcode", 0x0E, 0, b"", "unknown opcode 0x0e"),
        ("create-reserved-access-bit", OPS["CREATE"], 0x08, b"x", None),
        ("set-access-reserved-bit", OPS["SET_ACCESS"], 0x80, P, None),
        ("read-nonzero-arg", OPS["READ"], 1, P, "READ: ARG must be 0, got 0x01"),
        ("read-9-bytes", OPS["READ"], 0, P + b"\x00", None),
        ("delete-short", OPS["DELETE"], 0, P[:7], "DELETE: payload must be 8 bytes (a pointer), got 7"),
        ("delete-pointer-zero", OPS["DELETE"], 0, ptr(0), "DELETE: pointer 0 is never valid"),
        ("replace-short", OPS["REPLACE"], 0, P[:5], None),
        ("write-at-short", OPS["WRITE_AT"], 0, P + b"\x00" * 7, None),
        ("replace-if-short", OPS["REPLACE_IF"], 0, P + b"\x00" * 7, None),
        ("transfer-bad-length", OPS["TRANSFER"], 0, P + b"\x00" * 5, None),
        ("hello-with-payload", OPS["HELLO"], 0, b"x", "HELLO: payload must be 0 bytes (empty), got 1"),
        ("stats-with-payload", OPS["STATS"], 0, b"x", "STATS: payload must be 0 bytes (empty), got 1"),
        ("watch-reserved-arg-bit", OPS["WATCH"], 0x04, P,
         "WATCH: reserved bits set in ARG 0x04 (only 0x01 DATA, 0x02 STATE exist)"),
        ("watch-10-bytes", OPS["WATCH"], 0x01, P + b"\x00\x00",
         "WATCH: payload must be 8 bytes (pointer) or 12 (pointer, minimum interval in ms), got 10"),
        ("watch-interval-over-a-minute", OPS["WATCH"], 0x01, P + u32(60001),
         "WATCH: minimum interval 60001 ms is over the limit of 60000 ms"),
    ]
    return [{"name": n, "xid": 100 + i, "op": op, "arg": arg, "payload": h(p),
             "wire": h(frames(100 + i, op, arg, p)), "reason": r}
            for i, (n, op, arg, p, r) in enumerate(cases)]


def streams():
    """Byte streams and the messages (or the framing error) a receiver must get."""
    full = bytes([0xAB]) * MAX_PAYLOAD
    big = b"\x11" * MAX_PAYLOAD + b"\x22" * MAX_PAYLOAD + b"\x33" * 5
    # Interleaved: a 3-frame message with XID 1, a 1-frame message with XID 2 in between.
    interleaved = (header(1, 2, 3, 0, MAX_PAYLOAD) + big[:MAX_PAYLOAD]
                   + header(2, 0, 2, 0, 8) + ptr(0x42)
                   + header(1, 1, 3, 0, MAX_PAYLOAD) + big[MAX_PAYLOAD:2 * MAX_PAYLOAD]
                   + header(1, 0, 3, 0, 5) + big[2 * MAX_PAYLOAD:])

    def msg(xid, op, arg, payload):
        return {"xid": xid, "op": op, "arg": arg, "payload": h(payload)}

    return [
        {"name": "one-frame", "wire": h(frames(7, 9, 0, b"")), "messages": [msg(7, 9, 0, b"")]},
        {"name": "two-messages-back-to-back",
         "wire": h(frames(1, 2, 0, ptr(5)) + frames(2, 8, 0, ptr(6))),
         "messages": [msg(1, 2, 0, ptr(5)), msg(2, 8, 0, ptr(6))]},
        {"name": "interleaved-3-frame-and-1-frame", "wire": h(interleaved),
         "messages": [msg(2, 2, 0, ptr(0x42)), msg(1, 3, 0, big)]},
        {"name": "empty-last-frame",
         "wire": h(header(4, 1, 0, 0, MAX_PAYLOAD) + full + header(4, 0, 0, 0, 0)),
         "messages": [msg(4, 0, 0, full)]},
        {"name": "len-over-1390", "wire": h(header(1, 0, 0, 0, 1391)), "error": "LEN"},
        {"name": "non-last-frame-not-full",
         "wire": h(header(1, 1, 3, 0, 10) + b"\x00" * 10), "error": "SHORT_FRAME"},
        {"name": "remaining-does-not-count-down",
         "wire": h(header(1, 3, 3, 0, MAX_PAYLOAD) + full + header(1, 1, 3, 0, MAX_PAYLOAD) + full),
         "error": "REMAINING"},
        {"name": "first-frame-for-xid-in-progress",
         "wire": h(header(1, 2, 3, 0, MAX_PAYLOAD) + full + header(1, 2, 3, 0, MAX_PAYLOAD) + full),
         "error": "REMAINING"},
        {"name": "op-changes-mid-message",
         "wire": h(header(1, 1, 3, 0, MAX_PAYLOAD) + full + header(1, 0, 4, 0, 1) + b"x"),
         "error": "HEADER_CHANGED"},
        {"name": "arg-changes-mid-message",
         "wire": h(header(1, 1, 0, 1, MAX_PAYLOAD) + full + header(1, 0, 0, 2, 1) + b"x"),
         "error": "HEADER_CHANGED"},
    ]


def identities():
    out = []
    for key, ip in [(b"netswap test key", "127.0.0.2"), (b"netswap test key", "::ffff:127.0.0.2"),
                    (b"netswap test key", "2001:db8::1"), (bytes(32), "10.0.0.1")]:
        addr = ipaddress.ip_address(ip)
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
            addr = addr.ipv4_mapped
        out.append({"key": h(key), "ip": ip,
                    "identity": hashlib.sha256(key + addr.packed).hexdigest()})
    return out


def main():
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "vectors")
    os.makedirs(root, exist_ok=True)
    files = {
        "requests.json": ("Requests: message fields, payload and whole-frame wire bytes.", requests()),
        "replies.json": ("Replies: `request_op` is the request they answer (null: none).", replies()),
        "malformed.json": ("Requests that must get MALFORMED; `reason` is the reference server's text where fixed.", malformed()),
        "streams.json": ("Byte streams: the messages a receiver must reassemble, or the framing error (PROTOCOL_ERROR).", streams()),
        "identities.json": ("identity = SHA-256(key || ip bytes); IPv4-mapped IPv6 counts as IPv4.", identities()),
    }
    check = "--check" in sys.argv
    stale = []
    for name, (desc, vectors) in files.items():
        text = json.dumps({"description": desc, "generator": "scripts/gen_vectors.py",
                           "vectors": vectors}, indent=1) + "\n"
        path = os.path.join(root, name)
        if check:
            if not os.path.exists(path) or open(path).read() != text:
                stale.append(name)
        else:
            with open(path, "w") as f:
                f.write(text)
    if stale:
        print("stale vectors (run python3 scripts/gen_vectors.py):", ", ".join(stale))
        sys.exit(1)


if __name__ == "__main__":
    main()
