"""What A1111 users rely on beyond txt2img itself: seamless tiling (measured at the seam) and prompt styles (through\nwebuiapi: tests/test_compat.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tolerance import LEVELS

from sdserve.schema import JobRequest
from sdserve.styles import StyleBook, merge, parse


def seams(image) -> tuple[float, float]:
    """(how far the picture jumps across its wrap-around seams, left-right and top-bottom, against how far it
    moves between neighbouring pixels inside): 1 for a picture that continues across its edges."""
    px = np.asarray(image, dtype=float)
    inside = (np.abs(np.diff(px, axis=1)).mean() + np.abs(np.diff(px, axis=0)).mean()) / 2
    return np.abs(px[:, 0] - px[:, -1]).mean() / inside, np.abs(px[0] - px[-1]).mean() / inside


def test_a_tiled_picture_continues_across_its_edges(engine):
    """The same seeds, tiled and not (the tiny test model draws textures, so every column differs from the next):
    tiled, the jump across the wrap-around seam is an ordinary step between neighbouring pixels; untiled, it is
    larger (measured over 8 seeds: 0.95 against 1.17, averaged over both axes)."""

    def draw(tiling: bool) -> list:
        requests = [JobRequest(prompt="a red circle", steps=8, seed=seed, tiling=tiling) for seed in range(8)]
        return [r[0] for r in engine.run(requests)]

    tiled, plain = draw(True), draw(False)
    tiled_seams = np.mean([seams(g.image) for g in tiled])
    plain_seams = np.mean([seams(g.image) for g in plain])
    assert tiled_seams < 1.05 and plain_seams > tiled_seams + 0.12, (tiled_seams, plain_seams)
    assert all(g.route.fallback == "tiling" for g in tiled) or tiled[0].route.engine == "torch"
    assert "Tiling: True" in tiled[0].infotext and "Tiling" not in plain[0].infotext


def test_tiling_is_its_own_batch():
    from sdserve.engine.pipeline import batch_key

    assert batch_key(JobRequest(prompt="a", tiling=True)) != batch_key(JobRequest(prompt="a"))


def test_styles_merge_as_a1111_merges_them(tmp_path: Path):
    assert merge("{prompt}, oil painting", "a cat") == "a cat, oil painting"
    assert merge("oil painting", "a cat") == "a cat, oil painting"
    assert merge("oil painting", "") == "oil painting" and merge("", "a cat") == "a cat"
    styles = parse('name,prompt,negative_prompt\nink,"{prompt}, ink","smudge"\n\n,skipped,\n')
    assert list(styles) == ["ink"]
    book = StyleBook([tmp_path / "models", tmp_path])
    assert book.all() == {} and book.path() is None
    (tmp_path / "styles.csv").write_text("name,prompt,negative_prompt\nink,\"{prompt}, ink\",smudge\n")
    assert book.apply(["ink", "ink"], "a cat", "") == ("a cat, ink, ink", "smudge, smudge")
    with pytest.raises(KeyError, match="no style 'pen'; styles: ink"):
        book.apply(["pen"], "a cat", "")


def test_variation_seeds_lean_from_the_seed_toward_the_subseed(engine):
    """subseed_strength 0 is the seed's own picture, 1 the subseed's, and between them a picture between the two;
    seed_resize_from keeps a seed's composition at another size. Rows without variation draw exactly what they did."""

    def draw(**fields) -> np.ndarray:
        [[image]] = engine.run([JobRequest(**{"prompt": "a red circle", "steps": 6, "seed": 11, "sampler": "Euler",
                                              **fields})])
        return np.asarray(image.image, dtype=float)

    own, other = draw(), draw(seed=99)
    assert np.array_equal(draw(subseed=99, subseed_strength=0.0), own)
    full = draw(subseed=99, subseed_strength=1.0)
    assert np.abs(full - other).mean() < 1.0, np.abs(full - other).mean()  # the subseed's picture (Euler adds no noise)
    half = draw(subseed=99, subseed_strength=0.5)
    d_own, d_other = np.abs(half - own).mean(), np.abs(half - other).mean()
    assert d_own > 2 and d_other > 2, (d_own, d_other)  # neither picture: between them
    # the variation is per row: in one batch, a plain row next to a varied one draws what it draws alone
    plain, varied = engine.run([JobRequest(prompt="a red circle", steps=6, seed=11, sampler="Euler"),
                                JobRequest(prompt="a red circle", steps=6, seed=11, sampler="Euler", subseed=99,
                                           subseed_strength=0.5)])
    # (the same up to a batch's float rounding: tolerance.LEVELS)
    assert np.abs(np.asarray(plain[0].image, dtype=float) - own).max() <= LEVELS
    assert "Variation seed: 99, Variation seed strength: 0.5" in varied[0].infotext
    # the 64x64 seed's noise, centred in a 128x64 picture: its middle keeps the 64x64 picture's composition
    wide = draw(width=128, seed_resize_from_w=64, seed_resize_from_h=64)
    plain_wide = draw(width=128)
    middle = slice(32 + 8, 96 - 8)
    assert np.abs(wide[8:-8, middle] - own[8:-8, 8:-8]).mean() < np.abs(plain_wide[8:-8, middle] - own[8:-8, 8:-8]).mean()
