"""Train the embedded `demo` model from scratch: `make demo-model` or `python -m sdserve.engine.train_demo`.

Stable Diffusion's own classes, small: a CLIP tokenizer whose BPE merges make each word of the demo
vocabulary one token (any other text still tokenizes, byte by byte), a CLIPTextModel, an AutoencoderKL with
SD's 8x latent factor and 4 latent channels, a UNet2DConditionModel, and SD 1.5's noise schedule. Data:
`demo_data`'s captioned shapes, made here from the seed. Two stages on the CPU:

1. the VAE learns to reconstruct the pictures (L1 + a small KL term); its latents' spread sets `scaling_factor`;
2. the UNet and the text encoder learn to predict the noise on those latents from the captions (10% empty,
   so classifier-free guidance works), with SD's epsilon objective.

Deterministic from --seed (torch's CPU kernels, one thread per process set here). Writes a diffusers folder
(safetensors) and the loss curves as a PNG.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from collections import Counter
from pathlib import Path

from sdserve.engine import demo_data

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "models" / "demo"


# ----- tokenizer ---------------------------------------------------------------------------------
def _byte_symbols() -> list[str]:
    """CLIP's byte-to-unicode table: the symbol of each of the 256 bytes."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    symbols, extra = [], 0
    for b in range(256):
        if b in printable:
            symbols.append(chr(b))
        else:
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols


def bpe_merges(words: list[str]) -> list[tuple[str, str]]:
    """Learn BPE merges on the vocabulary until every word is one symbol. Applied in rank order, as CLIP's
    tokenizer does, they rebuild each word exactly as here (that is how BPE learns), so each is one token."""
    pieces = {w: [*w[:-1], w[-1] + "</w>"] for w in words}
    merges: list[tuple[str, str]] = []
    while any(len(p) > 1 for p in pieces.values()):
        pairs = Counter((a, b) for p in pieces.values() for a, b in zip(p, p[1:]))
        pair = max(pairs, key=lambda k: (pairs[k], k))  # most frequent; ties broken deterministically
        merges.append(pair)
        for w, p in pieces.items():
            merged, i = [], 0
            while i < len(p):
                if i + 1 < len(p) and (p[i], p[i + 1]) == pair:
                    merged.append(p[i] + p[i + 1])
                    i += 2
                else:
                    merged.append(p[i])
                    i += 1
            pieces[w] = merged
    return merges


def build_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    symbols = _byte_symbols()
    merges = bpe_merges(demo_data.WORDS)
    tokens = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


# ----- models ------------------------------------------------------------------------------------
def build_models(tokenizer, seed: int):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab = tokenizer.get_vocab()
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=(32, 64, 64, 64), layers_per_block=1, in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4, norm_num_groups=16, sample_size=demo_data.SIZE,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=3, vocab_size=len(vocab),
        max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"], projection_dim=64,
    ))
    unet = UNet2DConditionModel(
        sample_size=demo_data.SIZE // 8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(96, 192), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64, attention_head_dim=8,
        norm_num_groups=32,
    )
    return vae, text_encoder, unet


def scheduler():
    """SD 1.5's scheduler config, so every sampler sees SD's real noise schedule."""
    from diffusers import PNDMScheduler

    return PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         num_train_timesteps=1000, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)


# ----- data --------------------------------------------------------------------------------------
def dataset(count: int, seed: int):
    """`count` scenes and their pictures as a float tensor in [-1, 1]."""
    import numpy as np
    import torch

    rng = random.Random(seed)
    scenes, pictures = [], []
    for _ in range(count):
        scene = demo_data.random_scene(rng)
        scenes.append(scene)
        pictures.append(np.asarray(demo_data.draw(scene, (rng.uniform(-3, 3), rng.uniform(-3, 3)))))
    x = torch.from_numpy(np.stack(pictures)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return scenes, x


# ----- training ----------------------------------------------------------------------------------
def train_vae(vae, pictures, steps: int, batch: int, seed: int, log: list[float]) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    vae.train()
    for step in range(steps):
        idx = torch.randint(0, len(pictures), (batch,), generator=g)
        x = pictures[idx]
        posterior = vae.encode(x).latent_dist
        # The posterior's mean plus a little noise: the decoder learns to draw from latents near the ones it
        # was shown, which is what the diffusion model will hand it. (Sampling at the posterior's full spread
        # from the start, as SD's VAE was trained, takes far longer to learn than this CPU budget allows.)
        z = posterior.mean + 0.1 * posterior.mean.detach().std() * torch.randn(posterior.mean.shape, generator=g)
        recon = vae.decode(z).sample
        loss = (recon - x).abs().mean() + (recon - x).pow(2).mean() + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        log.append(loss.item())
        if step % 200 == 0:
            print(f"vae {step}/{steps} loss {loss.item():.4f}", flush=True)
    vae.eval()


def encode_all(vae, pictures, batch: int = 256):
    import torch

    with torch.no_grad():
        return torch.cat([vae.encode(pictures[i:i + batch]).latent_dist.mean for i in range(0, len(pictures), batch)])


def train_unet(unet, text_encoder, tokenizer, latents, scenes, steps: int, batch: int, seed: int,
               log: list[float]) -> None:
    import torch
    from diffusers import DDPMScheduler

    noise_schedule = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   num_train_timesteps=1000)
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.03)
    unet.train()
    text_encoder.train()
    for step in range(steps):
        idx = torch.randint(0, len(latents), (batch,), generator=g)
        texts = ["" if rng.random() < 0.1 else demo_data.caption(scenes[i], rng) for i in idx.tolist()]
        ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        z0 = latents[idx]
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        zt = noise_schedule.add_noise(z0, noise, t)
        context = text_encoder(ids)[0]
        loss = torch.nn.functional.mse_loss(unet(zt, t, context).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        log.append(loss.item())
        if step % 200 == 0:
            print(f"unet {step}/{steps} loss {loss.item():.4f}", flush=True)
    unet.eval()
    text_encoder.eval()


def plot(curves: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.2))
    for ax, (name, values) in zip(axes, curves.items()):
        window = max(1, len(values) // 100)
        smooth = [sum(values[i:i + window]) / window for i in range(0, len(values) - window + 1, window)]
        ax.plot([i * window for i in range(len(smooth))], smooth)
        ax.set_title(f"{name} loss")
        ax.set_xlabel("step")
        ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def train(out: Path, seed: int = 0, pictures: int = 20000, vae_steps: int = 3000, unet_steps: int = 12000,
          batch: int = 64, threads: int | None = None) -> dict:
    import torch
    from diffusers import StableDiffusionPipeline

    from sdserve.engine import demo, quiet_libraries

    quiet_libraries()
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tokenizer(Path(tmp))
    vae, text_encoder, unet = build_models(tokenizer, seed)
    scenes, x = dataset(pictures, seed)
    curves: dict[str, list[float]] = {"vae": [], "unet": []}
    train_vae(vae, x, vae_steps, batch, seed + 1, curves["vae"])
    latents = encode_all(vae, x)
    scaling = 1.0 / float(latents.std())
    vae.register_to_config(scaling_factor=scaling)
    vae_done = time.monotonic()
    train_unet(unet, text_encoder, tokenizer, latents * scaling, scenes, unet_steps, batch, seed + 2, curves["unet"])
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    report = {"seed": seed, "pictures": pictures, "vae_steps": vae_steps, "unet_steps": unet_steps, "batch": batch,
              "vae_minutes": round((vae_done - started) / 60, 1),
              "total_minutes": round((time.monotonic() - started) / 60, 1),
              "final_vae_loss": sum(curves["vae"][-100:]) / 100, "final_unet_loss": sum(curves["unet"][-100:]) / 100,
              "torch": torch.__version__}
    (out / demo.MARKER).write_text(json.dumps({"version": demo.DEMO_VERSION, **report}, indent=1) + "\n")
    plot(curves, out.parent / "demo-loss.png")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pictures", type=int, default=20000)
    parser.add_argument("--vae-steps", type=int, default=3000)
    parser.add_argument("--unet-steps", type=int, default=12000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    print(json.dumps(train(args.out, args.seed, args.pictures, args.vae_steps, args.unet_steps, args.batch,
                           args.threads), indent=1))


if __name__ == "__main__":
    main()
