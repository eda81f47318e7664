"""Tokenizer and chat templates: one rendering of a conversation for training, evaluation and serving.

What lives here:

- `Tokenizer`: a thin wrapper over a `tokenizers` (HF `tokenizer.json`) tokenizer, its special tokens and its
  chat template. `load(path)` reads any Hugging Face tokenizer directory; `save(path)` writes one that
  `transformers.AutoTokenizer` loads to the same encodings.
- Chat templates rendered with jinja2 exactly the way `transformers` renders them (a sandboxed environment
  with `trim_blocks`/`lstrip_blocks`, `loopcontrols`, `raise_exception`, `strftime_now`, its own `tojson`, and the
  `{% generation %}` tag that marks assistant text), so the text a model is trained on is byte for byte the
  text it is served with, without importing transformers (4 s) on r1kit's import path.
- Two templates of our own: `R1_TEMPLATE`, DeepSeek-R1's chat format (`<｜User｜>` / `<｜Assistant｜>` turns,
  `<think>` pre-filled by the generation prompt, reasoning dropped from earlier turns as R1 serves it), and
  `R1_ZERO_TEMPLATE`, the plain-text prompt of the R1 paper's Table 1 (§2.2.1) for RL from a base model.
- `encode_sft(messages)`: token ids and a loss mask that is 1 on the assistant's tokens only.
- `split_reasoning(text)`: a completion's reasoning and its answer, for rewards, evaluation and the server's
  `reasoning_content`.
- `train_bpe(texts, vocab_size)`: a byte-level BPE trained locally for the tiny models.
"""

from __future__ import annotations

import contextvars
import json
import os
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils

# DeepSeek-V3/R1's own special tokens (note the full-width bars, U+FF5C, and the ▁ in them), so a tiny model and
# an R1-distill checkpoint share one chat format.
BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK, END_THINK = "<think>", "</think>"
ANSWER, END_ANSWER = "<answer>", "</answer>"
SPECIAL_TOKENS = [BOS, EOS, PAD, USER, ASSISTANT]  # skipped by decode(skip_special_tokens=True)
TEXT_TOKENS = [THINK, END_THINK]  # single tokens, but kept by skip_special_tokens so the reasoning can be split

# The R1 chat format. The generation prompt pre-fills "<think>\n" (as DeepSeek's released template does) so the
# model always reasons; a training conversation renders its final assistant turn as the generation prompt
# followed by exactly what the model must generate, so prompts at serving time are prefixes of training text.
# Earlier assistant turns keep their answer only: R1 never shows the model its old reasoning.
R1_TEMPLATE = (
    "{%- set ns = namespace(system='') -%}"
    "{%- for m in messages if m['role'] == 'system' -%}"
    "{%- set ns.system = ns.system + ('\\n\\n' if not loop.first else '') + m['content'] -%}"
    "{%- endfor -%}"
    "{{- bos_token if bos_token is defined else '' -}}{{- ns.system -}}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}"
    "{{- '<｜User｜>' + m['content'] -}}"
    "{%- elif m['role'] == 'assistant' -%}"
    "{%- set content = m['content'] if m['content'] is defined and m['content'] is string else '' -%}"
    "{%- set reasoning = m['reasoning_content'] if m['reasoning_content'] is defined"
    " and m['reasoning_content'] is string else '' -%}"
    "{%- if '</think>' in content -%}"
    "{%- set reasoning = (content.split('</think>')[:-1] | join('')).replace('<think>', '') -%}"
    "{%- set content = content.split('</think>')[-1] -%}"
    "{%- endif -%}"
    "{{- '<｜Assistant｜>' -}}"
    "{%- if loop.last -%}"
    "{{- '<think>\\n' -}}"
    "{%- generation -%}"
    "{{- reasoning.strip() + '\\n</think>\\n\\n' + content.strip() + '<｜end▁of▁sentence｜>' -}}"
    "{%- endgeneration -%}"
    "{%- else -%}"
    "{%- generation -%}{{- content.strip() + '<｜end▁of▁sentence｜>' -}}{%- endgeneration -%}"
    "{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<｜Assistant｜><think>\\n' -}}{%- endif -%}"
)

# R1-Zero (paper Table 1): plain text a base model continues, no special tokens beyond BOS/EOS. A system message,
# if given, replaces the paper's instruction.
R1_ZERO_INSTRUCTION = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The "
    "assistant first thinks about the reasoning process in the mind and then provides the user with the answer. "
    "The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
    "respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>."
)
R1_ZERO_TEMPLATE = (
    "{%- set ns = namespace(system='" + R1_ZERO_INSTRUCTION + "') -%}"
    "{%- for m in messages if m['role'] == 'system' -%}{%- set ns.system = m['content'] -%}{%- endfor -%}"
    "{{- bos_token if bos_token is defined else '' -}}{{- ns.system -}}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}"
    "{{- ' User: ' + m['content'] -}}"
    "{%- elif m['role'] == 'assistant' -%}"
    "{%- set content = m['content'] if m['content'] is defined and m['content'] is string else '' -%}"
    "{{- ' Assistant:' -}}"
    "{%- generation -%}"
    "{%- if m['reasoning_content'] is defined and m['reasoning_content'] is string -%}"
    "{{- ' <think> ' + m['reasoning_content'].strip() + ' </think> <answer> ' + content.strip() + ' </answer>' -}}"
    "{%- else -%}{{- ' ' + content.strip() -}}{%- endif -%}"
    "{{- eos_token if eos_token is defined else '' -}}"
    "{%- endgeneration -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- ' Assistant:' -}}{%- endif -%}"
)

TEMPLATES = {"r1": R1_TEMPLATE, "r1-zero": R1_ZERO_TEMPLATE}


# ----------------------------------------------------------------------------------------------------------------
# Rendering chat templates the way transformers does


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %} ... {% endgeneration %}`: marks text the assistant generates (transformers' tag).

    While a render is being tracked, each block records its (start, end) character span in the output. The
    start is the length of everything yielded so far, which is exact because jinja yields output lazily and the
    tracker consumes it as it comes.
    """

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

    def _mark(self, caller):
        text = caller()
        tracked = _TRACKED.get()
        if tracked is not None:
            chunks, spans = tracked
            start = sum(len(c) for c in chunks)
            spans.append((start, start + len(text)))
        return text


_TRACKED: contextvars.ContextVar = contextvars.ContextVar("r1kit_generation_spans", default=None)


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore attributes, so a template cannot reach CPython internals."""

    def __init__(*args, **kwargs):  # the `self` trick of jinja's Namespace, so namespace(self=...) still works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")


class _Dict:
    """`dict(...)` inside templates without exposing the type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson escapes HTML characters; templates expect plain JSON
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=64)
def compile_template(source: str) -> jinja2.Template:
    """Compile a chat template in the environment transformers uses (templates are untrusted: sandboxed)."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_Dict(),
                       namespace=_Namespace)
    return env.from_string(source)


def _plain(value: Any) -> Any:
    # What a template sees is rebuilt from plain JSON types, as transformers does, so no object with methods
    # reaches the sandbox.
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return f"<{type(value).__name__}>"


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _normalize_messages(messages: list[dict]) -> list[dict]:
    out = []
    for m in messages:
        if not isinstance(m, dict):
            raise TypeError(f"chat messages must be dicts with 'role' and 'content', got {m!r}")
        m = {k: v for k, v in m.items() if v is not None}  # templates handle a missing key, not a None
        m = _plain(m)
        # Reasoning may come under any of its common names; templates read `reasoning_content` (and gpt-oss's
        # read `thinking`), exactly as transformers aliases them.
        reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


def render_template(source: str, messages: list[dict], add_generation_prompt: bool = False,
                    track: bool = False, **variables) -> tuple[str, list[tuple[int, int]]]:
    """Render one conversation; with `track`, also the character spans of its `{% generation %}` blocks."""
    template = compile_template(source)
    messages = _normalize_messages(messages)
    variables = _plain(variables)
    kwargs = dict(messages=messages, tools=None, documents=None, add_generation_prompt=add_generation_prompt)
    kwargs.update(variables)
    if not track:
        return template.render(**kwargs), []
    chunks, spans = [], []
    token = _TRACKED.set((chunks, spans))
    try:
        for chunk in template.generate(**kwargs):
            chunks.append(chunk)
    finally:
        _TRACKED.reset(token)
    return "".join(chunks), spans


# ----------------------------------------------------------------------------------------------------------------
# Reasoning and answer


def split_reasoning(text: str, prefilled: bool = False) -> tuple[str, str]:
    """Split a completion into (reasoning, answer), both stripped.

    - `<think> r </think> a` gives (r, a); with several think blocks, the reasoning is everything before the last
      `</think>` (tags removed) and the answer what follows it.
    - No opening tag but a `</think>` (a template pre-filled `<think>`): everything before it is reasoning.
    - An unclosed `<think>` (the model ran out of tokens while thinking): all reasoning, empty answer.
    - No tags: all answer, or, when `prefilled` says the prompt opened a think block, all reasoning.
    - An answer wrapped in `<answer> ... </answer>` (the R1-Zero format) is unwrapped; with several, the last.
    """
    if not isinstance(text, str):
        return "", ""
    close = text.rfind(END_THINK)
    if close >= 0:
        reasoning = _without_tags(text[:close])
        answer = text[close + len(END_THINK):]
    else:
        start = text.find(THINK)
        if start >= 0:
            reasoning, answer = _without_tags(text[start + len(THINK):]), ""
        elif prefilled:
            reasoning, answer = text, ""
        else:
            reasoning, answer = "", text
    start = answer.rfind(ANSWER)
    if start >= 0:
        end = answer.find(END_ANSWER, start)
        answer = answer[start + len(ANSWER): end if end >= 0 else len(answer)]
    return reasoning.strip(), answer.strip()


def _without_tags(text: str) -> str:
    while THINK in text or END_THINK in text:  # until none is left: removing one can join the halves of another
        text = text.replace(THINK, "").replace(END_THINK, "")
    return text


# ----------------------------------------------------------------------------------------------------------------
# The tokenizer

_NAMED_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _token_content(value: Any) -> str | None:
    # tokenizer_config.json stores a special token as a string or as a serialized AddedToken
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """A `tokenizers.Tokenizer` with its special tokens and chat template.

    `vocab_size` counts every id, added tokens included: it is the size an embedding table needs.
    `encode` never adds special tokens unless asked: the chat template writes BOS itself.
    """

    def __init__(self, backend, chat_template: str | dict | None = None, special_tokens: dict | None = None,
                 config: dict | None = None):
        self.backend = backend
        self.chat_template = chat_template
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.config = dict(config or {})

    # -- tokens --------------------------------------------------------------------------------------------------
    def _id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        pad = self._id("pad_token")
        return self.eos_token_id if pad is None else pad

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        if isinstance(ids, int):
            ids = [ids]
        text = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        # transformers' old WordPiece clean-up, which it (and so we) skips for BPE models
        if self.config.get("clean_up_tokenization_spaces") and type(self.backend.model).__name__ != "BPE":
            for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                         (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(a, b)
        return text

    # -- chat ----------------------------------------------------------------------------------------------------
    def get_chat_template(self, chat_template: str | None = None) -> str:
        """The template source: a name from TEMPLATES, jinja source, or the tokenizer's own (R1 when it has none)."""
        own = self.chat_template
        if isinstance(own, dict):
            if chat_template in own:
                return own[chat_template]
            if chat_template is None:
                if "default" not in own:
                    raise ValueError(f"this tokenizer has several chat templates and no default: {sorted(own)}")
                return own["default"]
        if chat_template is None:
            return own if own is not None else R1_TEMPLATE
        return TEMPLATES.get(chat_template, chat_template)

    def set_default_template(self, chat_template: str) -> None:
        """Make `chat_template` (r1, r1-zero, one of this tokenizer's own names, or jinja source) the one applied
        when none is named: a checkpoint trained on a template is saved with it, so that serving renders the same
        prompts. ValueError for a name that is no template."""
        own = self.chat_template
        source = self.get_chat_template(chat_template)
        if source == chat_template and "{" not in source:
            names = sorted({*TEMPLATES, *(own if isinstance(own, dict) else ())})
            raise ValueError(f"{chat_template!r} is not a chat template: a name ({', '.join(names)}) or jinja source")
        self.chat_template = {**own, "default": source} if isinstance(own, dict) else source
        self.__dict__.pop("_prefills_think", None)

    def template_variables(self) -> dict:
        """What transformers passes a template beside the messages: its named special tokens."""
        return {k: self.special_tokens[k] for k in _NAMED_SPECIAL if k in self.special_tokens}

    def apply_chat_template(self, messages, add_generation_prompt: bool = False, tokenize: bool = False,
                            chat_template: str | None = None, **kwargs):
        """Render `messages` (a list of {"role", "content"} dicts, or a list of such lists) as transformers does.

        Returns the text, or with `tokenize=True` its token ids (no special tokens added beyond the template's).
        Extra keyword arguments reach the template as variables, as in transformers.
        """
        if isinstance(messages, (list, tuple)) and messages and isinstance(messages[0], (list, tuple)):
            return [self.apply_chat_template(m, add_generation_prompt, tokenize, chat_template, **kwargs)
                    for m in messages]
        if not messages:
            raise ValueError("cannot apply a chat template to an empty conversation")
        source = self.get_chat_template(chat_template)
        text, _ = render_template(source, list(messages), add_generation_prompt,
                                  **{**self.template_variables(), **kwargs})
        return self.encode(text) if tokenize else text

    def encode_sft(self, messages: list[dict], chat_template: str | None = None) -> tuple[list[int], list[int]]:
        """Token ids of a whole conversation, and a loss mask that is 1 exactly on the assistant's tokens.

        The assistant's text is what the template marks with `{% generation %}`; for a template without those
        tags, it is what each assistant turn adds after the generation prompt of the conversation before it.
        A token is masked in when any of its characters is assistant text (transformers' rule).
        """
        source = self.get_chat_template(chat_template)
        variables = self.template_variables()
        text, spans = render_template(source, messages, False, track=True, **variables)
        for m in messages:
            reasoning = (m.get("reasoning_content") or "").strip() if m.get("role") == "assistant" else ""
            if reasoning and reasoning not in text:
                name = chat_template or "the tokenizer's own"
                raise ValueError(f"the chat template ({name}) drops the assistant's "
                                 f"reasoning_content, so the model would never learn to think: train with "
                                 f"chat_template='r1' (or 'r1-zero', or a template that renders it)")
        if not spans:
            spans = _spans_by_prefix(source, messages, text, variables)
        enc = self.backend.encode(text, add_special_tokens=False)
        mask = [0] * len(enc.ids)
        i = 0
        for t, (start, end) in enumerate(enc.offsets):
            while i < len(spans) and start >= spans[i][1]:
                i += 1
            if i == len(spans):
                break
            if end > spans[i][0]:
                mask[t] = 1
        return list(enc.ids), mask

    @property
    def prefills_think(self) -> bool:
        """Whether the generation prompt opens a think block (so completions start inside the reasoning)."""
        if "_prefills_think" not in self.__dict__:
            try:
                prompt = self.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True)
                self._prefills_think = prompt.rstrip().endswith(THINK)
            except Exception:  # a template that cannot render a bare user turn is not a thinking template
                self._prefills_think = False
        return self._prefills_think

    def split_reasoning(self, completion: str) -> tuple[str, str]:
        """(reasoning, answer) of a completion generated after this tokenizer's generation prompt."""
        return split_reasoning(completion, prefilled=self.prefills_think)

    # -- files ---------------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write tokenizer.json, tokenizer_config.json (with the chat template) and special_tokens_map.json."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(path / "tokenizer.json"))
        config = {k: v for k, v in self.config.items()
                  if k not in ("chat_template", "added_tokens_decoder", *_NAMED_SPECIAL)}
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        config.setdefault("clean_up_tokenization_spaces", False)
        config.setdefault("model_max_length", 1_000_000)
        config.update(self.special_tokens)
        template = self.chat_template
        if isinstance(template, dict):
            config["chat_template"] = [{"name": k, "template": v} for k, v in template.items()]
        elif template is not None:
            config["chat_template"] = template
        _write_json(path / "tokenizer_config.json", config)
        _write_json(path / "special_tokens_map.json", dict(self.special_tokens))
        # A chat_template.jinja beside takes priority over the config in transformers: keep it in step
        jinja_file = path / "chat_template.jinja"
        if jinja_file.exists() and isinstance(template, str):
            jinja_file.write_text(template, encoding="utf-8")


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _spans_by_prefix(source: str, messages: list[dict], text: str, variables: dict) -> list[tuple[int, int]]:
    # Without generation tags, an assistant turn is what it adds to the conversation before it: from where its
    # rendering parts from the generation prompt (a template may pre-fill "<think>" that the turn itself does not
    # render) to where the template's constant tail, if it has one, begins.
    spans = []
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        before = render_template(source, messages[:i], False, **variables)[0] if i else ""
        prompt = render_template(source, messages[:i], True, **variables)[0] if i else ""
        upto = render_template(source, messages[: i + 1], False, **variables)[0]
        start = len(os.path.commonprefix([prompt, upto]))
        tail = len(os.path.commonprefix([before[::-1], upto[::-1]]))
        end = max(start, len(upto) - tail)
        if end > start and text.startswith(upto[:end]):  # else the template rewrites this turn later on
            spans.append((start, end))
    return spans


def load(path: str | os.PathLike) -> Tokenizer:
    """Load a Hugging Face tokenizer directory: tokenizer.json, tokenizer_config.json and its chat template(s).

    The template comes from chat_template.jinja (and additional_chat_templates/*.jinja) when present, as
    transformers 5 writes it, else from tokenizer_config.json's `chat_template` (a string, or a list of named
    templates).
    """
    from tokenizers import Tokenizer as Backend  # the Rust library; imported here to keep `import r1kit` light

    path = Path(path)
    if path.is_file():
        path = path.parent
    file = path / "tokenizer.json"
    if not file.exists():
        raise FileNotFoundError(f"{file} not found: r1kit reads tokenizers in the tokenizer.json format")
    backend = Backend.from_file(str(file))
    config = _read_json(path / "tokenizer_config.json")
    special = {k: _token_content(config.get(k)) for k in _NAMED_SPECIAL}
    if "added_tokens_decoder" not in config:  # legacy layout: special_tokens_map.json has the last word
        for k, v in _read_json(path / "special_tokens_map.json").items():
            if k in _NAMED_SPECIAL and _token_content(v) is not None:
                special[k] = _token_content(v)

    templates = {}
    if (path / "chat_template.jinja").exists():
        templates["default"] = (path / "chat_template.jinja").read_text(encoding="utf-8")
    extra_dir = path / "additional_chat_templates"
    if extra_dir.is_dir():
        for f in sorted(extra_dir.glob("*.jinja")):
            templates[f.name.removesuffix(".jinja")] = f.read_text(encoding="utf-8")
    if templates:
        template = templates["default"] if list(templates) == ["default"] else templates
    else:
        template = config.get("chat_template")
        if isinstance(template, list):
            template = {t["name"]: t["template"] for t in template}
    return Tokenizer(backend, template, special, config)


def _read_json(file: Path) -> dict:
    if not file.exists():
        return {}
    with open(file, encoding="utf-8") as f:
        return json.load(f)


# ----------------------------------------------------------------------------------------------------------------
# Training a byte-level BPE for tiny models


def train_bpe(texts: Iterable[str], vocab_size: int = 1024, min_frequency: int = 2,
              chat_template: str = "r1") -> Tokenizer:
    """Train a byte-level BPE on `texts` (GPT-2's byte alphabet, so any string round-trips).

    Digits are split one per token, as DeepSeek-V3 and Llama do, so a tiny model can do arithmetic digit by
    digit. The special tokens are DeepSeek's; `<think>` and `</think>` are single tokens but not "special", so
    decoding with skip_special_tokens=True keeps the reasoning markers.
    """
    from tokenizers import AddedToken, Tokenizer as Backend, decoders, models, pre_tokenizers, trainers

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
        special_tokens=list(SPECIAL_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(texts, trainer=trainer)
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in TEXT_TOKENS])
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "add_bos_token": False, "add_eos_token": False, "model_max_length": 1_000_000}
    return Tokenizer(backend, TEMPLATES.get(chat_template, chat_template), special, config)

