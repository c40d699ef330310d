"""Shared helpers for the benchmarks: interleaved timing with medians, synthetic test pictures, reporting.

Every benchmark measures its baseline in the same run, interleaved with the thing measured
(A, B, A, B, ...), and compares medians, so a noisy shared machine shifts both sides alike.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

# Benchmarks never touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def interleaved(fns: dict[str, Callable[[], object]], repeat: int, warmup: int = 1) -> dict[str, list[float]]:
    """Run each callable ``warmup`` times, then ``repeat`` rounds of all of them in turn (order rotated
    each round); returns the seconds of every timed call per name."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeat):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            t = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t)
    return times


def median(xs) -> float:
    return statistics.median(xs)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware_line() -> str:
    import torch

    return (f"{cpu_name()}, {os.cpu_count()} logical CPUs, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}")


def synthetic_photo(width: int, height: int, seed: int = 0, scene: str = "photo"):
    """A deterministic RGB picture (uint8 [H, W, 3]) that looks the same at every size.

    ``photo``: smooth colour gradients, high-contrast shapes with camera-sharp edges, texture and
    sensor-like noise. ``plain``: the same shapes on a flat grey background with no texture, so almost
    every outline is a strong edge (the easiest case for hysteresis-based Canny implementations).
    """
    import cv2
    import numpy as np

    if scene not in ("photo", "plain"):
        raise ValueError(f"scene: 'photo' or 'plain', got {scene!r}")
    rng = np.random.default_rng(seed)
    if scene == "photo":
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        img = np.stack([
            90 + 80 * np.sin(x / width * 3.1 + 0.5),
            110 + 60 * np.cos(y / height * 2.3),
            120 + 50 * np.sin((x + y) / (width + height) * 4.0),
        ], axis=2)
    else:
        img = np.full((height, width, 3), 128.0, dtype=np.float32)
    scale = max(width, height) / 512
    for _ in range(40):
        # high-contrast colours, so most outlines are strong edges for any Canny's thresholds
        color = [float(c) for c in rng.choice([20, 235], 3)]
        cx, cy = int(rng.integers(0, width)), int(rng.integers(0, height))
        r = int(rng.integers(8, 80) * scale)
        if rng.random() < 0.5:
            cv2.circle(img, (cx, cy), r, color, -1, lineType=cv2.LINE_AA)
        else:
            cv2.rectangle(img, (cx - r, cy - r // 2), (cx + r, cy + r // 2), color, -1)
    # edges as sharp as a camera's at every size (optics blur is per pixel, not per picture)
    img = cv2.GaussianBlur(img, (0, 0), 1.2)
    if scene == "photo":
        # texture at a fixed scale relative to the picture, so every size shows the same scene
        texture = cv2.GaussianBlur(rng.normal(0, 1, (height, width)).astype(np.float32), (0, 0), 2.0 * scale)
        texture *= 3.0 / max(float(texture.std()), 1e-6)
        img += texture[:, :, None] + rng.normal(0, 2.0, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def image_batch(pictures):
    """uint8 [H, W, 3] arrays -> a ComfyUI IMAGE tensor [B, H, W, 3] float32 in 0..1."""
    import numpy as np
    import torch

    return torch.from_numpy(np.stack([p.astype(np.float32) / 255.0 for p in pictures]))


def fmt_s(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def check(ok: bool, text: str) -> str:
    return f"{'PASS' if ok else 'MISS'}  {text}"


def die(msg: str, code: int = 0):
    print(msg)
    sys.exit(code)
