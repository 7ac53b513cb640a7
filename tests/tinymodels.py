"""Tiny models saved the ways users have them: a diffusers folder, and a single-file LDM checkpoint.

The single-file writer is the inverse of diffusers' own single-file conversion (the original
Stable Diffusion key layout, `model.diffusion_model.*`, `first_stage_model.*`,
`cond_stage_model.transformer.*`), derived from the UNet and VAE configs so it works for any
block count, including the two-level tiny models used here.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING
from safetensors.torch import save_file

from sdserve.demo.train import clip_tokenizer

_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
           ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]


def build_tiny_pipeline(seed: int = 0):
    """A tiny SD pipeline (UNet 32/64, VAE 32/32/64/64, CLIP hidden 32 x 5 layers) with seeded random weights.

    The VAE has SD's four levels, so the latent is 1/8 of the image side as in every SD model
    (64x64 pixels -> 8x8 latent, like 512x512 -> 64x64). Attention sits only on the
    lower-resolution UNet level: at full latent resolution it would grow with the square of
    the pixel count.
    """
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = clip_tokenizer()
    vocab = tokenizer.get_vocab()

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


def save_diffusers(path: Path, seed: int = 7):
    pipe = build_tiny_pipeline(seed=seed)
    pipe.save_pretrained(path, safe_serialization=True)
    return pipe


def _resnet(rest: str, renames=_RESNET) -> str:
    for new, old in renames:
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


def unet_to_ldm(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    per = config["layers_per_block"] + 1
    fixed = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]
    with_attn = {i for i, t in enumerate(config["up_block_types"]) if "CrossAttn" in t}
    out = {}
    for key, value in state.items():
        if key in fixed:
            new = fixed[key]
        elif m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
            b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            new = f"input_blocks.{b * per + j + 1}." + ("0." + _resnet(rest) if kind == "resnets" else "1." + rest)
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
            new = f"input_blocks.{(int(m[1]) + 1) * per}.0.op.{m[2]}"
        elif m := re.match(r"mid_block\.resnets\.(\d)\.(.*)", key):
            new = f"middle_block.{0 if m[1] == '0' else 2}.{_resnet(m[2])}"
        elif m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
            new = f"middle_block.1.{m[1]}"
        elif m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
            b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            new = f"output_blocks.{b * per + j}." + ("0." + _resnet(rest) if kind == "resnets" else "1." + rest)
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
            b = int(m[1])
            new = f"output_blocks.{b * per + per - 1}.{2 if b in with_attn else 1}.conv.{m[2]}"
        else:
            raise KeyError(f"no LDM name for UNet key {key}")
        out["model.diffusion_model." + new] = value
    return out


def vae_to_ldm(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    n = len(config["up_block_types"])
    fixed = {v: k for k, v in DIFFUSERS_TO_LDM_MAPPING["vae"].items()}  # ldm -> diffusers, invert below
    fixed = {d: l for l, d in fixed.items()}
    vae_resnet = [("conv_shortcut", "nin_shortcut")]
    attn = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]
    out = {}
    for key, value in state.items():
        if key in fixed:
            new = fixed[key]
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{_resnet(m[3], vae_resnet)}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
            new = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            new = f"decoder.up.{n - 1 - int(m[1])}.block.{m[2]}.{_resnet(m[3], vae_resnet)}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
            new = f"decoder.up.{n - 1 - int(m[1])}.upsample.conv.{m[2]}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.*)", key):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{_resnet(m[3], vae_resnet)}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", key):
            new = f"{m[1]}.mid.attn_1.{_resnet(m[2], attn)}"
            if value.ndim == 2:  # LDM stores attention projections as 1x1 convolutions
                value = value[:, :, None, None]
        else:
            raise KeyError(f"no LDM name for VAE key {key}")
        out["first_stage_model." + new] = value
    return out


def clip_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        "cond_stage_model.transformer." + (k if k.startswith("text_model.") else "text_model." + k): v
        for k, v in state.items()
    }


def save_single_file(pipe, path: Path) -> Path:
    """Write `pipe` as one original-layout SD 1.x `.safetensors` checkpoint."""
    state = {
        **unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config),
        **vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config),
        **clip_to_ldm(pipe.text_encoder.state_dict()),
    }
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


# ----- LoRAs, written as users get them ------------------------------------------------------------
def lora_targets(pipe) -> dict[str, tuple[str, int, int]]:
    """The layers a LoRA adapts, as trainers pick them: every attention projection of the UNet and the
    text encoder's self-attention. Module path -> (component, in features, out features)."""
    targets = {}
    for component, model, pattern in (("unet", pipe.unet, r"attn[12]\.(to_[qkv]|to_out\.0)$"),
                                      ("text_encoder", pipe.text_encoder, r"self_attn\.[qkv]_proj$|out_proj$")):
        for name, module in model.named_modules():
            if re.search(pattern, name) and isinstance(module, torch.nn.Linear):
                targets[f"{component}.{name}"] = (component, module.in_features, module.out_features)
    return targets


def lora_factors(pipe, seed: int, rank: int = 2, scale: float = 0.3) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Random low-rank factors (down: rank x in, up: out x rank) for every target layer."""
    g = torch.Generator().manual_seed(seed)
    return {path: (torch.randn(rank, fin, generator=g) * scale, torch.randn(fout, rank, generator=g) * scale)
            for path, (_, fin, fout) in lora_targets(pipe).items()}


def save_lora(factors, path: Path, fmt: str, metadata: dict[str, str] | None = None) -> Path:
    """Write LoRA factors as diffusers/peft keys (`unet.<module>.lora_A.weight`) or as A1111/kohya keys
    (`lora_unet_<module_with_underscores>.lora_down.weight`, `.alpha` = rank, so both scale by 1)."""
    state = {}
    for module, (down, up) in factors.items():
        if fmt == "diffusers":
            state[f"{module}.lora_A.weight"] = down.contiguous()
            state[f"{module}.lora_B.weight"] = up.contiguous()
        else:
            component, rest = module.split(".", 1)
            prefix = {"unet": "lora_unet", "text_encoder": "lora_te"}[component]
            if component == "text_encoder" and not rest.startswith("text_model."):
                rest = "text_model." + rest  # kohya names the CLIP layers as transformers 4 did
            key = f"{prefix}_{rest.replace('.', '_')}"
            state[f"{key}.lora_down.weight"] = down.contiguous()
            state[f"{key}.lora_up.weight"] = up.contiguous()
            state[f"{key}.alpha"] = torch.tensor(float(down.shape[0]))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=metadata)
    return path


# ----- ControlNets ---------------------------------------------------------------------------------
def save_controlnet(pipe, path: Path, seed: int = 3) -> Path:
    """A ControlNet for the tiny model, made as its paper makes one (`ControlNetModel.from_unet`: a copy of the
    UNet's encoder), then given small random weights where training would have grown its zero convolutions,
    so the control map actually steers. Saved as a diffusers folder."""
    from diffusers import ControlNetModel

    net = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=(8, 16, 32, 32),
                                    load_weights_from_unet=False)
    # The copy of the UNet's encoder, layer by layer where the shapes agree: ControlNetModel's first convolution
    # is always 3x3, so a UNet with a wider one (the demo model's 7x7) leaves the ControlNet its own.
    own, unet = net.state_dict(), pipe.unet.state_dict()
    net.load_state_dict({k: v for k, v in unet.items() if k in own and own[k].shape == v.shape}, strict=False)
    g = torch.Generator().manual_seed(seed)
    embedding = net.controlnet_cond_embedding
    zero = [embedding.conv_out, net.controlnet_mid_block, *net.controlnet_down_blocks]
    with torch.no_grad():
        for conv in zero:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.3)
        for conv in [embedding.conv_in, *embedding.blocks]:  # a trained map encoder responds to the map's content
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.5)
    net.save_pretrained(path, safe_serialization=True)
    return path


# ----- a tiny SDXL ---------------------------------------------------------------------------------
def build_tiny_sdxl(seed: int = 0):
    """A tiny SDXL pipeline: two CLIP text encoders (the second with a projection, whose pooled output and the
    size/crop "time ids" condition the UNet through `text_time` embeddings), their outputs concatenated for
    cross-attention, as in SDXL; the tiny SD VAE."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    base = build_tiny_pipeline(seed)
    vocab = base.tokenizer.get_vocab()

    def config(width: int) -> CLIPTextConfig:
        return CLIPTextConfig(hidden_size=width, intermediate_size=37, num_attention_heads=4, num_hidden_layers=3,
                              vocab_size=len(vocab), max_position_embeddings=77, projection_dim=32,
                              bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                              pad_token_id=vocab["<|endoftext|>"])

    torch.manual_seed(seed + 10)
    text_encoder, text_encoder_2 = CLIPTextModel(config(32)), CLIPTextModelWithProjection(config(32))
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=(2, 4), addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 32,
    )
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(vae=base.vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=base.tokenizer, tokenizer_2=clip_tokenizer(), unet=unet,
                                     scheduler=scheduler)
