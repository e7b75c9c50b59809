"""Chapter 3: top-k selection against importance sampling: bias, variance, and the hybrid."""
from _cells import Claim, Code, Exercises, Md

NUMBER = 3
SLUG = "ch3_sampling"
TITLE = {"en": "Top-k or importance sampling: bias, variance, hybrid",
         "zh": "Top-k 还是重要性采样：偏差、方差与混合"}
TERMS = ["top-k selection", "importance sampling", "sample", "budget", "relative error", "dense attention", "key"]

CELLS = [
    Md(
        en="""
        **Top-k selection** and **importance sampling** both read a small budget of keys per query,
        but they make different mistakes. Top-k drops the tail every time, so its error is a
        *bias*: run it again and it repeats exactly. Importance sampling draws keys at random from a
        proposal and reweights each **sample** by (true weight / proposal probability); its error
        is mostly *variance*: it changes from run to run and averages away. The **hybrid** keeps the
        exact top keys and samples only the tail, as vAttention does.
        """,
        zh="""
        **Top-k 选择** 和 **重要性采样** 都只为每个查询读取少量（一定预算的）键，但它们犯的错误不同。
        Top-k 每次都丢掉尾部，所以它的误差是 *偏差*：再运行一次，结果完全重复。重要性采样按某个提议分布
        随机抽取键，并给每个 **样本** 乘上（真实权重 / 提议概率）；它的误差主要是 *方差*：每次运行都不同，
        平均之后会消失。**混合** 方法精确保留得分最高的键，只对尾部采样，vAttention 就是这样做的。
        """,
    ),
    Code("""
        import torch
        from sparse_attn import viz
        from sparse_attn.metrics import relative_error
        from sparse_attn.ops import dense_attention, sampled_attention, topk_attention
        from sparse_attn.sources import synthetic_qkv
        from sparse_attn.sweep import budget_sweep


        def tr(en, zh):
            \"\"\"Text in the notebook's language, for plot titles and axis labels.\"\"\"
            return zh if LANG == "zh" else en


        # A flat pattern: every key keeps a share of the mass, the hard case for any budget.
        q, k, v = synthetic_qkv("flat", heads=1, length=256, head_dim=32, seed=0)
        ref = dense_attention(q, k, v)


        def err(out):
            \"\"\"Relative error against dense attention, averaged over query rows.\"\"\"
            return relative_error(out, ref).mean().item()
    """),
    Md(
        en="""
        ## 1. Bias and variance, measured

        Run each method 16 times with different random seeds, at a budget of 16 keys per query.
        For each, compare the **relative error** against **dense attention** of one run with that of
        the *average* of the 16 outputs.
        """,
        zh="""
        ## 1. 实测偏差与方差

        在每个查询 16 个键的预算下，用 16 个不同的随机种子把每种方法各运行 16 次。比较单次运行相对于
        **稠密注意力** 的 **相对误差** 与 16 个输出 *取平均* 后的相对误差。
        """,
    ),
    Code("""
        runs = 16
        sampled = torch.stack([sampled_attention(q, k, v, 16, proposal="uniform",
                                                 generator=torch.Generator().manual_seed(s)) for s in range(runs)])
        topk = torch.stack([topk_attention(q, k, v, 16) for _ in range(runs)])

        single_sampled = sum(err(o) for o in sampled) / runs
        averaged_sampled = err(sampled.mean(0))
        single_topk, averaged_topk = err(topk[0]), err(topk.mean(0))
        print(f"top-k:    one run {single_topk:.3f}, average of {runs} runs {averaged_topk:.3f}")
        print(f"sampling: one run {single_sampled:.3f}, average of {runs} runs {averaged_sampled:.3f}")
    """),
    Claim(
        en="""
        Top-k's 16 runs are **identical**, so averaging them changes nothing. Averaging 16 sampled
        runs cuts the error by **more than 2.5x** (pure variance would give √16 = 4x): most of the
        sampling error is variance.
        """,
        zh="""
        Top-k 的 16 次运行 **完全相同**，取平均毫无变化。对 16 次采样运行取平均，误差下降 **超过 2.5 倍**
        （纯方差时应为 √16 = 4 倍）：采样误差的大部分是方差。
        """,
        check="""
        assert torch.equal(topk.min(0).values, topk.max(0).values) and averaged_topk == single_topk
        assert single_sampled / averaged_sampled > 2.5, (single_sampled, averaged_sampled)
        """,
    ),
    Md(
        en="""
        Variance shrinks with more samples: a standard deviation falls as 1/√n, so four times the
        samples should halve a single run's error.
        """,
        zh="""
        样本越多，方差越小：标准差按 1/√n 下降，所以样本数变为四倍，单次运行的误差应减半。
        """,
    ),
    Code("""
        def sampled_error(n, seeds=range(4)):
            return sum(err(sampled_attention(q, k, v, n, proposal="uniform", generator=torch.Generator().manual_seed(s)))
                       for s in seeds) / len(seeds)


        halving = sampled_error(64) / sampled_error(16)
        print(f"error with 64 samples / error with 16 samples = {halving:.2f}")
    """),
    Claim(
        en="Going from 16 to 64 samples multiplies the error by **between 0.35 and 0.65**, close to the 1/√4 = 0.5 of pure variance.",
        zh="样本从 16 个增加到 64 个，误差乘以 **0.35 到 0.65 之间** 的系数，接近纯方差的 1/√4 = 0.5。",
        check="""
        assert 0.35 < halving < 0.65, halving
        """,
    ),
    Md(
        en="""
        ## 2. Which wins at a fixed budget?

        One run is what a model gets, so compare single runs at equal budgets. `budget_sweep` runs
        each method at each budget (sampling over 3 seeds) on a retrieval pattern: each query
        matches 3 keys, and the rest of its mass is spread over the tail. The hybrid spends half
        the budget on exact top keys and samples the other half from the tail. Both sampling
        methods draw from the uniform proposal here (`proposals=["uniform"]`); the sweep runs them
        once per proposal it is given, and labels each line with its method and proposal.
        """,
        zh="""
        ## 2. 固定预算下谁更好？

        模型拿到的只是一次运行，所以在相同预算下比较单次运行。`budget_sweep` 在检索模式上对每种方法、
        每个预算各运行一次（采样方法取 3 个种子）：每个查询与 3 个键匹配，其余质量分散在尾部。混合方法
        把一半预算用于精确的最高分键，另一半用于从尾部采样。这里两种采样方法都从均匀提议分布中抽取
        （`proposals=["uniform"]`）；给出几个提议分布，扫描就对每个分布各运行一次，并用方法和提议分布为每条线命名。
        """,
    ),
    Code("""
        qr, kr, vr = synthetic_qkv("retrieval", heads=1, length=256, head_dim=32, seed=0, strength=6.0)
        sweep = budget_sweep(qr, kr, vr, ["topk", "hybrid", "sampling"], [8, 16, 32], proposals=["uniform"],
                             seeds=range(3))
        # One line per method and proposal ("" for top-k, which reads none).
        sweep["series"] = [f"{m} ({p})" if p else m for m, p in zip(sweep.method, sweep.proposal)]
        names = {"topk": tr("top-k", "Top-k"),
                 "hybrid (uniform)": tr("hybrid (top-k + sampled tail)", "混合（Top-k + 尾部采样）"),
                 "sampling (uniform)": tr("importance sampling (uniform)", "重要性采样（均匀）")}
        viz.budget_curve(sweep, x="budget", y="error_mean", color="series", names=names, lang=LANG).show()
        errors = sweep.pivot(index="budget", columns="series", values="error_mean")
        errors
    """),
    Claim(
        en="""
        At every budget the hybrid's error is **less than half** of plain sampling's: keeping the
        few heavy keys exactly removes most of the variance. On these inputs top-k is **lower still**
        at every budget: its bias (the dropped tail) is smaller than the hybrid's variance.
        """,
        zh="""
        在每个预算下，混合方法的误差都 **不到** 纯采样的 **一半**：精确保留少数几个重要的键去掉了大部分方差。
        在这些输入上，Top-k 在每个预算下的误差 **更低**：它的偏差（丢掉的尾部）比混合方法的方差小。
        """,
        check="""
        assert (errors["hybrid (uniform)"] < errors["sampling (uniform)"] / 2).all(), errors
        assert (errors["topk"] < errors["hybrid (uniform)"]).all(), errors
        """,
    ),
    Md(
        en="""
        So why sample at all? Because top-k's error never averages out, while a sampled estimate
        is consistent: its error keeps shrinking as the samples grow (section 1). Which one wins at
        a given budget depends on how much mass the tail holds, which is what the exercises explore.
        """,
        zh="""
        那为什么还要采样？因为 Top-k 的误差永远不会被平均掉，而采样估计是一致的：样本越多，误差越小
        （见第 1 节）。在给定预算下谁更好，取决于尾部有多少质量，这正是练习要探究的。
        """,
    ),
    Exercises(
        en=(
            "Rerun section 2 with `strength=4.0` and with `strength=8.0`. How does the gap between top-k and the hybrid change as the tail gets heavier?",
            "Add `\"lsh\"` and `\"oracle\"` to the sweep's `proposals`. Which proposal comes closest to top-k, and what does the oracle need that a real kernel does not have?",
            "Repeat section 1 with `topk_attention(q, k, v, 16)` replaced by the hybrid `sampled_attention(q, k, v, 8, top_k=8, ...)`. How much of its error is variance?",
        ),
        zh=(
            "用 `strength=4.0` 和 `strength=8.0` 重做第 2 节。尾部变重时，Top-k 与混合方法之间的差距如何变化？",
            "在预算扫描的 `proposals` 中加入 `\"lsh\"` 和 `\"oracle\"`。哪种提议分布最接近 Top-k？oracle 需要什么真实内核没有的东西？",
            "把第 1 节中的 `topk_attention(q, k, v, 16)` 换成混合方法 `sampled_attention(q, k, v, 8, top_k=8, ...)` 再做一遍。它的误差中有多少是方差？",
        ),
    ),
]
