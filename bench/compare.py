#!/usr/bin/env python3
"""Reads the JSON lines of bench/compare.sh and prints medians (min-max) and Dray/peer ratios."""
import json
import statistics
import sys
from collections import defaultdict

LOWER_IS_BETTER = {"ms"}


def load(path):
    """The results of one compare.sh run: (meta lines, values per (workload, system, store),
    their extras, unit per workload, notes of workloads this build could not run)."""
    runs = defaultdict(list)
    extras = defaultdict(list)
    meta = []
    units = {}
    unavailable = {}
    for line in open(path):
        line = line.strip()
        if not line:
            continue
        r = json.loads(line)
        if r["system"].startswith("meta"):
            meta.append(r)
            continue
        if "workload" not in r:
            continue  # `dray bench`'s own ratio lines (its SQLite runs): recomputed here
        key = (r["workload"], r["system"], r["store"])
        note = r.get("extra", {}).get("note")
        if note and not r["value"]:
            # A workload this build cannot run (e.g. W4 before the workflow layer): no figure.
            unavailable[key] = note
            units[r["workload"]] = r["unit"]
            continue
        runs[key].append(r["value"])
        extras[key].append(r.get("extra", {}))
        units[r["workload"]] = r["unit"]
    return meta, runs, extras, units, unavailable


def main(path):
    meta, runs, extras, units, unavailable = load(path)
    for m in meta:
        print("# " + json.dumps(m))
    print()
    print(f"{'workload':<13} {'system':<26} {'median':>10} {'min-max':>21} {'unit':>7}  {'Dray/this':>9}  notes")
    order = ["plain-insert", "W1-single", "W1-batch", "floor", "W2", "W2-tuned", "paced-insert", "W3", "W3-remote", "W4", "W5", "H1", "H2", "W6"]
    workloads = sorted({k[0] for k in runs} | {k[0] for k in unavailable}, key=lambda w: order.index(w) if w in order else 99)
    for w in workloads:
        for (wk, system, store), note in unavailable.items():
            if wk == w:
                print(f"{w:<13} {system + ' (' + store + ')':<26} {'n/a':>10} {'':>21} {units[w]:>7}  {'':>9}  {note}")
        rows = [(k, v) for k, v in runs.items() if k[0] == w]
        dray = [statistics.median(v) for k, v in rows if k[1] == "dray"]
        for (wk, system, store), values in sorted(rows, key=lambda kv: kv[0][1] != "dray"):
            med = statistics.median(values)
            ratio = ""
            if dray and system != "dray" and med:
                r = (med / dray[0]) if units[w] in LOWER_IS_BETTER else (dray[0] / med)
                ratio = f"{r:.2f}x"
            notes = ""
            ex = extras[(wk, system, store)]
            p99 = [e["p99_ms"] for e in ex if "p99_ms" in e]
            if p99:
                notes = f"p99 median {statistics.median(p99):.2f} ms"
            with_subs = [e for e in ex if "db_tx_per_job_with" in e]
            if with_subs:
                e = with_subs[len(with_subs) // 2]
                notes = (f"{e['subscribers_ended']}/{e['subscribers']} subscribers saw the end; "
                         f"without them {e['jobs_per_s_without_subscribers']:.0f} jobs/s; db tx/job "
                         f"{e['db_tx_per_job_without']} -> {e['db_tx_per_job_with']}; hub reads {e['hub_reads_per_s']:.0f}/s")
                if "jobs_per_s_with_dashboard" in e:
                    notes += (f"; with one /events dashboard {e['jobs_per_s_with_dashboard']:.0f} jobs/s, "
                              f"{e['dashboard_job_events']} job events, db tx/job {e.get('db_tx_per_job_with_dashboard')}")
            phased = [e for e in ex if "phases" in e]
            if phased:
                e = phased[len(phased) // 2]
                ph = e["phases"]
                names = [p for p in ("clean", "held", "recovery") if p in ph]
                notes = ("p50 " + "/".join(f"{ph[p]['p50_ms']:.2f}" for p in names) + " ms, p99 "
                         + "/".join(f"{ph[p]['p99_ms']:.2f}" for p in names) + " ms (" + "/".join(names) + ")")
                if "held_p99_over_clean" in e:
                    notes += f"; held p99 / clean p99 {e['held_p99_over_clean']:.2f}"
            d = 2 if units[w] in LOWER_IS_BETTER else 1  # latencies to the hundredth of a ms
            print(f"{w:<13} {system + ' (' + store + ')':<26} {med:>10.{d}f} {min(values):>10.{d}f}-{max(values):<10.{d}f} {units[w]:>7}  {ratio:>9}  {notes}")
    def med(w, system):
        v = [statistics.median(vals) for (wk, sy, _), vals in runs.items() if wk == w and sy == system]
        return v[0] if v else None

    print()
    for label, a, b in [
        ("W1-single / plain INSERT", med("W1-single", "dray"), med("plain-insert", "raw-sql")),
        ("W2 / raw-SQL floor", med("W2", "dray"), med("floor", "raw-sql")),
        ("W2-tuned / raw-SQL floor", med("W2-tuned", "dray"), med("floor", "raw-sql")),
        ("W3 p50 / paced INSERT p50", med("W3", "dray"), med("paced-insert", "raw-sql")),
    ]:
        if a and b:
            print(f"{label:<26} {a / b:.2f}")
    print()
    print("Dray/this: how many times better Dray is than that row (for ms, the row's latency over Dray's).")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "results.jsonl")
