"""The demo's synthetic task: two-operation arithmetic written out step by step, with a verifiable answer.

    prompt      "7+5*2="
    completion  "5*2=10;7+10=17"      (then EOS; the answer is the number after the last "=")

Multiplication binds tighter than + and -, so the model must choose which operation to do first: the first
characters of a completion are a real decision (a "fork"), and the digits of each intermediate result are where an
undertrained model hesitates. Prompts are 6 characters and completions at most 15, so a GRPO step on a tiny model
stays in the tens of milliseconds on a CPU.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

CHARS = "0123456789+-*=;"  # everything a prompt or completion contains; the tokenizer gets one token per char
OPS = "+-*"
MAX_COMPLETION_CHARS = 15  # "9*9=81;0-81=-81"
CORRECT_REWARD = 1.0
FORMAT_REWARD = 0.1  # a well-formed two-step derivation earns a little even when the answer is wrong

_NUM = r"-?\d+"
_STEP = rf"{_NUM}[-+*]{_NUM}={_NUM}"
_FORMAT = re.compile(rf"{_STEP};{_STEP}")
_ANSWER = re.compile(rf"=({_NUM})\s*$")


@dataclass(frozen=True)
class Problem:
    prompt: str  # "7+5*2="
    completion: str  # "5*2=10;7+10=17"
    answer: int


def _apply(x: int, op: str, y: int) -> int:
    return x + y if op == "+" else x - y if op == "-" else x * y


def solve(a: int, op1: str, b: int, op2: str, c: int) -> Problem:
    """The written-out solution of `a op1 b op2 c` with the usual precedence."""
    if op2 == "*" and op1 != "*":  # the second operation goes first
        first = _apply(b, op2, c)
        steps = [f"{b}{op2}{c}={first}", f"{a}{op1}{first}={_apply(a, op1, first)}"]
    else:  # left to right
        first = _apply(a, op1, b)
        steps = [f"{a}{op1}{b}={first}", f"{first}{op2}{c}={_apply(first, op2, c)}"]
    answer = int(steps[-1].rsplit("=", 1)[1])
    return Problem(prompt=f"{a}{op1}{b}{op2}{c}=", completion=";".join(steps), answer=answer)


def make_problems(n: int, *, seed: int) -> list[Problem]:
    """`n` problems drawn uniformly (digits 0-9, operators + - *), reproducible from `seed`."""
    rng = random.Random(seed)
    return [
        solve(rng.randrange(10), rng.choice(OPS), rng.randrange(10), rng.choice(OPS), rng.randrange(10))
        for _ in range(n)
    ]


def answer_of(prompt: str) -> int:
    """The correct answer for a prompt such as "7+5*2=" (parsed, never eval'd)."""
    m = re.fullmatch(r"(\d)([-+*])(\d)([-+*])(\d)=", prompt.strip())
    if m is None:
        raise ValueError(f"not a demo prompt: {prompt!r}")
    a, op1, b, op2, c = m.groups()
    return solve(int(a), op1, int(b), op2, int(c)).answer


def score(prompt: str, completion: str) -> float:
    """CORRECT_REWARD for the right final answer plus FORMAT_REWARD for a well-formed two-step derivation."""
    answer, text = answer_of(prompt), completion.strip()
    reward = FORMAT_REWARD if _FORMAT.fullmatch(text) else 0.0
    m = _ANSWER.search(text)
    if m is not None and int(m.group(1)) == answer:
        reward += CORRECT_REWARD
    return reward


def reward_fn(prompts: list[str], completions: list[str], **_: object) -> list[float]:
    """A TRL reward function (`reward_funcs=reward_fn`): plain-text prompts and completions in, floats out."""
    return [score(p, c) for p, c in zip(prompts, completions, strict=True)]


# TRL logs each reward function under its __name__.
reward_fn.__name__ = "arithmetic"
