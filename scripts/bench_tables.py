#!/usr/bin/env python3
"""Markdown tables from herald-bench results (one JSON object per line), Herald beside the
reference server measured in the same run. Usage: bench_tables.py results.jsonl > tables.md"""
import json
import platform
import statistics
import subprocess
import sys
from collections import defaultdict


def load(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, digits=0):
    if v is None:
        return "-"
    if isinstance(v, float) and digits == 0:
        v = round(v)
    if isinstance(v, (int,)) or digits == 0:
        return f"{int(v):,}"
    return f"{v:,.{digits}f}"


def ms(us):
    return "-" if us is None else f"{us / 1000:.1f}"


def ratio(a, b):
    return "-" if not a or not b else f"{a / b:.2f}"


def machine():
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = subprocess.run(["nproc", "--all"], capture_output=True, text=True).stdout.strip()
    return f"{cpu}, {cores} cores, Linux {platform.release()}"


def main():
    rows = load(sys.argv[1])
    out = [f"Machine: {machine()}. Server pinned to CPU 0, herald-bench to CPU 1.", ""]
    by = defaultdict(list)
    for r in rows:
        by[(r["scenario"], r.get("label", ""), r["connections"], r.get("rate_offered", 0))].append(r)

    # Idle memory.
    idle = sorted({k[2] for k in by if k[0] == "idle"})
    if idle:
        out += ["### Idle memory per connection (server RSS growth / connections)", "",
                "| connections | reference ws | herald ws | herald sse | herald ws / reference | herald sse / herald ws |",
                "|---:|---:|---:|---:|---:|---:|"]
        for n in idle:
            get = lambda label: med([r["rss_per_connection_bytes"] for r in by.get(("idle", label, n, 0), [])])
            ref, ws, sse = get("reference ws"), get("herald ws"), get("herald sse")
            out.append(f"| {n:,} | {fmt(ref)} B | {fmt(ws)} B | {fmt(sse)} B | {ratio(ws, ref)} | {ratio(sse, ws)} |")
        out.append("")

    # Saturation throughput.
    sat = sorted({k[2] for k in by if k[0] == "fanout" and k[3] == 0 and k[1] in ("herald ws", "reference ws")})
    if sat:
        out += ["### Fan-out far above saturation (one channel, 100-byte payloads, publishers as fast as the server takes them)", "",
                "| subscribers | runs | reference deliveries/s | herald deliveries/s | herald / reference | herald lost | herald p50 ms | herald p99 ms | reference p50 ms | reference p99 ms |",
                "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for n in sat:
            h = by.get(("fanout", "herald ws", n, 0), [])
            f = by.get(("fanout", "reference ws", n, 0), [])
            hd = med([r["deliveries_per_sec"] for r in h]); fd = med([r["deliveries_per_sec"] for r in f])
            out.append(f"| {n:,} | {len(h)} | {fmt(fd)} | {fmt(hd)} | {ratio(hd, fd)} | {sum(r['lost'] for r in h)} | "
                       f"{ms(med([r['latency_us']['p50'] for r in h]))} | {ms(med([r['latency_us']['p99'] for r in h]))} | "
                       f"{ms(med([r['latency_us']['p50'] for r in f]))} | {ms(med([r['latency_us']['p99'] for r in f]))} |")
        out.append("")

    # Latency below saturation.
    lat = sorted({(k[2], k[3]) for k in by if k[0] == "fanout" and k[3] > 0 and k[1] in ("herald ws", "reference ws")})
    if lat:
        out += ["### Latency below saturation (end to end, publish call to receipt)", "",
                "| subscribers | msg/s | deliveries/s | reference p50 ms | herald p50 ms | p50 ratio | reference p99 ms | herald p99 ms | p99 ratio | herald p99.9 ms | herald lost |",
                "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for n, rate in lat:
            h = by.get(("fanout", "herald ws", n, rate), [])
            f = by.get(("fanout", "reference ws", n, rate), [])
            hp50 = med([r["latency_us"]["p50"] for r in h]); fp50 = med([r["latency_us"]["p50"] for r in f])
            hp99 = med([r["latency_us"]["p99"] for r in h]); fp99 = med([r["latency_us"]["p99"] for r in f])
            out.append(f"| {n:,} | {rate:g} | {fmt(n * rate)} | {ms(fp50)} | {ms(hp50)} | {ratio(hp50, fp50)} | {ms(fp99)} | {ms(hp99)} | {ratio(hp99, fp99)} | "
                       f"{ms(med([r['latency_us']['p999'] for r in h]))} | {sum(r['lost'] for r in h)} |")
        out.append("")

    hostile_tables(rows, out)
    alloc_tables(rows, out)
    publisher_tables(rows, load(sys.argv[2]) if len(sys.argv) > 2 else [], out)

    # Everything else, one row per run.
    special = lambda r: r.get("label", "").startswith(("hostile:", "alloc ", "alloc:", "pub:"))
    rest = [r for r in rows if not (special(r) or r["scenario"] == "idle" or (r["scenario"] == "fanout" and r.get("label") in ("herald ws", "reference ws")))]
    if rest:
        out += ["### Other runs", "",
                "| label | scenario | connections | channels | payload B | msg/s offered | publications/s | deliveries/s | p50 ms | p99 ms | lost | disconnects | slow readers (cut) | 503s |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
        for r in rest:
            l = r["latency_us"]
            slow = f"{r.get('slow_connections', 0)} ({r.get('slow_disconnected', 0)})" if r.get('slow_connections') else "-"
            out.append(f"| {r.get('label','')} | {r['scenario']} | {r['connections']:,} | {r.get('channels', 1)} | {r.get('payload', 100)} | {r.get('rate_offered', 0):g} | "
                       f"{fmt(r['publications_per_sec'])} | {fmt(r['deliveries_per_sec'])} | {ms(l['p50'] or None)} | {ms(l['p99'] or None)} | "
                       f"{r['lost']} | {json.dumps(r.get('disconnects', {}))} | {slow} | {r.get('publish_503s', 0)} |")
        out.append("")
    print("\n".join(out))


def mb(b):
    return "-" if b is None else f"{b / 1e6:,.0f}"


def settle_at(r, secs):
    """RSS about `secs` seconds after every connection closed (the last reading before)."""
    pts = [b for t, b in r.get("server_rss_settle", []) if t <= secs + 0.5]
    return pts[-1] if pts else None


def hostile_tables(rows, out):
    """Runs labelled `hostile: none` / `hostile: all` (scripts/bench hostile)."""
    runs = {lab: [r for r in rows if r.get("label") == lab] for lab in ("hostile: none", "hostile: all")}
    if not runs["hostile: all"]:
        return
    out += ["### Good subscribers with and without hostile clients (medians of the runs; RSS in MB)", "",
            "| hostile clients | runs | good deliveries/s | p50 ms | p99 ms | p99.9 ms | good lost | good gaps | good disconnects | publisher 503s | server 4008s | RSS ready | RSS peak | RSS end of run | RSS 15 s idle |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    meds = {}
    for lab, rs in runs.items():
        if not rs:
            continue
        m = lambda f: med([f(r) for r in rs])
        meds[lab] = (m(lambda r: r["deliveries_per_sec"]), m(lambda r: r["latency_us"]["p50"]), m(lambda r: r["latency_us"]["p99"]))
        out.append(f"| {lab.split(': ')[1]} | {len(rs)} | {fmt(meds[lab][0])} | {ms(meds[lab][1])} | {ms(meds[lab][2])} | "
                   f"{ms(m(lambda r: r['latency_us']['p999']))} | {sum(r['lost'] for r in rs)} | {sum(r['gaps'] for r in rs)} | "
                   f"{sum(sum(r.get('disconnects', {}).values()) for r in rs)} | {sum(r.get('publish_503s', 0) for r in rs)} | "
                   f"{fmt(m(lambda r: r.get('server_disconnects', {}).get('4008', 0)))} | {mb(m(lambda r: r.get('server_rss_ready')))} | "
                   f"{mb(m(lambda r: r.get('server_rss_peak')))} | {mb(m(lambda r: r.get('server_rss_after')))} | {mb(m(lambda r: r.get('server_rss_idle')))} |")
    if len(meds) == 2:
        a, b = meds["hostile: all"], meds["hostile: none"]
        out.append(f"| all / none | | {ratio(a[0], b[0])} | {ratio(a[1], b[1])} | {ratio(a[2], b[2])} | | | | | | | | | | |")
    out.append("")
    out += ["### The hostile clients (each run with them)", "",
            "| run | kind | clients | cut 4008 (seen by the client) | endings | ended at s (seen by the client) | bursty: delivered, gaps | server 4008 cuts at s (count) |",
            "|---:|---|---:|---:|---|---|---|---|"]
    for i, r in enumerate(runs["hostile: all"], 1):
        tl = ", ".join(f"{t:g} ({n})" for t, n in r.get("cuts_4008_timeline", []))
        for kind, k in sorted(r.get("hostile", {}).items()):
            ended = ", ".join(f"{t:g}" for t in k.get("ended_secs", [])) or "-"
            bursty = f"{k['delivered']:,}, {k['gaps']}" if kind == "bursty" else "-"
            out.append(f"| {i} | {kind} | {k['clients']} | {k['cut_4008']} | {json.dumps(k['endings'])} | {ended} | {bursty} | {tl} |")
            tl = ""
    out.append("")


def publisher_tables(rows, depths, out):
    """Runs labelled `pub: SHAPE: SERVER` (scripts/bench publishers); `depths` holds the mean
    messages per writer flush of each Herald run."""
    rs = [r for r in rows if r.get("label", "").startswith("pub:")]
    if not rs:
        return
    shape = lambda r: r["label"].split(": ")[1]
    server = lambda r: r["label"].split(": ")[2]
    keys = list(dict.fromkeys((shape(r), r["connections"]) for r in rs))
    servers = ["herald", "herald api_threads=0", "reference"]
    m = lambda xs, f: med([f(r) for r in xs])
    reply = lambda r, q: (r.get("publish_reply_us") or {}).get(q)
    out += ["### Publishers: shapes at saturation (one channel, 100-byte publications; medians of the runs)", "",
            "`herald`: the default (plain HTTP on its own runtime, `api_threads = 1`); `api_threads=0`: every "
            "connection on one runtime (before). Reply: how long a publisher waited for each answer. "
            "Frames/flush: mean messages a subscriber's writer took per vectored write.", "",
            "| publishers | subscribers | server | runs | deliveries/s | vs reference | vs api_threads=0 | publications/s | e2e p50 ms | e2e p99 ms | reply p50 ms | reply p99 ms | frames/flush | lost | 503s |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for sh, n in keys:
        group = {sv: [r for r in rs if shape(r) == sh and r["connections"] == n and server(r) == sv] for sv in servers}
        d = {sv: m(g, lambda r: r["deliveries_per_sec"]) for sv, g in group.items()}
        for sv, g in group.items():
            if not g:
                continue
            fl = med([x["frames_per_flush"] for x in depths if x["label"] == f"pub: {sh}: {sv}" and x.get("connections") == n])
            out.append(f"| {sh} | {n:,} | {sv} | {len(g)} | {fmt(d[sv])} | {ratio(d[sv], d['reference']) if sv != 'reference' else '-'} | "
                       f"{ratio(d[sv], d['herald api_threads=0']) if sv == 'herald' else '-'} | {fmt(m(g, lambda r: r['publications_per_sec']))} | "
                       f"{ms(m(g, lambda r: r['latency_us']['p50']))} | {ms(m(g, lambda r: r['latency_us']['p99']))} | "
                       f"{ms(m(g, lambda r: reply(r, 'p50')))} | {ms(m(g, lambda r: reply(r, 'p99')))} | {fmt(fl, 1)} | "
                       f"{sum(r['lost'] for r in g)} | {sum(r.get('publish_503s', 0) for r in g)} |")
    out.append("")


def alloc_tables(rows, out):
    """Runs labelled `alloc KIND: NAME` (scripts/bench alloc), KIND flood, sse or fanout."""
    rs = [r for r in rows if r.get("label", "").startswith("alloc ")]
    if not rs:
        return
    kind = lambda r: r["label"].split(":", 1)[0][len("alloc "):]
    name = lambda r: r["label"].split(": ", 1)[1]
    names = list(dict.fromkeys(name(r) for r in rs))
    m = lambda xs, f: med([f(r) for r in xs])
    out += ["### Allocators: the node's memory through an attack and 30 s after it (MB, medians), and fan-out at saturation", "",
            "`ready`: good subscribers in (and, for flood, the 100 MB history filled), before the attack; "
            "`idle`: every connection closed for 10 s / 30 s.", "",
            "| allocator | attack | runs | start | ready | peak | end of run | 10 s idle | 30 s idle | 30 s idle − ready | good p99 ms under attack |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for k in ("flood", "sse"):
        for n in names:
            a = [r for r in rs if kind(r) == k and name(r) == n]
            if not a:
                continue
            ready, idle30 = m(a, lambda r: r.get("server_rss_ready")), m(a, lambda r: settle_at(r, 30))
            out.append(f"| {n} | {k} | {len(a)} | {mb(m(a, lambda r: r.get('server_rss_before')))} | {mb(ready)} | "
                       f"{mb(m(a, lambda r: r.get('server_rss_peak')))} | {mb(m(a, lambda r: r.get('server_rss_after')))} | "
                       f"{mb(m(a, lambda r: settle_at(r, 10)))} | {mb(idle30)} | {mb(idle30 - ready if idle30 and ready else None)} | "
                       f"{ms(m(a, lambda r: r['latency_us']['p99']))} |")
    out += ["", "| allocator | runs | fan-out at saturation, 2,000 subscribers: deliveries/s | p50 ms | p99 ms | RSS at end MB |",
            "|---|---:|---:|---:|---:|---:|"]
    for n in names:
        s = [r for r in rs if kind(r) == "fanout" and name(r) == n]
        if s:
            out.append(f"| {n} | {len(s)} | {fmt(m(s, lambda r: r['deliveries_per_sec']))} | {ms(m(s, lambda r: r['latency_us']['p50']))} | "
                       f"{ms(m(s, lambda r: r['latency_us']['p99']))} | {mb(m(s, lambda r: r.get('server_rss_after')))} |")
    out.append("")


if __name__ == "__main__":
    main()
