"""The demo's synthetic task: list the items a prompt names, in any order. Its decision points are known exactly.

    prompt      "gather bcfhk:"                      (five of eight keys, in random order)
    completion  "heron,bison,koala,camel,finch"      (then EOS; any order of the five names is correct)

Each key is the first letter of one fixed animal name (`WORDS`). Where a name starts, the model chooses which of the
items not yet written comes next: with r items left that is a choice among r equally correct tokens, a real fork
(four per completion: 5, 4, 3 and 2 ways; the last name is forced). Every other token is determined by what came
before: the rest of a name, the comma after it, EOS after the fifth. Every name has five letters, so a correct
completion is 30 tokens (29 characters and EOS) of which 4 (13 %) are decision points and the rest should be
near-certain: the shape the forking-token papers describe for real reasoning traces.

`valid_next` says which tokens keep a completion correct after any prefix, and `decision_points` which token
positions of a completion had more than one (positions count characters; position len(completion) is EOS).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# Distinct first letters (the prompt's keys); the rest of a name is forced once its first letter is written.
WORDS = ("bison", "camel", "finch", "heron", "koala", "otter", "raven", "tiger")
KEYS = "".join(w[0] for w in WORDS)
BY_KEY = {w[0]: w for w in WORDS}
N_ITEMS = 5  # items per prompt
SEP = ","
PREFIX = "gather "
END = ":"
CHARS = "".join(sorted(set("".join(WORDS)) | set(PREFIX + END + SEP)))  # the tokenizer's alphabet
MAX_COMPLETION_CHARS = N_ITEMS * max(map(len, WORDS)) + N_ITEMS - 1
EOS = ""  # how `valid_next` names the end of the completion

CORRECT_REWARD = 1.0  # the completion names every item exactly once (any order)
# The collapse run's reward adds up to this for alphabetical order (a share for each pair of neighbouring names in
# alphabetical order): one of the 120 correct paths is preferred, and every decision point feels it.
ORDER_BONUS = 0.1


@dataclass(frozen=True)
class Problem:
    prompt: str  # "gather hbkcf:"
    keys: str  # "hbkcf": the prompt's items, in the order it lists them
    completion: str  # one correct completion: the names in the prompt's order

    def words(self) -> list[str]:
        return [BY_KEY[k] for k in self.keys]


def problem(keys: str) -> Problem:
    """The problem naming the items of `keys` (first letters of WORDS), with its prompt-order completion."""
    if len(keys) != N_ITEMS or len(set(keys)) != N_ITEMS or not set(keys) <= set(KEYS):
        raise ValueError(f"keys {keys!r}: pass {N_ITEMS} distinct letters of {KEYS!r}")
    return Problem(prompt=f"{PREFIX}{keys}{END}", keys=keys, completion=SEP.join(BY_KEY[k] for k in keys))


def make_problems(n: int, *, seed: int) -> list[Problem]:
    """`n` problems, each five keys drawn without replacement in random order, reproducible from `seed`."""
    rng = random.Random(seed)
    return [problem("".join(rng.sample(KEYS, N_ITEMS))) for _ in range(n)]


def keys_of(prompt: str) -> str:
    """The keys of a prompt such as "gather hbkcf:" (refuses anything else)."""
    text = prompt.strip()
    keys = text[len(PREFIX) : -len(END)]
    if not (text.startswith(PREFIX) and text.endswith(END)) or len(keys) != N_ITEMS or len(set(keys)) != N_ITEMS \
            or not set(keys) <= set(KEYS):
        raise ValueError(f"not a demo prompt: {prompt!r} (expected {PREFIX!r} + {N_ITEMS} keys of {KEYS!r} + {END!r})")
    return keys


def valid_next(prompt: str, prefix: str) -> set[str]:
    """The tokens (characters, or EOS = "") that keep `prefix` on a correct completion; empty once it has left one."""
    remaining = set(keys_of(prompt))
    pos = 0
    while True:
        # At the start of a name: any item not yet written.
        if pos == len(prefix):
            return set(remaining)
        word = BY_KEY.get(prefix[pos])
        if word is None or prefix[pos] not in remaining:
            return set()
        remaining.discard(prefix[pos])
        # Inside a name: its next letter, then a comma (more items left) or EOS (none left).
        end = pos + len(word)
        if not word.startswith(prefix[pos:end]):
            return set()
        if end >= len(prefix):
            if len(prefix) < end:
                return {word[len(prefix) - pos]}
            return {SEP} if remaining else {EOS}
        if prefix[end] != SEP or not remaining:
            return set()
        pos = end + 1


def decision_points(prompt: str, completion: str) -> list[int]:
    """Positions of `completion` (EOS at len(completion)) where more than one token was correct.

    A position counts only while the completion is still correct up to it: after a wrong token nothing is a decision
    (no continuation earns the reward), and positions past a correct completion's EOS do not exist.
    """
    out = []
    for i in range(len(completion) + 1):
        options = valid_next(prompt, completion[:i])
        if len(options) > 1:
            out.append(i)
        if not options or (i < len(completion) and completion[i] not in options):
            break
    return out


def score(prompt: str, completion: str, *, order_bonus: float = 0.0) -> float:
    """CORRECT_REWARD when `completion` names every item of the prompt once, separated by commas, in any order;
    plus `order_bonus` × the share of neighbouring names in alphabetical order. Anything else earns 0."""
    keys = keys_of(prompt)
    names = completion.strip().split(SEP)
    if sorted(names) != sorted(BY_KEY[k] for k in keys):
        return 0.0
    in_order = sum(a < b for a, b in zip(names, names[1:]))
    return CORRECT_REWARD + order_bonus * in_order / (len(names) - 1)


def reward_fn(prompts: list[str], completions: list[str], **_: object) -> list[float]:
    """A TRL reward function (`reward_funcs=reward_fn`): every correct order earns the same."""
    return [score(p, c) for p, c in zip(prompts, completions, strict=True)]


def alphabetical_reward_fn(prompts: list[str], completions: list[str], **_: object) -> list[float]:
    """The same, plus up to ORDER_BONUS for the alphabetical order: a slight preference for one of the 120 paths."""
    return [score(p, c, order_bonus=ORDER_BONUS) for p, c in zip(prompts, completions, strict=True)]


# TRL logs each reward function under its __name__.
reward_fn.__name__ = "items"
alphabetical_reward_fn.__name__ = "items_alphabetical"
