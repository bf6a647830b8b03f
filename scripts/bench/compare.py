#!/usr/bin/env python3
"""Side-by-side benchmark of netswap, Redis and memcached on loopback, in one run.

Started by scripts/bench/compare.sh (which installs the servers and tools and builds
netswap). For every throughput row and every run it starts each contender on a free
loopback port, runs the same workload against it with the same load generator, stops
it, and goes on to the next, so the contenders alternate; the table shows medians.

One driver for every server: `netswap-bench load`, speaking netswap's protocol to
netswap-server (with --threads 1 and --threads 2) and to the framing-only ceiling
(`netswap-bench ceiling`: the same reads, reassembly and writes, no store), RESP to
Redis (`--protocol resp`: GET/SET, pipelined, keys preloaded) and memcached's binary
protocol to memcached (`--protocol memcached`). redis-benchmark runs as a second
opinion for Redis, in its own clearly labelled column, never in a ratio.
Memory and head-of-line rows are measured by this script (raw sockets, /proc RSS)
where no tool exists.
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
REL = os.path.join(ROOT, "target", "release")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port, timeout=10):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Server:
    def __init__(self, name, argv, port):
        self.name, self.port = name, port
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(port)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def netswap_server(threads, *extra):
    port = free_port()
    return Server("netswap", [os.path.join(REL, "netswap-server"), "--listen", f"127.0.0.1:{port}",
                              "--threads", str(threads), "--quota-records", "100000000",
                              "--quota-bytes", str(64 << 30), *extra], port)


def ceiling_server(size, threads=1):
    """netswap-bench ceiling: frames replies like netswap-server, keeps no records."""
    proc = subprocess.Popen([os.path.join(REL, "netswap-bench"), "ceiling", "--listen", "127.0.0.1:0",
                             "-d", str(size), "--threads", str(threads)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    port = int(line.rsplit(":", 1)[1])
    srv = Server.__new__(Server)
    srv.name, srv.port, srv.proc = "ceiling", port, proc
    wait_port(port)
    return srv


def redis_server():
    port = free_port()
    return Server("redis", ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                            "--appendonly", "no", "--protected-mode", "no",
                            "--proto-max-bulk-len", "128mb", "--client-query-buffer-limit", "256mb"], port)


def memcached_server():
    port = free_port()
    return Server("memcached", ["memcached", "-p", str(port), "-l", "127.0.0.1", "-U", "0",
                                "-t", "2", "-m", "4096", "-I", "2m", "-u", "root"], port)


# ---- netswap -------------------------------------------------------------------

def netswap_bench(port, pid, *args):
    out = subprocess.run([os.path.join(REL, "netswap-bench"), "-s", f"127.0.0.1:{port}",
                          "--server-pid", str(pid), "--json", *args],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def keys_for(size):
    return 64 if size >= 65536 else 10000


def netswap_load(srv, op, size, conns, pipeline, secs, protocol="netswap"):
    r = netswap_bench(srv.port, srv.proc.pid, "load", "--protocol", protocol, "--op", op, "-d", str(size),
                      "-c", str(conns), "-P", str(pipeline), "--keys", str(keys_for(size)),
                      "--duration", str(secs))
    # CPU per operation over the timed window, of the server (all its threads) and of the
    # load generator: on a machine they share, which of the two is at a full core says
    # what bounds the row.
    return {"ops": r["ops_per_sec"], "p99_us": r["p99_us"], "wire": r["wire_bytes_per_op"],
            **{k: r.get(k) for k in ("server_cpu_us_per_op", "server_cores",
                                      "client_cpu_us_per_op", "client_cores")}}


def memcached_load(srv, op, size, conns, pipeline, secs):
    return netswap_load(srv, "read" if op == "read" else "replace", size, conns, pipeline, secs, "memcached")


def resp_load(srv, op, size, conns, pipeline, secs):
    return netswap_load(srv, "read" if op == "read" else "replace", size, conns, pipeline, secs, "resp")


# Every contender of a throughput row: (key, label, start(size), load(srv, op, size, conns, pipeline, secs)).
def contenders(second_opinion):
    ns = lambda srv, op, size, c, p, secs: netswap_load(srv, "read" if op == "read" else "replace", size, c, p, secs)
    out = [
        ("netswap", "netswap (1 thread)", lambda size: netswap_server(1), ns),
        ("netswap_t2", "netswap (2 threads)", lambda size: netswap_server(2), ns),
        ("ceiling", "framing-only ceiling", lambda size: ceiling_server(size), ns),
        ("redis", "Redis", lambda size: redis_server(), resp_load),
        ("memcached", "memcached -t 2", lambda size: memcached_server(), memcached_load),
    ]
    if second_opinion:
        guess = lambda p: 700_000 if p > 1 else 100_000
        out.append(("redis_rb", "Redis (redis-benchmark, second opinion)", lambda size: redis_server(),
                    lambda srv, op, size, c, p, secs: redis_load(srv, op, size, c, p, secs,
                                                                 guess(p) if size < 65536 else 20000)))
    return out


# ---- Redis -----------------------------------------------------------------------

def redis_bench(port, test, size, conns, pipeline, n, keys):
    out = subprocess.run(["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-c", str(conns),
                          "-P", str(pipeline), "-d", str(size), "-t", test, "-n", str(n),
                          "-r", str(keys), "--csv", "-q"],
                         check=True, capture_output=True, text=True).stdout
    rows = [l for l in out.splitlines() if l.startswith('"') and not l.startswith('"test"')]
    fields = [f.strip('"') for f in rows[-1].split('","')]
    return {"ops": float(fields[1]), "p99_us": float(fields[6]) * 1000}


def redis_load(srv, op, size, conns, pipeline, secs, guess):
    n = max(2000, int(guess * secs))
    keys = keys_for(size)
    if op == "read":
        # Random keys in [0, keys): 12 sets per key leave ~none unset (e^-12), so GETs hit.
        redis_bench(srv.port, "set", size, conns, pipeline, keys * 12, keys)
        return redis_bench(srv.port, "get", size, conns, pipeline, n, keys)
    return redis_bench(srv.port, "set", size, conns, pipeline, n, keys)


def resp(*parts):
    out = b"*%d\r\n" % len(parts)
    for p in parts:
        p = p if isinstance(p, bytes) else str(p).encode()
        out += b"$%d\r\n%s\r\n" % (len(p), p)
    return out


# ---- memcached ------------------------------------------------------------------

# ---- memory ------------------------------------------------------------------------

def memory_netswap(n, size):
    srv = netswap_server(1)
    try:
        r = netswap_bench(srv.port, srv.proc.pid, "fill", "--records", str(n), "--size", str(size),
                          "-c", "4", "-P", "128")
        return r["server_bytes_per_record"]
    finally:
        srv.stop()


def memory_redis(n, size):
    srv = redis_server()
    try:
        before = rss_kib(srv.proc.pid)
        s = socket.create_connection(("127.0.0.1", srv.port))
        script = "for i=1,tonumber(ARGV[1]) do redis.call('SET', string.format('key:%012d', i), ARGV[2]) end return 1"
        s.sendall(resp("EVAL", script, 0, n, b"v" * size))
        s.settimeout(120)
        got = s.recv(100)
        assert got.startswith(b":1"), got
        s.close()
        return (rss_kib(srv.proc.pid) - before) * 1024 / n
    finally:
        srv.stop()


def memory_memcached(n, size):
    srv = memcached_server()
    try:
        before = rss_kib(srv.proc.pid)
        s = socket.create_connection(("127.0.0.1", srv.port))
        value = b"v" * size
        batch = []
        for i in range(n):
            batch.append(b"set key:%012d 0 0 %d noreply\r\n%s\r\n" % (i, size, value))
            if len(batch) == 2000:
                s.sendall(b"".join(batch))
                batch = []
        s.sendall(b"".join(batch) + b"mn\r\n")
        s.settimeout(120)
        buf = b""
        while b"MN" not in buf:
            buf += s.recv(100)
        s.close()
        return (rss_kib(srv.proc.pid) - before) * 1024 / n
    finally:
        srv.stop()


# ---- head-of-line -------------------------------------------------------------------

def hol_netswap(direction, big, receive_buffer=0):
    """receive_buffer: the server's --receive-buffer and the client's (0: the kernel's)."""
    srv = netswap_server(1, "--receive-buffer", str(receive_buffer))
    try:
        r = netswap_bench(srv.port, srv.proc.pid, "hol", "--big", str(big), "--direction", direction,
                          "--reads", "200", "--receive-buffer", str(receive_buffer))
        return {"p99_us": r["p99_us"], "transfer_ms": r["transfer_seconds"] * 1000,
                "during": r["during_transfer"]}
    finally:
        srv.stop()


def hol_redis(direction, big, reads=200):
    """One connection, the way a Redis client pipeline carries it: the big SET (or GET)
    first, then small GETs issued every 0.5 ms while it is in flight."""
    srv = redis_server()
    try:
        s = socket.create_connection(("127.0.0.1", srv.port))
        s.sendall(resp("SET", "small", b"x" * 64) + resp("SET", "big", b"b" * big))
        f = s.makefile("rb")
        assert f.readline() == b"+OK\r\n" and f.readline() == b"+OK\r\n"
        first = resp("SET", "big", b"c" * big) if direction == "write" else resp("GET", "big")
        get_small = resp("GET", "small")
        issued = [0.0] * reads
        received = [0.0] * reads

        def writer():
            start = time.perf_counter()
            s.sendall(first)   # the small GETs queue behind it on the same connection
            for i in range(reads):
                due = start + i * 0.0005
                now = time.perf_counter()
                if now < due:
                    time.sleep(due - now)
                issued[i] = max(due, time.perf_counter()) if time.perf_counter() < due else due
                s.sendall(get_small)

        t = threading.Thread(target=writer)
        t0 = time.perf_counter()
        t.start()
        line = f.readline()            # reply to the big request
        if direction == "read":
            f.read(int(line[1:]) + 2)
        transfer_ms = (time.perf_counter() - t0) * 1000
        for i in range(reads):
            f.readline()
            f.read(66)
            received[i] = time.perf_counter()
        t.join()
        lat = sorted((received[i] - issued[i]) * 1e6 for i in range(reads))
        return {"p99_us": lat[int(0.99 * (reads - 1))], "transfer_ms": transfer_ms,
                "during": sum(1 for i in range(reads) if issued[i] - t0 < transfer_ms / 1000)}
    finally:
        srv.stop()


# ---- report -------------------------------------------------------------------------

def median(xs):
    return statistics.median(xs)


def svg_chart(rows, path):
    """One horizontal bar per row and rival: how many times better netswap is (log scale)."""
    import math
    rivals = [("redis", "Redis", "#d1495b"), ("memcached", "memcached", "#66a182")]
    lo, hi = 0.25, 256.0
    w, left, right, top, row_h = 1000, 360, 60, 56, 34
    h = top + row_h * len(rows) + 50
    plot_w = w - left - right

    def x(v):
        v = min(max(v, lo), hi)
        return left + (math.log2(v) - math.log2(lo)) / (math.log2(hi) - math.log2(lo)) * plot_w

    def better(r, s):
        a, b = r.get("netswap"), r.get(s)
        if not a or not b:
            return None
        return b / a if r["kind"] in ("memory", "hol") else a / b

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<text x="{w / 2}" y="20" text-anchor="middle" font-size="15">netswap against Redis and memcached, same machine, same run</text>',
           f'<text x="{w / 2}" y="38" text-anchor="middle" fill="#555">times better (log scale): right of 1x netswap wins; throughput, bytes per record and p99 latency</text>']
    for v in [0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256]:
        xx = x(v)
        out.append(f'<line x1="{xx:.1f}" x2="{xx:.1f}" y1="{top - 6}" y2="{h - 44}" stroke="{"#333" if v == 1 else "#e3e3e3"}"/>')
        out.append(f'<text x="{xx:.1f}" y="{h - 30}" text-anchor="middle">{v:g}x</text>')
    for i, r in enumerate(rows):
        y0 = top + i * row_h
        label = r["label"].replace("&", "and").replace(", same connection (us)", "")
        out.append(f'<text x="{left - 8}" y="{y0 + row_h / 2 + 4:.1f}" text-anchor="end">{label}</text>')
        for j, (s, name, color) in enumerate(rivals):
            v = better(r, s)
            if v is None:
                continue
            yy = y0 + 4 + j * (row_h - 8) / 2
            x1, x2 = sorted([x(1), x(v)])
            out.append(f'<rect x="{x1:.1f}" y="{yy:.1f}" width="{max(x2 - x1, 1):.1f}" height="{(row_h - 10) / 2:.1f}" fill="{color}"><title>{name}: {v:.2f}x</title></rect>')
            out.append(f'<text x="{x(v) + (4 if v >= 1 else -4):.1f}" y="{yy + 10:.1f}" font-size="10" text-anchor="{"start" if v >= 1 else "end"}">{v:.2f}x</text>')
    for j, (s, name, color) in enumerate(rivals):
        out.append(f'<rect x="{left + j * 160}" y="{h - 18}" width="12" height="12" fill="{color}"/>')
        out.append(f'<text x="{left + j * 160 + 18}" y="{h - 8}">against {name}</text>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--runs", type=int, default=5, help="runs per throughput row, contenders alternating (median)")
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--quick", action="store_true", help="1 run, 2 s, 100k records (smoke test)")
    ap.add_argument("--no-second-opinion", action="store_true", help="skip redis-benchmark")
    ap.add_argument("--only", default="ops,bytes,memory,hol",
                    help="comma list of row kinds to run: ops, bytes, memory, hol")
    ap.add_argument("--rows", default="", help="only throughput rows whose label contains this")
    a = ap.parse_args()
    if a.quick:
        a.seconds, a.runs, a.records = 2, 1, 100_000
    rows = []
    who = contenders(not a.no_second_opinion)

    def throughput_row(kind, label, op, size, conns, pipeline):
        if a.rows and a.rows not in label:
            return
        r = {"kind": kind, "label": label, "size": size, "op": op, "connections": conns, "pipeline": pipeline,
             "tools": "netswap-bench load for every contender (protocol netswap / resp / memcached)",
             "runs": {k: [] for k, *_ in who}}
        for _ in range(a.runs):
            for key, _, start, load in who:
                srv = start(size)
                try:
                    m = load(srv, op, size, conns, pipeline, a.seconds)
                finally:
                    srv.stop()
                r["runs"][key].append(m)
        scale = size if kind == "bytes" else 1
        for key, *_ in who:
            ms = r["runs"][key]
            r[key] = median([m["ops"] for m in ms]) * scale
            r[key + "_p99_us"] = median([m["p99_us"] for m in ms])
            for cpu in ("server_cpu_us_per_op", "server_cores", "client_cpu_us_per_op", "client_cores"):
                xs = [m[cpu] for m in ms if m.get(cpu) is not None]
                r[f"{key}_{cpu}"] = median(xs) if xs else None
        rows.append(r)
        print_row(r, who)

    only = set(a.only.split(","))
    print(f"medians of {a.runs} alternating run(s) of {a.seconds:g} s\n")
    if "ops" in only:
        for size, label in [(64, "64 B"), (1024, "1 KiB")]:
            for op in ["read", "write"]:
                for p in [1, 16]:
                    throughput_row("ops", f"{label} {op}, P{p}", op, size, 50, p)
    if "bytes" in only:
        for size, label in [(65536, "64 KiB"), (1 << 20, "1 MiB")]:
            for op in ["read", "write"]:
                throughput_row("bytes", f"{label} {op}, 4 conns", op, size, 4, 1)
    if "memory" in only:
        r = {"kind": "memory", "label": f"bytes per 64 B record ({a.records:,} records)",
             "tools": "netswap-bench fill / Lua EVAL / raw set pipeline; server RSS growth",
             "netswap": memory_netswap(a.records, 64), "redis": memory_redis(a.records, 64),
             "memcached": memory_memcached(a.records, 64)}
        rows.append(r)
        print_row(r)
    for direction in (["write", "read"] if "hol" in only else []):
        # One run's p99 is the second-worst of 200 reads: medians of --runs alternating
        # runs, like every other row (one run gave anything from 0.9 to 3.5 ms).
        # The same with 256 KiB socket receive buffers at both ends (`--receive-buffer`,
        # the clients' `receive_buffer`; docs/BENCHMARKS.md), against the same Redis runs.
        ns, nb, rd = [], [], []
        for _ in range(a.runs):
            ns.append(hol_netswap(direction, 64 << 20))
            nb.append(hol_netswap(direction, 64 << 20, 256 << 10))
            rd.append(hol_redis(direction, 64 << 20))
        for runs, what in [(ns, ""), (nb, " (256 KiB buffers)")]:
            r = {"kind": "hol", "label": f"p99 small read during a 64 MiB {direction}{what}, same connection (us)",
                 "tools": "netswap-bench hol / this script (raw RESP)",
                 "netswap": median([m["p99_us"] for m in runs]), "redis": median([m["p99_us"] for m in rd]),
                 "memcached": None, "netswap_transfer_ms": median([m["transfer_ms"] for m in runs]),
                 "redis_transfer_ms": median([m["transfer_ms"] for m in rd]),
                 "netswap_runs_us": [m["p99_us"] for m in runs]}
            rows.append(r)
            print_row(r)
    if only != {"ops", "bytes", "memory", "hol"} or a.rows:
        print("\n(partial run: docs/bench/ left as it was)")
        return 0
    os.makedirs(os.path.join(ROOT, "docs", "bench"), exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "seconds": a.seconds, "runs": a.runs,
            "contenders": [[k, label] for k, label, *_ in who], "cpus": os.cpu_count(),
            "cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?"),
            "redis": subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.strip(),
            "memcached": subprocess.run(["memcached", "-V"], capture_output=True, text=True).stdout.strip()}
    with open(os.path.join(ROOT, "docs", "bench", "results.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    svg_chart(rows, os.path.join(ROOT, "docs", "bench", "chart.svg"))
    print("\nwrote docs/bench/results.json and docs/bench/chart.svg")


def fmt(kind, v):
    if v is None:
        return "—"
    if kind == "bytes":
        return f"{v / 1e6:,.0f} MB/s"
    if kind == "memory":
        return f"{v:,.0f} B"
    if kind == "hol":
        return f"{v:,.0f} us"
    return f"{v:,.0f}/s"


def ratio(kind, a, b):
    if not a or not b:
        return "—"
    x = (b / a) if kind in ("memory", "hol") else (a / b)   # >1 = netswap better
    return f"{x:.2f}x"


def print_row(r, who=None):
    k = r["kind"]
    if who is None:
        print(f"{r['label']:<62} netswap {fmt(k, r['netswap']):>14}  redis {fmt(k, r['redis']):>14} "
              f"({ratio(k, r['netswap'], r['redis'])})  memcached {fmt(k, r.get('memcached')):>14} "
              f"({ratio(k, r['netswap'], r.get('memcached'))})  [{r['tools']}]", flush=True)
        return
    cols = "  ".join(f"{key} {fmt(k, r[key])}" for key, *_ in who)
    rat = "  ".join(f"/{key} {ratio(k, r['netswap'], r[key])}" for key in ("redis", "memcached", "ceiling"))
    best = max(("netswap", "netswap_t2"), key=lambda key: r[key])
    print(f"{r['label']:<22} {cols}  | netswap(1t) {rat}  | faster threads: {best}", flush=True)
    cpu = "  ".join(f"{key} {r[key + '_server_cpu_us_per_op']:.2f}+{r[key + '_client_cpu_us_per_op']:.2f} us "
                    f"({r[key + '_server_cores']:.2f}/{r[key + '_client_cores']:.2f} cores)"
                    for key, *_ in who if r.get(key + "_server_cpu_us_per_op") is not None
                    and r.get(key + "_client_cpu_us_per_op") is not None)
    if cpu:
        print(f"{'':<22} CPU per op, server + load generator: {cpu}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
