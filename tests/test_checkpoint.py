"""Checkpoint compatibility with Hugging Face transformers, both directions, and the loader's error paths."""

import json

import pytest
import torch

import r1kit.model as M
from r1kit import config as C
from r1kit.checkpoint import CheckpointError, hf_state_dict
from r1kit.config import ConfigError, ModelConfig

transformers = pytest.importorskip("transformers")

DS_BASE = dict(
    vocab_size=160, hidden_size=64, num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4,
    q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=8,
    num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=16, intermediate_size=32, n_group=1,
    topk_group=1, routed_scaling_factor=2.5, max_position_embeddings=256,
)
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "mscale": 1.0, "mscale_all_dim": 1.0,
        "beta_fast": 32, "beta_slow": 1}


def rel_err(a, b):
    return ((a - b).norm() / a.norm()).item()


def hf_deepseek(**kw):
    hf = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**{**DS_BASE, **kw})).eval()
    with torch.no_grad():  # a non-zero balancing bias, so selection and weighting really differ
        for m in hf.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.normal_(0, 0.05)
    return hf


@pytest.mark.parametrize("kw", [
    {},
    {"q_lora_rank": None},
    {"n_group": 4, "topk_group": 2, "n_routed_experts": 16},
    {"rope_scaling": YARN},
    {"tie_word_embeddings": True, "norm_topk_prob": False, "first_k_dense_replace": 0},
], ids=["base", "no-q-lora", "group-limited", "yarn", "tied-unnormed"])
def test_deepseek_v3_logits_match_transformers(tmp_path, kw):
    hf = hf_deepseek(**kw)
    hf.save_pretrained(tmp_path)
    model = M.load(tmp_path).eval()
    x = torch.randint(0, DS_BASE["vocab_size"], (2, 48))
    with torch.no_grad():
        ref = hf(x).logits
        assert rel_err(ref, model(x)) <= 1e-4
        assert rel_err(ref, model.set_impl(attention="absorbed")(x)) <= 1e-4


def test_yarn_changes_the_model(tmp_path):
    """Guards the parity test above: YaRN must actually be in effect, not silently dropped."""
    plain = M.build(ModelConfig.from_hf({**DS_BASE, "model_type": "deepseek_v3"})).eval()
    yarn = M.build(ModelConfig.from_hf({**DS_BASE, "model_type": "deepseek_v3", "rope_scaling": YARN})).eval()
    yarn.load_state_dict(plain.state_dict())
    x = torch.randint(0, DS_BASE["vocab_size"], (1, 64))
    with torch.no_grad():
        assert rel_err(plain(x), yarn(x)) > 1e-5  # far above float noise (~1e-7) though tiny at random init
    assert not torch.allclose(plain.inv_freq, yarn.inv_freq)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_dense_logits_match_transformers(tmp_path, arch):
    common = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=arch == "qwen2")
    if arch == "qwen2":
        hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    else:
        common["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, attention_bias=True))
    hf.eval().save_pretrained(tmp_path)
    model = M.load(tmp_path).eval()
    assert model.config.model_type == arch
    x = torch.randint(0, 160, (2, 40))
    with torch.no_grad():
        assert rel_err(hf(x).logits, model(x)) <= 1e-4


@pytest.mark.parametrize("preset", ["tiny", "tiny-dense"])
def test_r1kit_save_loads_in_transformers(tmp_path, preset):
    cfg = C.preset(preset, vocab_size=256, num_nextn_predict_layers=0) if preset == "tiny" else C.preset(preset, vocab_size=256)
    model = M.build(cfg).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, M.Gate):
                m.e_score_correction_bias.normal_(0, 0.05)
    M.save(model, tmp_path / "ckpt")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    x = torch.randint(0, 256, (2, 33))
    with torch.no_grad():
        assert rel_err(hf(x).logits, model(x)) <= 1e-4
    gen = json.loads((tmp_path / "ckpt" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == cfg.eos_token_id


def test_mtp_round_trip_in_deepseek_layout(tmp_path):
    cfg = C.tiny(vocab_size=256, num_nextn_predict_layers=2)
    model = M.build(cfg).eval()
    M.save(model, tmp_path / "m")
    keys = set(hf_state_dict(model))
    L = cfg.num_hidden_layers
    for k in range(2):  # DeepSeek's names: layer index num_hidden_layers + k, with embedding and head copies
        assert f"model.layers.{L + k}.eh_proj.weight" in keys
        assert f"model.layers.{L + k}.embed_tokens.weight" in keys
        assert f"model.layers.{L + k}.shared_head.head.weight" in keys
        assert f"model.layers.{L + k}.mlp.experts.15.down_proj.weight" in keys
    again = M.load(tmp_path / "m").eval()
    assert len(again.mtp) == 2
    x = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        h1, h2 = model(x, head=False), again(x, head=False)
        for a, b in zip(model.mtp_forward(h1, x), again.mtp_forward(h2, x)):
            assert torch.equal(a, b)


def test_declared_but_absent_mtp_loads_without_it(tmp_path, caplog):
    hf_deepseek().save_pretrained(tmp_path)  # transformers declares num_nextn_predict_layers=1, saves none
    model = M.load(tmp_path)
    assert len(model.mtp) == 0 and "no MTP weights" in caplog.text


def test_sharded_save_and_load(tmp_path):
    model = M.build(C.tiny(vocab_size=256)).eval()
    from r1kit.checkpoint import save_model

    save_model(model, tmp_path / "s", max_shard_bytes=2 * 2**20)
    assert (tmp_path / "s" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "s").glob("model-*-of-*.safetensors"))) > 1
    again = M.load(tmp_path / "s").eval()
    x = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        assert torch.equal(model(x), again(x))


def test_fp8_checkpoint_is_dequantised(tmp_path):
    from safetensors.torch import load_file, save_file

    model = M.build(C.tiny(vocab_size=256, num_nextn_predict_layers=0)).eval()
    M.save(model, tmp_path / "m")
    state = load_file(tmp_path / "m" / "model.safetensors")
    key = "model.layers.0.self_attn.q_b_proj.weight"  # (384, 128): 3 x 1 blocks of 128
    w = state[key]
    scale = torch.rand(3, 1) + 0.5
    blocks = scale.repeat_interleave(128, 0)[: w.shape[0]].repeat_interleave(128, 1)[:, : w.shape[1]]
    state[key] = (w / blocks).to(torch.float8_e4m3fn)
    state[key + "_scale_inv"] = scale
    save_file(state, tmp_path / "m" / "model.safetensors")
    loaded = M.load(tmp_path / "m")
    got = loaded.model.layers[0].self_attn.q_b_proj.weight
    assert got.dtype == torch.float32
    assert rel_err(w, got) < 0.05  # e4m3 keeps ~3 significant bits
    assert not torch.equal(w, got)


def test_bad_checkpoints_name_the_problem(tmp_path):
    model = M.build(C.tiny(vocab_size=256, num_nextn_predict_layers=0))
    M.save(model, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "kv_lora_rank": 32}))
    with pytest.raises(CheckpointError, match=r"mis-shaped: .*kv_a_proj_with_mqa"):
        M.load(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 5}))
    with pytest.raises(CheckpointError, match=r"missing: .*model\.layers\.4"):
        M.load(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "model_type": "mixtral", "architectures": ["MixtralForCausalLM"]}))
    with pytest.raises(ConfigError, match="mixtral.*MixtralForCausalLM.*not implemented"):
        M.load(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{\n  \"model_type\": \n}")
    with pytest.raises(ConfigError, match=r"config.json:3: invalid JSON"):
        M.load(tmp_path / "m")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "e" / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match="no \\*.safetensors.*never loads pickled"):
        M.load(tmp_path / "e")


def test_config_dialects_agree():
    """DeepSeek's own config.json and transformers 5's rewrite of it describe the same model."""
    ours = C.deepseek_v3()
    hf5 = transformers.DeepseekV3Config(**{k: v for k, v in ours.to_hf().items()
                                            if k not in ("architectures", "torch_dtype")}).to_dict()
    back = ModelConfig.from_hf(hf5)
    for f in ("rope_theta", "rope_scaling", "kv_lora_rank", "n_group", "topk_group", "num_nextn_predict_layers",
              "routed_scaling_factor", "q_lora_rank"):
        assert getattr(back, f) == getattr(ours, f), f


def test_count_params_matches_deepseek_reports():
    total, active = M.count_params(C.deepseek_v3())
    assert abs(total - 671e9) / 671e9 < 0.01
    # DeepSeek quotes "37B" activated; the count without the embedding lookup is 36.63B (1.0 % below the
    # rounded figure). V2-Lite's quoted 2.4B confirms the convention (2.45B here).
    assert abs(active - 37e9) / 37e9 < 0.011
    total, active = M.count_params(C.deepseek_v2_lite())
    assert abs(total - 15.7e9) / 15.7e9 < 0.01 and abs(active - 2.4e9) / 2.4e9 < 0.025


@pytest.mark.parametrize("bad, match", [
    (dict(n_group=3), "n_group=3: must divide n_routed_experts=16"),
    (dict(n_group=4, topk_group=5), "topk_group=5: must be between 1 and n_group=4"),
    (dict(num_experts_per_tok=17), "num_experts_per_tok=17"),
    (dict(scoring_func="relu"), "scoring_func='relu'"),
    (dict(qk_rope_head_dim=15), "qk_rope_head_dim=15: must be even"),
    (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "rope_type='dynamic'"),
    (dict(eos_token_id=99999), "eos_token_id=99999"),
])
def test_config_validation_names_the_field(bad, match):
    with pytest.raises(ConfigError, match=match):
        C.tiny(**bad)


@pytest.mark.parametrize("kind", ["deepseek_v3", "qwen2", "llama"])
def test_export_loads_in_transformers_with_its_chat_template(tmp_path, kind):
    """`r1kit export`: what vLLM and SGLang read (config naming the architecture, safetensors, generation config,
    tokenizer with the chosen default chat template) loads in transformers with the same logits and prompt."""
    from r1kit import tokenizer as T
    from r1kit.checkpoint import export
    from r1kit.cli import check_with_transformers, main
    from r1kit.pretrain import documents

    tok = T.train_bpe(documents("addition?digits=2&size=100"), vocab_size=300)
    ids = dict(vocab_size=tok.vocab_size, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id, max_position_embeddings=128)
    cfg = C.tiny(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, q_lora_rank=32, kv_lora_rank=16,
                 num_attention_heads=2, n_routed_experts=4, num_hidden_layers=2, **ids) if kind == "deepseek_v3" \
        else C.tiny_dense(model_type=kind, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=96, num_hidden_layers=2, **ids)
    torch.manual_seed(0)
    M.save(M.build(cfg), tmp_path / "src", tokenizer=tok)
    out = export(tmp_path / "src", tmp_path / "out", chat_template="r1-zero")
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= set(out["files"])
    check = check_with_transformers(out["path"])
    assert check["max_logit_diff"] < 1e-4 and check["same_chat_prompt"] and check["same_token_ids"]
    assert T.load(out["path"]).apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True) \
        == T.load(tmp_path / "src").apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True,
                                                        chat_template="r1-zero")
    small = export(tmp_path / "src", tmp_path / "bf16", dtype="bfloat16", mtp=False)
    assert small["dtype"] == "bfloat16" and small["mtp_modules"] == 0
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with pytest.raises(CheckpointError, match="'r2' is not a chat template"):
        export(tmp_path / "src", tmp_path / "x", chat_template="r2")
    assert main(["export", str(tmp_path / "src"), str(tmp_path / "src")]) == 2  # never over its source
