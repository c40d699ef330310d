"""Full-size SDXL + ControlNet on the CPU: our loader and sampler next to ComfyUI's own, on the same files.

Writes random-weight full-size models into ``--scratch`` (reused when present; needs about 9.5 GB of disk and,
while writing, about 14 GiB of RAM): an SDXL base as one ``.safetensors`` in the original SGM layout (fp16, 6.9 GB)
and an SDXL ControlNet in the diffusers layout as one file (fp16, 2.5 GB; its zero convs re-initialised so it
acts). The writing runs in a child and each load in a fresh process, so a load's peak RSS is its own (read as
``VmHWM``: ``ru_maxrss`` carries a parent's peak into its children, see ``_common.own_peak_rss``). Each side: our
loader in bf16 and, when ``COMFYUI_DIR`` (and ``COMFYUI_PYTHON``) point at a ComfyUI checkout, ComfyUI's
CheckpointLoaderSimple + ControlNetLoader with ``--cpu --bf16-unet``: first load (wall and CPU seconds), second load
in the same process, peak RSS (each side's library modules are imported before its clock starts, as ComfyUI's are
when its loaders run).

Neither side can be favoured by going first (the first reader of a file may find it outside the page cache, the
second inside): ``--rounds`` rounds (default 3) alternate which side starts, the report gives medians, the ratio
in each order, and how much of its files was in the page cache when each process started. ``--page-cache warm``
reads the side's own files before its process, ``cold`` drops them from the page cache (their pages only). On a
shared machine the CPU seconds of the load move less with other work than the wall seconds.

Round 1 also times one generation at 512x512, 2 denoising steps (ours: the sampler's request at strength 0.95;
ComfyUI: CLIPTextEncode, ControlNetApplyAdvanced at 0.5, VAEEncode, KSampler at denoise 0.95, VAEDecode).
Prints ratios ours / ComfyUI; ``--json`` writes bench/results/fullsize.json.

``--base-layout folder`` loads the SDXL base from a diffusers folder instead (``models/diffusers``'s layout, written
once into ``--scratch`` from the single file's weights, fp16, 6.9 GB more): ours from the folder, ours from the single
file (the figure the folder is held to) and ComfyUI's DiffusersLoader + ControlNetLoader, the three in turn.

``--fast`` instead times fal's defaults (25 steps x 0.95 = 23 run, CFG 7.5) against the ``_fast`` workflow's
settings (4 x 0.95 = 3 run, CFG 1.0, euler_trailing, with a rank-64 UNet LoRA written once into ``--scratch``) on
our pipeline, in one process, alternating, at ``--fast-size`` (default 256), in fp32 (what ``dtype auto`` picks on
the CPU: on a CPU without AVX512-BF16 a bf16 convolution runs ~80x slower than fp32's; the models then take ~20 GB
of RAM).

    .venv/bin/python bench/fullsize.py --scratch /work/fullsize
    COMFYUI_DIR=/work/comfyui COMFYUI_PYTHON=/work/comfyui-venv/bin/python .venv/bin/python bench/fullsize.py \
        --scratch /work/fullsize --no-generate --rounds 4
    .venv/bin/python bench/fullsize.py --scratch /work/fullsize --fast --rounds 2
    COMFYUI_DIR=... COMFYUI_PYTHON=... .venv/bin/python bench/fullsize.py --scratch /work/fullsize --no-generate \
        --base-layout folder --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import _common as C

from sdxl_controlnet_img2img.pipeline.request import DEFAULTS

BASE = "sdxl_fullsize_random.safetensors"
CONTROLNET = "controlnet_fullsize_random.safetensors"
BASE_FOLDER = "sdxl_fullsize_random_diffusers"  # --base-layout folder: the same base as a diffusers folder
LORA = "lora_fullsize_random_rank64.safetensors"  # --fast: a few-step LoRA's shape, random values
BENCH = str(Path(__file__).resolve().parent)  # the children import _common from here
SIZE, STEPS, STRENGTH = 512, 3, DEFAULTS["strength"]  # 3 scheduled x 0.95 -> 2 run (ours); ComfyUI: 2 at denoise 0.95


def write_models(scratch: Path) -> None:
    """Random-weight full-size SDXL (SGM single file) and ControlNet (diffusers single file), fp16."""
    import torch
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    sys.path[:0] = [str(C.ROOT / "tests"), str(C.ROOT / "tests" / "helpers")]
    from test_loading_single_file import pipeline_to_sgm  # the tests' SGM writer (diffusers -> original names)

    from sdxl_controlnet_img2img.pipeline.local.models.sdxl_config import CONTROLNET_SDXL_CONFIG, SDXL_BASE_CONFIG as B

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


def write_base_folder(scratch: Path) -> None:
    """The single file's SDXL base saved as a diffusers folder (fp16 safetensors, the tokenizers and scheduler
    config our loader reads with the file), through our own loader: the same weights in the other layout."""
    folder = scratch / BASE_FOLDER
    if (folder / "model_index.json").is_file():
        return
    import shutil

    import torch
    from diffusers import StableDiffusionXLPipeline

    from sdxl_controlnet_img2img.pipeline.local.models.loading import LoadOptions, build_pipeline

    print("writing the full-size SDXL base as a diffusers folder...", file=sys.stderr)
    pipe = build_pipeline(scratch / BASE, scratch / CONTROLNET, LoadOptions(device="cpu", dtype="bf16"))
    parts = {k: getattr(pipe, k) for k in ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
                                           "unet", "scheduler")}
    del pipe
    for k in ("vae", "text_encoder", "text_encoder_2", "unet"):
        parts[k].to(torch.float16)
    part = scratch / (BASE_FOLDER + ".part")
    shutil.rmtree(part, ignore_errors=True)
    StableDiffusionXLPipeline(**parts).save_pretrained(str(part), safe_serialization=True)
    os.replace(part, folder)


OURS = r"""
import json, sys, time
bench, scratch, base, cn, size, steps, strength, generate_too = sys.argv[1:9]
sys.path.insert(0, bench)
from _common import own_peak_rss
from sdxl_controlnet_img2img.pipeline.local.models.loading import LoadOptions, build_pipeline
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
t, c = time.perf_counter(), time.process_time()
pipe = build_pipeline(f"{scratch}/{base}", f"{scratch}/{cn}", opts)
out["load_s"], out["load_cpu_s"] = time.perf_counter() - t, time.process_time() - c
out["load_peak_rss"] = own_peak_rss()
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
import json, sys, time
bench, comfy_dir, scratch, base, cn, size, generate_too, cn_scale, cfg, denoise = sys.argv[1:11]
sys.path.insert(0, bench)
from _common import own_peak_rss
sys.argv = [comfy_dir + "/main.py", "--cpu", "--bf16-unet"]
sys.path.insert(0, comfy_dir)
import comfy.options; comfy.options.enable_args_parsing()
import folder_paths
for kind in ("checkpoints", "controlnet", "diffusers"):
    folder_paths.add_model_folder_path(kind, scratch)
import os, nodes, torch
out = {}
def load():
    if os.path.isdir(os.path.join(scratch, base)):  # a diffusers folder: ComfyUI's DiffusersLoader
        m, c, v = nodes.DiffusersLoader().load_checkpoint(base)[:3]
    else:
        m, c, v = nodes.CheckpointLoaderSimple().load_checkpoint(base)[:3]
    ctl = nodes.ControlNetLoader().load_controlnet(cn)[0]
    return m, c, v, ctl
t, c = time.perf_counter(), time.process_time()
model, clip, vae, ctl = load()
out["load_s"], out["load_cpu_s"] = time.perf_counter() - t, time.process_time() - c
out["load_peak_rss"] = own_peak_rss()
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
    pos, neg = nodes.ControlNetApplyAdvanced().apply_controlnet(pos, neg, ctl, pixels, float(cn_scale), 0.0, 1.0, vae=vae)[:2]
    latent = nodes.VAEEncode().encode(vae, pixels)[0]
    samples = nodes.KSampler().sample(model, 1, 2, float(cfg), "euler", "normal", pos, neg, latent,
                                     denoise=float(denoise))[0]
    nodes.VAEDecode().decode(vae, samples)
    out["generate_s"] = time.perf_counter() - t
print("RESULT " + json.dumps(out))
"""


FAST = r"""
import json, sys, time
scratch, base, cn, size, rounds, lora = sys.argv[1:7]
size, rounds = int(size), int(rounds)
from pathlib import Path
from PIL import Image
from sdxl_controlnet_img2img.pipeline.local.models.loading import LoadOptions, build_pipeline
from sdxl_controlnet_img2img.pipeline.local.generate import generate
from sdxl_controlnet_img2img.pipeline.request import GenerationRequest
pipe = build_pipeline(f"{scratch}/{base}", f"{scratch}/{cn}", LoadOptions(device="cpu", dtype="fp32"))
lora_path = Path(scratch) / lora
if not lora_path.is_file():  # a few-step LoRA's shape (SDXL-Lightning: rank 64 on the UNet's attention), small values
    sys.path.insert(0, sys.argv[7])
    from lora_factory import kohya_state_dict, write
    write(kohya_state_dict(pipe, seed=3, rank=64, alpha=64.0, amp=0.01, te=False), Path(str(lora_path) + ".part"))
    Path(str(lora_path) + ".part").replace(lora_path)
img = Image.new("RGB", (size, size), (120, 140, 200))
common = {"prompt": "a castle", "image_url": img, "control_image_url": img, "seed": 1,
          "image_size": {"width": size, "height": size}}
settings = {  # fal's defaults (the request's own: 25 steps x 0.95 = 23 run, CFG 7.5) and the _fast workflow's
    "defaults": GenerationRequest.from_dict(dict(common)),
    "fast": GenerationRequest.from_dict(dict(common, num_inference_steps=4, guidance_scale=1.0, strength=0.95,
                                             local_scheduler="euler_trailing",
                                             loras=[{"path": str(lora_path), "scale": 1.0}])),
}
generate(pipe, settings["fast"])  # warm-up: reads the LoRA (kept as an adapter), first-call costs of each path
generate(pipe, GenerationRequest.from_dict(dict(common, num_inference_steps=2)))
times = {k: [] for k in settings}
for r in range(rounds):
    for name in (("defaults", "fast") if r % 2 == 0 else ("fast", "defaults")):
        t = time.perf_counter(); generate(pipe, settings[name]); times[name].append(time.perf_counter() - t)
print("RESULT " + json.dumps(times))
"""


def in_child(writer: str, scratch: Path) -> None:
    """Run this module's ``writer(scratch)`` in a child process: the ~14 GiB a full-size build allocates stays out of
    the bench's own process, whose memory the measured sides would otherwise compete with."""
    subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
                    f"import fullsize; fullsize.{writer}(Path(sys.argv[2]))", BENCH, str(scratch)], check=True)


def run_child(cmd: list[str], env: dict) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def cached_fraction(path: Path) -> float:
    """The share of the file's pages in the page cache now (mincore on a mapping of it; Linux). NaN if unknown."""
    import ctypes
    import mmap

    size = path.stat().st_size
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    with open(path, "rb") as f:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, f.fileno(), 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        return float("nan")
    try:
        vec = (ctypes.c_ubyte * pages)()
        if libc.mincore(addr, size, vec) != 0:
            return float("nan")
        return sum(b & 1 for b in bytes(vec)) / pages
    finally:
        libc.munmap(addr, size)


def set_page_cache(paths, how: str) -> None:
    """'warm': read the files once (into the page cache, as far as memory allows); 'cold': drop their pages
    (posix_fadvise DONTNEED: this file's clean pages only); 'asis': leave it."""
    if how == "asis":
        return
    for path in paths:
        with open(path, "rb") as f:
            if how == "cold":
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            elif how == "warm":
                while f.read(1 << 24):
                    pass


def load_line() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} CPUs"


def run_fast(args, env) -> None:
    """fal's defaults against the _fast workflow's settings, on the full-size models, one process, alternating."""
    print(f"hardware: {C.hardware_line()}; {load_line()}")
    print(f"generation {args.fast_size}x{args.fast_size} in fp32 on the CPU; defaults: 25 steps x 0.95 = 23 run, "
          "CFG 7.5, default scheduler, no LoRA; _fast: 4 x 0.95 = 3 run, CFG 1.0, euler_trailing, a rank-64 "
          f"UNet LoRA (random, SDXL-Lightning's shape); {args.rounds} rounds, order alternating")
    times = run_child([sys.executable, "-c", FAST, str(args.scratch), BASE, CONTROLNET, str(args.fast_size),
                       str(args.rounds), LORA, str(C.ROOT / "tests" / "helpers")], env)
    d, f = C.median(times["defaults"]), C.median(times["fast"])
    print("defaults  " + " ".join(f"{t:.1f}" for t in times["defaults"]) + f" s   median {d:.1f} s")
    print("_fast     " + " ".join(f"{t:.1f}" for t in times["fast"]) + f" s   median {f:.1f} s")
    print(f"_fast is {d / f:.1f}x faster than fal's defaults (median over median); {load_line()}")
    if args.json:
        C.RESULTS.mkdir(parents=True, exist_ok=True)
        (C.RESULTS / "fullsize_fast.json").write_text(json.dumps({"size": args.fast_size, **times}, indent=2))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scratch", required=True, type=Path, help="folder for the full-size model files (~9.5 GB)")
    ap.add_argument("--no-generate", action="store_true", help="measure loading only")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of both sides (the first side alternates)")
    ap.add_argument("--page-cache", choices=("asis", "warm", "cold"), default="asis",
                    help="before each side's process: leave the page cache, read its files into it, or drop them")
    ap.add_argument("--fast", action="store_true", help="time fal's defaults against the _fast settings instead")
    ap.add_argument("--fast-size", type=int, default=256, help="picture size for --fast")
    ap.add_argument("--base-layout", choices=("file", "folder"), default="file",
                    help="the SDXL base as the single file or as a diffusers folder (ours from the single file too)")
    ap.add_argument("--json", action="store_true", help="write bench/results/fullsize.json")
    args = ap.parse_args(argv)
    in_child("write_models", args.scratch)
    folder = args.base_layout == "folder"
    if folder and not (args.scratch / BASE_FOLDER / "model_index.json").is_file():
        in_child("write_base_folder", args.scratch)
    base = BASE_FOLDER if folder else BASE
    loaded = [*sorted((args.scratch / BASE_FOLDER).glob("*/*.safetensors"))] if folder else [args.scratch / BASE]
    loaded.append(args.scratch / CONTROLNET)
    weights = sum(f.stat().st_size for f in loaded)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if args.fast:
        run_fast(args, env)
        return 0
    comfy_dir = os.environ.get("COMFYUI_DIR")
    if not (comfy_dir and (Path(comfy_dir) / "main.py").is_file()):
        comfy_dir = None
        print("COMFYUI_DIR is not set: ours alone (no ComfyUI baseline)")
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    print(f"hardware: {C.hardware_line()}; {load_line()}")
    print(f"weights: {weights / 1e9:.2f} GB on disk (fp16); loading in bf16 on the CPU; {args.rounds} rounds, each "
          f"side in a fresh process, the first side alternating; page cache: {args.page_cache}"
          + ("" if args.no_generate else f"; one generation {SIZE}x{SIZE}, 2 denoising steps, in round 1"))

    def side(name: str, generate: bool) -> dict:
        its = ([args.scratch / BASE, args.scratch / CONTROLNET] if name == "ours_file" else loaded)
        set_page_cache(its, args.page_cache)  # the side's own files (both layouts may not fit in memory)
        cached = sum(cached_fraction(f) * f.stat().st_size for f in its) / sum(f.stat().st_size for f in its)
        gen = "1" if generate else "0"
        if name.startswith("ours"):
            out = run_child([sys.executable, "-c", OURS, BENCH, str(args.scratch),
                             BASE if name == "ours_file" else base, CONTROLNET, str(SIZE), str(STEPS), str(STRENGTH),
                             gen], env)
        else:
            out = run_child([python, "-c", COMFY, BENCH, comfy_dir, str(args.scratch), base, CONTROLNET, str(SIZE),
                             gen, str(DEFAULTS["controlnet_conditioning_scale"]), str(DEFAULTS["guidance_scale"]),
                             str(STRENGTH)], dict(env, PYTHONPATH=comfy_dir))
        out["cached_at_start"] = cached
        return out

    sides = ["ours", *(["ours_file"] if folder else []), *(["comfyui"] if comfy_dir else [])]
    if folder:
        print("ours = our loader on the diffusers folder; ours_file = on the single file; ComfyUI = DiffusersLoader")
    rounds = []
    for r in range(args.rounds):
        order = sides[r % len(sides):] + sides[:r % len(sides)]  # each side goes first in turn
        got = {n: side(n, generate=(r == 0 and not args.no_generate)) for n in order}
        rounds.append({"first": order[0], **got})
        line = f"round {r + 1} ({order[0]} first):"
        for n in order:
            o = got[n]
            line += (f"  {n} {o['load_s']:.1f} s (CPU {o['load_cpu_s']:.1f} s, files {o['cached_at_start']:.0%} "
                     f"in the page cache at its start)")
        print(line, flush=True)
    print(load_line())
    report(rounds, weights, bool(comfy_dir))
    if args.json:
        C.RESULTS.mkdir(parents=True, exist_ok=True)
        (C.RESULTS / "fullsize.json").write_text(json.dumps({"weights_bytes": weights, "rounds": rounds}, indent=2))
    return 0


def report(rounds: list, weights: int, comfy: bool) -> None:
    def med(side, key):
        vals = [r[side][key] for r in rounds if key in r.get(side, {})]
        return C.median(vals) if vals else None

    for key, label in (("load_s", "first load"), ("load_cpu_s", "first load, CPU"), ("second_load_s", "second load"),
                       ("load_peak_rss", "peak RSS (load)"), ("generate_s", "one generation")):
        ours = med("ours", key)
        if ours is None:
            continue
        fmt = (lambda v: f"{v / 2**30:6.2f} GiB") if key.endswith("rss") else (lambda v: f"{v:7.1f} s")
        line = f"{label:18s} ours {fmt(ours)}"
        own_file = med("ours_file", key)
        if own_file:
            line += f"   ours (single file) {fmt(own_file)}   folder / file {ours / own_file:.2f}x"
        theirs = med("comfyui", key) if comfy else None
        if theirs:
            line += f"   ComfyUI {fmt(theirs)}   ratio {ours / theirs:.2f}x (medians)"
        if key == "load_peak_rss":
            worst = max(r["ours"][key] for r in rounds)
            line += f"   ({ours / weights:.2f}x the weight files; largest {worst / weights:.2f}x)"
        if key in ("load_s", "load_cpu_s") and theirs:
            for first in ("ours", "ours_file", "comfyui"):
                ratios = [r["ours"][key] / r["comfyui"][key] for r in rounds if r["first"] == first]
                if ratios:
                    line += f"; {first} first: {C.median(ratios):.2f}x (n={len(ratios)})"
        print(line)
    if comfy and all("comfyui" in r for r in rounds):
        ours, theirs = [r["ours"]["load_s"] for r in rounds], [r["comfyui"]["load_s"] for r in rounds]
        print(C.check(C.compare(ours, theirs, 1.0, paired=True), "first load <= 1.0x ComfyUI's (paired by round)"))
        ours, theirs = [r["ours"]["load_cpu_s"] for r in rounds], [r["comfyui"]["load_cpu_s"] for r in rounds]
        print(C.check(C.compare(ours, theirs, 1.0, paired=True), "first load's CPU seconds <= 1.0x ComfyUI's"))
    if all("ours_file" in r for r in rounds):
        ours, theirs = [r["ours"]["load_s"] for r in rounds], [r["ours_file"]["load_s"] for r in rounds]
        print(C.check(C.compare(ours, theirs, 1.0, paired=True), "first load of the folder <= 1.0x the single file's"))
    worst = max(r["ours"]["load_peak_rss"] for r in rounds) / weights
    print(C.check(worst <= 1.1, f"peak RSS of every first load <= 1.1x the weight files ({worst:.2f}x)"))


if __name__ == "__main__":
    raise SystemExit(main())
