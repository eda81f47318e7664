"""Bring your own model: a Hugging Face Qwen2 / Llama directory written by transformers itself (weights, tokenizer,
its own chat template) is an SFT student on teacher traces, a GRPO policy and an evaluation target."""

import json
import math

import pytest
import torch

from r1kit import tasks
from r1kit.eval import EvalConfig, evaluate
from r1kit.grpo import grpo
from r1kit.pretrain import documents
from r1kit.sft import sft
from r1kit.tokenizer import train_bpe

transformers = pytest.importorskip("transformers")

# Qwen2.5's shape: content only, no reasoning_content
CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TASK = "addition?digits=1&size=24&seed=5"


def hf_student(path, kind):
    tok = train_bpe(documents("addition?digits=2&size=200"), vocab_size=320)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.backend, **tok.special_tokens)
    fast.chat_template = CHATML
    fast.save_pretrained(path)
    common = dict(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, tie_word_embeddings=True)) \
        if kind == "qwen2" else transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_an_hf_checkpoint_is_student_policy_and_eval_target(tmp_path, kind):
    student = hf_student(tmp_path / kind, kind)
    data = tmp_path / "distill.jsonl"  # what r1kit distill writes
    task = tasks.load(TASK)
    with open(data, "w") as f:
        for ex in task:
            f.write(json.dumps({"id": ex.prompt, "messages": ex.chat() + [
                {"role": "assistant", "reasoning_content": task.trace(ex), "content": ex.answer}]}) + "\n")
    with pytest.raises(ValueError, match="drops the assistant's reasoning_content"):
        sft(model=str(student), data=str(data), output_dir=str(tmp_path / "bad"), max_steps=1)
    out = sft(model=str(student), data=str(data), chat_template="r1", output_dir=str(tmp_path / "sft"), max_steps=3,
              per_device_train_batch_size=4, max_length=128, learning_rate=1e-3)
    assert math.isfinite(out["loss"])
    config = json.loads((tmp_path / "sft" / "model" / "config.json").read_text())
    assert config["model_type"] == kind and (tmp_path / "sft" / "model" / "tokenizer.json").exists()
    rl = grpo(model=out["model"], task=TASK, chat_template="r1", output_dir=str(tmp_path / "rl"), max_steps=2,
              num_generations=2, per_device_train_batch_size=4, max_completion_length=8)
    assert rl["step"] == 2
    res = evaluate({"student": rl["model"]}, EvalConfig(tasks=[TASK], k=2, limit=4, max_tokens=8, template="r1"))
    row = next(iter(res["student"].values()))
    assert 0 <= row["pass@1"] <= 1 and row["problems"] == 4
    # and the result still loads in transformers
    assert transformers.AutoModelForCausalLM.from_pretrained(rl["model"]).config.model_type == kind
