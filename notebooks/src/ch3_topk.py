"""Chapter 1: top-k selection, done chunk by chunk, and why the seed's version was wrong."""
from _cells import Claim, Code, Exercises, Md

NUMBER = 1
SLUG = "ch1_topk"
TITLE = {"en": "Top-k selection, chunk by chunk", "zh": "分块计算 Top-k 选择"}
TERMS = ["top-k selection", "chunk", "sparse attention", "query", "key", "memory"]

CELLS = [
    Md(
        en="""
        Sparse attention often starts with **top-k selection**: for each query, keep the k keys
        with the highest scores and ignore the rest. A score row can hold hundreds of thousands of
        keys, so it is tempting to process it one **chunk** at a time to save memory. This chapter
        shows the wrong way the project's seed code did it, the two-stage fix, and when chunking
        actually saves memory.
        """,
        zh="""
        稀疏注意力常常从 **Top-k 选择** 开始：对每个查询，只保留得分最高的 k 个键，忽略其余的键。
        一行得分可能有几十万个键，因此人们很想一次只处理一个 **分块** 来节省内存。本章展示项目最初的
        种子代码错在哪里、两阶段的正确做法，以及分块什么时候才真正节省内存。
        """,
    ),
    Code("""
        import torch
        import pandas as pd
        from sparse_attn import viz
        from sparse_attn.topk import StreamingTopK, chunked_topk


        def tr(en, zh):
            \"\"\"Text in the notebook's language, for plot titles and axis labels.\"\"\"
            return zh if LANG == "zh" else en
    """),
    Md(
        en="""
        ## 1. The seed's `batched_topk`

        The seed split the row into chunks, took the top-k of every chunk, and concatenated the
        results. Here it is, unchanged except for its name, on the seed's own demo input:
        two rows of 2048 scores, k = 128, chunks of 1024.
        """,
        zh="""
        ## 1. 种子代码中的 `batched_topk`

        种子代码把一行切成若干分块，对每个分块取 Top-k，再把结果拼接起来。下面是原样照搬的代码
        （只改了名字），输入也是种子自带的示例：两行、每行 2048 个得分，k = 128，分块大小 1024。
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
        print("seed:", tuple(seed_values.shape), " torch.topk:", tuple(true.values.shape))
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
        winners. Count how many of the true top-128 they contain:
        """,
        zh="""
        只保留这个输出的前 k 个也无济于事：它们只是第一个分块的胜出者。数一数其中有多少属于真正的 Top-128：
        """,
    ),
    Code("""
        def overlap(a, b):
            \"\"\"Share of the indices in each row of b that also appear in the same row of a.\"\"\"
            return torch.tensor([len(set(ra.tolist()) & set(rb.tolist())) / len(rb) for ra, rb in zip(a, b)])


        first_k = seed_indices[:, :k]
        missed = 1 - overlap(first_k, true.indices)
        print("share of the true top-128 missed by the first 128 seed outputs, per row:", missed.tolist())
    """),
    Claim(
        en="Truncated to k, the seed's answer misses **more than a quarter** of the true top-128 in every row.",
        zh="截断到 k 个之后，种子代码的结果在每一行都漏掉了真正 Top-128 中 **超过四分之一** 的元素。",
        check="""
        assert (missed > 0.25).all(), missed
        """,
    ),
    Md(
        en="""
        ## 2. The two-stage fix

        The global top-k is always contained in the union of the per-chunk top-k sets: an entry
        beaten by k others in its own chunk is beaten by at least k others in the whole row. So
        chunking is correct in two stages: **every chunk nominates its top-k (stage 1), then one
        final top-k over the candidates picks the answer (stage 2)**. `sparse_attn.topk.chunked_topk`
        does exactly that. The picture shows it on a short row: red bars are each chunk's
        candidates, blue bars the final answer.
        """,
        zh="""
        ## 2. 两阶段的正确做法

        全局 Top-k 一定包含在各分块 Top-k 的并集中：在自己的分块里已被 k 个元素超过的元素，在整行中
        至少也被 k 个元素超过。所以分块只有分两阶段才正确：**每个分块先提名自己的 Top-k（第一阶段），
        再对所有候选做一次 Top-k 得到答案（第二阶段）**。`sparse_attn.topk.chunked_topk` 正是这样做的。
        下图在一个短行上演示：红色柱是各分块的候选，蓝色柱是最终答案。
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
        print(agree, covered.tolist())
    """),
    Claim(
        en="""
        `chunked_topk` returns **exactly** `torch.topk`'s values for every chunk size tried, from 1
        to more than the row length, and the candidates of stage 1 contain **all** of the true top-128.
        """,
        zh="""
        对试过的每一种分块大小（从 1 到超过行长），`chunked_topk` 返回的值与 `torch.topk` **完全相同**；
        第一阶段的候选包含了真正 Top-128 的 **全部** 元素。
        """,
        check="""
        assert all(agree.values()), agree
        assert (covered == 1).all(), covered
        """,
    ),
    Md(
        en="""
        ## 3. When does chunking save memory?

        If the whole row already sits in memory, chunking cannot save the row itself. What it can
        save is the row that is *never built*: in attention, scores are made one key chunk at a
        time, and `StreamingTopK` keeps a running top-k, merging each new chunk into it. Then a row
        never holds more than **k + C** values (C the chunk size) instead of all L. We stream a row
        of L = 8192 scores and record the widest tensor the running top-k held.
        """,
        zh="""
        如果整行数据本来就在内存里，分块省不下这一行本身。它能省下的是那一行 *从未被构造出来* 的数据：
        在注意力中，得分按键的分块逐块算出，`StreamingTopK` 维护一个滚动的 Top-k，把每个新分块合并进去。
        这样每一行最多只持有 **k + C** 个值（C 为分块大小），而不是全部 L 个。下面把 L = 8192 个得分
        逐块送入，并记录滚动 Top-k 持有过的最宽张量。
        """,
    ),
    Code("""
        L = 8192
        row = torch.randn(4, L, generator=g)


        def stream(row, k, chunk):
            \"\"\"Run StreamingTopK over the row; return the result and the most values held per row at once.\"\"\"
            acc, widest = StreamingTopK(k), 0
            for start in range(0, row.shape[-1], chunk):
                part = row[:, start:start + chunk]
                held = 0 if acc.values is None else acc.values.shape[-1]
                widest = max(widest, held + part.shape[-1])  # update() concatenates the two
                acc.update(part, offset=start)
            return acc.result(), widest


        rows = []
        for k_, chunk in [(64, 256), (64, 1024), (512, 1024), (4096, 1024), (64, 8192)]:
            res, widest = stream(row, k_, chunk)
            assert torch.equal(res.values, torch.topk(row, k_).values)
            rows.append(dict(k=k_, chunk=chunk, held_per_row=widest, full_row=L, saving=L / widest))
        table = pd.DataFrame(rows)
        table
    """),
    Claim(
        en="""
        Every streamed result equals `torch.topk`, and a row never holds more than k + C values.
        With k = 64 and C = 256 that is **more than 25x** fewer values than the full row; with
        k = 4096 the saving drops **below 2x**, and with C = L there is **none**.
        """,
        zh="""
        每次流式计算的结果都与 `torch.topk` 相同，每行持有的值从不超过 k + C 个。k = 64、C = 256 时，
        持有的值比整行少 **25 倍以上**；k = 4096 时节省 **不到 2 倍**；C = L 时 **毫无节省**。
        """,
        check="""
        # The first chunk meets an empty running top-k, so a row holds min(k, L - C) + C at most.
        assert (table.held_per_row == table.k.clip(upper=L - table.chunk) + table.chunk).all()
        assert table.saving[0] > 25
        assert table.saving[3] < 2
        assert table.saving[4] <= 1
        """,
    ),
    Md(
        en="""
        The rule: chunking pays when **k + C is much smaller than L**. A large k, or a chunk as
        long as the row, brings the whole row back. The two-stage `chunked_topk` over data that is
        already in memory keeps `num_chunks * min(k, C)` candidates; when k ≥ C every chunk
        nominates all its entries and stage 2 sorts the whole row again:
        """,
        zh="""
        规律是：只有当 **k + C 远小于 L** 时分块才划算。k 很大，或分块和整行一样长，整行又回来了。
        对已经在内存中的数据，两阶段的 `chunked_topk` 保留 `分块数 * min(k, C)` 个候选；当 k ≥ C 时，
        每个分块都提名自己的全部元素，第二阶段又要对整行排序：
        """,
    ),
    Code("""
        def candidates_per_row(L, k, chunk):
            # What stage 1 of chunked_topk hands to stage 2: min(k, chunk) from every chunk.
            return sum(min(k, len(range(s, min(s + chunk, L)))) for s in range(0, L, chunk))


        few = candidates_per_row(L, 64, 1024)
        everything = candidates_per_row(L, 1024, 512)
        print(few, everything)
    """),
    Claim(
        en="With k = 64 and C = 1024, stage 2 sees **512** candidates out of 8192; with k = 1024 and C = 512 it sees **all 8192**.",
        zh="k = 64、C = 1024 时，第二阶段只看 8192 个中的 **512** 个候选；k = 1024、C = 512 时它要看 **全部 8192 个**。",
        check="""
        assert few == 512 and everything == L == 8192
        """,
    ),
    Exercises(
        en=(
            "Change the seed's demo to k = 1500 with chunks of 1024. What shape does `seed_batched_topk` return, and does `chunked_topk` still agree with `torch.topk`?",
            "Use `stream` to find, for L = 8192 and k = 64, the chunk size that holds the fewest values per row. Why is it not C = 1?",
            "Feed `chunked_topk` a row with NaN and ±inf entries and compare with `torch.topk`. Which one counts NaN as the largest value?",
        ),
        zh=(
            "把种子示例改为 k = 1500、分块大小 1024。`seed_batched_topk` 返回什么形状？`chunked_topk` 仍与 `torch.topk` 一致吗？",
            "用 `stream` 找出在 L = 8192、k = 64 时每行持有值最少的分块大小。为什么不是 C = 1？",
            "给 `chunked_topk` 一行含 NaN 和 ±inf 的数据，与 `torch.topk` 比较。谁把 NaN 当作最大值？",
        ),
    ),
]
