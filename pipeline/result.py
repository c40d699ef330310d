"""The result of a request, local or remote (:class:`GenerationResult`), in fal's output shape, and writing it to a folder."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .images import encode_image


@dataclass
class GenerationResult:
    images: list
    seed: int
    has_nsfw_concepts: list[bool]
    width: int
    height: int
    prompt: str
    expanded_prompt: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    request_id: str | None = None  # fal's id of the request that made it (None for a local run)


def result_dir(out, overwrite: bool = False) -> Path:
    """``out``, or, when it already holds an earlier result and ``overwrite`` is off, its first free ``run_NNN``
    subfolder (said on stderr): a rerun never replaces a user's earlier images without being asked."""
    out = Path(out)
    if overwrite or not (out / "result.json").exists():
        return out
    n = 2
    while (out / f"run_{n:03d}" / "result.json").exists():
        n += 1
    fresh = out / f"run_{n:03d}"
    print(f"{out} already holds an earlier result; writing to {fresh} (pass --overwrite to replace it)",
          file=sys.stderr)
    return fresh


def write_result(result: GenerationResult, out_dir, fmt: str = "png", stem: str = "image", extra: dict | None = None) -> dict:
    """Write the images and ``result.json`` (fal's shape, file:// URLs) into ``out_dir``; return that dict."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ext = "jpg" if fmt.lower() in ("jpg", "jpeg") else "png"
    entries = []
    for i, img in enumerate(result.images):
        data, ctype = encode_image(img, fmt)
        path = out / f"{stem}_{i:03d}.{ext}"
        path.write_bytes(data)
        entries.append({
            "url": path.resolve().as_uri(),
            "width": img.width,
            "height": img.height,
            "content_type": ctype,
            "file_name": path.name,
        })
    doc = {
        "images": entries,
        "seed": result.seed,
        "has_nsfw_concepts": list(result.has_nsfw_concepts),
        "prompt": result.prompt,
        "timings": {k: round(v, 4) for k, v in result.timings.items()},
    }
    if result.expanded_prompt is not None:
        doc["expanded_prompt"] = result.expanded_prompt
    if extra:
        doc.update(extra)
    (out / "result.json").write_text(json.dumps(doc, indent=2), encoding="utf-8")
    return doc
