"""The embedded `demo` model: a tiny pipeline in the standard SD architecture, built from configs.

It has random weights, so its pictures are noise until a trained demo model replaces it. It
exists so that `make serve` works on a fresh machine with no download, and it is loaded
through the same registry path as a real diffusers folder.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

DEMO_NAME = "demo"
DEMO_VERSION = 2
MARKER = "sdserve-demo.json"


def _byte_vocab() -> tuple[dict[str, int], list[str]]:
    """A CLIP BPE vocabulary of single bytes (CLIP's byte-to-unicode table), no merges."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}, ["#version: 0.2"]


def build_tiny_pipeline(seed: int = 0):
    """A tiny SD pipeline (UNet 32/64, VAE 32/32/64/64, CLIP hidden 32 x 5 layers) with seeded random weights.

    The VAE has SD's four levels, so the latent is 1/8 of the image side as in every SD model
    (64x64 pixels -> 8x8 latent, like 512x512 -> 64x64). Attention sits only on the
    lower-resolution UNet level: at full latent resolution it would grow with the square of
    the pixel count.
    """
    import torch
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab, merges = _byte_vocab()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("\n".join(merges) + "\n")
        tokenizer = CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=77)

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=8,  # latent side: 64 px / 8
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        block_out_channels=(32, 32, 64, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        sample_size=64,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=5,
            vocab_size=len(vocab),
            max_position_embeddings=77,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
            projection_dim=32,
        )
    )
    # SD 1.5's own scheduler config, so every sampler sees a real noise schedule.
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def is_demo(path: Path) -> bool:
    return (path / MARKER).is_file()


def ensure_demo(data_dir: Path) -> Path:
    """Build the demo model into `data_dir/models/demo` once; later calls return the saved folder."""
    target = data_dir / "models" / DEMO_NAME
    marker = target / MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("version") == DEMO_VERSION:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename, so a crash never leaves a half-written model behind.
    staging = Path(tempfile.mkdtemp(prefix=".demo-", dir=target.parent))
    from sdserve.engine import quiet_libraries

    quiet_libraries()
    try:
        build_tiny_pipeline().save_pretrained(staging, safe_serialization=True)
        (staging / MARKER).write_text(json.dumps({"version": DEMO_VERSION, "note": "random weights: output is noise"}))
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
