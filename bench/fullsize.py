"""Full-size SD architectures with random weights: the real compute cost, with nothing to download.

    python bench/fullsize.py sd15 models/sd15-random      # ~1.7 GB (fp16)
    python bench/fullsize.py sdxl models/sdxl-random      # ~6.9 GB (fp16)
    make bench BENCH_ARGS='throughput --model models/sd15-random --size 512 --device cuda'
    python bench/fullsize.py bench                        # the --optimize table on a GPU (below)

`bench` builds SD 1.5 (or `--arch sdxl`) with random weights in memory, fp16 on CUDA (fp32 on a CPU), and times 20
steps at 512x512 for batches 1, 8 and 16 under each `--optimize` choice, applied by sdserve's own code
(sdserve.engine.accel): s/image and img/s, medians of 3 calls after a warm-up call (a compiler's first call is its
compile, reported apart). It writes bench/results/fullsize-<machine>.json. Anchors: stable-fast on an H100 at 104.6
it/s (about 0.19 s per 20-step image at batch 1); torch.compile + channels_last on an A100, 1.06 s for 50 steps.

The configs are SD 1.5's and SDXL base's; the tokenizer is sdserve's byte-level demo vocabulary
(the text encoders keep CLIP's 49408-row embedding, so their cost is unchanged). Pictures are noise.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

from sdserve.demo.train import clip_tokenizer

CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
              vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
CLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                 vocab_size=49408, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
             steps_offset=1)


def tokenizer() -> CLIPTokenizer:
    return clip_tokenizer()  # bytes only: the text costs the same as with CLIP's 49408-token vocabulary


def text_config(spec: dict, tok: CLIPTokenizer) -> CLIPTextConfig:
    return CLIPTextConfig(**spec, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id)


def vae(scaling: float = 0.18215, force_upcast: bool = False) -> AutoencoderKL:
    return AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         sample_size=512, scaling_factor=scaling, force_upcast=force_upcast)


def sd15():
    tok = tokenizer()
    unet = UNet2DConditionModel(
        sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    return StableDiffusionPipeline(
        unet=unet, vae=vae(), text_encoder=CLIPTextModel(text_config(CLIP_L, tok)), tokenizer=tok,
        scheduler=PNDMScheduler(**BETAS, skip_prk_steps=True, set_alpha_to_one=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def sdxl():
    tok = tokenizer()
    unet = UNet2DConditionModel(
        sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    )
    return StableDiffusionXLPipeline(
        unet=unet, vae=vae(0.13025, force_upcast=True),
        text_encoder=CLIPTextModel(text_config(CLIP_L, tok)), tokenizer=tok,
        text_encoder_2=CLIPTextModelWithProjection(text_config(CLIP_BIGG, tok)), tokenizer_2=tok,
        scheduler=EulerDiscreteScheduler(**BETAS, timestep_spacing="leading"),
    )


def bench(argv: list[str]) -> None:
    import json
    import statistics
    import sys
    import time

    from sdserve.engine import accel

    parser = argparse.ArgumentParser(prog="fullsize.py bench")
    parser.add_argument("--arch", choices=["sd15", "sdxl"], default="sd15")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batches", default="1,8,16")
    parser.add_argument("--options", default=None, help="';'-separated --optimize values (default: by device)")
    args = parser.parse_args(argv)
    default = ("none;auto;channels_last,compile;channels_last,cuda_graphs" if args.device == "cuda"
               else "none;auto;compile")
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from run import RESULTS, machine

    def call(pipe: Any, batch: int) -> float:
        if args.device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        pipe(["a red circle"] * batch, num_inference_steps=args.steps, width=args.size, height=args.size,
             output_type="np")
        if args.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    rows = []
    for choice in (args.options or default).split(";"):
        options = accel.resolve(choice.split(","), args.device)
        torch.manual_seed(0)
        pipe = {"sd15": sd15, "sdxl": sdxl}[args.arch]().to(args.device, dtype)
        pipe.set_progress_bar_config(disable=True)
        accel.apply(pipe, options, None, None)
        for batch in map(int, args.batches.split(",")):
            first = call(pipe, batch)
            seconds = statistics.median(call(pipe, batch) for _ in range(3))
            row = {"optimize": choice, "resolved": options, "batch": batch, "first_call_s": round(first, 2),
                   "s_per_image": round(seconds / batch, 4), "images_per_s": round(batch / seconds, 3),
                   "it_per_s_batch1": round(args.steps / seconds, 1) if batch == 1 else None}
            rows.append(row)
            print(f"| {choice} | {batch} | {row['s_per_image']:.3f} | {row['images_per_s']:.2f} | {first:.1f} |",
                  flush=True)
        del pipe
        if args.device == "cuda":
            torch.cuda.empty_cache()
    result = {"machine": machine(args.device), "arch": args.arch, "size": args.size, "steps": args.steps,
              "dtype": str(dtype), "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "fullsize-" + result["machine"]["label"].lower().replace(" ", "-").replace(",", "")
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {RESULTS / name}.json")


def main() -> None:
    import sys

    if sys.argv[1:2] == ["bench"]:
        print("| --optimize | batch | s/image | img/s | first call s |\n|---|---|---|---|---|", flush=True)
        bench(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("arch", choices=["sd15", "sdxl"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--fp32", action="store_true", help="save fp32 weights (default fp16, as released models)")
    args = parser.parse_args()
    torch.manual_seed(0)
    pipe = {"sd15": sd15, "sdxl": sdxl}[args.arch]()
    if not args.fp32:
        pipe.to(torch.float16)
    pipe.save_pretrained(args.out, safe_serialization=True)
    params = sum(p.numel() for p in pipe.unet.parameters())
    print(f"wrote {args.out}: {args.arch}, UNet {params / 1e6:.0f}M parameters")


if __name__ == "__main__":
    main()
