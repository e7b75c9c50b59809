"""Timing and peak memory of attention methods, and the ``python -m sparse_attn.bench`` CLI.

Timing goes through ``torch.utils.benchmark`` (it warms up, synchronises CUDA
and picks a block size); we report the median and IQR of at least
``min_runs`` measurements. Peak memory is measured, never estimated: on CUDA
with the allocator's peak counter, on the CPU as the high-water mark of the
resident set (``ru_maxrss``) of a fresh subprocess that runs the case once.

    python -m sparse_attn.bench topk --lengths 1024 4096 16384 --heads 8 \
        --head-dim 64 --top-k 64 --chunk-size 1024 --dtype float32 --device cpu

    python -m sparse_attn.bench sweep --methods sdpa streaming_topk nsa_selected nsa \
        --lengths 1024 4096 --heads 8 --kv-heads 2 --top-k 64 --chunk-sizes 256 1024 \
        --dtypes float32 --devices cpu --out results/run   # -> run.csv, run.json, run.html

A sweep runs every combination of its lists, with a progress bar. A case
that cannot run (an unknown method, no CUDA, a length whose estimated memory
does not fit the device, a backend that refuses the shapes) becomes a row
with a ``note`` and the sweep goes on. ``report`` rebuilds the HTML from a
JSON file (for results made where plotly is not installed).
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
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

from .attention import causal_mask, topk_attention

__all__ = ["Timing", "Case", "METHODS", "time_fn", "measure_case", "run_case_subprocess", "seed_topk_attention", "main"]

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


def seed_topk_attention(q, k, v, top_k: int, *, causal: bool = False):
    """The seed's algorithm with its crash fixed, kept as the baseline it was.

    Whole (Lq, Lk) score matrix, ``torch.topk``, gather the picked keys *and*
    values (B, H, Lq, K, D), score the picked keys again, softmax, weighted
    sum. The library's ``topk_attention`` does the same selection without
    the second gather and the re-scoring. Shapes as ``topk_attention``.
    """
    H, Hkv, D = q.shape[1], k.shape[1], q.shape[-1]
    k, v = (t.repeat_interleave(H // Hkv, dim=1) for t in (k, v))
    scores = q @ k.transpose(-2, -1) / D**0.5
    if causal:
        scores = scores.masked_fill(~causal_mask(q.shape[2], k.shape[2], q.device), float("-inf"))
    K = min(top_k, k.shape[2])
    idx = torch.topk(scores, K, dim=-1).indices  # (B, H, Lq, K)
    pick = lambda t: torch.gather(  # noqa: E731  the seed's gather, with the index expanded to 5-d
        t.unsqueeze(2).expand(-1, -1, idx.shape[2], -1, -1), 3, idx.unsqueeze(-1).expand(-1, -1, -1, -1, t.shape[-1]))
    k_sel, v_sel = pick(k), pick(v)
    att = (q.unsqueeze(3) @ k_sel.transpose(3, 4)).squeeze(3) / D**0.5
    if causal:
        att = att.masked_fill(idx > torch.arange(q.shape[2], device=q.device).view(-1, 1), float("-inf"))
    return (torch.softmax(att, dim=-1).unsqueeze(3) @ v_sel).squeeze(3)


def _seed_topk(q, k, v, case):
    return lambda: seed_topk_attention(q, k, v, case.top_k, causal=case.causal)


def _full_topk(q, k, v, case):
    # The library's own full-score mode: the whole (Lq, Lk) score matrix, one torch.topk.
    return lambda: topk_attention(q, k, v, case.top_k, causal=case.causal, chunk_size=None)


def _streaming_topk(q, k, v, case):
    return lambda: topk_attention(q, k, v, case.top_k, causal=case.causal, chunk_size=case.chunk_size)


def _sdpa_backend(name):
    def build(q, k, v, case):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, name)
        gqa = q.shape[1] != k.shape[1]

        def run():
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=case.causal, enable_gqa=gqa)
        return run
    return build


def _prefilter_topk(q, k, v, case):
    from .kernels.topk_prefilter import prefilter_topk_attention

    return lambda: prefilter_topk_attention(q, k, v, case.top_k, causal=case.causal, query_chunk_size=case.chunk_size)


def _fused_topk(q, k, v, case):
    from .kernels.topk_fused import fused_topk_attention, triton_supports

    if not triton_supports(q):
        raise ValueError("fused_topk needs CUDA, Triton and a float16/bfloat16/float32 dtype")
    return lambda: fused_topk_attention(q, k, v, case.top_k, causal=case.causal)


def _sampled(q, k, v, case):
    from .sampling import sampled_attention

    g = torch.Generator(device=q.device).manual_seed(case.seed)
    return lambda: sampled_attention(q, k, v, case.top_k, proposal="uniform", causal=case.causal, generator=g)


def _nsa_kwargs(case):
    return dict(sliding_window_size=case.window, compress_block_size=case.compress_block,
                compress_block_sliding_stride=case.compress_stride, selection_block_size=case.block_size,
                num_selected_blocks=case.num_blocks, causal=case.causal)


def _nsa(q, k, v, case):
    from .nsa import nsa_attention

    return lambda: nsa_attention(q, k, v, gates=(1 / 3, 1 / 3, 1 / 3), **_nsa_kwargs(case))


def _nsa_compressed(q, k, v, case):
    from .nsa import compress_kv, compressed_attention
    from ._checks import resolve_scale

    scale = resolve_scale(None, q.shape[-1])
    bs, st = case.compress_block, case.compress_stride
    return lambda: compressed_attention(q, compress_kv(k, bs, st), compress_kv(v, bs, st), bs, st,
                                        causal=case.causal, scale=scale)


def _nsa_selected(q, k, v, case):
    # The branch on its own, on the blocks a query could pick: random distinct
    # blocks among the visible ones (causal), as other NSA kernels benchmark it.
    from .nsa import selected_block_attention

    idx = random_block_indices(q.shape[0], k.shape[1], q.shape[2], k.shape[2], case.num_blocks, case.block_size,
                               case.causal, case.seed, q.device)
    return lambda: selected_block_attention(q, k, v, idx, case.block_size, causal=case.causal)


def _nsa_sliding(q, k, v, case):
    from .nsa import sliding_window_attention

    return lambda: sliding_window_attention(q, k, v, case.window, causal=case.causal)


def random_block_indices(B, Hkv, Lq, Lk, S, block_size, causal, seed=0, device="cpu"):
    """(B, Hkv, Lq, S) int64: distinct random blocks per query among those it may see, -1 where fewer exist."""
    nb = math.ceil(Lk / block_size)
    g = torch.Generator().manual_seed(seed)
    out = torch.full((B, Hkv, Lq, S), -1, dtype=torch.long)
    for i0 in range(0, Lq, 4096):  # bounded scratch
        i1 = min(Lq, i0 + 4096)
        r = torch.rand(B, Hkv, i1 - i0, nb, generator=g)
        if causal:
            seen = torch.arange(nb) * block_size <= torch.arange(i0, i1)[:, None]
            r = r.masked_fill(~seen, -1.0)
        vals, idx = r.topk(min(S, nb), dim=-1)
        out[:, :, i0:i1, : idx.shape[-1]] = idx.masked_fill(vals < 0, -1)
    return out.to(device)


METHODS: dict[str, Callable] = {
    "sdpa": _sdpa,
    "sdpa_flash": _sdpa_backend("FLASH_ATTENTION"),
    "sdpa_cudnn": _sdpa_backend("CUDNN_ATTENTION"),
    "seed_topk": _seed_topk,
    "full_topk": _full_topk,
    "streaming_topk": _streaming_topk,
    "prefilter_topk": _prefilter_topk,
    "fused_topk": _fused_topk,
    "sampled": _sampled,
    "nsa_compressed": _nsa_compressed,
    "nsa_selected": _nsa_selected,
    "nsa_sliding": _nsa_sliding,
    "nsa": _nsa,
}
CUDA_ONLY = {"sdpa_flash", "sdpa_cudnn", "fused_topk"}


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
    # NSA: selection blocks (size, how many), compression blocks (size, stride), sliding window.
    block_size: int = 64
    num_blocks: int = 16
    compress_block: int = 32
    compress_stride: int = 16
    window: int = 512

    def inputs(self):
        g = torch.Generator().manual_seed(self.seed)
        hkv = self.kv_heads or self.heads
        shape = lambda h: (self.batch, h, self.length, self.head_dim)  # noqa: E731
        make = lambda h: torch.randn(shape(h), generator=g).to(self.device, DTYPES[self.dtype])  # noqa: E731
        return make(self.heads), make(hkv), make(hkv)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (VmHWM) to the current RSS.

    Without it the peak would include whatever importing torch and friends
    touched before the call. Linux only; False where it is not allowed.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    """VmHWM where /proc has it, else ``ru_maxrss`` (the lifetime peak)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def measure_case(case: Case, *, timing: bool = True) -> dict:
    """Run one case in this process: peak memory of a single call, then timing.

    Returns a flat dict (the case's fields plus results). On the CPU the peak is
    the resident set's high-water mark during the call (reset just before it),
    and ``peak_extra_bytes`` is that minus the resident set just before the
    call (inputs already allocated). A fresh process (``run_case_subprocess``)
    keeps other cases' freed-but-cached memory out of it.
    """
    if case.method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {case.method!r}")
    if case.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {case.device!r} asked for, but CUDA is not available here")
    # One call on a tiny input first, so one-time costs (lazy library loads,
    # allocator pools, kernel compilation) do not count as this case's memory.
    tiny = Case(**{**asdict(case), "length": 8, "top_k": min(case.top_k, 8), "chunk_size": 4, "block_size": 4,
                   "num_blocks": 2, "compress_block": 4, "compress_stride": 2, "window": 4})
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
        _reset_peak_rss()
        base = _rss_bytes()
        fn()
        peak = _peak_rss_bytes()
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


# --- sweeps -------------------------------------------------------------------

_ELT = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


def estimate_bytes(case: Case) -> int:
    """A rough upper bound of the memory a case needs (inputs, output and the method's big temporaries).

    Only used to skip cases that cannot fit before trying them; the measured
    peak is what the tables report.
    """
    B, H, L, D = case.batch, case.heads, case.length, case.head_dim
    e = _ELT[case.dtype]
    hkv = case.kv_heads or H
    inputs = B * (2 * H + 2 * hkv) * L * D * e
    rows = B * H * L
    m = case.method
    if m == "full_topk":
        extra = rows * L * (e + 8) * 2
    elif m == "seed_topk":
        extra = rows * L * e * 2 + rows * min(case.top_k, L) * (2 * D * e + 8) + 2 * rows * L * D * e // max(H // hkv, 1)
    elif m in ("streaming_topk", "prefilter_topk"):
        extra = B * H * min(case.chunk_size, L) * L * (e + 8) * 2 + rows * case.top_k * (D * e + 16)
    elif m == "fused_topk":
        extra = rows * (L // 64 + 3 * max(4 * case.top_k, 128)) * 4 + rows * case.top_k * D * e
    elif m in ("nsa", "nsa_compressed"):
        extra = rows * (L // case.compress_stride + 1) * e * 4 + rows * math.ceil(L / case.block_size) * e * 2
    elif m == "sampled":
        extra = rows * case.top_k * (D * e * 2 + 16)
    elif m == "nsa_sliding":
        extra = B * H * 512 * (512 + 2 * case.window) * (e + 1) * 3
    elif m == "sdpa" and case.device == "cpu":
        extra = B * H * min(L, 4096) * L * e  # CPU kernels work in query blocks
    else:
        extra = inputs
    return inputs + extra


def available_bytes(device: str) -> int:
    """Free memory on the device now: CUDA's free memory, or the CPU's MemAvailable."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62


def skip_reason(case: Case) -> str | None:
    """Why a case cannot run here (a note for the table), or None."""
    if case.method not in METHODS:
        return f"unknown method {case.method!r}; choose from {sorted(METHODS)}"
    if case.dtype not in DTYPES:
        return f"unknown dtype {case.dtype!r}; choose from {sorted(DTYPES)}"
    if case.device.startswith("cuda") and not torch.cuda.is_available():
        return f"device {case.device!r} asked for, but CUDA is not available here"
    if case.method in CUDA_ONLY and not case.device.startswith("cuda"):
        return f"{case.method} runs on CUDA only"
    if case.kv_heads and case.heads % case.kv_heads:
        return f"heads ({case.heads}) must be a multiple of kv_heads ({case.kv_heads})"
    need, free = estimate_bytes(case), available_bytes(case.device)
    if need > 0.8 * free:
        return f"skipped: needs about {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free on {case.device}"
    return None


def sweep_cases(methods, lengths, *, batch=1, heads=(8,), kv_heads=(None,), head_dims=(64,), top_ks=(64,),
                chunk_sizes=(1024,), dtypes=("float32",), devices=("cpu",), causal=(False,), **fixed) -> list[Case]:
    """Every combination of the lists, as Cases (``fixed`` sets other Case fields for all)."""
    cases = []
    for dev, dt, c, h, hkv, d, n, tk, cs, m in itertools.product(
            devices, dtypes, causal, heads, kv_heads, head_dims, lengths, top_ks, chunk_sizes, methods):
        cases.append(Case(method=m, length=n, batch=batch, heads=h, kv_heads=hkv, head_dim=d, top_k=tk,
                          chunk_size=cs, causal=c, dtype=dt, device=dev, **fixed))
    return cases


def _measure_in_process(case: Case) -> dict:
    try:
        return measure_case(case)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {**asdict(case), "note": "skipped: out of memory on the device"}
    except (ValueError, TypeError, RuntimeError) as e:
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
        return {**asdict(case), "note": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}


def run_sweep(cases: list[Case], *, progress: bool = True, on_row: Callable[[dict], None] | None = None,
              timeout: float | None = None) -> list[dict]:
    """Measure every case; a case that cannot run becomes a row with a ``note`` and the sweep goes on.

    CPU cases run in a fresh subprocess each (their memory high-water mark is
    theirs alone); CUDA cases run in this process, with the allocator's peak
    counter reset per case. ``on_row`` sees each row as it is made (the app's
    speed tab uses it to update a table live).
    """
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(cases), unit="case", file=sys.stderr)
        except ImportError:
            bar = None
    rows = []
    for i, case in enumerate(cases, 1):
        label = f"{case.method} L={case.length} {case.dtype} {case.device}"
        if bar is not None:
            bar.set_description(label)
        elif progress:
            print(f"[{i}/{len(cases)}] {label}", file=sys.stderr, flush=True)
        reason = skip_reason(case)
        if reason:
            row = {**asdict(case), "note": reason}
        elif case.device.startswith("cuda"):
            row = _measure_in_process(case)
        else:
            row = run_case_subprocess(case, timeout=timeout)
            if "error" in row:
                row["note"] = row.pop("error")
        rows.append(row)
        if on_row is not None:
            on_row(row)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    _add_speedup(rows)
    return rows


_SHAPE_KEYS = ("length", "batch", "heads", "kv_heads", "head_dim", "causal", "dtype", "device")


def _add_speedup(rows: list[dict]) -> None:
    """speedup_vs_sdpa = SDPA's median / this row's median, on the same shapes, dtype and device."""
    base = {tuple(r[k] for k in _SHAPE_KEYS): r["median_s"] for r in rows
            if r["method"] == "sdpa" and "median_s" in r}
    for r in rows:
        ref = base.get(tuple(r[k] for k in _SHAPE_KEYS))
        if ref and "median_s" in r:
            r["speedup_vs_sdpa"] = ref / r["median_s"]


CSV_COLUMNS = ["method", "length", "batch", "heads", "kv_heads", "head_dim", "top_k", "chunk_size", "block_size",
               "num_blocks", "compress_block", "compress_stride", "window", "causal", "dtype", "device",
               "median_s", "iqr_s", "runs", "peak_extra_bytes", "speedup_vs_sdpa", "note"]


def write_results(rows: list[dict], stem: str, *, html: bool = True) -> list[str]:
    """Write stem.csv, stem.json and (when plotly is installed) a self-contained stem.html. Returns the paths."""
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    paths = [f"{stem}.csv", f"{stem}.json"]
    with open(paths[0], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    meta = {"torch": torch.__version__, "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "threads": torch.get_num_threads()}
    with open(paths[1], "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    if html:
        try:
            page = report_html(rows, meta)  # before opening the file: no empty page without plotly
            with open(f"{stem}.html", "w") as f:
                f.write(page)
            paths.append(f"{stem}.html")
        except ImportError:
            print("plotly is not installed: no HTML report (run `python -m sparse_attn.bench report "
                  f"{paths[1]}` where it is)", file=sys.stderr)
    return paths


def _series_label(r: dict, varying: list[str]) -> str:
    extra = [f"{k}={r[k]}" for k in varying if k not in ("method", "length")]
    return " ".join([r["method"], *extra])


def sweep_figures(rows: list[dict]):
    """Plotly figures: time and peak memory vs length (log-log), and speed-up over SDPA (log x)."""
    import plotly.graph_objects as go

    ok = [r for r in rows if "median_s" in r]
    keys = [k for k in CSV_COLUMNS[:16] if len({str(r.get(k)) for r in ok}) > 1]
    series: dict[str, list[dict]] = {}
    for r in ok:
        series.setdefault(_series_label(r, keys), []).append(r)
    specs = [("median_s", 1e3, "time (ms, median)", "log"), ("peak_extra_bytes", 2**-20, "peak extra memory (MiB)", "log"),
             ("speedup_vs_sdpa", 1, "speed-up over SDPA (x)", "log")]
    figs = []
    for field_, mult, title, ytype in specs:
        fig = go.Figure()
        for name, rs in series.items():
            rs = sorted((r for r in rs if r.get(field_)), key=lambda r: r["length"])
            if not rs:
                continue
            err = [r["iqr_s"] * mult for r in rs] if field_ == "median_s" else None
            fig.add_trace(go.Scatter(x=[r["length"] for r in rs], y=[r[field_] * mult for r in rs], name=name,
                                     mode="lines+markers",
                                     error_y=dict(type="data", array=err, visible=True) if err else None))
        fig.update_layout(title=f"{title} vs sequence length", xaxis_title="sequence length (tokens)",
                          yaxis_title=title, template="plotly_white", height=420)
        fig.update_xaxes(type="log")
        fig.update_yaxes(type=ytype)
        figs.append(fig)
    return figs


def report_html(rows: list[dict], meta: dict | None = None) -> str:
    """One self-contained HTML page: the figures (plotly.js inlined once) and the table of every row."""
    import html as _html

    figs = sweep_figures(rows)
    parts = [fig.to_html(full_html=False, include_plotlyjs=(i == 0)) for i, fig in enumerate(figs)]
    head = "".join(f"<th>{c}</th>" for c in CSV_COLUMNS)
    body = []
    for r in rows:
        cells = []
        for c in CSV_COLUMNS:
            v = r.get(c, "")
            if c in ("median_s", "iqr_s") and v != "":
                v = f"{v * 1e3:.3f} ms"
            elif c == "peak_extra_bytes" and v != "":
                v = f"{v / 2**20:.1f} MiB"
            elif c == "speedup_vs_sdpa" and v != "":
                v = f"{v:.2f}x"
            cells.append(f"<td>{_html.escape(str(v if v is not None else ''))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    meta_line = _html.escape(json.dumps(meta or {}))
    return ("<!doctype html><html><head><meta charset='utf-8'><title>sparse-attn benchmark</title>"
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:12px}"
            "td,th{border:1px solid #ccc;padding:2px 6px}</style></head><body>"
            f"<h1>sparse-attn benchmark</h1><p>{meta_line}</p>" + "".join(parts) +
            f"<table><tr>{head}</tr>{''.join(body)}</table></body></html>")


def _fmt_table(rows: list[dict]) -> str:
    lines = ["| method | L | median | IQR | runs | peak extra memory |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "error" in r or "note" in r:
            lines.append(f"| {r['method']} | {r['length']} | {r.get('error') or r.get('note')} | | | |")
            continue
        t = f"{r['median_s'] * 1e3:.1f} ms" if "median_s" in r else "-"
        iqr = f"{r['iqr_s'] * 1e3:.1f} ms" if "iqr_s" in r else "-"
        lines.append(f"| {r['method']} | {r['length']} | {t} | {iqr} | {r.get('runs', '-')} | "
                     f"{r['peak_extra_bytes'] / 2**20:.1f} MiB |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """The ``python -m sparse_attn.bench`` command line; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m sparse_attn.bench", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("topk", help="dense SDPA vs full-score top-k vs streaming top-k: time and peak memory")
    p.add_argument("--methods", nargs="+", default=["sdpa", "seed_topk", "full_topk", "streaming_topk"])
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
    w = sub.add_parser("sweep", help="every combination of methods, lengths, k, chunk sizes, heads, dtypes, devices")
    w.add_argument("--methods", nargs="+", default=["sdpa", "streaming_topk"], help=f"from {sorted(METHODS)}")
    w.add_argument("--lengths", nargs="+", type=int, default=[1024, 4096])
    w.add_argument("--batch", type=int, default=1)
    w.add_argument("--heads", nargs="+", type=int, default=[8])
    w.add_argument("--kv-heads", nargs="+", type=int, default=[0], help="0 = same as heads")
    w.add_argument("--head-dims", nargs="+", type=int, default=[64])
    w.add_argument("--top-k", nargs="+", type=int, default=[64], dest="top_ks")
    w.add_argument("--chunk-sizes", nargs="+", type=int, default=[1024])
    w.add_argument("--block-size", type=int, default=64, help="NSA selection block")
    w.add_argument("--num-blocks", type=int, default=16, help="NSA selected blocks per query")
    w.add_argument("--compress-block", type=int, default=32)
    w.add_argument("--compress-stride", type=int, default=16)
    w.add_argument("--window", type=int, default=512, help="NSA sliding window")
    w.add_argument("--dtypes", nargs="+", default=["float32"])
    w.add_argument("--devices", nargs="+", default=["cpu"])
    w.add_argument("--causal", choices=["no", "yes", "both"], default="no")
    w.add_argument("--min-run-time", type=float, default=0.5)
    w.add_argument("--min-runs", type=int, default=5)
    w.add_argument("--out", default="bench_results", help="path stem: writes STEM.csv, STEM.json, STEM.html")
    w.add_argument("--no-progress", action="store_true")
    r = sub.add_parser("report", help="build the HTML report from a sweep's JSON file")
    r.add_argument("json_file")
    c = sub.add_parser("_case", help=argparse.SUPPRESS)
    c.add_argument("case")
    c.add_argument("--no-timing", action="store_true")
    args = parser.parse_args(argv)

    if args.command == "_case":
        print(json.dumps(measure_case(Case(**json.loads(args.case)), timing=not args.no_timing)))
        return 0

    if args.command == "report":
        with open(args.json_file) as f:
            data = json.load(f)
        out = os.path.splitext(args.json_file)[0] + ".html"
        with open(out, "w") as f:
            f.write(report_html(data["rows"], data.get("meta")))
        print(out)
        return 0

    if args.command == "sweep":
        causal = {"no": (False,), "yes": (True,), "both": (False, True)}[args.causal]
        cases = sweep_cases(args.methods, args.lengths, batch=args.batch, heads=args.heads,
                            kv_heads=[h or None for h in args.kv_heads], head_dims=args.head_dims,
                            top_ks=args.top_ks, chunk_sizes=args.chunk_sizes, dtypes=args.dtypes,
                            devices=args.devices, causal=causal, block_size=args.block_size,
                            num_blocks=args.num_blocks, compress_block=args.compress_block,
                            compress_stride=args.compress_stride, window=args.window,
                            min_run_time=args.min_run_time, min_runs=args.min_runs)
        rows = run_sweep(cases, progress=not args.no_progress)
        print(_fmt_table(rows))
        for path in write_results(rows, args.out):
            print(path)
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
