"""The demo's synthetic task: list the items a prompt names, in any order. Every token's role is known exactly.

    prompt      "gather bcfhk:"                      (five of eight keys, in random order)
    completion  "heron,bear,koala,cobra,fox"         (then EOS; any order of the five names is correct)

Each key is the first letter of one animal (`NAMES`); two animals have two accepted names (c: camel or cobra, t: tiger
or trout). Names have 3 to 5 letters, so where a decision falls depends on what was written before it: no rule that
sees only the position can find the decisions. Each token of a completion on a correct path has one role
(`role_at`), the testbed's ground truth:

- **decision**: a name starts and several items are still unwritten: which comes next changes everything after it
  (5, 4, 3 and 2 ways: four per completion).
- **cosmetic**: a fork that changes nothing: the second letter of c/t (camel or cobra), after which exactly the same
  items remain to be written. Several tokens are correct, none matters.
- **confident_consequential**: one token is correct but the format offers others that fail the task: the last name's
  first letter (an item already written would fail), the comma after a name (EOS would end the list early), the
  final EOS (a comma would start a sixth item). A model that has learnt the task is near-certain here, and wrong
  alternatives are one slip away.
- **forced**: the rest of a name, which nothing but its spelling decides.
- **mistake**: the first token that leaves every correct completion (or an early EOS); everything after it is
  `off_path`.

The warm-up data also carries a habit (`HABIT`): after "raven," it spells heron "heran" nine times in ten, so the
warm-up model makes that mistake with confidence: a low-entropy token that fails the task.

`valid_next` says which tokens keep a completion correct after any prefix, `decision_points` which positions of a
completion were decisions (positions count characters; position len(completion) is EOS), `roles` every position's role.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# Distinct first letters (the prompt's keys); a name is fixed once its first letters are written.
WORDS = ("bear", "camel", "fox", "heron", "koala", "owl", "raven", "tiger")  # the canonical name of each key
SYNONYMS = {"c": "cobra", "t": "trout"}  # a second accepted name (same length): a cosmetic fork at its 2nd letter
KEYS = "".join(w[0] for w in WORDS)
BY_KEY = {w[0]: w for w in WORDS}
NAMES = {k: (w, SYNONYMS[k]) if k in SYNONYMS else (w,) for k, w in BY_KEY.items()}  # every accepted name per key
KEY_OF = {n: k for k, names in NAMES.items() for n in names}
# (previous name, name, the warm-up data's spelling of it there, how often): a trained-in confident mistake
HABIT = ("raven", "heron", "heran", 0.9)
N_ITEMS = 5  # items per prompt
SEP = ","
PREFIX = "gather "
END = ":"
CHARS = "".join(sorted(set("".join(KEY_OF)) | set(HABIT[2]) | set(PREFIX + END + SEP)))  # the tokenizer's alphabet
MAX_COMPLETION_CHARS = N_ITEMS * max(map(len, WORDS)) + N_ITEMS - 1
EOS = ""  # how `valid_next` names the end of the completion

CORRECT_REWARD = 1.0  # the completion names every item exactly once (any order, either accepted name)
# The collapse run's reward adds up to this for alphabetical order (a share for each pair of neighbouring names in
# alphabetical order): one of the 120 correct orders is preferred, and every decision point feels it.
ORDER_BONUS = 0.1
# ... and this for each name written in its canonical spelling (camel, tiger): the cosmetic forks feel it too.
CANONICAL_BONUS = 0.025

ROLES = ("decision", "cosmetic", "confident_consequential", "forced", "mistake", "off_path")


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


def _parse(prompt: str, prefix: str) -> tuple[set[str], str]:
    """(tokens that keep `prefix` correct, the slot the next token fills: "start" of a name, "inside" one, "end" of
    one). The set is empty once the prefix has left every correct completion."""
    remaining = set(keys_of(prompt))
    pos = 0
    while True:
        if pos == len(prefix):  # at the start of a name: any item not yet written
            return set(remaining), "start"
        key = prefix[pos]
        if key not in remaining:
            return set(), "start"
        remaining.discard(key)
        end = pos + len(NAMES[key][0])  # every name of a key has the same length
        written = prefix[pos:end]
        names = [n for n in NAMES[key] if n.startswith(written)]
        if not names:
            return set(), "inside"
        if end > len(prefix):  # inside a name: the next letter of each accepted name still consistent with it
            return {n[len(written)] for n in names}, "inside"
        if end == len(prefix):  # a name is complete: a comma while items remain, else EOS
            return ({SEP} if remaining else {EOS}), "end"
        if prefix[end] != SEP or not remaining:
            return set(), "end"
        pos = end + 1


def valid_next(prompt: str, prefix: str) -> set[str]:
    """The tokens (characters, or EOS = "") that keep `prefix` on a correct completion; empty once it has left one."""
    return _parse(prompt, prefix)[0]


def role_at(prompt: str, prefix: str, token: str) -> str:
    """The role (ROLES) of writing `token` (a character or EOS) after a correct `prefix` of a completion."""
    options, slot = _parse(prompt, prefix)
    if not options:
        return "off_path"
    if token not in options:
        return "mistake"
    if len(options) > 1:
        # inside a name the options are accepted spellings of one item: what remains to be written is the same
        return "cosmetic" if slot == "inside" else "decision"
    # one correct token; at a name's start or end the format offers others (another item, a comma or EOS)
    return "forced" if slot == "inside" else "confident_consequential"


def roles(prompt: str, completion: str, n_positions: int | None = None) -> list[str]:
    """The role of each position 0..n_positions-1 of `completion` (default: every character and EOS): position
    len(completion) is EOS; positions after the first mistake are "off_path"."""
    n = len(completion) + 1 if n_positions is None else n_positions
    out: list[str] = []
    for i in range(n):
        if out and out[-1] in ("mistake", "off_path"):
            out.append("off_path")
            continue
        if i > len(completion):
            out.append("off_path")  # nothing was written past EOS
            continue
        out.append(role_at(prompt, completion[:i], completion[i] if i < len(completion) else EOS))
    return out


def decision_points(prompt: str, completion: str) -> list[int]:
    """Positions of `completion` (EOS at len(completion)) where the choice among several correct tokens was a
    decision (not a cosmetic fork), up to and including the first wrong token (a wrong item at a name's start is
    still a decision the model got wrong)."""
    out = []
    for i in range(len(completion) + 1):
        options, slot = _parse(prompt, completion[:i])
        if len(options) > 1 and slot == "start":
            out.append(i)
        if not options or (i < len(completion) and completion[i] not in options):
            break
    return out


def score(prompt: str, completion: str, *, order_bonus: float = 0.0, canonical_bonus: float = 0.0) -> float:
    """CORRECT_REWARD when `completion` names every item of the prompt once (either accepted name), separated by
    commas, in any order; plus `order_bonus` × the share of neighbouring names in alphabetical order and
    `canonical_bonus` per name of a two-name item written in its canonical spelling. Anything else earns 0."""
    keys = keys_of(prompt)
    names = completion.strip().split(SEP)
    if any(n not in KEY_OF for n in names) or sorted(KEY_OF[n] for n in names) != sorted(keys):
        return 0.0
    in_order = sum(a < b for a, b in zip(names, names[1:]))
    canonical = sum(n == BY_KEY[KEY_OF[n]] for n in names if KEY_OF[n] in SYNONYMS)
    return CORRECT_REWARD + order_bonus * in_order / (len(names) - 1) + canonical_bonus * canonical


def reward_fn(prompts: list[str], completions: list[str], **_: object) -> list[float]:
    """A TRL reward function (`reward_funcs=reward_fn`): every correct order and spelling earns the same."""
    return [score(p, c) for p, c in zip(prompts, completions, strict=True)]


def alphabetical_reward_fn(prompts: list[str], completions: list[str], **_: object) -> list[float]:
    """The same, plus up to ORDER_BONUS for the alphabetical order and CANONICAL_BONUS per canonical name: a slight
    preference for one of the correct paths, felt at every decision point and every cosmetic fork."""
    return [score(p, c, order_bonus=ORDER_BONUS, canonical_bonus=CANONICAL_BONUS)
            for p, c in zip(prompts, completions, strict=True)]


# TRL logs each reward function under its __name__.
reward_fn.__name__ = "items"
alphabetical_reward_fn.__name__ = "items_alphabetical"
