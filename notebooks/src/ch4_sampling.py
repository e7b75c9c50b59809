"""Chapter 4: top-k selection against importance sampling: the estimator, bias and variance, the hybrid, LSH."""
from _cells import Claim, Code, Exercise, Exercises, Md, Objectives, References, Summary

NUMBER = 4
SLUG = "ch4_sampling"
TITLE = {"en": "Top-k or importance sampling: bias, variance, hybrid",
         "zh": "Top-k 还是重要性采样：偏差、方差与混合"}
TERMS = ["top-k selection", "importance sampling", "self-normalised estimator", "sample", "budget",
         "relative error", "dense attention", "key", "mass kept", "attention sink"]

CELLS = [
    Objectives(
        en=(
            "write dense attention as an expectation and derive the self-normalised importance-sampling "
            "estimator from it, then compute its weights by hand and match the library's;",
            "explain why relative errors exceed 1 on near-uniform rows, and predict them with $\\sqrt{L/n-1}$;",
            "separate bias from variance by measurement: averaging runs, growing the sample;",
            "say, with numbers, where the hybrid (vAttention) beats top-k at an equal budget, where it does "
            "not, and what an LSH proposal (MagicPIG) buys.",
        ),
        zh=(
            "把稠密注意力写成一个期望，由此推导自归一化重要性采样估计量，并亲手算出它的权重、与库的结果对照；",
            "解释为什么在近乎均匀的注意力行上相对误差会超过 1，并用 $\\sqrt{L/n-1}$ 预测它；",
            "通过实测区分偏差与方差：对多次运行取平均，以及增加样本数；",
            "用数字说明：在相同预算下，混合方法（vAttention）在什么输入上胜过 Top-k、在什么输入上不如它，"
            "以及 LSH 提议分布（MagicPIG）带来了什么。",
        ),
    ),
    Md(
        en=r"""
        ## Why sample at all?

        Chapter 3's **top-k selection** keeps the $k$ highest scores of each query and renormalises.
        Write a query's scores as $s_j = q\cdot k_j/\sqrt{D}$ over its $L$ keys. Dense attention and
        top-k are

        $$
        o=\sum_{j=1}^{L} p_j v_j,\qquad p_j=\frac{e^{s_j}}{Z},\qquad Z=\sum_{l=1}^{L} e^{s_l};
        \qquad\qquad
        o_{\text{top-}k}=\frac{\sum_{j\in T} e^{s_j} v_j}{\sum_{j\in T} e^{s_j}},
        $$

        with $T$ the $k$ keys of highest score. Top-k throws away the tail's mass
        $1-\sum_{j\in T}p_j$ on every run: its error is a **bias**, and rerunning repeats it exactly.
        Two costs also stay: choosing $T$ needs all $L$ scores, and a tail made of many small weights
        can hold a large share of the mass.

        **Importance sampling** starts from another view of the same sum. $o$ is an expectation,
        $o=\mathbb{E}_{j\sim p}[v_j]$. We cannot draw from $p$ without every score, but we can draw
        $n$ keys $j_1,\dots,j_n$ from a cheaper *proposal* $\pi$ and correct each **sample** by how
        much more (or less) likely $p$ would have made it:

        $$
        \hat o=\sum_{i=1}^{n} w_i\, v_{j_i},\qquad
        w_i=\frac{e^{s_{j_i}}}{n\,\pi_{j_i}\,\hat Z},\qquad
        \hat Z=\frac{1}{n}\sum_{i=1}^{n}\frac{e^{s_{j_i}}}{\pi_{j_i}}.
        $$

        $\hat Z$ is an unbiased estimate of $Z$, and $\frac1n\sum_i \frac{e^{s_{j_i}}}{\pi_{j_i}}v_{j_i}$ is one
        of $\sum_j e^{s_j}v_j$; $\hat o$ is their ratio. It is the **self-normalised estimator**: its weights sum to 1,
        its bias shrinks like $1/n$ and its spread like $1/\sqrt n$, so its error is mostly
        *variance*, which averages away. The **hybrid** (as in vAttention) keeps the exact top keys
        $T$ and samples only the tail $R$, so the few heavy keys contribute no variance:

        $$
        \hat o_{\text{hybrid}}=\frac{\sum_{j\in T} e^{s_j}v_j+\frac1n\sum_{i=1}^{n}\frac{e^{s_{j_i}}}{\pi_{j_i}}v_{j_i}}
        {\sum_{j\in T} e^{s_j}+\frac1n\sum_{i=1}^{n}\frac{e^{s_{j_i}}}{\pi_{j_i}}},\qquad j_i\in R,\ j_i\sim\pi.
        $$

        In this chapter a **budget** is the number of keys whose score and value a query reads: $k$ for
        top-k, $n$ for sampling, $|T|+n$ for the hybrid.
        """,
        zh=r"""
        ## 为什么要采样？

        第 3 章的 **Top-k 选择** 为每个查询保留得分最高的 $k$ 个键，再重新归一化。记一个查询对它的
        $L$ 个键的得分为 $s_j = q\cdot k_j/\sqrt{D}$，稠密注意力和 Top-k 分别是

        $$
        o=\sum_{j=1}^{L} p_j v_j,\qquad p_j=\frac{e^{s_j}}{Z},\qquad Z=\sum_{l=1}^{L} e^{s_l};
        \qquad\qquad
        o_{\text{top-}k}=\frac{\sum_{j\in T} e^{s_j} v_j}{\sum_{j\in T} e^{s_j}},
        $$

        其中 $T$ 是得分最高的 $k$ 个键。Top-k 每次运行都丢掉尾部的权重 $1-\sum_{j\in T}p_j$：
        它的误差是 **偏差**，重跑一遍只会原样重复。另外还有两笔代价始终存在：选出 $T$ 需要全部 $L$ 个得分；
        而由许多小权重组成的尾部，加起来可能占很大比例。

        **重要性采样** 换一个角度看同一个求和。$o$ 是一个期望，$o=\mathbb{E}_{j\sim p}[v_j]$。不算出全部得分，
        就无法按 $p$ 抽样；但我们可以按一个更便宜的 *提议分布* $\pi$ 抽取 $n$ 个键 $j_1,\dots,j_n$，
        再按 $p$ 与 $\pi$ 的比值修正每个 **样本**：

        $$
        \hat o=\sum_{i=1}^{n} w_i\, v_{j_i},\qquad
        w_i=\frac{e^{s_{j_i}}}{n\,\pi_{j_i}\,\hat Z},\qquad
        \hat Z=\frac{1}{n}\sum_{i=1}^{n}\frac{e^{s_{j_i}}}{\pi_{j_i}}.
        $$

        $\hat Z$ 是 $Z$ 的无偏估计，$\frac1n\sum_i \frac{e^{s_{j_i}}}{\pi_{j_i}}v_{j_i}$ 是 $\sum_j e^{s_j}v_j$
        的无偏估计，$\hat o$ 就是两者之比，即 **自归一化估计量**：权重之和为 1，偏差按 $1/n$ 缩小，波动按 $1/\sqrt n$ 缩小，因此它的误差主要是
        *方差*，可以靠平均消掉。**混合** 方法（vAttention 的做法）精确保留得分最高的键 $T$，只对尾部 $R$
        采样，这样少数几个重要的键就不带来任何方差：

        $$
        \hat o_{\text{hybrid}}=\frac{\sum_{j\in T} e^{s_j}v_j+\frac1n\sum_{i=1}^{n}\frac{e^{s_{j_i}}}{\pi_{j_i}}v_{j_i}}
        {\sum_{j\in T} e^{s_j}+\frac1n\sum_{i=1}^{n}\frac{e^{s_{j_i}}}{\pi_{j_i}}},\qquad j_i\in R,\ j_i\sim\pi.
        $$

        本章所说的 **预算**，是一个查询读取其得分和值的键的个数：Top-k 是 $k$，采样是 $n$，混合方法是 $|T|+n$。
        """,
    ),
    Code("""
        import math

        import pandas as pd
        import torch
        from sparse_attn import viz
        from sparse_attn.metrics import relative_error
        from sparse_attn.ops import dense_attention, sampled_attention, topk_attention
        from sparse_attn.sources import synthetic_qkv
        from sparse_attn.sweep import budget_sweep


        def tr(en, zh):
            \"\"\"Text in the notebook's language, for printouts, plot titles and axis labels.\"\"\"
            return zh if LANG == "zh" else en


        def seeded(seed):
            \"\"\"A generator for reproducible draws.\"\"\"
            return torch.Generator().manual_seed(seed)


        # A flat pattern: logits with standard deviation 0.25, so every key keeps a share of the mass.
        # Values are Gaussian noise, as in every synthetic pattern.
        L, D = 256, 32
        q, k, v = synthetic_qkv("flat", heads=1, length=L, head_dim=D, seed=0)
        ref = dense_attention(q, k, v)


        def err(out, ref=ref):
            \"\"\"Relative error against dense attention, averaged over query rows.\"\"\"
            return relative_error(out, ref).mean().item()
    """),
    Md(
        en="""
        ## 1. The estimator, from scratch

        Draw $n=16$ keys per query from the uniform proposal $\\pi_j=1/L$ and weight each draw by the
        formula above. The library's `sampled_attention(..., return_selection=True)` returns the keys
        it drew and the weights it gave them, so we can recompute its weights by hand on the same draws.
        """,
        zh="""
        ## 1. 从零实现估计量

        为每个查询从均匀提议分布 $\\pi_j=1/L$ 中抽取 $n=16$ 个键，并按上面的公式给每次抽样加权。
        库函数 `sampled_attention(..., return_selection=True)` 会返回它抽到的键和赋予它们的权重，
        因此我们可以在同一批抽样上亲手重算这些权重。
        """,
    ),
    Code("""
        n = 16
        out, sel = sampled_attention(q, k, v, n, proposal="uniform", generator=seeded(0), return_selection=True)
        s = q[0, 0] @ k[0, 0].T / math.sqrt(D)   # (L, L): s[i, j], the score of key j for query i
        drawn = sel.indices[0, 0]                # (L, n): the keys drawn for each query
        pi = torch.full((L,), 1 / L)             # the uniform proposal
        ratio = s.gather(1, drawn).exp() / pi[drawn]   # e^{s_j} / pi_j, one per draw
        z_hat = ratio.mean(-1, keepdim=True)           # Z-hat
        w = ratio / (n * z_hat)                        # e^{s_j} / (n pi_j Z-hat)
        o_hat = torch.einsum("is,isd->id", w, v[0, 0][drawn])
        z_ratio = z_hat[:, 0] / s.exp().sum(-1)        # Z-hat / Z, one per query
        print(tr(f"largest weight difference from the library: {(w - sel.weights[0, 0]).abs().max():.1e}",
                 f"与库的权重最大相差：{(w - sel.weights[0, 0]).abs().max():.1e}"))
        print(tr(f"Z-hat / Z over the {L} queries: mean {z_ratio.mean():.3f}, from {z_ratio.min():.2f} to {z_ratio.max():.2f}",
                 f"{L} 个查询上的 Z-hat / Z：平均 {z_ratio.mean():.3f}，范围 {z_ratio.min():.2f} 到 {z_ratio.max():.2f}"))
    """),
    Claim(
        en="""
        Our weights equal the library's to **1e-6**, sum to 1 in every row, and give its output to
        **1e-5**. $\\hat Z$ is unbiased: one query's $\\hat Z/Z$ is off by as much as 20 %, but over
        the 256 queries it averages **0.998, within 0.01 of 1**.
        """,
        zh="""
        我们算出的权重与库的权重相差在 **1e-6** 以内，每一行之和都为 1，给出的输出与库相差在 **1e-5** 以内。
        $\\hat Z$ 是无偏的：单个查询的 $\\hat Z/Z$ 可能偏离多达 20%，但 256 个查询的平均值为
        **0.998，与 1 相差不到 0.01**。
        """,
        check="""
        assert torch.allclose(w, sel.weights[0, 0], atol=1e-6)
        assert torch.allclose(w.sum(-1), torch.ones(L), atol=1e-6)
        assert torch.allclose(o_hat, out[0, 0], atol=1e-5)
        assert abs(z_ratio.mean().item() - 1) < 0.01, z_ratio.mean()
        assert 0.1 < (z_ratio - 1).abs().max().item() < 0.25, z_ratio
        """,
    ),
    Md(
        en=r"""
        ## 2. Why the errors on this input exceed 1

        Before comparing methods, look at the yardstick. The **relative error**
        $\lVert \hat o-o\rVert/\lVert o\rVert$ divides by the size of the dense output, and on this
        flat pattern that output is tiny. With nearly equal weights $o\approx\frac1L\sum_j v_j$, the
        mean of $L$ independent noise vectors, so $\lVert o\rVert\approx\sqrt{D/L}$, while each value has
        $\lVert v_j\rVert\approx\sqrt D$: the values almost cancel. Any method that averages $n$
        distinct values instead of all $L$ misses by $\mathbb E\lVert \bar v_n-o\rVert^2\approx D(1/n-1/L)$,
        hence

        $$
        \text{relative error}\approx\sqrt{\frac{D\,(1/n-1/L)}{D/L}}=\sqrt{\frac{L}{n}-1}.
        $$

        The trivial answer $\hat o=0$ has relative error exactly 1, so it is the line to beat.
        """,
        zh=r"""
        ## 2. 为什么这个输入上的误差会超过 1

        比较各种方法之前，先看看量尺本身。**相对误差** $\lVert \hat o-o\rVert/\lVert o\rVert$ 要除以稠密输出的大小，
        而在这个平坦模式上，稠密输出非常小。权重几乎相等时 $o\approx\frac1L\sum_j v_j$，即 $L$
        个独立噪声向量的平均，所以 $\lVert o\rVert\approx\sqrt{D/L}$；而每个值向量的长度 $\lVert v_j\rVert\approx\sqrt D$：
        这些值几乎相互抵消。任何只对 $n$ 个不同的值取平均、而不是对全部 $L$ 个取平均的方法，其误差满足
        $\mathbb E\lVert \bar v_n-o\rVert^2\approx D(1/n-1/L)$，因此

        $$
        \text{相对误差}\approx\sqrt{\frac{D\,(1/n-1/L)}{D/L}}=\sqrt{\frac{L}{n}-1}.
        $$

        平凡的答案 $\hat o=0$ 的相对误差恰好是 1，这就是要超过的基准线。
        """,
    ),
    Code("""
        v_norm = v.norm(dim=-1).mean().item()
        o_norm = ref.norm(dim=-1).mean().item()
        zero_error = err(torch.zeros_like(ref))
        topk16_error = err(topk_attention(q, k, v, 16))
        sampled16_error = sum(err(sampled_attention(q, k, v, 16, proposal="uniform", generator=seeded(s)))
                              for s in range(4)) / 4
        print(tr(f"|v| = {v_norm:.2f} (sqrt(D) = {math.sqrt(D):.2f}); |o| = {o_norm:.3f} (sqrt(D/L) = {math.sqrt(D / L):.3f})",
                 f"|v| = {v_norm:.2f}（sqrt(D) = {math.sqrt(D):.2f}）；|o| = {o_norm:.3f}（sqrt(D/L) = {math.sqrt(D / L):.3f}）"))
        print(tr(f"relative error: zero output {zero_error:.2f}, top-16 {topk16_error:.2f} "
                 f"(sqrt(L/16 - 1) = {math.sqrt(L / 16 - 1):.2f}), 16 uniform samples {sampled16_error:.2f}",
                 f"相对误差：全零输出 {zero_error:.2f}，Top-16 {topk16_error:.2f}"
                 f"（sqrt(L/16 - 1) = {math.sqrt(L / 16 - 1):.2f}），16 个均匀样本 {sampled16_error:.2f}"))
    """),
    Claim(
        en="""
        The dense output's norm is **0.34, within 0.02 of $\\sqrt{D/L}=0.354$**, against **5.6** for a
        value vector ($\\sqrt D=5.66$). Top-16's error, **3.88, is within 0.1 of $\\sqrt{15}=3.87$**:
        on a flat row top-k is in effect an arbitrary choice of 16 keys. Sampling with replacement
        does a little worse (**4.2**, near $\\sqrt{L/n}=4$). At this budget both are further from
        dense attention than answering zero: a flat pattern is a stress test for comparing methods,
        not a regime where 16 keys can serve.
        """,
        zh="""
        稠密输出的范数为 **0.34，与 $\\sqrt{D/L}=0.354$ 相差不到 0.02**，而一个值向量的范数为 **5.6**
        （$\\sqrt D=5.66$）。Top-16 的误差为 **3.88，与 $\\sqrt{15}=3.87$ 相差不到 0.1**：在平坦的行上，
        Top-k 实际上等于随意挑了 16 个键。有放回采样稍差一些（**4.2**，接近 $\\sqrt{L/n}=4$）。
        在这个预算下，两者离稠密注意力都比全零输出还远：平坦模式适合用来比较方法的优劣，
        而不是一个 16 个键就够用的场景。
        """,
        check="""
        assert abs(o_norm - math.sqrt(D / L)) < 0.02 and abs(v_norm - math.sqrt(D)) < 0.1, (o_norm, v_norm)
        assert zero_error == 1.0
        assert abs(topk16_error - math.sqrt(L / 16 - 1)) < 0.1, topk16_error
        assert abs(sampled16_error - math.sqrt(L / 16)) < 0.4, sampled16_error
        """,
    ),
    Md(
        en=r"""
        ## 3. Bias and variance, measured

        The mean squared error splits as $\mathbb E\lVert\hat o-o\rVert^2=\lVert\mathbb E\hat o-o\rVert^2+\mathbb E\lVert\hat o-\mathbb E\hat o\rVert^2$:
        bias squared plus variance. Averaging $R$ independent runs leaves the bias and divides the
        variance by $R$. So run each method 16 times with different seeds, at a budget of 16 keys,
        and compare the error of one run with the error of the average of the 16 outputs.
        """,
        zh=r"""
        ## 3. 实测偏差与方差

        均方误差可以分解为 $\mathbb E\lVert\hat o-o\rVert^2=\lVert\mathbb E\hat o-o\rVert^2+\mathbb E\lVert\hat o-\mathbb E\hat o\rVert^2$，
        即偏差的平方加上方差。对 $R$ 次独立运行取平均，偏差不变，方差变为原来的 $1/R$。
        下面在每个查询 16 个键的预算下，用 16 个不同的随机种子把每种方法各运行 16 次，
        比较单次运行的误差与 16 个输出取平均后的误差。
        """,
    ),
    Code("""
        runs = 16
        sampled = torch.stack([sampled_attention(q, k, v, 16, proposal="uniform", generator=seeded(s))
                               for s in range(runs)])
        topk = torch.stack([topk_attention(q, k, v, 16) for _ in range(runs)])

        single_sampled = sum(err(o) for o in sampled) / runs
        averaged_sampled = err(sampled.mean(0))
        single_topk, averaged_topk = err(topk[0]), err(topk.mean(0))
        print(tr(f"top-k:    one run {single_topk:.3f}, average of {runs} runs {averaged_topk:.3f}",
                 f"Top-k：单次 {single_topk:.3f}，{runs} 次平均 {averaged_topk:.3f}"))
        print(tr(f"sampling: one run {single_sampled:.3f}, average of {runs} runs {averaged_sampled:.3f} "
                 f"(divided by {single_sampled / averaged_sampled:.2f})",
                 f"采样：单次 {single_sampled:.3f}，{runs} 次平均 {averaged_sampled:.3f}"
                 f"（缩小为 1/{single_sampled / averaged_sampled:.2f}）"))
    """),
    Claim(
        en="""
        Top-k's 16 runs are **identical**, so averaging them changes nothing: all of its error is bias.
        Averaging 16 sampled runs divides the error by **3.99, within 0.2 of $\\sqrt{16}=4$**. That is
        exactly what pure variance predicts: the runs' errors are independent and centred, so the norm
        of their mean shrinks as $1/\\sqrt{R}$; the estimator's $O(1/n)$ bias is too small to see here.
        """,
        zh="""
        Top-k 的 16 次运行 **完全相同**，取平均毫无变化：它的误差全是偏差。对 16 次采样运行取平均，
        误差缩小为原来的 **1/3.99，与 $\\sqrt{16}=4$ 相差不到 0.2**。这正是纯方差给出的预测：
        各次运行的误差相互独立、均值为零，它们平均值的范数按 $1/\\sqrt{R}$ 缩小；估计量 $O(1/n)$
        的偏差在这里小到看不出来。
        """,
        check="""
        assert torch.equal(topk.min(0).values, topk.max(0).values) and averaged_topk == single_topk
        assert abs(single_sampled / averaged_sampled - 4) < 0.2, (single_sampled, averaged_sampled)
        """,
    ),
    Md(
        en="""
        The same law acts inside one run: the spread of a mean of $n$ draws falls as $1/\\sqrt n$, so
        four times the samples should halve a single run's error.
        """,
        zh="""
        同样的规律也作用在单次运行之内：$n$ 次抽样的平均值，其波动按 $1/\\sqrt n$ 缩小，
        所以样本数变为四倍，单次运行的误差应当减半。
        """,
    ),
    Code("""
        def sampled_error(num_samples, seeds=range(4)):
            return sum(err(sampled_attention(q, k, v, num_samples, proposal="uniform", generator=seeded(s)))
                       for s in seeds) / len(seeds)


        halving = sampled_error(64) / sampled_error(16)
        print(tr(f"error with 64 samples / error with 16 samples = {halving:.3f}",
                 f"64 个样本的误差 / 16 个样本的误差 = {halving:.3f}"))
    """),
    Claim(
        en="Going from 16 to 64 samples multiplies the error by **0.498, within 0.05 of $1/\\sqrt4=0.5$**.",
        zh="样本从 16 个增加到 64 个，误差乘以 **0.498，与 $1/\\sqrt4=0.5$ 相差不到 0.05**。",
        check="""
        assert abs(halving - 0.5) < 0.05, halving
        """,
    ),
    Md(
        en="""
        ## 4. Which wins at a fixed budget?

        A model gets one run, not an average, so compare single runs at equal budgets. `budget_sweep`
        runs each method at each budget (the sampling methods over 3 seeds) and reports the mean error
        and the **mass kept**, the share of the dense weights on the keys a method read. The hybrid
        spends half the budget on exact top keys and draws the other half uniformly from the tail,
        as vAttention does. Two inputs:

        - **retrieval**: each query matches 3 keys, and the rest of its mass is spread over the tail;
        - **sinks plus a flat tail**: 4 **attention sink** keys that every query sees strongly (they
          hold 76 % of each row) and 508 keys sharing the other 24 % almost evenly, a shape real
          heads often have (chapter 6 finds sinks in a small real model).
        """,
        zh="""
        ## 4. 固定预算下谁更好？

        模型拿到的只是一次运行的结果，而不是平均值，所以要在相同预算下比较单次运行。`budget_sweep`
        在每个预算下运行每种方法（采样类方法取 3 个种子），报告平均误差和 **权重占比**，
        即方法读到的键在稠密注意力权重中所占的比例。混合方法把一半预算用于精确保留得分最高的键，
        另一半从尾部均匀抽样，与 vAttention 的做法相同。我们看两个输入：

        - **检索模式**：每个查询与 3 个键匹配，其余权重分散在尾部；
        - **汇点加平坦尾部**：4 个每个查询都强烈关注的 **注意力汇点**（占每行权重的 76%），其余 508 个键几乎平分剩下的 24%，真实的注意力头常有这种形状（第 6 章会在一个小型真实模型中找到汇点）。
        """,
    ),
    Code("""
        BUDGETS = [8, 16, 32, 64]
        NAMES = {"topk": tr("top-k", "Top-k"),
                 "hybrid": tr("hybrid (top-k + sampled tail)", "混合（Top-k + 尾部采样）"),
                 "sampling": tr("importance sampling (uniform)", "重要性采样（均匀）")}


        def log_ticks(values):
            \"\"\"Labelled ticks for a log axis: 1, 2, 5 (and 1.5, 3, 4, 7 within one decade) times a power of ten.\"\"\"
            lo, hi = min(values) / 1.2, max(values) * 1.2
            steps = (1, 2, 5) if hi / lo > 10 else (1, 1.5, 2, 3, 4, 5, 7)
            ticks = [m * 10.0 ** e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1) for m in steps]
            ticks = [t for t in ticks if lo <= t <= hi]
            return dict(range=[math.log10(lo), math.log10(hi)], tickvals=ticks, ticktext=[f"{t:g}" for t in ticks])


        def sweep_figure(sweep, title):
            fig = viz.budget_curve(sweep, x="budget", y="error_mean", color="method", names=NAMES, title=title,
                                   x_title=tr("budget (keys read per query)", "预算（每个查询读取的键数）"),
                                   y_title=tr("relative error", "相对误差"), lang=LANG)
            fig.update_xaxes(tickvals=BUDGETS, ticktext=[str(b) for b in BUDGETS])
            return fig.update_yaxes(**log_ticks(sweep.error_mean))


        qr, kr, vr = synthetic_qkv("retrieval", heads=1, length=256, head_dim=32, seed=0, strength=6.0)
        retrieval = budget_sweep(qr, kr, vr, ["topk", "hybrid", "sampling"], BUDGETS, proposals=["uniform"], seeds=range(3))
        sweep_figure(retrieval, tr("Retrieval: 3 matching keys per query", "检索模式：每个查询有 3 个匹配的键")).show()
        retrieval_errors = retrieval.pivot(index="budget", columns="method", values="error_mean")
        retrieval_errors[["topk", "hybrid", "sampling"]].rename(columns=NAMES).rename_axis(
            index=tr("budget", "预算"), columns=None).round(3)
    """),
    Claim(
        en="""
        On retrieval, **top-k has the lowest error at every budget** (0.30 against the hybrid's 0.66 at
        16 keys), and the hybrid's error is **under half** of plain sampling's at every budget: keeping
        the heavy keys exactly removes most of the variance, but here the tail is not worth the half of
        the budget the hybrid spends on it.
        """,
        zh="""
        在检索模式上，**Top-k 在每个预算下误差都最低**（16 个键时为 0.30，混合方法为 0.66）；
        而混合方法的误差在每个预算下都 **不到** 纯采样的 **一半**：精确保留重要的键去掉了大部分方差，
        但在这里，尾部不值得混合方法为它花掉一半预算。
        """,
        check="""
        e = retrieval_errors
        assert (e["topk"] < e["hybrid"]).all() and (e["hybrid"] < e["sampling"] / 2).all(), e
        assert abs(e.loc[16, "topk"] - 0.30) < 0.03 and abs(e.loc[16, "hybrid"] - 0.66) < 0.05, e
        """,
    ),
    Code("""
        qs, ks, vs = synthetic_qkv("sink_local", heads=1, length=512, head_dim=32, seed=0, sink_strength=6.0, strength=0.5)
        sinks_ref, sinks_weights = dense_attention(qs, ks, vs, return_weights=True)
        sink_mass = sinks_weights[..., :4].sum(-1).mean().item()
        sinks = budget_sweep(qs, ks, vs, ["topk", "hybrid"], BUDGETS, proposals=["uniform"], seeds=range(3))
        sweep_figure(sinks, tr("4 attention sinks plus a flat tail (L = 512)", "4 个注意力汇点加平坦尾部（L = 512）")).show()
        sinks_errors = sinks.pivot(index="budget", columns="method", values="error_mean")
        sinks_mass = sinks.pivot(index="budget", columns="method", values="mass_kept_mean")
        print(tr(f"mass on the 4 sinks: {sink_mass:.3f}", f"4 个汇点的权重占比：{sink_mass:.3f}"))
        pd.DataFrame({tr("top-k error", "Top-k 误差"): sinks_errors["topk"],
                      tr("hybrid error", "混合误差"): sinks_errors["hybrid"],
                      tr("top-k mass kept", "Top-k 权重占比"): sinks_mass["topk"],
                      tr("hybrid mass kept", "混合权重占比"): sinks_mass["hybrid"]}).rename_axis(tr("budget", "预算")).round(3)
    """),
    Claim(
        en="""
        With sinks and a flat tail the order flips: **the hybrid beats top-k at 16, 32 and 64 keys**
        (0.13 against 0.26 at 64) and loses only at 8, where its 4 exact keys are just the sinks and 4
        draws are too few. Both read about the same mass (top-k's mass kept grows only from **0.77 to
        0.79** between 16 and 64 keys), so top-k's error barely moves (×0.86), while the hybrid's falls
        by **0.47, within 0.05 of $1/\\sqrt4$**, as its draws go from 8 to 32.
        """,
        zh="""
        在汇点加平坦尾部的输入上，顺序反了过来：**混合方法在 16、32、64 个键时都胜过 Top-k**
        （64 个键时为 0.13 对 0.26），只在 8 个键时落后：此时它精确保留的 4 个键恰好就是汇点，
        4 次抽样太少。两者读到的权重差不多（从 16 个键到 64 个键，Top-k 的权重占比只从 **0.77 增加到 0.79**），
        因此 Top-k 的误差几乎不动（×0.86）；而混合方法的抽样从 8 次增加到 32 次，误差乘以
        **0.47，与 $1/\\sqrt4$ 相差不到 0.05**。
        """,
        check="""
        e, m = sinks_errors, sinks_mass
        assert abs(sink_mass - 0.76) < 0.01, sink_mass
        assert (e.loc[[16, 32, 64], "hybrid"] < e.loc[[16, 32, 64], "topk"]).all() and e.loc[8, "hybrid"] > e.loc[8, "topk"], e
        assert abs(e.loc[64, "hybrid"] - 0.13) < 0.02 and abs(e.loc[64, "topk"] - 0.26) < 0.02, e
        assert abs(m.loc[16, "topk"] - 0.77) < 0.01 and abs(m.loc[64, "topk"] - 0.79) < 0.01, m
        assert abs(e.loc[64, "hybrid"] / e.loc[16, "hybrid"] - 0.5) < 0.05, e
        """,
    ),
    Md(
        en="""
        Why? Top-k's error is the tail it drops: 508 keys of equal weight, of which each extra key
        recovers only 1/508 of the missing 24 %. The hybrid reads as few tail keys, but its weights
        $e^{s_j}/(n\\pi_j\\hat Z)$ make each draw stand in for $|R|/n$ of them, so the whole tail is
        represented and the remaining error is variance, which falls as $1/\\sqrt n$. On retrieval
        the tail is lumpy (3 strong matches, then noise) and the exact keys are worth more than any
        estimate of the rest.
        """,
        zh="""
        原因何在？Top-k 的误差就是它丢掉的尾部：508 个权重相同的键，每多读一个，只能找回缺失的 24% 中的
        1/508。混合方法读到的尾部键同样很少，但权重 $e^{s_j}/(n\\pi_j\\hat Z)$ 让每次抽样代表 $|R|/n$
        个键，于是整个尾部都得到了体现，剩下的误差是方差，按 $1/\\sqrt n$ 下降。在检索模式上，
        尾部并不平坦（3 个强匹配，其余是噪声），精确保留的键比对其余部分的任何估计都更有价值。
        """,
    ),
    Md(
        en="""
        ## 5. Where the samples come from: LSH proposals

        Uniform draws are cheap but blind: on a row where one key holds almost all the mass, they
        rarely hit it. MagicPIG draws from buckets of a locality-sensitive hash (SimHash): keys whose
        direction is close to the query's land in its bucket more often. The hash codes of the keys are
        computed once and shared by every query, so choosing keys needs **no score at all**; only the
        $n$ drawn keys are scored. Top-k, the hybrid and the `oracle` proposal ($\\pi\\propto e^{s}$, a
        teaching baseline) all need the $L$ scores first. Compare them on the `peaked` pattern, where one
        key per query holds nearly all the mass.
        """,
        zh="""
        ## 5. 样本从哪里来：LSH 提议分布

        均匀抽样便宜，但它是“盲目”的：如果一行里几乎全部权重都在一个键上，均匀抽样很少能抽中它。
        MagicPIG 从局部敏感哈希（SimHash）的桶里抽样：方向与查询相近的键更常落进查询所在的桶。
        键的哈希码只需计算一次，所有查询共用，因此选键 **完全不需要计算得分**，只有抽中的 $n$
        个键才计算得分。Top-k、混合方法和 `oracle` 提议分布（$\\pi\\propto e^{s}$，一个教学用的基准）
        都得先算出全部 $L$ 个得分。下面在 `peaked` 模式上比较它们：每个查询几乎全部的权重都集中在一个键上。
        """,
    ),
    Code("""
        qp, kp, vp = synthetic_qkv("peaked", heads=1, length=256, head_dim=32, seed=0)
        peaked = budget_sweep(qp, kp, vp, ["topk", "sampling"], [16, 64], proposals=["uniform", "lsh", "oracle"], seeds=range(3))
        peaked["series"] = [f"{m} ({p})" if p else m for m, p in zip(peaked.method, peaked.proposal)]
        peaked_errors = peaked.pivot(index="budget", columns="series", values="error_mean")
        peaked_errors[["topk", "sampling (oracle)", "sampling (lsh)", "sampling (uniform)"]].rename(columns={
            "topk": tr("top-k", "Top-k"), "sampling (uniform)": tr("sampling, uniform", "采样，均匀"),
            "sampling (lsh)": tr("sampling, LSH", "采样，LSH"), "sampling (oracle)": tr("sampling, oracle", "采样，oracle"),
        }).rename_axis(index=tr("budget", "预算"), columns=None).map("{:.1e}".format)
    """),
    Claim(
        en="""
        At 64 keys the LSH proposal's error is **0.05**, against **0.91** for uniform draws: the hash
        finds the peak without scoring every key. Top-k, which does score every key, is still far
        ahead (**3e-5**), and so is the oracle (**0.005**).
        """,
        zh="""
        在 64 个键时，LSH 提议分布的误差为 **0.05**，而均匀抽样为 **0.91**：哈希不用为每个键打分就找到了峰值。
        但为每个键都打了分的 Top-k 仍然遥遥领先（**3e-5**），oracle 也是（**0.005**）。
        """,
        check="""
        e = peaked_errors
        assert abs(e.loc[64, "sampling (lsh)"] - 0.05) < 0.03 and abs(e.loc[64, "sampling (uniform)"] - 0.91) < 0.05, e
        assert e.loc[64, "topk"] < 1e-4 and abs(e.loc[64, "sampling (oracle)"] - 0.005) < 0.002, e
        """,
    ),
    Md(
        en="""
        **Verdict on these inputs.** At an equal number of keys read, plain sampling never beats top-k,
        whatever the proposal. The hybrid beats it when a few heavy keys sit on a long flat tail, which
        is common in real models (the attention sinks of chapter 6), and loses when the tail is lumpy.
        What sampling buys besides accuracy is work it skips: with an LSH proposal no query ever scores
        all $L$ keys, while top-k must, which is $O(L\\,D)$ per query before it reads a single value.
        And its errors average away across runs, where top-k's never do.
        """,
        zh="""
        **在这些输入上的结论。** 在读取的键数相同时，无论用哪种提议分布，纯采样都从未胜过 Top-k。
        当少数几个重要的键后面跟着一条长长的平坦尾部时，混合方法胜过 Top-k，这在真实模型中很常见
        （见第 6 章的注意力汇点）；尾部不平坦时，混合方法则落后。除了精度，采样还能省下计算：
        用 LSH 提议分布时，没有一个查询需要为全部 $L$ 个键打分；而 Top-k 必须这样做，
        在读取任何一个值之前就要花 $O(L\\,D)$ 的计算。此外，采样的误差可以通过多次平均消掉，Top-k 的却永远不能。
        """,
    ),
    Summary(
        en="""
        - Dense attention is an expectation over keys; importance sampling estimates it from $n$ draws of
          a proposal $\\pi$, with weights $e^{s_j}/(n\\pi_j\\hat Z)$. The self-normalised estimator has an
          $O(1/n)$ bias and an $O(1/\\sqrt n)$ spread.
        - Relative error divides by $\\lVert o\\rVert$; on near-uniform rows the values cancel and any $n$-key
          method scores about $\\sqrt{L/n-1}$, above the trivial answer's 1.
        - Top-k's error is all bias (16 identical runs); sampling's is variance (averaging 16 runs divides it
          by 4, four times the samples halve it).
        - At equal budgets top-k wins on peaked and retrieval rows; the hybrid wins on a few heavy keys plus a
          flat tail, because its draws stand in for the whole tail.
        - LSH proposals find heavy keys without scoring all of them; that saved work, not accuracy per key,
          is sampling's case.
        """,
        zh="""
        - 稠密注意力是对键的一个期望；重要性采样从提议分布 $\\pi$ 中抽取 $n$ 个样本来估计它，权重为 $e^{s_j}/(n\\pi_j\\hat Z)$。自归一化估计量的偏差为 $O(1/n)$，波动为 $O(1/\\sqrt n)$。
        - 相对误差要除以 $\\lVert o\\rVert$；在近乎均匀的行上，值向量相互抵消，任何只读 $n$ 个键的方法，误差都约为 $\\sqrt{L/n-1}$，高于平凡答案的 1。
        - Top-k 的误差全是偏差（16 次运行完全相同）；采样的误差是方差（16 次平均后缩小为 1/4，样本数变为四倍则误差减半）。
        - 预算相同时，Top-k 在尖峰行和检索模式上胜出；在少数重要键加平坦尾部的输入上，混合方法胜出，因为它的样本代表了整个尾部。
        - LSH 提议分布不必为所有键打分就能找到重要的键；采样的价值在于省下的这部分计算，而不在于每个键的精度。
        """,
    ),
    References(items=(
        ("Desai, Agrawal, Yang, Cuadron, Schroeder, Zaharia, Gonzalez, Stoica. 2025. vAttention: Verified "
         "Sparse Attention. arXiv:2510.05688", "https://arxiv.org/abs/2510.05688"),
        ("Chen, Sadhukhan, Ye, Zhou, Zhang, Nolte, Tian, Douze, Bottou, Jia, Chen. 2024. MagicPIG: LSH "
         "Sampling for Efficient LLM Generation. arXiv:2410.16179", "https://arxiv.org/abs/2410.16179"),
        ("Owen. 2013. Monte Carlo theory, methods and examples, chapter 9: Importance sampling (the "
         "self-normalised estimator, its bias and variance)", "https://artowen.su.domains/mc/"),
    )),
    Exercises(items=(
        Exercise(
            en="""
            Predict, without running anything, the relative error of top-k with $k=64$ on the flat input
            of section 2. Set `answer` to your prediction (a number); the check compares it with the
            measured error.
            """,
            zh="""
            不运行任何代码，预测第 2 节平坦输入上 $k=64$ 的 Top-k 的相对误差。把你的预测（一个数）赋给
            `answer`；自测函数会把它与实测误差比较。
            """,
            hint_en="Top-k on a flat row averages $k$ arbitrary distinct values; section 2 has the formula.",
            hint_zh="在平坦的行上，Top-k 相当于对 $k$ 个随意挑选的不同值取平均；公式见第 2 节。",
            solution_en="""
            $\\sqrt{L/k-1}=\\sqrt{256/64-1}=\\sqrt3\\approx1.73$. The measured error is 1.63: the formula
            assumes equal weights, and top-k keeps the 64 largest ones, which helps a little. The error is
            still above 1, so 64 of 256 keys are not enough on this input. A guess of
            $1/\\sqrt{64}=0.125$ confuses the spread of the estimate with its size relative to
            $\\lVert o\\rVert$, which is itself of order $1/\\sqrt L$.
            """,
            solution_zh="""
            $\\sqrt{L/k-1}=\\sqrt{256/64-1}=\\sqrt3\\approx1.73$。实测误差为 1.63：公式假设权重全部相等，
            而 Top-k 保留的是最大的 64 个权重，这略有帮助。误差仍然大于 1，所以在这个输入上 256 个键中读 64 个还不够。
            如果猜 $1/\\sqrt{64}=0.125$，就是把估计的波动和它相对于 $\\lVert o\\rVert$ 的大小混为一谈了，
            而 $\\lVert o\\rVert$ 本身就只有 $1/\\sqrt L$ 的量级。
            """,
            self_check="""
            def check_ex1(answer):
                measured = err(topk_attention(q, k, v, 64))
                assert abs(answer - measured) < 0.1 * measured, tr(
                    f"{answer:.3f} is more than 10 % away from the measured error; revisit section 2's formula",
                    f"{answer:.3f} 与实测误差相差超过 10%；请回顾第 2 节的公式")
                print(tr(f"Right: predicted {answer:.2f}, measured {measured:.2f}.",
                         f"正确：预测 {answer:.2f}，实测 {measured:.2f}。"))
            """,
            solution_code="""
            answer = math.sqrt(L / 64 - 1)
            check_ex1(answer)
            """,
            wrong_answer="1 / math.sqrt(64)",
        ),
        Exercise(
            en="""
            Write `sn_weights(scores, pi)`: given the scores $s_{j_i}$ of the $n$ keys drawn for one query
            and their proposal probabilities $\\pi_{j_i}$ (two 1-D tensors of length $n$), return the
            self-normalised weights $w_i$. The check compares your function with the library's weights
            for uniform and for oracle draws.
            """,
            zh="""
            编写 `sn_weights(scores, pi)`：输入为某个查询抽到的 $n$ 个键的得分 $s_{j_i}$ 及其提议概率
            $\\pi_{j_i}$（两个长度为 $n$ 的一维张量），返回自归一化权重 $w_i$。自测函数会在均匀抽样和
            oracle 抽样两种情况下，把你的函数与库给出的权重比较。
            """,
            hint_en="""
            Work in logs: $w_i\\propto e^{s_{j_i}}/\\pi_{j_i}=e^{s_{j_i}-\\log\\pi_{j_i}}$, and the weights sum
            to 1. A softmax of the scores alone passes the uniform case but not the oracle one.
            """,
            hint_zh="""
            在对数域里计算：$w_i\\propto e^{s_{j_i}}/\\pi_{j_i}=e^{s_{j_i}-\\log\\pi_{j_i}}$，并且权重之和为 1。
            只对得分做 softmax 能通过均匀抽样的检验，却通不过 oracle 的检验。
            """,
            solution_en="""
            `torch.softmax(scores - pi.log(), dim=-1)`. The factor $1/(n\\hat Z)$ is the same for every draw,
            so it is exactly the softmax's normalisation. With uniform draws $\\pi$ is constant and drops out;
            with oracle draws $\\pi_j\\propto e^{s_j}$ cancels the scores and every weight is $1/n$.
            """,
            solution_zh="""
            `torch.softmax(scores - pi.log(), dim=-1)`。因子 $1/(n\\hat Z)$ 对每次抽样都相同，它恰好就是 softmax
            的归一化。均匀抽样时 $\\pi$ 是常数，会被约掉；oracle 抽样时 $\\pi_j\\propto e^{s_j}$ 抵消了得分，
            每个权重都是 $1/n$。
            """,
            self_check="""
            def check_ex2(sn_weights):
                scores_all = q[0, 0] @ k[0, 0].T / math.sqrt(D)
                for proposal, probs in (("uniform", torch.full((L, L), 1 / L)), ("oracle", scores_all.softmax(-1))):
                    _, picked = sampled_attention(q, k, v, 16, proposal=proposal, generator=seeded(1), return_selection=True)
                    drawn = picked.indices[0, 0]
                    for i in (0, 100, 255):
                        got = sn_weights(scores_all[i, drawn[i]], probs[i, drawn[i]])
                        assert torch.allclose(got, picked.weights[0, 0, i], atol=1e-5), tr(
                            f"query {i}, {proposal} proposal: your weights differ from the library's",
                            f"查询 {i}，{proposal} 提议分布：你的权重与库的权重不一致")
                print(tr("Right: your weights match the library's for both proposals.",
                         "正确：两种提议分布下，你的权重都与库的一致。"))
            """,
            solution_code="""
            def sn_weights(scores, pi):
                return torch.softmax(scores - pi.log(), dim=-1)


            check_ex2(sn_weights)
            """,
            wrong_answer="lambda scores, pi: torch.softmax(scores, dim=-1)",
        ),
        Exercise(
            en="""
            Make the tail of section 4's second input six times lighter with `sink_strength=8.0` (the sinks
            then hold 96 % of each row). Find the smallest budget in `(8, 16, 32, 64, 128)` at which the
            hybrid's error is below top-k's, and set `answer` to it. Before running, predict: does a lighter
            tail move the crossover to larger budgets?
            """,
            zh="""
            把第 4 节第二个输入的尾部减轻到约六分之一：设 `sink_strength=8.0`（此时汇点占每行权重的 96%）。
            在 `(8, 16, 32, 64, 128)` 中找出混合方法误差低于 Top-k 的最小预算，赋给 `answer`。
            运行之前先预测：尾部变轻之后，交叉点会移向更大的预算吗？
            """,
            hint_en="""
            Both errors come from the tail: top-k's bias is the tail it drops, the hybrid's variance is the
            spread of its estimate of the tail. How does each scale with the tail's share of the mass?
            """,
            hint_zh="""
            两种误差都来自尾部：Top-k 的偏差是它丢掉的尾部，混合方法的方差是它对尾部估计的波动。
            两者各自如何随尾部的权重占比变化？
            """,
            solution_en="""
            The crossover stays at **16**. Both errors are proportional to the tail's share of the mass:
            top-k misses the tail's contribution, the hybrid estimates it with a relative spread that does not
            depend on how heavy it is. Making the tail lighter shrinks both errors by the same factor (about
            0.04 at 16 keys instead of 0.3), so their ratio and the budget where they cross do not move.
            """,
            solution_zh="""
            交叉点仍在 **16**。两种误差都与尾部的权重占比成正比：Top-k 漏掉了尾部的贡献，混合方法估计尾部时的
            相对波动与尾部轻重无关。尾部变轻会让两种误差按同一比例缩小（16 个键时约为 0.04，而不是 0.3），
            所以两者之比以及交叉的预算都不变。
            """,
            self_check="""
            _light = synthetic_qkv("sink_local", heads=1, length=512, head_dim=32, seed=0, sink_strength=8.0, strength=0.5)
            _light_errors = budget_sweep(*_light, ["topk", "hybrid"], [8, 16, 32, 64, 128], proposals=["uniform"],
                                         seeds=range(3)).pivot(index="budget", columns="method", values="error_mean")


            def check_ex3(answer):
                wins = [b for b in _light_errors.index if _light_errors.loc[b, "hybrid"] < _light_errors.loc[b, "topk"]]
                assert answer in _light_errors.index, tr(f"{answer} is not one of the budgets swept",
                                                         f"{answer} 不在扫描的预算之中")
                assert answer in wins, tr(f"at {answer} keys top-k is still ahead of the hybrid",
                                          f"预算为 {answer} 时 Top-k 仍领先于混合方法")
                assert answer == min(wins), tr(f"the hybrid wins at {answer} keys, but already at a smaller budget",
                                               f"混合方法在 {answer} 个键时胜出，但在更小的预算下就已经胜出了")
                print(tr(f"Right: the hybrid wins from {answer} keys on, as with the heavier tail.",
                         f"正确：混合方法从 {answer} 个键起胜出，与尾部较重时相同。"))
            """,
            solution_code="""
            light = synthetic_qkv("sink_local", heads=1, length=512, head_dim=32, seed=0, sink_strength=8.0, strength=0.5)
            light_errors = budget_sweep(*light, ["topk", "hybrid"], [8, 16, 32, 64, 128], proposals=["uniform"],
                                        seeds=range(3)).pivot(index="budget", columns="method", values="error_mean")
            print(light_errors[["topk", "hybrid"]].rename(columns=NAMES).rename_axis(
                index=tr("budget", "预算"), columns=None).round(4))
            answer = int(min(b for b in light_errors.index if light_errors.loc[b, "hybrid"] < light_errors.loc[b, "topk"]))
            check_ex3(answer)
            """,
            wrong_answer="128",
        ),
    )),
]
