"""Tests for r1kit.sft: the loss mask covers exactly the assistant's text, packing keeps conversations whole,
and the step loss is the mean over all assistant tokens however they fall into micro-batches."""

import pytest
import torch
import torch.nn.functional as F

import r1kit.model as M
from r1kit import tokenizer as T
from r1kit import train
from r1kit.config import ConfigError
from r1kit.sft import conversations, encode, pack, sft

from common import small_checkpoint

DATA = "addition?digits=2&size=40"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return small_checkpoint(tmp_path_factory.mktemp("sft") / "base")


def test_labels_are_exactly_the_assistant_text(checkpoint):
    tok = T.load(checkpoint)
    convs = conversations(DATA)
    for messages, (ids, labels) in zip(convs[:5], encode(convs[:5], tok, 512, None)):
        prompt = tok.apply_chat_template(messages[:-1], add_generation_prompt=True)
        full = tok.apply_chat_template(messages)
        assert tok.decode(ids) == full
        trained = [t for t in labels if t != -100]
        assert tok.decode(trained) == full[len(prompt):]  # what the model must generate after the prompt
        first = next(i for i, t in enumerate(labels) if t != -100)
        assert ids[first + 1] == labels[first] and tok.decode(ids[: first + 1]) == prompt  # shifted by one


def test_packing_keeps_conversations_whole_and_within_max_length(checkpoint):
    tok = T.load(checkpoint)
    enc = encode(conversations(DATA), tok, 96, None)
    x, y, used = pack(enc, 96, tok.pad_token_id, packing=True, seed=0)
    assert x.shape[0] < len(enc) and int(used.max()) <= 96  # several conversations per row
    assert int((y != -100).sum()) == sum(sum(t != -100 for t in lab) for _, lab in enc)  # no target lost
    rows = [x[r, : int(used[r])].tolist() for r in range(x.shape[0])]
    for ids, _ in enc:  # each conversation sits whole, contiguous, in one row
        assert any(any(row[i: i + len(ids)] == ids for i in range(len(row) - len(ids) + 1)) for row in rows)
    assert (y[x == tok.pad_token_id] == -100).all()
    x1, _, _ = pack(enc, 96, tok.pad_token_id, packing=False, seed=0)
    assert x1.shape[0] == len(enc)


def test_step_loss_is_the_mean_over_every_assistant_token_of_the_step(checkpoint, tmp_path):
    kw = dict(model=str(checkpoint), data=DATA, max_length=64, packing=False, max_steps=2, progress=False,
              learning_rate=1e-2)
    sft(output_dir=str(tmp_path / "a"), per_device_train_batch_size=4, gradient_accumulation_steps=1, **kw)
    sft(output_dir=str(tmp_path / "b"), per_device_train_batch_size=1, gradient_accumulation_steps=4, **kw)
    a, b = train.read_metrics(tmp_path / "a"), train.read_metrics(tmp_path / "b")
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5) and y["grad_norm"] == pytest.approx(x["grad_norm"],
                                                                                                    rel=1e-4)
    # by hand: the first step's rows are the first 4 of the seeded order; mean CE over their assistant tokens
    from r1kit.pretrain import rows_at

    tok = T.load(checkpoint)
    x, y, used = pack(encode(conversations(DATA), tok, 64, None), 64, tok.pad_token_id, False, seed=0)
    rows = rows_at(torch.cat([x, y], 1), 0, 4, seed=0)
    model = M.load(checkpoint)
    logits = model(rows[:, :64])
    ce = F.cross_entropy(logits.flatten(0, 1), rows[:, 64:].flatten(), ignore_index=-100)
    assert a[0]["loss"] == pytest.approx(ce.item(), rel=1e-5)


def test_the_trained_template_is_saved_as_the_models_default(checkpoint, tmp_path):
    """Fine-tuned on a named or given template, the model is saved with it as its default (what serving applies).
    A name that is no template, and conversations whose prompt alone fills max_length, are errors naming the field."""
    short = ("{%- for m in messages -%}{%- if m['role'] == 'user' -%}Q: {{ m['content'] }} {%- elif m['role'] == "
             "'assistant' -%}A:{% generation %} {{ m['reasoning_content'] if m['reasoning_content'] is defined else "
             "'' }} {{ m['content'] }}{{ eos_token }}{% endgeneration %}{%- endif -%}{%- endfor -%}"
             "{%- if add_generation_prompt -%}A:{%- endif -%}")
    kw = dict(model=str(checkpoint), data=DATA, max_length=64, max_steps=1, progress=False)
    out = sft(output_dir=str(tmp_path / "z"), chat_template=short, **kw)
    chat = [{"role": "user", "content": "1+2"}]
    assert T.load(out["model"]).apply_chat_template(chat, add_generation_prompt=True) == "Q: 1+2A:"
    with pytest.raises(ConfigError, match=r"chat_template: 'r0' is not a chat template"):
        sft(output_dir=str(tmp_path / "y"), chat_template="r0", **kw)
    with pytest.raises(ConfigError, match=r"max_length=64: no conversation .* has an assistant token"):
        sft(output_dir=str(tmp_path / "x"), chat_template="r1-zero", **kw)  # its instruction alone is longer
