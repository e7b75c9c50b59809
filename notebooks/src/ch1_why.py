"""Chapter 1: why sparse attention — quadratic cost, the KV cache read per token, and how concentrated attention is."""
from _cells import Claim, Code, Exercise, Exercises, Md, Objectives, References, Summary

NUMBER = 1
SLUG = "ch1_why"
TITLE = {"en": "Why sparse attention?", "zh": "为什么需要稀疏注意力？"}
TERMS = ["attention", "dense attention", "sparse attention", "query", "key", "value", "head", "token", "FLOPs",
         "KV cache", "mass kept", "top-k selection", "attention sink"]

CELLS = [
    Objectives(
        en=(
            "write dense attention as a formula and count its FLOPs, $4L^2D$ per head, and see the quadratic "
            "growth in measured time;",
            "compute the bytes of KV cache a model reads for every token it generates, "
            "$2 \\cdot \\text{layers} \\cdot H_{kv} \\cdot D \\cdot L \\cdot \\text{bytes}$, for a real model shape;",
            "measure, on a real model, how much of each query's attention its top few keys hold (the mass kept);",
            "name what each method in this course gives up in exchange for reading fewer keys.",
        ),
        zh=(
            "写出稠密注意力的公式，算出它的浮点运算量（每个注意力头 $4L^2D$），并在实测时间里看到平方增长；",
            "对一个真实的模型规模，算出每生成一个词元要读取多少字节的 KV 缓存："
            "$2 \\cdot \\text{层数} \\cdot H_{kv} \\cdot D \\cdot L \\cdot \\text{字节数}$；",
            "在真实模型上测量每个查询得分最高的少数几个键拿走了多少注意力权重（即权重占比）；",
            "说出本课程中的每种方法为了少读键各自付出了什么代价。",
        ),
    ),
    Md(
        en="""
        Every token a language model processes asks a question of all the tokens before it. That
        question is **attention**, and done exactly (**dense attention**) it costs time that grows
        with the square of the context length and, when the model generates text, memory traffic
        that grows with the context for *every single new token*. This chapter measures both costs,
        then measures the fact that makes **sparse attention** possible: most of a query's attention
        lands on a few keys.
        """,
        zh="""
        语言模型处理的每个词元，都要向它之前的所有词元“提问”，这就是 **注意力**。精确地计算它
        （即 **稠密注意力**），耗时随上下文长度的平方增长；模型生成文本时，*每生成一个新词元*，
        都要把与上下文等长的数据从显存里读一遍。本章先测量这两种开销，再测量让 **稀疏注意力** 成为可能的那个事实：
        一个查询的注意力，大部分落在少数几个键上。
        """,
    ),
    Code("""
        import math
        import time
        import warnings

        import pandas as pd
        import plotly.graph_objects as go
        import torch
        import torch.nn.functional as F
        from torch.utils.flop_counter import FlopCounterMode
        warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm, imported by transformers
        from transformers.utils import logging as hf_logging

        from sparse_attn.metrics import mass_kept
        from sparse_attn.ops import dense_attention, topk_attention
        from sparse_attn.sources import Source, load

        hf_logging.disable_progress_bar()  # the model below loads without a progress bar


        def tr(en, zh):
            \"\"\"Text in the notebook's language, for printouts, plot titles and axis labels.\"\"\"
            return zh if LANG == "zh" else en
    """),
    Md(
        en="""
        ## 1. Dense attention costs $O(L^2 D)$

        For one **head**, stack the L **query**, **key** and **value** vectors (each of dimension D)
        as the rows of $Q, K, V \\in \\mathbb{R}^{L \\times D}$. Dense attention is

        $$
        O = \\operatorname{softmax}\\!\\left(\\frac{QK^\\top}{\\sqrt{D}}\\right) V ,
        \\qquad o_i = \\sum_{j=1}^{L} p_{ij}\\, v_j ,
        \\qquad p_{ij} = \\frac{e^{s_{ij}}}{\\sum_{l} e^{s_{il}}},\\quad s_{ij} = \\frac{q_i \\cdot k_j}{\\sqrt{D}} .
        $$

        The score matrix $QK^\\top$ has $L^2$ entries, each a dot product of length D: $L^2 D$
        multiply-adds. Weighting the values, $PV$, is another $L^2 D$. A multiply-add is two
        floating-point operations, so one head costs

        $$ \\text{FLOPs} = 2 L^2 D + 2 L^2 D = 4 L^2 D . $$

        We count them with PyTorch's `FlopCounterMode` on the library's from-scratch
        `dense_attention` (on the `meta` device, which has shapes but no data, so counting is free),
        and time PyTorch's fused `scaled_dot_product_attention` (SDPA), the dense baseline
        throughout this course. We time with `time.process_time`, the CPU time of this process,
        which other programs on a busy machine do not inflate; each length runs five times, in
        turns, and we keep the fastest run.
        """,
        zh="""
        ## 1. 稠密注意力的开销是 $O(L^2 D)$

        对一个 **注意力头**，把 L 个 **查询**、**键** 和 **值** 向量（维度都是 D）按行排成矩阵
        $Q, K, V \\in \\mathbb{R}^{L \\times D}$。稠密注意力为

        $$
        O = \\operatorname{softmax}\\!\\left(\\frac{QK^\\top}{\\sqrt{D}}\\right) V ,
        \\qquad o_i = \\sum_{j=1}^{L} p_{ij}\\, v_j ,
        \\qquad p_{ij} = \\frac{e^{s_{ij}}}{\\sum_{l} e^{s_{il}}},\\quad s_{ij} = \\frac{q_i \\cdot k_j}{\\sqrt{D}} .
        $$

        得分矩阵 $QK^\\top$ 有 $L^2$ 个元素，每个元素是长度为 D 的点积，共 $L^2 D$ 次乘加；
        用权重对值加权求和（$PV$）又是 $L^2 D$ 次。一次乘加算两次浮点运算，所以一个注意力头的
        浮点运算量为

        $$ \\text{FLOPs} = 2 L^2 D + 2 L^2 D = 4 L^2 D . $$

        我们用 PyTorch 的 `FlopCounterMode` 统计库中从零实现的 `dense_attention` 的运算量（放在 `meta`
        设备上：张量只有形状没有数据，统计不花时间），再对 PyTorch 融合实现的
        `scaled_dot_product_attention`（SDPA）计时。SDPA 是本课程始终使用的稠密基线。计时用的是 `time.process_time`，即本进程占用的 CPU 时间，
        机器再忙，其他程序也不会把它拉长；每个长度轮流运行五次，取最快的一次。
        """,
    ),
    Code("""
        H, D = 2, 64
        lengths = [256, 512, 1024, 2048]
        g = torch.Generator().manual_seed(0)
        inputs = {L: [torch.randn(1, H, L, D, generator=g) for _ in range(3)] for L in lengths}

        flops = {}
        for L in lengths:
            meta = torch.empty(1, H, L, D, device="meta")
            with FlopCounterMode(display=False) as counter:
                dense_attention(meta, meta, meta)
            flops[L] = counter.get_total_flops()

        fastest = {L: math.inf for L in lengths}
        for _ in range(5):
            for L in lengths:  # in turns, so a burst of load hits every length alike
                q, k, v = inputs[L]
                start = time.process_time()
                F.scaled_dot_product_attention(q, k, v)
                fastest[L] = min(fastest[L], time.process_time() - start)

        cost = pd.DataFrame({tr("L", "L"): lengths,
                             tr("FLOPs counted", "统计的浮点运算量"): [flops[L] for L in lengths],
                             tr("4·H·L²·D", "4·H·L²·D"): [4 * H * L * L * D for L in lengths],
                             tr("SDPA CPU time (ms)", "SDPA 的 CPU 时间 (ms)"): [fastest[L] * 1e3 for L in lengths]})
        # The slope of log(time) against log(L) over the three longest lengths: 2 for a quadratic cost.
        x = torch.log(torch.tensor(lengths[1:], dtype=torch.float64))
        y = torch.log(torch.tensor([fastest[L] for L in lengths[1:]], dtype=torch.float64))
        slope = (((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum()).item()
        print(tr(f"time grows as L^{slope:.2f}", f"耗时按 L^{slope:.2f} 增长"))
        cost
    """),
    Claim(
        en="""
        The counted **FLOPs** equal $4HL^2D$ exactly at every length, so doubling L multiplies them
        by exactly 4. The measured time follows: over L = 512 to 2048 it grows as $L^{s}$ with s
        within 0.5 of 2 (the printout gives this run's s). At small L a call's fixed overhead hides
        the square, which is why we fit the longer lengths.
        """,
        zh="""
        在每个长度上，统计得到的 **浮点运算量** 都恰好等于 $4HL^2D$，所以 L 翻倍，运算量恰好变为 4 倍。
        实测时间也是如此：在 L = 512 到 2048 之间，耗时按 $L^{s}$ 增长，s 与 2 相差不到 0.5
        （本次运行的 s 见上面的输出）。L 较小时，每次调用的固定开销掩盖了平方增长，所以我们只拟合较长的几个长度。
        """,
        check="""
        assert all(flops[L] == 4 * H * L * L * D for L in lengths)
        assert all(flops[2 * L] == 4 * flops[L] for L in lengths[:-1])
        assert abs(slope - 2) < 0.5, slope
        """,
    ),
    Code("""
        fig = go.Figure(go.Scatter(x=lengths, y=[fastest[L] * 1e3 for L in lengths], mode="lines+markers",
                                   name=tr("SDPA, measured", "SDPA 实测")))
        ref = fastest[lengths[-1]] * 1e3
        fig.add_trace(go.Scatter(x=lengths, y=[ref * (L / lengths[-1]) ** 2 for L in lengths], mode="lines",
                                 line=dict(dash="dash"), name=tr("∝ L²", "∝ L²")))
        fig.update_layout(title=tr(f"Dense attention time (H = {H}, D = {D}, CPU)", f"稠密注意力耗时（H = {H}，D = {D}，CPU）"),
                          xaxis=dict(title=tr("sequence length L", "序列长度 L"), type="log", tickvals=lengths),
                          yaxis=dict(title=tr("CPU time, fastest of 5 runs (ms)", "CPU 时间，5 次中最快一次 (ms)"), type="log"))
        fig.show()
    """),
    Md(
        en="""
        ## 2. Generating text: the KV cache read per token

        When a model generates, it produces one token at a time. The keys and values of all earlier
        tokens are kept in the **KV cache**, and the new token's query must be compared with every
        one of them, in every layer and every key-value head. So each generated token reads

        $$ \\text{bytes per token} = 2 \\cdot n_\\text{layers} \\cdot H_{kv} \\cdot D \\cdot L \\cdot \\text{bytes per number} , $$

        the 2 counting keys and values. Here is that number for a model shaped like an 8-billion-
        parameter Llama 3: 32 layers, 8 key-value heads (grouped-query attention), head dimension
        128, numbers stored in bfloat16 (2 bytes), at a context of 128K tokens.
        """,
        zh="""
        ## 2. 生成文本：每个词元要读取的 KV 缓存

        模型生成文本时一次产出一个词元。此前所有词元的键和值都存放在 **KV 缓存** 中，新词元的查询
        要在每一层、每个键值头上与它们逐一比较。因此每生成一个词元都要读取

        $$ \\text{每个词元读取的字节数} = 2 \\cdot n_\\text{层} \\cdot H_{kv} \\cdot D \\cdot L \\cdot \\text{每个数的字节数} , $$

        其中的 2 表示键和值各一份。下面对一个与 80 亿参数的 Llama 3 同样规模的模型计算这个数：32 层、8 个键值头
        （分组查询注意力）、头维度 128、以 bfloat16（2 字节）存储，上下文长度为 128K 个词元。
        """,
    ),
    Code("""
        layers, kv_heads, head_dim, nbytes = 32, 8, 128, 2
        context = 128 * 1024


        def kv_bytes(L, layers=layers, kv_heads=kv_heads, head_dim=head_dim, nbytes=nbytes):
            \"\"\"Bytes of keys and values a new token reads: 2 · layers · Hkv · D · L · bytes.\"\"\"
            return 2 * layers * kv_heads * head_dim * L * nbytes


        per_context_token = kv_bytes(1)
        per_new_token = kv_bytes(context)
        bandwidth = 4.8e12  # bytes/s: the memory bandwidth of one NVIDIA H200
        read_ms = per_new_token / bandwidth * 1e3
        print(tr(f"{per_context_token / 2**10:.0f} KiB per token of context; {per_new_token / 2**30:.1f} GiB read per "
                 f"generated token at L = {context}; {read_ms:.2f} ms at 4.8 TB/s",
                 f"每个上下文词元占 {per_context_token / 2**10:.0f} KiB；L = {context} 时每生成一个词元读取 "
                 f"{per_new_token / 2**30:.1f} GiB；按 4.8 TB/s 计需 {read_ms:.2f} ms"))
    """),
    Claim(
        en="""
        Each token of context costs **128 KiB** of cache, so at 128K tokens every generated token
        reads **16 GiB**, as much as the model's 16 GB of bfloat16 weights. Even at an H200's
        4.8 TB/s that is **3.6 ms** (± 0.05) per token for the cache alone, and it grows linearly
        with the context: this, not the FLOPs, is what limits long-context generation.
        """,
        zh="""
        每个上下文词元占 **128 KiB** 缓存，所以在 128K 个词元时，每生成一个词元要读取 **16 GiB**，
        与模型本身 16 GB 的 bfloat16 权重相当。即使按 H200 的 4.8 TB/s 带宽，仅读缓存每个词元就要
        **3.6 ms**（± 0.05），而且随上下文线性增长：限制长上下文生成速度的是它，而不是浮点运算量。
        """,
        check="""
        assert per_context_token == 128 * 2**10
        assert per_new_token == 16 * 2**30
        assert abs(read_ms - 3.6) < 0.05, read_ms
        """,
    ),
    Md(
        en="""
        A method that reads only a few thousand keys per query would cut that traffic many times
        over, *if* it can decide which keys to read without reading them all. Whether it can
        afford to ignore the rest depends on how attention is spread. That we can measure.

        ## 3. How concentrated is real attention?

        The package ships a small pretrained model, all-MiniLM-L6-v2 (6 layers × 12 heads, D = 32),
        and `sparse_attn.sources` extracts its q, k and v on any text, without a network. For each
        query we ask: what share of its softmax weight falls on its k highest-scoring keys? That
        share is the **mass kept** by **top-k selection**,

        $$ \\text{mass kept}_i = \\sum_{j \\in T_k(i)} p_{ij} , $$

        with $T_k(i)$ the k keys of query i with the largest scores. Spread evenly, k keys of L
        would hold k/L.
        """,
        zh="""
        如果一种方法每个查询只读几千个键，就能把这些数据读取量减少许多倍，*前提是* 它不必把所有键都读一遍，
        就能决定读哪些。至于能不能放心地忽略其余的键，要看注意力的分布。这一点可以测量。

        ## 3. 真实模型的注意力有多集中？

        本项目的依赖包自带一个小型预训练模型 all-MiniLM-L6-v2（6 层 × 12 个头，D = 32），
        `sparse_attn.sources` 可以在任意文本上提取它的 q、k、v，无需联网。对每个查询我们问：它的 softmax
        权重有多大比例落在得分最高的 k 个键上？这个比例就是 **Top-k 选择** 的 **权重占比**：

        $$ \\text{权重占比}_i = \\sum_{j \\in T_k(i)} p_{ij} , $$

        其中 $T_k(i)$ 是查询 i 得分最高的 k 个键。如果注意力均匀分布，L 个键中的 k 个只占 k/L。
        """,
    ),
    Code("""
        TEXT = (
            "The library opened at nine, and by ten every table near the windows was taken. "
            "A student in a grey coat spread her notes across two chairs and began to copy the formulas "
            "from the board she had photographed that morning. Her friend arrived late, carrying two cups "
            "of tea and a book about the history of the telescope. They worked in silence until noon, "
            "when the bell of the old church across the square rang twelve times and the reading room "
            "slowly emptied for lunch."
        )
        ks = [1, 2, 4, 8, 16, 32]
        rows = []
        for layer in range(6):
            qkv = load(Source.model(TEXT, layer=layer))
            _, weights = dense_attention(qkv.q, qkv.k, qkv.v, scale=qkv.scale, return_weights=True)
            for top_k in ks:
                _, sel = topk_attention(qkv.q, qkv.k, qkv.v, top_k, scale=qkv.scale, return_selection=True)
                for head, kept in enumerate(mass_kept(weights, sel, reduce="head").tolist()):
                    rows.append(dict(layer=layer, head=head, k=top_k, mass_kept=kept))
        n_tokens = weights.shape[-1]
        heads = pd.DataFrame(rows)
        by_k = heads.groupby("k").mass_kept
        summary = pd.DataFrame({tr("share of keys k/L", "键的比例 k/L"): [k_ / n_tokens for k_ in ks],
                                tr("mass kept, mean over heads", "权重占比（各头平均）"): by_k.mean().to_numpy(),
                                tr("worst head", "最差的头"): by_k.min().to_numpy(),
                                tr("best head", "最好的头"): by_k.max().to_numpy()},
                               index=pd.Index(ks, name="k"))
        print(tr(f"{n_tokens} tokens, 6 layers × 12 heads", f"{n_tokens} 个词元，6 层 × 12 个头"))
        summary.round(3)
    """),
    Code("""
        mean8 = summary.iloc[ks.index(8), 1]
        mean1 = summary.iloc[ks.index(1), 1]
        share_90 = (heads[heads.k == 8].mass_kept > 0.9).mean()
        fig = go.Figure()
        for layer, part in heads.groupby("layer"):
            fig.add_trace(go.Scatter(x=ks, y=part.groupby("k").mass_kept.mean().to_numpy(), mode="lines+markers",
                                     name=tr(f"layer {layer}", f"层 {layer}")))
        fig.add_trace(go.Scatter(x=ks, y=[k_ / n_tokens for k_ in ks], mode="lines", line=dict(dash="dash"),
                                 name=tr("spread evenly (k/L)", "均匀分布 (k/L)")))
        fig.update_layout(title=tr("Mass kept by the top-k keys, all-MiniLM-L6-v2", "得分最高的 k 个键的权重占比（all-MiniLM-L6-v2）"),
                          xaxis=dict(title="k", type="log", tickvals=ks),
                          yaxis=dict(title=tr("mass kept (mean over heads)", "权重占比（各头平均）"), range=[0, 1]))
        fig.show()
    """),
    Claim(
        en="""
        On this 95-token text, averaged over all 72 heads, the single top key of a query holds
        **34%** (± 2 points) of its weight, against 1/95 ≈ 1% if spread evenly; the top 8 keys (8% of
        the keys) hold **64%** (± 3 points). Heads differ widely: at k = 8 the worst keeps under a
        quarter (0.19 ± 0.02), and **9 of the 72** heads (12.5%) keep more than 90%.
        """,
        zh="""
        在这段 95 个词元的文本上，对全部 72 个头取平均，每个查询得分最高的那一个键就拿走了 **34%**（± 2 个百分点）
        的权重，而均匀分布时只有 1/95 ≈ 1%；得分最高的 8 个键（占全部键的 8%）拿走了 **64%**（± 3 个百分点）。
        各头之间差别很大：k = 8 时，最差的头不到四分之一（0.19 ± 0.02），而 **72 个头中有 9 个**（12.5%）超过 90%。
        """,
        check="""
        assert n_tokens == 95
        assert abs(mean1 - 0.34) < 0.02, mean1
        assert abs(mean8 - 0.64) < 0.03, mean8
        assert abs(summary.iloc[ks.index(8), 2] - 0.19) < 0.02
        assert abs(share_90 - 9 / 72) < 1.5 / 72, share_90
        """,
    ),
    Md(
        en="""
        Two honest caveats. This is a small encoder reading 95 tokens; in long decoders the picture
        is usually more concentrated, with a few **attention sink** tokens (the first ones) taking a
        large share in most heads, which StreamingLLM exploits. But not every head is sparse: layer
        0 here spreads its weight, and MagicPIG reports heads where top-k is a poor approximation.
        A sparse method must be judged per head and per input, which is what the rest of the course
        does.

        ## 4. What each method trades

        Every method reads fewer keys than dense attention and gives something up for it. The
        third column of the table below is the question that matters for generation: *how does
        the method decide which keys to read?* Exact top-k must score every key to find the top
        ones, so it still reads every key (and saves only the values).

        | method | chapter | how it picks keys | what it gives up |
        | --- | --- | --- | --- |
        | top-k | 3 | scores every key, keeps the k best | the tail's weight (a bias); still reads all keys |
        | streaming top-k | 3 | same, one chunk of keys at a time | nothing in accuracy; memory $O(L(k+C))$ instead of $O(L^2)$ |
        | sampling / hybrid (vAttention, MagicPIG) | 4 | exact top keys plus random samples of the tail; with LSH, no full score pass | variance instead of bias |
        | NSA | 5 | compressed block summaries choose blocks, plus a sliding window, mixed by learned gates | must be trained with the model |
        | StreamingLLM | — | the first few tokens (sinks) and a recent window, fixed | everything in the middle |
        | Quest | — | per-page min/max key bounds give an upper bound on each page's score | reads the page summaries; the bound can pick the wrong pages |

        What each reads per generated token, for the model shape of section 2 at L = 128K: a
        budget of 2048 tokens for top-k, StreamingLLM and Quest (pages of 16 tokens), and NSA with
        the settings of its paper (compression stride 16, 16 selected blocks of 64, a window of 512):
        """,
        zh="""
        需要说明两点。这是一个小型编码器模型，只读了 95 个词元；在长上下文的解码器中，注意力通常更集中，
        大多数头会把很大一部分权重交给开头的几个 **注意力汇点**（attention sink）词元，StreamingLLM 就利用了这一点。
        但并不是每个头都稀疏：这里编号为 0 的层（最靠近输入的一层）就把权重摊得很开，MagicPIG 也报告了 Top-k 近似效果很差的头。
        评价一种稀疏方法，必须逐个头、逐个输入地看，这正是本课程后面各章要做的事。

        ## 4. 各种方法的取舍

        每种方法读取的键都比稠密注意力少，也都为此付出了代价。下表第三列回答了对生成最要紧的问题：
        *方法靠什么决定读哪些键？* 精确的 Top-k 必须为每个键打分才能找出得分最高的键，所以它仍要读取全部的键，
        省下的只是值。

        | 方法 | 章节 | 如何挑选键 | 付出的代价 |
        | --- | --- | --- | --- |
        | Top-k | 3 | 给每个键打分，保留最好的 k 个 | 丢掉尾部的权重（偏差）；仍要读全部的键 |
        | 流式 Top-k | 3 | 同上，但每次只处理一个键分块 | 精度不受影响；内存从 $O(L^2)$ 降到 $O(L(k+C))$ |
        | 采样 / 混合（vAttention、MagicPIG） | 4 | 精确保留得分最高的键，再对尾部随机采样；用 LSH 时不必给所有键打分 | 用方差换掉偏差 |
        | NSA | 5 | 用压缩后的块摘要挑选块，再加一个滑动窗口，由学到的门控加权组合 | 必须与模型一起训练 |
        | StreamingLLM | — | 固定保留开头几个词元（汇点）和最近的一个窗口 | 中间的内容全部丢弃 |
        | Quest | — | 用每页键的逐维最小值和最大值给出该页得分的上界 | 要读取页摘要；上界可能选错页 |

        下面按第 2 节的模型规模、L = 128K，计算每生成一个词元各方法要读取多少数据：Top-k、StreamingLLM 和 Quest
        的预算都是 2048 个词元（Quest 每页 16 个词元），NSA 采用其论文中的设置（压缩步长 16，选 16 个大小为 64 的块，
        窗口 512）：
        """,
    ),
    Code("""
        L, budget = context, 2048
        vectors = {  # key and value vectors read per layer and kv head for one new token
            tr("dense", "稠密注意力"): 2 * L,
            tr("exact top-k", "精确 Top-k"): L + budget,          # every key to score, values of the k best
            tr("StreamingLLM", "StreamingLLM"): 2 * budget,      # 4 sinks + a window, keys and values
            tr("Quest (pages of 16)", "Quest（每页 16）"): 2 * (L // 16) + 2 * budget,  # min and max per page, then the pages
            tr("NSA", "NSA"): 2 * (L // 16) + 2 * 16 * 64 + 2 * 512,  # compressed keys/values, blocks, window
        }
        reads = pd.DataFrame({tr("GiB per generated token", "每个词元读取 (GiB)"):
                                  [kv_bytes(1) * n / 2 / 2**30 for n in vectors.values()],
                              tr("share of dense", "占稠密注意力的比例"): [n / vectors[tr("dense", "稠密注意力")] for n in vectors.values()]},
                             index=list(vectors))
        reads.round(3)
    """),
    Claim(
        en="""
        Exact top-k reads **50.8%** of what dense attention reads (it must score every key), while
        StreamingLLM reads 1/64 (**1.6%**) and Quest and NSA read **7.8%** and **7.4%**: their
        summaries of 16 keys at a time are what let them choose without reading everything.
        """,
        zh="""
        精确 Top-k 读取的数据量是稠密注意力的 **50.8%**（它必须给每个键打分），而 StreamingLLM 只读 1/64（**1.6%**），
        Quest 和 NSA 分别读 **7.8%** 和 **7.4%**：正是每 16 个键一份的摘要，让它们不必读完所有的键就能做出选择。
        """,
        check="""
        share = reads.iloc[:, 1]
        assert abs(share.iloc[1] - 0.508) < 0.0005 and share.iloc[2] == 1 / 64
        assert abs(share.iloc[3] - 0.078) < 0.0005 and abs(share.iloc[4] - 0.074) < 0.0005
        """,
    ),
    Summary(
        en="""
        - Dense attention costs $4L^2D$ FLOPs per head: doubling the context quadruples the work,
          and measured time follows (a log-log slope near 2).
        - In generation the bottleneck is memory traffic: every new token reads
          $2 \\cdot n_\\text{layers} \\cdot H_{kv} \\cdot D \\cdot L$ numbers of KV cache, 16 GiB at 128K tokens
          for a Llama-3-8B-shaped model.
        - Real attention is concentrated but uneven: in MiniLM the top 8 of 95 keys hold 64% of a
          query's weight on average, from under 25% to over 99% depending on the head.
        - Sparse methods differ in *how they choose* keys. Exact top-k still scores every key;
          sampling with LSH, NSA, StreamingLLM and Quest avoid that, each at a price.
        """,
        zh="""
        - 稠密注意力每个头的浮点运算量为 $4L^2D$：上下文长度翻倍，计算量变为 4 倍，实测时间也随之增长（双对数斜率接近 2）。
        - 生成文本时瓶颈在于显存读取：每个新词元都要读取 $2 \\cdot n_\\text{层} \\cdot H_{kv} \\cdot D \\cdot L$ 个 KV 缓存中的数，
          对 Llama-3-8B 规模的模型，128K 个词元时为 16 GiB。
        - 真实模型的注意力是集中的，但很不均匀：在 MiniLM 上，95 个键中得分最高的 8 个平均拿走每个查询 64% 的权重，
          不同的头从不到 25% 到超过 99% 不等。
        - 各种稀疏方法的区别在于 *怎样挑选* 键。精确 Top-k 仍要给每个键打分；用 LSH 的采样、NSA、StreamingLLM 和 Quest
          都避开了这一步，代价各不相同。
        """,
    ),
    References(items=(
        ("Vaswani et al. 2017. Attention Is All You Need. arXiv:1706.03762", "https://arxiv.org/abs/1706.03762"),
        ("Dao, Fu, Ermon, Rudra, Ré. 2022. FlashAttention: Fast and Memory-Efficient Exact Attention with "
         "IO-Awareness. arXiv:2205.14135", "https://arxiv.org/abs/2205.14135"),
        ("Xiao, Tian, Chen, Han, Lewis. 2023. Efficient Streaming Language Models with Attention Sinks "
         "(StreamingLLM). arXiv:2309.17453", "https://arxiv.org/abs/2309.17453"),
        ("Tang, Zhao, Zhu, Xiao, Kasikci, Han. 2024. Quest: Query-Aware Sparsity for Efficient Long-Context "
         "LLM Inference. arXiv:2406.10774", "https://arxiv.org/abs/2406.10774"),
        ("Chen et al. 2024. MagicPIG: LSH Sampling for Efficient LLM Generation. arXiv:2410.16179",
         "https://arxiv.org/abs/2410.16179"),
        ("Yuan et al. 2025. Native Sparse Attention: Hardware-Aligned and Natively Trainable Sparse Attention. "
         "arXiv:2502.11089", "https://arxiv.org/abs/2502.11089"),
        ("Desai et al. 2025. vAttention: Verified Sparse Attention. arXiv:2510.05688",
         "https://arxiv.org/abs/2510.05688"),
    )),
    Exercises(items=(
        Exercise(
            en="""
            A larger model has 80 layers, 8 key-value heads and head dimension 128, and stores its
            cache in bfloat16. How many GiB of KV cache does it read for each token it generates at a
            context of 32K (32768) tokens? Set `answer` to the number of GiB.
            """,
            zh="""
            一个更大的模型有 80 层、8 个键值头、头维度 128，缓存以 bfloat16 存储。上下文为 32K（32768）个词元时，
            它每生成一个词元要读取多少 GiB 的 KV 缓存？把 GiB 数赋给 `answer`。
            """,
            hint_en="Use the formula of section 2 (or `kv_bytes` with other arguments); 1 GiB is $2^{30}$ bytes.",
            hint_zh="套用第 2 节的公式（或者换个参数调用 `kv_bytes`）；1 GiB 是 $2^{30}$ 字节。",
            solution_en="""
            $2 \\cdot 80 \\cdot 8 \\cdot 128 \\cdot 32768 \\cdot 2 = 10\\,737\\,418\\,240$ bytes, exactly
            **10 GiB**. The factor 2 in front counts keys *and* values; forgetting it gives 5 GiB.
            """,
            solution_zh="""
            $2 \\cdot 80 \\cdot 8 \\cdot 128 \\cdot 32768 \\cdot 2 = 10\\,737\\,418\\,240$ 字节，恰好是 **10 GiB**。
            最前面的 2 表示键 *和* 值各一份；漏掉它会得到 5 GiB。
            """,
            self_check="""
            def check_ex1(answer):
                expected = 2 * 80 * 8 * 128 * 32768 * 2 / 2**30
                assert abs(answer - expected / 2) > 1e-6, tr(
                    "That is half the answer: the cache holds keys and values.", "这只是答案的一半：缓存里既有键也有值。")
                assert abs(answer - expected) < 1e-6, tr(
                    f"{answer} GiB is not right: multiply 2 · layers · Hkv · D · L · bytes and divide by 2**30.",
                    f"{answer} GiB 不对：请计算 2 · 层数 · Hkv · D · L · 字节数，再除以 2**30。")
                print(tr(f"Right: {answer:g} GiB per generated token.", f"正确：每生成一个词元读取 {answer:g} GiB。"))
            """,
            solution_code="""
            answer = kv_bytes(32768, layers=80, kv_heads=8, head_dim=128, nbytes=2) / 2**30
            check_ex1(answer)
            """,
            wrong_answer="5.0",
        ),
        Exercise(
            en="""
            A transformer layer of width d spends about $24 L d^2$ FLOPs on its projections and MLP
            for L tokens, and $4 L^2 d$ on attention (all heads together). For d = 4096, at which
            context length L does attention cost as much as the rest of the layer? Set `answer` to L.
            """,
            zh="""
            宽度为 d 的 Transformer 层处理 L 个词元时，投影和 MLP 约需 $24 L d^2$ 次浮点运算，注意力（所有头合计）
            需 $4 L^2 d$ 次。d = 4096 时，上下文长度 L 达到多少，注意力的开销就与该层其余部分相当？把 L 赋给 `answer`。
            """,
            hint_en="Set the two costs equal and divide both sides by $4Ld$.",
            hint_zh="令两者相等，两边同时除以 $4Ld$。",
            solution_en="""
            $4L^2 d = 24 L d^2$ gives $L = 6d = 24\\,576$. Below about six times the model width,
            the projections and MLP dominate and sparse attention saves little compute; far beyond
            it, attention dominates. (In generation, the KV-cache reads of section 2 matter sooner.)
            """,
            solution_zh="""
            由 $4L^2 d = 24 L d^2$ 得 $L = 6d = 24\\,576$。上下文短于模型宽度的 6 倍左右时，投影和 MLP 占大头，
            稀疏注意力省不了多少计算；远超过这个长度时，注意力占主导。（在生成时，第 2 节的 KV 缓存读取会更早成为瓶颈。）
            """,
            self_check="""
            def check_ex2(answer):
                d = 4096
                assert answer != d, tr("L = d makes attention 6 times cheaper than the rest; solve 4L²d = 24Ld².",
                                       "L = d 时注意力只有其余部分的六分之一；请解方程 4L²d = 24Ld²。")
                assert abs(4 * answer**2 * d - 24 * answer * d**2) < 1e-6 * 24 * answer * d**2, tr(
                    f"At L = {answer} the two costs differ: solve 4L²d = 24Ld² for L.",
                    f"L = {answer} 时两者并不相等：请解方程 4L²d = 24Ld²。")
                print(tr(f"Right: L = {answer} = 6d.", f"正确：L = {answer} = 6d。"))
            """,
            solution_code="""
            d = 4096
            answer = 24 * d**2 // (4 * d)
            check_ex2(answer)
            """,
            wrong_answer="4096",
        ),
        Exercise(
            en="""
            Using `heads` from section 3, find the smallest k in `ks` for which top-k keeps at least
            80% of the weight *on average over all heads*. Then look at the worst head at that k.
            Set `answer` to that k.
            """,
            zh="""
            利用第 3 节的 `heads`，在 `ks` 中找出最小的 k，使 Top-k 的权重占比 *在所有头上的平均值* 至少为 80%。
            再看看这个 k 下最差的头是多少。把这个 k 赋给 `answer`。
            """,
            hint_en="`heads.groupby(\"k\").mass_kept.mean()` gives the mean per k; compare with 0.8.",
            hint_zh="`heads.groupby(\"k\").mass_kept.mean()` 给出每个 k 的平均值，与 0.8 比较即可。",
            solution_en="""
            The mean first reaches 80% only at **k = 32** (0.86), a third of the 95 keys, and even
            then the worst head keeps about half (0.52). An average that looks good can hide heads that a fixed k
            serves badly; chapter 6 looks at them one by one.
            """,
            solution_zh="""
            平均值直到 **k = 32** 才首次达到 80%（0.86），这已是 95 个键的三分之一；即便如此，最差的头也只有一半左右（0.52）。
            平均值好看，并不代表固定的 k 对每个头都合适；第 6 章会逐个头地分析。
            """,
            self_check="""
            def check_ex3(answer):
                means = heads.groupby("k").mass_kept.mean()
                assert answer in means.index, tr(f"Pick k from {ks}.", f"请从 {ks} 中选 k。")
                assert means[answer] >= 0.8, tr(
                    f"At k = {answer} the mean is only {means[answer]:.2f}: look further up.",
                    f"k = {answer} 时平均值只有 {means[answer]:.2f}：请看更大的 k。")
                assert all(means[k_] < 0.8 for k_ in ks if k_ < answer), tr(
                    "A smaller k already reaches 0.8.", "更小的 k 就已经达到 0.8 了。")
                worst = heads[heads.k == answer].mass_kept.min()
                print(tr(f"Right: k = {answer}; the worst head still keeps only {worst:.2f}.",
                         f"正确：k = {answer}；最差的头仍只有 {worst:.2f}。"))
            """,
            solution_code="""
            means = heads.groupby("k").mass_kept.mean()
            answer = min(k_ for k_ in ks if means[k_] >= 0.8)
            check_ex3(answer)
            """,
            wrong_answer="16",
        ),
    )),
]
