"""The embedded `demo` model: a small Stable Diffusion trained on captioned shapes, shipped in the package.

`sdserve.demo.train` makes it (`make demo-model`); `sdserve.demo.data` is the world it knows (colours, shapes, regions,
backgrounds). It is a plain diffusers folder of safetensors, loaded through the registry's normal path:
nothing is built or downloaded at first run.
"""

from __future__ import annotations

from pathlib import Path

DEMO_NAME = "demo"
MARKER = "sdserve-demo.json"  # beside model_index.json: marks the folder as the demo model, with its training report
DEMO_PATH = Path(__file__).resolve().parent.parent / "models" / DEMO_NAME


def is_demo(path: Path) -> bool:
    return (path / MARKER).is_file()
