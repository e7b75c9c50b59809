"""Chapter 5: NSA-style block sparsity: compress, select, slide, gate; what it costs; other block methods."""
from _cells import Claim, Code, Exercise, Exercises, Md, Objectives, References, Summary

NUMBER = 5
SLUG = "ch5_blocks"
TITLE = {"en": "Block sparsity in the style of NSA: compress, select, slide",
         "zh": "NSA 式块稀疏：压缩、选择、滑动"}
TERMS = ["block", "pooling", "query", "key", "sparse attention", "dense attention", "mass kept", "selection mask",
         "relative error", "attention sink"]

CELLS = [
    Objectives(
        en=(
            "build NSA's three branches (compressed, selected, sliding window) and its gate mix "
            "$o=\\sum_c g_c\\,\\mathrm{Attn}(q,K_c,V_c)$ from the library's pieces, and check that the mix is "
            "one attention matrix;",
            "explain how block selection is driven by compressed scores, and measure how much of the dense "
            "mass it finds against the best blocks;",
            "count what a query reads, $L/d+n\\,l'+w$ keys instead of $L$, and say where the saving goes at long "
            "context;",
            "place StreamingLLM and Quest next to NSA as other block or static sparse methods.",
        ),
        zh=(
            "用库中的组件搭建 NSA 的三个分支（压缩、选择、滑动窗口）及其门控混合 "
            "$o=\\sum_c g_c\\,\\mathrm{Attn}(q,K_c,V_c)$，并验证混合结果等于一个注意力矩阵；",
            "解释块选择如何由压缩分支的得分驱动，并测量它找到的稠密注意力权重与最优块相比有多少；",
            "计算一个查询读取的键数：$L/d+n\\,l'+w$ 个，而不是 $L$ 个，并说明在长上下文中省下的计算去了哪里；",
            "把 StreamingLLM 和 Quest 放在 NSA 旁边比较：它们是另外几种块稀疏或静态稀疏方法。",
        ),
    ),
    Md(
        en=r"""
        ## Why blocks?

        Per-token top-k (chapter 3) must compute all $L$ scores of a query before it can choose, and
        then gathers $k$ keys scattered across memory. DeepSeek's Native Sparse Attention (NSA) chooses
        **block**s of consecutive keys instead, from a cheap summary, and mixes three branches:

        - **compressed**: mean **pooling** turns each block of $l$ keys (one block every $d$ tokens) into
          one summary, $\tilde k_c=\frac1l\sum_{t\in c}k_t$ (and the same for values); the **query**
          attends to these $L/d$ summaries;
        - **selected**: the compressed weights $p^{\text{cmp}}_c$ score the selection blocks of $l'$
          tokens, $I_b=\sum_c p^{\text{cmp}}_c\,|c\cap b|/l$; the query attends, at full resolution, to
          the tokens of its $n$ most important blocks;
        - **sliding**: the query attends to its $w$ nearest tokens.

        Gates mix the three outputs, per query and head:

        $$
        o=\sum_{c\in\{\text{cmp},\,\text{sel},\,\text{win}\}} g_c\,\mathrm{Attn}(q,K_c,V_c),\qquad
        g_c=\sigma\big(\text{MLP}(x)\big)_c \text{ in the trained model}.
        $$

        A query then scores $L/d+n\,l'+w$ keys instead of $L$, so the whole layer costs
        $O\big(L\,(L/d+n\,l'+w)\,D\big)$ against $O(L^2D)$ for **dense attention**. Whole blocks also suit
        GPU kernels, which load contiguous tiles.
        """,
        zh=r"""
        ## 为什么按块选择？

        逐词元的 Top-k（第 3 章）必须先算出一个查询的全部 $L$ 个得分才能做选择，然后还要从内存中分散的位置
        收集 $k$ 个键。DeepSeek 的原生稀疏注意力（NSA）改为根据一个廉价的摘要来选择由连续的键组成的
        **块**，并混合三个分支：

        - **压缩**：用均值 **池化** 把每一块的 $l$ 个键（每隔 $d$ 个词元一块）变成一个摘要 $\tilde k_c=\frac1l\sum_{t\in c}k_t$（值也一样）；**查询** 对这 $L/d$ 个摘要做注意力；
        - **选择**：压缩分支的权重 $p^{\text{cmp}}_c$ 为每个由 $l'$ 个词元组成的选择块打分，$I_b=\sum_c p^{\text{cmp}}_c\,|c\cap b|/l$；查询以完整分辨率关注其最重要的 $n$ 个块中的词元；
        - **滑动**：查询关注离它最近的 $w$ 个词元。

        门控系数按查询、按注意力头把三个输出混合起来：

        $$
        o=\sum_{c\in\{\text{cmp},\,\text{sel},\,\text{win}\}} g_c\,\mathrm{Attn}(q,K_c,V_c),\qquad
        g_c=\sigma\big(\text{MLP}(x)\big)_c\ \text{（训练好的模型中）}.
        $$

        于是一个查询只需为 $L/d+n\,l'+w$ 个键打分，而不是 $L$ 个；整层的代价是
        $O\big(L\,(L/d+n\,l'+w)\,D\big)$，而 **稠密注意力** 是 $O(L^2D)$。整块读取也适合 GPU 内核，
        因为内核本来就按连续的数据块加载。
        """,
    ),
    Code("""
        import torch
        from einops import reduce
        from sparse_attn import viz
        from sparse_attn.methods import METHODS, Config, Shape
        from sparse_attn.metrics import mass_kept, relative_error
        from sparse_attn.ops import dense_attention, topk_attention
        from sparse_attn.ops.nsa import compress_kv, nsa_attention, selected_token_mask, sliding_window_mask
        from sparse_attn.sources import synthetic_qkv


        def tr(en, zh):
            \"\"\"Text in the notebook's language, for printouts, plot titles and axis labels.\"\"\"
            return zh if LANG == "zh" else en


        # Each query matches 3 keys anywhere in the sequence: far keys that a window cannot reach.
        L, BLOCK, SELECTED, WINDOW = 256, 16, 4, 32
        NSA = dict(sliding_window_size=WINDOW, compress_block_size=BLOCK, selection_block_size=BLOCK,
                   num_selected_blocks=SELECTED)
        q, k, v = synthetic_qkv("retrieval", heads=2, length=L, head_dim=32, seed=0)
        ref, weights = dense_attention(q, k, v, return_weights=True)


        def err(out):
            \"\"\"Relative error against dense attention, averaged over query rows.\"\"\"
            return relative_error(out, ref).mean().item()
    """),
    Md(
        en="""
        ## 1. Compress

        With blocks of $l=d=16$ tokens, 256 keys become 16 summaries. The default compression is the
        mean of each block; the trained NSA learns it.
        """,
        zh="""
        ## 1. 压缩

        以 $l=d=16$ 个词元为一块，256 个键变成 16 个摘要。默认的压缩方式是对每一块取平均；
        训练好的 NSA 则会学习压缩方式。
        """,
    ),
    Code("""
        k_cmp = compress_kv(k, BLOCK, BLOCK)
        print(tuple(k.shape), "->", tuple(k_cmp.shape))
    """),
    Claim(
        en="The 256 keys of each head become **16** compressed keys, and the compressed key with index 3 is exactly the mean of keys 48 to 63.",
        zh="每个注意力头的 256 个键变成 **16** 个压缩键，编号为 3 的压缩键恰好是编号 48 到 63 的键的平均值。",
        check="""
        assert k_cmp.shape[2] == L // BLOCK == 16
        assert torch.allclose(k_cmp[:, :, 3], k[:, :, 48:64].mean(dim=2))
        """,
    ),
    Md(
        en="""
        ## 2. Select

        Run all three branches with equal gates and ask for the maps each one used. The compressed
        weights rank the blocks; each query keeps 4 blocks of 16 tokens, a quarter of the keys. As in
        the NSA paper, 3 of the 4 are forced: the first block (where attention sinks live) and the two
        local blocks ending at the query's own; only the fourth is chosen by score. What share of the
        dense weights do those blocks hold (their **mass kept**), with the forced blocks and without
        them (`num_initial_blocks=0, num_local_blocks=0`), compared with the best 4 blocks a query
        could have picked had it seen every score?
        """,
        zh="""
        ## 2. 选择

        用相等的门控系数运行三个分支，并取出每个分支实际使用的注意力图。压缩分支的权重给各块排序；
        每个查询保留 4 个块、每块 16 个词元，即四分之一的键。与 NSA 论文一致，其中 3 块是强制选中的：
        第一块（注意力汇点所在之处）和以查询所在块结尾的两个局部块；只有第 4 块按得分挑选。
        这些块在稠密注意力权重中占多少（即它们的 **权重占比**）？关掉强制块（`num_initial_blocks=0, num_local_blocks=0`）
        之后又占多少？如果查询看过全部得分，它能选出的最好的 4 个块又占多少？
        """,
    ),
    Code("""
        out, maps = nsa_attention(q, k, v, gates=(1 / 3, 1 / 3, 1 / 3), **NSA, return_maps=True)
        selection_mask = selected_token_mask(maps.block_indices, BLOCK, L, causal=False)
        selected_mass = mass_kept(weights, selection_mask).mean().item()
        _, free_maps = nsa_attention(q, k, v, gates=(1 / 3, 1 / 3, 1 / 3), **NSA, return_maps=True,
                                     num_initial_blocks=0, num_local_blocks=0)  # every block chosen by score
        free_mass = mass_kept(weights, selected_token_mask(free_maps.block_indices, BLOCK, L, causal=False)).mean().item()
        block_mass = reduce(weights, "b h i (n s) -> b h i n", "sum", s=BLOCK)  # dense mass per block of 16
        best_blocks_mass = block_mass.topk(SELECTED, dim=-1).values.sum(-1).mean().item()
        print(tr(f"mass in the selected blocks: {selected_mass:.3f} (forcing off: {free_mass:.3f}); "
                 f"in the best {SELECTED} blocks: {best_blocks_mass:.3f}; "
                 f"in {SELECTED} blocks of 16 on average: {SELECTED / (L // BLOCK):.3f}",
                 f"选中块的权重占比：{selected_mass:.3f}（关掉强制块：{free_mass:.3f}）；最好的 {SELECTED} 个块：{best_blocks_mass:.3f}；"
                 f"16 块中任意 {SELECTED} 块的平均：{SELECTED / (L // BLOCK):.3f}"))
        viz.heatmap(maps.compressed_weights[0, 0],
                    title=tr("Compressed attention: each query over 16 block summaries (head 0)",
                             "压缩注意力：每个查询对 16 个块摘要的权重（注意力头 0）"),
                    x_title=tr("compressed block", "压缩块"), y_title=tr("query", "查询"), lang=LANG).show()
    """),
    Claim(
        en="""
        With the forced blocks the selected blocks hold **0.38 ± 0.05** of the mass; with every block
        chosen by score they hold **0.53 ± 0.05**, twice the 0.25 that 4 blocks in 16 hold on average.
        Both are far from the best 4 blocks, which hold **0.97 ± 0.02**. On this input the matching keys
        lie anywhere, so the forced blocks mostly hold noise; they pay off where attention sinks and
        local context carry the mass, as in real models (chapter 6).
        """,
        zh="""
        有强制块时，选中的块占 **0.38 ± 0.05** 的权重；全部按得分挑选时占 **0.53 ± 0.05**，
        是 16 块中任选 4 块平均所得（0.25）的两倍。两者都与最好的 4 个块相去甚远，后者占 **0.97 ± 0.02**。
        在这个输入上，匹配的键可能出现在任何位置，强制块里多半是噪声；在注意力汇点和局部上下文占据大部分权重的地方
        （例如真实模型，见第 6 章），强制块才显出价值。
        """,
        check="""
        assert abs(selected_mass - 0.38) < 0.05, selected_mass
        assert abs(free_mass - 0.53) < 0.05, free_mass
        assert abs(best_blocks_mass - 0.97) < 0.02, best_blocks_mass
        """,
    ),
    Md(
        en="""
        Why the gap? A block's summary is the mean of 16 keys, so one strongly matching key enters it
        at a sixteenth of its strength, next to 15 keys of noise: the cheap scores find only some of the
        right blocks. This is why NSA learns its compression (and its gates) with the model instead of
        using a fixed mean. The picture compares the dense weights with the selected branch's weights
        and its **selection mask** (log scale, head 0).
        """,
        zh="""
        为什么会有差距？块摘要是 16 个键的平均值，一个强匹配的键在摘要里只剩十六分之一的强度，
        旁边还有 15 个噪声键：廉价的得分只能找到一部分正确的块。因此 NSA 与模型一起学习压缩方式
        （以及门控系数），而不用固定的平均值。下图比较稠密权重与选择分支的权重及其 **选择掩码**
        （对数刻度，注意力头 0）。
        """,
    ),
    Code("""
        viz.attention_maps(weights[0, 0], maps.selected[0, 0], selection_mask[0, 0], log=True,
                           method_name=tr("selected blocks", "选中的块"), lang=LANG).show()
    """),
    Md(
        en="""
        ## 3. Slide, and the mix

        The sliding branch sees the tokens fewer than 32 positions away, on either side. The gates then
        mix the three outputs; `maps.combined` is the effective attention matrix of the mix,
        $\\sum_c g_c P_c$ with $P_c$ each branch's weights. How far is each branch, and the mix, from
        dense attention, and how does that compare with per-token top-k reading as many keys?
        """,
        zh="""
        ## 3. 滑动与混合

        滑动分支看到两侧距离小于 32 个位置的词元。门控系数再把三个输出混合起来；`maps.combined`
        是混合后的等效注意力矩阵 $\\sum_c g_c P_c$，其中 $P_c$ 是各分支的权重。每个分支以及混合结果离稠密注意力有多远？
        与读取同样多键的逐词元 Top-k 相比又如何？
        """,
    ),
    Code("""
        window_mask = sliding_window_mask(L, L, WINDOW, causal=False)
        keys_per_query = (selection_mask | window_mask).sum(-1).float().mean().item()
        branch_errors = {"compressed": err(maps.compressed @ v), "selected": err(maps.selected @ v),
                         "sliding": err(maps.sliding @ v), "mix": err(out)}
        topk_error = err(topk_attention(q, k, v, round(keys_per_query)))
        row_sums = maps.combined.sum(-1)
        print(tr(f"tokens per query (selected or in the window): {keys_per_query:.1f}",
                 f"每个查询的词元数（选中的或在窗口内的）：{keys_per_query:.1f}"))
        names = {"compressed": tr("compressed", "压缩"), "selected": tr("selected", "选择"),
                 "sliding": tr("sliding", "滑动"), "mix": tr("equal mix", "等权混合")}
        print(tr("relative error: ", "相对误差：")
              + tr(", ", "，").join(f"{names[branch]} {e:.3f}" for branch, e in branch_errors.items())
              + tr(f"; top-k with as many keys {topk_error:.1e}; zero output 1",
                   f"；读取同样多键的 Top-k {topk_error:.1e}；全零输出 1"))
        viz.heatmap(maps.combined[0, 0], log=True, title=tr("NSA: the gated mix of the three branches (head 0)",
                                                           "NSA：三个分支按门控混合后的注意力（注意力头 0）"),
                    x_title=tr("key", "键"), y_title=tr("query", "查询"), lang=LANG).show()
    """),
    Claim(
        en="""
        The mix is one attention matrix: every row of `maps.combined` sums to 1 and
        `maps.combined @ v` reproduces the output to **1e-5**. But each branch alone is about as far
        from dense attention as the trivial answer 0, whose **relative error** is 1 (compressed
        **0.99**, selected **1.21**, sliding **1.45**), and the equal mix is at **0.88 ± 0.05**, better
        only because the branches' errors partly cancel. Top-k reading the same 90 keys is exact to
        float32 rounding (**5e-6**).
        """,
        zh="""
        混合结果就是一个注意力矩阵：`maps.combined` 的每一行之和都为 1，且 `maps.combined @ v` 在 **1e-5**
        以内复现输出。但每个分支单独来看，离稠密注意力都和平凡答案 0 差不多远（全零输出的 **相对误差** 是 1）：
        压缩分支 **0.99**，选择分支 **1.21**，滑动分支 **1.45**；等权混合为 **0.88 ± 0.05**，
        比单个分支好，只是因为各分支的误差部分相互抵消。读取同样 90 个键的 Top-k 则精确到 float32 的舍入误差（**5e-6**）。
        """,
        check="""
        assert torch.allclose(row_sums, torch.ones_like(row_sums), atol=1e-5)
        assert torch.allclose(maps.combined @ v, out, atol=1e-5)
        assert abs(round(keys_per_query) - 90) <= 3, keys_per_query
        assert abs(branch_errors["compressed"] - 0.99) < 0.05 and abs(branch_errors["selected"] - 1.21) < 0.1
        assert abs(branch_errors["sliding"] - 1.45) < 0.1, branch_errors
        assert abs(branch_errors["mix"] - 0.88) < 0.05, branch_errors
        assert topk_error < 1e-5, topk_error
        """,
    ),
    Md(
        en="""
        The lesson is not that NSA is bad: it is a **sparse attention** architecture to *train*. Its
        pooling, its gates and the model's own keys learn to work together, so that the compressed
        scores point at the right blocks. Dropped into a model trained with dense attention, with a fixed
        mean and fixed gates, it misses the keys that matter, while top-k, which sees every score, does not.
        """,
        zh="""
        这并不说明 NSA 不好：它是一种需要 *训练* 的 **稀疏注意力** 架构。它的池化方式、门控系数和模型自己的键
        在训练中相互配合，让压缩分支的得分指向正确的块。如果把它直接放进一个用稠密注意力训练出来的模型，
        再用固定的平均值和固定的门控，它就会漏掉要紧的键；而能看到全部得分的 Top-k 则不会。
        """,
    ),
    Md(
        en="""
        ## 4. What a query reads at long context

        At $L=256$ NSA saves little. The count $L/d+n\\,l'+w$ pays off at long context. The NSA paper's
        settings are $l=32$, $d=16$, $l'=64$, $n=16$, $w=512$; count the keys one query scores at
        $L=65536$ from the formula, and compare with the library's cost model for the `nsa` method.
        """,
        zh="""
        ## 4. 长上下文中一个查询读取多少键

        在 $L=256$ 时 NSA 省不了多少。$L/d+n\\,l'+w$ 这个计数要到长上下文中才显出价值。NSA 论文的设置是
        $l=32$、$d=16$、$l'=64$、$n=16$、$w=512$；下面按公式计算 $L=65536$ 时一个查询要打分的键数，
        并与库中 `nsa` 方法的代价模型对照。
        """,
    ),
    Code("""
        LONG = 65536
        l, d, l_sel, n_sel, w = 32, 16, 64, 16, 512
        compressed_keys = (LONG - l) // d + 1        # whole blocks of l tokens, one every d
        per_query = compressed_keys + n_sel * l_sel + w
        paper = Config(compress_block_size=l, compress_block_sliding_stride=d, selection_block_size=l_sel,
                       num_selected_blocks=n_sel, sliding_window_size=w)
        model = METHODS["nsa"].cost(Shape(B=1, H=1, Hkv=1, Lq=LONG, Lk=LONG, D=64, Dv=64), paper, 2)
        print(tr(f"L = {LONG}: {compressed_keys} compressed + {n_sel * l_sel} selected + {w} window = {per_query} keys "
                 f"per query (cost model: {model.keys_scored:.0f}); dense reads {LONG}, {LONG / per_query:.1f} times more",
                 f"L = {LONG}：{compressed_keys} 个压缩键 + {n_sel * l_sel} 个选中的键 + {w} 个窗口内的键 = 每个查询 {per_query} 个键"
                 f"（代价模型：{model.keys_scored:.0f}）；稠密注意力读取 {LONG} 个，是它的 {LONG / per_query:.1f} 倍"))
    """),
    Claim(
        en="""
        At 64K tokens a query at the end of the sequence scores **5631** keys, **11.6 ± 0.1** times fewer
        than dense attention. But **73 %** of them are compressed keys: the compressed branch still grows
        with $L$, so NSA's cost stays quadratic, $O(L^2D/d)$, only with a 16 times smaller constant.
        The cost model counts **6142**: without a causal mask this library's window reaches $w-1$ keys
        on each side of the query ($2w-1 = 1023$ keys), where the paper's causal window reads the $w$ before it.
        """,
        zh="""
        在 64K 个词元时，序列末尾的一个查询要为 **5631** 个键打分；稠密注意力要打分的键是它的 **11.6 ± 0.1** 倍。
        但其中 **73%** 是压缩键：压缩分支仍随 $L$ 增长，所以 NSA 的代价仍是二次的，即 $O(L^2D/d)$，
        只是常数缩小为 1/16。代价模型算出的是 **6142**：不加因果掩码时，本库的窗口在查询两侧各延伸 $w-1$ 个键（共 $2w-1 = 1023$ 个），而论文的因果窗口只读查询之前的 $w$ 个。
        """,
        check="""
        assert per_query == 5631 and model.keys_scored == per_query + w - 1 == 6142, (per_query, model.keys_scored)
        assert abs(LONG / per_query - 11.6) < 0.1
        assert abs(compressed_keys / per_query - 0.73) < 0.01
        """,
    ),
    Md(
        en="""
        ## 5. Other block methods

        NSA is one point in a family. **StreamingLLM** keeps a *static* pattern: the first few tokens,
        which every query attends to strongly (the **attention sink**s of chapter 6), plus a sliding
        window. It needs no scores at all and bounds the cache, but it forgets everything in between,
        which is exactly what the retrieval pattern above asks for. **Quest** keeps the full cache in
        pages and stores, per page, the element-wise minimum and maximum of its keys; for a query
        $q$, $\\sum_i \\max(q_i\\,m_i, q_i\\,M_i)$ is an upper bound on any score in the page, and the
        top pages by that bound are loaded. Like NSA it selects blocks from a summary, but the summary
        is a bound rather than a learned mean, so it works on a model trained with dense attention.
        """,
        zh="""
        ## 5. 其他块稀疏方法

        NSA 只是这一类方法中的一种。**StreamingLLM** 采用 *静态* 模式：保留开头几个每个查询都强烈关注的词元
        （即第 6 章的 **注意力汇点**），再加一个滑动窗口。它完全不需要计算得分，缓存大小也有上限，
        但会忘掉中间的一切，而上面的检索模式恰恰需要中间的内容。**Quest** 把完整的缓存分页保存，
        并为每一页记录其中各个键逐元素的最小值 $m$ 和最大值 $M$；对查询 $q$ 而言，
        $\\sum_i \\max(q_i\\,m_i, q_i\\,M_i)$ 是该页中任意得分的上界，按这个上界选出最高的几页加载。
        它和 NSA 一样根据摘要选块，但摘要是一个上界而不是学出来的平均值，所以可以直接用在以稠密注意力训练的模型上。
        """,
    ),
    Summary(
        en="""
        - NSA mixes three attentions, $o=\\sum_c g_c\\,\\mathrm{Attn}(q,K_c,V_c)$: over block summaries
          (compressed), over the tokens of the top blocks by compressed score (selected), and over a local
          window (sliding). The mix is one attention matrix whose rows sum to 1.
        - With fixed mean pooling, the compressed scores and the forced blocks hold 0.38 of the mass (0.53 with forcing off) where the best
          blocks hold 0.97: one matching key is diluted sixteen-fold in its block's mean.
        - Without training, each branch is about as far from dense attention as answering zero, and the equal
          mix (0.88) is far from top-k on as many keys (5e-6): NSA is an architecture to train, not a drop-in.
        - A query scores $L/d+n\\,l'+w$ keys: 11.6 times fewer than dense at 64K tokens with the paper's settings,
          three quarters of them compressed keys, so the cost remains $O(L^2D/d)$.
        - StreamingLLM (sinks plus a window, static) and Quest (page bounds from min/max keys) are training-free
          relatives.
        """,
        zh="""
        - NSA 混合三种注意力，$o=\\sum_c g_c\\,\\mathrm{Attn}(q,K_c,V_c)$：对块摘要（压缩）、对按压缩得分选出的最重要块中的词元（选择）、对局部窗口（滑动）。混合结果是一个每行之和为 1 的注意力矩阵。
        - 用固定的均值池化时，压缩得分与强制块一起只占 0.38 的权重（关掉强制块为 0.53），而最好的块占 0.97：一个匹配的键在块平均中被稀释了十六倍。
        - 未经训练时，每个分支离稠密注意力都和全零输出差不多远；等权混合（0.88）也远不如读取同样多键的 Top-k（5e-6）：NSA 是需要训练的架构，不能直接替换。
        - 一个查询要为 $L/d+n\\,l'+w$ 个键打分：按论文的设置，在 64K 个词元时只有稠密注意力的 1/11.6，其中四分之三是压缩键，因此代价仍是 $O(L^2D/d)$。
        - StreamingLLM（汇点加窗口，静态）和 Quest（由键的最小值和最大值给出每页的上界）是不需训练的近亲。
        """,
    ),
    References(items=(
        ("Yuan, Gao, Dai, Luo, Zhao, Zhang, Xie, Wei, Wang, Xiao, Wang, Ruan, Zhang, Liang, Zeng. 2025. Native "
         "Sparse Attention: Hardware-Aligned and Natively Trainable Sparse Attention. arXiv:2502.11089",
         "https://arxiv.org/abs/2502.11089"),
        ("Xiao, Tian, Chen, Han, Lewis. 2023. Efficient Streaming Language Models with Attention Sinks "
         "(StreamingLLM). arXiv:2309.17453", "https://arxiv.org/abs/2309.17453"),
        ("Tang, Zhao, Zhu, Xiao, Kasikci, Han. 2024. Quest: Query-Aware Sparsity for Efficient Long-Context LLM "
         "Inference. arXiv:2406.10774", "https://arxiv.org/abs/2406.10774"),
    )),
    Exercises(items=(
        Exercise(
            en="""
            Search the gates on a grid of sixths, $(g_{\\text{cmp}}, g_{\\text{sel}}, g_{\\text{win}})$ with
            each a multiple of 1/6 and summing to 1, and set `answer` to the tuple with the lowest relative
            error on section 3's input. Before searching, predict: does the selected branch alone, `(0, 1, 0)`,
            do better than a mix?
            """,
            zh="""
            在以 1/6 为步长的网格上搜索门控系数 $(g_{\\text{cmp}}, g_{\\text{sel}}, g_{\\text{win}})$：每个分量都是
            1/6 的倍数，且三者之和为 1。把第 3 节输入上相对误差最低的三元组赋给 `answer`。搜索之前先预测：
            只用选择分支 `(0, 1, 0)` 会比混合更好吗？
            """,
            hint_en="""
            Loop over `a` and `b` in `range(7)`, set the gates to `(a / 6, b / 6, (6 - a - b) / 6)` when
            `a + b <= 6`, call `nsa_attention(q, k, v, gates=..., **NSA)` and keep the lowest `err(...)`.
            """,
            hint_zh="""
            让 `a` 和 `b` 遍历 `range(7)`，当 `a + b <= 6` 时把门控设为 `(a / 6, b / 6, (6 - a - b) / 6)`，
            调用 `nsa_attention(q, k, v, gates=..., **NSA)`，保留 `err(...)` 最小的一组。
            """,
            solution_en="""
            The best gates are `(3/6, 2/6, 1/6)`, error 0.83, a little better than the equal mix (0.88); the selected
            branch alone is at 1.21. Each branch on its own attends to a different, mostly wrong, set of keys, and
            since the values are noise their errors are partly independent: mixing them averages the errors
            down, as averaging sampled runs did in chapter 4. The compressed branch does not hurt, it helps.
            No gate setting comes close to top-k, because no mix can add mass the branches never read.
            """,
            solution_zh="""
            最好的门控是 `(3/6, 2/6, 1/6)`，误差 0.83，比等权混合（0.88）略好；只用选择分支时为 1.21。
            每个分支单独关注的是不同的、大多不对的一组键；由于值向量是噪声，它们的误差部分相互独立：
            混合起来误差就被平均掉一部分，就像第 4 章对多次采样取平均一样。压缩分支不但没有拖后腿，反而有帮助。
            但没有哪种门控能接近 Top-k，因为混合无法补上各分支都没有读到的权重。
            """,
            self_check="""
            def check_ex1(answer):
                gates = tuple(float(g) for g in answer)
                assert len(gates) == 3 and abs(sum(gates) - 1) < 1e-6 and min(gates) >= 0, tr(
                    "give three non-negative gates that sum to 1", "请给出三个非负且和为 1 的门控系数")
                grid = [(a / 6, b / 6, (6 - a - b) / 6) for a in range(7) for b in range(7 - a)]
                best = min(err(nsa_attention(q, k, v, gates=g, **NSA)) for g in grid)
                mine = err(nsa_attention(q, k, v, gates=gates, **NSA))
                assert mine <= best + 1e-4, tr(f"your gates give {mine:.3f}; some point of the grid gives {best:.3f}",
                                              f"你的门控误差为 {mine:.3f}；网格上有一点能达到 {best:.3f}")
                print(tr(f"Right: error {mine:.3f}, the lowest on the grid.", f"正确：误差 {mine:.3f}，是网格上的最低值。"))
            """,
            solution_code="""
            grid = [(a / 6, b / 6, (6 - a - b) / 6) for a in range(7) for b in range(7 - a)]
            gate_errors = {g: err(nsa_attention(q, k, v, gates=g, **NSA)) for g in grid}
            answer = min(gate_errors, key=gate_errors.get)
            print(tr(f"best gates {tuple(round(g, 3) for g in answer)}: {gate_errors[answer]:.3f}; "
                     f"selected only: {gate_errors[(0.0, 1.0, 0.0)]:.3f}",
                     f"最好的门控 {tuple(round(g, 3) for g in answer)}：{gate_errors[answer]:.3f}；"
                     f"只用选择分支：{gate_errors[(0.0, 1.0, 0.0)]:.3f}"))
            check_ex1(answer)
            """,
            wrong_answer="(0, 1, 0)",
        ),
        Exercise(
            en="""
            Replace mean pooling by max pooling, `compress_fn=lambda b: b.amax(dim=3)`, and set `answer` to the
            mass kept by the selected blocks (averaged over heads and queries, as in section 2). Does it move
            closer to the best 4 blocks' 0.97?
            """,
            zh="""
            用最大池化替换均值池化：`compress_fn=lambda b: b.amax(dim=3)`，把选中块的权重占比（与第 2 节一样对
            注意力头和查询取平均）赋给 `answer`。它是否更接近最好的 4 个块的 0.97？
            """,
            hint_en="""
            Call `nsa_attention` with `compress_fn=...` and `return_maps=True`, then reuse section 2's
            `selected_token_mask` and `mass_kept` on the new `block_indices`.
            """,
            hint_zh="""
            以 `compress_fn=...` 和 `return_maps=True` 调用 `nsa_attention`，再对新的 `block_indices` 套用第 2 节的
            `selected_token_mask` 和 `mass_kept`。
            """,
            solution_en="""
            About 0.31: further from the best blocks than mean pooling's 0.38. The maximum of 16 Gaussian
            keys, coordinate by coordinate, is about +1.8 in every coordinate for every block, so all summaries
            look alike and the one matching key's direction is lost; the mean at least keeps it, at 1/16 of
            its strength. A fixed pooling cannot fix selection; a learned one (NSA's) can.
            """,
            solution_zh="""
            约为 0.31：比均值池化的 0.38 离最好的块更远。16 个高斯键逐坐标取最大值，对每一块、每个坐标都约为 +1.8，
            于是所有摘要看起来都差不多，那个匹配键的方向就丢失了；均值至少还保留了它，只是强度变为 1/16。
            固定的池化方式修正不了选择，学出来的池化（NSA 的做法）才可以。
            """,
            self_check="""
            def check_ex2(answer):
                _, m = nsa_attention(q, k, v, gates=(1 / 3, 1 / 3, 1 / 3), **NSA, return_maps=True,
                                     compress_fn=lambda b: b.amax(dim=3))
                measured = mass_kept(weights, selected_token_mask(m.block_indices, BLOCK, L, causal=False)).mean().item()
                assert abs(float(answer) - measured) < 0.01, tr(
                    f"{float(answer):.3f} is not the mass of the max-pooled selection; did you pass compress_fn?",
                    f"{float(answer):.3f} 不是最大池化时选中块的权重占比；你传入 compress_fn 了吗？")
                print(tr(f"Right: {measured:.3f}, against {selected_mass:.3f} with mean pooling.",
                         f"正确：{measured:.3f}，均值池化时为 {selected_mass:.3f}。"))
            """,
            solution_code="""
            _, max_maps = nsa_attention(q, k, v, gates=(1 / 3, 1 / 3, 1 / 3), **NSA, return_maps=True,
                                        compress_fn=lambda b: b.amax(dim=3))
            max_mask = selected_token_mask(max_maps.block_indices, BLOCK, L, causal=False)
            answer = mass_kept(weights, max_mask).mean().item()
            check_ex2(answer)
            """,
            wrong_answer="selected_mass",
        ),
        Exercise(
            en="""
            Rerun section 3 causally: `synthetic_qkv("retrieval", ..., causal=True)` and `nsa_attention(...,
            causal=True)`. For the first 15 queries no block of 16 has ended yet. Set `answer` to what each of
            their rows of `maps.combined` sums to, and explain.
            """,
            zh="""
            以因果方式重做第 3 节：使用 `synthetic_qkv("retrieval", ..., causal=True)` 和 `nsa_attention(...,
            causal=True)`。对前 15 个查询而言，还没有任何一个 16 词元的块结束。把 `maps.combined` 中它们每一行之和赋给
            `answer`，并解释原因。
            """,
            hint_en="""
            Which branches have any key to look at before the first block ends, and by how much does the
            fixed gate scale the one that does?
            """,
            hint_zh="""
            在第一个块结束之前，哪些分支有键可看？固定的门控系数又把有键可看的那个分支缩放了多少？
            """,
            solution_en="""
            1/3. Before a block has ended, the compressed branch has no visible summary and selection has no
            scored block, so both give zeros; only the sliding window answers, and the fixed gate scales it
            by 1/3. The mix is not renormalised, so those outputs shrink to a third. A trained NSA computes
            its gates from the token, so it can open the window's gate where the other branches are empty.
            """,
            solution_zh="""
            1/3。在任何一块结束之前，压缩分支看不到任何摘要，选择分支也没有打过分的块，两者都输出零；
            只有滑动窗口给出结果，而固定的门控把它乘以 1/3。混合结果不会重新归一化，所以这些输出缩小为三分之一。
            训练好的 NSA 根据词元计算门控，因此可以在其他分支为空的地方把窗口分支的门开大。
            """,
            self_check="""
            _qc, _kc, _vc = synthetic_qkv("retrieval", heads=2, length=L, head_dim=32, seed=0, causal=True)
            _, _causal_maps = nsa_attention(_qc, _kc, _vc, gates=(1 / 3, 1 / 3, 1 / 3), **NSA, causal=True, return_maps=True)
            _early = _causal_maps.combined[..., :BLOCK - 1, :].sum(-1)


            def check_ex3(answer):
                assert torch.allclose(_early, torch.full_like(_early, float(answer)), atol=1e-5), tr(
                    f"the first 15 rows do not sum to {float(answer):.3f}; which branches are empty there?",
                    f"前 15 行之和不是 {float(answer):.3f}；那里哪些分支是空的？")
                print(tr("Right: only the window answers, scaled by its gate.", "正确：只有窗口分支给出结果，并被它的门控系数缩放。"))
            """,
            solution_code="""
            qc, kc, vc = synthetic_qkv("retrieval", heads=2, length=L, head_dim=32, seed=0, causal=True)
            _, causal_maps = nsa_attention(qc, kc, vc, gates=(1 / 3, 1 / 3, 1 / 3), **NSA, causal=True, return_maps=True)
            branch_names = {"compressed": tr("compressed", "压缩"), "selected": tr("selected", "选择"), "sliding": tr("sliding", "滑动")}
            first = {name: getattr(causal_maps, name)[..., :BLOCK - 1, :].sum(-1) for name in branch_names}
            print(tr("row sums over the first 15 queries: ", "前 15 个查询的行和：") + tr(", ", "，").join(
                f"{branch_names[name]} {rows.min().item():.2f} .. {rows.max().item():.2f}" for name, rows in first.items()))
            answer = causal_maps.combined[0, 0, 0].sum().item()
            check_ex3(answer)
            """,
            wrong_answer="1.0",
        ),
    )),
]
