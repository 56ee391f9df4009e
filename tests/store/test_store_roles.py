"""store/roles.py: each rule on byte-level BPE, SentencePiece, decoded and character tokens."""

from __future__ import annotations

import pytest
from forkwatch.store.roles import CONNECTIVES, FUNCTION_WORDS, ROLES, normalize, role_of, roles_of


@pytest.mark.parametrize("text", ["7", "42", "Ġ42", " 3.14", "1,000", "-5", "50%", "▁2026", "½"])
def test_numbers_are_number(text):
    assert role_of(text) == "number"


@pytest.mark.parametrize("text", ["+", "-", "*", "/", "=", "(", ")", "Ġ=", " +", "=5", "2*3", ")^", "≤", "×", "√",
                                  "\\frac", "\\times", "\\(", "$", " \\cdot"])
def test_operators_and_formula_pieces_are_operator(text):
    assert role_of(text) == "operator"


@pytest.mark.parametrize("text", ["Wait", "Ġwait", "▁So", " so", "But", "Ġtherefore", "hmm", "Ġfirst", " Then",
                                  "Let", "Ġlet", "wait,", "Hmm...", "ĠAlternatively", " verify"])
def test_connectives_and_meta_discourse_are_connective(text):
    assert role_of(text) == "connective"


@pytest.mark.parametrize("text", ["Ġthe", " a", "▁of", "is", "ĠWe", " and", "me", ".", ",", ":", ";", "?", "!", "'",
                                  "\"", ".,"])
def test_function_words_and_punctuation_are_grammar(text):
    assert role_of(text) == "grammar"


@pytest.mark.parametrize("text", ["", " ", "Ġ", "Ċ", "ĊĊ", "\n", "\t", "ĉ", "<s>", "</s>", "<pad>", "<|im_end|>",
                                  "##", "####", "**", "---", "`", None])
def test_whitespace_markup_and_special_tokens_are_formatting(text):
    assert role_of(text) == "formatting"


@pytest.mark.parametrize("text", ["Ġapples", " number", "ing", "x", "Q", "Ġx^", "re-do", "ĠPaul"])
def test_content_words_pieces_and_letters_are_other(text):
    assert role_of(text) == "other"


def test_char_level_vocabulary_gets_digit_operator_space_punctuation_letter_roles():
    # the demo's character tokenizer: one token per character
    assert roles_of(["3", "+", " ", "\n", ".", "a", "#"]) == [
        "number", "operator", "formatting", "formatting", "grammar", "other", "formatting"
    ]


def test_one_letter_word_needs_its_leading_space_to_be_grammar():
    assert role_of("Ġa") == role_of(" I") == "grammar"
    assert role_of("a") == role_of("I") == "other"


def test_bpe_marker_and_decoded_leading_space_give_the_same_role():
    for word in ("wait", "42", "=", "apple"):
        assert role_of("Ġ" + word) == role_of(" " + word) == role_of("▁" + word) == role_of(word)
    assert role_of("Ġthe") == role_of(" the") == role_of("▁the") == role_of("the") == "grammar"


def test_normalize_decodes_byte_level_markers():
    assert normalize("ĠĊ") == ""
    assert normalize("Ġwait") == "wait"
    assert normalize("▁So") == "So"


def test_every_role_is_reachable_and_word_lists_do_not_overlap():
    assert set(roles_of(["1", "+", "wait", "the", " ", "apple"])) == set(ROLES)
    assert not CONNECTIVES & FUNCTION_WORDS
