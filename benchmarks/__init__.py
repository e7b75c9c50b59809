"""Benchmark drivers for ``sparse_attn``: they import the library, and the library never imports them.

    python -m benchmarks topk  --lengths 1024 4096 16384        # time and peak memory of the top-k methods
    python -m benchmarks sweep --methods dense topk nsa ...     # any registry method, length, dtype, device
    python -m benchmarks report RESULTS.json                    # the HTML report of a sweep's JSON file

- ``cases``: what one benchmark case is (shapes plus a ``sparse_attn.methods.Config``), and sweeps of them;
- ``memory``: the CPU resident set's high-water mark, free memory, and a pre-run size estimate;
- ``runner``: measure a case in this process or in a fresh one, run a sweep with progress;
- ``report``: CSV, JSON and a self-contained HTML page with plotly figures;
- ``cli``: the command line (``python -m benchmarks``);
- ``browser``: what the browser drivers read from the served app's page;
- ``gpu``: the kernels' GPU checks, launch tuning and tables (``python -m benchmarks.gpu OUT [SECTION ...]``);
- ``app_latency`` and ``classroom_load``: the app's latency and the classroom load test, in real browsers
  (``python -m benchmarks.app_latency``, ``python -m benchmarks.classroom_load``).
"""
