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

    # Everything else, one row per run.
    rest = [r for r in rows if not (r["scenario"] == "idle" or (r["scenario"] == "fanout" and r.get("label") in ("herald ws", "reference ws")))]
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


if __name__ == "__main__":
    main()
