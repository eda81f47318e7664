"""The engine against its slow twin (token-by-token argmax of the uncached model) and its promises."""

import asyncio
import copy

import pytest
import torch

import r1kit.model as M
from r1kit import config as C
from r1kit.engine import AsyncEngine, Engine, LLM, RequestError, SamplingParams
from r1kit.tokenizer import train_bpe

EOS = 2


def mla_config(**kw):
    return C.tiny(**{**dict(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, q_lora_rank=32,
                            kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=8,
                            moe_intermediate_size=16, intermediate_size=32, num_nextn_predict_layers=1,
                            max_position_embeddings=96, eos_token_id=EOS), **kw})


@pytest.fixture(scope="module")
def mla():
    torch.manual_seed(0)
    return M.build(mla_config()).eval()


@pytest.fixture(scope="module")
def dense():
    torch.manual_seed(0)
    return M.build(C.tiny_dense(vocab_size=64, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                intermediate_size=96, eos_token_id=EOS, max_position_embeddings=96)).eval()


@pytest.fixture(scope="module")
def tok():
    texts = [f"{a} plus {b} is {a + b}. The end, stop here." for a in range(30) for b in range(10)]
    return train_bpe(texts, vocab_size=300)


def reference_greedy(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [5, 6, 7, 8, 9, 10, 12, 13], [20]]


@pytest.mark.parametrize("which", ["mla", "dense"])
def test_greedy_equals_uncached_argmax(which, mla, dense):
    model = {"mla": mla, "dense": dense}[which]
    outs = LLM(model, max_num_seqs=4).generate(PROMPTS, SamplingParams(temperature=0, max_tokens=15, ignore_eos=True))
    for p, o in zip(PROMPTS, outs):
        assert o.outputs[0].token_ids == reference_greedy(model, p, 15)
        assert o.outputs[0].finish_reason == "length" and o.prompt_token_ids == p


@pytest.mark.parametrize("kv_cache_dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("which", ["mla", "dense"])
def test_16bit_cache_through_the_kernels_equals_the_gathered_path(which, kv_cache_dtype, mla, dense, monkeypatch):
    """A 16-bit cache: the C++ kernels read it in place, and decode the same tokens as the PyTorch path that gathers
    the same rounded rows; the cache takes half the bytes."""
    model = {"mla": mla, "dense": dense}[which]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    llm = LLM(model, max_num_seqs=4, kv_cache_dtype=kv_cache_dtype)
    assert llm.engine.cache.bytes_per_token * 2 == LLM(model, max_num_seqs=4).engine.cache.bytes_per_token
    fast = llm.generate(PROMPTS, params)
    monkeypatch.setattr(M, "decode_kernel", lambda *a, **k: None)
    monkeypatch.setattr(M, "dense_decoder", lambda *a, **k: None)  # (its attention is the kernel too)
    gathered = LLM(model, max_num_seqs=4, kv_cache_dtype=kv_cache_dtype).generate(PROMPTS, params)
    assert [o.outputs[0].token_ids for o in fast] == [o.outputs[0].token_ids for o in gathered]
    with pytest.raises(RequestError, match="kv_cache_dtype='int8'"):
        LLM(model, kv_cache_dtype="int8")


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [dict(num_attention_heads=4, num_key_value_heads=2),
                                   dict(num_attention_heads=5, num_key_value_heads=1, head_dim=10, attention_bias=True,
                                        mlp_bias=True, model_type="llama", tie_word_embeddings=False,
                                        rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                      "original_max_position_embeddings": 32})])
def test_the_cpp_decode_step_equals_the_model_forward(shape, cache_dtype):
    """M.dense_decoder's one-call step against its twin, the model's forward over a cache: the same logits, argmax
    and cache rows, for rows at different positions and slots (GQA 2 and 5 heads a key head, biases everywhere,
    YaRN's scaled rotation; a 16-bit cache)."""
    torch.manual_seed(0)
    model = M.build(C.tiny_dense(vocab_size=80, hidden_size=40, intermediate_size=56, num_hidden_layers=2,
                                 max_position_embeddings=64, **shape)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # biases and norms not at their initial 0 / 1
    caches = [M.KVCache(model.config, 4, 64, dtype=cache_dtype) for _ in range(2)]
    step = M.dense_decoder(model, caches[0])
    assert step is not None, "the C++ decode step did not build"
    with torch.inference_mode():
        prompts = torch.randint(3, 80, (4, 20))
        for cache in caches:  # the same prompts in both caches, through the model
            model(prompts, cache=cache)
        for tokens, positions, slots in (([7], [20], [2]), ([9, 3, 70], [21, 33, 20], [0, 2, 3])):
            logits, picked = step.step(tokens, positions, slots, True)
            ref = model(torch.tensor(tokens)[:, None], positions=torch.tensor(positions)[:, None], cache=caches[1],
                        slots=torch.tensor(slots))[:, -1]
            torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
            assert picked.tolist() == ref.argmax(-1).tolist()
            for (k0, v0), (k1, v1) in zip(caches[0].layers, caches[1].layers):
                torch.testing.assert_close(k0, k1, rtol=1e-5, atol=1e-5), torch.testing.assert_close(v0, v1)
        assert step.step([1], [30], [1], False)[1].numel() == 0  # not greedy: no pick
        with pytest.raises(RuntimeError, match="out of range"):
            step.step([80], [1], [0], True)


def test_the_cpp_step_follows_weights_replaced_then_refreshed(dense):
    """The C++ step holds the weight tensors: an update in place shows at once (as does `p.data = ...`, which keeps
    the tensor); a parameter replaced by a new one shows after refresh_weights(), which builds the step anew."""
    model = copy.deepcopy(dense)
    llm = LLM(model, max_num_seqs=2, enable_prefix_caching=False)
    assert llm.engine._dense_step is not None, "the C++ decode step did not build"
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=1)

    def logprobs(engine):  # (a tiny random model repeats one token: its logprobs tell the weights apart)
        return [o.outputs[0].logprobs for o in engine.generate(PROMPTS[:2], params)]

    before = logprobs(llm)
    for name, p in list(model.named_parameters()):
        owner, attr = model.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]
        setattr(owner, attr, torch.nn.Parameter(p.detach() * -1.5))  # new tensors
    llm.refresh_weights()
    after = logprobs(llm)
    assert after == logprobs(LLM(model, max_num_seqs=2, enable_prefix_caching=False)) != before


def test_compiled_decode_step_equals_eager(mla):
    # One compiled graph serves every batch size above 1 and every context length (symbolic shapes): a request
    # leaves early (max_tokens), so the batch shrinks from 3 to 2, while the context grows past one 64-key block.
    prompts = PROMPTS[:3]
    params = [SamplingParams(temperature=t, max_tokens=n, seed=1, ignore_eos=True) for t, n in ((0, 70), (0.9, 70), (0, 9))]
    eager = LLM(mla, max_num_seqs=3).generate(prompts, params)
    compiled = LLM(mla, max_num_seqs=3, compile=True).generate(prompts, params)
    assert [o.outputs[0].token_ids for o in compiled] == [o.outputs[0].token_ids for o in eager]
    # the verify step (3 positions) and the MTP steps compile too
    speculative = LLM(mla, max_num_seqs=3, compile=True, speculative=2).generate(prompts, params)
    assert [o.outputs[0].token_ids for o in speculative] == [o.outputs[0].token_ids for o in eager]


@pytest.mark.parametrize("cpp_step", [False, True])
def test_greedy_steps_pick_in_the_step(dense, cpp_step, monkeypatch):
    # All rows greedy: the argmax runs in the compiled graph, or in the C++ step (M.dense_decoder). While a
    # min_tokens ban applies, the host picks.
    ref = [reference_greedy(dense, p, 12) for p in PROMPTS[:2]]
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=12, min_tokens=6, stop_token_ids=[ref[1][0]], ignore_eos=True)]
    if not cpp_step:
        monkeypatch.setattr(M, "dense_decoder", lambda *a, **k: None)
    eager = LLM(dense, max_num_seqs=2).generate(PROMPTS[:2], params)
    fast = LLM(dense, max_num_seqs=2, compile=not cpp_step)
    assert (fast.engine._dense_step is not None) == cpp_step, "the C++ decode step did not build"
    out = fast.generate(PROMPTS[:2], params)
    assert [o.outputs[0].token_ids for o in out] == [o.outputs[0].token_ids for o in eager]
    plain, banned = (o.outputs[0] for o in out)
    assert plain.token_ids == ref[0]
    assert ref[1][0] not in banned.token_ids[:6] and banned.token_ids != ref[1]  # the ban held, then ended


@pytest.mark.parametrize("compile", [False, True])
def test_packed_weights_decode_the_same_and_follow_updates(dense, compile):
    """Weights packed in panels serve the steps of 8+ rows: the output equals the plain layout's, and the packs
    follow the weights, at once after an update that moves their version counters, after refresh_weights() after
    one that does not (as fused optimizer kernels do)."""
    model, twin = copy.deepcopy(dense), copy.deepcopy(dense)
    # (no prefix caching: it has its own test, and the same prompts come back after each update)
    llm = LLM(model, max_num_seqs=9, compile=compile, pack_weights=True, enable_prefix_caching=False)
    plain = LLM(twin, max_num_seqs=9, enable_prefix_caching=False)  # not packed
    assert llm.engine.packed_bytes > 0 and plain.engine.packed_bytes == 0
    prompts = [[5 + i, 6, 7 + 2 * i] for i in range(9)]  # nine rows a step
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)

    def gen(engine):
        return [o.outputs[0].token_ids for o in engine.generate(prompts, params)]

    before = gen(plain)
    assert gen(llm) == before
    torch.manual_seed(1)
    for a, b in zip(model.parameters(), twin.parameters()):
        noise = torch.randn_like(a) * a.std()
        a.data.add_(noise), b.data.add_(noise)  # the counters do not move
    llm.refresh_weights()
    assert gen(llm) == gen(plain) != before
    with torch.no_grad():
        for a, b in zip(model.parameters(), twin.parameters()):
            a.mul_(1.5), b.mul_(1.5)  # they move
    assert gen(llm) == gen(plain)


def test_an_llm_packs_the_checkpoint_it_loads_not_live_weights(dense, tmp_path):
    M.save(dense, tmp_path / "ckpt")
    assert LLM(tmp_path / "ckpt", max_num_seqs=2).engine.packed_bytes > 0
    assert LLM(tmp_path / "ckpt", max_num_seqs=2, pack_weights=False).engine.packed_bytes == 0
    assert LLM(copy.deepcopy(dense), max_num_seqs=2).engine.packed_bytes == 0


def test_continuous_batching_matches_running_alone(mla):
    params = [SamplingParams(temperature=0.8, max_tokens=12, seed=i, ignore_eos=True) for i in range(4)]
    alone = [LLM(mla).generate([p], sp)[0].outputs[0].token_ids for p, sp in zip(PROMPTS, params)]
    engine = Engine(mla, max_num_seqs=2)  # fewer slots than requests: later ones wait for a free slot
    got, ids = {}, []
    for step in range(200):
        if step % 3 == 0 and len(ids) < len(PROMPTS):  # requests arrive at different steps
            ids.append(engine.add_request(PROMPTS[len(ids)], params[len(ids)]))
        for out in engine.step():
            if out.finished:
                got[out.request_id] = out.outputs[0].token_ids
        if len(got) == len(PROMPTS):
            break
    assert [got[r] for r in ids] == alone


def test_step_reports_every_change_or_only_the_finished(mla):
    # streaming callers see each running request every step; `finished_only` returns a request once, when it ends
    seen = {}
    for finished_only in (False, True):
        engine = Engine(mla, max_num_seqs=2)
        short = engine.add_request(PROMPTS[0], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
        long = engine.add_request(PROMPTS[1], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
        seen[finished_only] = [[(o.request_id, o.finished, len(o.outputs[0].token_ids)) for o in
                                engine.step(finished_only=finished_only)] for _ in range(6)]
        assert not engine.has_unfinished()
    # the first step prefills and decodes: two tokens each
    assert set(seen[False][0]) == {(short, False, 2), (long, False, 2)} and (short, True, 3) in seen[False][1]
    assert seen[True] == [[], [(short, True, 3)], [], [], [(long, True, 6)], []]


def test_seeded_sampling_is_reproducible_and_seed_dependent(mla):
    llm = LLM(mla)
    a = llm.generate(PROMPTS, SamplingParams(n=3, temperature=1.0, max_tokens=10, seed=7, ignore_eos=True))
    b = llm.generate(PROMPTS[::-1], SamplingParams(n=3, temperature=1.0, max_tokens=10, seed=7, ignore_eos=True))[::-1]
    c = llm.generate(PROMPTS, SamplingParams(n=3, temperature=1.0, max_tokens=10, seed=8, ignore_eos=True))
    toks = lambda outs: [[o.token_ids for o in r.outputs] for r in outs]
    assert toks(a) == toks(b)  # batch order and neighbours do not matter
    assert toks(a) != toks(c)
    assert len({tuple(o.token_ids) for o in a[0].outputs}) == 3  # the n samples differ


def test_sampling_respects_top_k_and_top_p(mla):
    with torch.no_grad():
        logits = mla(torch.tensor([PROMPTS[1]]))[0, -1]
    top3 = set(logits.topk(3).indices.tolist())
    outs = LLM(mla).generate([PROMPTS[1]], SamplingParams(n=40, temperature=5.0, top_k=3, max_tokens=1, seed=0))
    firsts = {o.token_ids[0] for o in outs[0].outputs}
    assert firsts <= top3 and len(firsts) > 1
    outs = LLM(mla).generate([PROMPTS[1]], SamplingParams(n=20, temperature=1.0, top_p=1e-6, max_tokens=1, seed=0))
    assert {o.token_ids[0] for o in outs[0].outputs} == {int(logits.argmax())}


def test_sampling_frequencies_follow_the_distribution():
    from r1kit.engine import sample

    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]]).repeat(4000, 1)
    keys = torch.arange(4000)
    one = lambda v: torch.full((4000,), v)
    picks = sample(logits, one(1.0), one(1.0), one(-1).long(), one(0.0), keys, torch.zeros(4000, dtype=torch.long), False)
    freq = torch.bincount(picks, minlength=4).float() / 4000
    torch.testing.assert_close(freq, logits[0].softmax(-1), atol=0.03, rtol=0)


def test_max_tokens_eos_and_min_tokens(mla):
    llm = LLM(mla)
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=7, ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == 7 and out.finish_reason == "length"
    first = out.token_ids[2]  # make the third greedy token a stop token
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=7, stop_token_ids=[first]))[0].outputs[0]
    assert out.token_ids[-1] == first and len(out.token_ids) == out.token_ids.index(first) + 1
    assert out.finish_reason == "stop" and out.stop_reason == first
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=7, min_tokens=5,
                                                    stop_token_ids=[first]))[0].outputs[0]
    assert first not in out.token_ids[:5]


def test_stop_strings_cut_the_text_exactly(tok):
    torch.manual_seed(0)
    model = M.build(C.tiny_dense(vocab_size=tok.vocab_size, hidden_size=64, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=96, eos_token_id=tok.eos_token_id)).eval()
    llm = LLM(model, tokenizer=tok)
    free = llm.generate(["3 plus 4"], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0].outputs[0]
    assert len(free.text) > 6
    stop = free.text[3:6]
    cut = llm.generate(["3 plus 4"], SamplingParams(temperature=0, max_tokens=20, stop=[stop]))[0].outputs[0]
    assert cut.text == free.text[: free.text.index(stop)] and cut.finish_reason == "stop" and cut.stop_reason == stop
    kept = llm.generate(["3 plus 4"], SamplingParams(temperature=0, max_tokens=20, stop=stop,
                                                     include_stop_str_in_output=True))[0].outputs[0]
    assert kept.text == free.text[: free.text.index(stop) + len(stop)]


def test_logprobs_equal_the_model_log_softmax(mla):
    out = LLM(mla).generate([PROMPTS[0]], SamplingParams(temperature=0.7, max_tokens=5, seed=3, logprobs=2,
                                                         ignore_eos=True))[0].outputs[0]
    ids = PROMPTS[0] + out.token_ids
    with torch.no_grad():
        logp = mla(torch.tensor([ids]))[0].log_softmax(-1)
    for t, (tok_id, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        row = logp[len(PROMPTS[0]) - 1 + t]
        assert entry[tok_id] == pytest.approx(float(row[tok_id]), abs=1e-4)
        assert set(row.topk(2).indices.tolist()) <= set(entry)
    assert out.cumulative_logprob == pytest.approx(sum(e[t] for t, e in zip(out.token_ids, out.logprobs)))


def test_fan_out_prefills_a_prompt_once(mla):
    llm = LLM(mla, enable_prefix_caching=False)
    llm.generate([PROMPTS[2]], SamplingParams(n=6, max_tokens=3, seed=0))
    assert llm.stats.prompt_tokens == len(PROMPTS[2])


def test_prefix_cache_reuses_and_invalidates(mla):
    model = M.build(mla_config()).eval()
    llm = LLM(model)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    long = list(range(3, 40))
    first = llm.generate([long], params)[0]
    again = llm.generate([long + [41, 42]], params)[0]
    assert first.num_cached_tokens == 0 and again.num_cached_tokens == len(long)
    assert again.outputs[0].token_ids == reference_greedy(model, long + [41, 42], 6)
    with torch.no_grad():  # an optimizer step changes the weights in place: cached K/V are stale
        model.lm_head.weight.mul_(1.5)
    third = llm.generate([long + [41, 42]], params)[0]
    assert third.num_cached_tokens == 0
    assert third.outputs[0].token_ids == reference_greedy(model, long + [41, 42], 6)


def test_per_prompt_seeds_make_the_samples_of_a_batch_independent(mla):
    prompt = PROMPTS[2]
    shared = SamplingParams(n=3, temperature=1.0, max_tokens=12, ignore_eos=True, seed=7)
    same = LLM(mla).generate([prompt, prompt], shared)  # one noise stream for both: the same samples
    assert [o.token_ids for o in same[0].outputs] == [o.token_ids for o in same[1].outputs]
    own = LLM(mla).generate([prompt, prompt], shared.per_prompt(2))
    assert [o.token_ids for o in own[0].outputs] != [o.token_ids for o in own[1].outputs]
    again = LLM(mla).generate([prompt, prompt], shared.per_prompt(2))  # and still reproducible
    assert [[o.token_ids for o in r.outputs] for r in again] == [[o.token_ids for o in r.outputs] for r in own]


def test_prefix_cache_serves_every_prompt_its_own_rows_when_slots_turn_over(mla):
    """More prompts than slots, sharing prefixes: one admission places several requests, and a slot handed to one
    (its prefix copied in from another) must not serve a later one as if it still held its old prompt."""
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        prompts = [[1, *torch.randint(3, 6, (5,), generator=g).tolist()] for _ in range(40)]
        want = [o.outputs[0].token_ids
                for o in LLM(mla, max_num_seqs=4, enable_prefix_caching=False).generate(prompts, params)]
        llm = LLM(mla, max_num_seqs=4)
        for _ in range(3):  # the later rounds are served from whatever the slots hold
            assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == want, seed
        assert llm.stats.cached_prompt_tokens > 0


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("drafts", [1, 3])
def test_speculative_decoding_equals_plain(mla, temperature, drafts):
    params = SamplingParams(n=2, temperature=temperature, max_tokens=14, min_tokens=3, stop_token_ids=[5, 9],
                            seed=5, logprobs=2)
    plain = LLM(mla).generate(PROMPTS, params)
    spec = LLM(mla, speculative=drafts)
    fast = spec.generate(PROMPTS, params)
    assert [[o.token_ids for o in r.outputs] for r in plain] == [[o.token_ids for o in r.outputs] for r in fast]
    for a, b in zip([o for r in plain for o in r.outputs], [o for r in fast for o in r.outputs]):
        assert a.finish_reason == b.finish_reason and len(a.logprobs) == len(b.logprobs)
        for x, y in zip(a.logprobs, b.logprobs):  # the same top tokens, the same values (up to float order)
            assert x.keys() == y.keys() and list(x.values()) == pytest.approx(list(y.values()), abs=1e-4)
    assert spec.stats.draft_tokens > 0 and 0 <= spec.stats.acceptance_rate <= 1
    assert spec.stats.steps < LLM(mla).engine.stats.steps + 20 * len(PROMPTS)


def test_speculation_respects_limits_inside_accepted_drafts():
    """Every draft is accepted (flat logits: token 0, or 1 while min_tokens bans the stop token 0), so max_tokens,
    min_tokens, a stop token and the context limit all fall in the middle of a verified run of drafts: each must cut it exactly where plain decoding does."""
    model = M.build(mla_config()).eval()
    with torch.no_grad():
        model.model.norm.weight.zero_()
        model.mtp[0].shared_head.norm.weight.zero_()
    cases = [SamplingParams(temperature=0, max_tokens=7, ignore_eos=True),
             SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),  # runs into max_model_len
             SamplingParams(temperature=0, max_tokens=9, min_tokens=6, stop_token_ids=[0]),
             SamplingParams(temperature=1.0, max_tokens=11, seed=3, ignore_eos=True)]
    for params in cases:
        plain = LLM(model, max_model_len=24).generate([[7, 8, 9]], params)[0].outputs[0]
        spec = LLM(model, max_model_len=24, speculative=3).generate([[7, 8, 9]], params)[0].outputs[0]
        assert (spec.token_ids, spec.finish_reason) == (plain.token_ids, plain.finish_reason), params


@pytest.mark.parametrize("drafts", [1, 3])
def test_an_always_right_draft_divides_the_steps(drafts):
    """Zeroed output norms make both heads' logits flat, so target and draft both pick token 0: every draft is
    accepted and each step emits drafts + 1 tokens."""
    model = M.build(mla_config()).eval()
    with torch.no_grad():
        model.model.norm.weight.zero_()
        model.mtp[0].shared_head.norm.weight.zero_()
    spec = LLM(model, speculative=drafts)
    out = spec.generate([[7, 8, 9]], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0].outputs[0]
    assert out.token_ids == [0] * 20
    assert spec.stats.acceptance_rate == 1.0
    assert spec.stats.steps <= 1 + -(-20 // (drafts + 1))  # prefill, then verify steps of drafts + 1 tokens


def test_cache_bytes_per_token_formula(mla):
    engine = Engine(mla, max_num_seqs=2)
    cfg = mla.config
    assert engine.cache.bytes_per_token == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * 4


def test_bad_requests_name_the_parameter(mla):
    with pytest.raises(RequestError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(RequestError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(RequestError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    engine = Engine(mla, max_num_seqs=2)
    with pytest.raises(RequestError, match="context") as e:
        engine.add_request(list(range(3, 60)) * 2)
    assert e.value.param == "prompt"
    with pytest.raises(RequestError, match="n=3 exceeds max_num_seqs=2"):
        engine.add_request([3, 4], SamplingParams(n=3))
    with pytest.raises(RequestError, match="text prompt needs a tokenizer"):
        engine.add_request("hello")
    with pytest.raises(RequestError, match="must be integers") as e:
        engine.add_request([3, 4.5])  # a float id is a mistake, not something to truncate
    assert e.value.param == "prompt"


def test_async_stream_and_cancel_frees_slots(mla):
    engine = Engine(mla, max_num_seqs=2)
    aeng = AsyncEngine(engine)

    async def main():
        got = []
        async for out in aeng.stream([5, 6, 7], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), "a"):
            got.append(len(out.outputs[0].token_ids))
        async for out in aeng.stream([5, 6], SamplingParams(max_tokens=50, ignore_eos=True), "b"):
            if len(out.outputs[0].token_ids) >= 3:
                break  # a client going away mid-stream
        for _ in range(50):
            await asyncio.sleep(0.02)
            if not engine.running and not engine.waiting:
                break
        return got

    try:
        got = asyncio.run(main())
    finally:
        aeng.shutdown()
    assert got[-1] == 8 and got == sorted(got)
    assert not engine.running and len(engine.free_slots) == 2
