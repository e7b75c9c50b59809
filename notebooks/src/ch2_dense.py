"""Chapter 2: dense attention, the online softmax behind FlashAttention, and memory measured against SDPA."""
from _cells import Claim, Code, Exercise, Exercises, Md, Objectives, References, Summary

NUMBER = 2
SLUG = "ch2_dense"
TITLE = {"en": "Dense attention and the online softmax", "zh": "稠密注意力与在线 softmax"}
TERMS = ["attention", "dense attention", "query", "key", "value", "head", "online softmax", "chunk", "memory",
         "FLOPs"]

CELLS = [
    Objectives(
        en=(
            "write softmax attention from scratch, in the numerically safe form that subtracts each row's maximum;",
            "derive the online softmax (a running maximum $m$ and sum $\\ell$, and a rescaled partial output) "
            "and check a from-scratch implementation against PyTorch's SDPA;",
            "say what FlashAttention keeps out of memory, and measure it: the naive reference's three "
            "$L \\times L$ tensors against SDPA's output-sized footprint;",
            "say what a memory counter built on `TorchDispatchMode` sees and what it cannot see.",
        ),
        zh=(
            "从零写出 softmax 注意力，并采用减去每行最大值的数值稳定写法；",
            "推导在线 softmax（动态维护的最大值 $m$ 与和 $\\ell$，以及按比例修正的部分输出），"
            "并用 PyTorch 的 SDPA 检验从零实现的版本；",
            "说明 FlashAttention 省下了哪些内存，并实际测量：朴素参考实现的三个 $L \\times L$ 张量，"
            "对比 SDPA 只与输出同样大小的内存占用；",
            "说明基于 `TorchDispatchMode` 的内存计数器能看到什么、看不到什么。",
        ),
    ),
    Md(
        en="""
        Before approximating **attention** we need the exact thing, **dense attention**, written
        out and measured: every sparse method in this course is compared with it. Chapter 1 showed
        that its FLOPs grow as $L^2$. Its memory need not: FlashAttention computes exactly the same
        result without ever storing the $L \\times L$ matrix of scores. The trick that makes this
        possible, the **online softmax**, is also the trick that chapter 3's streaming top-k
        builds on.
        """,
        zh="""
        在近似 **注意力** 之前，先要把精确的版本，即 **稠密注意力**，写清楚、测明白：本课程中的每种稀疏方法都要与它比较。
        第 1 章表明它的浮点运算量按 $L^2$ 增长，但它的内存不必如此：FlashAttention 算出完全相同的结果，
        却从不存储 $L \\times L$ 的得分矩阵。实现这一点的技巧叫 **在线 softmax**，第 3 章的流式 Top-k 也建立在同一个技巧之上。
        """,
    ),
    Code("""
        import math
        import time
        import weakref

        import pandas as pd
        import torch
        import torch.nn.functional as F
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        from sparse_attn import viz
        from sparse_attn.ops import dense_attention
        from sparse_attn.sources import synthetic_qkv


        def tr(en, zh):
            \"\"\"Text in the notebook's language, for printouts, plot titles and axis labels.\"\"\"
            return zh if LANG == "zh" else en
    """),
    Md(
        en="""
        ## 1. Softmax attention from scratch

        For one **head**, query $q_i$ attends to keys $k_1, \\dots, k_L$ with values $v_1, \\dots, v_L$:

        $$
        s_{ij} = \\frac{q_i \\cdot k_j}{\\sqrt{D}}, \\qquad
        p_{ij} = \\frac{e^{s_{ij} - m_i}}{\\sum_{l} e^{s_{il} - m_i}}, \\qquad
        o_i = \\sum_j p_{ij}\\, v_j, \\qquad m_i = \\max_j s_{ij} .
        $$

        Subtracting the row maximum $m_i$ changes nothing mathematically (it cancels between
        numerator and denominator) but keeps every exponent at most $e^0 = 1$: in float32,
        $e^{89}$ already overflows to infinity. Written with matrices this is
        $O = \\operatorname{softmax}(QK^\\top/\\sqrt{D})\\,V$, and it is short in code:
        """,
        zh="""
        ## 1. 从零实现 softmax 注意力

        对一个 **注意力头**，查询 $q_i$ 关注键 $k_1, \\dots, k_L$，对应的值为 $v_1, \\dots, v_L$：

        $$
        s_{ij} = \\frac{q_i \\cdot k_j}{\\sqrt{D}}, \\qquad
        p_{ij} = \\frac{e^{s_{ij} - m_i}}{\\sum_{l} e^{s_{il} - m_i}}, \\qquad
        o_i = \\sum_j p_{ij}\\, v_j, \\qquad m_i = \\max_j s_{ij} .
        $$

        减去每行的最大值 $m_i$ 在数学上不改变结果（分子分母中的这一项相互抵消），却能让每个指数都不超过 $e^0 = 1$：
        在 float32 中，$e^{89}$ 就已溢出为无穷大。写成矩阵形式即 $O = \\operatorname{softmax}(QK^\\top/\\sqrt{D})\\,V$，
        代码也很短：
        """,
    ),
    Code("""
        def attention_from_scratch(q, k, v):
            \"\"\"softmax(q kᵀ / √D) v, subtracting each row's maximum before exponentiating.\"\"\"
            s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
            e = torch.exp(s - s.amax(dim=-1, keepdim=True))
            return (e / e.sum(dim=-1, keepdim=True)) @ v


        q, k, v = synthetic_qkv("random", heads=2, length=256, head_dim=32, seed=0)
        sdpa = F.scaled_dot_product_attention(q, k, v)
        gap_scratch = (attention_from_scratch(q, k, v) - sdpa).abs().max().item()
        gap_library = (dense_attention(q, k, v) - sdpa).abs().max().item()

        hot = q * 100  # scores in the hundreds: exp overflows unless the maximum is subtracted first
        s_hot = hot @ k.transpose(-2, -1) / math.sqrt(32)
        unsafe = torch.exp(s_hot) / torch.exp(s_hot).sum(-1, keepdim=True)
        nan_share = unsafe.isnan().any(-1).float().mean().item()
        gap_hot = (attention_from_scratch(hot, k, v) - F.scaled_dot_product_attention(hot, k, v)).abs().max().item()
        print(tr(f"largest difference from SDPA: ours {gap_scratch:.1e}, the library's {gap_library:.1e}; "
                 f"without the max, {nan_share:.0%} of the rows of hot scores are NaN",
                 f"与 SDPA 的最大差：我们的 {gap_scratch:.1e}，库中的 {gap_library:.1e}；"
                 f"不减最大值时，大得分下 {nan_share:.0%} 的行变成 NaN"))
    """),
    Claim(
        en="""
        The from-scratch version and the library's `dense_attention` agree with SDPA to within
        **1e-6** in float32. On scores scaled into the hundreds, exponentiating without subtracting
        the maximum turns **every** row into NaN (∞/∞), while the safe form still agrees with SDPA
        to 1e-4 (scores in the hundreds carry larger rounding errors).
        """,
        zh="""
        从零实现的版本和库中的 `dense_attention` 在 float32 下与 SDPA 的差都在 **1e-6** 以内。
        当得分被放大到数百时，不减最大值直接求指数会让 **每一行** 都变成 NaN（∞/∞），而稳定写法仍与 SDPA 相差不到 1e-4（得分达到数百时，舍入误差也随之变大）。
        """,
        check="""
        assert gap_scratch < 1e-6 and gap_library < 1e-6, (gap_scratch, gap_library)
        assert nan_share == 1.0, nan_share
        assert gap_hot < 1e-4, gap_hot
        """,
    ),
    Md(
        en="""
        ## 2. The online softmax

        The code above needs a whole row of scores before it can subtract the maximum. The online
        softmax (Milakov and Gimelshein, 2018) processes the keys one **chunk** at a time and keeps
        three running quantities per query: the maximum $m$ seen so far, the sum
        $\\ell = \\sum_j e^{s_j - m}$, and the unnormalised output $a = \\sum_j e^{s_j - m} v_j$. When a
        new chunk with scores $s_j$, $j \\in C$, arrives:

        $$
        m' = \\max\\big(m, \\max_{j \\in C} s_j\\big), \\qquad
        \\ell' = \\ell\\, e^{m - m'} + \\sum_{j \\in C} e^{s_j - m'}, \\qquad
        a' = a\\, e^{m - m'} + \\sum_{j \\in C} e^{s_j - m'}\\, v_j .
        $$

        The factor $e^{m - m'} \\le 1$ re-expresses everything accumulated so far relative to the
        new maximum. After the last chunk, $o = a / \\ell$, exactly the softmax average. Here is a
        trace on one row of 8 scores in chunks of 2:
        """,
        zh="""
        ## 2. 在线 softmax

        上面的代码必须先拿到一整行得分，才能减去最大值。在线 softmax（Milakov 与 Gimelshein，2018）每次只处理一个键的
        **分块**，并为每个查询动态维护三个量：目前见过的最大值 $m$、和 $\\ell = \\sum_j e^{s_j - m}$，以及未归一化的输出
        $a = \\sum_j e^{s_j - m} v_j$。新的分块（得分为 $s_j$，$j \\in C$）到来时：

        $$
        m' = \\max\\big(m, \\max_{j \\in C} s_j\\big), \\qquad
        \\ell' = \\ell\\, e^{m - m'} + \\sum_{j \\in C} e^{s_j - m'}, \\qquad
        a' = a\\, e^{m - m'} + \\sum_{j \\in C} e^{s_j - m'}\\, v_j .
        $$

        因子 $e^{m - m'} \\le 1$ 把此前累积的量改写成相对于新最大值的形式。处理完最后一个分块后，$o = a / \\ell$，
        恰好就是 softmax 加权平均。下面在一行 8 个得分上按每块 2 个逐步演示：
        """,
    ),
    Code("""
        row = torch.tensor([0.5, 2.0, -1.0, 3.0, 1.0, 4.0, 0.0, 2.5], dtype=torch.float64)
        m, l, steps = -math.inf, 0.0, []
        for start in range(0, len(row), 2):
            chunk = row[start:start + 2]
            m_new = max(m, chunk.max().item())
            l = l * math.exp(m - m_new) + torch.exp(chunk - m_new).sum().item()
            m = m_new
            steps.append({tr("keys", "键"): f"{start}–{start + 1}", "m": m, "ℓ": l, "m + log ℓ": m + math.log(l)})
        trace = pd.DataFrame(steps)
        logsumexp = torch.logsumexp(row, 0).item()
        print(tr(f"log Σ e^s over the whole row: {logsumexp:.6f}", f"整行的 log Σ e^s：{logsumexp:.6f}"))
        trace
    """),
    Md(
        en="""
        The last line's $m + \\log \\ell$ is the row's log-sum-exp: the running pair carries the
        whole normaliser. The same update, with the output accumulator, on whole tensors:
        """,
        zh="""
        最后一行的 $m + \\log \\ell$ 正是整行的 log-sum-exp：这一对动态维护的量携带了完整的归一化常数。
        把同样的更新连同输出累加器一起用在整个张量上：
        """,
    ),
    Code("""
        def partial_attention(q, k, v):
            \"\"\"One chunk of keys: the row maxima m, sums ℓ and unnormalised outputs a, relative to m.\"\"\"
            s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
            m = s.amax(dim=-1, keepdim=True)
            e = torch.exp(s - m)
            return m, e.sum(dim=-1, keepdim=True), e @ v


        def online_attention(q, k, v, chunk):
            \"\"\"Dense attention over key chunks with a running (m, ℓ, a); never holds more than L × chunk scores.\"\"\"
            m = l = a = None
            for start in range(0, k.shape[-2], chunk):
                m_c, l_c, a_c = partial_attention(q, k[..., start:start + chunk, :], v[..., start:start + chunk, :])
                if m is None:
                    m, l, a = m_c, l_c, a_c
                    continue
                m_new = torch.maximum(m, m_c)
                old, new = torch.exp(m - m_new), torch.exp(m_c - m_new)  # rescale both to the new maximum
                m, l, a = m_new, l * old + l_c * new, a * old + a_c * new
            return a / l


        online_gap = {c: (online_attention(q, k, v, c) - sdpa).abs().max().item() for c in (1, 16, 64, 256)}
        pd.Series(online_gap, name=tr("largest difference from SDPA", "与 SDPA 的最大差")).rename_axis(tr("chunk C", "分块大小 C"))
    """),
    Claim(
        en="""
        The last $m + \\log \\ell$ of the trace equals the row's log-sum-exp to 1e-12, and the online
        version matches SDPA to within **1e-6** for every chunk size tried, from one key at a time
        to the whole row of 256.
        """,
        zh="""
        演示中最后一步的 $m + \\log \\ell$ 与整行的 log-sum-exp 相差不到 1e-12；对试过的每一种分块大小（从一次一个键到整行 256 个），
        在线版本与 SDPA 的差都在 **1e-6** 以内。
        """,
        check="""
        assert abs(trace["m + log ℓ"].iloc[-1] - logsumexp) < 1e-12
        assert all(gap < 1e-6 for gap in online_gap.values()), online_gap
        """,
    ),
    Md(
        en="""
        **FlashAttention** (Dao et al., 2022) is this loop, run on a GPU: a tile of queries and a
        tile of keys and values are loaded into the fast on-chip memory, the update above is
        applied there, and only the final $o$ (plus $m + \\log\\ell$ per query, for the backward
        pass) is written back. The FLOPs are the same as dense attention's; what disappears is the
        $L \\times L$ matrix in slow memory, and with it most of the memory traffic. PyTorch's
        `scaled_dot_product_attention` (SDPA) picks such a fused kernel on GPU and on CPU alike,
        so SDPA, not a textbook implementation, is the dense baseline for memory and time.

        ## 3. Memory, measured

        We count memory with a small helper. A `TorchDispatchMode` is a hook that PyTorch calls for
        every operation; ours adds the bytes of each new tensor an operation returns, subtracts them
        when the tensor is freed, and keeps the peak. It sees every tensor that PyTorch hands back,
        but not the scratch space inside a single fused kernel (for SDPA's CPU kernel, a few small
        tiles per thread), and not the inputs, which exist before the call.
        """,
        zh="""
        **FlashAttention**（Dao 等，2022）就是在 GPU 上运行的这个循环：把一块查询和一块键、值装入片上的高速存储，
        在那里完成上面的更新，最后只把 $o$（以及供反向传播使用的每个查询的 $m + \\log\\ell$）写回显存。
        它的浮点运算量与稠密注意力相同，省掉的是慢速显存中的 $L \\times L$ 矩阵，以及随之而来的大部分读写。
        PyTorch 的 `scaled_dot_product_attention`（SDPA）在 GPU 和 CPU 上都会选用这类融合内核，
        因此衡量内存和时间时，稠密基线应当是 SDPA，而不是教科书式的实现。

        ## 3. 实测内存

        我们用一个小工具统计内存。`TorchDispatchMode` 是 PyTorch 在执行每个运算时都会调用的钩子；我们的钩子把每个运算新返回的张量的字节数加上，
        张量释放时再减去，并记下峰值。它能看到 PyTorch 返回的每个张量，但看不到单个融合内核内部的临时空间
        （对 SDPA 的 CPU 内核来说，是每个线程的几个小分块），也不计入调用之前就已存在的输入。
        """,
    ),
    Code("""
        class PeakMemory(TorchDispatchMode):
            \"\"\"Peak bytes of the tensors that operations create inside the `with` block.\"\"\"

            def __init__(self):
                super().__init__()
                self.now = self.peak = 0
                self.alive = set()

            def _freed(self, key, nbytes):
                self.alive.discard(key)
                self.now -= nbytes

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor) and id(t.untyped_storage()) not in self.alive:  # a view adds nothing
                        storage = t.untyped_storage()
                        self.alive.add(id(storage))
                        self.now += storage.nbytes()
                        weakref.finalize(storage, self._freed, id(storage), storage.nbytes())
                self.peak = max(self.peak, self.now)
                return out


        def peak_mib(fn):
            with PeakMemory() as counter:
                fn()
            return counter.peak / 2**20


        H, D = 2, 32
        rows = []
        for L in (256, 512, 1024, 2048):
            qn, kn, vn = synthetic_qkv("random", heads=H, length=L, head_dim=D, seed=0)
            runs = {"reference": lambda: dense_attention(qn, kn, vn),
                    "online": lambda: online_attention(qn, kn, vn, 64),
                    "sdpa": lambda: F.scaled_dot_product_attention(qn, kn, vn)}
            rows += [dict(seq_len=L, method=name, peak_mib=peak_mib(fn)) for name, fn in runs.items()]
        mem = pd.DataFrame(rows)
        peaks = mem.pivot(index="seq_len", columns="method", values="peak_mib")[["reference", "online", "sdpa"]]
        scores_mib = {L: H * L * L * 4 / 2**20 for L in peaks.index}   # one float32 L × L matrix per head
        output_mib = {L: H * L * D * 4 / 2**20 for L in peaks.index}   # the output itself
        names = {"reference": tr("naive reference (dense_attention)", "朴素参考实现（dense_attention）"),
                 "online": tr("online softmax, from scratch (C = 64)", "从零实现的在线 softmax（C = 64）"),
                 "sdpa": tr("SDPA (fused)", "SDPA（融合内核）")}
        peaks.rename(columns=names).rename_axis(index=tr("L", "L"), columns=tr("peak MiB", "峰值 MiB")).round(3)
    """),
    Code("""
        fig = viz.scaling_plot(mem, x="seq_len", y="peak_mib", spread=None, color="method", names=names,
                               title=tr(f"Peak memory of the tensors each version creates (H = {H}, D = {D})",
                                        f"各实现所建张量的峰值内存（H = {H}，D = {D}）"),
                               y_title=tr("peak memory (MiB)", "峰值内存 (MiB)"), lang=LANG)
        fig.update_xaxes(tickvals=list(peaks.index))
        fig.show()
    """),
    Claim(
        en="""
        At L = 1024 the naive reference peaks at **24.5 MiB** (± 0.1): three $L \\times L$ float32
        tensors (scores, softmax, and its copy with empty rows zeroed, 8 MiB each for two heads) plus
        the output. SDPA peaks at **0.258 MiB**, its output plus one log-sum-exp per query, about
        **95×** less. Doubling L multiplies the reference's peak by 4 (within 0.1) and SDPA's by
        exactly 2; the from-scratch online version grows by 2 as well (within 0.1), holding
        $L \\times C$ scores at a time.
        """,
        zh="""
        L = 1024 时，朴素参考实现的峰值为 **24.5 MiB**（± 0.1）：三个 $L \\times L$ 的 float32 张量（得分、softmax 结果、
        以及把空行置零后的副本，两个头合计各 8 MiB），再加上输出。SDPA 的峰值为 **0.258 MiB**，即输出本身加上每个查询一个
        log-sum-exp，约为前者的 **1/95**。L 翻倍时，参考实现的峰值变为 4 倍（误差 0.1 以内），SDPA 恰好变为 2 倍；
        从零实现的在线版本同样变为 2 倍左右（误差 0.1 以内），因为它每次只存放 $L \\times C$ 个得分。
        """,
        check="""
        ref1k, sdpa1k = peaks["reference"][1024], peaks["sdpa"][1024]
        assert abs(ref1k - 24.5) < 0.1 and abs(ref1k - (3 * scores_mib[1024] + output_mib[1024])) < 0.3
        assert abs(sdpa1k - output_mib[1024] * (D + 1) / D) < 1e-6, sdpa1k
        assert abs(ref1k / sdpa1k - 95) < 1, ref1k / sdpa1k
        assert abs(peaks["reference"][2048] / ref1k - 4) < 0.1
        assert peaks["sdpa"][2048] == 2 * sdpa1k
        assert abs(peaks["online"][2048] / peaks["online"][1024] - 2) < 0.1
        """,
    ),
    Md(
        en="""
        Memory is not the only saving: a fused kernel also reads and writes less, so it is faster.
        CPU time (not inflated by other programs), fastest of three runs, at L = 2048:
        """,
        zh="""
        省下的不只是内存：融合内核的读写也更少，所以更快。下面是 L = 2048 时的 CPU 时间（不受其他程序影响），取三次中最快的一次：
        """,
    ),
    Code("""
        qn, kn, vn = synthetic_qkv("random", heads=H, length=2048, head_dim=D, seed=0)
        fastest = {}
        for name, fn in {"reference": lambda: dense_attention(qn, kn, vn),
                         "sdpa": lambda: F.scaled_dot_product_attention(qn, kn, vn)}.items():
            best = math.inf
            for _ in range(3):
                start = time.process_time()
                fn()
                best = min(best, time.process_time() - start)
            fastest[name] = best * 1e3
        print(tr(f"naive reference {fastest['reference']:.1f} ms, SDPA {fastest['sdpa']:.1f} ms: "
                 f"{fastest['reference'] / fastest['sdpa']:.1f}× faster",
                 f"朴素参考实现 {fastest['reference']:.1f} ms，SDPA {fastest['sdpa']:.1f} ms："
                 f"快 {fastest['reference'] / fastest['sdpa']:.1f} 倍"))
    """),
    Claim(
        en="""
        SDPA is faster than the naive reference at L = 2048 (about 8× on a 2-core CPU; the printout
        gives your machine's ratio), for the same FLOPs.
        """,
        zh="""
        在 L = 2048 时，SDPA 比朴素参考实现快（在双核 CPU 上约快 8 倍，你的机器上的倍数见上面的输出），而两者的浮点运算量相同。
        """,
        check="""
        assert fastest["sdpa"] < fastest["reference"], fastest
        """,
    ),
    Md(
        en="""
        So the dense baseline for everything that follows is SDPA: exact, $O(L)$ memory beyond its
        inputs, and fast. A sparse method has to beat *that*, not a textbook implementation that
        stores three $L \\times L$ tensors.
        """,
        zh="""
        所以，后面所有比较的稠密基线都是 SDPA：结果精确，除输入之外只需 $O(L)$ 的内存，而且快。稀疏方法要胜过的是 *它*，
        而不是存放三个 $L \\times L$ 张量的教科书式实现。
        """,
    ),
    Summary(
        en="""
        - Dense attention is $o_i = \\sum_j p_{ij} v_j$ with $p_{ij}$ the softmax of $q_i \\cdot k_j / \\sqrt{D}$;
          subtracting each row's maximum keeps it finite (without it, scores in the hundreds give NaN).
        - The online softmax carries a running maximum $m$, sum $\\ell$ and output $a$, rescaling them
          by $e^{m - m'}$ when the maximum grows; our from-scratch version matches SDPA to 1e-6 for
          any chunk size.
        - FlashAttention runs that loop in on-chip memory: same FLOPs, no $L \\times L$ matrix. The
          naive reference holds three of them (24.5 MiB at L = 1024, H = 2), SDPA 95× less.
        - SDPA is the dense baseline for memory and time in this course.
        """,
        zh="""
        - 稠密注意力为 $o_i = \\sum_j p_{ij} v_j$，其中 $p_{ij}$ 是 $q_i \\cdot k_j / \\sqrt{D}$ 的 softmax；减去每行最大值可避免溢出
          （不减的话，得分达到数百时就会得到 NaN）。
        - 在线 softmax 动态维护最大值 $m$、和 $\\ell$ 与输出 $a$，最大值变大时乘以 $e^{m - m'}$ 加以修正；从零实现的版本在任何分块大小下
          都与 SDPA 相差不到 1e-6。
        - FlashAttention 在片上存储中运行这个循环：浮点运算量不变，但不再需要 $L \\times L$ 矩阵。朴素参考实现要存放三个这样的矩阵
          （L = 1024、H = 2 时为 24.5 MiB），SDPA 只需其 1/95。
        - 在本课程中，衡量内存和时间的稠密基线都是 SDPA。
        """,
    ),
    References(items=(
        ("Vaswani et al. 2017. Attention Is All You Need. arXiv:1706.03762", "https://arxiv.org/abs/1706.03762"),
        ("Milakov, Gimelshein. 2018. Online normalizer calculation for softmax. arXiv:1805.02867",
         "https://arxiv.org/abs/1805.02867"),
        ("Rabe, Staats. 2021. Self-attention Does Not Need O(n²) Memory. arXiv:2112.05682",
         "https://arxiv.org/abs/2112.05682"),
        ("Dao, Fu, Ermon, Rudra, Ré. 2022. FlashAttention: Fast and Memory-Efficient Exact Attention with "
         "IO-Awareness. arXiv:2205.14135", "https://arxiv.org/abs/2205.14135"),
        ("Zhang, Lipton, Li, Smola. Dive into Deep Learning (动手学深度学习), chapter on attention mechanisms. "
         "d2l.ai / zh.d2l.ai", "https://d2l.ai"),
    )),
    Exercises(items=(
        Exercise(
            en="""
            Two workers each process half of the keys and return their `partial_attention`
            results `(m, l, a)`. Write `merge(x, y)` that combines two such triples into the
            triple for all the keys, so that `a / l` of the merged triple is the attention output.
            (This is how attention is split across GPUs or across the blocks of one long cache.)
            Call `check_ex1(merge)`.
            """,
            zh="""
            两个工作进程各处理一半的键，分别返回 `partial_attention` 的结果 `(m, l, a)`。请写出 `merge(x, y)`，
            把两个这样的三元组合并成对应全部键的三元组，使合并后三元组的 `a / l` 就是注意力输出。
            （把注意力拆到多块 GPU 上，或拆到一段长缓存的多个块上，用的就是这个方法。）然后调用 `check_ex1(merge)`。
            """,
            hint_en="""
            Both triples are relative to their own maximum. Take $m = \\max(m_x, m_y)$ and multiply each
            triple's $\\ell$ and $a$ by $e^{m_x - m}$ or $e^{m_y - m}$ before adding.
            """,
            hint_zh="""
            两个三元组各自相对于自己的最大值。取 $m = \\max(m_x, m_y)$，把每个三元组的 $\\ell$ 和 $a$ 分别乘以 $e^{m_x - m}$
            或 $e^{m_y - m}$ 之后再相加。
            """,
            solution_en="""
            With $m = \\max(m_x, m_y)$: $\\ell = \\ell_x e^{m_x - m} + \\ell_y e^{m_y - m}$ and
            $a = a_x e^{m_x - m} + a_y e^{m_y - m}$. It is the update of section 2 with a whole
            partial result in place of one chunk. Adding the sums without rescaling mixes
            exponentials taken relative to different maxima, which is the mistake the check rejects.
            """,
            solution_zh="""
            取 $m = \\max(m_x, m_y)$，则 $\\ell = \\ell_x e^{m_x - m} + \\ell_y e^{m_y - m}$，$a = a_x e^{m_x - m} + a_y e^{m_y - m}$。
            这就是第 2 节的更新，只是把一个分块换成了一份完整的部分结果。不做修正直接相加，会把相对于不同最大值的指数混在一起，
            自测单元格拒绝的正是这种错误。
            """,
            self_check="""
            def check_ex1(merge):
                qc, kc, vc = synthetic_qkv("peaked", heads=2, length=128, head_dim=32, seed=1)
                half = 40  # unequal halves, so the two maxima differ
                m, l, a = merge(partial_attention(qc, kc[..., :half, :], vc[..., :half, :]),
                                partial_attention(qc, kc[..., half:, :], vc[..., half:, :]))
                gap = (a / l - F.scaled_dot_product_attention(qc, kc, vc)).abs().max().item()
                assert gap < 1e-5, tr(f"The merged a / l is off by {gap:.2g}: rescale each part to the common maximum.",
                                      f"合并后的 a / l 偏差为 {gap:.2g}：请先把每一部分修正到共同的最大值。")
                print(tr(f"Right: the merged result matches SDPA to {gap:.1e}.", f"正确：合并结果与 SDPA 相差 {gap:.1e}。"))
            """,
            solution_code="""
            def merge(x, y):
                (m_x, l_x, a_x), (m_y, l_y, a_y) = x, y
                m = torch.maximum(m_x, m_y)
                wx, wy = torch.exp(m_x - m), torch.exp(m_y - m)
                return m, l_x * wx + l_y * wy, a_x * wx + a_y * wy


            check_ex1(merge)
            """,
            wrong_answer="lambda x, y: (torch.maximum(x[0], y[0]), x[1] + y[1], x[2] + y[2])",
        ),
        Exercise(
            en="""
            Predict, from the three $L \\times L$ tensors, the naive reference's peak at L = 4096
            (H = 2, D = 32, float32) in MiB, then measure it with `peak_mib`. Set `answer` to your
            prediction; the check compares it with the measurement.
            """,
            zh="""
            根据三个 $L \\times L$ 张量，预测 L = 4096（H = 2，D = 32，float32）时朴素参考实现的峰值是多少 MiB，
            再用 `peak_mib` 实测。把你的预测赋给 `answer`，自测单元格会把它与实测值比较。
            """,
            hint_en="One float32 $L \\times L$ matrix per head is $H \\cdot L^2 \\cdot 4$ bytes; add the output, $H \\cdot L \\cdot D \\cdot 4$ bytes.",
            hint_zh="每个头一个 float32 的 $L \\times L$ 矩阵，共 $H \\cdot L^2 \\cdot 4$ 字节；再加上输出的 $H \\cdot L \\cdot D \\cdot 4$ 字节。",
            solution_en="""
            $3 \\cdot 2 \\cdot 4096^2 \\cdot 4$ bytes is 384 MiB, plus 1 MiB of output: **385 MiB**, and the
            measurement agrees to within 1%. The same call in SDPA would hold about 1 MiB.
            """,
            solution_zh="""
            $3 \\cdot 2 \\cdot 4096^2 \\cdot 4$ 字节即 384 MiB，加上 1 MiB 的输出，共 **385 MiB**，实测值与之相差不到 1%。
            同样的调用换成 SDPA，只需约 1 MiB。
            """,
            self_check="""
            def check_ex2(answer):
                qn, kn, vn = synthetic_qkv("random", heads=2, length=4096, head_dim=32, seed=0)
                measured = peak_mib(lambda: dense_attention(qn, kn, vn))
                assert abs(answer - measured) < 0.02 * measured, tr(
                    f"{answer:.0f} MiB is more than 2% away from the measured {measured:.0f} MiB: count three L × L tensors per head.",
                    f"{answer:.0f} MiB 与实测的 {measured:.0f} MiB 相差超过 2%：每个头要算三个 L × L 张量。")
                print(tr(f"Right: predicted {answer:.0f} MiB, measured {measured:.0f} MiB.",
                         f"正确：预测 {answer:.0f} MiB，实测 {measured:.0f} MiB。"))
            """,
            solution_code="""
            H_, L_, D_ = 2, 4096, 32
            answer = (3 * H_ * L_ * L_ * 4 + H_ * L_ * D_ * 4) / 2**20
            check_ex2(answer)
            """,
            wrong_answer="2 * 2 * 4096 * 4096 * 4 / 2**20",
        ),
    )),
]
