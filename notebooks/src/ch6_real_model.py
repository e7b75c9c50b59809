"""Chapter 5: how sparse is a real model's attention? all-MiniLM-L6-v2 reading one sentence."""
from _cells import Claim, Code, Exercises, Md

NUMBER = 5
SLUG = "ch5_real_model"
TITLE = {"en": "How sparse is a real model's attention?", "zh": "真实模型的注意力有多稀疏？"}
TERMS = ["attention", "head", "token", "query", "key", "mass kept", "top-k selection", "heatmap", "sparsity"]

CELLS = [
    Md(
        en="""
        Synthetic patterns show what a method does on a structure we planted. Here we ask a real
        model. `all-MiniLM-L6-v2` (6 layers × 12 heads, head dimension 32, an English sentence
        encoder) ships inside a Python package, so nothing is downloaded. `sparse_attn.sources`
        runs it on a sentence and captures q, k and v of every layer: each **token** is one query
        and one key.

        Our measure of **sparsity**: for each query, the fewest keys that hold 90% of its attention
        mass (the `k` that **top-k selection** would need to keep 90%), as a share of all keys.
        """,
        zh="""
        合成模式展示的是方法在我们植入的结构上的表现。这里我们来问一个真实的模型。`all-MiniLM-L6-v2`
        （6 层 × 12 个注意力头，头维度 32，一个英文句子编码器）随 Python 包一起发布，因此无需下载任何东西。
        `sparse_attn.sources` 让它读一句话，并取出每一层的 q、k、v：每个 **词元** 既是一个查询，也是一个键。

        我们对 **稀疏度** 的度量是：对每个查询，占其 90% 注意力质量所需的最少的键数（即 **Top-k 选择**
        要保留 90% 所需的 k），占全部键数的比例。
        """,
    ),
    Code("""
        import pandas as pd
        import torch
        from sparse_attn import viz
        from sparse_attn.metrics import mass_kept
        from sparse_attn.ops import dense_attention, topk_attention
        from sparse_attn.sources import Source, load


        def tr(en, zh):
            \"\"\"Text in the notebook's language, for plot titles and axis labels.\"\"\"
            return zh if LANG == "zh" else en


        TEXT = ("The teacher wrote a long sentence on the board, and every student in the classroom "
                "tried to guess which words the model would look at.")
        layers = [load(Source.model(TEXT, layer=i)) for i in range(6)]
        tokens = layers[0].tokens
        weights = [dense_attention(x.q, x.k, x.v, scale=x.scale, return_weights=True)[1][0] for x in layers]  # (H, L, L) each
        L = len(tokens)
        print(L, "tokens:", " ".join(tokens))
    """),
    Claim(
        en="The model has **6** layers of **12** heads with head dimension **32**, and reads the sentence as **29** tokens, `[CLS]` first and `[SEP]` last.",
        zh="该模型有 **6** 层、每层 **12** 个注意力头，头维度 **32**；这句话被读成 **29** 个词元，首个是 `[CLS]`，末个是 `[SEP]`。",
        check="""
        assert layers[0].meta["num_layers"] == len(layers) == 6
        assert all(x.q.shape == (1, 12, 29, 32) for x in layers)
        assert L == 29 and tokens[0] == "[CLS]" and tokens[-1] == "[SEP]"
        """,
    ),
    Md(
        en="""
        ## 1. Keys needed for 90% of the mass

        Sort each query's weights, accumulate them, and count how many it takes to reach 90%.
        """,
        zh="""
        ## 1. 占 90% 质量所需的键

        把每个查询的权重从大到小排序并累加，数一数需要多少个才能达到 90%。
        """,
    ),
    Code("""
        def keys_for(w, share=0.9):
            \"\"\"(H, Lq) fewest keys holding `share` of each query's mass.\"\"\"
            cumulative = w.sort(dim=-1, descending=True).values.cumsum(-1)
            return (cumulative < share).sum(-1) + 1


        k90 = torch.stack([keys_for(w) for w in weights])  # (layers, heads, queries)
        special = torch.stack([w[..., [0, L - 1]].sum(-1).mean() for w in weights])  # [CLS] and [SEP]
        by_layer = pd.DataFrame({
            "share_of_keys_for_90pct": (k90.float().mean(dim=(1, 2)) / L).tolist(),
            "sparsest_head_keys": k90.float().mean(-1).min(-1).values.tolist(),
            "densest_head_keys": k90.float().mean(-1).max(-1).values.tolist(),
            "mass_on_CLS_and_SEP": special.tolist(),
        })
        by_layer
    """),
    Claim(
        en="""
        Sparsity depends on the layer: in the sparsest layer a query needs, on average, **under 30%**
        of the keys to hold 90% of its mass; in the densest, **over 55%**.
        """,
        zh="""
        稀疏度因层而异：在最稀疏的一层，查询平均只需 **不到 30%** 的键就能占到 90% 的质量；在最稠密的一层则需要 **超过 55%**。
        """,
        check="""
        share = by_layer.share_of_keys_for_90pct
        assert share.min() < 0.30 and share.max() > 0.55, share
        """,
    ),
    Claim(
        en="""
        It depends on the **head** even more. In layer 0, head 2 is a *previous-token head*: every
        query puts **over 99%** of its mass on the token just before it (the first token on
        itself), so top-1 would do. The densest head of that layer needs **more than 20** keys on
        average.
        """,
        zh="""
        它更依赖于 **注意力头**。第 0 层的第 2 个头是一个 *前一词元头*：每个查询都把 **99% 以上** 的质量
        放在紧挨着它的前一个词元上（第一个词元放在自己身上），所以 Top-1 就够了。而同一层最稠密的头平均
        需要 **超过 20 个** 键。
        """,
        check="""
        previous = torch.arange(L).sub(1).clamp(min=0)
        assert torch.equal(weights[0][2].argmax(-1), previous)
        assert weights[0][2].max(-1).values.min() > 0.99
        assert (k90[0, 2] == 1).all() and by_layer.densest_head_keys[0] > 20
        """,
    ),
    Md(
        en="""
        The grid shows the 12 heads of layer 1 on one colour scale. Look at the first and last
        columns: the special tokens `[CLS]` and `[SEP]`.
        """,
        zh="""
        下面的网格在同一色标上显示第 1 层的 12 个注意力头。请看第一列和最后一列：即特殊词元 `[CLS]` 和 `[SEP]`。
        """,
    ),
    Code("""
        viz.head_grid(weights[1], log=True, title=tr("Layer 1: one attention map per head (log scale)",
                                                     "第 1 层：每个注意力头一张注意力图（对数刻度）"), lang=LANG).show()
    """),
    Claim(
        en="""
        These "attention sinks" are real: in layer 1, **at least 3** heads give `[CLS]` and `[SEP]`
        more than half of their mass, and in every middle layer (1 to 4) these 2 tokens out of 29
        receive **more than a third** of all attention mass.
        """,
        zh="""
        这种"注意力汇聚点"确实存在：在第 1 层，**至少有 3 个** 注意力头把一半以上的质量给了 `[CLS]` 和
        `[SEP]`；在每个中间层（第 1 到 4 层），这 29 个词元中的 2 个获得了全部注意力质量的 **三分之一以上**。
        """,
        check="""
        sink_heads = int((weights[1][..., [0, L - 1]].sum(-1).mean(-1) > 0.5).sum())
        assert sink_heads >= 3, sink_heads
        assert (by_layer.mass_on_CLS_and_SEP[1:5] > 1 / 3).all(), by_layer.mass_on_CLS_and_SEP
        """,
    ),
    Md(
        en="""
        ## 2. Top-k on a real head

        Keep 8 keys per query (8 of the 29 tokens) in layer 2 and look at what is lost, with the
        tokens on the axes of the **heatmap**s.
        """,
        zh="""
        ## 2. 真实注意力头上的 Top-k

        在第 2 层为每个查询保留 8 个键（29 个词元中的 8 个），并在以词元标注坐标轴的 **热力图** 上查看丢失了什么。
        """,
    ),
    Code("""
        x = layers[2]
        _, sel = topk_attention(x.q, x.k, x.v, 8, scale=x.scale, return_selection=True)
        kept = mass_kept(weights[2][None], sel)[0]  # (H, L)
        head = int(kept.mean(-1).argmin())  # the head top-8 serves worst
        print(f"mass kept by top-8 in layer 2: mean {kept.mean():.3f}; worst head {head}: {kept[head].mean():.3f}")
        viz.attention_maps(weights[2][head], sel.to_dense(L)[0, head], sel.mask(L)[0, head], tokens=tokens,
                           method_name=tr("top-8", "Top-8"),
                           title=tr(f"Layer 2, head {head}: dense vs top-8", f"第 2 层，注意力头 {head}：稠密与 Top-8"),
                           lang=LANG).show()
    """),
    Claim(
        en="""
        In layer 2, top-8's **mass kept**, averaged over heads, is **over 85%**, but its worst head
        keeps **under 75%**: one k for all heads is too much for some and too little for others.
        """,
        zh="""
        在第 2 层，Top-8 在各注意力头上平均的 **保留的注意力质量** **超过 85%**，但最差的头 **不到 75%**：
        对所有头使用同一个 k，对有些头太多，对另一些头太少。
        """,
        check="""
        assert kept.mean() > 0.85 and kept[head].mean() < 0.75, (kept.mean(), kept[head].mean())
        """,
    ),
    Exercises(
        en=(
            "Change `TEXT` to a sentence of your own, twice as long. Does the share of keys needed for 90% of the mass go down as the sentence grows?",
            "Repeat section 2 with a per-head k: for each head, the smallest k that keeps 90% for its median query. How many keys does layer 2 read in total, compared with k = 8 for every head?",
            "The model is English. Give it a Chinese sentence (the tokenizer splits it into single characters). Do the attention sinks on `[CLS]` and `[SEP]` remain?",
        ),
        zh=(
            "把 `TEXT` 换成你自己写的、长一倍的句子。句子变长后，占 90% 质量所需键的比例是否下降？",
            "用按头设定的 k 重做第 2 节：对每个头，取能让其中位数查询保留 90% 质量的最小 k。与每个头都用 k = 8 相比，第 2 层总共读取多少个键？",
            "该模型是英文模型。给它一句中文（分词器会把它拆成单个汉字）。`[CLS]` 和 `[SEP]` 上的注意力汇聚点还在吗？",
        ),
    ),
]
