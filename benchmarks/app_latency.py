"""Slider change to updated heatmap, in a real browser: median and p95 over repeated k changes.

    python -m benchmarks.app_latency                 # L = 256 (defaults) and L = 4096
    python -m benchmarks.app_latency --lengths 256 1024 --repeats 20

Starts the app on a free loopback port, opens it in the system Chromium,
focuses the k slider and presses an arrow key; the time runs until the sparse
heatmap's data on screen (plotly's own ``_fullData``) differs from before.
It includes the rerun, the computation, the transfer and plotly's redraw.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

from playwright.sync_api import sync_playwright

from benchmarks.browser import signature, wait_for_new_signature, wait_for_plot, wait_idle
from sparse_attn.i18n import t
from sparse_attn.ui.server import CHROMIUM, CHROMIUM_ARGS, serve


def p95(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(0.95 * (len(xs) - 1)))]


def measure(page, url: str, L: int, repeats: int, warmup: int = 2) -> list[float]:
    page.goto(f"{url}/?L={L}")
    wait_idle(page, 180_000)
    sig = wait_for_plot(page, timeout=180_000)
    slider = page.get_by_role("slider", name=t("setting.top_k", "en"))
    times = []
    for i in range(warmup + repeats):
        slider.focus()
        start = time.perf_counter()
        # Alternate up and down so k stays near its default (32) and every press changes the map.
        page.keyboard.press("ArrowRight" if i % 2 == 0 else "ArrowLeft")
        sig = wait_for_new_signature(page, sig, timeout=180_000)
        elapsed = time.perf_counter() - start
        wait_idle(page, 180_000)
        sig = signature(page)
        if i >= warmup:
            times.append(elapsed)
    return times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 4096])
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args(argv)
    rows = []
    with serve() as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1500, "height": 1100})
        for L in args.lengths:
            times = measure(page, url, L, args.repeats)
            rows.append((L, statistics.median(times), p95(times), len(times)))
            print(f"L={L}: median {rows[-1][1]:.3f} s, p95 {rows[-1][2]:.3f} s over {len(times)} changes", flush=True)
        browser.close()
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}; H=4, D=64, top-k, k around 32, float32, CPU")
    print("| L | median (s) | p95 (s) | changes |\n| --- | --- | --- | --- |")
    for L, med, p, n in rows:
        print(f"| {L} | {med:.2f} | {p:.2f} | {n} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
