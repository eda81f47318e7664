"""The default tasks of the tiny recipe, and the step-by-step traces that teach them (its cold-start data).

Both tasks are ones a tiny model cannot do in one forward pass but can do one small step at a time, which is
the point of the recipe: R1's "curated cold-start data" (R1 paper §2.3.1) becomes a few thousand traces written
by a program, SFT teaches the format and the steps, and RL then has a reward signal to climb.

- `addition`: multi-digit addition. The trace adds column by column from the units, carrying:
  "8+6=14, write 4 carry 1". Every step reads two digits and a carry and writes one digit.
- `arithmetic`: + - * with precedence. The trace performs one operation per line, multiplication first, then
  left to right, and rewrites the rest: "4*5=20, so 3+20-6". The same writer explains reasoning-gym's
  `chain_sum` and `basic_arithmetic` problems (parentheses, negative numbers and exact division included).

Traces stay short (tens of tokens for the default sizes).
"""

from __future__ import annotations

import random
import re
from fractions import Fraction

from r1kit.tasks import Example


def addition(size: int = 1000, seed: int = 0, digits: int = 3, min_digits: int | None = None,
             terms: int = 2) -> list[Example]:
    """`size` distinct problems "What is a+b?" with `terms` operands of `min_digits`..`digits` digits."""
    lo = digits if min_digits is None else min_digits
    if not 1 <= lo <= digits or terms < 2:
        raise ValueError(f"addition needs 1 <= min_digits <= digits and terms >= 2, got min_digits={lo}, "
                         f"digits={digits}, terms={terms}")
    rng = random.Random(seed)

    def make():
        operands = []
        for _ in range(terms):
            n = rng.randint(lo, digits)
            operands.append(rng.randint(10 ** (n - 1) if n > 1 else 0, 10**n - 1))
        return Example(prompt=f"What is {'+'.join(map(str, operands))}?", answer=str(sum(operands)),
                       meta={"operands": operands})

    return _distinct(make, size)


def addition_trace(example: Example) -> str:
    """Column by column from the units: "8+6=14, write 4 carry 1"; the last column writes all it has."""
    operands = [str(x) for x in example.meta["operands"]]
    width = max(len(x) for x in operands)
    lines, carry = [], 0
    for col in range(width):
        digits = [x[-1 - col] for x in operands if col < len(x)]
        total = sum(map(int, digits)) + carry
        terms = "+".join(digits + ([str(carry)] if carry else []))
        if col == width - 1:
            lines.append(f"{terms}={total}, write {total}")
        else:
            carry = total // 10
            lines.append(f"{terms}={total}, write {total % 10}" + (f" carry {carry}" if carry else ""))
    return "\n".join(lines)


def arithmetic(size: int = 1000, seed: int = 0, terms: int = 4, min_terms: int = 3, digits: int = 1,
               ops: str = "+-*", modulus: int | None = None) -> list[Example]:
    """`size` distinct expressions of `min_terms`..`terms` numbers of up to `digits` digits joined by `ops`.
    With `modulus`, every operation's result is reduced modulo it ("What is 7+4*5 modulo 10?"): the values stay
    one digit, so each line of the trace is a lookup in a small table while the whole still needs precedence."""
    if not 2 <= min_terms <= terms or not set(ops) <= set("+-*") or not ops:
        raise ValueError(f"arithmetic needs 2 <= min_terms <= terms and ops from '+-*', got min_terms={min_terms},"
                         f" terms={terms}, ops={ops!r}")
    if modulus is not None and (not isinstance(modulus, int) or modulus < 2):
        raise ValueError(f"arithmetic needs an integer modulus >= 2, got {modulus!r}")
    rng = random.Random(seed)

    def make():
        n = rng.randint(min_terms, terms)
        numbers = [rng.randint(1, 10**digits - 1) for _ in range(n)]
        expression = str(numbers[0]) + "".join(rng.choice(ops) + str(x) for x in numbers[1:])
        value = evaluate(expression, modulus)
        question = f"{expression} modulo {modulus}" if modulus else expression
        return Example(prompt=f"What is {question}?", answer=_format(value),
                       meta={"expression": expression, "modulus": modulus})

    return _distinct(make, size)


def arithmetic_trace(example: Example) -> str | None:
    """One operation per line, rewriting the rest; None when the expression leaves the integers."""
    expression = example.meta.get("expression")
    if expression is None:
        expression = (example.meta.get("entry") or {}).get("metadata", {}).get("expression")
    if expression is None:
        return None
    try:
        steps = trace_steps(expression, example.meta.get("modulus"))
    except (ValueError, ZeroDivisionError):
        return None
    if not steps or steps[-1][1] != example.answer.strip():
        return None  # never teach a trace whose result is not the gold answer
    return "\n".join(f"{step}, so {rest}" if rest != result else step for step, result, rest in
                     ((s, s.rsplit("=", 1)[1], r) for s, r in steps))


# ----------------------------------------------------------------------------------------------------------------
# A tiny expression machine: tokens are numbers (unary minus folded in), operators and parentheses.

_TOKEN = re.compile(r"\s*(\d+|[-+*/()])")


def _tokens(expression: str) -> list:
    tokens, pos = [], 0
    expression = expression.strip()
    while pos < len(expression):
        m = _TOKEN.match(expression, pos)
        if not m:
            raise ValueError(f"cannot read {expression!r} at {pos}")
        tokens.append(m.group(1))
        pos = m.end()
    out: list = []
    for tok in tokens:
        if tok.isdigit():
            out.append(Fraction(int(tok)))
        else:
            out.append(tok)
    # a "-" with no value before it is a sign: mark it as unary
    for i, tok in enumerate(out):
        if tok == "-" and (i == 0 or (isinstance(out[i - 1], str) and out[i - 1] != ")")):
            out[i] = "neg"
    return out


def _format(x: Fraction) -> str:
    if x.denominator != 1:
        raise ValueError(f"{x} is not an integer")
    return str(x.numerator)


def _render(tokens: list) -> str:
    parts = []
    for i, tok in enumerate(tokens):
        if isinstance(tok, Fraction):
            text = _format(tok)
            # a negative number after an operator is bracketed: "5-(-3)", never "5--3"
            if tok < 0 and i > 0 and tokens[i - 1] in ("+", "-", "*", "/"):
                text = f"({text})"
            parts.append(text)
        else:
            parts.append("-" if tok == "neg" else tok)
    return "".join(parts)


def _step(tokens: list, modulus: int | None = None) -> tuple[list, str | None]:
    """Do the next operation; returns the new tokens and the "a*b=c" line (None for a bookkeeping rewrite)."""
    # innermost parentheses first
    start, end = 0, len(tokens)
    for i, tok in enumerate(tokens):
        if tok == "(":
            start = i + 1
        elif tok == ")":
            end = i
            break
    inner = tokens[start:end]
    # signs: "neg" before a number folds in (no line); before a bracket it waits for the bracket to resolve
    for i, tok in enumerate(inner):
        if tok == "neg" and i + 1 < len(inner) and isinstance(inner[i + 1], Fraction):
            new = inner[:i] + [-inner[i + 1]] + inner[i + 2:]
            return tokens[:start] + new + tokens[end:], None
    if len(inner) == 1 and start > 0:  # "(x)" -> x, and "-(x)" -> -x
        value = inner[0]
        before = tokens[: start - 1]
        if before and before[-1] == "neg":
            before, value = before[:-1], -value
        return before + [value] + tokens[end + 1:], None
    for ops in (("*", "/"), ("+", "-")):
        for i, tok in enumerate(inner):
            if tok in ops and 0 < i < len(inner) - 1:
                a, b = inner[i - 1], inner[i + 1]
                if not isinstance(a, Fraction) or not isinstance(b, Fraction):
                    raise ValueError("malformed expression")
                value = {"*": a * b, "/": a / b if b else None, "+": a + b, "-": a - b}[tok]
                if value is None:
                    raise ZeroDivisionError("division by zero")
                if modulus:
                    value %= modulus
                line = f"{_render([a, tok, b])}={_format(value)}"
                new = inner[: i - 1] + [value] + inner[i + 2:]
                return tokens[:start] + new + tokens[end:], line
    raise ValueError("malformed expression")


def trace_steps(expression: str, modulus: int | None = None) -> list[tuple[str, str]]:
    """[(operation line, the expression after it)], the last "expression" being the value."""
    tokens = _tokens(expression)
    steps = []
    for _ in range(4 * len(tokens) + 4):
        if len(tokens) == 1 and isinstance(tokens[0], Fraction):
            return steps
        tokens, line = _step(tokens, modulus)
        if line is not None:
            steps.append((line, _render(tokens)))
        elif steps:  # a rewrite after the last line updates what that line says remains
            steps[-1] = (steps[-1][0], _render(tokens))
    raise ValueError(f"cannot evaluate {expression!r}")


def evaluate(expression: str, modulus: int | None = None) -> Fraction:
    tokens = _tokens(expression)
    while not (len(tokens) == 1 and isinstance(tokens[0], Fraction)):
        tokens, _ = _step(tokens, modulus)
    return tokens[0]


def _distinct(make, size: int) -> list[Example]:
    # Distinct prompts, so a content-based split is exact; small problem spaces give fewer than `size`.
    seen, out = set(), []
    for _ in range(20 * size + 100):
        if len(out) == size:
            break
        example = make()
        if example.prompt not in seen:
            seen.add(example.prompt)
            out.append(example)
    return out
