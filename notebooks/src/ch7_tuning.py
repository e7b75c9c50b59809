"""Chapter 7: choosing k and the chunk size on your own device, from measured quality, timings with their spread, and memory."""
from _cells import Claim, Code, Exercise, Exercises, Md, Objectives, References, Summary

NUMBER = 7
SLUG = "ch7_tuning"
TITLE = {"en": "Tuning k and the chunk size on your device", "zh": "在你的设备上调节 k 和分块大小"}
TERMS = ["chunk", "mass kept", "attention", "memory", "query", "key", "streaming top-k"]

CELLS = [
    Objectives(
        en=(
            "choose k from quality, by the worst query rather than the average one;",
            "time several chunk sizes with their spread (median and interquartile range) and state a verdict "
            "only when the gap between two medians exceeds the spread;",
            "read the memory side from the cost model: $O(L\\,(k+C))$ per head for the streamed top-k against "
            "$O(L^2)$ for scoring all keys at once;",
            "check that a chunk size changes how the work is done, never the answer.",
        ),
        zh=(
            "根据质量选 k，并且看最差的查询而不是平均值；",
            "为几种分块大小计时并给出波动范围（中位数和四分位距），只有当两个中位数之差超过波动时才下结论；",
            "从代价模型读出内存的一面：流式 Top-k 每个注意力头是 $O(L\\,(k+C))$，一次性为全部键打分则是 $O(L^2)$；",
            "验证分块大小只改变计算方式，从不改变结果。",
        ),
    ),
    Md(
        en=r"""
        ## Why measure on your own device, and how to trust a timing

        Two settings decide how top-k attention behaves: $k$, which sets what it keeps (quality), and the
        **chunk** size $C$, which sets how it runs (**memory** and speed, chapter 3). Quality can be
        computed once for all; speed cannot: it depends on the machine, the library build, the number of
        threads and whatever else is running. On a shared machine a single timing, or even a median, can
        flip a comparison from one run to the next.

        So every timing below is a distribution: `sparse_attn.timing.time_fn` (built on
        `torch.utils.benchmark`, which warms up and synchronises the GPU) returns the median $m$ and the
        interquartile range $\mathrm{IQR}=Q_3-Q_1$ of at least five runs. We call $a$ faster than $b$ only when

        $$
        m_b-m_a>\mathrm{IQR}_a+\mathrm{IQR}_b,
        $$

        and otherwise say they are *within noise*. The rule is conservative: two settings within noise may
        still differ, but this machine, at this moment, cannot tell.
        """,
        zh=r"""
        ## 为什么要在自己的设备上测量，以及怎样才能相信一个计时

        有两个设置决定 Top-k 注意力的表现：$k$ 决定保留什么（质量），**分块** 大小 $C$ 决定怎样运行
        （**内存** 和速度，见第 3 章）。质量算一次就一劳永逸；速度却不然：它取决于机器、库的构建方式、线程数，
        以及同时还在运行的其他程序。在共享的机器上，单次计时甚至中位数都可能让比较结果在两次运行之间反转。

        因此下面的每个计时都是一个分布：`sparse_attn.timing.time_fn`（基于 `torch.utils.benchmark`，
        它会预热并同步 GPU）返回至少五次运行的中位数 $m$ 和四分位距 $\mathrm{IQR}=Q_3-Q_1$。
        只有当

        $$
        m_b-m_a>\mathrm{IQR}_a+\mathrm{IQR}_b
        $$

        时，我们才说 $a$ 比 $b$ 快；否则就说两者 *在噪声范围内*。这条规则偏保守：在噪声范围内的两个设置也许确有差别，
        但这台机器此刻分辨不出来。
        """,
    ),
    Code("""
        import math

        import pandas as pd
        import torch
        import torch.nn.functional as F
        from sparse_attn import viz
        from sparse_attn.methods import METHODS, Config, Shape
        from sparse_attn.metrics import mass_kept
        from sparse_attn.ops import dense_attention, topk_attention
        from sparse_attn.sources import synthetic_qkv
        from sparse_attn.timing import time_fn


        def tr(en, zh):
            \"\"\"Text in the notebook's language, for printouts, plot titles and axis labels.\"\"\"
            return zh if LANG == "zh" else en


        device = "cuda" if torch.cuda.is_available() else "cpu"
        L = 256
        q, k, v = (t.to(device) for t in synthetic_qkv("retrieval", heads=2, length=L, head_dim=32, seed=0))
        print(tr(f"device: {device}, torch {torch.__version__}, threads: {torch.get_num_threads()}, L = {L}",
                 f"设备：{device}，torch {torch.__version__}，线程数：{torch.get_num_threads()}，L = {L}"))
    """),
    Md(
        en="""
        ## 1. Choose k from quality

        The inputs plant a retrieval pattern: each **query** matches a few **key**s strongly. Ask for the
        smallest k whose **mass kept** is at least 90 % for *every* query, not on average: the worst query
        is the one that breaks a model.
        """,
        zh="""
        ## 1. 根据质量选 k

        输入中植入了检索模式：每个 **查询** 与少数几个 **键** 强烈匹配。找出能让 *每一个* 查询的 **权重占比**
        都至少达到 90% 的最小 k，而不是看平均值：拖垮模型的是最差的那个查询。
        """,
    ),
    Code("""
        _, weights = dense_attention(q, k, v, return_weights=True)
        kept = {}
        for top_k in (4, 8, 16, 32, 64):
            _, sel = topk_attention(q, k, v, top_k, return_selection=True)
            kept[top_k] = mass_kept(weights, sel)
        worst = {kk: m.min().item() for kk, m in kept.items()}
        chosen_k = min(kk for kk, m in worst.items() if m >= 0.9)
        print(tr("worst query's mass kept: ", "最差查询的权重占比：") + str({kk: round(m, 3) for kk, m in worst.items()})
              + f" -> k = {chosen_k}")
    """),
    Claim(
        en="Here **k = 16** is the smallest k that keeps 90 % of the mass for every query (its worst query keeps **0.987**); at k = 8 the worst query keeps only **0.867**.",
        zh="在这里，**k = 16** 是能让每个查询都保留 90% 权重的最小 k（最差的查询保留 **0.987**）；k = 8 时最差的查询只保留 **0.867**。",
        check="""
        assert chosen_k == 16
        assert abs(worst[16] - 0.987) < 0.005 and abs(worst[8] - 0.867) < 0.005, worst
        """,
    ),
    Md(
        en="""
        ## 2. Time the chunk sizes, with their spread

        With k fixed, time the **streaming top-k** for several chunk sizes and the all-scores version
        (`chunk_size=None`). The table gives each median with its IQR and the verdict of the rule above
        against the all-scores version.
        """,
        zh="""
        ## 2. 为各个分块大小计时，并给出波动

        固定 k 后，为几种分块大小的 **流式 Top-k** 以及一次性计算全部得分的版本（`chunk_size=None`）计时。
        表中给出每个中位数及其四分位距，以及按上面的规则与全部得分版本相比的结论。
        """,
    ),
    Code("""
        def timed(fn):
            \"\"\"A Timing: median and IQR (seconds) over at least five runs.\"\"\"
            return time_fn(fn, min_run_time=0.05, min_runs=5)


        def verdict(a, b):
            \"\"\"'faster' if Timing a beats b by more than their spreads together, 'slower' if b beats a, else 'within noise'.\"\"\"
            if b.median - a.median > a.iqr + b.iqr:
                return "faster"
            if a.median - b.median > a.iqr + b.iqr:
                return "slower"
            return "within noise"


        CHUNKS = (16, 64, 128, None)
        times = {chunk: timed(lambda: topk_attention(q, k, v, chosen_k, chunk_size=chunk)) for chunk in CHUNKS}
        VERDICT = {"faster": tr("faster", "更快"), "slower": tr("slower", "更慢"), "within noise": tr("within noise", "在噪声范围内"),
                   "-": "-"}
        timings = pd.DataFrame([dict(method="topk", chunk=chunk or L, median_ms=t.median * 1e3, iqr_ms=t.iqr * 1e3,
                                     runs=t.runs, verdict=verdict(t, times[None]) if chunk else "-")
                                for chunk, t in times.items()])
        timings.assign(verdict=timings.verdict.map(VERDICT)).rename(columns={
            "chunk": tr("chunk size C", "分块大小 C"), "median_ms": tr("median (ms)", "中位数（毫秒）"),
            "iqr_ms": tr("IQR (ms)", "四分位距（毫秒）"), "runs": tr("runs", "运行次数"),
            "verdict": tr("against C = L", "与 C = L 相比"),
        }).drop(columns="method").round(3)
    """),
    Code("""
        fig = viz.scaling_plot(timings, x="chunk", y="median_ms", spread="iqr_ms", color="method",
                               names={"topk": f"top-{chosen_k}"},
                               title=tr(f"Top-k attention time against chunk size (L = {L}, {device}; bars: IQR)",
                                        f"Top-k 注意力耗时与分块大小（L = {L}，{device}；误差棒：四分位距）"),
                               x_title=tr("chunk size C (keys)", "分块大小 C（键）"),
                               y_title=tr("median time (ms)", "时间中位数（毫秒）"), lang=LANG)
        ticks = list(timings.chunk)
        fig.update_xaxes(tickvals=ticks, ticktext=[str(c) for c in ticks])
        lo, hi = timings.median_ms.min() / 1.3, timings.median_ms.max() * 1.3
        steps = [m * 10.0 ** e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1) for m in (1, 2, 5)]
        y_ticks = [t for t in steps if lo <= t <= hi]  # 1-2-5 labels, not plotly's unlabelled log minor ticks
        fig.update_yaxes(range=[math.log10(lo), math.log10(hi)], tickvals=y_ticks, ticktext=[f"{t:g}" for t in y_ticks]).show()
    """),
    Claim(
        en="""
        Every verdict in the table is backed by its own numbers: "faster" or "slower" only where the two
        medians differ by more than the two IQRs together, "within noise" otherwise. C = 16 splits the work
        into **256** tiles of 16 queries by 16 keys, each with its own selection and merge; on most machines
        that makes it *slower* than scoring all keys at once at this short length, and the table says
        whether yours can tell. Chunking pays in memory, at lengths where the $L\\times L$ scores would not
        fit (section 4).
        """,
        zh="""
        表中的每一条结论都有它自己的数字作依据：只有当两个中位数之差超过两个四分位距之和时，才写“更快”或“更慢”，
        否则写“在噪声范围内”。C = 16 把工作切成 **256** 个 16 个查询 × 16 个键的小块，每块各自选择、合并；
        在这样短的长度下，大多数机器上它都比一次性为全部键打分 *更慢*，而这张表会告诉你你的机器能否分辨出来。
        分块的回报在内存上，适用于 $L\\times L$ 的得分矩阵放不下的长度（见第 4 节）。
        """,
        check="""
        assert (L // 16) ** 2 == 256
        for chunk, t in times.items():
            if chunk is None:
                continue
            gap, spread = t.median - times[None].median, t.iqr + times[None].iqr
            expected = "slower" if gap > spread else "faster" if -gap > spread else "within noise"
            assert verdict(t, times[None]) == expected == timings.set_index("chunk").verdict[chunk], (chunk, t)
        """,
    ),
    Md(
        en="""
        ## 3. Against fused dense attention

        Is PyTorch's fused dense attention (SDPA) faster than every top-k setting on your machine? Top-k
        in plain PyTorch runs several separate steps (score, select, gather, softmax) where SDPA runs one
        fused kernel that never writes the $L\\times L$ scores out (the FlashAttention idea of chapter 2).
        The cell answers for this device, with the same rule.
        """,
        zh="""
        ## 3. 与融合的稠密注意力比较

        在你的机器上，PyTorch 融合的稠密注意力（SDPA）是否比每一种 Top-k 设置都快？纯 PyTorch 实现的 Top-k
        要分好几步（打分、选择、收集、softmax），而 SDPA 只运行一个融合内核，从不把 $L\\times L$ 的得分写出来
        （即第 2 章的 FlashAttention 思路）。下面的单元格用同一条规则给出本设备上的答案。
        """,
    ),
    Code("""
        sdpa = timed(lambda: F.scaled_dot_product_attention(q, k, v))
        fastest = min(times, key=lambda c: times[c].median)
        sdpa_verdict = verdict(sdpa, times[fastest])
        print(tr(f"SDPA {sdpa.median * 1e3:.3f} ms (IQR {sdpa.iqr * 1e3:.3f}) vs the fastest top-k, C = {fastest or L}: "
                 f"{times[fastest].median * 1e3:.3f} ms (IQR {times[fastest].iqr * 1e3:.3f}); SDPA is {sdpa_verdict}",
                 f"SDPA {sdpa.median * 1e3:.3f} 毫秒（四分位距 {sdpa.iqr * 1e3:.3f}），最快的 Top-k（C = {fastest or L}）"
                 f"{times[fastest].median * 1e3:.3f} 毫秒（四分位距 {times[fastest].iqr * 1e3:.3f}）：SDPA {VERDICT[sdpa_verdict]}"))
    """),
    Md(
        en=r"""
        ## 4. The memory side, from the cost model

        Speed is machine-dependent; memory is arithmetic. Scoring all keys at once holds the $L\times L$
        scores of every head, while the streamed top-k holds one tile of $C$ keys plus the $k$ candidates
        of every query:

        $$
        \text{all scores: } O(L^2)\qquad\text{streamed: } O\big(L\,(k+C)\big)\qquad\text{per head}.
        $$

        The registry's cost model (`METHODS["topk"].cost`, the one the app uses to refuse settings before
        they exhaust memory) turns this into bytes. Take a longer case: $L=16384$, 8 heads, $D=64$,
        $k=64$, float32.
        """,
        zh=r"""
        ## 4. 内存的一面：看代价模型

        速度取决于机器，内存却只是算术。一次性为全部键打分要存下每个注意力头 $L\times L$ 的得分，
        而流式 Top-k 只需存一个 $C$ 个键的小块，外加每个查询的 $k$ 个候选：

        $$
        \text{全部得分：} O(L^2)\qquad\text{流式：} O\big(L\,(k+C)\big)\qquad\text{（每个注意力头）}.
        $$

        方法注册表中的代价模型（`METHODS["topk"].cost`，应用就是用它在设置耗尽内存之前拒绝这些设置的）
        把这个关系换算成字节数。看一个更长的例子：$L=16384$，8 个注意力头，$D=64$，$k=64$，float32。
        """,
    ),
    Code("""
        LONG = Shape(B=1, H=8, Hkv=8, Lq=16384, Lk=16384, D=64, Dv=64)
        memory_mib = {chunk: METHODS["topk"].cost(LONG, Config(top_k=64, chunk_size=chunk), 4).memory_bytes / 2**20
                      for chunk in (256, 1024, 4096, None)}
        print(tr("estimated memory (MiB) by chunk size: ", "各分块大小的内存估计（MiB）：")
              + str({chunk or LONG.Lk: round(m) for chunk, m in memory_mib.items()}))
    """),
    Claim(
        en="""
        At 16K tokens, scoring all keys at once needs about **28 GiB** (28704 MiB), more than most GPUs
        hold; streaming with C = 1024 needs **1920 MiB**, **15.0 ± 0.1** times less, close to
        $L/(k+C)=16384/1088=15.1$.
        """,
        zh="""
        在 16K 个词元时，一次性为全部键打分约需 **28 GiB**（28704 MiB），超过大多数 GPU 的显存；
        以 C = 1024 流式计算只需 **1920 MiB**；前者是后者的 **15.0 ± 0.1** 倍，接近 $L/(k+C)=16384/1088=15.1$。
        """,
        check="""
        assert round(memory_mib[None]) == 28704 and round(memory_mib[1024]) == 1920, memory_mib
        assert abs(memory_mib[None] / memory_mib[1024] - 15.0) < 0.1
        """,
    ),
    Md(
        en="""
        ## 5. Pick, and check the pick

        Take the fastest chunk size whose memory fits your budget (here all of them fit); where the table
        says "within noise", prefer the larger chunk, which does fewer tiles. Chunking changes how the work
        is done, never the answer: every setting must give the output of scoring all keys at once.
        """,
        zh="""
        ## 5. 选定设置，并检验所选

        在内存预算允许的分块大小中选出最快的（这里都放得下）；表中写着“在噪声范围内”的，优先选较大的分块，
        因为它的小块更少。分块只改变计算方式，从不改变结果：每种设置都必须给出与一次性为全部键打分相同的输出。
        """,
    ),
    Code("""
        reference = topk_attention(q, k, v, chosen_k)
        max_diff = max((topk_attention(q, k, v, chosen_k, chunk_size=c) - reference).abs().max().item() for c in (16, 64, 128))
        print(tr(f"chosen: k = {chosen_k}, chunk_size = {fastest}; largest difference between settings: {max_diff:.1e}",
                 f"选定：k = {chosen_k}，chunk_size = {fastest}；各设置之间的最大差异：{max_diff:.1e}"))
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
        For longer sequences, more heads or another dtype, run the same comparison from a shell in the
        repository's root directory; each case runs in a fresh process, so its peak memory is its own, and
        the report gives medians with their IQRs:

        ```
        python -m benchmarks topk --lengths 1024 4096 16384 --heads 8 --head-dim 64 --top-k 64 --chunk-size 1024
        ```
        """,
        zh="""
        若要测试更长的序列、更多的注意力头或其他数据类型，可在仓库根目录下的命令行中运行同样的比较；
        每个用例都在新的进程中运行，因此其峰值内存只属于它自己，报告给出中位数及其四分位距：

        ```
        python -m benchmarks topk --lengths 1024 4096 16384 --heads 8 --head-dim 64 --top-k 64 --chunk-size 1024
        ```
        """,
    ),
    Summary(
        en="""
        - Choose k from quality by the worst query: here k = 16 keeps at least 0.987 of every query's mass.
        - Report a timing as a median with its IQR, and call one setting faster only when the medians differ by
          more than the two IQRs together; otherwise they are within noise on this machine, now.
        - At short lengths small chunks cost time (C = 16 means 256 tiles at L = 256); chunks pay in memory,
          $O(L(k+C))$ against $O(L^2)$: 1920 MiB against 28704 MiB at 16K tokens.
        - A chunk size never changes the output (within 1e-5): tune it for speed and memory only.
        """,
        zh="""
        - 根据质量、按最差的查询选 k：这里 k = 16 让每个查询都至少保留 0.987 的权重。
        - 报告计时要给出中位数及其四分位距；只有当中位数之差超过两个四分位距之和时才说某个设置更快，否则就是在这台机器、此刻的噪声范围内。
        - 在短序列上，小分块要花时间（L = 256 时 C = 16 意味着 256 个小块）；分块的回报在内存上，$O(L(k+C))$ 对 $O(L^2)$：16K 个词元时为 1920 MiB 对 28704 MiB。
        - 分块大小从不改变输出（误差在 1e-5 以内）：只需为速度和内存调节它。
        """,
    ),
    References(items=(
        ("Hoefler, Belli. 2015. Scientific Benchmarking of Parallel Computing Systems: Twelve Ways to Tell the "
         "Masses when Reporting Performance Results. SC15", ""),
        ("PyTorch documentation: Benchmark Utils, torch.utils.benchmark",
         "https://pytorch.org/docs/stable/benchmark_utils.html"),
        ("Dao, Fu, Ermon, Rudra, Ré. 2022. FlashAttention: Fast and Memory-Efficient Exact Attention with "
         "IO-Awareness. arXiv:2205.14135", "https://arxiv.org/abs/2205.14135"),
    )),
    Exercises(items=(
        Exercise(
            en="""
            Redo section 1 with the *average* rule: the smallest k whose mass kept, averaged over all queries,
            reaches 90 %. Set `answer` to that k. What share of the queries keeps less than 90 % at that k?
            """,
            zh="""
            用 *平均值* 规则重做第 1 节：找出让所有查询平均的权重占比达到 90% 的最小 k，赋给 `answer`。
            在这个 k 下，有多大比例的查询保留不到 90%？
            """,
            hint_en="`kept[k]` holds the mass kept of every query for each k tried; take `.mean()` instead of `.min()`.",
            hint_zh="`kept[k]` 存有每个尝试过的 k 下每个查询的权重占比；用 `.mean()` 代替 `.min()`。",
            solution_en="""
            k = 4: the average mass kept is 0.95 there, but 15 % of the queries keep less than 90 % and the
            worst keeps 0.51. An average hides exactly the queries that fail; the worst-query rule needs k = 16.
            """,
            solution_zh="""
            k = 4：此时平均权重占比为 0.95，但有 15% 的查询保留不到 90%，最差的只有 0.51。平均值恰恰掩盖了出问题的查询；
            按最差查询的规则则需要 k = 16。
            """,
            self_check="""
            def check_ex1(answer):
                by_mean = min(kk for kk, m in kept.items() if m.mean() >= 0.9)
                assert answer == by_mean, tr(
                    f"k = {answer} is not the smallest k whose average mass kept reaches 90 %",
                    f"k = {answer} 不是平均权重占比达到 90% 的最小 k")
                below = (kept[answer] < 0.9).float().mean().item()
                print(tr(f"Right: k = {answer}, yet {below:.0%} of the queries keep less than 90 %.",
                         f"正确：k = {answer}，但仍有 {below:.0%} 的查询保留不到 90%。"))
            """,
            solution_code="""
            answer = min(kk for kk, m in kept.items() if m.mean() >= 0.9)
            print(tr("average mass kept: ", "平均权重占比：") + str({kk: round(m.mean().item(), 3) for kk, m in kept.items()}))
            check_ex1(answer)
            """,
            wrong_answer="chosen_k",
        ),
        Exercise(
            en="""
            Write `my_verdict(a, b)` for two `Timing`s (each has `.median` and `.iqr`), returning `"faster"`,
            `"slower"` or `"within noise"` by this chapter's rule, without looking at `verdict`. The check feeds
            it made-up timings.
            """,
            zh="""
            不看 `verdict`，自己编写 `my_verdict(a, b)`：输入两个 `Timing`（各有 `.median` 和 `.iqr`），
            按本章的规则返回 `"faster"`、`"slower"` 或 `"within noise"`。自测函数会用一些虚构的计时来检验它。
            """,
            hint_en="Compare the gap between the medians with the sum of the two IQRs, in both directions.",
            hint_zh="把两个中位数之差与两个四分位距之和比较，两个方向都要比。",
            solution_en="""
            The gap must beat both spreads together. A rule on medians alone calls 10 ms against 11 ms
            "faster" even when each has an IQR of 3 ms, and that verdict flips as soon as the machine gets
            busier; the IQRs are what make it stable.
            """,
            solution_zh="""
            差距必须超过两个波动之和。只看中位数的规则会把 10 毫秒对 11 毫秒判为“更快”，哪怕两者的四分位距都是 3 毫秒；
            机器一忙，这个结论就会反转。让结论稳定下来的正是四分位距。
            """,
            self_check="""
            from sparse_attn.timing import Timing


            def check_ex2(my_verdict):
                cases = [((10, 1), (20, 1), "faster"), ((20, 1), (10, 1), "slower"), ((10, 3), (11, 3), "within noise"),
                         ((11, 3), (10, 3), "within noise"), ((10, 0.5), (12, 1), "faster"), ((10, 1.5), (12, 1), "within noise")]
                for (ma, ia), (mb, ib), expected in cases:
                    got = my_verdict(Timing(ma, ia, []), Timing(mb, ib, []))
                    assert got == expected, tr(
                        f"median {ma} (IQR {ia}) against median {mb} (IQR {ib}): expected {expected!r}, got {got!r}",
                        f"中位数 {ma}（四分位距 {ia}）对中位数 {mb}（四分位距 {ib}）：应为 {expected!r}，得到 {got!r}")
                print(tr("Right: your rule agrees on every case.", "正确：你的规则在每个例子上都一致。"))
            """,
            solution_code="""
            def my_verdict(a, b):
                spread = a.iqr + b.iqr
                if b.median - a.median > spread:
                    return "faster"
                if a.median - b.median > spread:
                    return "slower"
                return "within noise"


            check_ex2(my_verdict)
            """,
            wrong_answer='lambda a, b: "faster" if a.median < b.median else "slower"',
        ),
        Exercise(
            en="""
            Your GPU leaves 2 GiB for attention. With section 4's long case, which is the largest chunk size in
            `(256, 1024, 4096)` whose estimated memory fits? Set `answer` to it.
            """,
            zh="""
            你的 GPU 为注意力留出了 2 GiB。对第 4 节的长序列例子，`(256, 1024, 4096)` 中内存估计放得下的最大分块大小是多少？
            把它赋给 `answer`。
            """,
            hint_en="`memory_mib` already holds the estimates in MiB; 2 GiB is 2048 MiB.",
            hint_zh="`memory_mib` 中已有以 MiB 为单位的估计；2 GiB 即 2048 MiB。",
            solution_en="""
            1024 (1920 MiB). 4096 would need 7296 MiB: the tile term $L\\cdot C$ grows with $C$, so a larger
            chunk is faster only until it no longer fits. Time the chunk sizes that fit, and pick among those.
            """,
            solution_zh="""
            1024（1920 MiB）。4096 需要 7296 MiB：小块一项 $L\\cdot C$ 随 $C$ 增长，所以更大的分块只在放得下之前才更快。
            只为放得下的分块大小计时，再从中挑选。
            """,
            self_check="""
            def check_ex3(answer):
                fits = [c for c in (256, 1024, 4096) if METHODS["topk"].cost(LONG, Config(top_k=64, chunk_size=c), 4).memory_bytes <= 2 * 2**30]
                assert answer in (256, 1024, 4096), tr("pick one of 256, 1024, 4096", "请从 256、1024、4096 中选一个")
                assert answer in fits, tr(f"C = {answer} needs more than 2 GiB", f"C = {answer} 需要超过 2 GiB")
                assert answer == max(fits), tr(f"C = {answer} fits, but a larger chunk size fits too",
                                              f"C = {answer} 放得下，但还有更大的分块大小也放得下")
                print(tr(f"Right: C = {answer}.", f"正确：C = {answer}。"))
            """,
            solution_code="""
            answer = max(c for c in (256, 1024, 4096) if memory_mib[c] <= 2048)
            check_ex3(answer)
            """,
            wrong_answer="4096",
        ),
    )),
]
