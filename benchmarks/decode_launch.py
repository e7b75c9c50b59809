"""Launch settings of the decode kernels, each timed as a CUDA graph: ``python -m benchmarks.decode_launch --out OUT``.

The decode benchmark times whole steps; this times the pieces whose launch
settings were chosen by measurement, at B=32, 64 query over 4 KV heads,
D=128, 64k keys, bf16 (the paper settings of ``benchmarks.decode``):

- the ranking kernel (``topk_kernel``) at 128 rows of 4096 (grouped Quest)
  and 2048 rows (per-head Quest), k = 128, at several warp counts;
- the NSA step's kernels (``nsa_kernel.nsa_step_triton``) with the
  selection kernel at 4, 8 and 16 warps.

Each piece is captured in a graph and replayed 300 times between CUDA
events (eager timings of kernels this short measure the host's launch
overhead instead). Median and IQR in microseconds, to OUT.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

__all__ = ["graph_time", "main"]


def graph_time(fn, replays: int = 300) -> dict:
    """Median and IQR (microseconds) of ``fn`` captured once in a CUDA graph and replayed ``replays`` times."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream: compiles, fills caches
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    times.sort()
    n = len(times)
    return dict(median_us=times[n // 2], iqr_us=times[3 * n // 4] - times[n // 4])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.decode_launch", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="write OUT.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks.decode_launch needs a CUDA device", file=sys.stderr)
        return 2
    from benchmarks.decode import _SETTINGS, _fill
    from sparse_attn.decode import nsa_kernel
    from sparse_attn.decode.topk_kernel import topk_indices_triton
    from sparse_attn.methods import Config

    res = {}

    def record(name, fn):
        res[name] = graph_time(fn)
        print(f"{name}: {res[name]['median_us']:.1f} us (IQR {res[name]['iqr_us']:.1f})", flush=True)

    g = torch.Generator(device="cuda").manual_seed(0)
    for rows, warps in ((128, (4, 8, 16)), (2048, (2, 4, 16))):
        x = torch.randn(rows, 4096, device="cuda", generator=g).bfloat16()
        for w in warps:
            record(f"ranking kernel, {rows} rows of 4096, k=128, {w} warps",
                   lambda: topk_indices_triton(x, 128, num_warps=w))
    cfg = Config(**_SETTINGS)
    B, Hkv, L, D, H = 32, 4, 65536, 128, 64
    cache = _fill(cfg, B, Hkv, L, D, torch.bfloat16, torch.device("cuda"), 0)
    q = torch.randn(B, H, 1, D, device="cuda", generator=g).bfloat16()
    gates = torch.full((B, H, 1, 3), 1 / 3, device="cuda", dtype=torch.bfloat16)
    kw = dict(scale=D ** -0.5, window=cfg.sliding_window_size, sel=cfg.selection_block_size,
              num_selected=cfg.num_selected_blocks, num_initial=cfg.num_initial_blocks, num_local=cfg.num_local_blocks)
    for w in (4, 8, 16):
        record(f"NSA step (kernels only), selection kernel at {w} warps",
               lambda: nsa_kernel.nsa_step_triton(q, cache, gates, select_warps=w, **kw))
    if args.out:
        Path(args.out).with_suffix(".json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
