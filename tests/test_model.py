"""The model's fast paths against their slow twins, balancing, MTP and dtype/device independence."""

import pytest
import torch
import torch.nn.functional as F

import r1kit.model as M
from r1kit import config as C


def small(**kw):
    base = dict(vocab_size=128, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, q_lora_rank=32,
                kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=8,
                num_experts_per_tok=2, moe_intermediate_size=16, intermediate_size=32, num_nextn_predict_layers=1,
                max_position_embeddings=256)
    return C.tiny(**{**base, **kw})


def in_place_paths(in_place, monkeypatch):
    """Decode steps attend over gathered copies of the cache rows (False), or in the rows themselves through the C++
    kernel ("kernel", the default on CPU) or its PyTorch twin `latent_attention` ("reference")."""
    if in_place != "kernel":
        monkeypatch.setattr(M.kernels, "load", lambda name: False)
        monkeypatch.setattr(M, "LATENT_IN_PLACE", 0 if in_place else 10**9)


@pytest.mark.parametrize("in_place", [False, "kernel", "reference"])
def test_absorbed_equals_naive_with_and_without_cache(in_place, monkeypatch):
    in_place_paths(in_place, monkeypatch)
    model = M.build(small()).eval()
    x = torch.randint(0, 128, (3, 30))
    with torch.no_grad():
        naive = model.set_impl(attention="naive")(x)
        absorbed = model.set_impl(attention="absorbed")(x)
        torch.testing.assert_close(absorbed, naive, rtol=1e-5, atol=1e-5)
        # decode through the latent cache with each path, one token a step, then three (a verify step)
        for impl in ("naive", "absorbed"):
            model.set_impl(attention=impl)
            cache = M.KVCache(model.config, 3, 64)
            steps = [model(x[:, :10], cache=cache)]
            for t in range(10, 20):
                steps.append(model(x[:, t : t + 1], positions=torch.full((3, 1), t), cache=cache))
            for t in range(20, 30, 3):
                w = min(3, 30 - t)
                steps.append(model(x[:, t : t + w], positions=torch.arange(t, t + w).expand(3, w), cache=cache))
            torch.testing.assert_close(torch.cat(steps, dim=1), naive, rtol=1e-5, atol=1e-5)


# odd widths (vector tails), and the benchmark's shape, whose 64 value columns split into uneven register tiles
@pytest.mark.parametrize("R,D", [(24, 24 + 3), (64, 64 + 16)])
@pytest.mark.parametrize("H", [4, 5, 8, 16])  # 8 and 16: the lane-per-row path (rows by eights); 4: rows by fours
@pytest.mark.parametrize("T,lengths", [(1, [1, 300, 2600]), (3, [3, 1030]), (2, [513])])
def test_latent_attention_kernel_equals_reference(T, lengths, H, R, D):
    """The one-pass C++ kernel against two matmuls a row: ragged rows in any slots, causal verify rows, and keys
    split into chunks across threads (from 256 keys a chunk) whose partial softmaxes are merged."""
    # the suite needs a C++ compiler anyway (torch.compile's CPU tests): the kernel must build where it runs
    assert M.decode_kernel("latent_attention") is not None, "the C++ decode kernel did not build"
    torch.manual_seed(0)
    cache = torch.randn(4, 2700, D)
    slots = torch.tensor([3, 0, 1][: len(lengths)])
    positions = torch.stack([torch.arange(n - T, n) for n in lengths])
    qq = torch.randn(len(lengths), T * H, D)
    got = torch.ops.r1kit_cpu.latent_attention(qq, cache, slots, positions, H, R)
    # in float64: with these unscaled scores the float32 twin itself is off by up to 1.5e-5
    want = M.latent_attention(qq.double(), cache.double(), slots, positions, H, R).float()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("packed", [False, True])  # from 8 rows, weights packed in panels take the broadcast tiles
@pytest.mark.parametrize("rows", [1, 2, 3, 7, 8, 11, 13, 16, 21, 32, 33])  # tiles of six and 0-5 left
@pytest.mark.parametrize("N,K,bias", [(64, 256, True), (13, 24, False), (40, 20, True)])
def test_small_linear_kernel_equals_f_linear(rows, N, K, bias, packed):
    """The decode step's C++ projection against F.linear: odd row counts (a row left over from the pairs, or from
    the panels' six-row tiles), weight rows not a multiple of eight or sixteen, K not a multiple of eight (the
    scalar path), batched and strided inputs, and more rows than the kernel takes (handed to BLAS)."""
    assert M.cpu_kernel("small_linear") is not None, "the C++ linear kernel did not build"
    torch.manual_seed(rows)
    pack = M.cpu_kernel("pack_panels") if packed else lambda w: None
    w, b = torch.randn(N, K), torch.randn(N) if bias else None
    x = torch.randn(rows, 2 * K)[:, ::2]  # not contiguous
    tol = dict(rtol=1e-5, atol=1e-4)  # sums of K products of unit normals: a term left out would be ~1
    torch.testing.assert_close(torch.ops.r1kit_cpu.small_linear(x, w, b, pack(w)), F.linear(x, w, b), **tol)
    x3 = torch.randn(1, rows, K)
    torch.testing.assert_close(torch.ops.r1kit_cpu.small_linear(x3, w, b, pack(w)), F.linear(x3, w, b), **tol)
    # two or three weights of one input in one call (q / k / v, gate / up): each output its own projection
    ws = [w, torch.randn(N + 5, K), torch.randn(8, K)]
    bs = [b, torch.randn(N + 5), None]
    for n, op in ((2, torch.ops.r1kit_cpu.small_linear2), (3, torch.ops.r1kit_cpu.small_linear3)):
        got = op(x, *[t for pair in zip(ws[:n], bs[:n]) for t in pair], *[pack(wi) for wi in ws[:n]])
        assert len(got) == n
        for y, wi, bi in zip(got, ws, bs):
            torch.testing.assert_close(y, F.linear(x, wi, bi), **tol)


def test_a_stale_pack_is_never_read():
    """A pack whose weight was updated in place (its version counter moved) or replaced is ignored."""
    w, x = torch.randn(40, 24), torch.randn(16, 24)
    packed = M.cpu_kernel("pack_panels")(w)
    with torch.no_grad():
        w.mul_(-1)
    torch.testing.assert_close(torch.ops.r1kit_cpu.small_linear(x, w, None, packed), F.linear(x, w),
                               rtol=1e-5, atol=1e-4)
    other = torch.randn(40, 24)
    torch.testing.assert_close(torch.ops.r1kit_cpu.small_linear(x, other, None, packed), F.linear(x, other),
                               rtol=1e-5, atol=1e-4)


def test_linear_takes_the_kernel_only_without_autograd(monkeypatch):
    """Training keeps F.linear and its gradients; a no-grad call of a few rows goes to the kernel."""
    calls = []
    real = M.cpu_kernel

    def spy(name):
        op = real(name)
        return (lambda *a: calls.append(name) or op(*a)) if op is not None else None

    monkeypatch.setattr(M, "cpu_kernel", spy)
    layer, other = M.Linear(16, 8), M.Linear(16, 5, bias=False)
    x = torch.randn(4, 16)
    layer(x).sum().backward()
    sum(y.sum() for y in M.linears(x, layer, other)).backward()
    assert layer.weight.grad is not None and other.weight.grad is not None and calls == []
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
        both = M.linears(x, layer, other)
    torch.testing.assert_close(both[1], F.linear(x, other.weight), rtol=1e-5, atol=1e-5)
    assert calls == ["small_linear", "small_linear2"]


def test_a_kernel_that_does_not_build_leaves_the_pytorch_path(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    monkeypatch.setenv("R1KIT_CACHE", str(tmp_path))
    with pytest.warns(UserWarning, match="decode_attention.cpp failed"):
        assert M.kernels._load("decode_attention") is False
    assert not list(tmp_path.rglob("*.so"))


def test_a_kernel_build_is_keyed_to_the_cpu_flags(monkeypatch, tmp_path):
    """A -march=native build is reused only on a CPU with the same instruction sets: an AVX-512 build loaded by an
    AVX2-only machine that shares the cache would die of an illegal instruction."""
    cxx = tmp_path / "cxx"  # a "compiler" that writes an empty library, which then fails to load
    cxx.write_text('#!/bin/sh\nwhile [ "$1" != "-o" ]; do shift; done\n: > "$2"\n')
    cxx.chmod(0o755)
    monkeypatch.setenv("CXX", str(cxx))
    monkeypatch.setenv("R1KIT_CACHE", str(tmp_path))
    for cpu in ("flags\t: fma avx2", "flags\t: fma avx2 avx512f"):
        monkeypatch.setattr(M.kernels, "_cpu_flags", lambda: cpu)
        with pytest.warns(UserWarning, match="loading"):
            assert M.kernels._load("linear") is False
    assert len(list((tmp_path / "kernels").glob("linear-*.so"))) == 2


def test_auto_picks_absorbed_for_decode_and_naive_for_prefill():
    attn = M.build(C.deepseek_v3(num_hidden_layers=1, n_routed_experts=8, n_group=1, topk_group=1,
                                 num_experts_per_tok=2, first_k_dense_replace=1, vocab_size=8,
                                 hidden_size=64, intermediate_size=8), device="meta").model.layers[0].self_attn
    assert attn.use_absorbed(T=1, S=4096) and attn.use_absorbed(T=2, S=100)
    assert not attn.use_absorbed(T=1000, S=1000)


@pytest.mark.parametrize("in_place", [False, "kernel", "reference"])
def test_cache_rows_are_independent_of_batch_neighbours(in_place, monkeypatch):
    """Ragged rows (each its own length and slot) give the same logits as each row run alone."""
    in_place_paths(in_place, monkeypatch)
    model = M.build(small()).eval()
    seqs = [torch.randint(0, 128, (n,)) for n in (5, 12, 9)]
    cache = M.KVCache(model.config, 4, 32)
    T = max(len(s) for s in seqs)
    ids = torch.zeros(3, T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
    slots = torch.tensor([2, 0, 3])  # any cache rows
    with torch.no_grad():
        out = model(ids, cache=cache, slots=slots)
        nxt = torch.randint(0, 128, (3, 1))
        pos = torch.tensor([[len(s)] for s in seqs])
        step = model(nxt, positions=pos, cache=cache, slots=slots)
        for i, s in enumerate(seqs):
            alone = model(torch.cat([s, nxt[i]])[None])
            torch.testing.assert_close(out[i, : len(s)], alone[0, : len(s)], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(step[i, 0], alone[0, -1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", [True, False])
def test_dense_cache_matches_uncached(kernel, monkeypatch):
    """Decode steps of one token, then of three (a verify step), in the cache rows through the C++ kernel, or over
    gathered rows."""
    if not kernel:
        monkeypatch.setattr(M.kernels, "load", lambda name: False)
    model = M.build(C.tiny_dense(vocab_size=128)).eval()
    x = torch.randint(0, 128, (2, 26))
    with torch.no_grad():
        full = model(x)
        cache = M.KVCache(model.config, 3, 32)
        slots = torch.tensor([2, 0])
        steps = [model(x[:, :7], cache=cache, slots=slots)]
        for t in range(7, 20):
            steps.append(model(x[:, t : t + 1], positions=torch.full((2, 1), t), cache=cache, slots=slots))
        for t in range(20, 26, 3):
            steps.append(model(x[:, t : t + 3], positions=torch.arange(t, t + 3).expand(2, 3), cache=cache,
                               slots=slots))
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("D", [20, 32])  # not a multiple of 8 (vector tails), and one the paired-row tiles take
# query heads a key head: 8, the lane-per-row path; 4, rows by fours; 3, 5, 6 and 7 padded to those by zero rows at
# one position a row (T = 1), row by row at more
@pytest.mark.parametrize("G", [3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("T,lengths", [(1, [1, 300, 2600]), (3, [3, 1030]), (2, [2, 700])])  # odd and even key counts
def test_gqa_attention_kernel_equals_gathered(T, lengths, D, G):
    """The C++ grouped-query kernel against matmuls over gathered rows: ragged rows, causal verify rows, chunks."""
    assert M.decode_kernel("gqa_attention") is not None, "the C++ decode kernel did not build"
    torch.manual_seed(0)
    B, Hkv, L = len(lengths), 2, 2700
    k_cache, v_cache = torch.randn(4, Hkv, L, D), torch.randn(4, Hkv, L, D)
    slots = torch.tensor([3, 0, 1][:B])
    positions = torch.stack([torch.arange(n - T, n) for n in lengths])
    q = torch.randn(B, Hkv, T * G, D)
    got = torch.ops.r1kit_cpu.gqa_attention(q * D**-0.5, k_cache, v_cache, slots, positions)
    S = max(lengths)
    bias = torch.where(torch.arange(S) <= positions[..., None], 0.0, float("-inf"))[:, :, None]  # (B, T, 1, S)
    want = M.Attention._decode(q, k_cache[slots, :, :S], v_cache[slots, :, :S], bias)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,lengths", [(1, [1, 300, 2600]), (3, [3, 1030])])
def test_decode_kernels_read_16bit_caches(T, lengths, dtype):
    """A 16-bit cache, converted block by block: the kernels equal the reference on the same rounded rows, in the
    lane path (8 heads or query heads a key head) and outside it, with and without a column tail."""
    assert M.decode_kernel("latent_attention", torch.empty(1, dtype=dtype)) is not None
    torch.manual_seed(0)
    slots = torch.tensor([3, 0, 1][: len(lengths)])
    positions = torch.stack([torch.arange(n - T, n) for n in lengths])
    S = max(lengths)
    for H, R, D in [(8, 64, 80), (5, 24, 27)]:
        cache = torch.randn(4, 2700, D).to(dtype)
        qq = torch.randn(len(lengths), T * H, D)
        got = torch.ops.r1kit_cpu.latent_attention(qq, cache, slots, positions, H, R)
        want = M.latent_attention(qq, cache.float(), slots, positions, H, R)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    bias = torch.where(torch.arange(S) <= positions[..., None], 0.0, float("-inf"))[:, :, None]
    for G, D in [(8, 32), (4, 20)]:
        k_cache, v_cache = torch.randn(4, 2, 2700, D).to(dtype), torch.randn(4, 2, 2700, D).to(dtype)
        q = torch.randn(len(lengths), 2, T * G, D)
        got = torch.ops.r1kit_cpu.gqa_attention(q * D**-0.5, k_cache, v_cache, slots, positions)
        want = M.Attention._decode(q, k_cache.float()[slots, :, :S], v_cache.float()[slots, :, :S], bias)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_cache_bytes_per_token_is_the_latent():
    cfg = C.tiny()
    cache = M.KVCache(cfg, 1, 8)
    assert cache.bytes_per_token == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * 4
    assert M.KVCache(cfg, 1, 8, dtype=torch.float16).bytes_per_token == cache.bytes_per_token // 2
    dense = C.tiny_dense()
    assert M.KVCache(dense, 1, 8, dtype=torch.bfloat16).bytes_per_token == (
        2 * dense.num_key_value_heads * dense.head_dim * dense.num_hidden_layers * 2)


@pytest.mark.parametrize("kw", [{}, {"n_group": 4, "topk_group": 2}, {"scoring_func": "softmax", "topk_method": "greedy", "norm_topk_prob": False}])
def test_grouped_experts_equal_looped(kw):
    model = M.build(small(**kw))
    for m in model.modules():
        if isinstance(m, M.Gate) and m.e_score_correction_bias is not None:
            m.e_score_correction_bias.normal_(0, 0.1)
    x = torch.randint(0, 128, (2, 24))
    grouped = model.set_impl(experts="grouped")(x)
    grouped.square().mean().backward()
    g1 = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    looped = model.set_impl(experts="looped")(x)
    looped.square().mean().backward()
    torch.testing.assert_close(grouped, looped, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        if g1[n] is not None:
            torch.testing.assert_close(g1[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("tokens", [1, 3, 64, 3000])  # grouped matmuls (1, 3000), every expert on every token
def test_inference_experts_equal_looped(tokens, kernel, monkeypatch):
    """No-grad CPU experts, through the C++ kernel (up to 128 pairs an expert, so not 3000 tokens) or PyTorch."""
    if kernel:
        assert M.cpu_kernel("small_experts") is not None, "the C++ experts kernel did not build"
    else:
        monkeypatch.setattr(M.kernels, "load", lambda name: False)
    experts = M.build(small()).model.layers[1].mlp.experts
    x = torch.randn(tokens, experts.gate_up_proj.shape[-1])
    gate = torch.randn(tokens, experts.n_experts)
    weights, indices = gate.softmax(-1).topk(2, dim=-1)
    with torch.no_grad():
        fast = experts(x, weights, indices)
        torch.testing.assert_close(fast, experts.looped(x, weights, indices), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("tokens", [3, 40])
def test_compiled_inference_experts_equal_looped(tokens, kernel, monkeypatch):
    """A compiled step runs a few (token, expert) pairs as fused product-sums over the picked weights, and more
    (past 8 an expert) through the C++ kernel, or without it through the eager paths."""
    if kernel:  # built before compiling, as the engine does: a graph only reads whether it was
        assert M.cpu_kernel("small_experts") is not None, "the C++ experts kernel did not build"
    else:
        monkeypatch.setattr(M.kernels, "LOADED", {})
        monkeypatch.setattr(M.kernels, "load", lambda name: False)
    torch._dynamo.reset()
    experts = M.build(small()).model.layers[1].mlp.experts
    x = torch.randn(tokens, experts.gate_up_proj.shape[-1])
    weights, indices = torch.randn(tokens, experts.n_experts).softmax(-1).topk(2, dim=-1)
    with torch.no_grad():
        fast = torch.compile(experts.inference, dynamic=False)(x, weights, indices)
        torch.testing.assert_close(fast, experts.looped(x, weights, indices), rtol=1e-5, atol=1e-5)


def test_router_bias_steers_selection_but_not_weights():
    gate = M.build(small()).model.layers[1].mlp.gate
    x = torch.randn(64, 64)
    w0, i0, s0 = gate(x)
    gate.e_score_correction_bias[3] = 10.0  # expert 3 now always selected...
    w1, i1, s1 = gate(x)
    assert (i1 == 3).any(dim=-1).all() and not (i0 == 3).any(dim=-1).all()
    # ...but its routing weight still comes from the unbiased score
    rows = torch.arange(64)
    col = (i1 == 3).nonzero()[:, 1]
    picked = w1[rows, col]
    assert torch.all(picked < 1.0)
    torch.testing.assert_close(s0, s1)


def test_group_limited_routing_stays_within_topk_groups():
    cfg = small(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)
    gate = M.build(cfg).model.layers[1].mlp.gate
    _, idx, _ = gate(torch.randn(256, 64))
    groups = idx // 4
    assert max(len(set(r.tolist())) for r in groups) <= 2


def test_balancing_bias_balances_a_skewed_router():
    """A router that sends most tokens to two experts is balanced by the bias alone, with no gradient."""
    model = M.build(small(n_routed_experts=8, num_experts_per_tok=2)).train()
    moe = model.model.layers[1].mlp
    with torch.no_grad():
        moe.gate.weight.normal_(0, 0.02)
        moe.gate.weight[:2] += 0.1  # experts 0 and 1 preferred by every token
    x = torch.randn(1, 512, 64) + 0.3
    with torch.no_grad():
        moe(x)
    before = moe.tokens_per_expert.clone()
    assert before.max() / before.mean() > 3  # skewed: the two favourites take most of the load
    recent = torch.zeros(8)
    for step in range(300):
        with torch.no_grad():
            moe(x)
        if step >= 200:
            recent += moe.tokens_per_expert
        # a sign rule oscillates around balance by one step; a smaller step later narrows the oscillation
        M.update_balancing_bias(moe, speed=0.01 if step < 150 else 0.002)
    assert recent.max() / recent.mean() < 1.15, recent
    bias = moe.gate.e_score_correction_bias
    assert bias[:2].max() < bias[2:].min()  # the favourites were pushed down


def test_sequence_balance_loss_is_minimal_when_balanced():
    moe = M.build(small(aux_loss_alpha=0.1)).train().model.layers[1].mlp
    with torch.no_grad():
        moe(torch.randn(2, 16, 64))
    assert moe.aux_loss is not None and moe.aux_loss.item() > 0
    # uniform scores and perfectly spread selections: f_i = 1, P_i = 1/E, so the loss is alpha
    B, T, E, K = 1, 8, 8, 2
    scores = torch.full((B, T, E), 0.5)
    idx = torch.arange(T * K).view(B, T, K) % E
    torch.testing.assert_close(moe._balance_loss(scores, idx), torch.tensor(0.1))
    skew = torch.zeros(B, T, K, dtype=torch.long)
    skew[..., 1] = 1
    sk_scores = torch.full((B, T, E), 0.01)
    sk_scores[..., :2] = 0.9
    # f = E/(K*T) * hits = 4 for experts 0 and 1; P = 0.9 / 1.86 for each: 0.1 * 2 * 4 * 0.9 / 1.86
    torch.testing.assert_close(moe._balance_loss(sk_scores, skew), torch.tensor(0.1 * 2 * 4 * 0.9 / 1.86))


def test_mtp_predicts_the_token_after_next():
    """Depth-k logits at position i are a function of tokens <= i+k only (causal, shifted by k)."""
    model = M.build(small(num_nextn_predict_layers=2)).eval()
    x = torch.randint(0, 128, (1, 16))
    with torch.no_grad():
        outs = model.mtp_forward(model(x, head=False), x)
        assert [o.shape[1] for o in outs] == [15, 14]
        y = x.clone()
        y[0, 10] = (y[0, 10] + 1) % 128  # change token 10
        outs2 = model.mtp_forward(model(y, head=False), y)
    for k, (a, b) in enumerate(zip(outs, outs2), start=1):
        same = 10 - k  # positions i with i + k < 10 never see token 10
        torch.testing.assert_close(a[0, :same], b[0, :same])
        assert not torch.allclose(a[0, same], b[0, same])


def test_training_step_reduces_loss_with_mtp():
    model = M.build(small()).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.randint(0, 32, (4, 24))
    losses = []
    for _ in range(15):
        h = model(x, head=False)
        logits = model.lm_head(h)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
        mtp = model.mtp_forward(h, x)[0]
        loss = loss + 0.3 * torch.nn.functional.cross_entropy(mtp[:, :-1].flatten(0, 1), x[:, 2:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        M.update_balancing_bias(model)
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.8
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.mtp.parameters())


def test_bf16_runs_and_keeps_balancing_bias_fp32():
    model = M.build(small(), dtype=torch.bfloat16).eval()
    assert model.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    x = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        out = model(x)
        ref = model.float()(x)
    assert out.dtype == torch.bfloat16
    assert ((out.float() - ref).norm() / ref.norm()) < 0.05


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_cross_entropy_equals_unfused(reduction):
    h = torch.randn(3, 37, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    t = torch.randint(0, 50, (3, 37))
    t[0, :5] = -100
    fused = M.linear_cross_entropy(h, w, t, reduction=reduction, chunk=16)
    gh, gw = torch.autograd.grad(fused * 1.7, (h, w))
    ref = torch.nn.functional.cross_entropy((h @ w.t()).flatten(0, 1), t.flatten(), reduction=reduction)
    rh, rw = torch.autograd.grad(ref * 1.7, (h, w))
    torch.testing.assert_close(fused, ref)
    torch.testing.assert_close(gh, rh)
    torch.testing.assert_close(gw, rw)


def test_padded_experts_equal_looped_with_many_experts():
    model = M.build(small(n_routed_experts=32, num_experts_per_tok=4))
    x = torch.randint(0, 128, (4, 32))
    outs, grads = [], []
    for impl in ("grouped", "looped"):
        model.zero_grad()
        y = model.set_impl(experts=impl)(x)
        y.square().mean().backward()
        outs.append(y)
        grads.append(model.model.layers[1].mlp.experts.gate_up_proj.grad.clone())
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
