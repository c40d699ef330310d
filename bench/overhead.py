"""Overhead: the sampler node against the plain diffusers pipeline call, and a warm run against a cold one.

1. Node overhead. One request (fal's defaults, as the request module has them: int(steps x strength) steps,
   guidance, ControlNet scale, one image) through ``SDXLCNImg2Img().sample`` -- IMAGE tensors in, Canny on the
   control image, IMAGE tensor out -- against what a plain diffusers user writes: ``cv2.Canny`` on the
   control image and one ``StableDiffusionXLControlNetImg2ImgPipeline.__call__`` with the same inputs
   and seed. Both use the same loaded pipeline (tiny random-weight SDXL + ControlNet, CPU, fp32);
   the outputs are checked pixel-equal; calls are interleaved and the medians compared.
   Target: the node within 3% of plain diffusers (no verdict when the rounds' spread leaves it open:
   bench/_common.py compare).
2. Warm vs cold. A cold load+run (empty cache: ``SDXLCNLoader().load`` reads the models from disk,
   then the sampler runs) against a warm one (the same loader call again, answered from the pipeline
   cache, then the same run), interleaved. Target: the warm run's loading time is under 1% of the
   cold load time.

Run:   .venv/bin/python bench/overhead.py                 (about 2 minutes on 2 shared cores)
       .venv/bin/python bench/overhead.py --repeat 15     (more repetitions)
       .venv/bin/python bench/overhead.py --size 512      (bigger images: the fixed overhead matters less)
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import fields

import _common as C
from sdxl_controlnet_img2img.pipeline.request import GenerationRequest

NODE_TARGET = 1.03
WARM_LOAD_TARGET = 0.01

# fal's defaults, from the request module (where they are written once)
FAL_DEFAULTS = {f.name: f.default for f in fields(GenerationRequest) if f.name in (
    "negative_prompt", "controlnet_conditioning_scale", "num_inference_steps", "guidance_scale", "strength",
    "num_images")}


def node_widgets(prompt: str, seed: int) -> dict:
    return {**FAL_DEFAULTS, "prompt": prompt, "image_size": "none", "width": 1024, "height": 1024, "seed": seed,
            "enable_safety_checker": False, "expand_prompt": False}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    ap.add_argument("--repeat", type=int, default=7, help="timed rounds of each side (default 7)")
    ap.add_argument("--cold-repeat", type=int, default=3, help="cold/warm rounds (default 3)")
    ap.add_argument("--models", default=str(C.ROOT / ".tiny-models"), help="where the tiny models are built/reused")
    ap.add_argument("--json", action="store_true", help="also write bench/results/overhead.json")
    args = ap.parse_args(argv)

    import cv2
    import numpy as np
    import torch
    from PIL import Image

    from sdxl_controlnet_img2img.nodes.loader import SDXLCNLoader
    from sdxl_controlnet_img2img.nodes.sampler import SDXLCNImg2Img
    from sdxl_controlnet_img2img.pipeline.handle import PipelineHandle
    from sdxl_controlnet_img2img.pipeline.local.models.loading import free_cached_pipeline, load_pipeline
    from sdxl_controlnet_img2img.pipeline.local.tiny_models import build_tiny_models

    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    paths = build_tiny_models(args.models)
    ckpt, cn = str(paths["checkpoint"]), str(paths["controlnet"])
    print(f"hardware: {C.hardware_line()}")
    d = FAL_DEFAULTS
    steps, strength = d["num_inference_steps"], d["strength"]
    print(f"tiny SDXL + ControlNet (random weights) on the CPU in fp32, {args.size}x{args.size}, fal defaults "
          f"({int(steps * strength)} of {steps} steps, CFG {d['guidance_scale']:g}, ControlNet "
          f"{d['controlnet_conditioning_scale']:g})\n")

    prompt, seed = "ice fortress, aurora skies", 42
    init_u8 = C.synthetic_photo(args.size, args.size, seed=1, scene="photo")
    ctl_u8 = C.synthetic_photo(args.size, args.size, seed=2, scene="photo")
    init_t, ctl_t = C.image_batch([init_u8]), C.image_batch([ctl_u8])
    init_pil = Image.fromarray(init_u8)

    free_cached_pipeline()
    pipe = load_pipeline(ckpt, cn, device="cpu", dtype=torch.float32)
    handle = PipelineHandle(pipe)
    sampler = SDXLCNImg2Img()

    def run_node():
        return sampler.sample(pipeline=handle, image=init_t, control_image=ctl_t, apply_canny=True,
                              **node_widgets(prompt, seed))[0]

    def run_diffusers():
        edges = cv2.Canny(ctl_u8, 100, 200)
        control = Image.fromarray(np.repeat(edges[:, :, None], 3, axis=2))
        return pipe(prompt=prompt, negative_prompt=d["negative_prompt"], image=init_pil, control_image=control,
                    height=args.size, width=args.size, strength=strength, num_inference_steps=steps,
                    guidance_scale=d["guidance_scale"],
                    controlnet_conditioning_scale=d["controlnet_conditioning_scale"], num_images_per_prompt=d["num_images"],
                    generator=torch.Generator("cpu").manual_seed(seed), output_type="pil").images[0]

    # --- 1. node overhead
    a = np.round(run_node()[0].numpy() * 255).astype(np.uint8)
    b = np.asarray(run_diffusers())
    same = np.array_equal(a, b)
    print(f"node output pixel-equal to plain diffusers: {same}")
    times = C.interleaved({"diffusers": run_diffusers, "node": run_node}, repeat=args.repeat, warmup=0)
    d, n = C.median(times["diffusers"]), C.median(times["node"])
    node_ratio = n / d
    print(f"plain diffusers call     {C.fmt_s(d):>10}  (median of {args.repeat})")
    print(f"SDXLCNImg2Img node       {C.fmt_s(n):>10}")
    print("all (s): diffusers " + " ".join(f"{x:.2f}" for x in times["diffusers"])
          + " | node " + " ".join(f"{x:.2f}" for x in times["node"]))
    print(f"node / diffusers         {node_ratio:10.3f}  ({(node_ratio - 1) * 100:+.1f}%)\n")

    # --- 2. warm vs cold, through the loader node and its cache
    loader = SDXLCNLoader()

    def load_and_run():
        t = time.perf_counter()
        (h,) = loader.load(checkpoint=ckpt, controlnet=cn, dtype="fp32", memory_mode="none", vae_tiling=False,
                           device="cpu")
        load_s = time.perf_counter() - t
        t = time.perf_counter()
        sampler.sample(pipeline=h, image=init_t, control_image=ctl_t, apply_canny=True, **node_widgets(prompt, seed))
        return load_s, time.perf_counter() - t

    del handle, pipe
    cold_load, cold_run, warm_load, warm_run = [], [], [], []
    for _ in range(args.cold_repeat):
        free_cached_pipeline()
        load_s, run_s = load_and_run()
        cold_load.append(load_s)
        cold_run.append(run_s)
        load_s, run_s = load_and_run()
        warm_load.append(load_s)
        warm_run.append(run_s)
    cl, wl = C.median(cold_load), C.median(warm_load)
    warm_ratio = wl / cl
    print(f"cold: load {C.fmt_s(cl):>10} + run {C.fmt_s(C.median(cold_run)):>10}  (median of {args.cold_repeat})")
    print(f"warm: load {C.fmt_s(wl):>10} + run {C.fmt_s(C.median(warm_run)):>10}")
    print(f"warm load / cold load    {warm_ratio * 100:9.3f}%   "
          f"(warm total / cold total {(wl + C.median(warm_run)) / (cl + C.median(cold_run)):.3f})\n")

    # judged on the interleaved rounds' own ratios: a busy spell that slows a whole round cancels out
    ok_node = C.compare(times["node"], times["diffusers"], NODE_TARGET, paired=True)
    ok_warm = C.compare(warm_load, cold_load, WARM_LOAD_TARGET, paired=True)
    print(C.check(ok_node, f"node overhead within {(NODE_TARGET - 1) * 100:.0f}% of plain diffusers "
                           f"({(node_ratio - 1) * 100:+.1f}%)"))
    print(C.check(ok_warm, f"warm run spends under {WARM_LOAD_TARGET * 100:.0f}% of the cold load time on loading "
                           f"({warm_ratio * 100:.3f}%)"))
    print(C.check(same, "node output pixel-equal to plain diffusers"))
    if args.json:
        C.RESULTS.mkdir(parents=True, exist_ok=True)
        (C.RESULTS / "overhead.json").write_text(json.dumps({
            "hardware": C.hardware_line(), "size": args.size, "diffusers_s": times["diffusers"],
            "node_s": times["node"], "node_ratio": node_ratio, "cold_load_s": cold_load, "cold_run_s": cold_run,
            "warm_load_s": warm_load, "warm_run_s": warm_run, "warm_load_ratio": warm_ratio,
            "node_ok": ok_node.ok, "warm_ok": ok_warm.ok, "pixel_equal": same}, indent=2))
    free_cached_pipeline()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
