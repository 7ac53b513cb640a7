"""Prompts as A1111 reads them: prompt editing and alternation and the emphasis grammar (both checked against
A1111's own examples), chunking past 77 tokens, clip skip, and per-image guidance in a batch; each on the tiny
engine's pixels."""

from __future__ import annotations

import numpy as np
import pytest
import tolerance

from sdserve.demo.train import clip_tokenizer
from sdserve.engine import prompts
from sdserve.engine.prompts import parse_attention, schedule
from sdserve.schema import Hires, JobRequest


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


# ---------------------------------------------------------------- prompt editing: A1111's doctests
def alternating(a, b, steps=10):
    return [(i, a if i % 2 else b) for i in range(1, steps + 1)]


@pytest.mark.parametrize("text, expected", [
    ("test", [(10, "test")]),
    ("a [b:3]", [(3, "a "), (10, "a b")]),
    ("a [b: 3]", [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", [(10, "a [unbalanced")]),
    ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
    ("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", alternating("a", "(b:1.1)")),
    ("[fe|]male", alternating("female", "male")),
    ("[fe|||]male", [(i, "female" if i % 4 == 1 else "male") for i in range(1, 11)]),
    # and the issue's: from/to at a fraction, to at a step, from until a step, nested in emphasis
    ("[from:to:0.3]", [(3, "from"), (10, "to")]),
    ("[to:1]", [(1, ""), (10, "to")]),
    ("[from::2]", [(2, "from"), (10, "")]),
    ("(a [red:blue:0.5] cat:1.2)", [(5, "(a red cat:1.2)"), (10, "(a blue cat:1.2)")]),
    ("[red:blue:0]", [(10, "blue")]),  # a switch at step 0 is the plain prompt
    ("[red:blue:99]", [(10, "red")]),
    # outside the grammar, the prompt is plain text, as A1111 reads it
    ("a|b [c:d:0.5]", [(10, "a|b [c:d:0.5]")]),
    ("[a|b:0.5]", [(10, "[a|b:0.5]")]),
    ("\\[a:b:1\\]", [(10, "\\[a:b:1\\]")]),
])
def test_schedule_matches_a1111(text, expected):
    assert schedule(text, 10) == expected


def test_a_hires_pass_counts_on_from_the_first():
    assert schedule("a [b:.5] c", 10, first_pass_steps=10) == [(10, "a b c")]
    assert schedule("a [b:1.5] c", 10, first_pass_steps=10) == [(5, "a  c"), (10, "a b c")]
    assert schedule("[x:y:13]", 10, first_pass_steps=10) == [(3, "x"), (10, "y")]


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


# ---------------------------------------------------------------- prompt editing on the tiny engine
def unet_prompts(engine, jobs):
    """Run `jobs` as one batch: the conditioning of every UNet call, and the results."""
    pipe = engine.registry.load(None).pipelines["txt2img"]
    calls = []
    handle = pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs["encoder_hidden_states"].clone()), with_kwargs=True)
    try:
        results = engine.run(jobs)
    finally:
        handle.remove()
    return calls, results


def named(calls, candidates, engine, rows):
    """For every UNet call, each row's conditional text as the plain prompt it is (of `candidates`)."""
    pipe = engine.registry.load(None).pipelines["txt2img"]
    encoded = {c: prompts.conditioning(pipe, [c], [""])["prompt_embeds"][0] for c in candidates}
    out = []
    for z in calls:
        conditional = z[len(z) // 2:] if len(z) == 2 * rows else z  # guided: the negative half first
        out.append(tuple(closest(row, encoded) for row in conditional))
    return out


def closest(z, encoded):
    """Which of the encoded prompts `z` is: the nearest, and near enough to be it."""
    name = min(encoded, key=lambda c: (z - encoded[c]).abs().max())
    assert (z - encoded[name]).abs().max() <= tolerance.FLOAT, "no candidate prompt is this conditioning"
    return name


def test_prompt_editing_switches_after_the_step_a1111_switches_at(engine):
    calls, _ = unet_prompts(engine, [JobRequest(prompt="a [red:blue:0.5] circle", seed=1, steps=4)])
    # when = 0.5 * 4 = 2: steps 0, 1 and 2 read "red", step 3 "blue" (A1111: step s uses the first entry ending >= s)
    assert named(calls, ["a red circle", "a blue circle"], engine, 1) == [("a red circle",)] * 3 + [("a blue circle",)]


def test_alternation_and_editing_share_one_pass_row_by_row(engine):
    jobs = [JobRequest(prompt="a [red|blue] circle", seed=1, steps=4),
            JobRequest(prompt="a [red:blue:1] circle", seed=2, steps=4, cfg_scale=5)]
    calls, together = unet_prompts(engine, jobs)
    red, blue = "a red circle", "a blue circle"
    assert named(calls, [red, blue], engine, 2) == [(red, red), (red, red), (blue, blue), (red, blue)]
    for job, batched in zip(jobs, together):
        assert np.abs(batched[0].pixels - engine.run([job])[0][0].pixels).max() <= tolerance.FLOAT


def test_a_switch_at_step_0_is_the_plain_prompt(engine):
    assert np.array_equal(pixels(engine, prompt="a [red:blue:0] circle"), pixels(engine, prompt="a blue circle"))
    edited = pixels(engine, prompt="a [red:blue:1] circle")  # steps 0-1 "red": not the plain "blue" picture
    assert np.abs(edited - pixels(engine, prompt="a blue circle")).max() > 1e-3
    assert "a [red:blue:0.5] circle" in engine.run([JobRequest(prompt="a [red:blue:0.5] circle", seed=7,
                                                               steps=4)])[0][0].infotext


def test_negative_prompts_and_the_hires_pass_follow_their_schedules(engine):
    job = JobRequest(prompt="a circle", negative_prompt="[red:blue:0.25]", seed=1, steps=4,
                     hires=Hires(scale=1.5, steps=4, strength=1.0, prompt="a [red:blue:5] circle"))
    calls, _ = unet_prompts(engine, [job])
    assert len(calls) == 8
    pipe = engine.registry.load(None).pipelines["txt2img"]
    negative = {t: prompts.conditioning(pipe, ["x"], [t])["negative_prompt_embeds"][0] for t in ("red", "blue")}
    read = [closest(z[0], negative) for z in calls]
    # when = 0.25 * 4 = 1: steps 0 and 1 read "red"; in the hires pass, a fraction under 1 is already past
    assert read == ["red", "red", "blue", "blue"] + ["blue"] * 4
    red, blue = "a red circle", "a blue circle"
    # the hires pass's step number 5 counts from the first pass's start: its own step 1
    assert named(calls[4:], [red, blue], engine, 1) == [(red,), (red,), (blue,), (blue,)]


def test_a_second_order_sampler_counts_two_steps_a_step_as_a1111_does(engine):
    # Heun, 4 steps: A1111 counts 8 (one per model call), so 0.5 is its step 4: diffusers' 7 calls read "red" up
    # to call 4, then "blue"
    calls, _ = unet_prompts(engine, [JobRequest(prompt="a [red:blue:0.5] circle", seed=1, steps=4, sampler="Heun")])
    red, blue = "a red circle", "a blue circle"
    assert named(calls, [red, blue], engine, 1) == [(red,)] * 5 + [(blue,)] * 2


def test_a_prompt_nested_past_any_reason_is_plain_text():
    deep = "[" * 3000 + "a" + "]" * 3000
    assert schedule(deep, 10) == [(10, deep)]
    assert schedule("(" * 2000 + "[a:b:0.5]", 10)[0][0] == 5  # the editing still reads; the brackets are text
