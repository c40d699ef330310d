"""Command line: ``python -m sdxl_controlnet_img2img generate --request REQ.json ...``.

The request file is the same JSON that fal's API takes. Relative image paths in it are
resolved against the request file's folder.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

from .errors import RequestError, SDXLCNError
from .fal.cli import add_fal_fetch_parser, add_remote_arguments
from .folders import check_output_folder, comfyui_folder, write_error_text
from .local.memory.choices import DEFAULT, DTYPES, MEMORY_MODES, dtype_help, memory_mode_help
from .request_fields import describe_fields
from .request_log import cli_command
from .serve.cli import add_serve_parser



def _resolve_image_paths(data: dict, base: Path) -> dict:
    data = dict(data)
    for key in ("image_url", "control_image_url", "image", "control_image"):
        v = data.get(key)
        if isinstance(v, str) and v.strip() and "://" not in v[:12] and not v.startswith("data:"):
            p = Path(v).expanduser()
            data[key] = str(p if p.is_absolute() else (base / p))
    return data


def read_request(path: Path, overrides: dict | None = None):
    """The request in ``path``, with ``overrides`` (fal field -> value, from --steps/--size) in place of its own."""
    from .request import GenerationRequest

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SDXLCNError(f"--request: {path} not found") from None
    except json.JSONDecodeError as exc:
        raise SDXLCNError(f"--request: {path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise SDXLCNError(f"--request: {path} holds a JSON {type(data).__name__}; a request is a JSON object "
                          '({"prompt": ..., "image_url": ..., "control_image_url": ...}), as fal takes it')
    data.update(overrides or {})
    return GenerationRequest.from_dict(_resolve_image_paths(data, path.resolve().parent))


def size_option(text: str):
    """``--size``: WxH (512x512), a fal preset name or none (the control image's size), as fal's ``image_size``."""
    from .sizes import IMAGE_SIZE_PRESETS, MAX_SIDE, MIN_SIDE, parse_image_size

    value = text.strip().lower()
    match = re.fullmatch(r"(\d+)\s*[x\u00d7]\s*(\d+)", value)
    if match:
        size = {"width": int(match[1]), "height": int(match[2])}
        try:
            return parse_image_size(size)
        except RequestError:
            raise argparse.ArgumentTypeError(f"{text!r}: each side must be between {MIN_SIDE} and {MAX_SIDE} "
                                             "pixels") from None
    if value == "none" or value in IMAGE_SIZE_PRESETS:
        return parse_image_size(value)
    raise argparse.ArgumentTypeError(f"{text!r} is not WxH (e.g. 512x512), a preset ({', '.join(IMAGE_SIZE_PRESETS)}) "
                                     "or none (the control image's size)")


def request_overrides(args) -> dict:
    """The request fields set on the command line (--steps, --size), for a quick run without editing the file."""
    out = {}
    if getattr(args, "steps", None) is not None:
        out["num_inference_steps"] = args.steps
    if getattr(args, "size", False) is not False:
        out["image_size"] = args.size
    return out


class TerminalProgress:
    """A one-line progress bar on stderr."""

    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.start = time.perf_counter()

    def __call__(self, step: int, total: int, _latents=None) -> None:
        width = 30
        done = int(width * step / max(total, 1))
        elapsed = time.perf_counter() - self.start
        self.stream.write(f"\r[{'#' * done}{'.' * (width - done)}] step {step}/{total}  {elapsed:5.1f}s")
        if step >= total:
            self.stream.write("\n")
        self.stream.flush()


def _model_hooks(args, request, options) -> dict:
    """The safety checker / prompt expander the request enables: from --safety-checker / --prompt-expansion,
    else from ./models/safety_checker and ./models/prompt_expansion. Missing models are an error."""
    if not (request.enable_safety_checker or request.expand_prompt):
        return {}
    from .local.request_models.locate import MissingModelError, default_search_dirs, resolve_hooks

    try:
        safety, expander = resolve_hooks(
            request, default_search_dirs(), safety_checker_path=getattr(args, "safety_checker", None),
            prompt_expansion_path=getattr(args, "prompt_expansion", None), device=options.device, dtype=options.dtype,
        )
    except MissingModelError as exc:
        option = "--safety-checker" if exc.field == "enable_safety_checker" else "--prompt-expansion"
        raise MissingModelError(exc.field, f"{exc.detail}; or pass {option} PATH") from None
    for label, hook in (("safety checker", safety), ("prompt expansion", expander)):
        if hook is not None:
            print(f"{label}: {hook.source}", file=sys.stderr)
    return {"safety_checker": safety, "prompt_expander": expander}


def _check_loras(request, lora_dirs, allow_pickle: bool):
    """``request`` with bare LoRA names resolved to files; every local LoRA file's header read (no model needed)."""
    from .local.lora.adapters import check_lora_file
    from .local.lora.sources import resolve_request_loras, resolve_source

    request = resolve_request_loras(request, lora_dirs)
    for spec in request.loras:
        if not spec.path.lower().startswith(("http://", "https://")):
            check_lora_file(resolve_source(spec.path, lora_dirs), spec.path, allow_pickle)
    return request


def cmd_generate(args) -> int:
    from .local.generate import generate, prepare_inputs
    from .local.models.loading import LoadOptions, check_sources, load_pipeline
    from .local.lora.fused import preload
    from .result import result_dir, write_result

    overrides = request_overrides(args)
    try:
        request = read_request(Path(args.request), overrides)
    except RequestError as exc:
        # the field at fault, or one the rule names (strength x steps), set on the command line: name the option
        field = next((f for f in overrides if f == exc.field or f in exc.detail), None)
        if field is None:
            raise
        option = {"num_inference_steps": "--steps", "image_size": "--size"}[field]
        raise SDXLCNError(f"{option} {overrides[field]}: {exc}") from None
    if getattr(args, "remote", None) == "fal":
        from .fal.cli import cmd_generate_remote

        return cmd_generate_remote(args, request)

    check_local_arguments(args)
    # everything that can be checked without the models, first: output folder, device, model files, images, LoRAs
    out = check_output_folder(result_dir(Path(args.out), args.overwrite), "--out")
    t = time.perf_counter()
    options = LoadOptions(
        device=args.device, dtype=args.dtype, memory_mode=args.memory_mode, vae_tiling=args.vae_tiling,
        vae=args.vae, config_dir=args.config_dir, controlnet_config_dir=args.controlnet_config_dir,
        allow_pickle=args.allow_pickle, compile=args.compile, attention=args.attention,
    ).resolved()
    check_sources(args.checkpoint, args.controlnet, options)
    prepared = prepare_inputs(request)
    lora_dirs = list(getattr(args, "lora_dir", None) or []) + [str(Path(args.request).resolve().parent)]
    if request.loras:
        request = _check_loras(request, lora_dirs, args.allow_pickle)
    hooks = _model_hooks(args, request, options)
    from .local.schedulers import few_step_warning

    for warning in (*prepared.warnings, few_step_warning(request)):
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
    print(f"checked the request, images and model files in {time.perf_counter() - t:.1f}s", file=sys.stderr)
    t = time.perf_counter()
    pipe = load_pipeline(args.checkpoint, args.controlnet, options)
    for spec in request.loras:
        preload(pipe, spec.path, lora_dirs, allow_pickle=args.allow_pickle)
    load_s = time.perf_counter() - t
    print(f"loaded models in {load_s:.1f}s", file=sys.stderr)
    result = generate(pipe, request, on_step=TerminalProgress(), prepared=prepared, **hooks)
    result.timings["load"] = load_s
    try:
        doc = write_result(result, out, fmt=args.format)
    except OSError as exc:  # checked before loading, but a disk fills up, a folder is replaced meanwhile
        raise SDXLCNError(f"--out: could not write the result into {out} ({write_error_text(exc, out)}); run again "
                          f"with another --out (seed {result.seed} gives the same images)") from None
    for img in doc["images"]:
        print(img["url"])
    print(f"seed {doc['seed']}; result written to {out / 'result.json'}", file=sys.stderr)
    return 0


def cmd_make_tiny_models(args) -> int:
    from .local.tiny_models import build_tiny_models

    comfyui = bool(args.comfyui)
    out = args.out
    if out is None:
        home = comfyui_folder()
        if home is None:
            raise SDXLCNError("make-tiny-models: --out DIR is required here (run from ComfyUI's folder as "
                              "`python custom_nodes/<pack folder> make-tiny-models`, it writes into ComfyUI's models "
                              "folder)")
        out, comfyui = home / "models", True
    check_output_folder(out, "--out")
    where = "ComfyUI's model folders under " if comfyui else ""
    print(f"writing tiny random-weight SDXL + ControlNet models and a LoRA into {where}{out} (reused when already "
          "there); they draw noise-like pictures, for checking an install", file=sys.stderr)
    paths = build_tiny_models(out, comfyui=comfyui)
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    return 0


def check_local_arguments(args) -> None:
    missing = [f"--{n}" for n in ("checkpoint", "controlnet") if not getattr(args, n, None)]
    if missing:
        raise SDXLCNError(f"{' and '.join(missing)} required for a local run (or pass --remote fal to run on fal)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=cli_command(),
        description="SDXL ControlNet (Canny) image-to-image with fal's request JSON, run locally with diffusers.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="run one fal-shaped request and write images + result.json",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=f"the request's fields (fal's names and defaults):\n{describe_fields()}")
    g.add_argument("--request", required=True, help="request JSON in fal's input shape (prompt, image_url, control_image_url, ...)")
    g.add_argument("--checkpoint", default=None,
                   help="(local runs, required) SDXL base model: a single .safetensors (e.g. sd_xl_base_1.0.safetensors) or a diffusers folder")
    g.add_argument("--controlnet", default=None,
                   help="(local runs, required) SDXL Canny ControlNet: a diffusers folder or its diffusion_pytorch_model.safetensors file")
    g.add_argument("--out", required=True, help="output folder for the images and result.json (an earlier result "
                                                "there is kept: the new one goes to a run_NNN subfolder)")
    g.add_argument("--overwrite", action="store_true", help="replace an earlier result in --out instead")
    g.add_argument("--format", choices=["png", "jpeg"], default="png", help="image file format (default png)")
    g.add_argument("--steps", type=int, default=None, metavar="N",
                   help="num_inference_steps instead of the request's (int(N x strength) run): e.g. 4 for a quick run")
    g.add_argument("--size", type=size_option, default=False, metavar="WxH",
                   help="image_size instead of the request's: WxH (e.g. 512x512; floored to multiples of 8), a fal "
                        "preset name, or none (the control image's size)")
    g.add_argument("--lora-dir", action="append", default=[], metavar="DIR",
                   help="folder to find LoRAs named by bare file name in the request's loras (repeatable; "
                        "the request file's folder is searched too)")
    g.add_argument("--device", default=None, help="cuda, cuda:1, xpu, mps or cpu (default: the best available, in "
                                                   "that order)")
    g.add_argument("--dtype", choices=list(DTYPES), default=DEFAULT, help=dtype_help())
    g.add_argument("--memory-mode", choices=list(MEMORY_MODES), default=DEFAULT, help=memory_mode_help())
    g.add_argument("--vae-tiling", action="store_true", help="encode/decode the VAE in tiles (large images, small GPUs)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet and ControlNet (CUDA only, ignored elsewhere): slow first run, faster after")
    g.add_argument("--attention", default="sdpa", metavar="BACKEND",
                   help="attention: sdpa (default, PyTorch scaled-dot-product), classic (plain attention), "
                        "or a diffusers attention backend name such as flash")
    g.add_argument("--vae", default=None, help="a VAE to use instead of the checkpoint's, e.g. sdxl-vae-fp16-fix (file or folder)")
    g.add_argument("--allow-pickle", action="store_true",
                   help="accept .ckpt/.pt pickles (read with torch.load(weights_only=True)); refused by default")
    g.add_argument("--config-dir", default=None,
                   help="SDXL config folder for a single-file checkpoint (default: the bundled SDXL base 1.0 configs)")
    g.add_argument("--controlnet-config-dir", default=None,
                   help="folder with the config.json of a single-file ControlNet (default: bundled SDXL Canny config)")
    g.add_argument("--safety-checker", default=None, metavar="PATH",
                   help="safety checker folder (CompVis/stable-diffusion-safety-checker), used when the request has "
                        "enable_safety_checker true (default: look in ./models/safety_checker)")
    g.add_argument("--prompt-expansion", default=None, metavar="PATH",
                   help="prompt-expansion model folder (GPT-2 class, e.g. Fooocus' fooocus_expansion), used when the "
                        "request has expand_prompt true (default: look in ./models/prompt_expansion)")
    add_remote_arguments(g)
    g.set_defaults(func=cmd_generate)
    add_fal_fetch_parser(sub)
    add_serve_parser(sub)
    t = sub.add_parser("make-tiny-models", help="write tiny random-weight SDXL + ControlNet models and a LoRA for "
                                                "them (offline demo, tests, the workflows in workflows/tiny/)")
    t.add_argument("--out", default=None,
                   help="folder to write them into (default, when this pack is run from ComfyUI's custom_nodes "
                        "folder: ComfyUI's models folder, each model in its own folder as with --comfyui)")
    t.add_argument("--comfyui", action="store_true",
                   help="--out is ComfyUI's models folder: write tiny-sdxl into diffusers/, tiny-controlnet-canny "
                        "into controlnet/ and tiny-sdxl-lora.safetensors into loras/, where the tiny workflows "
                        "find them")
    t.set_defaults(func=cmd_make_tiny_models)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "\n".join(f"---- {name} ----\n{p.format_help()}" for name, p in sub.choices.items())
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except SDXLCNError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
