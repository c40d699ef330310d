"""LoRA switching cost against loading the base model, measured in one run.

Times, in one process: loading the pipeline (base + ControlNet, uncached), the first load of a LoRA
file (read + inject as an adapter), switching the active LoRA between two kept adapters, changing a
scale, and removing all LoRAs; prints the medians and the ratios load / switch.

Run:   .venv/bin/python bench/lora_switch.py                  (tiny offline models and tiny LoRAs)
       .venv/bin/python bench/lora_switch.py --checkpoint SDXL --controlnet CN --lora-a A.safetensors --lora-b B.safetensors
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import _common as C

sys.path.insert(0, str(C.ROOT / "tests" / "helpers"))


def _load(checkpoint, controlnet, device, dtype):
    from sdxl_controlnet_img2img.pipeline.local.models import loading

    free = getattr(loading, "free_cached_pipeline", None)
    if free is not None:
        free()  # time a real load, not a cache hit
    return loading.load_pipeline(checkpoint, controlnet, device=device, dtype=dtype)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="SDXL base (default: tiny models built in a temp folder)")
    ap.add_argument("--controlnet", help="SDXL Canny ControlNet")
    ap.add_argument("--lora-a", help="first LoRA file (default: a tiny kohya LoRA)")
    ap.add_argument("--lora-b", help="second LoRA file (default: a tiny PEFT LoRA)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    ap.add_argument("--repeat", type=int, default=7, help="timed rounds of switches (default 7)")
    ap.add_argument("--loads", type=int, default=2, help="timed base-model loads (default 2)")
    args = ap.parse_args(argv)

    import torch

    from sdxl_controlnet_img2img.pipeline.local.lora import adapters as L
    from sdxl_controlnet_img2img.pipeline.request import LoraSpec

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    tmp = tempfile.TemporaryDirectory()
    if args.checkpoint:
        ckpt, cn = args.checkpoint, args.controlnet
    else:
        from sdxl_controlnet_img2img.pipeline.local.tiny_models import build_tiny_models

        m = build_tiny_models(Path(tmp.name) / "models")
        ckpt, cn = m["checkpoint"], m["controlnet"]

    load_times = []
    for _ in range(max(1, args.loads)):
        t = time.perf_counter()
        pipe = _load(ckpt, cn, args.device, dtype)
        load_times.append(time.perf_counter() - t)

    a, b = args.lora_a, args.lora_b
    if not (a and b):
        import lora_factory as F

        a = a or str(F.write(F.kohya_state_dict(pipe, seed=1), Path(tmp.name) / "a.safetensors"))
        b = b or str(F.write(F.peft_state_dict(pipe, seed=2), Path(tmp.name) / "b.safetensors"))

    first = {}
    for name, path in (("A", a), ("B", b)):
        t = time.perf_counter()
        L.activate(pipe, [LoraSpec(path, 1.0)])
        first[name] = time.perf_counter() - t

    state = {"i": 0}

    def switch():
        state["i"] += 1
        L.activate(pipe, [LoraSpec(a if state["i"] % 2 else b, 1.0)])

    def scale():
        state["i"] += 1
        L.activate(pipe, [LoraSpec(a, 0.5 + (state["i"] % 5) / 10)])

    def remove_all():
        L.activate(pipe, [])
        L.activate(pipe, [LoraSpec(a, 1.0)])  # back, so the next removal has something to remove

    times = C.interleaved({"switch A<->B": switch, "change scale": scale, "remove all + re-add": remove_all},
                          repeat=args.repeat)
    load = C.median(load_times)
    print(f"hardware: {C.hardware_line()}")
    print(f"models: {'tiny offline' if not args.checkpoint else ckpt}; device {args.device}, {args.dtype}")
    print(f"load base pipeline (uncached)       {C.fmt_s(load):>10}   (median of {len(load_times)})")
    for name, s in first.items():
        print(f"first load of LoRA {name} (read+inject) {C.fmt_s(s):>10}   ratio load/this {load / s:8.1f}x")
    for name, ts in times.items():
        m = C.median(ts)
        print(f"{name:<35} {C.fmt_s(m):>10}   ratio load/this {load / m:8.1f}x   (median of {len(ts)})")
    L.activate(pipe, [])
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
