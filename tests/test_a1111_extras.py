"""What A1111 users rely on beyond txt2img itself: seamless tiling (measured at the seam) and prompt styles (through\nwebuiapi: tests/test_compat.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

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
