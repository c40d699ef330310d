"""The fal node's ``request_id`` input: fetch finished results by id, none of them lost.

Each result is saved to ComfyUI's output folder as it arrives (paid for: a later failure, or images of another size,
must not lose it) and only then marked ``completed`` in the request log. A failed or cancelled id stays pending.
The node's IMAGE output is one batch ``[B, H, W, C]``: when the results' sizes differ it holds the images of the
first result's size and the others are in the output folder (the log and the status message name them).
"""

from __future__ import annotations

from pathlib import Path

from ..pipeline import request_log
from ..pipeline.fal.errors import FalCancelled, FalError
from .comfy_hooks import folder_paths, log


def output_dir() -> Path | None:
    """ComfyUI's output folder, or None outside ComfyUI."""
    fp = folder_paths()
    if fp is None or not hasattr(fp, "get_output_directory"):
        return None
    try:
        return Path(fp.get_output_directory())
    except Exception:  # noqa: BLE001
        return None


def save_result(result, out: Path, stem: str) -> list[str]:
    """Write ``result``'s images as ``<stem>_<j>.png`` into ``out``; their file names."""
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for j, img in enumerate(result.images):
        path = out / f"{stem}_{j:02d}.png"
        img.save(path)
        names.append(path.name)
    return names


def fetch_ids(ids: list[str], reporter, common: dict):
    """Fetch every id (a failure does not stop the others; a cancel does). Returns the results that reached the
    user, in id order: (results, saved file names). Raises a :class:`FalError` naming what was saved and what
    stays pending when any id failed."""
    from ..pipeline.fal.client import fetch_remote_result

    out = output_dir()
    log_dir = common.get("request_log_dir")
    results, saved, failures = [], [], []
    for k, rid in enumerate(ids):
        try:
            result = fetch_remote_result(rid, on_status=reporter.for_request(k), cancel_check=reporter.cancel_check,
                                         record_completed=False, **common)
        except FalCancelled:
            if saved:
                log.warning("SDXLCNFalImg2Img: cancelled; the results fetched before were saved to the output "
                            "folder: %s", ", ".join(saved))
            raise
        except FalError as exc:
            failures.append((rid, exc))
            continue
        if out is not None:
            saved.extend(save_result(result, out, f"sdxlcn_fal_{rid}"))
            request_log.record(log_dir, "completed", rid)  # in the output folder: it reached the user
        results.append((rid, result))
    if failures:
        kept = (f"The fetched results were saved to the output folder: {', '.join(saved)}." if saved else
                "No result was fetched.")
        raise FalError(f"{len(failures)} of {len(ids)} fal request ids could not be fetched ("
                       + "; ".join(f"{rid}: {exc}" for rid, exc in failures)
                       + f"). {kept} The failed ids stay in the pending list: fetch them again later.")
    return results, saved, out


def batch_of_first_size(results, saved: list[str], out: Path | None, log_dir):
    """The images, flags and prompt for the node's outputs: every image when they share a size, else those of the
    first result's size. Outside ComfyUI (no output folder) the ids whose images are returned are marked completed
    here; the others stay pending."""
    first = results[0][1].images[0].size
    images, flags, prompt, returned, left_out = [], [], results[0][1].prompt, [], []
    for rid, r in results:
        same = [(img, flag) for img, flag in zip(r.images, _flags(r)) if img.size == first]
        if len(same) < len(r.images):
            left_out.append(rid)
        if same:
            returned.append(rid)
            prompt = r.prompt
        images.extend(img for img, _ in same)
        flags.extend(flag for _, flag in same)
    if out is None:
        for rid in returned:
            if rid not in left_out:
                request_log.record(log_dir, "completed", rid)
    if left_out:
        where = (f"every image is in the output folder ({', '.join(saved)})" if out is not None else
                 "the others stay pending (no output folder to save them to)")
        log.warning("SDXLCNFalImg2Img: the fetched results have different sizes; the IMAGE output holds the %d "
                    "image(s) of %dx%d (the first result's size); %s", len(images), first[0], first[1], where)
    return images, flags, prompt


def _flags(result) -> list[bool]:
    flags = list(result.has_nsfw_concepts or [])
    return flags + [False] * (len(result.images) - len(flags))
