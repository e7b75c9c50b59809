"""Timing and peak memory of attention methods, and the ``python -m sparse_attn.bench`` CLI.

Timing goes through ``torch.utils.benchmark`` (it warms up, synchronises CUDA
and picks a block size); we report the median and IQR of at least
``min_runs`` measurements. Peak memory is measured, never estimated: on CUDA
with the allocator's peak counter, on the CPU as the high-water mark of the
resident set (``ru_maxrss``) of a fresh subprocess that runs the case once.

    python -m sparse_attn.bench topk --lengths 1024 4096 16384 --heads 8 \
        --head-dim 64 --top-k 64 --chunk-size 1024 --dtype float32 --device cpu
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils import benchmark

from .attention import topk_attention

__all__ = ["Timing", "Case", "METHODS", "time_fn", "measure_case", "run_case_subprocess", "main"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass
class Timing:
    """Seconds per call: median and interquartile range over ``times``."""

    median: float
    iqr: float
    times: list[float] = field(default_factory=list)

    @property
    def runs(self) -> int:
        return len(self.times)


def time_fn(fn: Callable[[], object], *, device: str | torch.device = "cpu", min_run_time: float = 0.5,
            min_runs: int = 5, num_threads: int | None = None) -> Timing:
    """Time ``fn()`` with ``torch.utils.benchmark``; at least ``min_runs`` measurements.

    ``blocked_autorange`` warms up and synchronises CUDA itself; a call slower
    than ``min_run_time`` would get a single measurement, so we top it up with
    single-call measurements until there are ``min_runs``.
    """
    del device  # Timer synchronises CUDA on its own; kept for a uniform call site.
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn},
                            num_threads=num_threads or torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_run_time)
    times = list(m.times)
    while len(times) < min_runs:
        times.extend(timer.timeit(1).times)
    q1, _, q3 = statistics.quantiles(times, n=4) if len(times) > 1 else (times[0],) * 3
    return Timing(statistics.median(times), q3 - q1, times)


# --- methods -----------------------------------------------------------------
# Each builder takes (q, k, v, case) and returns a zero-argument callable, so
# every method is timed on the very same tensors.

def _sdpa(q, k, v, case):
    gqa = q.shape[1] != k.shape[1]
    return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=case.causal, enable_gqa=gqa)


def _full_topk(q, k, v, case):
    # The seed's approach made to work: the whole (Lq, Lk) score matrix, torch.topk, gather.
    return lambda: topk_attention(q, k, v, case.top_k, causal=case.causal, chunk_size=None)


def _streaming_topk(q, k, v, case):
    return lambda: topk_attention(q, k, v, case.top_k, causal=case.causal, chunk_size=case.chunk_size)


METHODS: dict[str, Callable] = {"sdpa": _sdpa, "full_topk": _full_topk, "streaming_topk": _streaming_topk}


@dataclass
class Case:
    """One benchmark case: a method on one set of shapes."""

    method: str
    length: int
    batch: int = 1
    heads: int = 8
    kv_heads: int | None = None
    head_dim: int = 64
    top_k: int = 64
    chunk_size: int = 1024
    causal: bool = False
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0
    min_run_time: float = 0.5
    min_runs: int = 5

    def inputs(self):
        g = torch.Generator().manual_seed(self.seed)
        hkv = self.kv_heads or self.heads
        shape = lambda h: (self.batch, h, self.length, self.head_dim)  # noqa: E731
        make = lambda h: torch.randn(shape(h), generator=g).to(self.device, DTYPES[self.dtype])  # noqa: E731
        return make(self.heads), make(hkv), make(hkv)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_case(case: Case, *, timing: bool = True) -> dict:
    """Run one case in this process: peak memory of a single call, then timing.

    Returns a flat dict (the case's fields plus results). On the CPU the peak is
    ``ru_maxrss`` after the call, and ``peak_extra_bytes`` is that minus the
    resident set just before it (inputs already allocated) - meaningful only in
    a fresh process, which ``run_case_subprocess`` provides.
    """
    if case.method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {case.method!r}")
    if case.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {case.device!r} asked for, but CUDA is not available here")
    # One call on a tiny input first, so one-time costs (lazy library loads,
    # allocator pools, kernel compilation) do not count as this case's memory.
    tiny = Case(**{**asdict(case), "length": 8, "top_k": min(case.top_k, 8), "chunk_size": 4})
    METHODS[case.method](*tiny.inputs(), tiny)()
    q, k, v = case.inputs()
    fn = METHODS[case.method](q, k, v, case)
    row = asdict(case)
    if case.device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        row["peak_extra_bytes"] = torch.cuda.max_memory_allocated() - base
    else:
        base = _rss_bytes()
        fn()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        row["peak_rss_bytes"] = peak
        row["peak_extra_bytes"] = max(peak - base, 0)
    if timing:
        t = time_fn(fn, device=case.device, min_run_time=case.min_run_time, min_runs=case.min_runs)
        row.update(median_s=t.median, iqr_s=t.iqr, runs=t.runs)
    return row


def run_case_subprocess(case: Case, *, timing: bool = True, timeout: float | None = None) -> dict:
    """``measure_case`` in a fresh Python process, so the CPU memory high-water mark is this case's alone."""
    cmd = [sys.executable, "-m", "sparse_attn.bench", "_case", json.dumps(asdict(case))]
    if not timing:
        cmd.append("--no-timing")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
        return {**asdict(case), "error": tail[0]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fmt_table(rows: list[dict]) -> str:
    lines = ["| method | L | median | IQR | runs | peak extra memory |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['length']} | error: {r['error']} | | | |")
            continue
        t = f"{r['median_s'] * 1e3:.1f} ms" if "median_s" in r else "-"
        iqr = f"{r['iqr_s'] * 1e3:.1f} ms" if "iqr_s" in r else "-"
        lines.append(f"| {r['method']} | {r['length']} | {t} | {iqr} | {r.get('runs', '-')} | "
                     f"{r['peak_extra_bytes'] / 2**20:.1f} MiB |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparse_attn.bench", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("topk", help="dense SDPA vs full-score top-k vs streaming top-k: time and peak memory")
    p.add_argument("--methods", nargs="+", default=["sdpa", "full_topk", "streaming_topk"])
    p.add_argument("--lengths", nargs="+", type=int, default=[1024, 4096, 16384])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--min-run-time", type=float, default=0.5)
    p.add_argument("--min-runs", type=int, default=5)
    p.add_argument("--json", dest="json_out", default=None, help="also write the rows to this JSON file")
    c = sub.add_parser("_case", help=argparse.SUPPRESS)
    c.add_argument("case")
    c.add_argument("--no-timing", action="store_true")
    args = parser.parse_args(argv)

    if args.command == "_case":
        print(json.dumps(measure_case(Case(**json.loads(args.case)), timing=not args.no_timing)))
        return 0

    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {sorted(METHODS)}")
    rows = []
    cases = [(m, n) for n in args.lengths for m in args.methods]
    for i, (method, length) in enumerate(cases, 1):
        case = Case(method=method, length=length, batch=args.batch, heads=args.heads, kv_heads=args.kv_heads,
                    head_dim=args.head_dim, top_k=args.top_k, chunk_size=args.chunk_size, causal=args.causal,
                    dtype=args.dtype, device=args.device, min_run_time=args.min_run_time, min_runs=args.min_runs)
        print(f"[{i}/{len(cases)}] {method} L={length} ...", file=sys.stderr, flush=True)
        rows.append(run_case_subprocess(case))
    print(f"torch {torch.__version__}, {args.device}, {args.dtype}, B={args.batch}, H={args.heads}, "
          f"D={args.head_dim}, top_k={args.top_k}, chunk_size={args.chunk_size}, causal={args.causal}, "
          f"threads={torch.get_num_threads()}")
    print(_fmt_table(rows))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
