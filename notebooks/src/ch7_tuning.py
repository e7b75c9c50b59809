"""Chapter 6: choosing k and the chunk size on your own device, from measured quality and timings."""
from _cells import Claim, Code, Exercises, Md

NUMBER = 6
SLUG = "ch6_tuning"
TITLE = {"en": "Tuning k and the chunk size on your device", "zh": "在你的设备上调节 k 和分块大小"}
TERMS = ["chunk", "mass kept", "attention", "memory", "query", "key"]

CELLS = [
    Md(
        en="""
        Two settings decide how top-k attention behaves: **k**, which sets what it keeps (quality),
        and the **chunk** size C, which sets how it runs (memory and speed, chapter 2). Pick k from
        quality first, then time the chunk sizes on the machine you will use. Timings below are the
        median and the fastest of at least five runs, measured with `sparse_attn.timing.time_fn`
        (`torch.utils.benchmark`, which warms up and synchronises the GPU); your numbers will differ
        from anyone else's, which is the point.
        """,
        zh="""
        有两个设置决定 Top-k 注意力的表现：**k** 决定保留什么（质量），**分块** 大小 C 决定怎样运行
        （内存和速度，见第 2 章）。先根据质量选定 k，再在你要用的机器上为各个分块大小计时。下面的时间是
        至少五次运行的中位数和最快值，由 `sparse_attn.timing.time_fn` 测得（基于 `torch.utils.benchmark`，
        它会预热并同步 GPU）；你的数字会和别人的不同，这正是要点所在。
        """,
    ),
    Code("""
        import pandas as pd
        import torch
        import torch.nn.functional as F
        from sparse_attn import viz
        from sparse_attn.metrics import mass_kept
        from sparse_attn.ops import dense_attention, topk_attention
        from sparse_attn.sources import synthetic_qkv
        from sparse_attn.timing import time_fn


        def tr(en, zh):
            \"\"\"Text in the notebook's language, for plot titles and axis labels.\"\"\"
            return zh if LANG == "zh" else en


        device = "cuda" if torch.cuda.is_available() else "cpu"
        L = 256
        q, k, v = (t.to(device) for t in synthetic_qkv("retrieval", heads=2, length=L, head_dim=32, seed=0))
        print(f"device: {device}, torch {torch.__version__}, threads: {torch.get_num_threads()}, L = {L}")
    """),
    Md(
        en="""
        ## 1. Choose k from quality

        The inputs plant a retrieval pattern: each query matches a few keys strongly. Ask for the
        smallest k whose **mass kept** is at least 90% for every query (not on average: the worst
        query is the one that breaks a model).
        """,
        zh="""
        输入中植入了检索模式：每个查询与少数几个键强烈匹配。找出能让 **每一个** 查询保留的注意力质量都至少达到 90% 的最小 k（不看平均值：拖垮模型的是最差的那个查询）。
        """,
    ),
    Code("""
        _, weights = dense_attention(q, k, v, return_weights=True)
        worst = {}
        for top_k in (4, 8, 16, 32, 64):
            _, sel = topk_attention(q, k, v, top_k, return_selection=True)
            worst[top_k] = mass_kept(weights, sel).min().item()
        chosen_k = min(kk for kk, kept in worst.items() if kept >= 0.9)
        print({kk: round(m, 3) for kk, m in worst.items()}, "-> k =", chosen_k)
    """),
    Claim(
        en="Here **k = 16** is the smallest k that keeps 90% of the mass for every query; k = 8 leaves some query **below 90%**.",
        zh="在这里，**k = 16** 是能让每个查询都保留 90% 质量的最小 k；k = 8 时有查询 **低于 90%**。",
        check="""
        assert chosen_k == 16 and worst[8] < 0.9 <= worst[16]
        """,
    ),
    Md(
        en="""
        ## 2. Time the chunk sizes

        With k fixed, time the streamed top-k for several chunk sizes, the all-scores version
        (`chunk_size=None`) and PyTorch's fused dense attention (SDPA) as a baseline.
        """,
        zh="""
        固定 k 后，为几种分块大小的流式 Top-k 计时，同时计时一次性计算全部得分的版本（`chunk_size=None`），
        并以 PyTorch 融合的稠密注意力（SDPA）作为基线。
        """,
    ),
    Code("""
        def timed(fn):
            \"\"\"Median and fastest run in ms. Other programs can only slow a run down, so the fastest
            run is the steadiest number to compare; the median is what to expect.\"\"\"
            t = time_fn(fn, min_run_time=0.05, min_runs=5)
            return dict(median_ms=t.median * 1e3, best_ms=min(t.times) * 1e3)


        rows = []
        for chunk in (16, 64, 128, None):
            rows.append(dict(method="topk", chunk=chunk or L, **timed(lambda: topk_attention(q, k, v, chosen_k, chunk_size=chunk))))
        sdpa_ms = timed(lambda: F.scaled_dot_product_attention(q, k, v))["median_ms"]
        timings = pd.DataFrame(rows)
        timings
    """),
    Code("""
        viz.budget_curve(timings, x="chunk", y="median_ms", color="method", names={"topk": f"top-{chosen_k}"},
                         title=tr(f"Top-k attention time against chunk size (L = {L}, {device})",
                                  f"Top-k 注意力耗时与分块大小（L = {L}，{device}）"),
                         x_title=tr("chunk size C (keys)", "分块大小 C（键）"),
                         y_title=tr("median time (ms)", "时间中位数（毫秒）"), lang=LANG).show()
    """),
    Claim(
        en="""
        Streaming costs time on a short row: C = 16 splits the work into 256 query-by-key tiles,
        each with its own selection and merge, and its fastest run takes **more than three times**
        as long as the fastest run of scoring all keys at once. Chunking pays in memory, at lengths where
        the L × L scores would not fit (chapter 2).
        """,
        zh="""
        在短行上流式计算要花时间：C = 16 把工作切成 256 个查询×键的小块，每块各自选择、合并，其最快一次
        运行的耗时是一次性为全部键打分的最快一次运行的 **三倍以上**。分块的回报在内存上，适用于 L × L
        得分放不下的长度（见第 2 章）。
        """,
        check="""
        best = timings.set_index("chunk").best_ms
        assert (L // 16) ** 2 == 256
        assert best[16] > 3 * best[L], best
        """,
    ),
    Md(
        en="""
        Is fused dense SDPA faster than every top-k setting on your machine? The cell below answers
        for this device. Top-k in plain PyTorch runs several separate steps (score, select, gather,
        softmax) where SDPA runs one fused kernel; whether that costs time depends on the machine.
        """,
        zh="""
        在你的机器上，融合的稠密 SDPA 是否比每一种 Top-k 设置都快？下面的单元格给出本设备上的答案。
        纯 PyTorch 实现的 Top-k 要分好几步（打分、选择、收集、softmax），而 SDPA 只运行一个融合内核；
        这是否更费时间，取决于机器。
        """,
    ),
    Code("""
        print(f"SDPA {sdpa_ms:.2f} ms vs fastest top-k {timings.median_ms.min():.2f} ms:",
              "SDPA is faster" if sdpa_ms < timings.median_ms.min() else "top-k is faster")
    """),
    Md(
        en="""
        ## 3. Pick, and check the pick

        Take the fastest chunk size whose tiles fit your memory budget (here, all of them fit).
        Chunking changes how the work is done, never the answer: every setting must give the same
        output as scoring all keys at once.
        """,
        zh="""
        在内存预算允许的分块大小中选出最快的（这里都放得下）。分块只改变计算方式，从不改变结果：每种设置都必须给出与一次性为全部键打分相同的输出。
        """,
    ),
    Code("""
        best_chunk = int(timings.loc[timings.median_ms.idxmin(), "chunk"])
        reference = topk_attention(q, k, v, chosen_k)
        max_diff = max((topk_attention(q, k, v, chosen_k, chunk_size=c) - reference).abs().max().item() for c in (16, 64, 128))
        print(f"chosen: k = {chosen_k}, chunk_size = {best_chunk}; largest difference between settings: {max_diff:.1e}")
    """),
    Claim(
        en="Every chunk size gives the all-scores output to within **1e-5**.",
        zh="每种分块大小的输出与一次性为全部键打分的输出相差都在 **1e-5** 以内。",
        check="""
        assert max_diff < 1e-5, max_diff
        """,
    ),
    Md(
        en="""
        For longer sequences, more heads or another dtype, run the same comparison from a shell
        in the repository's root directory; each case runs in a fresh process so its peak memory
        is its own:

        ```
        python -m benchmarks topk --lengths 1024 4096 16384 --heads 8 --head-dim 64 --top-k 64 --chunk-size 1024
        ```
        """,
        zh="""
        若要测试更长的序列、更多的注意力头或其他数据类型，可在仓库根目录下的命令行中运行同样的比较；每个用例都在新的进程中运行，因此其峰值内存只属于它自己：

        ```
        python -m benchmarks topk --lengths 1024 4096 16384 --heads 8 --head-dim 64 --top-k 64 --chunk-size 1024
        ```
        """,
    ),
    Exercises(
        en=(
            "Repeat section 1 with the `sink_local` pattern. Does the smallest k that keeps 90% for every query go up or down, and why?",
            "Time chunk sizes 64 to 4096 at L = 4096. Where is the fastest chunk size on your machine, and how does it compare with L = 256?",
            "Run the `python -m benchmarks topk` command above and find the sequence length at which the streamed top-k's peak memory drops below SDPA's on your machine, if it does.",
        ),
        zh=(
            "用 `sink_local` 模式重做第 1 节。能让每个查询都保留 90% 质量的最小 k 是变大还是变小？为什么？",
            "在 L = 4096 时为 64 到 4096 的分块大小计时。在你的机器上最快的分块大小是多少？与 L = 256 时相比如何？",
            "运行上面的 `python -m benchmarks topk` 命令，找出在你的机器上流式 Top-k 的峰值内存从哪个序列长度开始低于 SDPA（如果会的话）。",
        ),
    ),
]
