"""The budget tab at the largest allowed L, in a served app and a real browser.

    python -m benchmarks.budget_guard                       # view=budget&L=4096, then a second sweep left mid-way
    python -m benchmarks.budget_guard "view=budget&L=4096" "view=budget&L=4096&pattern=flat" --shots DIR

Reports (JSON): seconds to the progress bar and to the first chart, the server's
CPU seconds and peak RSS (sampled every 0.1 s), the cores the server uses while
a second sweep runs and after that page is closed (how soon a student who
leaves frees the CPU), and whether a maps view opened during a sweep shows the
queue message before its picture. Screenshots go to ``--shots``.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time

import psutil
from playwright.sync_api import sync_playwright

from sparse_attn.ui.server import CHROMIUM, CHROMIUM_ARGS, serve

samples = []
stop = threading.Event()



def tree(p):
    try:
        return [p, *p.children(recursive=True)]
    except psutil.Error:
        return [p]



def sampler(proc):
    while not stop.is_set():
        cpu = rss = 0.0
        for q in tree(proc):
            try:
                c = q.cpu_times(); cpu += c.user + c.system; rss += q.memory_info().rss
            except psutil.Error:
                pass
        samples.append((time.monotonic(), cpu, rss))
        time.sleep(0.1)



def window(t0, t1):
    xs = [s for s in samples if t0 <= s[0] <= t1]
    return xs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("query", nargs="?", default="view=budget&L=4096", help="the sweep measured first")
    ap.add_argument("query2", nargs="?", default="view=budget&L=4096&pattern=flat", help="the sweep left mid-way")
    ap.add_argument("--shots", default=None, help="where screenshots and the server log go (default: a temp folder)")
    args = ap.parse_args(argv)
    QUERY, QUERY2 = args.query, args.query2
    SHOTS = args.shots or tempfile.mkdtemp()
    os.makedirs(SHOTS, exist_ok=True)
    out = {"query": QUERY, "load_before": os.getloadavg()}
    with serve(log_path=os.path.join(SHOTS, "server.log")) as url:
        me = psutil.Process()
        [server] = [c for c in me.children() if "streamlit" in " ".join(c.cmdline())]
        threading.Thread(target=sampler, args=(server,), daemon=True).start()
        time.sleep(1.5)
        base = samples[-1]
        out["rss_baseline_mib"] = base[2] / 2**20
        with sync_playwright() as pw:
            b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            ctx = b.new_context(viewport={"width": 1500, "height": 1100})
            page = ctx.new_page()
            t0 = time.monotonic(); c0 = samples[-1][1]
            page.goto(f"{url}/?{QUERY}")
            page.wait_for_selector("[data-testid='stProgress']", timeout=120_000)
            out["s_to_progress"] = time.monotonic() - t0
            page.wait_for_timeout(4000)
            page.screenshot(path=SHOTS + "/budget_progress_en.png")
            page.wait_for_selector(".st-key-budget_chart .js-plotly-plot", timeout=300_000)
            t1 = time.monotonic()
            out["s_to_first_result"] = t1 - t0
            page.wait_for_timeout(1500)
            page.screenshot(path=SHOTS + "/budget_result_en.png", full_page=True)
            xs = window(t0, t1)
            out["cpu_s_run"] = xs[-1][1] - c0
            out["rss_peak_mib"] = max(s[2] for s in samples) / 2**20
            # Leave mid-sweep: a fresh sweep (other settings), closed while it runs.
            page2 = ctx.new_page()
            page2.goto(f"{url}/?{QUERY2}")
            page2.wait_for_function("() => [...document.querySelectorAll(\"[data-testid='stProgress']\")].some(e => e.innerText.includes('runs'))", timeout=180_000)
            page2.wait_for_timeout(3000)
            ta = time.monotonic(); ca = samples[-1][1]
            page2.wait_for_timeout(3000)
            tb = time.monotonic(); cb = samples[-1][1]
            out["cores_while_sweeping"] = (cb - ca) / (tb - ta)
            page2.close(); page.close()
            tc = time.monotonic()
            time.sleep(15)
            xs = window(tc, time.monotonic())
            rates = []
            for i in range(0, len(xs) - 5, 5):  # 0.5 s windows
                (ta_, ca_, _), (tb_, cb_, _) = xs[i], xs[i + 5]
                rates.append((round(ta_ - tc, 1), round((cb_ - ca_) / (tb_ - ta_), 2)))
            out["cores_after_close"] = rates
            idle = next((t for t, r in rates if all(r2 < 0.1 for _, r2 in rates if _ >= t)), None)
            out["s_to_idle_after_close"] = idle
            out["rss_end_mib"] = samples[-1][2] / 2**20
            # Chinese: a sweep in progress, and a maps view queued behind it (the sweep holds most of the budget).
            p3 = ctx.new_page()
            p3.goto(f"{url}/?view=budget&L=4096&pattern=random&lang=zh")
            p3.wait_for_function("() => [...document.querySelectorAll(\"[data-testid='stProgress']\")].some(e => e.innerText.includes('次运行'))", timeout=180_000)
            p3.screenshot(path=SHOTS + "/budget_progress_zh.png")
            p4 = ctx.new_page()
            p4.goto(f"{url}/?L=4096&lang=zh")
            try:
                p4.wait_for_function("() => document.body.innerText.includes('其他同学正在进行的计算')", timeout=60_000)
                out["queued_seen"] = True
                p4.screenshot(path=SHOTS + "/maps_queued_zh.png")
            except Exception as exc:
                out["queued_seen"] = repr(exc)[:200]
            p3.wait_for_selector(".st-key-budget_chart .js-plotly-plot", timeout=300_000)
            p3.wait_for_timeout(1500)
            p3.screenshot(path=SHOTS + "/budget_result_zh.png", full_page=True)
            p4.wait_for_selector(".st-key-maps_chart .js-plotly-plot", timeout=300_000)
            p4.screenshot(path=SHOTS + "/maps_after_queue_zh.png")
            out["rss_peak_total_mib"] = max(s[2] for s in samples) / 2**20
            b.close()
        stop.set()
    out["load_after"] = os.getloadavg()
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
