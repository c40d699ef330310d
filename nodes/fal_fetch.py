"""Paid fal results saved to ComfyUI's output folder, none of them lost: the fal node's ``request_id`` input (fetch
finished results by id) and the completed results of a partly failed batch.

Each result is saved as ``sdxlcn_fal_<request id>_<n>.png`` (a later batch never overwrites an earlier paid image)
as it arrives, and only once its files exist is it marked ``completed`` in the request log: a failed, cancelled or
unsaved id stays pending. Stopping a fetch (Cancel) only stops waiting; the request is not cancelled on fal.
The node's IMAGE output is one batch ``[B, H, W, C]``: when the results' sizes differ it holds the images of the
first result's size and the others are in the output folder (the log and the status message name them).
"""

from __future__ import annotations

from pathlib import Path

from ..pipeline import request_log
from ..pipeline.fal.errors import FalBatchIncomplete, FalCancelled, FalError, FalResultNotSaved, FalValidationError
from ..pipeline.fal.settings import current_target
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


def save_result(result, out: Path) -> list[str]:
    """Write ``result``'s images as ``sdxlcn_fal_<request id>_<j>.png`` into ``out``; their file names. A failed
    write is a :class:`FalResultNotSaved` naming the folder."""
    names = []
    try:
        out.mkdir(parents=True, exist_ok=True)
        for j, img in enumerate(result.images):
            path = out / f"sdxlcn_fal_{result.request_id}_{j:02d}.png"
            img.save(path, format="PNG")
            names.append(path.name)
    except OSError as exc:
        raise FalResultNotSaved(result.request_id, out, exc) from None
    return names


def save_then_complete(result, out: Path, log_dir) -> list[str]:
    """:func:`save_result`, then (only once the files exist) ``completed`` in the request log."""
    names = save_result(result, out)
    request_log.record(log_dir, "completed", result.request_id)  # in the output folder: it reached the user
    return names


def fetch_ids(ids: list[str], reporter, common: dict):
    """Fetch every id (a failure does not stop the others; a cancel does). Returns the results that reached the
    user, in id order: (results, saved file names). Raises a :class:`FalError` naming what was saved and what
    stays pending when any id failed."""
    from ..pipeline.fal.client import fetch_remote_result

    refuse_malformed(ids)
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
            try:
                saved.extend(save_then_complete(result, out, log_dir))
            except FalResultNotSaved as exc:
                failures.append((rid, exc))
                continue
        results.append((rid, result))
    if failures:
        kept = (f"The fetched results were saved to the output folder: {', '.join(saved)}." if saved else
                "No result was fetched.")
        raise FalError(f"{len(failures)} of {len(ids)} request ids could not be fetched from {current_target()} ("
                       + "; ".join(f"{rid}: {exc}" for rid, exc in failures)
                       + f"). {kept} The failed ids stay in the pending list: fetch them again later.")
    return results, saved, out


def refuse_malformed(ids: list[str]) -> None:
    """Every id is a fal request id (a UUID), or nothing is fetched: one error naming each malformed line. Such an id
    was never sent (no URL is built from it) and is in no request log, so it cannot "stay pending"."""
    from ..pipeline.fal.client import check_request_id

    bad = []
    for n, rid in enumerate(ids, start=1):
        try:
            check_request_id(rid)
        except FalValidationError:
            bad.append(f"{rid[:60]!r}" + (f" (id {n} of {len(ids)})" if len(ids) > 1 else ""))
    if bad:
        raise FalValidationError("request_id", f"{', '.join(bad)} {'is' if len(bad) == 1 else 'are'} not a fal "
                                               "request id (a UUID such as 3f2b8c1e-0d4a-4b6e-9c7f-1a2b3c4d5e6f); "
                                               "nothing was sent and nothing fetched: correct or remove "
                                               f"{'it' if len(bad) == 1 else 'them'} (one id per line)")


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


def keep_completed(exc: FalBatchIncomplete, log_dir) -> FalError:
    """Save the images of the requests of a partly failed batch that completed (paid for) to ComfyUI's output folder,
    each then marked completed; the error names the saved files and the failed requests' ids."""
    out = output_dir()
    saved, unsaved = [], []
    for result in exc.results:
        if result is None or out is None:
            continue
        try:
            saved.extend(save_then_complete(result, out, log_dir))
        except FalResultNotSaved as err:
            unsaved.append(str(err))
    failed = [f"#{i + 1}" + (f" (request {e.request_id})" if getattr(e, "request_id", None) else "") + f": {e}"
              for i, e in enumerate(exc.errors) if e is not None]
    kept = [f"The completed images were saved to the output folder: {', '.join(saved)}."] if saved else []
    kept += ["The completed results are in the error's .results."] if out is None else []
    kept += [f"{text}." for text in unsaved]
    who = current_target()
    requests = "fal requests" if who == "fal" else f"requests to {who}"
    return FalError(f"{len(failed)} of {len(exc.errors)} {requests} failed ({'; '.join(failed)}). "
                    + " ".join(kept + ["Fetch a failed request that has an id later with the node's request_id "
                                       "input."]))
