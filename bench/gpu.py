"""GPU: SDXL + ControlNet img2img at fal's defaults, 1024², with each speed option, against plain diffusers.

Rows, all in one process and on the same weights (fal defaults: 25 steps x strength 0.95 = 23 steps run,
CFG 7.5, ControlNet 0.5, one 1024x1024 image; warm median of ``--repeat`` requests each):

  diffusers      the plain StableDiffusionXLControlNetImg2ImgPipeline in fp16 (what a diffusers user writes)
  fp16+sdpa      this pack: ``generate()`` on the pipeline placed by the loader (``attention="sdpa"``)
  +channels-last UNet, ControlNet and VAE in channels-last memory format
  +fp16-fix VAE  a VAE that decodes in fp16 without the fp32 upcast (sdxl-vae-fp16-fix; with random weights a
                 VAE of the same architecture with ``force_upcast=False`` stands in: speed and memory do not
                 depend on the weights' values)
  +compile       ``torch.compile`` of the UNet and ControlNet (the loader's ``compile=True``); compile time reported apart
  model offload  the loader's ``memory_mode="model_cpu_offload"`` (with the fp16-fix VAE, no compile)

For each: seconds per request, steps/s (steps run / seconds per request, VAE and text encoders included)
and peak GPU memory (``torch.cuda.max_memory_allocated``). Prints a table and writes JSON to
``bench/results/gpu-<time>.json``. Targets (issue 9, on an H100): <= 2.0 s without compile, <= 1.5 s with it,
never slower than plain diffusers, peak < 12 GB without offload and < 8 GB with model offload.

Weights: ``--checkpoint`` and ``--controlnet`` (and optionally ``--vae``, e.g. sdxl-vae-fp16-fix) load real
models by path with the pack's loader. Without them the full SDXL base and SDXL ControlNet architectures are
built with random weights from the configs bundled in ``pipeline/local/models/configs/`` (no download anywhere).

Without a CUDA GPU it prints ``no CUDA GPU found: ...`` and exits 0.

Run on a GPU machine:
    python bench/gpu.py                         # random-init full-size models, --repeat 5
    python bench/gpu.py --checkpoint sd_xl_base_1.0.safetensors --controlnet diffusers_xl_canny_full.safetensors \
        --vae sdxl-vae-fp16-fix --repeat 10
    python bench/gpu.py --rows diffusers,fp16+sdpa,+compile

On a GPU machine with no network and no diffusers (torch with CUDA is there): download the wheels here and
carry them over. In the repo root here (x86-64 Linux target, its Python version, e.g. 3.12)::

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl diffusers==0.42.1 transformers peft safetensors accelerate huggingface-hub tokenizers regex \
        opencv-python-headless pillow filelock fsspec pyyaml packaging requests tqdm hf-xet importlib-metadata zipp \
        charset-normalizer idna urllib3 certifi psutil numpy
    (check each wheel's needs: unzip -p .whl/NAME-*.whl '*/METADATA' | grep ^Requires-Dist; keep one version each)

and there, with the repo and .whl copied over::

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:.. python3 bench/gpu.py     # .. so that the repo folder imports as the package (see below)

The bench imports the pack as ``sdxl_controlnet_img2img``; it adds a shim for that itself when the repo is not
pip-installed, so only the dependencies need installing there.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass

import _common as C

ROWS = ["diffusers", "fp16+sdpa", "+channels-last", "+fp16-fix VAE", "+compile", "model offload"]
SIZE = 1024  # the request is otherwise fal's defaults (the request's own: 25 steps x strength 0.95, CFG 7.5)


def ensure_package_importable():
    """Make ``import sdxl_controlnet_img2img`` work from a plain checkout (no pip install needed)."""
    try:
        import sdxl_controlnet_img2img  # noqa: F401  (only: is it importable)
        return
    except ImportError:
        pass
    import importlib.util

    spec = importlib.util.spec_from_file_location("sdxl_controlnet_img2img", C.ROOT / "__init__.py",
                                                  submodule_search_locations=[str(C.ROOT)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["sdxl_controlnet_img2img"] = mod
    spec.loader.exec_module(mod)


def random_components(device, dtype):
    """Full-size SDXL base + SDXL ControlNet with random weights, from the bundled configs."""
    import tempfile

    import torch
    from diffusers import AutoencoderKL, ControlNetModel, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from sdxl_controlnet_img2img.pipeline.local.models.sdxl_config import CONTROLNET_SDXL_CONFIG, SDXL_BASE_CONFIG
    from sdxl_controlnet_img2img.pipeline.local.tiny_models import write_clip_tokenizer

    base = SDXL_BASE_CONFIG
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the GPU: minutes faster than on the CPU
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(base / "unet")).to(dtype)
        controlnet = ControlNetModel.from_config(ControlNetModel.load_config(CONTROLNET_SDXL_CONFIG)).to(dtype)
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(base / "vae")).to(dtype)
        te = CLIPTextModel(CLIPTextConfig.from_json_file(base / "text_encoder" / "config.json")).to(dtype)
        te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_json_file(base / "text_encoder_2" / "config.json")).to(dtype)
    scheduler = EulerDiscreteScheduler.from_config(EulerDiscreteScheduler.load_config(base / "scheduler"))
    with tempfile.TemporaryDirectory() as tmp:  # the token ids do not matter for speed
        write_clip_tokenizer(tmp)
        tok, tok2 = CLIPTokenizer.from_pretrained(tmp), CLIPTokenizer.from_pretrained(tmp)
    comps = {"unet": unet, "vae": vae, "text_encoder": te, "text_encoder_2": te2, "tokenizer": tok,
             "tokenizer_2": tok2, "scheduler": scheduler}
    return comps, controlnet


def fp16_fix_stand_in(vae, dtype):
    """The fp16-fix VAE's architecture (SDXL's) with ``force_upcast=False``, random weights."""
    import torch
    from diffusers import AutoencoderKL

    cfg = dict(vae.config)
    cfg["force_upcast"] = False
    with torch.device(vae.device):
        return AutoencoderKL.from_config(cfg).to(dtype)


def parse_args(argv):
    """The command line, checked: (args, the rows asked for, in order)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="SDXL base (file or diffusers folder); default: random-init full-size SDXL")
    ap.add_argument("--controlnet", help="SDXL Canny ControlNet (file or folder); needed with --checkpoint")
    ap.add_argument("--vae", help="fp16-fix VAE (file or folder) for the +fp16-fix VAE rows; default: a stand-in")
    ap.add_argument("--repeat", type=int, default=5, help="warm requests per row (default 5; median)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed requests per row first (default 1)")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of: {', '.join(ROWS)}")
    ap.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16", help="half precision to use (default fp16)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the card's dense 16-bit peak for the MFU column (default: from bench/flops.py's table)")
    ap.add_argument("--dry-run-cpu", action="store_true",
                    help="smoke-test this script's code path on the CPU with tiny models at 64x64 (fp32; no offload "
                         "or compile rows; the figures mean nothing)")
    args = ap.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = [r for r in rows if r not in ROWS]
    if bad:
        ap.error(f"--rows: unknown {bad}; choose from {ROWS}")
    if bool(args.checkpoint) != bool(args.controlnet):
        ap.error("--checkpoint and --controlnet go together")
    return args, rows


def import_libraries(dry):
    """torch and diffusers (quietened), or exit with what is missing; then the pack itself."""
    try:
        import torch
    except ImportError:
        C.die("no CUDA GPU found: torch is not installed")
    if not dry and not torch.cuda.is_available():
        C.die(f"no CUDA GPU found: torch.cuda.is_available() is False (torch {torch.__version__}, "
              f"CUDA build {torch.version.cuda or 'none'}); run this on a machine with an NVIDIA GPU (see the docstring)")
    try:
        import diffusers
        import transformers

        diffusers.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
    except ImportError as exc:
        C.die(f"diffusers/transformers missing ({exc}); install them, e.g. from wheels (see the docstring)", 2)

    ensure_package_importable()
    return torch, diffusers


@dataclass
class Machine:
    """Where the rows run: the GPU in half precision, or the CPU in fp32 for the dry run."""

    dry: bool
    device: str
    dtype: object
    gpu: str
    total_gb: float

    @property
    def cuda(self) -> bool:
        return not self.dry

    @classmethod
    def detect(cls, dry, dtype_name):
        import torch

        if dry:
            return cls(dry, "cpu", torch.float32, "CPU dry run", 0.0)
        return cls(dry, "cuda", {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name],
                   torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0).total_memory / 2**30)


def load_weights(args, device, dtype, dry):
    """(a line naming the weights, the SDXL components, the ControlNet): tiny, real from paths, or random full-size."""
    from sdxl_controlnet_img2img.pipeline.local.models import loading

    if dry:
        from sdxl_controlnet_img2img.pipeline.local.tiny_models import tiny_components

        weights = "tiny random-weight models (dry run)"
        comps, controlnet = tiny_components()
    elif args.checkpoint:
        weights = f"real: {args.checkpoint} + {args.controlnet}"
        loaded = loading.build_pipeline(args.checkpoint, args.controlnet,
                                        loading.LoadOptions(device=device, dtype=dtype, memory_mode="none"))
        comps = {k: v for k, v in loaded.components.items() if k != "controlnet"}
        controlnet = loaded.controlnet
        del loaded
    else:
        weights = "random-init full-size SDXL base + SDXL ControlNet (bundled configs)"
        comps, controlnet = random_components(device, dtype)
    comps = {k: v for k, v in comps.items() if k in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer",
                                                     "tokenizer_2", "scheduler")}
    return weights, comps, controlnet


def load_fix_vae(path, device, dtype):
    """The fp16-fix VAE from ``--vae``, or None (then a stand-in is built when a row needs it)."""
    if not path:
        return None
    from sdxl_controlnet_img2img.pipeline.local.models import loading

    return loading.load_vae(path, loading.LoadOptions(device=device, dtype=dtype).resolved()).to(device, dtype)


class Workload:
    """The one request every row runs: fal's defaults on two synthetic photos, through ours or plain diffusers."""

    def __init__(self, size):
        from PIL import Image

        from sdxl_controlnet_img2img.pipeline.local.generate import generate
        from sdxl_controlnet_img2img.pipeline.request import GenerationRequest

        self.size, self._generate = size, generate
        self.init = Image.fromarray(C.synthetic_photo(size, size, seed=1, scene="photo"))
        self.control = Image.fromarray(C.synthetic_photo(size, size, seed=2, scene="photo"))
        self.request = GenerationRequest.from_dict({
            "prompt": "ice fortress, aurora skies, polar wildlife", "image_url": self.init,
            "control_image_url": self.control, "seed": 42, "enable_safety_checker": False})

    def ours(self, pipe):
        return self._generate(pipe, self.request)

    def plain(self, pipe):
        import cv2
        import numpy as np
        import torch
        from PIL import Image

        edges = cv2.Canny(np.asarray(self.control), 100, 200)
        ctl = Image.fromarray(np.repeat(edges[:, :, None], 3, axis=2))
        return pipe(prompt=self.request.prompt, negative_prompt="", image=self.init, control_image=ctl,
                    height=self.size, width=self.size, strength=self.request.strength,
                    num_inference_steps=self.request.num_inference_steps, guidance_scale=self.request.guidance_scale,
                    controlnet_conditioning_scale=self.request.controlnet_conditioning_scale,
                    generator=torch.Generator("cpu").manual_seed(42)).images


class Meter:
    """Times a row (untimed warm-up, then the median of ``repeat`` synchronised requests) and its peak GPU memory."""

    def __init__(self, cuda, warmup, repeat, steps_run):
        import torch

        self.cuda = torch.cuda if cuda else None  # None: the CPU dry run (no syncing, no memory figure)
        self.warmup, self.repeat, self.steps_run = warmup, repeat, steps_run

    def sync(self):
        if self.cuda:
            self.cuda.synchronize()

    def reset_peak(self):
        if self.cuda:
            self.cuda.empty_cache()
            self.cuda.reset_peak_memory_stats()

    def peak_gb(self):
        return self.cuda.max_memory_allocated() / 1e9 if self.cuda else float("nan")

    def measure(self, name, fn, note=""):
        """The row's result dict; prints its table line."""
        self.sync()
        t = time.perf_counter()
        for _ in range(self.warmup):
            fn()
        self.sync()
        warm_s = time.perf_counter() - t
        self.reset_peak()
        times = []
        for _ in range(self.repeat):
            self.sync()
            t = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t)
        s = C.median(times)
        row = {"row": name, "s_per_request": s, "steps_per_s": self.steps_run / s,
               "peak_gb": self.peak_gb(), "all_s": times, "warmup_s": warm_s, "note": note}
        print(f"{name:<16}{s:>9.3f} s{row['steps_per_s']:>9.2f}{row['peak_gb']:>10.2f} GB   {note}", flush=True)
        return row


class RowPipelines:
    """Builds each row's pipeline from one shared set of weights, and puts the weights back after a row moves them."""

    def __init__(self, comps, controlnet, fix_vae, machine, vae_given):
        self.comps, self.raw_unet, self.raw_cn = comps, comps["unet"], controlnet
        self.fix_vae, self.machine, self.vae_given = fix_vae, machine, vae_given

    def ours(self, opts_kw, vae=None, channels_last=False):
        """The pack's placement (``place``) of a fresh pipeline on the shared modules."""
        import torch
        from diffusers import StableDiffusionXLControlNetImg2ImgPipeline

        from sdxl_controlnet_img2img.pipeline.local.models import loading
        from sdxl_controlnet_img2img.pipeline.local.memory.placement import place

        c = dict(self.comps, unet=self.raw_unet)
        if vae is not None:
            c["vae"] = vae
        pipe = StableDiffusionXLControlNetImg2ImgPipeline(**c, controlnet=self.raw_cn)
        if channels_last:
            for m in (pipe.unet, pipe.controlnet, pipe.vae):
                m.to(memory_format=torch.channels_last)
        mach = self.machine
        place(pipe, loading.LoadOptions(device=mach.device, dtype=mach.dtype,
                                        **{"memory_mode": "none", **opts_kw}).resolved())
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def contiguous(self):
        import torch

        for m in (self.raw_unet, self.raw_cn, self.comps["vae"], self.fix_vae):
            if m is not None:
                m.to(memory_format=torch.contiguous_format)

    def pipeline_for_row(self, name):
        """(pipeline, which call it takes: "plain" or "ours", the row's note)."""
        if name == "diffusers":
            from diffusers import StableDiffusionXLControlNetImg2ImgPipeline

            self.contiguous()
            pipe = StableDiffusionXLControlNetImg2ImgPipeline(**self.comps, controlnet=self.raw_cn).to(
                self.machine.device)
            pipe.set_progress_bar_config(disable=True)
            return pipe, "plain", "plain pipeline, fp16, diffusers defaults"
        if name == "fp16+sdpa":
            self.contiguous()
            return self.ours({"attention": "sdpa"}), "ours", "generate(), loader placement"
        if name == "+channels-last":
            return self.ours({"attention": "sdpa"}, channels_last=True), "ours", "channels-last UNet/ControlNet/VAE"
        # "+fp16-fix VAE", "+compile", "model offload"
        if self.fix_vae is None:
            self.fix_vae = fp16_fix_stand_in(self.comps["vae"], self.machine.dtype)
        if name == "+fp16-fix VAE":
            pipe = self.ours({"attention": "sdpa"}, vae=self.fix_vae, channels_last=True)
            note = "VAE decodes in fp16 (no upcast)" + ("" if self.vae_given else "; random-init stand-in")
        elif name == "+compile":
            pipe = self.ours({"attention": "sdpa", "compile": True}, vae=self.fix_vae, channels_last=True)
            note = "torch.compile UNet + ControlNet; warm-up includes compiling"
        else:
            self.contiguous()
            pipe = self.ours({"attention": "sdpa", "memory_mode": "model_cpu_offload"}, vae=self.fix_vae)
            note = "model CPU offload, fp16-fix VAE"
        return pipe, "ours", note

    def after_row(self, name, pipe):
        """After model offload: put the shared modules back on the GPU for any later row."""
        if name == "model offload":
            pipe.remove_all_hooks()
            c = self.comps
            for m in (self.raw_unet, self.raw_cn, self.fix_vae,
                      *(c[k] for k in ("vae", "text_encoder", "text_encoder_2"))):
                m.to(self.machine.device)


def run_rows(rows, pipelines, workload, meter):
    """Each row measured in turn; the previous row's pipeline is let go before the next is built."""
    results = []
    print(f"{'row':<16}{'s/request':>11}{'steps/s':>9}{'peak mem':>13}")
    pipe = None
    for name in rows:
        pipe = None
        meter.reset_peak()
        pipe, call, note = pipelines.pipeline_for_row(name)
        run = workload.plain if call == "plain" else workload.ours
        results.append(meter.measure(name, lambda: run(pipe), note))
        pipelines.after_row(name, pipe)
    pipe = None
    return results


def add_mfu(results, machine, size, steps_run, peak_arg):
    """Model FLOP utilisation: the FLOPs of one image (counted on meta tensors, bench/flops.py) / time / the card's
    peak. Prints the lines, adds tflops_per_s and mfu to each GPU row; returns (FLOPs of one image, peak TFLOP/s)."""
    from flops import flops_per_image, peak_tflops

    gpu, cuda = machine.gpu, machine.cuda
    image_flops = flops_per_image(size, size, steps_run)["total"]  # full-size SDXL (the dry run's tiny models: n/a)
    peak = peak_arg or (peak_tflops(gpu) if cuda else None)
    print(f"\none image = {image_flops / 1e12:.1f} TFLOP; peak {peak or '?'} TFLOP/s ({gpu})")
    for r in results if cuda else ():
        r["tflops_per_s"] = image_flops / r["s_per_request"] / 1e12
        r["mfu"] = r["tflops_per_s"] / peak if peak else None
        mfu = f"{r['mfu'] * 100:5.1f} %" if r["mfu"] is not None else "   ?"
        print(f"{r['row']:<16}{r['tflops_per_s']:>9.1f} TFLOP/s   MFU {mfu}")
    return image_flops, peak


def targets(results, machine, size, image_flops, peak):
    """[(verdict, text)]: against plain diffusers, issue 9's H100 times and MFU, and the peak-memory limits."""
    gpu, cuda = machine.gpu, machine.cuda
    by = {r["row"]: r for r in results}
    checks = []
    if "diffusers" in by:
        base = by["diffusers"]["s_per_request"]
        for r in results:
            if r["row"] != "diffusers":  # timing checks: no verdict when the spread could flip them (_common)
                checks.append((C.compare(r["all_s"], by["diffusers"]["all_s"], 1.02),
                               f"{r['row']}: {base / r['s_per_request']:.2f}x plain diffusers' speed (never slower)"))
    if "H100" in gpu and size == SIZE:
        nc = [by[r] for r in ("fp16+sdpa", "+channels-last", "+fp16-fix VAE") if r in by]
        if nc:
            best = min(nc, key=lambda r: r["s_per_request"])
            checks.append((C.compare(best["all_s"], 2.0, 1.0),
                           f"best without compile {best['s_per_request']:.2f} s/request (target <= 2.0 s)"))
        if "+compile" in by:
            checks.append((C.compare(by["+compile"]["all_s"], 1.5, 1.0),
                           f"with compile {by['+compile']['s_per_request']:.2f} s/request (target <= 1.5 s)"))
            if by["+compile"].get("mfu") is not None:  # MFU >= 45 % is time <= the ideal time / 0.45
                checks.append((C.compare(by["+compile"]["all_s"], image_flops / (peak * 1e12), 1 / 0.45),
                               f"with compile MFU {by['+compile']['mfu'] * 100:.1f} % (target >= 45 %)"))
    for r in results:
        limit = 8.0 if r["row"] == "model offload" else 12.0
        if r["row"] != "diffusers" and cuda:
            checks.append((r["peak_gb"] < limit, f"{r['row']}: peak {r['peak_gb']:.2f} GB (target < {limit:.0f} GB)"))
    return checks


def report(results, machine, size, steps_run, peak_arg):
    """The MFU lines and the verdict lines; returns the checks for the JSON."""
    image_flops, peak = add_mfu(results, machine, size, steps_run, peak_arg)
    print()
    checks = targets(results, machine, size, image_flops, peak)
    for ok, text in checks:
        print(C.check(ok, text))
    return checks


def write_results(header, rows, checks, dry):
    """bench/results/gpu-[dry-run-]<time>.json: ``header``'s keys, then the rows and the checks; prints the path."""
    C.RESULTS.mkdir(parents=True, exist_ok=True)
    out = C.RESULTS / f"gpu-{'dry-run-' if dry else ''}{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({**header, "rows": rows,
                               "checks": [{"ok": getattr(ok, "ok", ok), "text": t} for ok, t in checks]}, indent=2))
    print(f"\nwritten: {out}")


def main(argv=None) -> int:
    args, rows = parse_args(argv)
    torch, diffusers = import_libraries(args.dry_run_cpu)
    machine = Machine.detect(args.dry_run_cpu, args.dtype)
    size = 64 if machine.dry else SIZE
    if machine.dry:
        rows = [r for r in rows if r not in ("+compile", "model offload")]
    print(f"GPU: {machine.gpu} ({machine.total_gb:.0f} GiB), torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"diffusers {diffusers.__version__}")
    workload = Workload(size)
    steps_run = workload.request.steps_to_run

    t = time.perf_counter()
    weights, comps, controlnet = load_weights(args, machine.device, machine.dtype, machine.dry)
    print(f"weights: {weights} (ready in {time.perf_counter() - t:.0f}s)\n")
    fix_vae = load_fix_vae(args.vae, machine.device, machine.dtype)

    pipelines = RowPipelines(comps, controlnet, fix_vae, machine, vae_given=bool(args.vae))
    results = run_rows(rows, pipelines, workload, Meter(machine.cuda, args.warmup, args.repeat, steps_run))

    checks = report(results, machine, size, steps_run, args.peak_tflops)
    write_results({"gpu": machine.gpu, "torch": torch.__version__, "cuda": torch.version.cuda,
                   "diffusers": diffusers.__version__, "weights": weights, "dtype": args.dtype, "size": size,
                   "steps": workload.request.num_inference_steps,
                   "strength": workload.request.strength, "steps_run": steps_run, "repeat": args.repeat},
                  results, checks, machine.dry)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
