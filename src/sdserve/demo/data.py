"""The demo model's world: captioned pictures of coloured shapes, made here, and the rules that read them back.

Grammar: `a [small|large] COLOUR SHAPE [on the left|on the right|at the top|at the bottom|in the middle]
[on a COLOUR background]`; any bracketed part may be left out (the picture then takes a random value), and
captions also come reworded ("red circle", "a circle, red"), so the text encoder learns words, not one template.

`draw` makes the picture of a `Scene`; `read` measures a picture: background colour, the shape's colour,
shape and region. Training uses the first; the tests and the README grid use the second on generated images.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64  # the demo model's native size

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 220, 30),
    "orange": (245, 140, 20),
    "purple": (140, 50, 190),
    "pink": (245, 130, 190),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "grey": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle", "star", "cross")
SIZES = {"small": 18, "large": 32}  # the shape's extent in pixels
# Region -> (phrase, centre as a fraction of the side).
REGIONS: dict[str, tuple[str, tuple[float, float]]] = {
    "left": ("on the left", (0.28, 0.5)),
    "right": ("on the right", (0.72, 0.5)),
    "top": ("at the top", (0.5, 0.28)),
    "bottom": ("at the bottom", (0.5, 0.72)),
    "middle": ("in the middle", (0.5, 0.5)),
}
WORDS = sorted({*COLOURS, *SHAPES, *SIZES, "a", "an", "on", "the", "at", "in", "background", "left", "right", "top",
                "bottom", "middle", "and", "with", "shape", "colour", "color", "picture", "of"})


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    size: str
    region: str
    background: str


def random_scene(rng: random.Random, **fixed: str) -> Scene:
    colour = fixed.get("colour") or rng.choice(list(COLOURS))
    background = fixed.get("background") or rng.choice([c for c in COLOURS if c != colour])
    return Scene(colour, fixed.get("shape") or rng.choice(SHAPES), fixed.get("size") or rng.choice(list(SIZES)),
                 fixed.get("region") or rng.choice(list(REGIONS)), background)


# ----- pictures ----------------------------------------------------------------------------------
def _outline(shape: str, cx: float, cy: float, extent: float) -> list[tuple[float, float]] | None:
    r = extent / 2
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "star":
        points = []
        for i in range(10):
            angle = -math.pi / 2 + i * math.pi / 5
            radius = r if i % 2 == 0 else r * 0.45
            points.append((cx + radius * math.cos(angle), cy + radius * 1.05 * math.sin(angle) + r * 0.1))
        return points
    if shape == "cross":
        a = r / 3
        return [(cx - a, cy - r), (cx + a, cy - r), (cx + a, cy - a), (cx + r, cy - a), (cx + r, cy + a),
                (cx + a, cy + a), (cx + a, cy + r), (cx - a, cy + r), (cx - a, cy + a), (cx - r, cy + a),
                (cx - r, cy - a), (cx - a, cy - a)]
    return None


def draw(scene: Scene, jitter: tuple[float, float] = (0.0, 0.0), size: int = SIZE) -> Image.Image:
    """The scene at `size` px; `jitter` moves the shape by up to a few pixels. Drawn 4x larger and reduced,
    so edges are antialiased as in a photograph rather than stair-stepped."""
    scale = 4
    side = size * scale
    image = Image.new("RGB", (side, side), COLOURS[scene.background])
    pen = ImageDraw.Draw(image)
    fx, fy = REGIONS[scene.region][1]
    cx, cy = (fx * size + jitter[0]) * scale, (fy * size + jitter[1]) * scale
    extent = SIZES[scene.size] * size / SIZE * scale
    fill = COLOURS[scene.colour]
    outline = _outline(scene.shape, cx, cy, extent)
    r = extent / 2
    if scene.shape == "circle":
        pen.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif scene.shape == "square":
        pen.rectangle([cx - r * 0.9, cy - r * 0.9, cx + r * 0.9, cy + r * 0.9], fill=fill)
    else:
        pen.polygon(outline, fill=fill)
    return image.resize((size, size), Image.LANCZOS)


# ----- captions ----------------------------------------------------------------------------------
def prompt(scene: Scene) -> str:
    """The scene in the grammar, every part stated: `a large red circle on the left on a blue background`."""
    return f"a {scene.size} {scene.colour} {scene.shape} {REGIONS[scene.region][0]} on a {scene.background} background"


def caption(scene: Scene, rng: random.Random, keep: float = 0.6, region_keep: float = 0.9,
            fragment: float = 0.15) -> str:
    """A caption of the scene in one of several phrasings. Size and background are each kept with probability
    `keep` (the picture has them anyway: the model learns what an omitted part may be), the region with
    `region_keep` (where a shape is takes the most showing to learn), colour and shape with 0.9. A `fragment`
    of captions name one part alone ("red", "a circle", "on the left"), so that any short text, a negative
    prompt especially, means what it says instead of derailing the model."""
    if rng.random() < fragment:
        return rng.choice([scene.colour, f"a {scene.shape}", scene.shape, f"{scene.size} shape",
                           REGIONS[scene.region][0], f"{scene.background} background"])
    colour = scene.colour if rng.random() < 0.9 else None
    shape = scene.shape if rng.random() < 0.9 else None
    size = scene.size if rng.random() < keep else None
    region = REGIONS[scene.region][0] if rng.random() < region_keep else None
    background = scene.background if rng.random() < keep else None
    thing = " ".join(filter(None, [size, colour, shape or ("shape" if colour or size else None)]))
    a_thing = "a " + thing if thing else None
    form = rng.randrange(6)
    if form == 0:  # the grammar itself
        parts = [a_thing, region, f"on a {background} background" if background else None]
    elif form == 1:  # no article
        parts = [thing, region, f"on a {background} background" if background else None]
    elif form == 2 and colour and shape:  # "a circle, red"
        parts = [f"a {' '.join(filter(None, [size, shape]))}, {colour}", region,
                 f"{background} background" if background else None]
    elif form == 3:  # background first
        parts = [f"{background} background," if background else None, a_thing, region]
    elif form == 4:  # region first
        parts = [region, a_thing, f"on {background}" if background else None]
    else:
        parts = [thing, f"on a {background} background" if background else None, region]
    return " ".join(p for p in parts if p)


# ----- reading a picture back --------------------------------------------------------------------
_PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)
_NAMES = list(COLOURS)


def _template(shape: str, n: int = 32) -> np.ndarray:
    """The shape's mask filling an n x n box (what a bounding box crop of a drawn shape looks like)."""
    scene = Scene("white", shape, "large", "middle", "black")
    big = np.asarray(draw(scene, size=128).convert("L"), dtype=np.float32) > 128
    ys, xs = np.nonzero(big)
    crop = big[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    return np.asarray(Image.fromarray(crop.astype(np.uint8) * 255).resize((n, n), Image.BILINEAR)) > 127


_TEMPLATES: dict[str, np.ndarray] = {}


@dataclass
class Reading:
    background: str
    colour: str | None  # the dominant non-background colour; None if nothing stands out
    shape: str | None
    region: str | None
    share: dict[str, float]  # fraction of all pixels nearest each palette colour


def read(image: Image.Image) -> Reading:
    """Measure a picture: the background is the commonest colour on the border; the shape is every pixel far
    from it (its largest part); its shape is the template its bounding box matches best (IoU); its region is
    the named centre nearest its centroid."""
    pixels = np.asarray(image.convert("RGB").resize((SIZE, SIZE)), dtype=np.float32)
    names = np.argmin(((pixels[:, :, None, :] - _PALETTE[None, None]) ** 2).sum(axis=3), axis=2)
    share = {name: float((names == i).mean()) for i, name in enumerate(_NAMES)}
    border = np.concatenate([names[0], names[-1], names[:, 0], names[:, -1]])
    background_index = int(np.bincount(border, minlength=len(_NAMES)).argmax())
    background = _NAMES[background_index]
    distance = np.sqrt(((pixels - _PALETTE[background_index]) ** 2).sum(axis=2))
    mask = distance > 60
    if mask.sum() < 12:
        return Reading(background, None, None, None, share)
    colour = _NAMES[int(np.bincount(names[mask], minlength=len(_NAMES)).argmax())]
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    resized = np.asarray(Image.fromarray(crop.astype(np.uint8) * 255).resize((32, 32), Image.BILINEAR)) > 127
    if not _TEMPLATES:
        _TEMPLATES.update({s: _template(s) for s in SHAPES})
    ious = {s: (resized & t).sum() / max(1, (resized | t).sum()) for s, t in _TEMPLATES.items()}
    shape = max(ious, key=ious.get)
    cx, cy = xs.mean() / SIZE, ys.mean() / SIZE
    region = min(REGIONS, key=lambda r: (REGIONS[r][1][0] - cx) ** 2 + (REGIONS[r][1][1] - cy) ** 2)
    return Reading(background, colour, shape, region, share)


# ----- scoring samples ---------------------------------------------------------------------------
def test_scenes(count: int, seed: int = 12) -> list[Scene]:
    """`count` scenes that cycle through every colour and shape, the rest drawn from the seed: the prompts the
    tests and bench/demo_model.py score the model on."""
    rng = random.Random(seed)
    colours, shapes = list(COLOURS), list(SHAPES)
    return [random_scene(rng, colour=colours[i % len(colours)], shape=shapes[(i + i // len(colours)) % len(shapes)])
            for i in range(count)]


def colour_only_prompts(repeats: int = 5) -> tuple[list[str], list[int], list[str]]:
    """"a red shape" for every colour, `repeats` seeds each: prompts, seeds and the colour each asks for. Full
    prompts are drawn right at any CFG; where the text says this little, guidance shows."""
    colours = list(COLOURS) * repeats
    return [f"a {c} shape" for c in colours], list(range(7000, 7000 + len(colours))), colours


# A negative prompt naming the prompt's colour: the red share of 12 seeded pictures, with and without it.
NEGATIVE_PROBE = ("a large red circle in the middle on a white background", "red", list(range(2000, 2012)))


def adherence(scenes: list[Scene], readings: list[Reading]) -> dict[str, float]:
    """The fraction of pictures whose reading matches the scene, per part, and their mean."""
    parts = ("colour", "shape", "region", "background")
    figures = {p: sum(getattr(r, p) == getattr(s, p) for s, r in zip(scenes, readings)) / len(scenes) for p in parts}
    figures["mean"] = sum(figures[p] for p in parts) / len(parts)
    return figures
