#!/usr/bin/env python3
"""Figures for scripts/many-vbds, from the guests' output and `xenblkd status --json`.

  many_vbds.py phase K [--cpu CPUFILE] FILE...
                                  the K-th `bench-until` line (1-based) of each guest's
                                  stdout FILE: per-VBD IOPS (ops / secs of each disk),
                                  their sum, min, max, max/min, and the failed requests;
                                  with CPUFILE (`NAME SECONDS` per guest: its CPU time over
                                  the phase, NAME its output file's), also each guest's
                                  IOPS per second of its own CPU time, whose spread shows
                                  how much of the IOPS spread is the guests' share of the
                                  CPUs (the kernel's scheduler), not the daemon
  many_vbds.py status FILE        devices by state and the sums over devices of the
                                  counters that matter here, then the daemon's gauges
                                  (grant mappings, budget) from a status --json dump

Both print `key value` lines (read by the script) after a human line or two.
"""

import json
import re
import statistics
import sys


def bench_lines(path):
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith(("ok bench-until", "err bench-until")):
                out.append(line.strip())
    return out


def field(line, key):
    m = re.search(r"\b" + key + r"=([0-9.,]+)", line)
    return m.group(1) if m else None


def phase(k, files, cpu=None):
    iops, errors, missing, failed_guests = [], 0, 0, 0
    per_cpu = []
    for path in files:
        lines = bench_lines(path)
        if len(lines) < k:
            missing += 1
            continue
        line = lines[k - 1]
        if line.startswith("err"):
            failed_guests += 1
        ops = [int(x) for x in (field(line, "ops") or "").split(",") if x]
        secs = [float(x) for x in (field(line, "secs") or "").split(",") if x]
        errors += int(field(line, "errors") or 0)
        mine = [o / s if s > 0 else 0.0 for o, s in zip(ops, secs)]
        iops.extend(mine)
        if cpu is not None and cpu.get(path, 0) > 0:
            per_cpu.append(sum(mine) * max(secs) / cpu[path])
    total = sum(iops)
    lo, hi = (min(iops), max(iops)) if iops else (0.0, 0.0)
    print(
        f"{len(iops)} VBDs: aggregate {total:,.0f} IOPS; per VBD min {lo:,.1f} "
        f"median {statistics.median(iops) if iops else 0:,.1f} max {hi:,.1f} "
        f"(max/min {hi / lo if lo else float('inf'):.3f}); failed requests {errors}"
        + (f"; {missing} guests without a result" if missing else "")
        + (f"; {failed_guests} guests reported an error" if failed_guests else "")
    )
    if per_cpu:
        print(
            f"  per guest: I/Os per second of its own CPU time min {min(per_cpu):,.0f} "
            f"max {max(per_cpu):,.0f} (max/min {max(per_cpu) / min(per_cpu):.3f})"
        )
        print(f"cpu_fairness {max(per_cpu) / min(per_cpu):.4f}")
    print(f"vbds {len(iops)}")
    print(f"aggregate_iops {total:.1f}")
    print(f"min_iops {lo:.1f}")
    print(f"max_iops {hi:.1f}")
    print(f"fairness {hi / lo if lo else 0:.4f}")
    print(f"errors {errors}")
    print(f"missing {missing}")
    print(f"failed_guests {failed_guests}")


SUMMED = [
    "rd_req",
    "wr_req",
    "errors",
    "map_fallbacks",
    "persistent_budget_refusals",
    "persistent_grants_mapped",
    "halted_rings",
    "rings",
]
GAUGES = [
    "grant_map_vmas",
    "grant_map_vma_capacity",
    "grant_map_pages",
    "grant_map_page_capacity",
    "grant_map_guests",
    "grant_map_guest_share_vmas",
    "persistent_grant_budget_used",
    "persistent_grant_budget_limit",
    "persistent_grant_budget_refusals",
    "grant_mappings",
    "mapped_pages",
    "open_fds",
    "threads",
]


def status(path):
    with open(path, encoding="utf-8") as f:
        st = json.load(f)
    devices = st.get("devices", [])
    states = {}
    for d in devices:
        states[d.get("state")] = states.get(d.get("state"), 0) + 1
    sums = {k: sum(d.get("stats", {}).get(k, 0) for d in devices) for k in SUMMED}
    daemon = st.get("daemon", {})
    metrics = dict(daemon.get("metrics", {}))
    for k, v in daemon.items():
        if isinstance(v, int) and k not in metrics:
            metrics[k] = v
    print(
        "devices by state: "
        + ", ".join(f"{s} {n}" for s, n in sorted(states.items(), key=str))
    )
    print(f"devices {len(devices)}")
    print(f"connected {states.get('Connected', 0)}")
    for k in SUMMED:
        print(f"sum_{k} {sums[k]}")
    for k in GAUGES:
        if k in metrics:
            print(f"{k} {metrics[k]}")


def main(argv):
    if len(argv) >= 5 and argv[1] == "phase" and argv[3] == "--cpu":
        ticks = {}
        with open(argv[4], encoding="utf-8") as f:
            for line in f:
                name, t = line.split()
                ticks[name] = float(t)
        phase(int(argv[2]), argv[5:], ticks)
    elif len(argv) >= 3 and argv[1] == "phase":
        phase(int(argv[2]), argv[3:])
    elif len(argv) == 3 and argv[1] == "status":
        status(argv[2])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
