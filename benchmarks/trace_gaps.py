"""Where the GPU waits: the idle gaps of a torch.profiler chrome trace, and what the host was doing.

    python -m benchmarks.trace_gaps trace.json [--min-us 20] [--top 25] [--out gaps.json]

A step's wall time is the device's busy time plus the time it waits for the host. Summing kernel
times (``train_step.time_by_kind``) gives the first; this gives the second, gap by gap: every
interval in which no kernel, copy or memset runs on any stream, with the device work before and
after it and, for the work after it, the host-side operator stack that launched it (the launch
call's enclosing ``cpu_op`` / ``user_annotation`` / ``python_function`` events on its thread) and
any synchronizing runtime call (``cudaStreamSynchronize``, ``cudaMemcpy``, ...) that ran during the
gap. Gaps are grouped by the outermost named host region around the launch (e.g. ``Optimizer.step``)
so that a step's idle time adds up by cause; a gap whose work was launched before it began waited on
the device itself (an event, a copy), and is grouped as such. ``syncs_during`` lists the blocking
host calls and ``cudaMemcpyAsync`` (blocking from pageable memory) that overlap the gap.
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
HOST_CATS = ("cpu_op", "user_annotation", "python_function")
# host calls that block until the device (or a copy) is done; cudaMemcpyAsync from pageable memory
# blocks the host too but is listed as itself, a device-side wait (cudaStreamWaitEvent) not at all
SYNC_CALLS = frozenset({
    "cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize", "cudaMemcpy",
    "cuCtxSynchronize", "cuStreamSynchronize", "cuEventSynchronize", "cuMemcpy",
})
QUEUED = "(queued before the gap: a device-side wait)"


def load_events(path: Path) -> list[dict]:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def _busy_intervals(device: list[dict]) -> list[tuple[float, float]]:
    """The union of the device events' [start, end) intervals, all streams together, sorted."""
    merged: list[list[float]] = []
    for e in sorted(device, key=lambda e: e["ts"]):
        start, end = float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0))
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]


class _HostEvents:
    """One thread's host events, to find those enclosing a time (vectorized: traces hold ~1e5)."""

    def __init__(self, events: list[dict]):
        self.events = sorted(events, key=lambda e: (float(e["ts"]), -float(e.get("dur", 0))))
        self.starts = np.array([float(e["ts"]) for e in self.events])
        self.ends = self.starts + np.array([float(e.get("dur", 0)) for e in self.events])

    def stack(self, ts: float) -> list[tuple[str, str]]:
        """(name, category) of the events that enclose ``ts``, outermost first."""
        return [(self.events[i]["name"], self.events[i]["cat"]) for i in np.flatnonzero((self.starts <= ts) & (self.ends >= ts))]


def _region(stack: list[tuple[str, str]]) -> str:
    """A gap's cause for grouping: the outermost operator or annotation (not a Python frame, which
    with ``with_stack`` would put every gap under the script's top frame) that is not the profiler's own."""
    for name, cat in stack:
        if cat != "python_function" and not name.startswith(("ProfilerStep", "## ")) and "profiler" not in name.lower():
            return name
    return "(no host op)"


def analyse(events: list[dict], *, min_us: float = 20.0, top: int = 25) -> dict:
    """Busy and idle time of the device over the trace's device span, the gaps of at least
    ``min_us`` microseconds (largest first, ``top`` of them in detail), and idle time by cause."""
    device = [e for e in events if e.get("ph") == "X" and e.get("cat") in DEVICE_CATS]
    if not device:
        raise ValueError("the trace holds no device events (kernel, gpu_memcpy, gpu_memset): was CUDA profiled?")
    runtime = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("cuda_runtime", "cuda_driver")]  # Triton launches through the driver API
    launch_of = {e["args"]["correlation"]: e for e in runtime if "correlation" in e.get("args", {})}
    by_thread: dict = defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in HOST_CATS:
            by_thread[e.get("tid")].append(e)
    host = {tid: _HostEvents(evs) for tid, evs in by_thread.items()}
    busy = _busy_intervals(device)
    span = busy[-1][1] - busy[0][0]
    busy_us = sum(e - s for s, e in busy)
    by_start = sorted(device, key=lambda e: float(e["ts"]))
    start_times = [float(e["ts"]) for e in by_start]
    by_end = sorted(device, key=lambda e: float(e["ts"]) + float(e.get("dur", 0)))
    end_times = [float(e["ts"]) + float(e.get("dur", 0)) for e in by_end]
    syncing = [e for e in runtime if e["name"] in SYNC_CALLS or e["name"] == "cudaMemcpyAsync"]
    gaps = []
    for (_, gap_start), (gap_end, _) in zip(busy, busy[1:]):
        if gap_end - gap_start < min_us:
            continue
        i = bisect.bisect_right(end_times, gap_start + 1e-3) - 1
        before = by_end[i] if i >= 0 else None
        j = bisect.bisect_left(start_times, gap_end - 1e-3)
        after = by_start[j] if j < len(by_start) else None
        launch = launch_of.get((after or {}).get("args", {}).get("correlation"))
        stack = host[launch.get("tid")].stack(float(launch["ts"])) if launch and launch.get("tid") in host else []
        syncs = sorted({e["name"] for e in syncing if float(e["ts"]) < gap_end and float(e["ts"]) + float(e.get("dur", 0)) > gap_start})
        # work launched before the gap began was waiting on the device (an event, a copy), not on the host
        queued = launch is not None and float(launch["ts"]) + float(launch.get("dur", 0)) <= gap_start
        gaps.append({
            "start_us": round(gap_start - busy[0][0], 1), "idle_us": round(gap_end - gap_start, 1),
            "before": before["name"][:90] if before else None, "after": after["name"][:90] if after else None,
            "launch": launch["name"] if launch else None, "launch_lag_us": round(gap_end - float(launch["ts"]), 1) if launch else None,
            "host_stack": [name for name, _ in stack][-6:], "region": QUEUED if queued else _region(stack), "syncs_during": syncs,
        })
    by_region: dict[str, float] = defaultdict(float)
    for g in gaps:
        by_region[g["region"]] += g["idle_us"]
    small = (span - busy_us) - sum(g["idle_us"] for g in gaps)
    return {
        "span_ms": round(span / 1e3, 3), "busy_ms": round(busy_us / 1e3, 3), "idle_ms": round((span - busy_us) / 1e3, 3),
        "idle_in_gaps_under_min_ms": round(small / 1e3, 3), "min_gap_us": min_us, "gaps": len(gaps),
        "idle_by_region_ms": {k: round(v / 1e3, 3) for k, v in sorted(by_region.items(), key=lambda kv: -kv[1])},
        "largest": sorted(gaps, key=lambda g: -g["idle_us"])[:top],
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.trace_gaps", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace", type=Path, help="chrome trace from torch.profiler (export_chrome_trace), .json or .json.gz")
    p.add_argument("--min-us", type=float, default=20.0, help="gaps shorter than this are counted, not listed")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    result = analyse(load_events(args.trace), min_us=args.min_us, top=args.top)
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text)
    print(text)
    return result


if __name__ == "__main__":
    main()
