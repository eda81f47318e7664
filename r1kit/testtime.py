"""Test-time compute: spend more samples or more thinking on a question, and pick the answer.

- `majority_vote`: the most frequent extracted answer over k samples — the R1 paper's cons@k (§3, Table 2).
- `best_of_n`: the sample a reward function scores highest (a verifier, a reward model, or a task's checker).
- `generate_with_budget`: a thinking budget. Reasoning is capped at B tokens; a sample that reaches the cap has
  its think block closed for it and is made to answer. Optionally short reasoning is extended: a sample that
  closes its think block before `min_thinking` tokens gets "Wait" instead, and thinks on ("budget forcing",
  Muennighoff et al. 2025, s1 §3.1).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from r1kit.engine import LLM, SamplingParams
from r1kit.rewards import normalize_answer
from r1kit.tokenizer import END_THINK, split_reasoning


def extract_answer(completion: str, prefilled: bool = True) -> str:
    """The answer part of a completion (after its reasoning), as generated."""
    return split_reasoning(completion, prefilled=prefilled)[1].strip()


def majority_vote(answers: list[str]) -> tuple[str | None, float]:
    """(the most common answer, its share of the votes). Empty answers do not vote; ties go to the earliest."""
    keys = [normalize_answer(a) for a in answers]
    counts = Counter(k for k in keys if k)
    if not counts:
        return None, 0.0
    best = max(counts.values())
    for a, k in zip(answers, keys):  # earliest of the most common, returned as written
        if k and counts[k] == best:
            return a, best / len(answers)
    raise AssertionError("unreachable")


def best_of_n(completions: list[str], reward: Callable[[str], float]) -> tuple[int, list[float]]:
    """Index of the completion `reward` scores highest (the first on ties), and every score."""
    scores = [float(reward(c)) for c in completions]
    return max(range(len(scores)), key=lambda i: (scores[i], -i)), scores


@dataclass
class BudgetedSample:
    reasoning: str
    answer: str
    reasoning_tokens: int
    answer_tokens: int
    budget_hit: bool = False  # the cap closed the reasoning
    waits: int = 0  # times short reasoning was extended
    text: str = field(default="", repr=False)


def generate_with_budget(llm: LLM, prompts: list[str], params: SamplingParams, budget: int, *,
                         min_thinking: int = 0, max_waits: int = 2, answer_tokens: int = 64,
                         wait: str = "Wait", close: str = f"\n{END_THINK}\n\n") -> list[list[BudgetedSample]]:
    """Sample `params.n` completions per prompt with at most `budget` reasoning tokens each.

    Prompts are text already rendered for generation (the chat template's generation prompt opens the think
    block). Returns, per prompt, one `BudgetedSample` per sample.
    """
    tok = llm.tokenizer
    if tok is None:
        raise ValueError("generate_with_budget works on text: the LLM needs a tokenizer")
    if budget < 1 or min_thinking < 0 or min_thinking > budget:
        raise ValueError(f"need 0 <= min_thinking ({min_thinking}) <= budget ({budget}) and budget >= 1")
    n = params.n
    # each sample continues on its own from here: one state per (prompt, sample)
    states = [{"prompt": p, "thought": "", "used": 0, "waits": 0, "hit": False, "seed": i * n + j}
              for i, p in enumerate(prompts) for j in range(n)]
    base_seed = params.seed if params.seed is not None else 0
    thinking = list(states)
    while thinking:
        batch = []
        for st in thinking:
            sp = SamplingParams(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                                min_p=params.min_p, max_tokens=budget - st["used"], stop=[END_THINK],
                                seed=base_seed * 1_000_003 + st["seed"] * 97 + st["waits"])
            batch.append((st["prompt"] + st["thought"], sp))
        outs = llm.generate([b[0] for b in batch], [b[1] for b in batch])
        still = []
        for st, out in zip(thinking, outs):
            o = out.outputs[0]
            st["thought"] += o.text
            st["used"] += len(o.token_ids)
            if o.finish_reason == "length":  # the budget is spent: close the reasoning for it
                st["hit"] = True
            elif o.stop_reason == END_THINK and st["used"] < min_thinking and st["waits"] < max_waits:
                st["thought"] += f"\n{wait}"  # too short: think on
                st["waits"] += 1
                still.append(st)
            elif o.stop_reason != END_THINK:  # ended (EOS) without closing its reasoning: nothing to answer from
                st["done"] = True
        thinking = [st for st in still if st["used"] < budget]
    answering = [st for st in states if not st.get("done")]
    for st in answering:  # `close` brings its own spacing: a space or newline left before the stop would double it
        st["thought"] = st["thought"].rstrip()
    outs = llm.generate([st["prompt"] + st["thought"] + close for st in answering],
                        [SamplingParams(temperature=params.temperature, top_p=params.top_p, max_tokens=answer_tokens,
                                        seed=base_seed * 7 + st["seed"]) for st in answering]) if answering else []
    answers = {id(st): o.outputs[0] for st, o in zip(answering, outs)}
    result: list[list[BudgetedSample]] = [[] for _ in prompts]
    for k, st in enumerate(states):
        o = answers.get(id(st))
        answer = o.text.strip() if o is not None else ""
        result[k // n].append(BudgetedSample(
            reasoning=st["thought"], answer=answer, reasoning_tokens=st["used"],
            answer_tokens=len(o.token_ids) if o is not None else 0, budget_hit=st["hit"], waits=st["waits"],
            text=st["thought"] + (close + answer if o is not None else "")))
    return result
