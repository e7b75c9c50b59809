"""Chapter 4: NSA-style block sparsity: compress, select, slide."""
from _cells import Claim, Code, Exercises, Md

NUMBER = 4
SLUG = "ch4_nsa"
TITLE = {"en": "Block sparsity in the style of NSA: compress, select, slide",
         "zh": "NSA 式块稀疏：压缩、选择、滑动"}
TERMS = ["block", "pooling", "query", "key", "sparse attention", "dense attention", "mass kept", "selection mask",
         "relative error"]

CELLS = [
    Md(
        en="""
        Per-token top-k needs every query-key score before it can choose. DeepSeek's Native Sparse
        Attention (NSA) chooses **block**s instead, from a cheap summary, and mixes three branches:

        - **compress**: mean **pooling** turns each block of keys and values into one summary
          token; queries attend to the summaries;
        - **select**: the compressed weights say which blocks matter; each query attends to the
          tokens of its top blocks at full resolution;
        - **slide**: each query attends to its nearest tokens.

        Gates mix the three outputs. Block choices suit GPU kernels, which load whole blocks.
        """,
        zh="""
        逐词元的 Top-k 在做选择之前需要算出每个查询与每个键的得分。DeepSeek 的原生稀疏注意力（NSA）
        改为根据一个廉价的摘要来选择 **块**，并混合三个分支：

        - **压缩**：用均值 **池化** 把每一块键和值变成一个摘要词元；查询对这些摘要做注意力；
        - **选择**：压缩分支的权重指出哪些块重要；每个查询以完整分辨率关注其得分最高的几个块中的词元；
        - **滑动**：每个查询关注离它最近的词元。

        门控系数把三个输出混合起来。按块选择适合 GPU 内核，因为内核本来就整块加载数据。
        """,
    ),
    Code("""
        import torch
        from einops import reduce
        from sparse_attn import viz
        from sparse_attn.metrics import mass_kept, relative_error
        from sparse_attn.ops import dense_attention, topk_attention
        from sparse_attn.ops.nsa import compress_kv, nsa_attention, selected_token_mask, sliding_window_mask
        from sparse_attn.sources import synthetic_qkv


        def tr(en, zh):
            \"\"\"Text in the notebook's language, for plot titles and axis labels.\"\"\"
            return zh if LANG == "zh" else en


        # Each query matches 3 keys anywhere in the sequence: far keys that a window cannot reach.
        L, BLOCK, SELECTED, WINDOW = 256, 16, 4, 32
        q, k, v = synthetic_qkv("retrieval", heads=2, length=L, head_dim=32, seed=0)
        ref, weights = dense_attention(q, k, v, return_weights=True)
    """),
    Md(
        en="""
        ## 1. Compress

        With blocks of 16 tokens, 256 keys become 16 summaries. The default compression is the
        mean of each block.
        """,
        zh="""
        ## 1. 压缩

        以 16 个词元为一块，256 个键变成 16 个摘要。默认的压缩方式是对每一块取平均。
        """,
    ),
    Code("""
        k_cmp = compress_kv(k, BLOCK, BLOCK)
        print(tuple(k.shape), "->", tuple(k_cmp.shape))
    """),
    Claim(
        en="The 256 keys of each head become **16** compressed keys, and compressed key 3 is exactly the mean of keys 48 to 63.",
        zh="每个注意力头的 256 个键变成 **16** 个压缩键，第 3 个压缩键恰好是第 48 到 63 个键的平均值。",
        check="""
        assert k_cmp.shape[2] == L // BLOCK == 16
        assert torch.allclose(k_cmp[:, :, 3], k[:, :, 48:64].mean(dim=2))
        """,
    ),
    Md(
        en="""
        ## 2. Select

        Run all three branches with equal gates and ask for the maps each one used. The
        compressed weights rank the blocks; each query keeps its top 4 blocks of 16 tokens, a
        quarter of the keys. What share of the dense attention mass do those blocks hold (their
        **mass kept**), compared with the best 4 blocks a query could have picked if it had seen
        every score?
        """,
        zh="""
        ## 2. 选择

        用相等的门控系数运行三个分支，并取出每个分支实际使用的注意力图。压缩分支的权重给各块排序；每个查询
        保留得分最高的 4 个块、每块 16 个词元，即四分之一的键。这些块占了多少稠密注意力质量（即 **保留的注意力质量**）？
        与看过全部得分之后能选出的最好的 4 个块相比又如何？
        """,
    ),
    Code("""
        out, maps = nsa_attention(q, k, v, gates=(1 / 3, 1 / 3, 1 / 3), sliding_window_size=WINDOW,
                                  compress_block_size=BLOCK, selection_block_size=BLOCK,
                                  num_selected_blocks=SELECTED, return_maps=True)
        selection_mask = selected_token_mask(maps.block_indices, BLOCK, L, causal=False)
        selected_mass = mass_kept(weights, selection_mask).mean().item()
        best_blocks_mass = reduce(weights, "b h i (n s) -> b h i n", "sum", s=BLOCK).topk(SELECTED, dim=-1).values.sum(-1).mean().item()
        print(f"mass in the selected blocks: {selected_mass:.3f}; in the best {SELECTED} blocks: {best_blocks_mass:.3f}")
        viz.heatmap(maps.compressed_weights[0, 0],
                    title=tr("Compressed attention: each query over 16 block summaries (head 0)",
                             "压缩注意力：每个查询对 16 个块摘要的权重（注意力头 0）"),
                    x_title=tr("compressed block", "压缩块"), lang=LANG).show()
    """),
    Claim(
        en="""
        The selected blocks hold **more than twice** the 25% of the mass that 4 blocks in 16 hold
        on average, but **well short** of the best 4 blocks, which hold **over 90%**.
        """,
        zh="""
        选中的块保留的质量是 16 块中任选 4 块平均所得（25%）的 **两倍以上**，但与最好的 4 个块相比
        **差距明显**，后者保留了 **90% 以上**。
        """,
        check="""
        assert selected_mass > 2 * SELECTED / (L // BLOCK)
        assert best_blocks_mass > 0.9
        assert best_blocks_mass - selected_mass > 0.2
        """,
    ),
    Md(
        en="""
        Why the gap? Mean pooling dilutes a single strongly matching key sixteen-fold inside its
        block summary, so the cheap scores find only some of the right blocks. This is why NSA
        learns its compression (and its gates) with the model instead of using a fixed mean. The
        picture compares the dense weights with the selected branch's weights and its **selection
        mask** (log scale, head 0).
        """,
        zh="""
        为什么会有差距？均值池化把一个强匹配的键在块摘要里稀释了十六倍，廉价的得分只能找到一部分正确的块。
        这正是 NSA 与模型一起学习压缩方式（以及门控系数）、而不用固定平均值的原因。下图比较稠密权重与
        选择分支的权重及其 **选择掩码**（对数刻度，注意力头 0）。
        """,
    ),
    Code("""
        viz.attention_maps(weights[0, 0], maps.selected[0, 0], selection_mask[0, 0], log=True,
                           method_name=tr("selected blocks", "选中的块"), lang=LANG).show()
    """),
    Md(
        en="""
        ## 3. Slide, and the mix

        The sliding branch sees the tokens fewer than 32 positions away, on either side. The gates then mix the three
        outputs; `maps.combined` is the effective attention matrix of the mix.
        """,
        zh="""
        ## 3. 滑动与混合

        滑动分支看到两侧距离小于 32 个位置的词元。门控系数再把三个输出混合起来；`maps.combined` 是混合后的
        等效注意力矩阵。
        """,
    ),
    Code("""
        window_mask = sliding_window_mask(L, L, WINDOW, causal=False)
        keys_per_query = (selection_mask | window_mask).sum(-1).float().mean().item()
        nsa_error = relative_error(out, ref).mean().item()
        topk_error = relative_error(topk_attention(q, k, v, round(keys_per_query)), ref).mean().item()
        row_sums = maps.combined.sum(-1)
        print(f"tokens per query (selected or in the window): {keys_per_query:.1f}")
        print(f"relative error: NSA {nsa_error:.3f}, top-k with as many keys {topk_error:.2e}")
        viz.heatmap(maps.combined[0, 0], log=True, title=tr("NSA: the gated mix of the three branches (head 0)",
                                                           "NSA：三个分支按门控混合后的注意力（注意力头 0）"), lang=LANG).show()
    """),
    Claim(
        en="""
        The mix is a proper attention: every row of `maps.combined` sums to 1 and
        `maps.combined @ v` reproduces the output to **1e-5**. Yet with fixed equal gates and a
        fixed mean, NSA's **relative error** is **more than 1000 times** that of per-token top-k
        reading as many keys: NSA is a **sparse attention** architecture to train, not a drop-in
        replacement for **dense attention** in a model trained without it.
        """,
        zh="""
        混合结果是一个合格的注意力：`maps.combined` 的每一行之和都为 1，且 `maps.combined @ v` 在
        **1e-5** 以内复现输出。但在固定相等的门控系数和固定的平均池化下，NSA 的 **相对误差** 是读取同样多键
        的逐词元 Top-k 的 **1000 倍以上**：NSA 是一种需要训练的 **稀疏注意力** 架构，而不是能直接替换
        未经它训练的模型中 **稠密注意力** 的部件。
        """,
        check="""
        assert torch.allclose(row_sums, torch.ones_like(row_sums), atol=1e-5)
        assert torch.allclose(maps.combined @ v, out, atol=1e-5)
        assert nsa_error > 1000 * topk_error, (nsa_error, topk_error)
        """,
    ),
    Exercises(
        en=(
            "Set the gates to `(0, 1, 0)` (selected branch only) and then `(0, 0.5, 0.5)`. Which gate setting gives the lowest relative error here, and why does the compressed branch hurt?",
            "Replace mean pooling by max pooling: `compress_fn=lambda b: b.amax(dim=3)`. Does the selected blocks' share of the mass move closer to the best 4 blocks?",
            "Rerun with `causal=True` on `synthetic_qkv(\"retrieval\", ..., causal=True)`. Which branch answers the first 15 queries, before any block has ended?",
        ),
        zh=(
            "把门控系数设为 `(0, 1, 0)`（只用选择分支），再设为 `(0, 0.5, 0.5)`。在这里哪种设置的相对误差最低？为什么压缩分支会拖后腿？",
            "用最大池化替换均值池化：`compress_fn=lambda b: b.amax(dim=3)`。选中块保留的质量是否更接近最好的 4 个块？",
            "在 `synthetic_qkv(\"retrieval\", ..., causal=True)` 上以 `causal=True` 重新运行。在还没有任何一块结束之前，前 15 个查询由哪个分支给出结果？",
        ),
    ),
]
