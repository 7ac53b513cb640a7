"""Train the embedded `demo` model from scratch: `make demo-model` or `python -m sdserve.demo.train`.

Stable Diffusion's own classes, small: a CLIP tokenizer whose BPE merges make each word of the demo
vocabulary one token (any other text still tokenizes, byte by byte), a CLIPTextModel, an AutoencoderKL with
SD's 8x latent factor and 4 latent channels, a UNet2DConditionModel, and SD 1.5's noise schedule rescaled to
zero terminal SNR. Data: `sdserve.demo.data`'s captioned shapes, made here from the seed. Two stages on the CPU:

1. the VAE learns to reconstruct the pictures (L1 + a small KL term); its latents' spread sets `scaling_factor`;
2. the UNet and the text encoder learn to denoise those latents from the captions (10% empty, so
   classifier-free guidance works; 15% a single part, so a short negative prompt means what it says), with
   v-prediction on that schedule (`noise_betas`); half of each batch at the noisiest timesteps for the first
   45% of the run, where the shape's place is decided, then uniform.

Deterministic from --seed (torch's CPU kernels, one thread per process set here). Writes a diffusers folder
(safetensors) and the loss curves as a PNG.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

from sdserve.demo import data as demo_data

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


def clip_tokenizer(words=()):
    """A CLIPTokenizer (model_max_length 77) over CLIP's byte alphabet, with BPE merges that make each of
    `words` one token. With no words it is bytes only: what the tiny test pipelines and bench/fullsize use."""
    from transformers import CLIPTokenizer

    symbols = _byte_symbols()
    merges = bpe_merges(list(words))
    tokens = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        return CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=77)


# ----- models ------------------------------------------------------------------------------------
def build_models(tokenizer, seed: int, conv_in_kernel: int = 7):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab = tokenizer.get_vocab()
    torch.manual_seed(seed)
    # Narrow at full resolution, wide at the 8x8 latent's: the shapes are decided at low resolution. One
    # GroupNorm group per layer: with few channels per group, normalising erases a flat colour entirely.
    vae = AutoencoderKL(
        block_out_channels=(16, 32, 64, 128), layers_per_block=1, in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4, norm_num_groups=1, sample_size=demo_data.SIZE,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=3, vocab_size=len(vocab),
        max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"], projection_dim=64,
    ))
    # Two levels on the 8x8 latent (8x8, 4x4), cross-attention to the caption on both. Eight channels per
    # GroupNorm group, so a flat region's latent is not normalised away. Nothing in SD's UNet says where a cell
    # is but the zero padding of its convolutions; a 7x7 first convolution lets one layer tell a cell 3 from
    # the left border from one 3 from the right, so "on the left" has somewhere to attach.
    unet = UNet2DConditionModel(
        sample_size=demo_data.SIZE // 8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(64, 128), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64, attention_head_dim=8,
        norm_num_groups=8, conv_in_kernel=conv_in_kernel,
    )
    return vae, text_encoder, unet


def noise_betas() -> list[float]:
    """SD 1.5's noise schedule (scaled linear, 0.00085..0.012, 1000 steps) rescaled to zero terminal SNR (Lin et
    al., "Common Diffusion Noise Schedules and Sample Steps are Flawed"), the last cumulative alpha set to 2**-24
    as diffusers does so that sigma stays finite. With SD's own schedule the noisiest training input still holds
    7% of the picture: the model learnt to take the shape's place from that rather than from "on the left", and
    at sampling time it read a place out of pure noise. Written into the scheduler config as `trained_betas`,
    so every sampler (including those without diffusers' `rescale_betas_zero_snr`) sees this schedule."""
    import torch

    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas_bar_sqrt = torch.cumprod(1 - betas, 0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * first / (first - last)
    alphas_bar = alphas_bar_sqrt ** 2
    alphas_bar[-1] = 2.0 ** -24
    betas = 1 - alphas_bar / torch.cat([torch.ones(1, dtype=torch.float64), alphas_bar[:-1]])
    return [round(float(b), 10) for b in betas]


def noise_config() -> dict:
    """The training noise schedule and objective: v-prediction, as SD 2.x's v models (at zero terminal SNR
    epsilon-prediction is undefined at the last step)."""
    return {"num_train_timesteps": 1000, "trained_betas": noise_betas(), "prediction_type": "v_prediction"}


def scheduler():
    """The shipped scheduler config: every sampler is built from it (`samplers.make_scheduler`), so all see the
    schedule the model was trained on; "trailing" spacing makes a run start at the last, pure-noise step.
    `steps_offset=1` is what StableDiffusionPipeline sets (with a warning) on every load otherwise; "trailing"
    spacing does not use it."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(**noise_config(), timestep_spacing="trailing", steps_offset=1)


# ----- data --------------------------------------------------------------------------------------
def dataset(count: int, seed: int):
    """`count` scenes and their pictures as a float tensor in [-1, 1]; shapes moved by up to 3 px."""
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
def vae_loss(recon, x):
    """L1 + L2 with the shape's pixels (those unlike the corner's colour) weighted 5x, since a small shape is
    under a tenth of the picture, plus the error of the horizontal and vertical gradients, for sharp edges."""
    corner = x[:, :, :1, :1]
    weight = 1 + 4 * ((x - corner).abs().sum(1, keepdim=True) > 0.1).float()
    err = recon - x
    loss = (weight * (err.abs() + err.pow(2))).mean()
    for dim in (2, 3):
        loss = loss + (recon.diff(dim=dim) - x.diff(dim=dim)).abs().mean()
    return loss


def train_vae(vae, pictures, steps: int, batch: int, seed: int, log: list[float]) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    vae.train()
    for step in range(steps):
        idx = torch.randint(0, len(pictures), (batch,), generator=g)
        x = pictures[idx]
        posterior = vae.encode(x).latent_dist
        # The posterior's mean plus a little noise: the decoder learns to draw from latents near the ones it
        # was shown, which is what the diffusion model will hand it. (Sampling at the posterior's full spread
        # from the start, as SD's VAE was trained, takes far longer to learn than this CPU budget allows.)
        z = posterior.mean + 0.1 * posterior.mean.detach().std() * torch.randn(posterior.mean.shape, generator=g)
        loss = vae_loss(vae.decode(z).sample, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        log.append(loss.item())
        if step % 200 == 0:
            print(f"vae {step}/{steps} loss {loss.item():.4f}", flush=True)
    vae.eval()


def reconstruction(vae, count: int = 300, seed: int = 99) -> dict[str, float]:
    """How well the VAE alone keeps what the reader measures: pictures it never saw, encoded and decoded."""
    import numpy as np
    import torch
    from PIL import Image

    scenes, x = dataset(count, seed)
    with torch.no_grad():
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample
    pixels = ((recon.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).numpy().astype(np.uint8)
    return demo_data.adherence(scenes, [demo_data.read(Image.fromarray(p)) for p in pixels])


def encode_all(vae, pictures, batch: int = 256):
    import torch

    with torch.no_grad():
        return torch.cat([vae.encode(pictures[i:i + batch]).latent_dist.mean for i in range(0, len(pictures), batch)])


def train_unet(unet, text_encoder, tokenizer, latents, scenes, steps: int, batch: int, seed: int,
               log: list[float], noisy_until: float = 0.45) -> None:
    import torch
    from diffusers import DDPMScheduler

    noise_schedule = DDPMScheduler(**noise_config())
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
        # For the first `noisy_until` of the run, half the batch at the noisiest 40% of the schedule: where the
        # shape goes is decided there, from the caption alone, and a uniform draw spends too few steps on it for
        # "on the left" to be learnt. Then uniform, so the quieter steps that draw the shape's outline get their
        # share back.
        t = torch.randint(0, 1000, (batch,), generator=g)
        if step < noisy_until * steps:
            t[: batch // 2] = torch.randint(600, 1000, (batch // 2,), generator=g)
        zt = noise_schedule.add_noise(z0, noise, t)
        context = text_encoder(ids)[0]
        target = noise_schedule.get_velocity(z0, noise, t)
        loss = torch.nn.functional.mse_loss(unet(zt, t, context).sample, target)
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


def save(pipe, out: Path) -> None:
    """The pipeline as safetensors in float16: half the size (the package carries it), and the registry loads
    it as float32 on a CPU, float16 on a GPU."""
    import torch

    pipe.to(dtype=torch.float16)
    pipe.save_pretrained(out, safe_serialization=True)


def plot(curves: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {name: values for name, values in curves.items() if values}
    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.2), squeeze=False)
    for ax, (name, values) in zip(axes[0], curves.items()):
        window = max(1, len(values) // 100)
        smooth = [sum(values[i:i + window]) / window for i in range(0, len(values) - window + 1, window)]
        ax.plot([i * window for i in range(len(smooth))], smooth)
        ax.set_title(f"{name} loss")
        ax.set_xlabel("step")
        ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def train(out: Path, seed: int = 0, pictures: int = 12000, vae_steps: int = 3500, unet_steps: int = 5600,
          vae_batch: int = 32, batch: int = 64, threads: int | None = None, vae_from: Path | None = None) -> dict:
    """Train both stages into `out`. The VAE stage is kept in `out/vae` with its record as soon as it ends, and
    a later run with the same seed, pictures and VAE steps starts from it (the same weights it would make).
    `vae_from`: a model folder this script trained (the shipped demo model, say): its VAE stands in for the
    first stage, to retrain only the UNet stage; the report then counts that VAE's minutes as measured when it
    was trained."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    from sdserve.engine import demo, quiet_libraries

    quiet_libraries()
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)
    started = time.monotonic()
    tokenizer = clip_tokenizer(demo_data.WORDS)
    vae, text_encoder, unet = build_models(tokenizer, seed)
    scenes, x = dataset(pictures, seed)
    stage = {"seed": seed, "pictures": pictures, "vae_steps": vae_steps, "vae_batch": vae_batch}
    stage_file = out / "vae" / "stage.json"
    record = json.loads(stage_file.read_text()) if stage_file.is_file() else {}
    if vae_from is not None:
        source = json.loads((vae_from / demo.MARKER).read_text())
        vae = AutoencoderKL.from_pretrained(vae_from / "vae", torch_dtype=torch.float32)
        record = {"minutes": source["vae_minutes"], "curve": [], "final_vae_loss": source["final_vae_loss"]}
        stage = {**{k: source[k] for k in stage}, "vae_from": str(vae_from)}
        print(f"vae: the one in {vae_from}", flush=True)
    elif record.get("stage") == stage:
        vae = AutoencoderKL.from_pretrained(out / "vae")
        print(f"vae: reusing the stage saved in {out / 'vae'}", flush=True)
    else:
        vae_started = time.monotonic()
        curve: list[float] = []
        train_vae(vae, x, vae_steps, vae_batch, seed + 1, curve)
        record = {"stage": stage, "minutes": (time.monotonic() - vae_started) / 60, "curve": curve,
                  "final_vae_loss": round(statistics.fmean(curve[-100:]), 4)}
        vae.save_pretrained(out / "vae", safe_serialization=True)
        stage_file.write_text(json.dumps(record))
    vae.eval()
    recon = reconstruction(vae)
    print(f"vae reconstruction: {recon}", flush=True)
    latents = encode_all(vae, x)
    scaling = 1.0 / float(latents.std())
    vae.register_to_config(scaling_factor=scaling)
    unet_started = time.monotonic()
    curves = {"vae": record["curve"], "unet": []}
    train_unet(unet, text_encoder, tokenizer, latents * scaling, scenes, unet_steps, batch, seed + 2, curves["unet"])
    unet_minutes = (time.monotonic() - unet_started) / 60
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    save(pipe, out)
    stage_file.unlink(missing_ok=True)
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in
              (("vae", vae), ("text_encoder", text_encoder), ("unet", unet))}
    report = {**stage, "unet_steps": unet_steps, "batch": batch, "parameters": params,
              "vae_minutes": round(record["minutes"], 1), "unet_minutes": round(unet_minutes, 1),
              "run_minutes": round((time.monotonic() - started) / 60 + (record["minutes"] if vae_from else 0), 1),
              "final_vae_loss": record["final_vae_loss"],
              "final_unet_loss": round(statistics.fmean(curves["unet"][-100:]), 4),
              "vae_reconstruction": recon, "weights": "float16", "torch": torch.__version__}
    (out / demo.MARKER).write_text(json.dumps(report, indent=1) + "\n")
    plot(curves, out / "loss.png")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pictures", type=int, default=12000)
    parser.add_argument("--vae-steps", type=int, default=3500)
    parser.add_argument("--unet-steps", type=int, default=5600)
    parser.add_argument("--vae-batch", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64, help="the UNet stage's batch")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--vae-from", type=Path, default=None,
                        help="a model folder this script made (e.g. the shipped one): keep its VAE, retrain the UNet stage")
    args = parser.parse_args()
    print(json.dumps(train(args.out, args.seed, args.pictures, args.vae_steps, args.unet_steps, args.vae_batch,
                           args.batch, args.threads, args.vae_from), indent=1))


if __name__ == "__main__":
    main()
