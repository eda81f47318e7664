"""Tokenizer and chat templates: r1kit renders and encodes exactly what transformers does for the same directory."""

import json
from datetime import datetime

import pytest
from hypothesis import given, settings, strategies as st

from r1kit import tokenizer as T

transformers = pytest.importorskip("transformers")

CORPUS = [
    "What is 478+356? 8+6=14, write 4 carry 1\n7+5+1=13, write 3 carry 1 \\boxed{834}",
    "The quick brown fox jumps over the lazy dog. Reasoning, then the answer.",
    "Please reason step by step, and put your final answer within \\boxed{}.",
] * 20

CHATS = [
    [{"role": "user", "content": "What is 2+3?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+3?"},
     {"role": "assistant", "content": "\\boxed{5}", "reasoning_content": "2+3=5"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<think>\nsay hi\n</think>\n\nhello"},
     {"role": "user", "content": "What is 7*6?"}, {"role": "assistant", "content": "\\boxed{42}",
                                                   "reasoning": "7*6=42"}],
    [{"role": "user", "content": "ünïcödé 中文 \t tabs"}, {"role": "assistant", "content": "ok", "name": None}],
]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    T.train_bpe(CORPUS, vocab_size=400).save(path)
    return path


@pytest.fixture(scope="module")
def tok(saved):
    return T.load(saved)


@pytest.fixture(scope="module")
def hf(saved):
    return transformers.AutoTokenizer.from_pretrained(str(saved))


def test_saved_layout_and_special_tokens(saved, tok, hf):
    config = json.loads((saved / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["chat_template"] == T.R1_TEMPLATE
    assert json.loads((saved / "special_tokens_map.json").read_text())["eos_token"] == T.EOS
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (hf.bos_token_id, hf.eos_token_id,
                                                                       hf.pad_token_id)
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3
    assert tok.vocab_size == len(hf)
    for t in (T.USER, T.ASSISTANT, T.THINK, T.END_THINK):
        assert len(tok.encode(t)) == 1 and tok.encode(t) == hf.encode(t, add_special_tokens=False)
    assert len(tok.encode("123456")) == 6  # one digit per token, for digit-by-digit arithmetic


@settings(max_examples=40, deadline=None)
@given(st.text(max_size=80) | st.sampled_from(["<｜User｜>hi<think>x</think>", "  lead", "1,234.5", "\n\n\t"]))
def test_encode_decode_match_transformers(tok, hf, text):
    ids = tok.encode(text)
    assert ids == hf.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == hf.decode(ids) == text  # byte-level: every string round-trips
    assert tok.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("template", ["r1", "r1-zero"])
@pytest.mark.parametrize("chat", CHATS)
@pytest.mark.parametrize("generation", [False, True])
def test_templates_render_as_transformers(tok, hf, template, chat, generation):
    source = T.TEMPLATES[template]
    ours = tok.apply_chat_template(chat, add_generation_prompt=generation, chat_template=template)
    theirs = hf.apply_chat_template(chat, add_generation_prompt=generation, tokenize=False, chat_template=source)
    assert ours == theirs
    if template == "r1":  # the saved directory's own template
        assert ours == hf.apply_chat_template(chat, add_generation_prompt=generation, tokenize=False)
    assert tok.apply_chat_template(chat, generation, tokenize=True, chat_template=template) == hf.apply_chat_template(
        chat, add_generation_prompt=generation, tokenize=True, return_dict=False, chat_template=source)


@pytest.mark.parametrize("template", ["r1", "r1-zero"])
@pytest.mark.parametrize("chat", CHATS[1:])
def test_loss_mask_is_exactly_the_assistant_tokens(tok, hf, template, chat):
    ids, mask = tok.encode_sft(chat, chat_template=template)
    out = hf.apply_chat_template(chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                 chat_template=T.TEMPLATES[template])
    assert ids == out["input_ids"] and mask == out["assistant_masks"]
    # and independently: the masked tokens decode to what the assistant says, the rest to everything else
    masked = tok.decode([i for i, m in zip(ids, mask) if m])
    if template == "r1":
        final = chat[-1]
        reasoning = final.get("reasoning_content") or final.get("reasoning") or ""
        assert masked.endswith(f"{reasoning}\n</think>\n\n{final['content']}{T.EOS}")
        assert T.USER not in masked and T.ASSISTANT not in masked and not masked.startswith(T.THINK)


def test_generation_prompt_is_a_prefix_of_the_training_text(tok):
    # What the engine is prompted with at serving time is exactly what SFT trained on
    for chat in CHATS[1:]:
        for template in ("r1", "r1-zero"):
            prompt = tok.apply_chat_template(chat[:-1], add_generation_prompt=True, chat_template=template)
            full = tok.apply_chat_template(chat, chat_template=template)
            assert full.startswith(prompt) and len(full) > len(prompt)


def test_r1_zero_template_is_the_papers():
    tok = T.train_bpe(CORPUS, vocab_size=300, chat_template="r1-zero")
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], add_generation_prompt=True)
    assert text == T.BOS + T.R1_ZERO_INSTRUCTION + " User: What is 2+3? Assistant:"
    assert "<think> reasoning process here </think> <answer> answer here </answer>." in text
    done = tok.apply_chat_template([{"role": "user", "content": "Q"},
                                    {"role": "assistant", "content": "5", "reasoning_content": "2+3"}])
    assert done.endswith(" Assistant: <think> 2+3 </think> <answer> 5 </answer>" + T.EOS)
    assert not tok.prefills_think  # R1-Zero leaves the tags to the model


def test_a_default_template_set_by_name_is_saved_and_switches_the_think_prefill(tmp_path):
    """What sft and grpo do with `chat_template`: the named template becomes the one applied without a name, is what
    the saved tokenizer applies, and decides whether completions start inside the reasoning."""
    tok = T.train_bpe(CORPUS, vocab_size=300)  # R1's template: the prompt opens the think block
    chat = [{"role": "user", "content": "What is 2+3?"}]
    assert tok.prefills_think
    tok.set_default_template("r1-zero")
    zero = tok.apply_chat_template(chat, add_generation_prompt=True, chat_template="r1-zero")
    assert tok.apply_chat_template(chat, add_generation_prompt=True) == zero and not tok.prefills_think
    tok.save(tmp_path)
    again = T.load(tmp_path)
    assert again.apply_chat_template(chat, add_generation_prompt=True) == zero and not again.prefills_think
    with pytest.raises(ValueError, match="'r0' is not a chat template"):
        tok.set_default_template("r0")


# A template in a model's own directory, exercising what transformers' environment provides.
CUSTOM = (
    "{%- set ns = namespace(n=0) -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{%- continue -%}{%- endif -%}"
    "{%- if m['role'] not in ['user', 'assistant'] -%}{{ raise_exception('bad role ' + m['role']) }}{%- endif -%}"
    "{%- set ns.n = ns.n + 1 -%}"
    "[{{ ns.n }}:{{ m['role'] }}] {{ m['content'] | trim }}"
    "{%- if m['reasoning_content'] is defined %} (thought: {{ m['reasoning_content'] }}){% endif %}\n"
    "{%- if ns.n > 5 -%}{%- break -%}{%- endif -%}"
    "{%- endfor -%}"
    "{{ dict(a=1) | tojson }}{{ bos_token }}|{{ eos_token }}|{{ strftime_now('%Y') }}"
    "{%- if add_generation_prompt %}\n[assistant] {% endif -%}"
)


def _model_dir(tmp_path, saved, *, config_template=None, jinja=None, extra=None):
    config = json.loads((saved / "tokenizer_config.json").read_text())
    config.pop("chat_template")
    if config_template is not None:
        config["chat_template"] = config_template
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "tokenizer.json").write_text((saved / "tokenizer.json").read_text())
    if jinja is not None:
        (tmp_path / "chat_template.jinja").write_text(jinja)
    for name, source in (extra or {}).items():
        (tmp_path / "additional_chat_templates").mkdir(exist_ok=True)
        (tmp_path / "additional_chat_templates" / f"{name}.jinja").write_text(source)
    return tmp_path


@pytest.mark.parametrize("where", ["config", "jinja", "jinja-wins", "named-list", "extra-files"])
def test_a_models_own_template_is_used_from_wherever_transformers_reads_it(tmp_path, saved, where):
    kwargs = {"config": dict(config_template=CUSTOM), "jinja": dict(jinja=CUSTOM),
              "jinja-wins": dict(config_template=T.R1_TEMPLATE, jinja=CUSTOM),
              "named-list": dict(config_template=[{"name": "default", "template": CUSTOM},
                                                  {"name": "other", "template": T.R1_TEMPLATE}]),
              "extra-files": dict(jinja=CUSTOM, extra={"other": T.R1_TEMPLATE})}[where]
    path = _model_dir(tmp_path, saved, **kwargs)
    ours, theirs = T.load(path), transformers.AutoTokenizer.from_pretrained(str(path))
    for chat in CHATS:
        for generation in (False, True):
            assert ours.apply_chat_template(chat, add_generation_prompt=generation) == \
                theirs.apply_chat_template(chat, add_generation_prompt=generation, tokenize=False)
    assert "[1:user]" in ours.apply_chat_template(CHATS[0])
    if where in ("named-list", "extra-files"):
        assert ours.apply_chat_template(CHATS[1], chat_template="other") == \
            theirs.apply_chat_template(CHATS[1], tokenize=False, chat_template="other")
    with pytest.raises(Exception, match="bad role"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}])
    # a template without {% generation %} tags still gives a loss mask: what each assistant turn adds
    ids, mask = ours.encode_sft(CHATS[2])
    masked = ours.decode([i for i, m in zip(ids, mask) if m])
    unmasked = ours.decode([i for i, m in zip(ids, mask) if not m])
    assert "<think>\nsay hi\n</think>\n\nhello" in masked and "\\boxed{42} (thought: 7*6=42)" in masked
    assert "What is 7*6?" in unmasked and "hi" in unmasked
    assert str(datetime.now().year) in unmasked  # the template's constant tail is not the assistant's


def test_save_round_trip_and_missing_files(tmp_path, tok):
    tok.save(tmp_path / "again")
    again = T.load(tmp_path / "again")
    assert again.encode("What is 12+34?") == tok.encode("What is 12+34?")
    assert again.apply_chat_template(CHATS[1]) == tok.apply_chat_template(CHATS[1])
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        T.load(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="empty conversation"):
        tok.apply_chat_template([])


@pytest.mark.parametrize("text,prefilled,expected", [
    ("<think>\nr\n</think>\n\nanswer", False, ("r", "answer")),
    ("r\n</think>\n\nanswer", False, ("r", "answer")),  # the template pre-filled <think>
    ("<think>a</think> partial <think>b</think> final", False, ("a partial b", "final")),  # several blocks
    ("<think>still thinking when tokens ran out", False, ("still thinking when tokens ran out", "")),
    ("no tags at all", False, ("", "no tags at all")),
    ("no tags at all", True, ("no tags at all", "")),  # with a pre-filled <think>: unfinished reasoning
    ("<think> r </think> <answer> 42 </answer>", False, ("r", "42")),  # R1-Zero
    ("<think>r</think><answer>1</answer> <answer>2</answer>", False, ("r", "2")),
    ("<think>r</think> <answer> unclosed", False, ("r", "unclosed")),
    ("", False, ("", "")),
])
def test_split_reasoning(text, prefilled, expected):
    assert T.split_reasoning(text, prefilled=prefilled) == expected


def test_tokenizer_knows_whether_its_template_prefills_think(tok):
    assert tok.prefills_think
    assert tok.split_reasoning("2+3=5 and the answer") == ("2+3=5 and the answer", "")
    assert tok.split_reasoning("2+3=5\n</think>\n\n\\boxed{5}") == ("2+3=5", "\\boxed{5}")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["<think>", "</think>", "<answer>", "</answer>", "a", " ", "\n", "<", "/", ">",
                                  "<thi", "nk>"]), max_size=30).map("".join) | st.text(max_size=50),
       st.booleans())
def test_split_reasoning_never_fails(text, prefilled):
    reasoning, answer = T.split_reasoning(text, prefilled=prefilled)
    assert isinstance(reasoning, str) and isinstance(answer, str)
    assert "</think>" not in answer and "<think>" not in reasoning


def test_sft_refuses_a_template_that_drops_the_reasoning(tok):
    # a Qwen2.5-style template renders `content` only: SFT on teacher traces through it would teach no thinking
    plain = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
    chat = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "reasoning_content": "two and two", "content": "4"}]
    with pytest.raises(ValueError, match="drops the assistant's reasoning_content.*chat_template='r1'"):
        tok.encode_sft(chat, chat_template=plain)
    ids, mask = tok.encode_sft(chat, chat_template="r1")
    assert "two and two" in tok.decode([i for i, m in zip(ids, mask) if m])
