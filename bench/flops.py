"""The FLOPs of one SDXL + ControlNet img2img image, counted by torch's FlopCounterMode on ``meta`` tensors with the
real (bundled) configs: no weights, no GPU, a second on the CPU. Used by bench/gpu.py for the model FLOP utilisation.

    .venv/bin/python bench/flops.py                    # fal's defaults: 1024x1024, 25 steps x 0.95 = 23 run, CFG on
    .venv/bin/python bench/flops.py --size 512 --steps-run 2
    .venv/bin/python bench/flops.py --fast             # fal's defaults against the _fast workflow (few-step LoRA)

At fal's defaults: 19.56 TFLOP per denoising step (UNet + ControlNet, batch 2 for CFG), 15.35 for the VAE's encode
and decode, about 0.2 for the two text encoders: 465.5 TFLOP per image.
"""

from __future__ import annotations

import argparse


def flops_per_image(width: int = 1024, height: int = 1024, steps_run: int = 23, cfg: bool = True) -> dict:
    """{"per_step", "vae", "text", "total"} in FLOPs (a multiply-add counts 2)."""
    import torch
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sdxl_controlnet_img2img.pipeline.local.models.sdxl_config import CONTROLNET_SDXL_CONFIG, SDXL_BASE_CONFIG as B
    from sdxl_controlnet_img2img.pipeline.request import DEFAULTS

    meta = torch.device("meta")
    with meta:
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(B / "unet"))
        controlnet = ControlNetModel.from_config(ControlNetModel.load_config(CONTROLNET_SDXL_CONFIG))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(B / "vae"))
        te1 = CLIPTextModel(CLIPTextConfig.from_pretrained(B / "text_encoder"))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(B / "text_encoder_2"))
    b = 2 if cfg else 1
    latents = torch.empty(b, 4, height // 8, width // 8, device=meta)
    text = torch.empty(b, 77, 2048, device=meta)
    added = {"text_embeds": torch.empty(b, 1280, device=meta), "time_ids": torch.empty(b, 6, device=meta)}
    t = torch.full((b,), 500, device=meta)

    def count(fn) -> int:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            fn()
        return counter.get_total_flops()

    def step():
        down, mid = controlnet(latents, t, encoder_hidden_states=text, added_cond_kwargs=added,
                               conditioning_scale=DEFAULTS["controlnet_conditioning_scale"], controlnet_cond=torch.empty(b, 3, height, width, device=meta), return_dict=False)
        unet(latents, t, encoder_hidden_states=text, added_cond_kwargs=added, down_block_additional_residuals=down,
             mid_block_additional_residual=mid)

    def vae_pass():
        vae.encode(torch.empty(1, 3, height, width, device=meta))
        vae.decode(torch.empty(1, 4, height // 8, width // 8, device=meta))

    def text_pass():
        ids = torch.zeros(b, 77, dtype=torch.long, device=meta)
        te1(ids, output_hidden_states=True)
        te2(ids, output_hidden_states=True)

    out = {"per_step": count(step), "vae": count(vae_pass), "text": count(text_pass)}
    out["total"] = out["per_step"] * steps_run + out["vae"] + out["text"]
    return out


# dense 16-bit tensor-core peaks (TFLOP/s) of the cards users and benches meet; --peak-tflops overrides
PEAK_TFLOPS = {"H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H200": 989.0,
               "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0, "RTX 4090": 165.2, "RTX 3090": 71.0,
               "T4": 65.0}


def peak_tflops(device_name: str) -> float | None:
    for name, peak in sorted(PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0])):
        if name.lower() in device_name.lower():
            return peak
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps-run", type=int, default=23)
    ap.add_argument("--no-cfg", action="store_true", help="guidance_scale <= 1: no unconditional pass")
    ap.add_argument("--fast", action="store_true",
                    help="compare fal's defaults (23 steps run, CFG) with the _fast workflow (3 run, CFG 1)")
    args = ap.parse_args(argv)
    if args.fast:
        from sdxl_controlnet_img2img.pipeline.request import DEFAULTS as D

        run = int(D["num_inference_steps"] * D["strength"])
        base = flops_per_image(args.size, args.size, run, cfg=True)
        fast = flops_per_image(args.size, args.size, 3, cfg=False)
        print(f"{args.size}x{args.size}: fal's defaults ({D['num_inference_steps']} x {D['strength']} = {run} steps, "
              f"CFG {D['guidance_scale']}) {base['total'] / 1e12:.1f} "
              f"TFLOP; _fast (4 x 0.95 = 3 steps, CFG 1) {fast['total'] / 1e12:.1f} TFLOP; "
              f"ratio {base['total'] / fast['total']:.1f}x")
        return 0
    f = flops_per_image(args.size, args.size, args.steps_run, cfg=not args.no_cfg)
    cfg = "no CFG" if args.no_cfg else "CFG"
    print(f"{args.size}x{args.size}, {args.steps_run} steps, {cfg}: per step {f['per_step'] / 1e12:.2f} TFLOP, "
          f"VAE {f['vae'] / 1e12:.2f}, text encoders {f['text'] / 1e12:.2f}, total {f['total'] / 1e12:.1f} TFLOP per image")
    return 0


if __name__ == "__main__":
    import _common  # noqa: F401  (offline environment, repo on the path)

    raise SystemExit(main())
