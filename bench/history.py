#!/usr/bin/env python3
"""One line per stored run (bench/results/*.jsonl): the figures the targets are judged by,
medians of each run's repetitions, so that the run-to-run spread on this box is visible.
Usage: python3 bench/history.py [results-dir]   (prints two Markdown tables)"""
import glob
import json
import os
import statistics
import sys

from compare import load


def median(runs, workload, system, store):
    values = runs.get((workload, system, store))
    return statistics.median(values) if values else None


def p99(extras, workload, system, store):
    ex = [e["p99_ms"] for e in extras.get((workload, system, store), []) if "p99_ms" in e]
    return statistics.median(ex) if ex else None


def fmt(x, spec, suffix=""):
    return "—" if x is None else format(x, spec) + suffix


def ratio(a, b):
    return a / b if a is not None and b else None


def when_and_rev(meta, path):
    """When the run started, and the commit it measured (from its file name where the run's
    first line does not record it)."""
    named = os.path.basename(path).split("-")[3].split(".")[0]
    for m in meta:
        if m.get("system") == "meta":
            return m.get("at", "")[:16].replace("T", " "), m.get("git") or named
    return "", named


def main(directory):
    pg, lite = [], []
    for path in sorted(glob.glob(os.path.join(directory, "*.jsonl"))):
        if path.endswith("-w6.jsonl"):
            continue  # W6 alone: its runs are tabled in README.md, "Latency while VACUUM is held back"
        meta, runs, extras, _, _ = load(path)
        at, rev = when_and_rev(meta, path)
        if path.endswith("-sqlite.jsonl"):
            s = "sqlite"
            lite.append((at, rev, median(runs, "floor", "raw-sql", s), median(runs, "W2", "dray", s),
                         median(runs, "W2-tuned", "dray", s), median(runs, "W3", "dray", s),
                         p99(extras, "W3", "dray", s), median(runs, "W3-remote", "dray", s)))
            continue
        s = "postgres"
        w2 = median(runs, "W2", "dray", s)
        tuned = median(runs, "W2-tuned", "dray", s)
        gw = median(runs, "W2-tuned", "graphile-worker (tuned)", s)
        floor = median(runs, "floor", "raw-sql", s)
        pg.append((at, rev, floor, w2, ratio(w2, gw), ratio(tuned, gw), ratio(w2, floor),
                   ratio(median(runs, "W1-batch", "dray", s), median(runs, "W1-batch", "graphile-worker", s)),
                   ratio(median(runs, "W1-single", "dray", s), median(runs, "plain-insert", "raw-sql", s)),
                   median(runs, "W3", "dray", s), p99(extras, "W3", "dray", s),
                   median(runs, "paced-insert", "raw-sql", s), median(runs, "W4", "dbos", s),
                   ratio(median(runs, "W4", "dray", s), median(runs, "W4", "dbos", s))))
    pg.sort()
    lite.sort()
    print("| run (UTC) | rev | floor jobs/s | W2 jobs/s | W2 / graphile tuned | W2-tuned / graphile tuned | W2 / floor "
          "| W1-batch / graphile | W1-single / INSERT | W3 p50 / p99 ms | paced INSERT ms | DBOS W4 runs/s | W4 / DBOS |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for at, rev, floor, w2, r2, rt, rf, rb, rs, p50, p99_, paced, dbos, w4 in pg:
        print(f"| {at} | `{rev}` | {fmt(floor, ',.0f')} | {fmt(w2, ',.0f')} | {fmt(r2, '.2f', '×')} | {fmt(rt, '.2f', '×')} "
              f"| {fmt(rf, '.2f')} | {fmt(rb, '.2f', '×')} | {fmt(rs, '.2f', '×')} | {fmt(p50, '.2f')} / {fmt(p99_, '.2f')} "
              f"| {fmt(paced, '.2f')} | {fmt(dbos, '.0f')} | {fmt(w4, '.1f', '×')} |")
    print()
    print("| run (UTC) | rev | SQLite floor jobs/s | W2 jobs/s | W2-tuned jobs/s | W3 p50 / p99 ms | W3-remote p50 ms |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for at, rev, floor, w2, tuned, p50, p99_, remote in lite:
        print(f"| {at} | `{rev}` | {fmt(floor, ',.0f')} | {fmt(w2, ',.0f')} | {fmt(tuned, ',.0f')} "
              f"| {fmt(p50, '.2f')} / {fmt(p99_, '.2f')} | {fmt(remote, '.1f')} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
