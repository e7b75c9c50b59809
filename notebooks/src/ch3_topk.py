"""Chapter 3: top-k attention, the two-stage (chunked) top-k and the seed's bug, and streaming top-k."""
from _cells import Claim, Code, Exercise, Exercises, Md, Objectives, References, Summary

NUMBER = 3
SLUG = "ch3_topk"
TITLE = {"en": "Top-k attention, chunk by chunk", "zh": "Top-k 注意力与分块计算"}
TERMS = ["top-k selection", "sparse attention", "streaming top-k", "chunk", "candidate", "query", "key", "value",
         "mass kept", "relative error", "memory", "causal", "attention sink"]

CELLS = [
    Objectives(
        en=(
            "write top-k attention as a softmax renormalised over the kept keys, and measure what it loses "
            "(mass kept, relative error) on structured and on flat attention;",
            "read a relative error against the trivial answer 0, whose error is exactly 1;",
            "find the bug in the seed's chunked top-k and prove the two-stage fix: the global top-k lies "
            "in the union of the per-chunk top-k sets;",
            "stream top-k over key chunks in $O(L(k+C))$ memory, and weigh C against the work it costs;",
            "compare the memory of streamed top-k attention with SDPA honestly.",
        ),
        zh=(
            "把 Top-k 注意力写成只在保留的键上重新归一化的 softmax，并在结构化的注意力和平坦的注意力上测量它的损失"
            "（权重占比、相对误差）；",
            "以平凡答案 0 为参照解读相对误差：输出 0 的相对误差恰好为 1；",
            "找出种子代码中分块 Top-k 的错误，并证明两阶段做法的正确性：全局 Top-k 一定在各分块 Top-k 的并集之中；",
            "以 $O(L(k+C))$ 的内存对键分块做流式 Top-k，并权衡分块大小 C 与它带来的计算量；",
            "如实比较流式 Top-k 注意力与 SDPA 的内存。",
        ),
    ),
    Md(
        en="""
        Chapter 1 measured that a few keys hold most of a query's attention. The simplest
        **sparse attention** takes that literally: **top-k selection** keeps, for each **query**,
        the k **keys** with the highest scores $T_k(i)$ and renormalises the softmax over them,

        $$
        o_i^{\\text{top-}k} = \\sum_{j \\in T_k(i)} \\frac{e^{s_{ij}}}{\\sum_{l \\in T_k(i)} e^{s_{il}}}\\, v_j .
        $$

        This chapter measures what that loses, then deals with the practical question of finding
        the top k when a row of scores is too long to hold: by **chunks**, which the project's seed
        code got wrong.
        """,
        zh="""
        第 1 章测得：少数几个键拿走了一个查询的大部分注意力。最简单的 **稀疏注意力** 就照此行事：**Top-k 选择** 为每个
        **查询** 保留得分最高的 k 个 **键** $T_k(i)$，并只在这些键上重新做 softmax 归一化：

        $$
        o_i^{\\text{top-}k} = \\sum_{j \\in T_k(i)} \\frac{e^{s_{ij}}}{\\sum_{l \\in T_k(i)} e^{s_{il}}}\\, v_j .
        $$

        本章先测量这样做损失了什么，再处理一个实际问题：一行得分太长、放不进内存时，如何按 **分块** 找出 Top-k。
        项目最初的种子代码恰恰在这里出了错。
        """,
    ),
    Code("""
        import pandas as pd
        import torch
        import torch.nn.functional as F

        from sparse_attn import viz
        from sparse_attn.metrics import mass_kept, relative_error
        from sparse_attn.ops import dense_attention, topk_attention
        from sparse_attn.sources import synthetic_qkv
        from sparse_attn.timing import peak_tensor_bytes
        from sparse_attn.topk import StreamingTopK, chunked_topk


        def tr(en, zh):
            \"\"\"Text in the notebook's language, for printouts, plot titles and axis labels.\"\"\"
            return zh if LANG == "zh" else en
    """),
    Md(
        en="""
        ## 1. What top-k keeps, and what it loses

        `synthetic_qkv("sink_local", ...)` plants a structure real heads have: each query looks at
        its neighbours and at the first few tokens (an **attention sink**). Two measures against
        dense attention: the **mass kept**, $\\sum_{j \\in T_k(i)} p_{ij}$, and the **relative error**
        of the output, $\\lVert o_i - o_i^{\\text{dense}} \\rVert / \\lVert o_i^{\\text{dense}} \\rVert$,
        both averaged over queries.
        """,
        zh="""
        ## 1. Top-k 保留了什么，又丢掉了什么

        `synthetic_qkv("sink_local", ...)` 植入真实注意力头常有的一种结构：每个查询关注它的邻居和开头的几个词元
        （即 **注意力汇点**）。与稠密注意力相比有两个度量：**权重占比** $\\sum_{j \\in T_k(i)} p_{ij}$，以及输出的
        **相对误差** $\\lVert o_i - o_i^{\\text{dense}} \\rVert / \\lVert o_i^{\\text{dense}} \\rVert$，两者都对所有查询取平均。
        """,
    ),
    Code("""
        L = 256


        def quality(pattern, ks=(4, 16, 64, L)):
            \"\"\"Mass kept (mean and worst query) and relative error of top-k attention on one synthetic pattern.\"\"\"
            q, k, v = synthetic_qkv(pattern, heads=2, length=L, head_dim=32, seed=0)
            ref, weights = dense_attention(q, k, v, return_weights=True)
            rows = []
            for top_k in ks:
                out, sel = topk_attention(q, k, v, top_k, return_selection=True)
                kept = mass_kept(weights, sel)
                rows.append({"k": top_k, "kept_mean": kept.mean().item(), "kept_min": kept.min().item(),
                             "error": relative_error(out, ref).mean().item()})
            return pd.DataFrame(rows).set_index("k")


        columns = {"kept_mean": tr("mass kept, mean", "权重占比（平均）"), "kept_min": tr("mass kept, worst query", "权重占比（最差的查询）"),
                   "error": tr("relative error", "相对误差")}
        sink = quality("sink_local")
        sink.rename(columns=columns).round(4)
    """),
    Claim(
        en="""
        On this pattern, k = 16 (one key in 16) keeps **94.4%** of the mass on average (± 0.5
        points) and 93.8% for the worst query, with a relative error of **0.078** (± 0.005); k = 64
        brings the error to about 0.001, and k = L is dense attention (error below 1e-5).
        """,
        zh="""
        在这种模式下，k = 16（每 16 个键保留 1 个）平均保留 **94.4%** 的权重（± 0.5 个百分点），最差的查询也有 93.8%，
        相对误差为 **0.078**（± 0.005）；k = 64 时误差降到 0.001 左右，k = L 就是稠密注意力（误差低于 1e-5）。
        """,
        check="""
        assert abs(sink.kept_mean[16] - 0.944) < 0.005 and abs(sink.kept_min[16] - 0.938) < 0.005
        assert abs(sink.error[16] - 0.078) < 0.005
        assert abs(sink.error[64] - 0.001) < 0.0005 and sink.error[L] < 1e-5
        """,
    ),
    Md(
        en="""
        Top-k moves the tail's weight onto the kept keys. The picture puts the dense weights of
        head 0 next to the top-16 weights, the selection mask and their difference (log scale):
        """,
        zh="""
        Top-k 把尾部的权重挪到了保留的键上。下图把编号为 0 的头的稠密权重和 Top-16 权重并排显示，并给出选择掩码和两者之差（对数刻度）：
        """,
    ),
    Code("""
        q, k, v = synthetic_qkv("sink_local", heads=2, length=L, head_dim=32, seed=0)
        ref, weights = dense_attention(q, k, v, return_weights=True)
        out16, sel16 = topk_attention(q, k, v, 16, return_selection=True)
        viz.attention_maps(weights[0, 0], sel16.to_dense(L)[0, 0], sel16.mask(L)[0, 0], log=True,
                           method_name=tr("top-16", "Top-16"), lang=LANG).show()
        difference = sel16.to_dense(L) - weights
        picked = sel16.mask(L)
    """),
    Claim(
        en="The difference is **never negative** on the selection and **never positive** anywhere else.",
        zh="差值在被选中的位置 **从不为负**，在其他位置 **从不为正**。",
        check="""
        assert (difference[picked] > -1e-6).all() and (difference[~picked] <= 0).all()
        """,
    ),
    Md(
        en="""
        Structure is what makes top-k work. With random q and k, attention is spread thin and the
        same k keeps far less. There, look at the size of the error:
        """,
        zh="""
        正是结构让 Top-k 奏效。若 q 和 k 是随机的，注意力就摊得很薄，同样的 k 保留的权重少得多。这时请注意误差的大小：
        """,
    ),
    Code("""
        flat = quality("random")
        qr, kr, vr = synthetic_qkv("random", heads=2, length=L, head_dim=32, seed=0)
        ref_r, weights_r = dense_attention(qr, kr, vr, return_weights=True)
        norm_dense = ref_r.norm(dim=-1).mean().item()
        norm_value = vr.norm(dim=-1).mean().item()
        keys_used = (1 / (weights_r**2).sum(-1)).mean().item()  # the effective number of keys a query averages
        error_of_zero = relative_error(torch.zeros_like(ref_r), ref_r).mean().item()
        print(tr(f"‖o_dense‖ = {norm_dense:.2f}, ‖v‖ = {norm_value:.2f}, effective keys per query {keys_used:.0f}; "
                 f"answering 0 has relative error {error_of_zero:.0f}",
                 f"‖o_dense‖ = {norm_dense:.2f}，‖v‖ = {norm_value:.2f}，每个查询实际平均了约 {keys_used:.0f} 个键；"
                 f"输出 0 的相对误差为 {error_of_zero:.0f}"))
        flat.rename(columns=columns).round(4)
    """),
    Claim(
        en="""
        On random inputs top-16 keeps only **29%** (± 1 point) of the mass, and its relative error is
        **2.3** (± 0.1): *larger than 1*, the error of answering 0. The reason is the reference, not
        top-k alone: each query spreads its weight over about **104** keys (± 5), so the dense
        output averages that many random values and nearly cancels, **0.51** against 5.6 for a
        single value (norms, ± 0.05). Dividing by such a small norm makes every miss look large.
        An error above 1 means "worse than outputting zeros": on flat attention, top-k is the wrong
        tool (chapter 4 samples instead).
        """,
        zh="""
        在随机输入上，Top-16 只保留了 **29%**（± 1 个百分点）的权重，相对误差为 **2.3**（± 0.1），*比 1 还大*，
        而 1 正是直接输出 0 的误差。原因不只在 Top-k，还在参照的输出：每个查询把权重摊在约 **104** 个键上（± 5），
        稠密输出是这么多随机值的平均，几乎相互抵消，范数只有 **0.51**，而单个值的范数约为 5.6（范数误差 ± 0.05）。
        除以这么小的范数，任何偏差看起来都很大。误差大于 1 意味着“还不如输出全零”：在平坦的注意力上，Top-k 用错了地方
        （第 4 章改用采样）。
        """,
        check="""
        assert abs(flat.kept_mean[16] - 0.29) < 0.01 and abs(flat.error[16] - 2.3) < 0.1
        assert abs(keys_used - 104) < 5
        assert abs(norm_dense - 0.51) < 0.05 and abs(norm_value - 5.6) < 0.05
        assert error_of_zero == 1.0
        """,
    ),
    Md(
        en="""
        ## 2. The seed's `batched_topk`

        Finding the top k of a long row one chunk at a time is tempting: a row of scores can hold
        hundreds of thousands of keys. The seed split the row into chunks, took the top-k of every
        chunk, and concatenated the results. Here it is, unchanged except for its name, on the
        seed's own demo: two rows of 2048 scores, k = 128, chunks of 1024.
        """,
        zh="""
        ## 2. 种子代码中的 `batched_topk`

        一行得分可能有几十万个键，所以人们很想一次只处理一个分块来求 Top-k。种子代码把一行切成若干分块，对每个分块取
        Top-k，再把结果拼接起来。下面是原样照搬的代码（只改了名字），输入也是种子自带的示例：两行、每行 2048 个得分，
        k = 128，分块大小 1024。
        """,
    ),
    Code("""
        def seed_batched_topk(values, k, dim=-1, chunk_size=1024):
            # The seed's code: per-chunk top-k, concatenated.
            if values.shape[dim] <= chunk_size:
                return torch.topk(values, k, dim=dim)
            num_chunks = (values.shape[dim] + chunk_size - 1) // chunk_size
            topk_values, topk_indices = [], []
            for i in range(num_chunks):
                start, end = i * chunk_size, min((i + 1) * chunk_size, values.shape[dim])
                chunk_values = values.index_select(dim, torch.arange(start, end, device=values.device))
                v, idx = torch.topk(chunk_values, min(k, end - start), dim=dim)
                topk_values.append(v)
                topk_indices.append(idx + start)
            return torch.cat(topk_values, dim=dim), torch.cat(topk_indices, dim=dim)


        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 2048, generator=g)
        k = 128
        seed_values, seed_indices = seed_batched_topk(x, k)
        true = torch.topk(x, k)
        print(tr(f"seed: {tuple(seed_values.shape)}, torch.topk: {tuple(true.values.shape)}",
                 f"种子代码：{tuple(seed_values.shape)}，torch.topk：{tuple(true.values.shape)}"))
    """),
    Claim(
        en="The seed returns **256** values per row: two chunks times k = 128, twice what was asked for.",
        zh="种子代码每行返回 **256** 个值：两个分块各 k = 128 个，是所要数量的两倍。",
        check="""
        assert seed_values.shape == (2, 256) and seed_values.shape[-1] == 2 * k
        """,
    ),
    Md(
        en="""
        Keeping only the first k of that output does not help: those are simply the first chunk's
        winners. How many of the true top-128 are among them?
        """,
        zh="""
        只保留这个输出的前 k 个也无济于事：它们只是第一个分块的胜出者。其中有多少属于真正的 Top-128？
        """,
    ),
    Code("""
        def overlap(a, b):
            \"\"\"Share of the indices in each row of b that also appear in the same row of a.\"\"\"
            return torch.tensor([len(set(ra.tolist()) & set(rb.tolist())) / len(rb) for ra, rb in zip(a, b)])


        missed = 1 - overlap(seed_indices[:, :k], true.indices)
        in_first_chunk = (true.indices < 1024).sum(-1)
        print(tr(f"share of the true top-128 missed, per row: {missed.tolist()}; true winners in the first chunk: "
                 f"{in_first_chunk.tolist()}",
                 f"每行漏掉的真正 Top-128 的比例：{missed.tolist()}；真正的胜出者落在第一个分块中的个数：{in_first_chunk.tolist()}"))
    """),
    Claim(
        en="""
        Truncated to k, the seed's answer misses **47%** of the true top-128 in each row (46.9% and
        46.1%, within 0.05 of one half). One half is what to expect: each of the true winners lies in
        either chunk with equal chance, and only the first chunk's are kept, so the share missed is
        exactly 1 − (true winners in the first chunk) / 128.
        """,
        zh="""
        截断到 k 个之后，种子代码的结果每行漏掉了真正 Top-128 中的 **47%**（两行分别为 46.9% 和 46.1%，与一半相差不到 0.05）。
        一半正是预期的比例：每个真正的胜出者落在两个分块中的机会相等，而只有第一个分块的被保留下来，
        所以漏掉的比例恰好是 1 − （落在第一个分块中的真正胜出者个数）/ 128。
        """,
        check="""
        assert (abs(missed - 0.5) < 0.05).all(), missed
        assert torch.equal(missed, 1 - in_first_chunk / 128)
        """,
    ),
    Md(
        en="""
        ## 3. The two-stage fix

        Split the indices of a row into chunks $C_1, \\dots, C_m$ and write $T_k(S)$ for the top-k set
        of the entries in $S$. Then

        $$
        T_k(\\text{row}) \\subseteq \\bigcup_{c=1}^{m} T_k(C_c) ,
        \\qquad\\text{hence}\\qquad
        T_k(\\text{row}) = T_k\\Big(\\bigcup_{c} T_k(C_c)\\Big) .
        $$

        Proof: if an entry of chunk $C_c$ is not in $T_k(C_c)$, then k entries of its own chunk beat
        it, so at least k entries of the row beat it, and it is not in $T_k(\\text{row})$. So chunking
        is correct in two stages: **every chunk nominates its top-k as candidates (stage 1), then
        one final top-k over the candidates picks the answer (stage 2)**. Stage 2 sees
        $m \\cdot \\min(k, |C|)$ candidates. `sparse_attn.topk.chunked_topk` does exactly that. The
        picture shows it on a short row: red bars are each chunk's candidates, blue bars the final
        answer.
        """,
        zh="""
        ## 3. 两阶段的正确做法

        把一行的下标分成若干分块 $C_1, \\dots, C_m$，记 $T_k(S)$ 为集合 $S$ 中元素的 Top-k 集合，则

        $$
        T_k(\\text{整行}) \\subseteq \\bigcup_{c=1}^{m} T_k(C_c) ,
        \\qquad\\text{因而}\\qquad
        T_k(\\text{整行}) = T_k\\Big(\\bigcup_{c} T_k(C_c)\\Big) .
        $$

        证明：若分块 $C_c$ 中的某个元素不在 $T_k(C_c)$ 中，那么它自己的分块里就有 k 个元素比它大，整行中至少也有 k 个元素比它大，
        所以它不在 $T_k(\\text{整行})$ 中。因此，分块只有分两阶段才正确：**每个分块先选出自己的 Top-k 作为候选（第一阶段），
        再对所有候选做一次 Top-k 得到答案（第二阶段）**。第二阶段要看 $m \\cdot \\min(k, |C|)$ 个候选。
        `sparse_attn.topk.chunked_topk` 正是这样做的。下图在一个短行上演示：红色柱是各分块的候选，蓝色柱是最终答案。
        """,
    ),
    Code("""
        small = torch.randn(24, generator=g)
        viz.chunked_topk_figure(small, k=4, chunk_size=8, lang=LANG).show()
    """),
    Code("""
        chunk_sizes = [1, 7, 100, 1000, 2048, 5000]
        agree = {c: torch.equal(chunked_topk(x, k, chunk_size=c).values, true.values) for c in chunk_sizes}
        candidates = torch.cat([torch.topk(part, k).indices + s for s, part in zip((0, 1024), x.split(1024, dim=-1))], -1)
        covered = overlap(candidates, true.indices)
        print(tr(f"equal to torch.topk for every chunk size: {all(agree.values())}; share of the true top-128 "
                 f"among the stage-1 candidates: {covered.tolist()}",
                 f"所有分块大小下都与 torch.topk 相同：{all(agree.values())}；第一阶段候选中包含的真正 Top-128 的比例："
                 f"{covered.tolist()}"))
    """),
    Claim(
        en="""
        `chunked_topk` returns **exactly** `torch.topk`'s values for every chunk size tried, from 1
        to more than the row length, and the stage-1 **candidates** contain **all** of the true
        top-128, as the proof says.
        """,
        zh="""
        对试过的每一种分块大小（从 1 到超过行长），`chunked_topk` 返回的值与 `torch.topk` **完全相同**；第一阶段的
        **候选** 包含了真正 Top-128 的 **全部** 元素，与证明一致。
        """,
        check="""
        assert all(agree.values()), agree
        assert (covered == 1).all(), covered
        """,
    ),
    Md(
        en="""
        ## 4. Streaming top-k

        If the whole row is already in memory, chunking cannot save the row itself. What it can
        save is the row that is *never built*: in attention, scores are made one key chunk at a
        time. `StreamingTopK` keeps a running top-k and merges each new chunk into it, applying the
        fact above one chunk at a time (the running top-k is the candidate set of everything seen
        so far). A row then needs at most **k + C** values at once (C the chunk size) instead of all
        L. We stream rows of L = 8192 scores and record the most values a row needed at once.
        """,
        zh="""
        ## 4. 流式 Top-k

        如果整行数据本来就在内存里，分块省不下这一行本身。它能省下的是那一行 *从未被构造出来* 的数据：在注意力中，
        得分是按键的分块逐块算出来的。`StreamingTopK` 动态维护当前的 Top-k，把每个新分块合并进去，相当于每来一个分块就用一次上面的结论
        （当前的 Top-k 就是此前所有数据的候选集合）。这样，每一行同时最多只需存放 **k + C** 个值（C 为分块大小），
        而不是全部 L 个。下面把 L = 8192 个得分逐块送入，并记录每行同时最多需要存放多少个值。
        """,
    ),
    Code("""
        L_row = 8192
        rows = torch.randn(4, L_row, generator=g)


        def stream(rows, k, chunk):
            \"\"\"Run StreamingTopK over the rows; return the result and the most values a row needed at once.\"\"\"
            acc, most = StreamingTopK(k), 0
            for start in range(0, rows.shape[-1], chunk):
                part = rows[:, start:start + chunk]
                kept = 0 if acc.values is None else acc.values.shape[-1]
                most = max(most, kept + part.shape[-1])  # update() merges the running top-k with the new chunk
                acc.update(part, offset=start)
            return acc.result(), most


        table = []
        for k_, chunk in [(64, 256), (64, 1024), (512, 1024), (4096, 1024), (64, 8192)]:
            res, most = stream(rows, k_, chunk)
            assert torch.equal(res.values, torch.topk(rows, k_).values)
            table.append({"k": k_, "C": chunk, "held": most, "saving": L_row / most})
        table = pd.DataFrame(table)
        table.rename(columns={"held": tr("values per row at once", "每行同时存放的值"),
                              "saving": tr("L / that", "L / 该值")}).round(2)
    """),
    Claim(
        en="""
        Every streamed result equals `torch.topk`, and a row never needs more than k + C values:
        with k = 64 and C = 256 that is 320, **25.6×** fewer than the full row; with k = 4096 the
        saving drops to **1.6×**, and with C = L it is **1×**, none at all.
        """,
        zh="""
        每次流式计算的结果都与 `torch.topk` 相同，每行同时存放的值从不超过 k + C 个：k = 64、C = 256 时为 320 个，
        只有整行的 **1/25.6**；k = 4096 时是整行的 **1/1.6**，省得不多；C = L 时就是整行，**毫无节省**。
        """,
        check="""
        # The first chunk meets an empty running top-k, so a row needs min(k, L - C) + C values at most.
        assert (table.held == table.k.clip(upper=L_row - table.C) + table.C).all()
        assert table.held[0] == 320 and table.saving[0] == 25.6
        assert abs(table.saving[3] - 1.6) < 0.01 and table.saving[4] == 1.0
        """,
    ),
    Md(
        en="""
        Memory per row is $k + C$, smallest at C = 1. But every step runs a top-k over the running k
        and the new C values, and there are $L / C$ steps, so the work is about
        $\\frac{L}{C}(k + C) = L + \\frac{Lk}{C}$ values: C = 1 costs k + 1 times the row. A C of a few
        times k keeps both memory and work close to their minimum (exercise 2 counts it). The
        same rule holds for the two-stage `chunked_topk` over a row already in memory: stage 2 sees
        $\\lceil L/C \\rceil \\cdot \\min(k, C)$ candidates, and when k ≥ C every chunk nominates all
        its entries and stage 2 sorts the whole row again:
        """,
        zh="""
        每行的内存是 $k + C$，在 C = 1 时最小。但每一步都要对当前的 k 个值和新来的 C 个值做一次 Top-k，共 $L / C$ 步，
        所以计算量约为 $\\frac{L}{C}(k + C) = L + \\frac{Lk}{C}$ 个值：C = 1 时是整行的 k + 1 倍。C 取 k 的几倍，就能让内存和计算量
        都接近各自的最小值（练习 2 会算出具体数字）。对已经在内存中的一行做两阶段的 `chunked_topk`，道理相同：
        第二阶段要看 $\\lceil L/C \\rceil \\cdot \\min(k, C)$ 个候选；当 k ≥ C 时，每个分块都要送出自己的全部元素，第二阶段又要对整行排序：
        """,
    ),
    Code("""
        def candidates_per_row(L, k, chunk):
            # What stage 1 of chunked_topk hands to stage 2: min(k, chunk) from every chunk.
            return sum(min(k, len(range(s, min(s + chunk, L)))) for s in range(0, L, chunk))


        few = candidates_per_row(L_row, 64, 1024)
        everything = candidates_per_row(L_row, 1024, 512)
        print(tr(f"candidates for stage 2: {few} (k = 64, C = 1024), {everything} (k = 1024, C = 512)",
                 f"第二阶段的候选数：{few}（k = 64，C = 1024），{everything}（k = 1024，C = 512）"))
    """),
    Claim(
        en="With k = 64 and C = 1024, stage 2 sees **512** candidates out of 8192; with k = 1024 and C = 512 it sees **all 8192**.",
        zh="k = 64、C = 1024 时，第二阶段只看 8192 个中的 **512** 个候选；k = 1024、C = 512 时它要看 **全部 8192 个**。",
        check="""
        assert few == 512 and everything == L_row == 8192
        """,
    ),
    Md(
        en="""
        ## 5. Streaming top-k attention, and its memory against SDPA

        Done naively, top-k attention builds the whole $L \\times L$ score matrix and then selects.
        `topk_attention(..., chunk_size=C)` instead scores one block of queries against one chunk
        of keys at a time and merges each tile into a running top-k, the **streaming top-k** of
        section 4. The answer does not change, with or without a **causal** mask. (When several
        keys tie exactly at the k-th score, which one is kept is arbitrary, as in `torch.topk`; the
        random inputs below have no ties.)
        """,
        zh="""
        ## 5. 流式 Top-k 注意力及其与 SDPA 的内存对比

        朴素的 Top-k 注意力先构造完整的 $L \\times L$ 得分矩阵再做选择。`topk_attention(..., chunk_size=C)` 则每次只让一块查询
        与一个键分块计算得分，并把每个小块合并进当前的 Top-k，也就是第 4 节的 **流式 Top-k**。无论是否使用 **因果** 掩码，
        结果都不变。（若有几个键的得分在第 k 位恰好相等，保留哪一个是任意的，和 `torch.topk` 一样；下面的随机输入没有这种并列。）
        """,
    ),
    Code("""
        same = {}
        for causal in (False, True):
            full, sel_full = topk_attention(qr, kr, vr, 16, causal=causal, return_selection=True)
            streamed, sel_streamed = topk_attention(qr, kr, vr, 16, causal=causal, chunk_size=64, return_selection=True)
            same[causal] = (torch.allclose(full, streamed, atol=1e-6, rtol=0)
                            and torch.equal(sel_full.mask(L), sel_streamed.mask(L)))
        print(tr(f"same keys and output, non-causal: {same[False]}, causal: {same[True]}",
                 f"键与输出都相同，非因果：{same[False]}，因果：{same[True]}"))
    """),
    Claim(
        en="Streaming in chunks of 64 keys selects **the same keys** and gives **the same output** (to 1e-6) as scoring all keys at once, causal or not.",
        zh="以 64 个键为一个分块流式计算，与一次性为所有键打分相比，选中 **相同的键**、给出 **相同的输出**（误差在 1e-6 以内），因果与否都一样。",
        check="""
        assert same == {False: True, True: True}, same
        """,
    ),
    Md(
        en="""
        Memory, measured with the counter of chapter 2, which the library keeps as
        `sparse_attn.timing.peak_tensor_bytes`: a `TorchDispatchMode` adds up the bytes of
        every tensor an operation creates, subtracts them when it is freed, and keeps the peak
        (scratch space inside one fused kernel is invisible to it). SDPA is the dense baseline.
        """,
        zh="""
        下面用第 2 章的计数器测量内存（库中的 `sparse_attn.timing.peak_tensor_bytes` 就是它）：`TorchDispatchMode` 把每个运算新建张量的字节数加上，张量释放时再减去，并记下峰值
        （单个融合内核内部的临时空间它看不到）。稠密基线是 SDPA。
        """,
    ),
    Code("""
        def peak_mib(fn):
            return peak_tensor_bytes(fn) / 2**20


        mem = []
        for n in (256, 512, 1024, 2048):
            qn, kn, vn = synthetic_qkv("random", heads=2, length=n, head_dim=32, seed=0)
            runs = {"all_scores": lambda: topk_attention(qn, kn, vn, 16),
                    "streamed": lambda: topk_attention(qn, kn, vn, 16, chunk_size=128),
                    "sdpa": lambda: F.scaled_dot_product_attention(qn, kn, vn)}
            mem += [dict(seq_len=n, method=name, peak_mib=peak_mib(fn)) for name, fn in runs.items()]
        mem = pd.DataFrame(mem)
        peaks = mem.pivot(index="seq_len", columns="method", values="peak_mib")[["all_scores", "streamed", "sdpa"]]
        names = {"all_scores": tr("top-k, all scores", "Top-k，一次算全部得分"),
                 "streamed": tr("top-k, streamed (C = 128)", "Top-k，流式（C = 128）"),
                 "sdpa": tr("SDPA (dense, fused)", "SDPA（稠密，融合内核）")}
        peaks.rename(columns=names).rename_axis(index="L", columns=tr("peak MiB", "峰值 MiB")).round(3)
    """),
    Code("""
        fig = viz.scaling_plot(mem, x="seq_len", y="peak_mib", spread=None, color="method", names=names,
                               title=tr("Peak memory of the tensors each approach creates (H = 2, D = 32, k = 16)",
                                        "各做法所建张量的峰值内存（H = 2，D = 32，k = 16）"),
                               y_title=tr("peak memory (MiB)", "峰值内存 (MiB)"), lang=LANG)
        fig.update_xaxes(tickvals=list(peaks.index))
        fig.show()
    """),
    Claim(
        en="""
        At L = 1024, all-scores top-k peaks at **9.5 MiB** and streamed top-k (C = 128) at
        **1.52 MiB** (± 0.05 each): streaming saves **6.2×** (± 0.3), and doubling L multiplies
        its peak by 1.7 (± 0.1), not 4. But SDPA, which is exact, peaks at **0.26 MiB**, **5.9×**
        (± 0.3) less than streamed top-k: per query it keeps D outputs and one log-sum-exp, while
        top-k keeps k scores and k int64 indices besides.
        """,
        zh="""
        L = 1024 时，一次算全部得分的 Top-k 峰值为 **9.5 MiB**，流式 Top-k（C = 128）为 **1.52 MiB**（误差各 ± 0.05）：
        流式计算把峰值降到原来的 **1/6.2**（± 0.3），而且 L 翻倍时峰值只变为 1.7 倍（± 0.1），而不是 4 倍。但结果精确的 SDPA
        峰值只有 **0.26 MiB**，流式 Top-k 的峰值是它的 **5.9 倍**（± 0.3）：
        它为每个查询只存 D 个输出和一个 log-sum-exp，而 Top-k 还要另存 k 个得分和 k 个 int64 下标。
        """,
        check="""
        full1k, streamed1k, sdpa1k = peaks.loc[1024, "all_scores"], peaks.loc[1024, "streamed"], peaks.loc[1024, "sdpa"]
        assert abs(full1k - 9.5) < 0.05 and abs(streamed1k - 1.52) < 0.05
        assert abs(full1k / streamed1k - 6.2) < 0.3
        assert abs(streamed1k / sdpa1k - 5.9) < 0.3
        assert abs(peaks.loc[2048, "streamed"] / streamed1k - 1.7) < 0.1
        """,
    ),
    Md(
        en="""
        The honest verdict: top-k attention, even streamed, is **not** a memory saving over a
        fused dense kernel, and it still computes all $L^2$ scores, so it saves no score FLOPs
        either. What it buys is the weighted sum over k values instead of L, and, in generation, a
        selection that cheaper methods try to approximate without scoring every key: sampling with
        hashes (chapter 4) and block summaries (chapter 5).
        """,
        zh="""
        实事求是地说：Top-k 注意力即使流式计算，相对于融合的稠密内核也 **不** 省内存；它仍要算出全部 $L^2$ 个得分，
        所以得分部分的浮点运算量也没有省下。它换来的是只对 k 个值而不是 L 个值加权求和；在生成时，它给出了一个选择结果，
        更便宜的方法试图不给每个键打分就近似出这个结果：基于哈希的采样（第 4 章）和基于块摘要的方法（第 5 章）。
        """,
    ),
    Summary(
        en="""
        - Top-k attention renormalises the softmax over each query's k best keys. On structured
          attention (sink + local) k = 16 of 256 keeps 94% of the mass with a relative error of 0.08;
          on flat attention it keeps 29% and its error, 2.3, is worse than answering 0 (error 1),
          because the dense output nearly cancels.
        - Chunked top-k is correct only in two stages: $T_k(\\text{row}) \\subseteq \\bigcup_c T_k(C_c)$.
          The seed concatenated the per-chunk winners, returning 2k values and, truncated, missing
          about half of the true top-k.
        - Streaming top-k needs $k + C$ values per row and about $L(1 + k/C)$ work: pick C a few
          times k, not 1.
        - Streamed top-k attention is exact top-k in $O(L(k+C))$ memory, 6.2× less than scoring all
          keys at L = 1024, yet 5.9× more than SDPA; its score pass is still quadratic.
        """,
        zh="""
        - Top-k 注意力只在每个查询最好的 k 个键上重新归一化 softmax。在结构化的注意力（汇点 + 局部）上，256 个键中取 k = 16
          就保留了 94% 的权重，相对误差为 0.08；在平坦的注意力上只保留 29%，误差 2.3，比直接输出 0（误差为 1）还差，
          因为稠密输出几乎相互抵消。
        - 分块 Top-k 只有分两阶段才正确：$T_k(\\text{整行}) \\subseteq \\bigcup_c T_k(C_c)$。种子代码把各分块的胜出者直接拼接，
          返回 2k 个值，截断后漏掉约一半真正的 Top-k。
        - 流式 Top-k 每行只需存放 $k + C$ 个值，计算量约为 $L(1 + k/C)$：C 应取 k 的几倍，而不是 1。
        - 流式 Top-k 注意力以 $O(L(k+C))$ 的内存给出精确的 Top-k 结果，L = 1024 时内存只有一次算全部得分时的 1/6.2，
          却仍是 SDPA 的 5.9 倍；它的打分仍是平方复杂度。
        """,
    ),
    References(items=(
        ("Milakov, Gimelshein. 2018. Online normalizer calculation for softmax (fused softmax and top-k). "
         "arXiv:1805.02867", "https://arxiv.org/abs/1805.02867"),
        ("Dao, Fu, Ermon, Rudra, Ré. 2022. FlashAttention: Fast and Memory-Efficient Exact Attention with "
         "IO-Awareness. arXiv:2205.14135", "https://arxiv.org/abs/2205.14135"),
        ("Xiao, Tian, Chen, Han, Lewis. 2023. Efficient Streaming Language Models with Attention Sinks "
         "(StreamingLLM). arXiv:2309.17453", "https://arxiv.org/abs/2309.17453"),
        ("Tang, Zhao, Zhu, Xiao, Kasikci, Han. 2024. Quest: Query-Aware Sparsity for Efficient Long-Context "
         "LLM Inference. arXiv:2406.10774", "https://arxiv.org/abs/2406.10774"),
        ("PyTorch documentation: torch.topk", "https://pytorch.org/docs/stable/generated/torch.topk.html"),
    )),
    Exercises(items=(
        Exercise(
            en="""
            Change the seed's demo to k = 1500 with chunks of 1024. What shape does
            `seed_batched_topk(x, 1500)` return? Set `answer` to that shape as a tuple, and check
            whether `chunked_topk` still agrees with `torch.topk`.
            """,
            zh="""
            把种子示例改为 k = 1500、分块大小 1024。`seed_batched_topk(x, 1500)` 返回什么形状？把这个形状以元组形式赋给 `answer`，
            再检查 `chunked_topk` 是否仍与 `torch.topk` 一致。
            """,
            hint_en="Each chunk contributes `min(k, chunk length)` values, not k.",
            hint_zh="每个分块贡献的是 `min(k, 分块长度)` 个值，而不是 k 个。",
            solution_en="""
            Each of the two chunks has only 1024 entries, so each contributes all of them: the seed
            returns **(2, 2048)**, every entry of the row (sorted only within its chunk), instead of
            (2, 1500). `chunked_topk` agrees
            with `torch.topk`: with k ≥ C every chunk nominates everything, and stage 2 is a plain
            top-k of the row.
            """,
            solution_zh="""
            两个分块各只有 1024 个元素，所以都把全部元素交了出来：种子代码返回 **(2, 2048)**，即整行的全部元素（只在各自的分块内排好了序），而不是 (2, 1500)。
            `chunked_topk` 与 `torch.topk` 一致：k ≥ C 时每个分块送出全部元素，第二阶段就是对整行直接求 Top-k。
            """,
            self_check="""
            def check_ex1(answer):
                assert tuple(answer) != (2, 3000), tr("A chunk cannot give more values than it has.", "一个分块给不出比它自身元素还多的值。")
                assert tuple(answer) == tuple(seed_batched_topk(x, 1500)[0].shape), tr(
                    f"{tuple(answer)} is not what the seed returns: run it and look at .shape.",
                    f"{tuple(answer)} 不是种子代码返回的形状：运行它并查看 .shape。")
                assert torch.equal(chunked_topk(x, 1500).values, torch.topk(x, 1500).values)
                print(tr(f"Right: {tuple(answer)}, and chunked_topk still equals torch.topk.",
                         f"正确：{tuple(answer)}，而 chunked_topk 仍与 torch.topk 相同。"))
            """,
            solution_code="""
            answer = tuple(seed_batched_topk(x, 1500)[0].shape)
            check_ex1(answer)
            """,
            wrong_answer="(2, 3000)",
        ),
        Exercise(
            en="""
            Memory per row is smallest at C = 1. Count what that costs: for L = 8192 and k = 64, the
            number of values that pass through `torch.topk` over the whole stream (at each step, the
            running top-k plus the new chunk), for C in 1, 64, 256 and 1024. Set `answer` to a dict
            `{C: count}`.
            """,
            zh="""
            每行的内存在 C = 1 时最小。算一算它的代价：L = 8192、k = 64 时，对 C 取 1、64、256、1024，分别统计整个流式过程中经过
            `torch.topk` 的值的总数（每一步是当前的 Top-k 加上新的分块）。把结果以字典 `{C: 个数}` 的形式赋给 `answer`。
            """,
            hint_en="""
            Copy `stream` and add up `kept + part.shape[-1]` at every step instead of taking the maximum.
            Compare with $L + (L/C)\\,k$.
            """,
            hint_zh="""
            复制 `stream`，把每一步的 `kept + part.shape[-1]` 累加起来，而不是取最大值。与 $L + (L/C)\\,k$ 比较。
            """,
            solution_en="""
            530,400 values for C = 1 (65 times the row), 16,320 for C = 64, 10,176 for C = 256 and
            8,640 for C = 1024, close to $L + (L/C)k$. Memory ($k + C$) falls as C shrinks while work
            rises: C = 256 needs 320 values per row and only 1.24 times the row's work, close to the
            best of both.
            """,
            solution_zh="""
            C = 1 时为 530,400 个值（整行的 65 倍），C = 64 时为 16,320，C = 256 时为 10,176，C = 1024 时为 8,640，都与
            $L + (L/C)k$ 接近。C 越小，内存（$k + C$）越少，计算量却越大：C = 256 时每行只需存放 320 个值，计算量只是整行的 1.24 倍，
            两方面都接近最优。
            """,
            self_check="""
            def check_ex2(answer):
                L_, k_ = 8192, 64
                expected = {}
                for C in (1, 64, 256, 1024):
                    expected[C] = sum(min(k_, s) + min(C, L_ - s) for s in range(0, L_, C))
                assert set(answer) == set(expected), tr(f"Give counts for C in {sorted(expected)}.", f"请给出 C 取 {sorted(expected)} 时的个数。")
                wrong = {C: a for C, a in answer.items() if a != expected[C]}
                assert not wrong, tr(f"Not right for C in {sorted(wrong)}: at every step count the running top-k (up to k) plus the chunk.",
                                     f"C 取 {sorted(wrong)} 时不对：每一步都要算上当前的 Top-k（最多 k 个）和新的分块。")
                print(tr(f"Right: {answer}", f"正确：{answer}"))
            """,
            solution_code="""
            def work(rows, k, chunk):
                acc, total = StreamingTopK(k), 0
                for start in range(0, rows.shape[-1], chunk):
                    part = rows[:, start:start + chunk]
                    total += (0 if acc.values is None else acc.values.shape[-1]) + part.shape[-1]
                    acc.update(part, offset=start)
                return total


            answer = {C: work(rows[:1], 64, C) for C in (1, 64, 256, 1024)}
            check_ex2(answer)
            """,
            wrong_answer="{1: 8192, 64: 8192, 256: 8192, 1024: 8192}",
        ),
        Exercise(
            en="""
            On the `local` pattern (use `quality("local", ks=range(1, 33))`), find the smallest k for
            which **every** query keeps at least 90% of its mass. Set `answer` to it. Is it the same
            as the smallest k whose *mean* reaches 90%?
            """,
            zh="""
            在 `local` 模式上（用 `quality("local", ks=range(1, 33))`），找出能让 **每一个** 查询的权重占比都至少为 90% 的最小 k，
            赋给 `answer`。它和让 *平均* 权重占比达到 90% 的最小 k 一样吗？
            """,
            hint_en="Look at the `kept_min` column, not `kept_mean`.",
            hint_zh="看 `kept_min` 这一列，而不是 `kept_mean`。",
            solution_en="""
            **k = 16**: at k = 15 the worst query keeps 89.3%. The mean reaches 90% already at
            k = 14. A budget chosen on the mean leaves some queries below the target; what breaks a
            model is the worst query, not the average one.
            """,
            solution_zh="""
            **k = 16**：k = 15 时最差的查询只有 89.3%。而平均值在 k = 14 时就已达到 90%。按平均值选预算，会有一部分查询达不到目标；
            拖垮模型的是最差的查询，而不是平均水平的查询。
            """,
            self_check="""
            def check_ex3(answer):
                worst = quality("local", ks=range(1, 33)).kept_min
                assert worst[answer] >= 0.9, tr(f"At k = {answer} the worst query keeps only {worst[answer]:.3f}.",
                                                f"k = {answer} 时最差的查询只有 {worst[answer]:.3f}。")
                assert answer == 1 or worst[answer - 1] < 0.9, tr("A smaller k is enough.", "更小的 k 就够了。")
                print(tr(f"Right: k = {answer}.", f"正确：k = {answer}。"))
            """,
            solution_code="""
            local = quality("local", ks=range(1, 33))
            answer = int(local.index[local.kept_min >= 0.9][0])
            print(tr(f"mean reaches 0.9 at k = {int(local.index[local.kept_mean >= 0.9][0])}",
                     f"平均值在 k = {int(local.index[local.kept_mean >= 0.9][0])} 时达到 0.9"))
            check_ex3(answer)
            """,
            wrong_answer="answer - 1",
        ),
    )),
]
