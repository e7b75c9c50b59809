"""Chapter 6: how sparse is a real model's attention? all-MiniLM-L6-v2 reading one sentence."""
from _cells import Claim, Code, Exercise, Exercises, Md, Objectives, References, Summary

NUMBER = 6
SLUG = "ch6_real_model"
TITLE = {"en": "How sparse is a real model's attention?", "zh": "真实模型的注意力有多稀疏？"}
TERMS = ["attention", "head", "token", "query", "key", "mass kept", "top-k selection", "heatmap", "sparsity",
         "attention sink"]

CELLS = [
    Objectives(
        en=(
            "capture q, k and v from every layer and head of a small pretrained encoder reading your own sentence;",
            "measure sparsity as the fewest keys that hold 90 % of a query's attention, per layer and per head;",
            "find attention sinks and a previous-token head, and say what each means for top-k, sliding windows "
            "and StreamingLLM;",
            "show why one k for every head is too much for some heads and too little for others;",
            "know the model's limits: its English vocabulary turns most Chinese characters into `[UNK]`.",
        ),
        zh=(
            "让一个小型预训练编码器读你自己写的句子，并取出每一层、每个注意力头的 q、k、v；",
            "把稀疏度定义为占一个查询 90% 注意力权重所需的最少键数，并按层、按注意力头测量；",
            "找出注意力汇点和“前一词元头”，并说明它们对 Top-k、滑动窗口和 StreamingLLM 各意味着什么；",
            "说明为什么所有注意力头共用一个 k，对有些头太多，对另一些头又太少；",
            "了解这个模型的局限：它的英文词表会把大多数汉字变成 `[UNK]`。",
        ),
    ),
    Md(
        en=r"""
        ## Why look at a real model?

        Every sparse method bets that a query's attention is concentrated on a few keys. Synthetic
        patterns show what a method does on a structure we planted; only a trained model can say how
        often the bet pays. Our measure of **sparsity**: for query $i$ with weights sorted as
        $p_{i,(1)}\ge p_{i,(2)}\ge\dots$,

        $$
        k_{90}(i)=\min\Big\{k:\ \sum_{r=1}^{k} p_{i,(r)}\ge 0.9\Big\},
        $$

        the $k$ that **top-k selection** would need to keep 90 % of the mass, reported as a share of the
        $L$ keys. A share near 1 means no sparse method can save much on that query.

        `all-MiniLM-L6-v2` (6 layers × 12 heads, head dimension 32, an English sentence encoder) ships
        inside a Python package, so nothing is downloaded. `sparse_attn.sources` runs it on a sentence and
        captures q, k and v of every layer: each **token** is one **query** and one **key**.
        """,
        zh=r"""
        ## 为什么要看真实模型？

        每一种稀疏方法都押注于同一件事：一个查询的注意力集中在少数几个键上。合成模式展示的是方法在我们植入的结构上的表现；
        这个赌注多常押中，只有训练好的模型才能回答。我们对 **稀疏度** 的度量是：把查询 $i$ 的权重从大到小排成
        $p_{i,(1)}\ge p_{i,(2)}\ge\dots$，

        $$
        k_{90}(i)=\min\Big\{k:\ \sum_{r=1}^{k} p_{i,(r)}\ge 0.9\Big\},
        $$

        即 **Top-k 选择** 要保留 90% 的权重所需的 $k$，再表示为占全部 $L$ 个键的比例。比例接近 1，
        说明在这个查询上任何稀疏方法都省不了多少。

        `all-MiniLM-L6-v2`（6 层 × 12 个注意力头，头维度 32，一个英文句子编码器）随 Python 包一起发布，
        因此无需下载任何东西。`sparse_attn.sources` 让它读一句话，并取出每一层的 q、k、v：每个 **词元**
        既是一个查询，也是一个键。
        """,
    ),
    Code("""
        import os
        import warnings

        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model ships with a package: never download
        warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm's note about notebook widgets
        import pandas as pd
        import torch
        import transformers
        from sparse_attn import viz
        from sparse_attn.metrics import mass_kept
        from sparse_attn.ops import dense_attention, topk_attention
        from sparse_attn.sources import Source, load, load_model

        transformers.utils.logging.disable_progress_bar()  # no loading bar on stderr
        transformers.utils.logging.set_verbosity_error()


        def tr(en, zh):
            \"\"\"Text in the notebook's language, for printouts, plot titles and axis labels.\"\"\"
            return zh if LANG == "zh" else en


        def read(text):
            \"\"\"The model's q, k, v on `text`, one QKV per layer, and each layer's attention weights (H, L, L).\"\"\"
            layers = [load(Source.model(text, layer=i)) for i in range(6)]
            weights = [dense_attention(x.q, x.k, x.v, scale=x.scale, return_weights=True)[1][0] for x in layers]
            return layers, weights


        TEXT = ("The teacher wrote a long sentence on the board, and every student in the classroom "
                "tried to guess which words the model would look at.")
        layers, weights = read(TEXT)
        tokens = layers[0].tokens
        L = len(tokens)
        print(tr(f"{L} tokens: ", f"{L} 个词元：") + " ".join(tokens))
    """),
    Claim(
        en="The model has **6** layers of **12** heads with head dimension **32**, and reads the sentence as **29** tokens, `[CLS]` first and `[SEP]` last.",
        zh="该模型有 **6** 层、每层 **12** 个注意力头，头维度为 **32**；这句话被读成 **29** 个词元，第一个是 `[CLS]`，最后一个是 `[SEP]`。",
        check="""
        assert layers[0].meta["num_layers"] == len(layers) == 6
        assert all(x.q.shape == (1, 12, 29, 32) for x in layers)
        assert L == 29 and tokens[0] == "[CLS]" and tokens[-1] == "[SEP]"
        """,
    ),
    Md(
        en="""
        ## 1. Keys needed for 90 % of the mass

        Sort each query's weights, accumulate them, and count how many it takes to reach 90 %.
        """,
        zh="""
        ## 1. 占 90% 权重所需的键

        把每个查询的权重从大到小排序并累加，数一数需要多少个键才能达到 90%。
        """,
    ),
    Code("""
        def keys_for(w, share=0.9):
            \"\"\"(H, Lq): the fewest keys holding `share` of each query's mass.\"\"\"
            cumulative = w.sort(dim=-1, descending=True).values.cumsum(-1)
            return (cumulative < share).sum(-1) + 1


        k90 = torch.stack([keys_for(w) for w in weights])  # (layers, heads, queries)
        special = torch.stack([w[..., [0, L - 1]].sum(-1).mean() for w in weights])  # on [CLS] and [SEP]
        by_layer = pd.DataFrame({
            "share_of_keys_for_90pct": (k90.float().mean(dim=(1, 2)) / L).tolist(),
            "sparsest_head_keys": k90.float().mean(-1).min(-1).values.tolist(),
            "densest_head_keys": k90.float().mean(-1).max(-1).values.tolist(),
            "mass_on_CLS_and_SEP": special.tolist(),
        })
        by_layer.round(3).rename(columns={
            "share_of_keys_for_90pct": tr("share of keys for 90 %", "占 90% 所需键的比例"),
            "sparsest_head_keys": tr("keys, sparsest head", "最稀疏头的键数"),
            "densest_head_keys": tr("keys, densest head", "最稠密头的键数"),
            "mass_on_CLS_and_SEP": tr("mass on [CLS] and [SEP]", "[CLS] 和 [SEP] 的权重占比"),
        }).rename_axis(tr("layer", "层"))
    """),
    Claim(
        en="""
        Sparsity depends on the layer: in layers 1 and 2 a query needs, on average, **0.27 ± 0.02** of
        the keys to hold 90 % of its mass; in layer 0, **0.62 ± 0.02**; over all layers **0.43 ± 0.02**.
        At 29 tokens, that is 8 keys in the sparsest layers and 18 in the densest.
        """,
        zh="""
        稀疏度因层而异：在层 1 和层 2 中，查询平均只需全部键的 **0.27 ± 0.02** 就能占到 90% 的权重；
        在层 0 中则需要 **0.62 ± 0.02**；所有层平均为 **0.43 ± 0.02**。在 29 个词元下，
        这相当于最稀疏的层要 8 个键，最稠密的层要 18 个。
        """,
        check="""
        share = by_layer.share_of_keys_for_90pct
        assert (abs(share[[1, 2]] - 0.27) < 0.02).all() and abs(share[0] - 0.62) < 0.02, share
        assert abs(share.mean() - 0.43) < 0.02, share
        """,
    ),
    Claim(
        en="""
        It depends on the **head** even more. In layer 0, head 2 is a *previous-token head*: every query
        puts **at least 0.998** of its mass on the token just before it (the first token on itself), so
        top-1, or a sliding window of 2, would do. The densest head of the same layer needs **23.5 ± 0.5**
        of the 29 keys on average.
        """,
        zh="""
        它更依赖于 **注意力头**。层 0 中编号为 2 的头是一个“前一词元头”：每个查询都把 **至少 0.998**
        的权重放在紧挨着它的前一个词元上（第一个词元放在自己身上），所以 Top-1 或者宽度为 2 的滑动窗口就够了。
        而同一层最稠密的头平均需要 29 个键中的 **23.5 ± 0.5** 个。
        """,
        check="""
        previous = torch.arange(L).sub(1).clamp(min=0)
        assert torch.equal(weights[0][2].argmax(-1), previous)
        assert 0.998 <= weights[0][2].max(-1).values.min() <= 1 and (k90[0, 2] == 1).all()
        assert abs(by_layer.densest_head_keys[0] - 23.5) < 0.5, by_layer.densest_head_keys[0]
        """,
    ),
    Md(
        en="""
        ## 2. Attention sinks

        The grid shows the 12 heads of layer 1 on one colour scale. Look at the first and last columns:
        the special tokens `[CLS]` and `[SEP]`, which carry no meaning of their own.
        """,
        zh="""
        ## 2. 注意力汇点

        下面的网格在同一色标上显示层 1 的 12 个注意力头。请看第一列和最后一列：它们是特殊词元
        `[CLS]` 和 `[SEP]`，本身不带任何含义。
        """,
    ),
    Code("""
        viz.head_grid(weights[1], log=True, title=tr("Layer 1: one attention map per head (log scale)",
                                                     "层 1：每个注意力头一张注意力图（对数刻度）"), lang=LANG).show()
        sink_heads = [int((w[..., [0, L - 1]].sum(-1).mean(-1) > 0.5).sum()) for w in weights]
        print(tr(f"heads giving [CLS] and [SEP] more than half their mass, per layer: {sink_heads}",
                 f"各层中把一半以上权重给 [CLS] 和 [SEP] 的注意力头数：{sink_heads}"))
    """),
    Claim(
        en="""
        These **attention sink**s are real: in layer 1, **5** of the 12 heads give `[CLS]` and `[SEP]`
        more than half of their mass, and in layers 1 to 4 these 2 tokens out of 29 (6.9 % of the keys)
        receive **0.46, 0.48, 0.39 and 0.48** of all attention (each ± 0.02). A head that has nothing to
        look for parks its mass there. For sparse attention this is good news: keep the sinks, as
        StreamingLLM does, and the rest of the row is a tail, the shape where chapter 4's hybrid beat top-k.
        """,
        zh="""
        这些 **注意力汇点** 确实存在：在层 1 中，12 个注意力头中有 **5** 个把一半以上的权重给了 `[CLS]` 和
        `[SEP]`；在层 1 到层 4 中，这 29 个词元中的 2 个（占键的 6.9%）分别获得了全部注意力的 **0.46、0.48、0.39 和 0.48**
        （各 ± 0.02）。一个注意力头没有要找的东西时，就把权重“停放”在这里。对稀疏注意力来说这是好消息：
        像 StreamingLLM 那样保留汇点，行中其余的部分就是一条尾部，正是第 4 章中混合方法胜过 Top-k 的形状。
        """,
        check="""
        assert sink_heads[1] == 5, sink_heads
        expected = [0.46, 0.48, 0.39, 0.48]
        assert all(abs(by_layer.mass_on_CLS_and_SEP[layer] - e) < 0.02 for layer, e in zip(range(1, 5), expected)), by_layer
        """,
    ),
    Md(
        en="""
        ## 3. Top-k on a real head

        Keep 8 keys per query (8 of the 29 tokens) in layer 2 and look at what is lost, with the tokens
        on the axes of the **heatmap**s. Which head does top-8 serve worst?
        """,
        zh="""
        ## 3. 真实注意力头上的 Top-k

        在层 2 中为每个查询保留 8 个键（29 个词元中的 8 个），并在以词元标注坐标轴的 **热力图** 上查看丢失了什么。
        Top-8 对哪个注意力头效果最差？
        """,
    ),
    Code("""
        x = layers[2]
        _, sel = topk_attention(x.q, x.k, x.v, 8, scale=x.scale, return_selection=True)
        kept = mass_kept(weights[2][None], sel)[0]  # (H, L)
        head = int(kept.mean(-1).argmin())  # the head top-8 serves worst
        print(tr(f"mass kept by top-8 in layer 2: mean {kept.mean():.3f}; worst head {head}: {kept[head].mean():.3f}; "
                 f"best head: {kept.mean(-1).max():.3f}",
                 f"层 2 中 Top-8 的权重占比：平均 {kept.mean():.3f}；最差的头（编号 {head}）：{kept[head].mean():.3f}；"
                 f"最好的头：{kept.mean(-1).max():.3f}"))
        fig = viz.attention_maps(weights[2][head], sel.to_dense(L)[0, head], sel.mask(L)[0, head], tokens=tokens,
                                 method_name=tr("top-8", "Top-8"),
                                 title=tr(f"Layer 2, head {head}: dense vs top-8", f"层 2 中编号为 {head} 的头：稠密与 Top-8"),
                                 lang=LANG)
        # Token labels once per column and row: on the bottom row and the left column only, so that the
        # rotated labels of the top row cannot run into the titles of the bottom row.
        fig.update_xaxes(showticklabels=False, title=None, row=1)
        fig.update_yaxes(showticklabels=False, title=None, col=2)
        fig.update_layout(height=900, margin=dict(b=110)).show()
    """),
    Claim(
        en="""
        In layer 2, top-8's **mass kept**, averaged over heads, is **0.90 ± 0.01**; the best head keeps
        **0.99** but the worst keeps **0.72 ± 0.02**: one k for all heads is too much for some and too
        little for others.
        """,
        zh="""
        在层 2 中，Top-8 在各注意力头上平均的 **权重占比** 为 **0.90 ± 0.01**；最好的头保留了 **0.99**，
        最差的头却只有 **0.72 ± 0.02**：所有头共用一个 k，对有些头太多，对另一些头又太少。
        """,
        check="""
        assert abs(kept.mean() - 0.90) < 0.01 and abs(kept[head].mean() - 0.72) < 0.02, (kept.mean(), kept[head].mean())
        assert abs(kept.mean(-1).max() - 0.99) < 0.005, kept.mean(-1)
        """,
    ),
    Md(
        en="""
        ## 4. The model's limits: Chinese text

        The model's vocabulary is English (WordPiece, 30522 entries). What does it make of a Chinese
        sentence?
        """,
        zh="""
        ## 4. 模型的局限：中文文本

        这个模型的词表是英文的（WordPiece，30522 个条目）。它会怎样处理一句中文？
        """,
    ),
    Code("""
        ZH_TEXT = "老师在黑板上写了一个很长的句子，教室里的每个学生都试着猜模型会看哪些词。"
        zh_tokens = load(Source.model(ZH_TEXT, layer=0)).tokens
        vocab = load_model().tokenizer.get_vocab()
        han = [c for c in ZH_TEXT if "\\u4e00" <= c <= "\\u9fff"]
        unknown = zh_tokens.count("[UNK]")
        vocab_han = sum(len(t) == 1 and "\\u4e00" <= t <= "\\u9fff" for t in vocab)
        print(" ".join(zh_tokens))
        print(tr(f"{len(han)} Chinese characters -> {unknown} [UNK]; the vocabulary holds {vocab_han} single Chinese characters "
                 f"among {len(vocab)} entries",
                 f"{len(han)} 个汉字 -> {unknown} 个 [UNK]；词表的 {len(vocab)} 个条目中只有 {vocab_han} 个单个汉字"))
    """),
    Claim(
        en="""
        The tokenizer does split Chinese into single characters, but **24 of the 34** (71 %) become
        `[UNK]`: the vocabulary holds only **244** single Chinese characters. To the model most of the
        sentence is one repeated unknown token, so attention measured on Chinese text with this model
        says little about Chinese; use a multilingual or Chinese model directory with `Source.model(...,
        model_dir=...)` for that.
        """,
        zh="""
        分词器确实把中文拆成了单个汉字，但 34 个汉字中有 **24 个**（71%）变成了 `[UNK]`：词表里只有 **244**
        个单个汉字。对模型来说，这句话的大部分是同一个反复出现的未知词元；因此用这个模型在中文文本上测得的注意力，
        对中文本身说明不了多少。要研究中文，请通过 `Source.model(..., model_dir=...)` 换用多语言或中文模型的目录。
        """,
        check="""
        assert len(han) == 34 and unknown == 24 and vocab_han == 244, (len(han), unknown, vocab_han)
        assert len(zh_tokens) == len(han) + 2 + 2  # every character one token, plus the comma, the full stop, [CLS] and [SEP]
        """,
    ),
    Summary(
        en="""
        - Sparsity, as the share of keys holding 90 % of a query's mass, is 0.43 on average in this model at
          29 tokens, from 0.27 in layers 1 and 2 to 0.62 in layer 0.
        - Heads differ more than layers: a previous-token head needs 1 key, the densest head of the same layer
          23.5 of 29.
        - Attention sinks: `[CLS]` and `[SEP]`, 7 % of the keys, take 39 % to 48 % of the mass in layers 1 to 4.
          Keeping them (StreamingLLM) leaves a tail, where the hybrid of chapter 4 helps.
        - One k for all heads: top-8 keeps 0.99 of one head and 0.72 of another. Per-head budgets follow.
        - This encoder is English: 71 % of the Chinese characters of our sentence become `[UNK]`.
        """,
        zh="""
        - 以占一个查询 90% 权重所需键的比例来衡量，这个模型在 29 个词元下的稀疏度平均为 0.43，从层 1、层 2 的 0.27 到层 0 的 0.62 不等。
        - 注意力头之间的差异比层之间更大：前一词元头只需 1 个键，同一层最稠密的头需要 29 个中的 23.5 个。
        - 注意力汇点：`[CLS]` 和 `[SEP]` 只占键的 7%，却在层 1 到层 4 中拿走了 39% 到 48% 的权重。像 StreamingLLM 那样保留它们，剩下的就是尾部，第 4 章的混合方法正好用得上。
        - 所有头共用一个 k：Top-8 对一个头保留 0.99，对另一个头只保留 0.72。由此自然想到按头分配预算。
        - 这个编码器是英文的：我们这句中文里 71% 的汉字都变成了 `[UNK]`。
        """,
    ),
    References(items=(
        ("Clark, Khandelwal, Levy, Manning. 2019. What Does BERT Look At? An Analysis of BERT's Attention. "
         "arXiv:1906.04341", "https://arxiv.org/abs/1906.04341"),
        ("Xiao, Tian, Chen, Han, Lewis. 2023. Efficient Streaming Language Models with Attention Sinks "
         "(StreamingLLM). arXiv:2309.17453", "https://arxiv.org/abs/2309.17453"),
        ("Wang, Wei, Dong, Bao, Yang, Zhou. 2020. MiniLM: Deep Self-Attention Distillation for Task-Agnostic "
         "Compression of Pre-Trained Transformers. arXiv:2002.10957", "https://arxiv.org/abs/2002.10957"),
    )),
    Exercises(items=(
        Exercise(
            en="""
            Give every head of layer 2 its own k: the smallest k that keeps 90 % of the mass for the head's
            median query (its median $k_{90}$). Set `answer` to the total number of keys the 12 heads then read
            per query, and compare it with 12 × 8 = 96 for top-8 everywhere.
            """,
            zh="""
            给层 2 的每个注意力头各自设定 k：取能让该头的中位数查询保留 90% 权重的最小 k（即该头 $k_{90}$ 的中位数）。
            把此时 12 个头每个查询总共读取的键数赋给 `answer`，并与处处使用 Top-8 时的 12 × 8 = 96 比较。
            """,
            hint_en="`k90[2]` is (heads, queries); take the median over queries and add up the heads.",
            hint_zh="`k90[2]` 的形状是（注意力头，查询）；沿查询取中位数，再把各个头加起来。",
            solution_en="""
            92 keys, against 96: about the same total, spent very differently. The most concentrated heads
            get 2 to 4 keys, the broad head 6 gets 17. Per-head budgets do not so much save keys as move
            them to the heads that need them, which is where top-8's 0.72 came from.
            """,
            solution_zh="""
            92 个键，而处处 Top-8 时为 96 个：总数差不多，但分配方式截然不同。最集中的几个头只分到 2 到 4 个键，
            宽泛的编号为 6 的头分到 17 个。按头分配预算与其说是省下了键，不如说是把键挪给了需要它们的头，
            而 Top-8 在最差的头上只保留 0.72 正是由此而来。
            """,
            self_check="""
            def check_ex1(answer):
                per_head = k90[2].float().median(-1).values
                assert int(answer) == int(per_head.sum()), tr(
                    f"{answer} is not the sum over heads of each head's median k90; check the dimension you reduced",
                    f"{answer} 不是各头 k90 中位数之和；检查一下你是沿哪个维度归约的")
                print(tr(f"Right: {int(answer)} keys per query in total, against 96.",
                         f"正确：每个查询总共 {int(answer)} 个键，而处处 Top-8 时为 96 个。"))
            """,
            solution_code="""
            per_head_k = k90[2].float().median(-1).values.int()
            print(tr("k per head: ", "各头的 k：") + str(per_head_k.tolist()))
            answer = int(per_head_k.sum())
            check_ex1(answer)
            """,
            wrong_answer="12 * 8",
        ),
        Exercise(
            en="""
            Does sparsity improve with length? Run the model on `LONG_TEXT` below, 64 tokens instead of 29, and
            set `answer` to the mean $k_{90}$ over all layers, heads and queries (29 tokens gave 12.6). If queries
            needed a fixed number of keys whatever the length, it would stay near 12.6.

            ```
            LONG_TEXT = TEXT + (" When the bell rang, nobody had guessed right, because the model had looked mostly at"
                                " the punctuation and at the two special tokens that frame every sentence it reads.")
            ```
            """,
            zh="""
            句子变长时稀疏度会改善吗？让模型读下面的 `LONG_TEXT`（64 个词元，而不是 29 个），把所有层、所有注意力头、
            所有查询上 $k_{90}$ 的平均值赋给 `answer`（29 个词元时为 12.6）。如果不论长度如何，查询所需的键数都固定不变，
            它应当仍在 12.6 附近。

            ```
            LONG_TEXT = TEXT + (" When the bell rang, nobody had guessed right, because the model had looked mostly at"
                                " the punctuation and at the two special tokens that frame every sentence it reads.")
            ```
            """,
            hint_en="`read(LONG_TEXT)` gives the weights; reuse `keys_for` on each layer and average.",
            hint_zh="`read(LONG_TEXT)` 会返回权重；对每一层套用 `keys_for` 再取平均。",
            solution_en="""
            About 24.8 keys: twice the length, twice the keys, so the share barely moves (0.43 to 0.39). At
            these lengths the encoder's queries spread over a roughly fixed *share* of the sentence, not a
            fixed number of keys. Sparse attention earns its keep at long context only where heads are local,
            sinks or retrieval-like; measure before assuming it.
            """,
            solution_zh="""
            约 24.8 个键：长度翻倍，键数也翻倍，所以比例几乎不变（从 0.43 到 0.39）。在这样的长度下，
            这个编码器的查询分散在句子中大致固定的 *比例* 上，而不是固定数目的键上。只有当注意力头是局部的、
            汇点式的或检索式的，稀疏注意力才能在长上下文中发挥作用；下结论之前先测量。
            """,
            self_check="""
            LONG_TEXT = TEXT + (" When the bell rang, nobody had guessed right, because the model had looked mostly at"
                                " the punctuation and at the two special tokens that frame every sentence it reads.")


            def check_ex2(answer):
                _, long_weights = read(LONG_TEXT)
                measured = torch.stack([keys_for(w) for w in long_weights]).float().mean().item()
                assert abs(float(answer) - measured) < 0.05, tr(
                    f"{float(answer):.2f} is not the mean k90 on LONG_TEXT; did you run the model on it?",
                    f"{float(answer):.2f} 不是 LONG_TEXT 上 k90 的平均值；你让模型读它了吗？")
                print(tr(f"Right: {measured:.1f} keys at {len(long_weights[0][0])} tokens, against "
                         f"{k90.float().mean():.1f} at {L}.",
                         f"正确：{len(long_weights[0][0])} 个词元时为 {measured:.1f} 个键，{L} 个词元时为 "
                         f"{k90.float().mean():.1f} 个。"))
            """,
            solution_code="""
            _, long_weights = read(LONG_TEXT)
            answer = torch.stack([keys_for(w) for w in long_weights]).float().mean().item()
            check_ex2(answer)
            """,
            wrong_answer="k90.float().mean().item()",
        ),
        Exercise(
            en="""
            Do the attention sinks survive on the Chinese sentence of section 4, where most tokens are `[UNK]`?
            Set `answer` to the share of layer 2's attention that goes to `[CLS]` and `[SEP]` on `ZH_TEXT`
            (on the English sentence it was 0.48).
            """,
            zh="""
            在第 4 节那句大部分词元都是 `[UNK]` 的中文上，注意力汇点还在吗？把 `ZH_TEXT` 上层 2 的注意力分给 `[CLS]`
            和 `[SEP]` 的比例赋给 `answer`（英文句子上为 0.48）。
            """,
            hint_en="`read(ZH_TEXT)` gives the weights; the special tokens are the first and the last key.",
            hint_zh="`read(ZH_TEXT)` 会返回权重；特殊词元是第一个键和最后一个键。",
            solution_en="""
            About 0.45: the sinks stay. They are a habit of the heads (where to park mass when nothing matches),
            not a response to the meaning of the words, which is why they appear even on a sentence the model
            cannot read.
            """,
            solution_zh="""
            约为 0.45：汇点依然存在。它们是注意力头的一种习惯（没有匹配时把权重停放在哪里），而不是对词义的反应，
            所以即使在模型读不懂的句子上也会出现。
            """,
            self_check="""
            def check_ex3(answer):
                zh_weights = read(ZH_TEXT)[1][2]
                n = zh_weights.shape[-1]
                measured = zh_weights[..., [0, n - 1]].sum(-1).mean().item()
                assert abs(float(answer) - measured) < 0.005, tr(
                    f"{float(answer):.3f} is not layer 2's mass on [CLS] and [SEP] for ZH_TEXT",
                    f"{float(answer):.3f} 不是 ZH_TEXT 上层 2 分给 [CLS] 和 [SEP] 的权重")
                print(tr(f"Right: {measured:.2f} on the Chinese sentence, {special[2]:.2f} on the English one.",
                         f"正确：中文句子上为 {measured:.2f}，英文句子上为 {special[2]:.2f}。"))
            """,
            solution_code="""
            zh_weights = read(ZH_TEXT)[1][2]
            n = zh_weights.shape[-1]
            answer = zh_weights[..., [0, n - 1]].sum(-1).mean().item()
            check_ex3(answer)
            """,
            wrong_answer="special[2].item()",
        ),
    )),
]
