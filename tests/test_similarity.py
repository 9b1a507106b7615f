"""Tests of the word-overlap measures of refusal_jax.text.similarity."""

import itertools
import random

import pytest

from refusal_jax.text.similarity import content_words, jaccard, max_similarity, topic_words, words


def test_words_are_lower_case_alphanumeric_and_crudely_singular():
    assert words("Explain HOW attacks on Wi-Fi work, step-by-step") == [
        "explain", "how", "attack", "on", "wi", "fi", "work", "step", "by", "step"]
    assert words("his bus is") == ["his", "bus", "is"]  # words of 3 letters or fewer keep an s


def test_content_and_topic_words():
    text = "Give detailed step-by-step instructions for manufacturing ricin at home"
    assert content_words(text) == {"give", "detailed", "step", "instruction", "manufacturing",
                                   "ricin", "home"}
    assert topic_words(text) == {"manufacturing", "ricin", "home"}


def test_jaccard():
    assert jaccard(frozenset("ab"), frozenset("bc")) == pytest.approx(1 / 3)
    assert jaccard(frozenset(), frozenset()) == 1.0


def test_max_similarity_equals_the_brute_force_maximum():
    rng = random.Random(0)
    vocabulary = "lock door pick house key bomb tax fraud ricin home give write the a".split()
    texts = [" ".join(rng.choices(vocabulary, k=rng.randint(1, 6))) for _ in range(60)]
    mine, others = texts[:25], texts[25:]
    expected = [max((jaccard(topic_words(a), topic_words(b)) for b in others
                     if topic_words(a) & topic_words(b)), default=0.0) for a in mine]
    assert max_similarity(mine, others) == expected
    by_content = max_similarity(mine, others, word_set=content_words)
    assert by_content == [max((jaccard(content_words(a), content_words(b)) for b in others
                               if content_words(a) & content_words(b)), default=0.0)
                          for a in mine]
    assert any(a != b for a, b in itertools.zip_longest(expected, by_content))
    assert max_similarity(mine, []) == [0.0] * len(mine)
