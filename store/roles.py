"""Functional roles of tokens: which kind of text a forking token is.

Reasoning-chain studies rank tokens by the role they play: symbolic computation is kept, grammar and
meta-discourse ("wait", "so", "let me") are pruned first. Which roles keep their forks as RL training goes on is
the question this module lets the store answer. Pure Python (no torch): the writer stores a role per vocabulary
entry, and every reader (SQL, dashboard) groups by that column.

Rules, applied to one token's text in this order (the first that matches wins):

1. **Normalise.** Byte-level BPE markers become what they encode: ``Ġ`` and ``▁`` (SentencePiece) a space, ``Ċ`` a
   newline, ``ĉ`` a tab. Decoded text (``" the"``) needs no change. The text is then stripped of surrounding
   whitespace; the leading space of a BPE word says nothing about its role.
2. **formatting**: nothing left (spaces, newlines, tabs); a special token (``<s>``, ``</s>``, ``<|im_end|>``,
   ``<pad>``); markdown markup only: ``#``, `````, ``_``, ``~``, ``>``, or two or more ``*`` / three or more ``-``.
3. **number**: digits, optionally with a leading sign, decimal/thousands separators and a trailing ``%``
   (``7``, ``42``, ``3.14``, ``1,000``, ``-5``, ``50%``), any Unicode numeric character (``½``).
4. **operator** (operator or formula): only operator characters (``+ - * / = < > ^ ( ) [ ] { } % | \\ $``, and any
   Unicode math symbol such as ``≤ × ÷ √ ∑``), optionally with digits and spaces (``+``, ``=5``, ``2*3``,
   ``)^``); or a LaTeX command (``\\frac``, ``\\times``, ``\\(``). A single ``*`` or ``-`` is an operator (the
   demo's ``3*4``, ``7-2``).
5. **connective** (connective and meta-discourse): the lower-cased word, with trailing punctuation removed, is one
   of `CONNECTIVES` (``wait``, ``so``, ``but``, ``therefore``, ``hmm``, ``first``, ``then``, ``let``, …). A phrase
   split over tokens is classified by the token that carries its role: ``let`` in "let me", ``so`` in "so that".
6. **grammar** (grammar and function words): the lower-cased word is one of `FUNCTION_WORDS` (articles,
   pronouns, prepositions, auxiliaries, ``and``/``or``/``not``), or the token is punctuation only
   (``.``, ``,``, ``:``, ``;``, ``?``, ``!``, quotes). A one-letter word (``a``, ``I``) counts only with its
   leading space or marker (``Ġa``, `` I``): without one it is a letter of a character vocabulary or a piece of a
   word.
7. **other**: everything else (content words, sub-word pieces, single letters, mixed text).

Character-level tokens fall out of the same rules: a digit is a number, ``+`` an operator, a space or newline
formatting, ``.`` grammar, a letter other (rule 6 needs a leading space for one-letter words, and in a
character vocabulary the space is a token of its own).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from functools import lru_cache

ROLES = ("number", "operator", "connective", "grammar", "formatting", "other")

_CONNECTIVE_WORDS = """
    wait so but therefore thus hence however hmm hm um uh first firstly second secondly then next finally lastly
    let alternatively actually because since now okay ok well perhaps maybe instead again also although though
    yet still otherwise meanwhile anyway consequently furthermore moreover additionally similarly oh ah right
    check verify recall note notice suppose assume consider remember double-check
"""
CONNECTIVES = frozenset(_CONNECTIVE_WORDS.split())

_FUNCTION_WORDS = """
    a an the this that these those it its it's i me my we us our you your he him his she her they them their
    is are was were be been being am do does did done has have had having will would shall should can could may
    might must of to in on at by for from with without into onto about as than like over under between through
    and or nor not no yes if whether which who whom whose what when where why how all each every some any both
    either neither there here very just only too
"""
FUNCTION_WORDS = frozenset(_FUNCTION_WORDS.split())

_MARKERS = str.maketrans({"Ġ": " ", "▁": " ", "Ċ": "\n", "ĉ": "\t"})
_SPECIAL = re.compile(r"^<\|?[^<>\s]*\|?>$")  # <s>, </s>, <pad>, <|im_end|>, <|endoftext|>
_MARKUP = re.compile(r"^(?:[#`_~>]+|\*{2,}|-{3,})$")
_NUMBER = re.compile(r"^[+-]?\d[\d.,]*%?$")
_OPERATOR_CHARS = frozenset("+-*/=<>^()[]{}%|\\$")
_LATEX = re.compile(r"^\\(?:[A-Za-z]+|[()\[\]{}])$")
_PUNCTUATION = frozenset(".,:;?!'\"`…“”‘’")


def normalize(text: str) -> str:
    """The token's text with byte-level BPE / SentencePiece markers decoded and surrounding whitespace stripped."""
    return text.translate(_MARKERS).strip()


def _leading_space(text: str) -> bool:
    return text.translate(_MARKERS)[:1].isspace()


def _is_operator_char(ch: str) -> bool:
    return ch in _OPERATOR_CHARS or unicodedata.category(ch) == "Sm"


@lru_cache(maxsize=1 << 18)
def role_of(text: str | None) -> str:
    """The functional role (one of `ROLES`) of one token's text, raw BPE form or decoded. None counts as ""."""
    s = normalize(text or "")
    if not s or _SPECIAL.match(s) or _MARKUP.match(s):
        return "formatting"
    if _NUMBER.match(s) or (len(s) == 1 and s.isnumeric()):
        return "number"
    if _LATEX.match(s):
        return "operator"
    if any(_is_operator_char(c) for c in s) and all(_is_operator_char(c) or c.isdigit() or c == " " for c in s):
        return "operator"
    if all(c in _PUNCTUATION for c in s):
        return "grammar"
    word = s.lower().rstrip("".join(_PUNCTUATION))
    if word in CONNECTIVES:
        return "connective"
    if word in FUNCTION_WORDS and (len(word) > 1 or _leading_space(text or "")):
        return "grammar"
    return "other"


def roles_of(texts: Iterable[str | None]) -> list[str]:
    """`role_of` of each text, in order."""
    return [role_of(t) for t in texts]
