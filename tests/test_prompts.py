"""Prompts as A1111 reads them: the emphasis grammar (checked against A1111's own examples), chunking past 77
tokens, clip skip, and per-image guidance in a batch; each on the tiny engine's pixels."""

from __future__ import annotations

import numpy as np
import pytest
import tolerance

from sdserve.demo.train import clip_tokenizer
from sdserve.engine import prompts
from sdserve.engine.prompts import parse_attention
from sdserve.schema import JobRequest


# ---------------------------------------------------------------- the grammar: A1111's doctests
@pytest.mark.parametrize("text, expected", [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
])
def test_parser_matches_a1111_examples(text, expected):
    assert parse_attention(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("(a:1.0)", [("a", 1.0)]),
    ("((word))", [("word", 1.1 * 1.1)]),
    ("[word]", [("word", 1 / 1.1)]),
    ("(word: 1.3 )", [("word", 1.3)]),  # A1111 allows spaces around the weight
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("a:b", [("a:b", 1.0)]),
    ("(a:1.2.3)", [("a:1.2.3)", 1.1)]),  # not a weight: text, bracket left open (A1111 raises)
    ("", [("", 1.0)]),
    ("\\\\", [("\\", 1.0)]),
])
def test_parser_edge_cases(text, expected):
    got = parse_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])


# ---------------------------------------------------------------- chunking, with one token per word
@pytest.fixture(scope="module")
def words():
    return clip_tokenizer(["a", "b", "c"])


def chunks_of(tokenizer, text):
    encoder = prompts.PromptEncoder(tokenizer, text_encoder=None)
    return encoder.chunks(text)


def test_short_prompt_is_one_chunk_of_77(words):
    (only,) = chunks_of(words, "a b")
    ids = words(["a", "b"], add_special_tokens=False)["input_ids"]
    assert only.tokens[:4] == [words.bos_token_id, ids[0][0], ids[1][0], words.eos_token_id]
    assert len(only.tokens) == len(only.weights) == 77


def test_long_prompt_is_chunked_not_truncated(words):
    got = chunks_of(words, " ".join(["a"] * 100 + ["c"]))
    assert len(got) == 2 and all(len(c.tokens) == 77 for c in got)
    c = words.convert_tokens_to_ids("c</w>")
    assert c in got[1].tokens


def test_break_starts_a_new_chunk_and_weights_follow_their_tokens(words):
    first, second = chunks_of(words, "a BREAK (b:1.5)")
    b = words.convert_tokens_to_ids("b</w>")
    assert b not in first.tokens and second.tokens[1] == b and second.weights[1] == 1.5


def test_a_full_chunk_moves_the_words_after_its_last_comma(words):
    first, second = chunks_of(words, " ".join(["a"] * 70) + ", " + " ".join(["b"] * 10))
    a, b, comma = (words.convert_tokens_to_ids(t) for t in ("a</w>", "b</w>", ",</w>"))
    body = first.tokens[1:76]
    assert body[:71] == [a] * 70 + [comma] and b not in body  # the b's after the comma moved on together
    assert second.tokens[1:11] == [b] * 10


# ---------------------------------------------------------------- pixels, on the tiny engine
def pixels(engine, **fields):
    request = JobRequest(seed=7, steps=4, **{"prompt": "a red circle", **fields})
    return engine.run([request])[0][0].pixels


def test_unit_weight_equals_plain_text(engine):
    assert np.array_equal(pixels(engine, prompt="(a:1.0) red circle"), pixels(engine, prompt="a red circle"))


def test_emphasis_changes_the_picture(engine):
    assert np.abs(pixels(engine, prompt="a (red:1.5) circle") - pixels(engine, prompt="a red circle")).max() > 1e-3


def test_words_past_token_77_change_the_picture(engine):
    # The tiny tokenizer has one token per byte: the two prompts differ only after token 100.
    base = "x" * 100
    assert np.abs(pixels(engine, prompt=base + " red") - pixels(engine, prompt=base + " blue")).max() > 1e-3


def test_clip_skip_2_differs_from_1(engine):
    assert np.abs(pixels(engine, clip_skip=2) - pixels(engine, clip_skip=1)).max() > 1e-3


def test_per_image_guidance_in_one_batch_equals_each_alone(engine):
    jobs = [JobRequest(prompt="a red circle", seed=3, steps=4, cfg_scale=cfg) for cfg in (2.0, 7.0, 13.5)]
    together = engine.run(jobs)
    for job, batched in zip(jobs, together):
        alone = engine.run([job])[0][0]
        assert np.abs(batched[0].pixels - alone.pixels).max() <= tolerance.FLOAT
        assert f"CFG scale: {job.cfg_scale:g}" in batched[0].infotext
    assert np.abs(together[0][0].pixels - together[2][0].pixels).max() > 1e-3  # and the scales did differ
