"""Tiny LoRAs for the tiny models, written with our own code in kohya/A1111 and diffusers/PEFT layouts."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

LAYERS_PER_BLOCK = 2  # the tiny UNet's


def _unet_attention_linears(unet):
    """(diffusers module name, in, out) of the UNet's attention-block linears (what SDXL LoRAs train)."""
    out = []
    for name, mod in unet.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".attentions." in name and ".lora_" not in name:
            # a pipe that already has adapters wraps each layer: x -> x.base_layer
            out.append((name.removesuffix(".base_layer"), mod.in_features, mod.out_features))
    return out


def _norm_sgm(name):
    # diffusers names are like down_blocks.1.attentions.0.transformer_blocks...
    parts = name.split(".")
    if parts[0] == "mid_block":
        return "middle_block_1_" + "_".join(parts[3:])
    b, i = int(parts[1]), int(parts[3])
    step = LAYERS_PER_BLOCK + 1
    if parts[0] == "down_blocks":
        return f"input_blocks_{1 + b * step + i}_1_" + "_".join(parts[4:])
    return f"output_blocks_{b * step + i}_1_" + "_".join(parts[4:])


def _te_linears(te):
    # transformers 5 flattens CLIPTextModel (no .text_model); CLIPTextModelWithProjection keeps it
    return [(n.removeprefix("text_model.").removesuffix(".base_layer"), m.in_features, m.out_features)
            for n, m in te.named_modules()
            if isinstance(m, torch.nn.Linear) and n.removeprefix("text_model.").startswith("encoder.layers.")
            and ".lora_" not in n]


def _pair(gen, rank, fan_in, fan_out, amp):
    down = torch.randn(rank, fan_in, generator=gen) * amp
    up = torch.randn(fan_out, rank, generator=gen) * amp
    return down, up


def kohya_state_dict(pipe, seed=0, rank=4, alpha=2.0, amp=0.5, unet=True, te=True, sgm=True):
    """A kohya/A1111 SDXL LoRA: lora_unet_* (sgm block names), lora_te1_*, lora_te2_*."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}

    def add(prefix, fan_in, fan_out):
        down, up = _pair(gen, rank, fan_in, fan_out, amp)
        sd[f"{prefix}.lora_down.weight"] = down
        sd[f"{prefix}.lora_up.weight"] = up
        sd[f"{prefix}.alpha"] = torch.tensor(float(alpha))

    if unet:
        for name, fi, fo in _unet_attention_linears(pipe.unet):
            key = _norm_sgm(name) if sgm else name.replace(".", "_")
            add("lora_unet_" + key, fi, fo)
    if te:
        for tag, model in (("lora_te1_", pipe.text_encoder), ("lora_te2_", pipe.text_encoder_2)):
            for name, fi, fo in _te_linears(model):
                add(tag + "text_model_" + name.replace(".", "_"), fi, fo)
    return sd


def peft_state_dict(pipe, seed=0, rank=4, amp=0.5, unet=True, te=True):
    """A diffusers/PEFT LoRA: unet.<module>.lora_A.weight / lora_B.weight, text_encoder(_2).<module>..."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}

    def add(prefix, fan_in, fan_out):
        down, up = _pair(gen, rank, fan_in, fan_out, amp)
        sd[f"{prefix}.lora_A.weight"] = down
        sd[f"{prefix}.lora_B.weight"] = up

    if unet:
        for name, fi, fo in _unet_attention_linears(pipe.unet):
            add("unet." + name, fi, fo)
    if te:
        for comp in ("text_encoder", "text_encoder_2"):
            for name, fi, fo in _te_linears(getattr(pipe, comp)):
                add(f"{comp}.text_model.{name}", fi, fo)
    return sd


def write(sd, path):
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path
