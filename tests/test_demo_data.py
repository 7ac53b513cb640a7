"""The demo model's world (demo_data) and its tokenizer (train_demo): pure logic, no model."""

from __future__ import annotations

import random

from sdserve.demo import data as demo_data
from sdserve.demo.data import Scene
from sdserve.demo.train import clip_tokenizer


def test_the_reader_reads_the_generators_pictures():
    rng = random.Random(3)
    scenes = [demo_data.random_scene(rng) for _ in range(300)]
    pictures = [demo_data.draw(s, (rng.uniform(-3, 3), rng.uniform(-3, 3))) for s in scenes]
    figures = demo_data.adherence(scenes, [demo_data.read(p) for p in pictures])
    assert figures["mean"] >= 0.99 and min(figures.values()) >= 0.98, figures


def test_the_reader_finds_nothing_on_a_plain_picture():
    from PIL import Image

    reading = demo_data.read(Image.new("RGB", (64, 64), demo_data.COLOURS["grey"]))
    assert (reading.background, reading.colour, reading.shape) == ("grey", None, None)
    assert reading.share["grey"] == 1.0


def test_drawing_is_deterministic_and_places_the_shape_in_its_region():
    scene = Scene("red", "triangle", "small", "right", "blue")
    assert demo_data.draw(scene).tobytes() == demo_data.draw(scene).tobytes()
    reading = demo_data.read(demo_data.draw(scene))
    assert (reading.colour, reading.shape, reading.region, reading.background) == ("red", "triangle", "right", "blue")


def test_captions_describe_the_scene_in_the_vocabulary_mostly_whole_sometimes_one_part():
    rng = random.Random(0)
    forms, named, fragments, regions = set(), 0, 0, 0
    for _ in range(2000):
        scene = demo_data.random_scene(rng)
        caption = demo_data.caption(scene, rng)
        words = caption.replace(",", "").split()
        assert set(words) <= set(demo_data.WORDS), caption
        scene_words = {scene.colour, scene.shape, scene.size, scene.background, *demo_data.REGIONS[scene.region][0].split()}
        assert set(words) - {"a", "on", "background", "shape"} <= scene_words, (caption, scene)  # nothing untrue
        named += scene.colour in words and scene.shape in words
        fragments += len(words) <= 3
        regions += demo_data.REGIONS[scene.region][0] in caption
        forms.add(caption.split()[0] if words else "")
    assert len(forms) > 5  # reworded, not one template
    assert 0.65 < named / 2000 < 0.8  # colour and shape each kept 90% of the full captions, 85% of all
    assert 0.12 < fragments / 2000 < 0.3  # one part alone ("red", "a circle", "on the left"): 15%, plus short ones
    assert 0.7 < regions / 2000 < 0.85  # the region kept 90% of the full captions

    def captions(seed):
        r = random.Random(seed)
        return [demo_data.caption(demo_data.random_scene(r), r) for _ in range(20)]

    assert captions(1) == captions(1) != captions(2)


def test_prompt_is_the_grammar_in_full():
    scene = Scene("green", "star", "large", "top", "black")
    assert demo_data.prompt(scene) == "a large green star at the top on a black background"


def test_test_scenes_cover_every_colour_and_shape_pairing_once():
    scenes = demo_data.test_scenes(50)
    assert len({(s.colour, s.shape) for s in scenes}) == 50
    assert all(s.colour != s.background for s in scenes)
    assert scenes == demo_data.test_scenes(50)


def test_tokenizer_makes_each_vocabulary_word_one_token_and_still_reads_anything():
    tokenizer = clip_tokenizer(demo_data.WORDS)
    assert tokenizer.model_max_length == 77
    for word in demo_data.WORDS:
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    ids = tokenizer("a red circle, on a BLUE background!").input_ids
    assert len(ids) == 2 + 8 + 1  # bos, eight words, "!" as one byte, eos (CLIP lower-cases)
    assert len(tokenizer("zebra", add_special_tokens=False).input_ids) == 5  # unknown words fall back to bytes
    assert tokenizer.get_vocab() == clip_tokenizer(demo_data.WORDS).get_vocab()
