"""Full-size SDXL + ControlNet on the CPU: our loader and sampler next to ComfyUI's own, on the same files.

Writes random-weight full-size models into ``--scratch`` (reused when present; needs about 9.5 GB of disk and,
while writing, about 14 GiB of RAM): an SDXL base as one ``.safetensors`` in the original SGM layout (fp16, 6.9 GB)
and an SDXL ControlNet in the diffusers layout as one file (fp16, 2.5 GB; its zero convs re-initialised so it
acts). Then, each in a fresh process (so peak RSS is the load's own): our loader in bf16 and, when ``COMFYUI_DIR``
(and ``COMFYUI_PYTHON``) point at a ComfyUI checkout, ComfyUI's CheckpointLoaderSimple + ControlNetLoader with
``--cpu --bf16-unet``: first load, second load in the same process, peak RSS (each side's library modules are
imported before its clock starts, as ComfyUI's are when its loaders run); then one generation at 512x512,
2 denoising steps (ours: the sampler's request at strength 0.95; ComfyUI: CLIPTextEncode, ControlNetApplyAdvanced
at 0.5, VAEEncode, KSampler at denoise 0.95, VAEDecode). Prints ratios ours / ComfyUI; ``--json`` writes
bench/results/fullsize.json.

    .venv/bin/python bench/fullsize.py --scratch /work/fullsize
    COMFYUI_DIR=/work/comfyui COMFYUI_PYTHON=/work/comfyui-venv/bin/python .venv/bin/python bench/fullsize.py --scratch /work/fullsize
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import _common as C

BASE = "sdxl_fullsize_random.safetensors"
CONTROLNET = "controlnet_fullsize_random.safetensors"
SIZE, STEPS, STRENGTH = 512, 3, 0.95  # 3 scheduled x 0.95 -> 2 steps run (ours); ComfyUI: steps 2 at denoise 0.95


def write_models(scratch: Path) -> None:
    """Random-weight full-size SDXL (SGM single file) and ControlNet (diffusers single file), fp16."""
    import torch
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    sys.path.insert(0, str(C.ROOT / "tests"))
    from test_loading_single_file import pipeline_to_sgm  # the tests' SGM writer (diffusers -> original names)

    from sdxl_controlnet_img2img.pipeline.local.sdxl_config import CONTROLNET_SDXL_CONFIG, SDXL_BASE_CONFIG as B

    from sdxl_controlnet_img2img.pipeline.local.quiet import drop_known_noise

    drop_known_noise()
    scratch.mkdir(parents=True, exist_ok=True)
    if not (scratch / BASE).is_file():
        print("writing the full-size SDXL base (a few minutes)...", file=sys.stderr)
        torch.manual_seed(0)
        parts = {
            "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(B / "unet")),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(B / "vae")),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(B / "text_encoder")),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(B / "text_encoder_2")),
        }
        for m in parts.values():
            m.to(torch.float16)
        sd = pipeline_to_sgm(parts)
        del parts
        save_file(sd, str(scratch / (BASE + ".part")))
        del sd
        os.replace(scratch / (BASE + ".part"), scratch / BASE)
    if not (scratch / CONTROLNET).is_file():
        print("writing the full-size SDXL ControlNet...", file=sys.stderr)
        torch.manual_seed(1)
        cn = ControlNetModel.from_config(ControlNetModel.load_config(CONTROLNET_SDXL_CONFIG)).to(torch.float16)
        with torch.no_grad():  # a fresh ControlNet's output convs are zero: it would act on nothing
            for conv in [*cn.controlnet_down_blocks, cn.controlnet_mid_block]:
                conv.weight.normal_(0, 0.02)
        save_file({k: v.contiguous() for k, v in cn.state_dict().items()}, str(scratch / (CONTROLNET + ".part")))
        os.replace(scratch / (CONTROLNET + ".part"), scratch / CONTROLNET)


OURS = r"""
import json, resource, sys, time
scratch, base, cn, size, steps, strength, generate_too = sys.argv[1:8]
from sdxl_controlnet_img2img.pipeline.local.loading import LoadOptions, build_pipeline
from sdxl_controlnet_img2img.pipeline.local.generate import generate
from sdxl_controlnet_img2img.pipeline.request import GenerationRequest
from PIL import Image
# the libraries' modules imported before the clock starts, as ComfyUI's are before its loaders run
import diffusers, transformers
from diffusers import AutoencoderKL, ControlNetModel, StableDiffusionXLControlNetImg2ImgPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
out = {}
opts = LoadOptions(device="cpu", dtype="bf16")
t = time.perf_counter(); pipe = build_pipeline(f"{scratch}/{base}", f"{scratch}/{cn}", opts)
out["load_s"] = time.perf_counter() - t
out["load_peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
del pipe
import gc; gc.collect()
t = time.perf_counter(); pipe = build_pipeline(f"{scratch}/{base}", f"{scratch}/{cn}", opts)
out["second_load_s"] = time.perf_counter() - t
if generate_too == "1":
    size = int(size)
    img = Image.new("RGB", (size, size), (120, 140, 200))
    req = GenerationRequest.from_dict({"prompt": "a castle", "image_url": img, "control_image_url": img, "seed": 1,
                                       "num_inference_steps": int(steps), "strength": float(strength),
                                       "image_size": {"width": size, "height": size}})
    t = time.perf_counter(); generate(pipe, req)
    out["generate_s"] = time.perf_counter() - t
print("RESULT " + json.dumps(out))
"""

COMFY = r"""
import json, resource, sys, time
comfy_dir, scratch, base, cn, size, generate_too = sys.argv[1:7]
sys.argv = [comfy_dir + "/main.py", "--cpu", "--bf16-unet"]
sys.path.insert(0, comfy_dir)
import comfy.options; comfy.options.enable_args_parsing()
import folder_paths
folder_paths.add_model_folder_path("checkpoints", scratch)
folder_paths.add_model_folder_path("controlnet", scratch)
import nodes, torch
out = {}
def load():
    m, c, v = nodes.CheckpointLoaderSimple().load_checkpoint(base)[:3]
    ctl = nodes.ControlNetLoader().load_controlnet(cn)[0]
    return m, c, v, ctl
t = time.perf_counter(); model, clip, vae, ctl = load()
out["load_s"] = time.perf_counter() - t
out["load_peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
del model, clip, vae, ctl
import gc; gc.collect()
t = time.perf_counter(); model, clip, vae, ctl = load()
out["second_load_s"] = time.perf_counter() - t
if generate_too == "1":
    size = int(size)
    pixels = torch.full((1, size, size, 3), 0.6)
    t = time.perf_counter()
    pos = nodes.CLIPTextEncode().encode(clip, "a castle")[0]
    neg = nodes.CLIPTextEncode().encode(clip, "")[0]
    pos, neg = nodes.ControlNetApplyAdvanced().apply_controlnet(pos, neg, ctl, pixels, 0.5, 0.0, 1.0, vae=vae)[:2]
    latent = nodes.VAEEncode().encode(vae, pixels)[0]
    samples = nodes.KSampler().sample(model, 1, 2, 7.5, "euler", "normal", pos, neg, latent, denoise=0.95)[0]
    nodes.VAEDecode().decode(vae, samples)
    out["generate_s"] = time.perf_counter() - t
print("RESULT " + json.dumps(out))
"""


def run_child(cmd: list[str], env: dict) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scratch", required=True, type=Path, help="folder for the full-size model files (~9.5 GB)")
    ap.add_argument("--no-generate", action="store_true", help="measure loading only")
    ap.add_argument("--json", action="store_true", help="write bench/results/fullsize.json")
    args = ap.parse_args(argv)
    write_models(args.scratch)
    weights = (args.scratch / BASE).stat().st_size + (args.scratch / CONTROLNET).stat().st_size
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    gen = "0" if args.no_generate else "1"
    print(f"hardware: {C.hardware_line()}")
    print(f"weights: {weights / 1e9:.2f} GB on disk (fp16); loading in bf16 on the CPU; generation {SIZE}x{SIZE}, "
          "2 denoising steps")
    ours = run_child([sys.executable, "-c", OURS, str(args.scratch), BASE, CONTROLNET, str(SIZE), str(STEPS),
                      str(STRENGTH), gen], env)
    results = {"weights_bytes": weights, "ours": ours}
    comfy_dir = os.environ.get("COMFYUI_DIR")
    if comfy_dir and (Path(comfy_dir) / "main.py").is_file():
        python = os.environ.get("COMFYUI_PYTHON", sys.executable)
        results["comfyui"] = run_child([python, "-c", COMFY, comfy_dir, str(args.scratch), BASE, CONTROLNET,
                                        str(SIZE), gen], dict(env, PYTHONPATH=comfy_dir))
    else:
        print("COMFYUI_DIR is not set: ours alone (no ComfyUI baseline)")
    comfy = results.get("comfyui")
    for key, label in (("load_s", "first load"), ("second_load_s", "second load"), ("load_peak_rss", "peak RSS (load)"),
                       ("generate_s", "one generation")):
        if key not in ours:
            continue
        fmt = (lambda v: f"{v / 2**30:6.2f} GiB") if key.endswith("rss") else (lambda v: f"{v:7.1f} s")
        line = f"{label:18s} ours {fmt(ours[key])}"
        if comfy and key in comfy:
            line += f"   ComfyUI {fmt(comfy[key])}   ratio {ours[key] / comfy[key]:.2f}x"
        if key == "load_peak_rss":
            line += f"   ({ours[key] / weights:.2f}x the weight files)"
        print(line)
    if args.json:
        C.RESULTS.mkdir(parents=True, exist_ok=True)
        (C.RESULTS / "fullsize.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
