"""Chapter 2: from dense attention to top-k attention, streamed over key chunks, with measured memory."""
from _cells import Claim, Code, Exercises, Md

NUMBER = 2
SLUG = "ch2_attention"
TITLE = {"en": "From dense to top-k attention", "zh": "从稠密注意力到 Top-k 注意力"}
TERMS = ["attention", "dense attention", "top-k selection", "query", "key", "value", "chunk", "mass kept",
         "relative error", "memory", "causal"]

CELLS = [
    Md(
        en="""
        **Dense attention** gives every query a softmax over all keys and averages the values with
        those weights: `softmax(q kᵀ / √D) v`. Top-k attention keeps, for each query, only the k
        keys with the highest scores (**top-k selection**, chapter 1) and renormalises the softmax
        over them. Two questions: how much does it lose, and how much memory does it save?
        """,
        zh="""
        **稠密注意力** 让每个查询对所有键做 softmax，再用这些权重对值加权平均：`softmax(q kᵀ / √D) v`。
        Top-k 注意力对每个查询只保留得分最高的 k 个键（**Top-k 选择**，见第 1 章），并在这些键上重新做
        softmax 归一化。两个问题：它损失了多少？又节省了多少内存？
        """,
    ),
    Code("""
        import pandas as pd
        import torch
        from sparse_attn import viz
        from sparse_attn.ops import dense_attention, topk_attention
        from sparse_attn.metrics import mass_kept, relative_error
        from sparse_attn.sources import synthetic_qkv


        def tr(en, zh):
            \"\"\"Text in the notebook's language, for plot titles and axis labels.\"\"\"
            return zh if LANG == "zh" else en
    """),
    Md(
        en="""
        ## 1. What top-k keeps

        We plant a structure real heads have: each query looks at its neighbours and at the first
        few tokens (an "attention sink"); `synthetic_qkv("sink_local", ...)` builds q, k and v with
        that pattern. Two measures against the dense reference: the **mass kept** (the share of
        each query's dense softmax weight that falls on the selected keys) and the **relative
        error** of the output, ‖o − o_dense‖ / ‖o_dense‖.
        """,
        zh="""
        我们植入真实注意力头常见的一种结构：每个查询关注它的邻居和开头的几个词元（"注意力汇聚点"）；
        `synthetic_qkv("sink_local", ...)` 生成具有这种模式的 q、k、v。与稠密参考相比有两个度量：
        **保留的注意力质量**（每个查询的稠密 softmax 权重落在被选中键上的比例）和输出的 **相对误差**
        ‖o − o_dense‖ / ‖o_dense‖。
        """,
    ),
    Code("""
        L = 256
        q, k, v = synthetic_qkv("sink_local", heads=2, length=L, head_dim=32, seed=0)
        ref, weights = dense_attention(q, k, v, return_weights=True)

        rows = []
        for top_k in (4, 16, 64, L):
            out, sel = topk_attention(q, k, v, top_k, return_selection=True)
            kept = mass_kept(weights, sel)
            rows.append(dict(k=top_k, mass_kept_mean=kept.mean().item(), mass_kept_min=kept.min().item(),
                             rel_error=relative_error(out, ref).mean().item()))
        quality = pd.DataFrame(rows).set_index("k")
        quality
    """),
    Claim(
        en="""
        On this pattern, k = 16 (one key in 16) keeps **over 90%** of the dense mass for **every**
        query, more keys always keep more mass, and k = L is dense attention: its output matches the
        reference to within **1e-5** relative error.
        """,
        zh="""
        在这种模式下，k = 16（每 16 个键保留 1 个）对 **每一个** 查询都保留了 **90% 以上** 的稠密注意力质量；
        键越多保留的质量越多；k = L 就是稠密注意力：其输出与参考的相对误差在 **1e-5** 以内。
        """,
        check="""
        assert quality.mass_kept_min[16] > 0.9
        assert quality.mass_kept_mean.is_monotonic_increasing
        assert quality.rel_error[L] < 1e-5
        """,
    ),
    Md(
        en="""
        The picture puts the dense weights of head 0 next to the top-16 weights, the selection
        mask and their difference (log scale).
        """,
        zh="""
        下图把第 0 个注意力头的稠密权重和 Top-16 权重并排显示，并给出选择掩码和两者之差（对数刻度）。
        """,
    ),
    Code("""
        out16, sel16 = topk_attention(q, k, v, 16, return_selection=True)
        viz.attention_maps(weights[0, 0], sel16.to_dense(L)[0, 0], sel16.mask(L)[0, 0], log=True,
                           method_name=tr("top-16", "Top-16"), lang=LANG).show()
        difference = sel16.to_dense(L) - weights
        picked = sel16.mask(L)
    """),
    Claim(
        en="""
        Top-k moves the tail's weight onto the kept keys: the difference is **never negative** on
        the selection and **never positive** anywhere else.
        """,
        zh="""
        Top-k 把尾部的权重挪到了保留的键上：差值在被选中的位置 **从不为负**，在其他位置 **从不为正**。
        """,
        check="""
        assert (difference[picked] > -1e-6).all() and (difference[~picked] <= 0).all()
        """,
    ),
    Md(
        en="""
        Structure is what makes top-k work. With random q and k, attention is spread thin and the
        same k keeps much less:
        """,
        zh="""
        正是结构让 Top-k 奏效。若 q 和 k 是随机的，注意力分散，同样的 k 保留的质量就少得多：
        """,
    ),
    Code("""
        qr, kr, vr = synthetic_qkv("random", heads=2, length=L, head_dim=32, seed=0)
        ref_r, weights_r = dense_attention(qr, kr, vr, return_weights=True)
        _, sel_r = topk_attention(qr, kr, vr, 16, return_selection=True)
        random_kept = mass_kept(weights_r, sel_r).mean().item()
        print(f"mass kept by top-16, random q/k: {random_kept:.3f}")
    """),
    Claim(
        en="On random q and k, top-16 keeps **less than half** of the mass, on average.",
        zh="在随机的 q 和 k 上，Top-16 平均保留的质量 **不到一半**。",
        check="""
        assert random_kept < 0.5 < quality.mass_kept_mean[16]
        """,
    ),
    Md(
        en="""
        ## 2. Streaming over key chunks

        Done naively, top-k attention builds the whole (Lq × Lk) score matrix and then selects,
        so its memory grows with Lq × Lk, like dense attention's. `topk_attention(..., chunk_size=C)` instead
        scores one block of queries against one **chunk** of keys at a time and merges each tile
        into a running top-k (`StreamingTopK`, chapter 1). The answer does not change, with or
        without a **causal** mask. (One caveat: when several keys have exactly the same score at the
        k-th place, which of them is kept is arbitrary, as in `torch.topk`; the random inputs below
        have no such ties.)
        """,
        zh="""
        朴素的 Top-k 注意力先构造完整的 (Lq × Lk) 得分矩阵再做选择，其内存和稠密注意力一样随 Lq × Lk 增长。
        `topk_attention(..., chunk_size=C)` 则每次只让一块查询与一个键的 **分块** 计算得分，并把每个小块
        合并进滚动的 Top-k（`StreamingTopK`，见第 1 章）。无论是否使用 **因果** 掩码，结果都不变。
        （需要注意：若有几个键的得分在第 k 位恰好相等，保留其中哪一个是任意的，和 `torch.topk` 一样；
        下面的随机输入没有这种并列。）
        """,
    ),
    Code("""
        same = {}
        for causal in (False, True):
            full, sel_full = topk_attention(qr, kr, vr, 16, causal=causal, return_selection=True)
            streamed, sel_streamed = topk_attention(qr, kr, vr, 16, causal=causal, chunk_size=64, return_selection=True)
            same[causal] = (torch.allclose(full, streamed, atol=1e-6, rtol=0)
                            and torch.equal(sel_full.mask(L), sel_streamed.mask(L)))
        print(same)
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
        ## 3. Measured memory growth

        We measure memory, not estimate it. `PeakMemory` below watches every tensor PyTorch
        creates while a call runs (a `TorchDispatchMode` sees each operation's outputs) and records
        the largest number of bytes alive at once. It counts the tensors an approach holds, not the
        inputs, nor scratch space inside a single kernel.
        """,
        zh="""
        我们测量内存，而不是估算。下面的 `PeakMemory` 监视一次调用期间 PyTorch 创建的每个张量
        （`TorchDispatchMode` 能看到每个运算的输出），记录同一时刻存活字节数的最大值。它统计的是一种做法
        持有的张量，不含输入，也不含单个内核内部的临时空间。
        """,
    ),
    Code("""
        import weakref

        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves


        class PeakMemory(TorchDispatchMode):
            \"\"\"Peak bytes of the tensors created and still alive inside the `with` block.\"\"\"

            def __init__(self):
                super().__init__()
                self.now = self.peak = 0
                self.live = set()

            def _freed(self, key, nbytes):
                self.live.discard(key)
                self.now -= nbytes

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor):
                        storage = t.untyped_storage()
                        if id(storage) not in self.live:  # views share their base's storage
                            self.live.add(id(storage))
                            self.now += storage.nbytes()
                            weakref.finalize(storage, self._freed, id(storage), storage.nbytes())
                self.peak = max(self.peak, self.now)
                return out


        def peak_mib(fn):
            with PeakMemory() as m:
                fn()
            return m.peak / 2**20


        mem = []
        for n in (256, 512, 1024):
            qn, kn, vn = synthetic_qkv("random", heads=2, length=n, head_dim=32, seed=0)
            runs = {"dense": lambda: dense_attention(qn, kn, vn),
                    "all_scores": lambda: topk_attention(qn, kn, vn, 16),
                    "streamed": lambda: topk_attention(qn, kn, vn, 16, chunk_size=256)}
            mem += [dict(seq_len=n, method=name, peak_mib=peak_mib(fn)) for name, fn in runs.items()]
        mem = pd.DataFrame(mem)
        peaks = mem.pivot(index="seq_len", columns="method", values="peak_mib")
        peaks
    """),
    Code("""
        names = {"dense": tr("dense", "稠密"), "all_scores": tr("top-k, all scores", "Top-k，全部得分"),
                 "streamed": tr("top-k, streamed (C = 256)", "Top-k，流式 (C = 256)")}
        viz.scaling_plot(mem, x="seq_len", y="peak_mib", spread=None, color="method", names=names,
                         title=tr("Peak memory of the tensors each approach holds (H = 2, D = 32, k = 16)",
                                  "各做法持有张量的峰值内存（H = 2，D = 32，k = 16）"),
                         y_title=tr("peak memory (MiB)", "峰值内存 (MiB)"), lang=LANG).show()
    """),
    Claim(
        en="""
        Doubling L from 512 to 1024 multiplies the all-scores peak by **more than 3** (it holds
        L × L scores), but the streamed peak by **less than 1.5**; at L = 1024 streaming holds
        **less than a quarter** of the memory.
        """,
        zh="""
        L 从 512 翻倍到 1024 时，全部得分做法的峰值增长 **超过 3 倍**（它持有 L × L 个得分），
        而流式做法的峰值增长 **不到 1.5 倍**；在 L = 1024 时，流式做法持有的内存 **不到四分之一**。
        """,
        check="""
        all_scores, streamed = peaks["all_scores"], peaks["streamed"]
        assert all_scores[1024] / all_scores[512] > 3
        assert streamed[1024] / streamed[512] < 1.5
        assert streamed[1024] < all_scores[1024] / 4
        """,
    ),
    Exercises(
        en=(
            "Repeat section 1 with the `local` and `retrieval` patterns. For each, what is the smallest k that keeps 90% of the mass for every query?",
            "Measure the streamed peak at L = 1024 for chunk sizes 32, 128 and 512. Which part of the memory grows with C, and which with L?",
            "Add `PeakMemory` measurements of `torch.nn.functional.scaled_dot_product_attention` on the same inputs. Does it hold an L × L matrix on your machine?",
        ),
        zh=(
            "用 `local` 和 `retrieval` 模式重做第 1 节。对每种模式，能让每个查询都保留 90% 质量的最小 k 是多少？",
            "在 L = 1024 时测量分块大小为 32、128、512 的流式峰值。内存的哪一部分随 C 增长，哪一部分随 L 增长？",
            "对同样的输入用 `PeakMemory` 测量 `torch.nn.functional.scaled_dot_product_attention`。在你的机器上它会持有 L × L 矩阵吗？",
        ),
    ),
]
