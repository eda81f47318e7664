"""reasoning-gym datasets as tasks: `reasoning-gym:NAME?size=N&seed=S&<the dataset's config options>`.

reasoning-gym (Stojanovski et al. 2025) generates unlimited, seed-deterministic procedural problems in ~100 domains,
each with its own verifier. Its answers are scored by the dataset's own `score_answer(answer, entry)` (in a
worker under a deadline: see r1kit.rewards), never by string comparison here: some datasets accept many answers
(countdown, graph colouring) and a few have no single gold answer at all.
"""

from __future__ import annotations

import dataclasses

from r1kit.tasks import Example, Task


def load(spec: str, name: str, options: dict) -> Task:
    import reasoning_gym
    from reasoning_gym.factory import DATASETS

    if name not in DATASETS:
        raise ValueError(f"task {spec!r}: reasoning-gym has no dataset {name!r}; it has {sorted(DATASETS)}")
    options = dict(options)
    size, seed = int(options.pop("size", 1000)), int(options.pop("seed", 0))
    allowed = {f.name for f in dataclasses.fields(DATASETS[name][1])} - {"size", "seed"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"task {spec!r}: {name} has no option(s) {unknown}; its options are {sorted(allowed)}")
    dataset = reasoning_gym.create_dataset(name, size=size, seed=seed, **options)
    examples = []
    for entry in dataset:
        gold = entry.get("answer")
        examples.append(Example(
            prompt=entry["question"], answer="" if gold is None else str(gold), scorer="reasoning-gym",
            meta={"dataset": name, "config": options, "entry": entry},
        ))
    trace = None
    if name in ("chain_sum", "basic_arithmetic"):  # expressions our arithmetic trace writer can explain
        from r1kit.tasks.arithmetic import arithmetic_trace

        trace = arithmetic_trace
    return Task(spec, examples, trace)
