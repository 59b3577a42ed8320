#!/usr/bin/env python3
"""Turns a bench/run results folder (results.jsonl, env.json) into results.md, results.csv and
throughput.png, and prints results.md.

    bench/report.py RESULTS_DIR

The targets section computes each ratio from the run's own rows; a row that is missing, not
available or failed makes its target "not available", never a guess.
"""
import csv
import json
import math
import os
import sys

BASE_FIELDS = ["peer", "delivery", "workload", "size", "clients", "gbps", "rps", "p50_us",
               "p99_us", "server_cpu_s_per_gb", "peak_rss_mb"]
PEER_ORDER = [("memcpy", "memory"), ("read", "memory"), ("pread", "file"), ("redis", "tcp"), ("redis", "unix"),
              ("grpc", "floor"), ("chunkd", "inline-tcp"), ("chunkd", "inline-unix"), ("chunkd", "shm"), ("s3", "http")]
MEASURED = ("hit", "batch", "zipf", "s3")


def human_size(n):
    n = int(n)
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} B"


def num(v, digits=3):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 100:
        return f"{v:.0f}"
    return f"{v:.{digits}g}"


def peer_rank(row):
    key = (row.get("peer"), row.get("delivery"))
    return PEER_ORDER.index(key) if key in PEER_ORDER else len(PEER_ORDER)


def usable(row):
    return row is not None and row.get("available", True) and row.get("gbps") is not None


def handles_only(row):
    """A row that counted handles to shared memory, not bytes read (chunkd shm-handles): kept
    out of the GB/s table, the plot and the targets, and shown apart as handles per second."""
    return row.get("counts") == "handles" or row.get("delivery") == "shm-handles"


def find(rows, workload, size, clients, peer, delivery):
    for r in rows:
        if (r.get("workload") == workload and r.get("size") == size and r.get("clients") == clients
                and r.get("peer") == peer and r.get("delivery") == delivery):
            return r
    return None


def pick_repetitions(rows):
    """One row per measurement: of repeated rows (field "rep"), the median by GB/s (the upper
    median for an even count); rows that failed count only when every repetition failed."""
    groups, order = {}, []
    for r in rows:
        if r.get("workload") not in MEASURED:
            order.append(("single", id(r)))
            groups[("single", id(r))] = [r]
            continue
        key = (r["workload"], r["size"], r["clients"], r["peer"], r["delivery"])
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(r)
    picked = []
    for key in order:
        group = groups[key]
        good = sorted((r for r in group if usable(r)), key=lambda r: r["gbps"])
        if not good:
            picked.append(group[0])
            continue
        chosen = dict(good[len(good) // 2])
        chosen["repetitions"] = len(group)
        picked.append(chosen)
    return picked


def throughput_table(rows):
    lines = ["| workload | size | clients | peer | delivery | GB/s | req/s | p50 µs | p99 µs "
             "| server CPU s/GB | client CPU s/GB | peak RSS MiB | hit ratio | × Redis TCP "
             "| × Redis UNIX |",
             "|---|---|--:|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    measured = [r for r in rows if r.get("workload") in MEASURED and not handles_only(r)]
    measured.sort(key=lambda r: (MEASURED.index(r["workload"]), r["size"], r["clients"],
                                 peer_rank(r)))
    for r in measured:
        workload = r["workload"]
        if workload == "batch":
            workload = f"hit, {r.get('batch', '?')} per request"
        head = f"| {workload} | {human_size(r['size'])} | {r['clients']} | {r['peer']} " \
               f"| {r['delivery']} "
        if not usable(r):
            lines.append(head + f"| not available: {r.get('reason', '')} | | | | | | | | | |")
            continue

        def over(delivery):
            redis = find(rows, r["workload"], r["size"], r["clients"], "redis", delivery)
            v = r["gbps"] / redis["gbps"] if usable(redis) and redis["gbps"] else None
            return num(v) + "×" if v is not None else ""
        hit = r.get("hit_ratio")
        note = ""
        if r.get("errors") or r.get("mismatches"):
            note = f" ⚠ {r.get('errors', 0)} errors, {r.get('mismatches', 0)} wrong values"
        lines.append(
            head + f"| {num(r['gbps'])} | {num(r['rps'])} | {num(r['p50_us'])} "
            f"| {num(r['p99_us'])} | {num(r.get('server_cpu_s_per_gb'))} "
            f"| {num(r.get('client_cpu_s_per_gb'))} "
            f"| {num(r.get('peak_rss_mb'))} | {num(hit) if hit is not None else ''} "
            f"| {over('tcp')} | {over('unix')}{note} |")
    return lines


def s3_special(rows):
    """chunkd (warm) against GETs of the same objects straight from the S3 server (moto)."""
    pairs = sorted({(r["size"], r["clients"]) for r in rows if r.get("workload") == "s3"})
    if not pairs:
        return []
    lines = ["### chunkd (warm) vs S3 directly", "",
             "The same objects, driver, draws and clients: Gets through chunkd serving "
             "`s3://BUCKET/bench` after one full warm pass, and GETs signed with AWS Signature V4 "
             "(libcurl, one connection per client) straight from the S3 server. The server is "
             "moto (Python, on loopback), much slower per request than real S3, so the ratio is "
             "an upper bound, and what it says of a local cache against a remote store holds "
             "only in spirit (real S3 adds network latency moto lacks; it is not a measurement "
             "of AWS).", "",
             "| size | clients | chunkd GB/s | S3 GB/s | chunkd ÷ S3 | chunkd p50 / p99 µs "
             "| S3 p50 / p99 µs | chunkd backend reads while timed |",
             "|--:|--:|--:|--:|--:|--:|--:|--:|"]
    summary = []
    for size, clients in pairs:
        c = find(rows, "s3", size, clients, "chunkd", "inline-tcp")
        d = find(rows, "s3", size, clients, "s3", "http")
        if not usable(c) or not usable(d) or not d["gbps"]:
            why = "; ".join(f"{who}: {r.get('reason', 'not available') if r else 'no row'}"
                            for r, who in ((c, "chunkd"), (d, "s3")) if not usable(r))
            lines.append(f"| {human_size(size)} | {clients} | not available: {why} | | | | | |")
            continue
        ratio = c["gbps"] / d["gbps"]
        reads = c.get("backend_reads")
        warm = "" if reads in (None, 0) else " ⚠ not warm"
        errs = sum((r.get("errors") or 0) + (r.get("mismatches") or 0) for r in (c, d))
        lines.append(
            f"| {human_size(size)} | {clients} | {num(c['gbps'])} | {num(d['gbps'])} "
            f"| **{ratio:.1f}×** | {num(c['p50_us'])} / {num(c['p99_us'])} "
            f"| {num(d['p50_us'])} / {num(d['p99_us'])} | {reads if reads is not None else '–'}"
            f"{warm}{f' ⚠ {errs} errors' if errs else ''} |")
        summary.append(f"{human_size(size)} × {clients}: {ratio:.1f}×")
    lines.append("")
    if summary:
        lines += ["chunkd warm vs S3 direct (moto; an upper bound): " + ", ".join(summary) + ".",
                  ""]
    return lines


def handles_table(rows):
    """chunkd shm-handles rows: each request a handle and a mapped view, no byte of the value
    read; what the protocol and the leases cost per value, not a throughput of bytes."""
    handles = [r for r in rows if r.get("workload") in MEASURED and handles_only(r)]
    if not handles:
        return []
    handles.sort(key=lambda r: (MEASURED.index(r["workload"]), r["size"], r["clients"]))
    lines = ["### Shared-memory handles per second (no byte read)", "",
             "chunkd `shm-handles`: each value is a handle and a read-only view of the server's "
             "shared memory, and none of its bytes is read: a count of handles (values made "
             "readable), not of bytes delivered, so it is not comparable with the GB/s above. "
             "The `shm` rows above read every byte.", "",
             "| workload | size | clients | handles/s | p50 µs | p99 µs | server CPU µs per handle |",
             "|---|---|--:|--:|--:|--:|--:|"]
    for r in handles:
        workload = r["workload"]
        if workload == "batch":
            workload = f"hit, {r.get('batch', '?')} per request"
        head = f"| {workload} | {human_size(r['size'])} | {r['clients']} "
        if not usable(r):
            lines.append(head + f"| not available: {r.get('reason', '')} | | | |")
            continue
        cpu = r.get("server_cpu_s_per_gb")
        per_handle = cpu * r["size"] / 1e9 * 1e6 if cpu is not None else None
        lines.append(head + f"| {num(r['rps'])} | {num(r['p50_us'])} | {num(r['p99_us'])} "
                     f"| {num(per_handle)} |")
    lines.append("")
    return lines


def specials(rows):
    lines = handles_table(rows)
    evictions = [r for r in rows if r.get("workload") == "eviction"]
    if evictions:
        lines += ["### Eviction: one Zipf trace, cache at 10% of the data", "",
                  "| policy | keys | value | trace (counted) | α | miss ratio | miss ratio incl. "
                  "warm-up | evictions | errors |",
                  "|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
        for r in evictions:
            if not r.get("available", True):
                lines.append(f"| {r.get('eviction', '?')} | not available: {r.get('reason')} "
                             "| | | | | | | |")
                continue
            lines.append(
                f"| {r.get('eviction')} | {r.get('keys')} | {human_size(r.get('size', 0))} "
                f"| {r.get('trace')} ({r.get('trace', 0) - r.get('warm_requests', 0)}) "
                f"| {r.get('zipf_alpha')} | {num(r.get('miss_ratio'), 4)} "
                f"| {num(r.get('miss_ratio_all'), 4)} | {r.get('evictions')} | {r.get('errors')} |")
        lines.append("")
    for r in rows:
        if r.get("workload") == "single_flight":
            lines += ["### Concurrent misses on one key", ""]
            if not r.get("available", True):
                lines += [f"not available: {r.get('reason')}", ""]
                continue
            lines += [f"{r['clients']} concurrent Gets of a {human_size(r['size'])} value written "
                      f"straight into the store (not cached), {r['rounds']} rounds: backend reads "
                      f"per round {r['backend_reads']}, single-flight joins "
                      f"{r['single_flight_joins']}, errors {r['errors']}.", ""]
        if r.get("workload") == "churn":
            lines += ["### Peak RSS under churn", ""]
            if not r.get("available", True):
                lines += [f"not available: {r.get('reason')}", ""]
                continue
            lines += [f"{r['clients']} clients, {num(r['seconds'])} s of Puts and Gets of distinct "
                      f"keys (64 KiB–1 MiB): {num(r['put_bytes'] / 2**20)} MiB written "
                      f"({num(r['written_over_budget'])}× the budget of "
                      f"{num(r['budget_mb'])} MiB), {r['puts']} Puts, {r['gets']} Gets, "
                      f"{r.get('evictions')} evictions, {r['errors']} errors; chunkd's peak RSS "
                      f"{num(r['peak_rss_mb'])} MiB (at the end {num(r['rss_end_mb'])} MiB), "
                      f"limit budget × 1.1 + 64 MiB = {num(r['limit_mb'])} MiB.", ""]
    lines += s3_special(rows)
    return lines


def targets(rows):
    out = []

    def add(name, value, held, detail):
        if held is None:
            verdict = "not available"
        else:
            verdict = "held" if held else "not held"
        out.append((name, value, verdict, detail))

    def ratio(workload, size, clients, a, b, field, workload_b=None):
        ra = find(rows, workload, size, clients, *a)
        rb = find(rows, workload_b or workload, size, clients, *b)
        if not usable(ra) or not usable(rb) or not rb[field]:
            why = []
            for r, who in ((ra, a), (rb, b)):
                if r is None:
                    why.append(f"{' '.join(who)}: no row")
                elif not usable(r):
                    why.append(f"{' '.join(who)}: {r.get('reason', 'not available')}")
            return None, "; ".join(why)
        errs = (ra.get("errors") or 0) + (rb.get("errors") or 0)
        fmt = "{:,.3f} GB/s" if field == "gbps" else "{:,.0f} req/s"
        return ra[field] / rb[field], (
            f"{fmt.format(ra[field])} vs {fmt.format(rb[field])}"
            + (f"; {errs} errors" if errs else ""))

    def floor(size, clients, field):
        # What a bare gRPC call reaches against Redis in the same run (bench/grpc_floor.h).
        f, _ = ratio("hit", size, clients, ("grpc", "floor"), ("redis", "tcp"), field)
        return f"; the gRPC floor: {f:.2f}× Redis" if f is not None else ""

    def ceiling(size, clients):
        # What reading every byte of the values in the driver's own memory reaches against
        # Redis in the same run: a shm row reads its values the same way, in the server's
        # memory, so it cannot pass this ratio.
        c, _ = ratio("hit", size, clients, ("read", "memory"), ("redis", "tcp"), "gbps")
        return f"; the read ceiling: {c:.2f}× Redis" if c is not None else ""

    mib = 1 << 20
    v, d = ratio("hit", mib, 4, ("chunkd", "inline-tcp"), ("redis", "tcp"), "gbps")
    add("1 MiB, 4 clients, inline TCP ≥ 1.0× Redis GET throughput",
        f"{v:.2f}×" if v is not None else "–", None if v is None else v >= 1.0,
        d + floor(mib, 4, "gbps"))
    # The shared-memory targets against Redis over TCP (as they were set) and over its UNIX
    # socket, the kind of socket the shm rows' requests travel on.
    for redis in ("tcp", "unix"):
        v, d = ratio("hit", mib, 4, ("chunkd", "shm"), ("redis", redis), "gbps")
        add("1 MiB, 4 clients, shared memory (every byte read), one Get at a time ≥ 4× Redis "
            f"GET throughput (Redis over {redis.upper()})", f"{v:.2f}×" if v is not None else "–",
            None if v is None else v >= 4.0, d + ceiling(mib, 4))
    v, d = ratio("hit", 4096, 1, ("chunkd", "inline-tcp"), ("redis", "tcp"), "rps")
    add("4 KiB, one client connection each: inline ≥ 0.5× Redis req/s",
        f"{v:.2f}×" if v is not None else "–", None if v is None else v >= 0.5,
        d + floor(4096, 1, "rps"))
    # The same targets with batches (GetMany), beside the one-request-at-a-time ones above.
    batch = next((r["batch"] for r in rows if r.get("workload") == "batch"), None)
    if batch:
        for redis in ("tcp", "unix"):
            v, d = ratio("batch", mib, 4, ("chunkd", "shm"), ("redis", redis), "gbps", "hit")
            p, dp = ratio("batch", mib, 4, ("chunkd", "shm"), ("redis", redis), "gbps")
            add(f"1 MiB, 4 clients, shared memory (every byte read), {batch} chunks per GetMany "
                f"≥ 10× Redis GET (Redis over {redis.upper()})",
                f"{v:.2f}×" if v is not None else "–", None if v is None else v >= 10.0,
                d + ceiling(mib, 4)
                + (f"; {p:.1f}× Redis with {batch} GETs pipelined ({dp})" if p is not None
                   else ""))
        v, d = ratio("batch", 4096, 1, ("chunkd", "inline-tcp"), ("redis", "tcp"), "rps")
        add(f"4 KiB, one connection each, {batch} values per request: GetMany ≥ 0.5× Redis "
            f"with {batch} GETs pipelined",
            f"{v:.2f}×" if v is not None else "–", None if v is None else v >= 0.5, d)

    sf = next((r for r in rows if r.get("workload") == "single_flight"), None)
    if sf is None or not sf.get("available", True):
        add("16 concurrent misses on one key → 1 backend read", "–", None,
            sf.get("reason", "") if sf else "no row")
    else:
        add("16 concurrent misses on one key → 1 backend read",
            f"{sf['backend_reads']} per round", bool(sf.get("held")),
            f"{sf['rounds']} rounds, {sf['errors']} errors, single-flight joins per round "
            f"{sf.get('single_flight_joins')} (held needs one backend read and at least one "
            "joined Get in every round)")

    ev = {r.get("eviction"): r for r in rows if r.get("workload") == "eviction"}
    s3, lru = ev.get("s3fifo"), ev.get("lru")
    if not s3 or not lru or s3.get("miss_ratio") is None or lru.get("miss_ratio") is None:
        add("Zipf, cache at 10%: S3-FIFO miss ratio ≤ LRU's", "–", None,
            "; ".join(r.get("reason", "") for r in (s3, lru) if r) or "no rows")
    else:
        add("Zipf, cache at 10%: S3-FIFO miss ratio ≤ LRU's",
            f"{s3['miss_ratio']:.4f} vs {lru['miss_ratio']:.4f}",
            s3["miss_ratio"] <= lru["miss_ratio"],
            f"{s3['keys']} keys of {human_size(s3['size'])}, α {s3['zipf_alpha']}, "
            f"{s3['trace'] - s3['warm_requests']} requests counted")

    ch = next((r for r in rows if r.get("workload") == "churn"), None)
    if ch is None or not ch.get("available", True) or ch.get("peak_rss_mb") is None:
        add("peak RSS under churn ≤ budget × 1.1 + 64 MiB", "–", None,
            ch.get("reason", "") if ch else "no row")
    else:
        add("peak RSS under churn ≤ budget × 1.1 + 64 MiB",
            f"{ch['peak_rss_mb']:.0f} MiB vs {ch['limit_mb']:.0f} MiB", bool(ch.get("held")),
            f"budget {ch['budget_mb']:.0f} MiB, {ch['written_over_budget']:.1f}× it written"
            + (f", {ch['errors']} errors" if ch.get("errors") else ""))

    lines = ["| target | measured | result | from |", "|---|---|---|---|"]
    for name, value, verdict, detail in out:
        lines.append(f"| {name} | {value} | **{verdict}** | {detail} |")
    return lines


def plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    hit = [r for r in rows if r.get("workload") == "hit" and usable(r) and not handles_only(r)]
    zipf = [r for r in rows if r.get("workload") == "zipf" and usable(r) and not handles_only(r)]
    clients = sorted({r["clients"] for r in hit})
    panels = len(clients) + (1 if zipf else 0)
    if panels == 0:
        return False
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4.5), squeeze=False)
    series = [k for k in PEER_ORDER if any((r["peer"], r["delivery"]) == k for r in hit + zipf)]
    for ax, c in zip(axes[0], clients):
        for peer, delivery in series:
            pts = sorted((r["size"], r["gbps"]) for r in hit
                         if r["clients"] == c and (r["peer"], r["delivery"]) == (peer, delivery))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                        label=f"{peer} {delivery}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        sizes = sorted({r["size"] for r in hit})
        ax.set_xticks(sizes, [human_size(s) for s in sizes])
        ax.set_title(f"hit-only, {c} client{'s' if c > 1 else ''}")
        ax.set_xlabel("value size")
        ax.set_ylabel("GB/s")
        ax.grid(True, which="both", alpha=0.3)
    if zipf:
        ax = axes[0][-1]
        for peer, delivery in series:
            pts = sorted((r["clients"], r["gbps"]) for r in zipf
                         if (r["peer"], r["delivery"]) == (peer, delivery))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                        label=f"{peer} {delivery}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        cs = sorted({r["clients"] for r in zipf})
        ax.set_xticks(cs, [str(c) for c in cs])
        ax.set_title(f"zipf, {human_size(zipf[0]['size'])}, chunkd cache 10%")
        ax.set_xlabel("clients")
        ax.set_ylabel("GB/s")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main():
    folder = sys.argv[1]
    rows = []
    with open(os.path.join(folder, "results.jsonl")) as f:
        for line in f:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    env = {}
    if os.path.exists(os.path.join(folder, "env.json")):
        env = json.load(open(os.path.join(folder, "env.json")))
    all_rows = rows

    fields = list(BASE_FIELDS)
    for r in rows:
        for k in r:
            if k not in fields:
                fields.append(k)
    with open(os.path.join(folder, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v
                        for k, v in r.items()})
    for r in all_rows:
        if r.get("batch", 1) > 1 and r.get("workload") == "hit":
            r["workload"] = "batch"  # its own rows: compared with batched peers only
    rows = pick_repetitions(all_rows)
    repeat = env.get("repeat", 1)

    load = env.get("loadavg_start")
    load_end = env.get("loadavg_end")
    md = [f"# chunkd bench ({'quick' if env.get('quick') else 'full'} run)", "",
          f"commit {env.get('commit', '?')}{' (with uncommitted changes)' if env.get('dirty') else ''}"
          + ("" if env.get("built_now", True) else
             f" (not rebuilt: binaries from {', '.join(f'{k} {v}' for k, v in env.get('binaries_modified', {}).items())})")
          + f", {env.get('cpu', '?')}, {env.get('cores', '?')} cores, kernel {env.get('kernel', '?')}"
          f", load average at start {', '.join(f'{x:.1f}' for x in load) if load else '?'}"
          f", at the end {', '.join(f'{x:.1f}' for x in load_end) if load_end else '?'}; "
          f"{env.get('redis', '')}", "",
          "Client threads and servers share this machine's cores. GB/s are 10⁹ bytes/s of values "
          "delivered; latencies are per request, as the client sees them; server CPU is the "
          "server process's user+system time per GB delivered, client CPU the driver's (all its "
          "threads); peak RSS is the server's VmHWM during the timed phase (reset just before "
          "it). × Redis TCP and × Redis UNIX: throughput over Redis GET over TCP and over its "
          "UNIX socket in the same workload, size and clients (a batch row over Redis with the "
          "same number of GETs pipelined). memcpy copies each value once (the single-copy ceiling); read reads every "
          "byte of it in place (the ceiling of the shm rows). Every row counts a "
          "value once the client has every byte of it: received from a socket, read from a "
          "file, or, for chunkd shm, read in the server's shared memory (the handle, the "
          "mapping and the lease, then a checksum of every byte); handles alone "
          "(chunkd shm-handles, no byte read) are counted apart, as handles per second."
          + (f" Each row was measured {repeat} times, interleaved with the other peers; the "
             "table shows the median by GB/s (the upper one for an even count), results.jsonl "
             "every repetition." if repeat > 1 else ""), "",
          "## Throughput and latency", ""]
    md += throughput_table(rows)
    md += ["", "## Special measurements", ""]
    md += specials(rows)
    md += ["## Targets", ""]
    md += targets(rows)
    md.append("")
    if plot(rows, os.path.join(folder, "throughput.png")):
        md += ["![throughput by value size and peer](throughput.png)", ""]
    else:
        md += ["(no plot: matplotlib is not installed in .venv)", ""]
    text = "\n".join(md)
    with open(os.path.join(folder, "results.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
