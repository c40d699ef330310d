"""Shared helpers for the benchmarks: interleaved timing with medians, synthetic test pictures, reporting.

Every benchmark measures its baseline in the same run, interleaved with the thing measured
(A, B, A, B, ...), and compares medians, so a noisy shared machine shifts both sides alike.

A timing verdict (PASS/MISS) is given only when the samples' spread cannot flip it (:func:`compare`): the
comparison must come out the same at both ends of the median's confidence interval, not just at the medians.
Otherwise the line says NO VERDICT, with the samples' range, and asks for a rerun on a quieter machine.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

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


def own_peak_rss() -> int:
    """This process's own peak resident memory in bytes: ``VmHWM``, the high-water mark of its address space, which
    starts afresh at ``exec``. Never ``getrusage().ru_maxrss``: Linux carries that across fork and exec, so a child
    reports its parent's peak when that was larger (a bench that had just written 14 GiB of weights saw every
    child's load "peak" at 13.62 GiB, 1.55x the files, whatever the load did)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


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


def _coverage(k: int, n: int) -> float:
    """How often [x_(k), x_(n+1-k)] of n sorted samples holds their distribution's median: 1 - 2 P(Bin(n, 1/2) < k)."""
    return 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2**n


def median_interval(xs: Sequence[float], confidence: float = 0.9) -> tuple[float, float]:
    """A distribution-free interval for the median of the samples' distribution (the sign test's order statistics):
    the narrowest [x_(k), x_(n+1-k)] that holds it with at least ``confidence``; with fewer than 5 samples no
    interval reaches 90 %, and all of them are taken (min..max). A single sample is its own interval."""
    xs = sorted(xs)
    n, k = len(xs), 1
    while k + 1 <= (n + 1) // 2 and _coverage(k + 1, n) >= confidence:
        k += 1
    return xs[k - 1], xs[n - k]


@dataclass(frozen=True)
class Verdict:
    """The outcome of one timing comparison: ``ok`` is True (PASS), False (MISS) or None (no verdict: the
    spread of the samples lets the comparison go either way)."""

    ok: bool | None
    ratio: float  # median(num) / median(den): the figure the bench prints
    low: float  # the ratio at the favourable and unfavourable ends of the medians' confidence intervals
    high: float
    spread: str  # the samples' ranges, for the no-verdict line


def _span(xs: Sequence[float]) -> str:
    return f"{fmt_s(min(xs))}-{fmt_s(max(xs))}" if len(xs) > 1 else fmt_s(xs[0])


def compare(num: Sequence[float], den: Sequence[float] | float, target: float, *, at_most: bool = True,
            paired: bool = False, min_samples: int = 3) -> Verdict:
    """Judge ``median(num) / median(den)`` against ``target`` (``<= target`` when ``at_most``, else ``>=``), only
    where the spread of the samples cannot flip the answer.

    The ratio's plausible range comes from 90 % intervals of medians (:func:`median_interval`): for ``paired``
    samples (``num[i]`` and ``den[i]`` timed in the same interleaved round, so a busy spell hits both) the interval of
    the per-round ratios, otherwise ``low(num)/high(den)`` .. ``high(num)/low(den)``. ``den`` may be a constant (an
    absolute target in seconds). PASS when the whole range meets the target, MISS when none of it does, no verdict
    when the target lies inside it -- or when the side with the most samples has fewer than ``min_samples`` (one
    long call, such as a kornia run, may stand alone: the other side's spread, timed around it, shows the noise).
    Up to 7 samples the interval is min..max, so a single stray sample voids a close verdict; from 11 on, the two
    most extreme at each end are left out.
    """
    num = [float(x) for x in num]
    den = [float(den)] if isinstance(den, (int, float)) else [float(x) for x in den]
    if not num or not den:
        raise ValueError("compare: both sides need at least one sample")
    ratio = median(num) / median(den)
    if paired:
        if len(num) != len(den):
            raise ValueError(f"compare: paired samples need equal counts, got {len(num)} and {len(den)}")
        low, high = median_interval([a / b for a, b in zip(num, den)])
    else:
        (n1, n3), (d1, d3) = median_interval(num), median_interval(den)
        low, high = n1 / d3, n3 / d1
    spread = f"samples {_span(num)}" + (f" against {_span(den)}" if len(den) > 1 else "")
    if max(len(num), len(den)) < min_samples:
        return Verdict(None, ratio, low, high, spread + f"; fewer than {min_samples} samples")
    if at_most:
        ok = True if high <= target else False if low > target else None
    else:
        ok = True if low >= target else False if high < target else None
    return Verdict(ok, ratio, low, high, spread)


def check(ok: "bool | Verdict", text: str) -> str:
    """One verdict line. ``ok`` is a bool for exact checks (pixels, memory) or a :class:`Verdict` for timings."""
    if isinstance(ok, Verdict):
        if ok.ok is None:
            return (f"NO VERDICT  {text}: too noisy to tell, the ratio's median may be anywhere in "
                    f"{ok.low:.3g}..{ok.high:.3g} ({ok.spread}); rerun on a quieter machine (see `uptime`) or with "
                    f"more repetitions")
        ok = ok.ok
    return f"{'PASS' if ok else 'MISS'}  {text}"


def die(msg: str, code: int = 0):
    print(msg)
    sys.exit(code)
