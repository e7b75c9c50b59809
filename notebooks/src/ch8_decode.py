"""Chapter 8: decoding, one token at a time: bytes read per step, a growing KV cache, step by step equals parallel."""
from _cells import Claim, Code, Exercise, Exercises, Md, Objectives, References, Summary

NUMBER = 8
SLUG = "ch8_decode"
TITLE = {"en": "Decoding: sparse attention where it pays",
         "zh": "解码：稀疏注意力真正省时的地方"}
TERMS = ["decoding", "KV cache", "bytes read", "memory bandwidth", "query", "key", "value", "token",
         "top-k selection", "page", "block", "attention sink", "dense attention", "sparse attention"]

CELLS = [
    Objectives(
        en=(
            "explain why a decoding step is bound by the bytes of keys and values it reads, and write the bytes "
            "per step of dense attention, top-k, Quest, NSA and StreamingLLM;",
            "grow a KV cache token by token and see the summaries it keeps for Quest (page bounds) and NSA "
            "(compressed blocks);",
            "write a top-k decoding step from scratch and match the library's `topk_decode`;",
            "check that decoding step by step gives the rows of the parallel causal forward, for every method;",
            "read the bytes-per-token picture and say which methods stay flat, which scale with the context, "
            "and by how much.",
        ),
        zh=(
            "解释为什么一步解码的耗时取决于它读取的键和值的字节数，并写出稠密注意力、Top-k、Quest、NSA 和 "
            "StreamingLLM 每一步读取的字节数；",
            "逐个词元扩充 KV 缓存，看看它为 Quest（页上界）和 NSA（压缩块）额外保存了哪些摘要；",
            "从零写出一步 Top-k 解码，并与库中的 `topk_decode` 对照；",
            "验证对每种方法，逐步解码得到的都是并行因果前向计算的对应行；",
            "读懂“每个词元读取的字节数”这张图，说出哪些方法的读取量不随上下文增长、哪些随上下文增长，以及差多少。",
        ),
    ),
    Md(
        en=r"""
        ## 1. Why decoding is bound by the bytes read

        A model generates text one **token** at a time. For each new token, every layer compares its
        **query** with the **key** of every earlier token and mixes their **value**s. Those keys and values
        are kept in the **KV cache** so that nothing is recomputed; **decoding** one token therefore reads the
        whole cache. With $H$ query heads sharing $H_{kv}$ key-value heads ($G = H/H_{kv}$ query heads per
        group), $L_k$ tokens in the cache, head dimension $D$ and $\beta$ bytes per number, one step of
        **dense attention** reads

        $$ \text{bytes per step} = 2 \cdot L_k \cdot H_{kv} \cdot D \cdot \beta $$

        (keys and values) and does about $4 \cdot H \cdot L_k \cdot D$ floating-point operations: two per
        number for the scores, two for the weighted sum. That is $2G/\beta$ operations per byte, 16 for 64
        query heads over 4 KV heads in bfloat16. A processor does far more arithmetic than that in the time
        its **memory bandwidth** delivers one byte, so a decoding step waits on memory: its time is its
        **bytes read** divided by the bandwidth. **Sparse attention** speeds up generation by reading less.
        Per step and KV head, in rows of $D$ numbers ($K$ and $V$ count one row each):

        | method | rows of K and V read per step and KV head |
        | --- | --- |
        | dense | $2L_k$ |
        | top-k ($k$ keys per query head) | $L_k$ keys (every score is computed) $+ \min(Gk, L_k)$ values |
        | Quest (pages of $P$, budget $b$) | $2\lceil L_k/P\rceil$ bounds $+ 2\min(G\lceil b/P\rceil P, L_k)$ |
        | NSA (blocks $l$ every $d$, $n$ blocks of $l'$, window $w$) | $2\,(N_c + n\,l' + w)$, $N_c = \lfloor (L_k - l)/d\rfloor + 1$ compressed |
        | StreamingLLM ($s$ sinks, window $w$) | $2\min(L_k, s + w)$ |

        A term never exceeds the cache: NSA's selected blocks and window count at most $L_k$ rows each.
        Top-k and Quest are upper bounds: the query heads of a group may pick the same rows.
        `bytes_per_step` counts these from the sizes alone; the decoders also count what they actually read.
        """,
        zh=r"""
        ## 1. 为什么解码的耗时取决于读取的字节数

        模型生成文本时一次只产出一个 **词元**。对每个新词元，每一层都要把它的 **查询** 与此前每个词元的
        **键** 比较，再把它们的 **值** 加权混合。这些键和值存放在 **KV 缓存** 中，不必重新计算；因此
        **解码** 一个词元就要把整个缓存读一遍。设有 $H$ 个查询头共享 $H_{kv}$ 个键值头（每组 $G = H/H_{kv}$ 个查询头），缓存中有 $L_k$ 个词元，头维度为 $D$，每个数占 $\beta$ 字节，那么 **稠密注意力** 的一步要读取

        $$ \text{每步读取的字节数} = 2 \cdot L_k \cdot H_{kv} \cdot D \cdot \beta $$

        （键和值各一份），而浮点运算只有约 $4 \cdot H \cdot L_k \cdot D$ 次：算得分时每个数两次，加权求和时每个数两次。
        也就是每个字节 $2G/\beta$ 次运算：64 个查询头共享 4 个 KV 头、以 bfloat16 存储时为 16 次。处理器在
        **内存带宽** 送来一个字节的时间里能做的运算远不止这些，所以一步解码总在等内存：它的耗时就是
        **读取的字节数** 除以带宽。**稀疏注意力** 靠少读来加快生成。下表按每一步、每个 KV 头计，单位是长为 $D$ 的行（$K$ 和 $V$ 各算一行）：

        | 方法 | 每步、每个 KV 头读取的 K 和 V 的行数 |
        | --- | --- |
        | 稠密注意力 | $2L_k$ |
        | Top-k（每个查询头 $k$ 个键） | $L_k$ 个键（要算出全部得分）$+ \min(Gk, L_k)$ 个值 |
        | Quest（每页 $P$ 个，预算 $b$） | $2\lceil L_k/P\rceil$ 个上界 $+ 2\min(G\lceil b/P\rceil P, L_k)$ |
        | NSA（每隔 $d$ 压缩 $l$ 个，$n$ 个大小为 $l'$ 的块，窗口 $w$） | $2\,(N_c + n\,l' + w)$，压缩块数 $N_c = \lfloor (L_k - l)/d\rfloor + 1$ |
        | StreamingLLM（$s$ 个汇点，窗口 $w$） | $2\min(L_k, s + w)$ |

        每一项都不会超过缓存本身：NSA 的选中块和窗口各自最多只算 $L_k$ 行。Top-k 和 Quest 给出的是上界：同一组的查询头可能选中相同的行。`bytes_per_step` 只根据张量规模算出这些数；
        各个解码器还会统计自己实际读了多少。
        """,
    ),
    Code("""
        import math
        import time
        from dataclasses import replace

        import torch
        from sparse_attn import viz_decode
        from sparse_attn.decode import KVCache, bytes_per_step, decode, nsa_decode, sdpa_decode, topk_decode
        from sparse_attn.decode.registry import EQUAL_GATES
        from sparse_attn.methods import METHODS, Config
        from sparse_attn.sources import synthetic_qkv
        from sparse_attn.timing import time_fn


        def tr(en, zh):
            \"\"\"Text in the notebook's language, for printouts, plot titles and axis labels.\"\"\"
            return zh if LANG == "zh" else en


        # A long-context model's attention, and the papers' settings for long context
        # (NSA: blocks of 32 every 16, 16 blocks of 64, a window of 512; Quest: pages of 16, 2048 tokens).
        MODEL = dict(num_heads=64, num_kv_heads=4, head_dim=128, itemsize=2)
        PAPER = Config(top_k=2048, token_budget=2048, page_size=16, compress_block_size=32,
                       compress_block_sliding_stride=16, selection_block_size=64, num_selected_blocks=16,
                       sliding_window_size=512, num_initial_blocks=1, num_local_blocks=2, num_sink_tokens=4)
        MIB = 2**20
        G, Hkv, D, beta = 16, 4, 128, 2
        L64 = 65536


        def by_hand(method, L, cfg=PAPER):
            \"\"\"The table's rows per step and KV head, times Hkv, D and bytes per number.\"\"\"
            if method == "dense":
                rows = 2 * L
            elif method == "topk":
                rows = L + min(G * cfg.top_k, L)
            elif method == "quest":
                P = cfg.page_size
                rows = 2 * math.ceil(L / P) + 2 * min(G * math.ceil(cfg.token_budget / P) * P, L)
            elif method == "nsa":
                n_c = (L - cfg.compress_block_size) // cfg.compress_block_sliding_stride + 1
                rows = 2 * (n_c + cfg.num_selected_blocks * cfg.selection_block_size + cfg.sliding_window_size)
            else:
                rows = 2 * min(L, cfg.num_sink_tokens + cfg.sliding_window_size)
            return rows * Hkv * D * beta


        METHOD_KEYS = ("dense", "topk", "quest", "nsa", "streaming_llm")
        at_64k = {m: bytes_per_step(m, L64, PAPER, **MODEL) for m in METHOD_KEYS}
        for m in METHOD_KEYS:
            print(f"{viz_decode.gen_method_label(m, LANG)}: {at_64k[m] / MIB:.2f} MiB, "
                  + tr(f"dense reads {at_64k['dense'] / at_64k[m]:.2f} x as much",
                       f"稠密注意力的读取量是它的 {at_64k['dense'] / at_64k[m]:.2f} 倍"))
    """),
    Claim(
        en="""
        At 64K tokens one dense step reads **128 MiB** for this shape, exactly $2 \\cdot 65536 \\cdot 4
        \\cdot 128 \\cdot 2$ bytes, and `bytes_per_step` agrees with the table for every method. NSA reads
        **11.0 MiB**, **11.6** times less (the NSA paper's 11.6×). Quest, with every query head picking its own
        2048 tokens, reads **72 MiB**, only **1.8** times less; top-k reads **96 MiB**, because it must read every
        key to score it; StreamingLLM reads **1.0 MiB** at any length beyond its 516 tokens.
        """,
        zh="""
        在 64K 个词元时，这个规模的稠密注意力一步读取 **128 MiB**，恰好是 $2 \\cdot 65536 \\cdot 4 \\cdot 128
        \\cdot 2$ 字节；对每种方法，`bytes_per_step` 都与上表一致。NSA 读取 **11.0 MiB**，少 **11.6** 倍（与 NSA
        论文的 11.6 倍相同）。Quest 让每个查询头各自挑选 2048 个词元，读取 **72 MiB**，只少 **1.8** 倍；Top-k
        读取 **96 MiB**，因为它得先读出每个键才能打分；StreamingLLM 只要上下文超过 516 个词元，每步都读取
        **1.0 MiB**。
        """,
        check="""
        assert at_64k["dense"] == 2 * 65536 * 4 * 128 * 2 == 128 * MIB
        assert all(at_64k[m] == by_hand(m, L64) for m in METHOD_KEYS), {m: (at_64k[m], by_hand(m, L64)) for m in METHOD_KEYS}
        assert abs(at_64k["nsa"] / MIB - 11.0) < 0.01 and abs(at_64k["dense"] / at_64k["nsa"] - 11.6) < 0.05
        assert at_64k["quest"] == 72 * MIB and abs(at_64k["dense"] / at_64k["quest"] - 1.8) < 0.03
        assert at_64k["topk"] == 96 * MIB
        assert abs(at_64k["streaming_llm"] / MIB - 1.0) < 0.01
        assert bytes_per_step("streaming_llm", 516, PAPER, **MODEL) == at_64k["streaming_llm"]
        """,
    ),
    Md(
        en="""
        Where does your own machine stand? The cell below measures how many floating-point operations per
        second a large matrix product reaches here, and how many bytes per second a large copy moves (it
        reads and writes each byte once). Their ratio is the arithmetic a step could do per byte before memory
        stops being the limit; a decoding step does $2G/\\beta$. The numbers are your machine's, so the prose
        states none of them.
        """,
        zh="""
        你自己的机器又如何？下面的单元格测量一次大矩阵乘法在这台机器上每秒能做多少次浮点运算，以及一次大规模拷贝每秒能搬运多少字节
        （每个字节读一次、写一次）。两者之比就是：在内存不再成为瓶颈之前，每读一个字节可以做多少次运算；而一步解码只做
        $2G/\\beta$ 次。这些数字属于你的机器，所以正文不写出具体数值。
        """,
    ),
    Code("""
        a = torch.randn(1024, 1024)
        product = time_fn(lambda: a @ a, min_run_time=0.2)
        flops = 2 * 1024**3 / product.median
        big = torch.randn(16 * 2**20)  # 64 MiB: larger than the processor's caches
        copy = time_fn(lambda: big.clone(), min_run_time=0.2)
        bandwidth = 2 * big.numel() * big.element_size() / copy.median
        print(tr(f"matrix product: {flops / 1e9:.1f} GFLOP/s; copy: {bandwidth / 1e9:.1f} GB/s; "
                 f"balance {flops / bandwidth:.0f} FLOPs per byte; a decoding step does {2 * G / beta:.0f}",
                 f"矩阵乘法：{flops / 1e9:.1f} GFLOP/s；拷贝：{bandwidth / 1e9:.1f} GB/s；"
                 f"每字节可做 {flops / bandwidth:.0f} 次运算；一步解码只做 {2 * G / beta:.0f} 次"))
    """),
    Md(
        en="""
        ## 2. A KV cache that grows

        `KVCache` is preallocated at its capacity and filled by `append`, one token or a few at a time, as a
        serving engine fills its cache. Two sparse methods need more than the raw rows, and the cache keeps both
        up to date as tokens arrive, without re-reading what it holds: NSA's compressed keys and values (a
        **block** of $l$ tokens pooled into one, emitted the moment its last token is written) and Quest's
        **page** bounds (the element-wise minimum and maximum of each page's keys). Grow one with blocks and
        pages of 16 tokens:
        """,
        zh="""
        ## 2. 不断增长的 KV 缓存

        `KVCache` 按容量预先分配，再用 `append` 一次写入一个或几个词元，就像推理服务填充自己的缓存那样。
        有两种稀疏方法需要的不只是原始的行，缓存会在词元到来时同步更新这两样东西，而不必重读已有的内容：NSA
        的压缩键和压缩值（把 $l$ 个词元组成的一个 **块** 池化成一行，块的最后一个词元一写入就生成）以及 Quest
        的 **页** 上界（每一页中各个键逐元素的最小值和最大值）。下面以每块、每页 16 个词元扩充一个缓存：
        """,
    ),
    Code("""
        small = Config(compress_block_size=16, page_size=16)
        gen = torch.Generator().manual_seed(0)
        ks, vs = torch.randn(1, 2, 40, 16, generator=gen), torch.randn(1, 2, 40, 16, generator=gen)
        cache = KVCache.for_config(small, batch_size=1, num_kv_heads=2, capacity=64, head_dim=16)
        grown = []
        for i in range(40):
            cache.append(ks[:, :, i : i + 1], vs[:, :, i : i + 1])
            if i + 1 in (15, 16, 31, 32, 40):
                grown.append((cache.length, cache.num_compressed, cache.num_pages))
        for length, compressed, pages in grown:
            print(tr(f"{length} tokens: {compressed} compressed blocks, {pages} pages with bounds",
                     f"{length} 个词元：{compressed} 个压缩块，{pages} 页有上界"))
    """),
    Claim(
        en="""
        A compressed block appears when its 16th token is written: **0** after 15 tokens, **1** after 16,
        **2** after 32 and still 2 after 40, while the pages number **3** after 40 tokens (the last one holds
        8 keys so far). The second compressed key is exactly the mean of keys 16 to 31, and the third page's
        maximum is the maximum of keys 32 to 39.
        """,
        zh="""
        压缩块在它的第 16 个词元写入时出现：15 个词元后有 **0** 个，16 个后有 **1** 个，32 个后有 **2** 个，40
        个后仍是 2 个；而 40 个词元后已有 **3** 页（最后一页目前只有 8 个键）。编号为 1 的压缩键恰好是编号 16 到 31
        的键的平均值，编号为 2 的页的最大值就是编号 32 到 39 的键的最大值。
        """,
        check="""
        assert grown == [(15, 0, 1), (16, 1, 1), (31, 1, 2), (32, 2, 2), (40, 2, 3)], grown
        assert torch.allclose(cache.compressed_keys[:, :, 1], ks[:, :, 16:32].mean(dim=2))
        assert torch.equal(cache.page_max[:, :, 2], ks[:, :, 32:40].amax(dim=2))
        """,
    ),
    Md(
        en="""
        ## 3. A top-k decoding step from scratch

        **Top-k selection** for one new query: compute its score against every key of its group, keep the $k$
        largest, take the softmax over those $k$ alone and mix their values. Written with nothing but tensor
        operations, for a cache of 300 tokens, 8 query heads over 2 KV heads, and then the library's
        `topk_decode` on the same cache:
        """,
        zh="""
        ## 3. 从零写一步 Top-k 解码

        一个新查询的 **Top-k 选择**：算出它与本组每个键的得分，保留最大的 $k$ 个，只在这 $k$ 个得分上做 softmax，
        再把对应的值加权混合。下面只用张量运算写出这一步（缓存中有 300 个词元，8 个查询头共享 2 个 KV 头），
        再对同一个缓存调用库中的 `topk_decode`：
        """,
    ),
    Code("""
        def topk_step(q, K, V, k):
            \"\"\"q (H, D) new queries; K, V (Hkv, L, D) the cache: (output (H, D), picked key indices (H, k)).\"\"\"
            groups = q.shape[0] // K.shape[0]
            Kh, Vh = K.repeat_interleave(groups, 0), V.repeat_interleave(groups, 0)  # each head sees its group's
            scores = torch.einsum("hd,hld->hl", q, Kh) / math.sqrt(q.shape[-1])
            top = scores.topk(k, dim=-1)
            weights = torch.softmax(top.values, dim=-1)
            picked = Vh.gather(1, top.indices[..., None].expand(-1, -1, Vh.shape[-1]))  # (H, k, D)
            return torch.einsum("hk,hkd->hd", weights, picked), top.indices


        gen = torch.Generator().manual_seed(1)
        q1 = torch.randn(8, 64, generator=gen)
        K1, V1 = torch.randn(2, 300, 64, generator=gen), torch.randn(2, 300, 64, generator=gen)
        mine, mine_idx = topk_step(q1, K1, V1, 16)
        lib = topk_decode(q1[None, :, None], KVCache.from_tensors(K1[None], V1[None]), 16)
        step_error = (lib.output[0, :, 0] - mine).abs().max().item()
        same_keys = all(set(a.tolist()) == set(b.tolist()) for a, b in zip(mine_idx, lib.selection.indices[0, :, 0]))
        # Heads 0-3 share KV head 0, heads 4-7 KV head 1: a group reads each value row it picked once.
        distinct_values = sum(len(set(mine_idx[4 * g : 4 * g + 4].flatten().tolist())) for g in range(2))
        print(tr(f"largest difference from the library: {step_error:.1e}; same keys: {same_keys}",
                 f"与库函数的最大差异：{step_error:.1e}；选中的键相同：{same_keys}"))
        print(tr(f"bytes read: keys {lib.bytes_read.keys}, values {lib.bytes_read.values} "
                 f"({distinct_values} distinct rows over the two groups)",
                 f"读取的字节数：键 {lib.bytes_read.keys}，值 {lib.bytes_read.values}（两组共 {distinct_values} 个不同的行）"))
    """),
    Claim(
        en="""
        The two agree to float32 rounding (below **1e-5**) and pick the same 16 keys for every head. The
        library counts what the step read: all **300** keys of both KV heads, 300 · 2 · 64 · 4 = **153 600**
        bytes, but only the distinct value rows its heads picked: the four heads of a group pick 64 keys, some
        of them the same, so the two groups read **114** value rows, not 128, at 64 · 4 bytes each.
        """,
        zh="""
        两者在 float32 的舍入误差内一致（小于 **1e-5**），每个注意力头选中的 16 个键也相同。库函数统计了这一步读取的内容：两个
        KV 头的全部 **300** 个键，共 300 · 2 · 64 · 4 = **153 600** 字节；值则只读各注意力头选中的不同的行，每行 64 × 4
        字节。同一组的 4 个注意力头共选了 64 个键，其中有重复，所以两组一共只读取 **114** 行值，而不是 128 行，每行 64 · 4 字节。
        """,
        check="""
        assert step_error < 1e-5 and same_keys, (step_error, same_keys)
        assert lib.bytes_read.keys == 300 * 2 * 64 * 4 == 153_600
        assert lib.bytes_read.values == distinct_values * 64 * 4 and distinct_values == 114, distinct_values
        """,
    ),
    Md(
        en="""
        ## 4. Step by step equals parallel

        A decoder sees only the cache and the newest query, so it must give exactly what the parallel causal
        forward gives for that token's row: the same keys picked, the same output. Here every method decodes a
        48-token sequence one token at a time in float64, the cache growing by one token before each step,
        and is compared with its own parallel forward (`METHODS[...].forward` with `causal=True`), row by row.
        """,
        zh="""
        ## 4. 逐步解码等于并行计算

        解码器只看到缓存和最新的查询，所以对每个词元，它给出的必须恰好是并行因果前向计算中那个词元所在的行：选中的键相同，输出也相同。
        下面让每种方法以 float64 逐个词元解码一个长为 48 的序列（每一步之前缓存先增加一个词元），再与它自己的并行前向计算
        （`METHODS[...].forward`，`causal=True`）逐行比较。
        """,
    ),
    Code("""
        SMALL = Config(top_k=6, token_budget=8, page_size=4, compress_block_size=8, selection_block_size=8,
                       num_selected_blocks=3, sliding_window_size=8, num_sink_tokens=2, causal=True)
        gen = torch.Generator().manual_seed(0)
        q48 = torch.randn(1, 4, 48, 16, generator=gen, dtype=torch.float64)
        k48, v48 = (torch.randn(1, 2, 48, 16, generator=gen, dtype=torch.float64) for _ in range(2))
        step_vs_parallel = {}
        for m in METHOD_KEYS:
            growing = KVCache.for_config(SMALL, 1, 2, 48, 16, dtype=torch.float64)
            rows = []
            for i in range(48):
                growing.append(k48[:, :, i : i + 1], v48[:, :, i : i + 1])
                rows.append(decode(m, q48[:, :, i : i + 1], growing, SMALL).output)
            parallel = METHODS[m].forward(q48, k48, v48, SMALL)
            step_vs_parallel[m] = (torch.cat(rows, dim=2) - parallel).abs().max().item()
        print(tr("largest difference, step by step against parallel: ", "逐步解码与并行计算的最大差异：")
              + tr(", ", "，").join(f"{viz_decode.gen_method_label(m, LANG)} {e:.1e}" for m, e in step_vs_parallel.items()))
    """),
    Claim(
        en="""
        For all five methods the 48 rows decoded one at a time equal the parallel forward to float64 rounding
        (below **1e-12**): the cache's compressed blocks and page bounds, built as tokens arrived, are the ones
        the parallel forward computes from the whole sequence. (The tests check the same for many shapes,
        batch sizes and a few queries per step.)
        """,
        zh="""
        对全部五种方法，逐个解码得到的 48 行都与并行前向计算在 float64 的舍入误差内一致（小于 **1e-12**）：
        缓存随词元到来逐步建立的压缩块和页上界，正是并行计算由整个序列算出的那些。（测试在更多的形状、批量大小以及每步多个查询的情形下检查同样的事。）
        """,
        check="""
        assert set(step_vs_parallel) == set(METHOD_KEYS)
        assert all(e < 1e-12 for e in step_vs_parallel.values()), step_vs_parallel
        """,
    ),
    Md(
        en="""
        The app's generating tab draws what each step read as the cache grew, with the same decoders. Here NSA on
        the `sink_local` pattern (256 tokens, the registry's default settings): each row is one new token, blue
        cells the blocks its compressed scores picked, orange its window and forced blocks; on the right, the
        bytes each step read beside dense attention's.
        """,
        zh="""
        应用的“生成”页用同样的解码器画出缓存增长时每一步读取了什么。下面是 NSA 在 `sink_local` 模式上的结果（256 个词元，
        注册表的默认设置）：每一行是一个新词元，蓝色格子是按压缩得分选中的块，橙色是窗口和强制选中的块；右侧是每一步读取的字节数，
        旁边是稠密注意力的读取量。
        """,
    ),
    Code("""
        grid = viz_decode.decode_steps("nsa", *synthetic_qkv("sink_local", heads=4, length=256, head_dim=64, seed=0),
                                       Config())
        viz_decode.steps_figure(grid, 0, LANG).show()
    """),
    Md(
        en="""
        ## 5. Bytes per token against context length

        The same count over context lengths from 1K to 128K tokens, for the model's shape and the papers'
        settings, is the first picture of the app's generating tab (there with the sidebar's settings).
        Dense attention's line (dashed) rises in proportion to the context. StreamingLLM's is flat: its sinks
        (the **attention sink**s of chapter 6) and window are a fixed number of tokens. NSA's bends towards a
        line parallel to dense, one sixteenth of it: its compressed keys still grow with the context.
        """,
        zh="""
        ## 5. 每个词元读取的字节数与上下文长度

        对这个模型规模和论文的设置，在 1K 到 128K 个词元的上下文长度上做同样的统计，就是应用“生成”页的第一张图（应用里用的是侧栏的设置）。
        稠密注意力的线（虚线）随上下文成正比上升。StreamingLLM 的线是平的：它的汇点（第 6 章的 **注意力汇点**）和窗口只有固定数量的词元。
        NSA 的线逐渐弯向一条与稠密注意力平行、只有它十六分之一的线：它的压缩键仍随上下文增长。
        """,
    ),
    Code("""
        rows = viz_decode.bytes_rows(PAPER, **MODEL)
        viz_decode.bytes_figure(rows, LANG).show()
        per_length = {(r["method"], r["length"]): r["bytes_per_token"] for r in rows}
        nsa_ratio_128k = per_length[("dense", 131072)] / per_length[("nsa", 131072)]
        nsa_ratio_1k = per_length[("dense", 1024)] / per_length[("nsa", 1024)]
        print(tr(f"dense / NSA: {nsa_ratio_1k:.2f} at 1K tokens, {nsa_ratio_128k:.1f} at 128K",
                 f"稠密注意力 / NSA：1K 个词元时 {nsa_ratio_1k:.2f}，128K 个词元时 {nsa_ratio_128k:.1f}"))
    """),
    Claim(
        en="""
        At 1K tokens NSA reads **more** than dense attention (dense reads **0.64** times as much): its 16 blocks
        of 64 and its window of 512 are more than the whole cache, read once more by each branch. At 128K
        dense reads **13.5** times as much, on the way to the limit of 16 set by one compressed key every 16 tokens.
        """,
        zh="""
        在 1K 个词元时，NSA 读取的字节数反而 **多于** 稠密注意力（稠密注意力只有它的 **0.64** 倍）：16 个大小为 64 的块加上
        512 个词元的窗口比整个缓存还多，而且每个分支各读一遍。到 128K 时，稠密注意力的读取量是它的 **13.5** 倍，
        并逐渐接近每 16 个词元一个压缩键所决定的极限 16 倍。
        """,
        check="""
        assert abs(nsa_ratio_1k - 0.64) < 0.01, nsa_ratio_1k
        assert abs(nsa_ratio_128k - 13.5) < 0.05, nsa_ratio_128k
        """,
    ),
    Md(
        en="""
        The decoders count what they actually read, from their selection. For NSA at a length where every
        slot is filled, that is exactly the table's count. Below, a real NSA step on 8192 random tokens
        (8 query heads over 2 KV heads, D = 64, float32), timed against PyTorch's SDPA on the same cache.
        The times are your machine's: on a CPU, with one short sequence, fixed costs per operation weigh
        as much as the bytes, which is why the GPU benchmark runs batches of many sequences.
        """,
        zh="""
        各个解码器会根据自己的选择结果统计实际读取的字节数。对 NSA 而言，只要每个槽位都已填满，这个数就与上表完全一致。
        下面在 8192 个随机词元上（8 个查询头共享 2 个 KV 头，D = 64，float32）运行真实的一步 NSA，并与 PyTorch 的 SDPA
        在同一个缓存上比较耗时。这些时间属于你的机器：在 CPU 上只解码一条短序列时，每个运算的固定开销与读取的字节数同样重要，
        这也是 GPU 上的基准测试要一次处理许多条序列的原因。
        """,
    ),
    Code("""
        L8 = 8192
        gen = torch.Generator().manual_seed(2)
        k8, v8 = (torch.randn(1, 2, L8, 64, generator=gen) for _ in range(2))
        q8 = torch.randn(1, 8, 1, 64, generator=gen)
        cache8 = KVCache.for_config(PAPER, 1, 2, L8, 64).append(k8, v8)
        nsa_settings = dict(gates=EQUAL_GATES, sliding_window_size=512, selection_block_size=64, num_selected_blocks=16)
        step = nsa_decode(q8, cache8, **nsa_settings)
        sizes8 = dict(num_heads=8, num_kv_heads=2, head_dim=64, itemsize=4)
        counted, modelled = step.bytes_read.total, bytes_per_step("nsa", L8, PAPER, **sizes8)
        dense8 = bytes_per_step("dense", L8, PAPER, **sizes8)
        t_nsa = time_fn(lambda: nsa_decode(q8, cache8, **nsa_settings), min_run_time=0.2).median
        t_sdpa = time_fn(lambda: sdpa_decode(q8, cache8), min_run_time=0.2).median
        print(tr(f"NSA read {counted / MIB:.2f} MiB (table: {modelled / MIB:.2f}), dense {dense8 / MIB:.2f} MiB; "
                 f"on this machine NSA {t_nsa * 1e3:.2f} ms, SDPA {t_sdpa * 1e3:.2f} ms per step",
                 f"NSA 读取 {counted / MIB:.2f} MiB（表中：{modelled / MIB:.2f}），稠密注意力 {dense8 / MIB:.2f} MiB；"
                 f"在这台机器上每步 NSA {t_nsa * 1e3:.2f} 毫秒，SDPA {t_sdpa * 1e3:.2f} 毫秒"))
    """),
    Claim(
        en="""
        The step's own count equals the table's exactly: 511 compressed rows, 1024 selected and 512 in the
        window, **2047** rows of K and V per KV head, **2 096 128** bytes (2.0 MiB), against **8 MiB** for dense
        attention.
        """,
        zh="""
        这一步自己统计的字节数与上表完全一致：511 个压缩行、1024 个选中的行和窗口中的 512 行，每个 KV 头共 **2047**
        行 K 和 V，合计 **2 096 128** 字节（2.0 MiB），而稠密注意力是 **8 MiB**。
        """,
        check="""
        assert counted == modelled == 2047 * 2 * 2 * 64 * 4 == 2_096_128, (counted, modelled)
        assert dense8 == 8 * MIB
        """,
    ),
    Summary(
        en="""
        - A decoding step reads the KV cache and does about $2G/\\beta$ operations per byte: it is bound by the
          bytes read, $2 L_k H_{kv} D \\beta$ for dense attention (128 MiB per layer at 64K for 64 query over
          4 KV heads, D = 128, bfloat16).
        - The cache grows by append and keeps the summaries sparse decoding reads: NSA's compressed blocks,
          emitted as they fill, and Quest's page bounds.
        - A top-k step is a few tensor operations; it still reads every key, so it saves at most half the bytes.
        - Decoding step by step gives the parallel causal forward's rows, for every method (float64).
        - With the papers' settings at 64K, NSA reads 11.6 times less than dense; Quest with per-head picks only
          1.8 times less (12 MiB with one pick per KV group, exercise 1); StreamingLLM reads a fixed 1 MiB.
          At short context a sparse method can read more than dense.
        """,
        zh="""
        - 一步解码要读取 KV 缓存，每个字节只做约 $2G/\\beta$ 次运算：耗时取决于读取的字节数，稠密注意力为 $2 L_k H_{kv} D \\beta$（64 个查询头共享 4 个 KV 头、D = 128、bfloat16 时，64K 个词元每层 128 MiB）。
        - 缓存通过追加增长，并保存稀疏解码要读的摘要：随块填满而生成的 NSA 压缩块，以及 Quest 的页上界。
        - 一步 Top-k 只需几个张量运算；但它仍要读出全部键，所以最多省下一半字节。
        - 对每种方法，逐步解码都给出并行因果前向计算的对应行（float64）。
        - 按论文的设置，在 64K 时 NSA 的读取量只有稠密注意力的 1/11.6；Quest 每个查询头各自选页时只少 1.8 倍（每个 KV 组共用一次选页时为 12 MiB，见练习 1）；StreamingLLM 固定读取 1 MiB。上下文较短时，稀疏方法读取的字节数可能比稠密注意力还多。
        """,
    ),
    References(items=(
        ("Pope, Douglas, Chowdhery, Devlin, Bradbury, Levskaya, Heek, Xiao, Agrawal, Dean. 2022. Efficiently "
         "Scaling Transformer Inference. arXiv:2211.05102", "https://arxiv.org/abs/2211.05102"),
        ("Yuan, Gao, Dai, Luo, Zhao, Zhang, Xie, Wei, Wang, Xiao, Wang, Ruan, Zhang, Liang, Zeng. 2025. Native "
         "Sparse Attention: Hardware-Aligned and Natively Trainable Sparse Attention. arXiv:2502.11089",
         "https://arxiv.org/abs/2502.11089"),
        ("Tang, Zhao, Zhu, Xiao, Kasikci, Han. 2024. Quest: Query-Aware Sparsity for Efficient Long-Context LLM "
         "Inference. arXiv:2406.10774", "https://arxiv.org/abs/2406.10774"),
        ("Xiao, Tian, Chen, Han, Lewis. 2023. Efficient Streaming Language Models with Attention Sinks "
         "(StreamingLLM). arXiv:2309.17453", "https://arxiv.org/abs/2309.17453"),
    )),
    Exercises(items=(
        Exercise(
            en="""
            Quest ranks pages per query head, so 16 heads of a group may pick 16 different sets of pages. Let the
            heads of a KV group sum their bounds and pick one set together (`query_heads_share_pages=True`, as NSA
            selects for a group). For the model's shape and the papers' settings at 64K tokens, how many MiB does
            a step read? Set `answer` to that number, first by hand from the table, then check it with
            `bytes_per_step`.
            """,
            zh="""
            Quest 按查询头给页排序，所以一组中的 16 个查询头可能选出 16 组不同的页。现在让一个 KV 组的查询头把各自的上界相加，
            共同选出一组页（`query_heads_share_pages=True`，就像 NSA 按组做选择那样）。对本章的模型规模和论文的设置，在 64K
            个词元时一步读取多少 MiB？先按表格手算，再用 `bytes_per_step` 核对，把这个数赋给 `answer`。
            """,
            hint_en="""
            With one pick per group, $G$ becomes 1 in Quest's row of the table. Do not forget the page bounds: two
            rows per page of 16 tokens, for every page.
            """,
            hint_zh="""
            每组只选一次时，表中 Quest 那一行的 $G$ 变为 1。别忘了页上界：每 16 个词元一页，每页两行，所有页都要读。
            """,
            solution_en="""
            12 MiB. Per KV head: 4096 pages, so $2 \\cdot 4096$ rows of bounds, and $2 \\cdot 2048$ rows of the picked
            pages' keys and values: 12 288 rows of 128 numbers, times 4 KV heads and 2 bytes = 12 MiB, 10.7 times less
            than dense. Two thirds of it are the bounds, which grow with the context as NSA's compressed keys do.
            With per-head picks the same step reads 72 MiB: sharing the pick is what makes Quest pay under
            grouped-query attention.
            """,
            solution_zh="""
            12 MiB。每个 KV 头有 4096 页，上界共 $2 \\cdot 4096$ 行；选中页的键和值共 $2 \\cdot 2048$ 行：合计 12 288 行、每行 128
            个数，再乘以 4 个 KV 头和 2 字节，得 12 MiB，比稠密注意力少 10.7 倍。其中三分之二是上界，它和 NSA 的压缩键一样随上下文增长。
            如果每个查询头各自选页，同一步要读 72 MiB：在分组查询注意力下，Quest 要靠共享选页才划算。
            """,
            self_check="""
            def check_ex1(answer):
                want = bytes_per_step("quest", L64, PAPER, **MODEL, query_heads_share_pages=True) / MIB
                bounds = 2 * math.ceil(L64 / 16) * Hkv * D * beta / MIB
                assert abs(float(answer) - (want - bounds)) > 0.01, tr(
                    "That counts only the picked pages: the page bounds are read too, every step.",
                    "这只算了选中的页：每一步还要读取全部页上界。")
                assert abs(float(answer) - want) < 0.01, tr(
                    f"{float(answer):.2f} MiB is not it; count the bounds and the pages of one pick per group.",
                    f"{float(answer):.2f} MiB 不对；请分别统计上界和每组一次选中的页。")
                print(tr(f"Right: {want:.0f} MiB, {at_64k['dense'] / MIB / want:.1f} times less than dense.",
                         f"正确：{want:.0f} MiB，比稠密注意力少 {at_64k['dense'] / MIB / want:.1f} 倍。"))
            """,
            solution_code="""
            pages = math.ceil(L64 / PAPER.page_size)
            picked = min(math.ceil(PAPER.token_budget / PAPER.page_size) * PAPER.page_size, L64)
            by_hand_mib = (2 * pages + 2 * picked) * Hkv * D * beta / MIB
            answer = bytes_per_step("quest", L64, PAPER, **MODEL, query_heads_share_pages=True) / MIB
            print(tr(f"by hand {by_hand_mib:.2f} MiB, bytes_per_step {answer:.2f} MiB",
                     f"手算 {by_hand_mib:.2f} MiB，bytes_per_step 给出 {answer:.2f} MiB"))
            check_ex1(answer)
            """,
            wrong_answer="4.0",
        ),
        Exercise(
            en="""
            The issue behind this chapter asks NSA to read at most an eighth of dense attention's bytes. Among the
            context lengths $2^{10}, 2^{11}, \\dots, 2^{20}$, which is the shortest at which NSA (model shape, papers'
            settings) reads at most 1/8 of what dense reads? Set `answer` to that length.
            """,
            zh="""
            本章背后的需求要求 NSA 的读取量不超过稠密注意力的八分之一。在上下文长度 $2^{10}, 2^{11}, \\dots, 2^{20}$ 中，
            NSA（本章的模型规模和论文的设置）的读取量不超过稠密注意力 1/8 的最短长度是多少？把这个长度赋给 `answer`。
            """,
            hint_en="""
            Loop over `2 ** n` and compare `8 * bytes_per_step("nsa", L, PAPER, **MODEL)` with the dense count. By
            hand: NSA reads about $L/16 + 1536$ rows where dense reads $L$.
            """,
            hint_zh="""
            对 `2 ** n` 循环，比较 `8 * bytes_per_step("nsa", L, PAPER, **MODEL)` 与稠密注意力的字节数。手算的话：稠密注意力读取
            $L$ 行时，NSA 约读取 $L/16 + 1536$ 行。
            """,
            solution_en="""
            32768. The condition $L \\ge 8\\,(L/16 + 1536)$ gives $L \\ge 24\\,576$; among powers of two that is
            $2^{15}$, where dense reads 9.1 times as much; at $2^{14}$ only 6.4 times. The fixed part, 1024 selected
            tokens and a window of 512, is what short contexts pay for.
            """,
            solution_zh="""
            32768。由 $L \\ge 8\\,(L/16 + 1536)$ 得 $L \\ge 24\\,576$；在 2 的幂中就是 $2^{15}$，此时稠密注意力的读取量是 NSA 的
            9.1 倍；在 $2^{14}$ 时只有 6.4 倍。短上下文付出的代价来自固定的部分：1024 个选中的词元加上 512 个词元的窗口。
            """,
            self_check="""
            def check_ex2(answer):
                L = int(answer)
                assert L in [2**n for n in range(10, 21)], tr("give one of the lengths 2**10 .. 2**20",
                                                               "请给出 2**10 到 2**20 中的一个长度")
                ratio = lambda n: bytes_per_step("dense", n, PAPER, **MODEL) / bytes_per_step("nsa", n, PAPER, **MODEL)
                assert ratio(L) >= 8, tr(f"at {L} dense reads only {ratio(L):.1f} times as much as NSA",
                                         f"在 {L} 时稠密注意力的读取量只有 NSA 的 {ratio(L):.1f} 倍")
                assert L == 1024 or ratio(L // 2) < 8, tr(f"{L // 2} already meets it ({ratio(L // 2):.1f} times)",
                                                         f"{L // 2} 就已满足（{ratio(L // 2):.1f} 倍）")
                print(tr(f"Right: {L}, where dense reads {ratio(L):.1f} times as much.",
                         f"正确：{L}，此时稠密注意力的读取量是 NSA 的 {ratio(L):.1f} 倍。"))
            """,
            solution_code="""
            answer = next(2**n for n in range(10, 21)
                          if 8 * bytes_per_step("nsa", 2**n, PAPER, **MODEL) <= bytes_per_step("dense", 2**n, PAPER, **MODEL))
            check_ex2(answer)
            """,
            wrong_answer="65536",
        ),
    )),
]
