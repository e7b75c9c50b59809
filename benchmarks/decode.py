"""Decode step time and bytes read against cache length, per method: ``python -m benchmarks.decode``.

    python -m benchmarks.decode --device cuda --lengths 4096 16384 65536 131072 --batch 16 32 --out results/decode
    python -m benchmarks.decode --device cpu --lengths 4096 16384 65536 --batch 1 --heads 8 --kv-heads 2 \
        --head-dim 64 --out results/decode_cpu

One new query per sequence (T = 1) against a cache of each length, filled
for each case with random keys and values by ``KVCache.append`` (so NSA's
compressed blocks and Quest's page bounds are the cache's own). Per method and length:
the median step time and its quartiles (``sparse_attn.timing.time_fn``), the
bytes of K and V the step read (``DecodeResult.bytes_read``, counted from its
selection), the bandwidth that achieves, and the floor: those bytes over the
device's copy bandwidth, measured at the start of the run. ``sdpa`` is
``F.scaled_dot_product_attention`` with the one query, the baseline every
speedup is against; ``dense`` the same attention spelled out;
``quest_grouped`` Quest with one pick of pages per KV group (not the
paper's per-head rule, which reads up to 16x its budget per group at 64
query over 4 KV heads).

On CUDA each step is also captured in a CUDA graph (``--cuda-graphs``, on
by default there) and its replays timed: the query and the cache's storage
are the graph's static inputs, as a serving engine replays one captured step
per length bucket; both times are reported, eager first. Before timing, one
eager step runs under ``torch.cuda.set_sync_debug_mode("error")``: a step that
makes the host wait for the GPU (``.item()``, ``nonzero``, a data-dependent
shape) is named in the ``host syncs`` column and is not captured. With
``--compare-reference`` (on by default on CUDA) the sparse methods run once
more with every Triton kernel off (``kernels.dispatch.reference_only``): the
largest difference of the outputs, that path's graph time, the share of
selection slots that hold the same page or block, and, for one-query steps of
SDPA, dense, Quest and NSA, both paths' relative error against float64
attention over the step's own picks (``float64_error``).

Settings default to the papers' (NSA: compression blocks of 32 every 16,
16 selection blocks of 64, a window of 512; Quest: pages of 16; top-k and
Quest keep 2048 tokens; StreamingLLM 4 sinks and 2044 recent tokens) and are
named as ``sparse_attn.methods.Config``'s fields. Writes OUT.json (rows and
the machine), OUT.md (the table) and, where plotly is installed, OUT.html
(``sparse_attn.viz_decode.decode_figure``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from sparse_attn.decode import DECODERS, KVCache, quest_decode, sdpa_decode
from sparse_attn.kernels.dispatch import reference_only
from sparse_attn.methods import METHODS, Config
from sparse_attn.timing import time_fn

__all__ = ["main", "copy_bandwidth", "measure", "format_table", "host_sync", "capture", "float64_error"]

# quest_grouped: Quest with one pick of pages per KV group (quest_decode's query_heads_share_pages), beside
# the paper's per-head rule, which under 16 query heads per KV head can read up to 16 x the budget.
METHODS_TIMED = ("sdpa", *DECODERS, "quest_grouped")
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}
_SETTINGS = {  # Config field -> default here (the papers' settings at long context)
    "top_k": 2048, "token_budget": 2048, "page_size": 16, "compress_block_size": 32,
    "compress_block_sliding_stride": 16, "selection_block_size": 64, "num_selected_blocks": 16,
    "sliding_window_size": 512, "num_initial_blocks": 1, "num_local_blocks": 2, "num_sink_tokens": 4,
}
_FILL_CHUNK = 8192  # tokens per append while filling: bounds the random tensors made at once
# Methods whose step has a Triton path (the rows kernel): timed again on the PyTorch path with --compare-reference.
_WITH_KERNEL = ("quest", "nsa", "streaming_llm", "quest_grouped")
_FLOAT64_FORM = ("sdpa", "dense", "quest", "quest_grouped", "nsa")  # methods float64_error knows


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def copy_bandwidth(device: torch.device, nbytes: int, *, min_run_time: float = 0.5) -> float:
    """Bytes per second of ``dst.copy_(src)`` over ``nbytes``, counting the read and the write (2 x nbytes)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    timing = time_fn(lambda: dst.copy_(src), min_run_time=min_run_time)
    return 2 * src.numel() * 4 / timing.median


def host_sync(step, q, cache) -> str | None:
    """None when one step of ``step`` never makes the host wait for the GPU, else the first such call's message."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(q, cache)
    except RuntimeError as e:
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    finally:
        torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
    return None


def capture(step, q, cache, warmup: int = 2):
    """(graph, result): one step captured in a CUDA graph; ``graph.replay()`` reruns it on ``q``'s storage.

    Warm-up runs on a side stream first, as ``torch.cuda.graph`` asks: they
    compile the kernels and fill the decoders' caches of fixed tensors, so
    the capture records only the step's own kernels.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step(q, cache)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = step(q, cache)
    return graph, result


def kernel_profile(step, q, cache, top: int = 10) -> tuple[int, float, list]:
    """(kernels launched, their summed GPU time in seconds, the ``top`` costliest as (name, count, seconds))

    over one eager step, from ``torch.profiler``.
    """
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step(q, cache)
        torch.cuda.synchronize()
    count, busy_us, kernels = 0, 0.0, []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None)
        t = getattr(e, "self_cuda_time_total", 0.0) if t is None else t
        if t > 0:
            count += e.count
            busy_us += t
            kernels.append((e.key[:90], e.count, t * 1e-6))
    return count, busy_us * 1e-6, sorted(kernels, key=lambda k: -k[2])[:top]


def _graph_time(step, q, cache, min_run_time: float):
    """(Timing of the graph's replays, its output equal to the eager step's) ; the graph is freed after."""
    eager = step(q, cache).output.clone()
    graph, result = capture(step, q, cache)
    graph.replay()
    torch.cuda.synchronize()
    same = bool(torch.equal(result.output, eager))
    timing = time_fn(graph.replay, min_run_time=min_run_time)
    del graph, result
    return timing, same


def float64_error(method: str, q: torch.Tensor, cache: KVCache, result, cfg: Config) -> float:
    """||out - ref|| / ||ref|| for a one-query step, ref the same attention in float64 over the step's own picks.

    The picks are the step's (its ``selection``): this measures the arithmetic of the kernels and of the
    half-precision path, not whether a rounding changed a pick (``max_abs_diff_vs_reference`` and the
    picks' agreement with the PyTorch path say that). The cache's stored summaries (NSA's compressed rows)
    are upcast as stored. Methods: sdpa, dense, quest, quest_grouped, nsa.
    """
    from sparse_attn._checks import resolve_scale

    if q.shape[2] != 1:
        raise ValueError("float64_error takes one-query steps (T = 1)")
    B, H, _, D = q.shape
    Hkv, L = cache.num_kv_heads, cache.length
    scale = resolve_scale(cfg.scale, D)
    q64 = q.double()

    def over(keys, values):  # every row of keys / values (B, Hkv, n, D), upcast here, shared by a group's heads
        qg = q64.view(B, Hkv, H // Hkv, D)
        w = torch.softmax(qg @ keys.double().transpose(-1, -2) * scale, dim=-1)
        return (w @ values.double()).view(B, H, 1, -1)

    def rows(units, unit):  # the rows of picked units (B, Hs, 1, S), gathered in the cache's dtype, then upcast
        Hs = units.shape[1]
        tok = (units.unsqueeze(-1) * unit + torch.arange(unit, device=q.device))[:, :, 0].flatten(-2)
        ok = (units[:, :, 0] >= 0).repeat_interleave(unit, -1) & (tok < L)
        safe = tok.clamp(0, L - 1)
        at = (torch.arange(B, device=q.device).view(-1, 1, 1),
              (torch.arange(Hs, device=q.device) // (Hs // Hkv)).view(1, -1, 1), safe)
        ks, vs = cache.k[at].double(), cache.v[at].double()  # (B, Hs, K, D)
        qh = q64.view(B, Hs, H // Hs, D)
        sc = (qh @ ks.transpose(-1, -2) * scale).masked_fill(~ok.unsqueeze(-2), float("-inf"))
        return (torch.softmax(sc, dim=-1) @ vs).view(B, H, 1, -1)

    if method in ("sdpa", "dense"):
        ref = over(cache.keys, cache.values)
    elif method in ("quest", "quest_grouped"):
        ref = rows(result.selection.indices, cache.page_size)
    elif method == "nsa":
        g = result.extras["gates"].double()
        cmp = over(cache.compressed_keys, cache.compressed_values)
        picked = rows(result.selection.indices, cfg.selection_block_size)
        lo = max(0, L - cfg.sliding_window_size)
        win = over(cache.keys[:, :, lo:], cache.values[:, :, lo:])
        ref = g[..., 0:1] * cmp + g[..., 1:2] * picked + g[..., 2:3] * win
    else:
        raise ValueError(f"float64_error: no float64 form for method {method!r}")
    return float((result.output.double() - ref).norm() / ref.norm())


def _fill(cfg: Config, B: int, Hkv: int, length: int, D: int, dtype, device, seed: int) -> KVCache:
    cache = KVCache.for_config(cfg, B, Hkv, length, D, dtype=dtype, device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    for t0 in range(0, length, _FILL_CHUNK):
        n = min(_FILL_CHUNK, length - t0)
        cache.append(torch.randn(B, Hkv, n, D, generator=g, device=device, dtype=torch.float32).to(dtype),
                     torch.randn(B, Hkv, n, D, generator=g, device=device, dtype=torch.float32).to(dtype))
    return cache


def _step(method: str, cfg: Config, streaming_window: int):
    """A call (q, cache) -> DecodeResult for ``method``, its settings checked once, not per step."""
    if method == "sdpa":
        return lambda q, c: sdpa_decode(q, c, scale=cfg.scale)
    if method == "quest_grouped":
        METHODS["quest"].validate(cfg)
        return lambda q, c: quest_decode(q, c, cfg.token_budget, page_size=cfg.page_size, scale=cfg.scale,
                                         query_heads_share_pages=True)
    if method == "streaming_llm":
        cfg = replace(cfg, sliding_window_size=streaming_window)
    if METHODS[method].validate is not None:
        METHODS[method].validate(cfg)
    fn = DECODERS[method]
    return lambda q, c: fn(q, c, cfg)


def measure(args, cfg: Config, device: torch.device, dtype, copy_bps: float, log=print) -> list[dict]:
    """Every (batch, length, method) case of the run: one row each, a ``note`` where a case could not run."""
    rows = []
    for B in args.batch:
        for L in sorted(args.lengths):
            # A cache filled to each length (not a prefix of the longest): a full cache is contiguous, as a
            # serving engine's pages are, so no method pays for a strided view.
            try:
                cache = _fill(cfg, B, args.kv_heads, L, args.head_dim, dtype, device, args.seed)
            except torch.OutOfMemoryError as e:
                rows += [dict(method=m, batch=B, length=L, note=f"out of memory filling the cache: {e}".splitlines()[0])
                         for m in args.methods]
                _free(device)
                continue
            q = torch.randn(B, args.heads, 1, args.head_dim, device=device, dtype=torch.float32,
                            generator=torch.Generator(device=device).manual_seed(args.seed + L)).to(dtype)
            sdpa_out = None
            for m in args.methods:
                row = dict(method=m, batch=B, length=L, heads=args.heads, kv_heads=args.kv_heads,
                           head_dim=args.head_dim, dtype=str(dtype).replace("torch.", ""), device=device.type)
                step = _step(m, cfg, args.streaming_window_size)
                try:
                    try:
                        r = step(q, cache)
                        _sync(device)
                    except Exception as e:  # noqa: BLE001 - a kernel that fails to build: time the PyTorch path
                        if device.type != "cuda" or m not in _WITH_KERNEL or isinstance(e, torch.OutOfMemoryError):
                            raise
                        row["note"] = f"kernel failed ({type(e).__name__}: {str(e).splitlines()[0][:80]}): PyTorch path"
                        log(f"B={B} L={L} {m}: {row['note']}")
                        step = _on_reference(step)
                        r = step(q, cache)
                        _sync(device)
                    read = r.bytes_read
                    if not bool(r.output.isfinite().all()):
                        raise RuntimeError("the output holds NaN or inf")
                    if m == "sdpa":
                        sdpa_out = r.output.float()
                    elif m == "dense" and sdpa_out is not None:  # the two dense forms must agree
                        row["max_abs_diff_vs_sdpa"] = float((r.output.float() - sdpa_out).abs().max())
                    del r
                    timing = time_fn(lambda: step(q, cache), min_run_time=args.min_run_time)
                except (torch.OutOfMemoryError, RuntimeError, ValueError) as e:
                    row["note"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    rows.append(row)
                    log(f"B={B} L={L} {m}: {row['note']}")
                    _free(device)
                    continue
                if device.type == "cuda":
                    _cuda_extras(row, m, step, q, cache, args, log)
                row.update(
                    median_s=timing.median, q1_s=timing.q1, q3_s=timing.q3, iqr_s=timing.iqr, runs=timing.runs,
                    bytes_step=read.total, bytes_keys=read.keys, bytes_values=read.values,
                    bytes_summaries=read.summaries, bytes_per_token=read.total / B,
                    achieved_gbs=read.total / timing.median / 1e9, roofline_s=read.total / copy_bps,
                )
                if args.peak_gbs:
                    row["roofline_peak_s"] = read.total / (args.peak_gbs * 1e9)
                if "graph_median_s" in row:
                    row["graph_achieved_gbs"] = read.total / row["graph_median_s"] / 1e9
                rows.append(row)
                log(f"B={B} L={L} {m}: {timing.median * 1e3:.3f} ms (IQR {timing.iqr * 1e3:.3f}), "
                    f"{read.total / 2**20:.1f} MiB, {row['achieved_gbs']:.1f} GB/s")
            cache = q = None  # freed before the next case fills its own
            _free(device)
    _relative(rows)
    return rows


def _on_reference(step):
    """``step`` with every Triton kernel off (``kernels.dispatch.reference_only``)."""
    def run(q, cache):
        with reference_only():
            return step(q, cache)
    return run


def _cuda_extras(row: dict, method: str, step, q, cache, args, log=print) -> None:
    """The sync check, the graph's time and, with --compare-reference, the PyTorch path's output and graph time.

    A failure here is written into the row (``graph_note``) and leaves its eager time standing.
    """
    notes = []
    if args.profile:
        try:
            row["kernels_per_step"], row["gpu_busy_s"], row["top_kernels"] = kernel_profile(step, q, cache)
        except Exception as e:  # noqa: BLE001
            notes.append(f"profile failed: {type(e).__name__}")
    try:
        sync = host_sync(step, q, cache) if (args.sync_check or args.cuda_graphs) else "not checked"
        row["host_sync"] = sync
        if args.cuda_graphs:
            if sync is None:
                timing, same = _graph_time(step, q, cache, args.min_run_time)
                row.update(graph_median_s=timing.median, graph_iqr_s=timing.iqr, graph_runs=timing.runs,
                           graph_equals_eager=same)
            else:
                notes.append("not captured: the step syncs the host")
    except Exception as e:  # noqa: BLE001 - recorded, and the run goes on
        notes.append(f"graph failed: {type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}")
        torch.cuda.synchronize()
    if args.compare_reference and method in _FLOAT64_FORM and q.shape[2] == 1:
        try:  # the step's error against float64 over its own picks (and the PyTorch path's, for comparison)
            row["rel_err_vs_float64"] = float64_error(method, q, cache, step(q, cache), args.cfg)
            if method in _WITH_KERNEL:
                row["reference_rel_err_vs_float64"] = float64_error(method, q, cache, _on_reference(step)(q, cache),
                                                                    args.cfg)
        except Exception as e:  # noqa: BLE001
            notes.append(f"float64 check failed: {type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}")
        _free(q.device)
    if args.compare_reference and method in _WITH_KERNEL and "kernel failed" not in row.get("note", ""):
        try:
            ref_step = _on_reference(step)
            fast_r, ref_r = step(q, cache), ref_step(q, cache)
            fast, ref = fast_r.output.float(), ref_r.output.float()
            row["max_abs_diff_vs_reference"] = float((ref - fast).abs().max())
            row["max_abs_reference"] = float(ref.abs().max())
            if fast_r.selection.indices is not None:
                # Picks in the same slots as the PyTorch path's (ties in its rounding may reorder a few).
                row["picks_equal_reference"] = float((fast_r.selection.indices == ref_r.selection.indices)
                                                     .float().mean())
            del fast, ref, fast_r, ref_r
            if args.cuda_graphs and host_sync(ref_step, q, cache) is None:
                row["reference_graph_median_s"] = _graph_time(ref_step, q, cache, args.min_run_time)[0].median
        except Exception as e:  # noqa: BLE001
            notes.append(f"PyTorch path failed: {type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}")
    if notes:
        row["graph_note"] = "; ".join(notes)
        log(f"B={row['batch']} L={row['length']} {method}: {row['graph_note']}")
    if "graph_median_s" in row:
        log(f"B={row['batch']} L={row['length']} {method}: graph {row['graph_median_s'] * 1e3:.3f} ms"
            + (f", PyTorch-path graph {row['reference_graph_median_s'] * 1e3:.3f} ms"
               if "reference_graph_median_s" in row else ""))


def _relative(rows: list[dict]) -> None:
    """Each row's bytes as a share of dense's and its speedup over SDPA, at the same batch and length."""
    by_case = {}
    for r in rows:
        by_case.setdefault((r["batch"], r["length"]), {})[r["method"]] = r
    for case in by_case.values():
        dense, sdpa = case.get("dense") or case.get("sdpa"), case.get("sdpa")
        for r in case.values():
            if "bytes_step" in r and dense and "bytes_step" in dense:
                r["bytes_vs_dense"] = r["bytes_step"] / dense["bytes_step"]
            if "median_s" in r and sdpa and "median_s" in sdpa:
                r["speedup_vs_sdpa"] = sdpa["median_s"] / r["median_s"]
            if "graph_median_s" in r and sdpa and "graph_median_s" in sdpa:
                r["graph_speedup_vs_sdpa"] = sdpa["graph_median_s"] / r["graph_median_s"]


def format_table(rows: list[dict]) -> str:
    """A markdown table: one line per (batch, length, method); graph columns where the run captured graphs."""
    graphs = any("graph_median_s" in r or "graph_note" in r for r in rows)
    ref = any("reference_graph_median_s" in r or "max_abs_diff_vs_reference" in r for r in rows)
    head = ("| batch | length | method | median ms | IQR ms | MiB read / step | MiB / token | of dense's bytes "
            "| GB/s achieved | floor ms | speedup vs SDPA |")
    if graphs:
        head += " graph ms | graph GB/s | graph speedup vs SDPA graph | host syncs |"
    if ref:
        head += " PyTorch-path graph ms | max diff vs PyTorch path | rel err vs float64 | picks as PyTorch path |"
    prof = any("kernels_per_step" in r for r in rows)
    if prof:
        head += " kernels / step | GPU busy ms |"
    head += " note |"
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    blank = lambda n: " |" * n  # noqa: E731
    for r in rows:
        if "median_s" not in r:
            lines.append(f"| {r['batch']} | {r['length']} | {r['method']} |"
                         + blank(8 + 4 * graphs + 4 * ref + 2 * prof)
                         + f" {r['note']} |")
            continue
        line = (
            f"| {r['batch']} | {r['length']} | {r['method']} | {r['median_s'] * 1e3:.3f} | {r['iqr_s'] * 1e3:.3f} "
            f"| {r['bytes_step'] / 2**20:.1f} | {r['bytes_per_token'] / 2**20:.2f} | {r.get('bytes_vs_dense', 1):.3f} "
            f"| {r['achieved_gbs']:.1f} | {r['roofline_s'] * 1e3:.3f} | {r.get('speedup_vs_sdpa', float('nan')):.2f} |")
        if graphs:
            if "graph_median_s" in r:
                line += (f" {r['graph_median_s'] * 1e3:.3f} | {r['graph_achieved_gbs']:.1f} "
                         f"| {r.get('graph_speedup_vs_sdpa', float('nan')):.2f} |")
            else:
                line += blank(3)
            sync = r.get("host_sync", "not checked")
            line += " none |" if sync is None else f" {sync[:60]} |"
        if ref:
            line += (f" {r['reference_graph_median_s'] * 1e3:.3f} |" if "reference_graph_median_s" in r else " |")
            line += (f" {r['max_abs_diff_vs_reference']:.2e} |" if "max_abs_diff_vs_reference" in r else " |")
            line += (f" {r['rel_err_vs_float64']:.1e} |" if "rel_err_vs_float64" in r else " |")
            line += (f" {r['picks_equal_reference']:.4f} |" if "picks_equal_reference" in r else " |")
        if prof:
            line += (f" {r['kernels_per_step']} | {r['gpu_busy_s'] * 1e3:.3f} |" if "kernels_per_step" in r else " | |")
        notes = [n for n in (r.get("note"), r.get("graph_note")) if n]
        if r.get("graph_equals_eager") is False:
            notes.append("graph output differs from eager")
        lines.append(line + f" {'; '.join(notes)} |")
    return "\n".join(lines)


def _machine(device: torch.device, dtype, copy_bps: float, args, argv) -> dict:
    meta = dict(command="python -m benchmarks.decode " + " ".join(argv), device=device.type, dtype=str(dtype),
                torch=torch.__version__, python=platform.python_version(), threads=torch.get_num_threads(),
                copy_gbs=copy_bps / 1e9, peak_gbs=args.peak_gbs, started=time.strftime("%Y-%m-%d %H:%M:%S"))
    if device.type == "cuda":
        meta["device_name"] = torch.cuda.get_device_name(device)
    else:
        meta["device_name"] = platform.processor() or platform.machine()
        meta["cpus"] = os.cpu_count()
    if hasattr(os, "getloadavg"):
        meta["loadavg_start"] = os.getloadavg()
    return meta


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.decode", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=list(_DTYPES), default=None, help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536, 131072], help="cache lengths")
    p.add_argument("--batch", type=int, nargs="+", default=[1], help="batch sizes (sequences decoded together)")
    p.add_argument("--heads", type=int, default=64, help="query heads")
    p.add_argument("--kv-heads", type=int, default=4, help="key/value heads (the query heads share them in groups)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--methods", nargs="+", choices=METHODS_TIMED, default=list(METHODS_TIMED))
    g = p.add_argument_group("method settings (sparse_attn.methods.Config)")
    for name, default in _SETTINGS.items():
        g.add_argument("--" + name.replace("_", "-"), type=int, default=default, dest=name)
    g.add_argument("--streaming-window-size", type=int, default=2044,
                   help="StreamingLLM's sliding_window_size (--sliding-window-size is NSA's)")
    on_cuda = "default: on with --device cuda"
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help=f"also time each step captured in a CUDA graph ({on_cuda})")
    p.add_argument("--sync-check", action=argparse.BooleanOptionalAction, default=None,
                   help=f"run one step under torch.cuda.set_sync_debug_mode('error') ({on_cuda})")
    p.add_argument("--compare-reference", action=argparse.BooleanOptionalAction, default=None,
                   help=f"also run the sparse steps with the Triton kernels off ({on_cuda})")
    p.add_argument("--profile", action="store_true",
                   help="count each step's kernels and their GPU time with torch.profiler (--device cuda)")
    p.add_argument("--min-run-time", type=float, default=0.5, help="seconds of timing per case")
    p.add_argument("--copy-bytes", type=int, default=None,
                   help="bytes copied to measure bandwidth (default 1 GiB on cuda, 256 MiB on cpu)")
    p.add_argument("--peak-gbs", type=float, default=None, help="the device's rated bandwidth, for a second floor")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write OUT.json, OUT.md and OUT.html")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available here", file=sys.stderr)
        return 2
    for name in ("lengths", "batch"):
        if min(getattr(args, name)) < 1:
            print(f"--{name} must be >= 1", file=sys.stderr)
            return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.profile and args.device != "cuda":
        print("--profile needs --device cuda", file=sys.stderr)
        return 2
    for name in ("cuda_graphs", "sync_check", "compare_reference"):
        if getattr(args, name) is None:
            setattr(args, name, args.device == "cuda")
        elif getattr(args, name) and args.device != "cuda":
            print(f"--{name.replace('_', '-')} needs --device cuda", file=sys.stderr)
            return 2
    device = torch.device(args.device)
    dtype = _DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    cfg = Config(**{name: getattr(args, name) for name in _SETTINGS})
    args.cfg = cfg
    nbytes = args.copy_bytes or (1 << 30 if device.type == "cuda" else 1 << 28)
    copy_bps = copy_bandwidth(device, nbytes, min_run_time=min(args.min_run_time, 0.5))
    meta = _machine(device, dtype, copy_bps, args, argv)
    print(f"{meta['device_name']}: copy bandwidth {copy_bps / 1e9:.1f} GB/s", flush=True)
    rows = measure(args, cfg, device, dtype, copy_bps, log=lambda s: print(s, flush=True))
    if hasattr(os, "getloadavg"):
        meta["loadavg_end"] = os.getloadavg()
    table = format_table(rows)
    print(table)
    if args.out:
        stem = Path(args.out)
        stem.parent.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".json").write_text(json.dumps(dict(meta=meta, config=asdict(cfg), rows=rows), indent=1))
        stem.with_suffix(".md").write_text(f"`{meta['command']}`\n\n{meta['device_name']}, {meta['dtype']}, "
                                           f"copy bandwidth {meta['copy_gbs']:.1f} GB/s\n\n{table}\n")
        try:
            from sparse_attn.viz_decode import decode_figure
        except ImportError:  # plotly is not installed: the JSON and the table are the results
            return 0
        if any("median_s" in r for r in rows):
            fig = decode_figure(rows, copy_gbs=meta["copy_gbs"], device=meta["device_name"],
                                dtype=meta["dtype"].replace("torch.", ""))
            fig.write_html(str(stem.with_suffix(".html")), include_plotlyjs=True)  # self-contained: opens offline
    return 0


if __name__ == "__main__":
    sys.exit(main())
