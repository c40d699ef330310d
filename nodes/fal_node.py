"""``SDXLCNFalImg2Img``: the same request as the local sampler, run on fal's hosted endpoint.

The fal key is never a widget: it comes from ``FAL_KEY`` (or ``FAL_KEY_ID`` + ``FAL_KEY_SECRET``)
or from ``fal_key.txt`` in the pack's folder of ComfyUI's user directory. Every submitted request id is
recorded in ``fal_requests.jsonl`` beside it before waiting; put an id into ``request_id`` to fetch that
finished result instead of paying again.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from ..pipeline import request_log
from ..pipeline.endpoint import ENDPOINT
from ..pipeline.fal.errors import FalBatchIncomplete, FalCancelled, FalValidationError
from ..pipeline.fal.key import KEY_FILE_NAME
from ..pipeline.fal.settings import DEFAULT_TIMEOUT_S, current_target
from ..pipeline.folders import USER_FOLDER
from ..pipeline.request import GenerationRequest
from .comfy_hooks import CATEGORY, Progress, folder_paths, log, processing_interrupted, send_status, throw_if_interrupted
from .convert import pil_to_image
from .sampler_inputs import (
    SAMPLER_OUTPUT_TOOLTIPS,
    SAMPLER_RETURN_NAMES,
    SAMPLER_RETURN_TYPES,
    build_requests,
    image_inputs,
    request_widgets,
)

STATUS_EVENT = "sdxlcn.fal_status"
# progress units per request: where each state puts the bar (fal reports no step count)
_PROGRESS = {"SUBMITTED": 5, "IN_QUEUE": 10, "IN_PROGRESS": 50, "COMPLETED": 90}
_UNITS = 100


def parse_loras(text: str) -> list[dict]:
    """``url`` or ``url:scale`` per line (``#`` comments, blank lines ignored) -> fal's ``loras`` list."""
    out = []
    for n, raw in enumerate((text or "").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        path, scale = line, 1.0
        head, sep, tail = line.rpartition(":")
        if sep and head and "/" not in tail:
            try:
                scale = float(tail)
                path = head.strip()
            except ValueError:
                pass
        if not path.lower().startswith(("http://", "https://")):
            raise FalValidationError(
                "loras", f"line {n} ({path!r}) is not a URL; fal loads LoRAs from URLs: write one "
                         "'https://.../file.safetensors:0.8' per line")
        out.append({"path": path, "scale": scale})
    return out


def user_dir() -> Path | None:
    fp = folder_paths()
    if fp is None:
        return None
    try:
        return Path(fp.get_user_directory()) / USER_FOLDER
    except Exception:  # noqa: BLE001
        return None


def _fal_options(timeout_s) -> dict:
    """Key file and request log in ComfyUI's user directory (None outside ComfyUI), and the wait limit."""
    udir = user_dir()
    return {
        "key_file": (udir / KEY_FILE_NAME) if udir is not None else None,
        "request_log_dir": udir,
        "timeout_s": float(timeout_s),
    }


class _Reporter:
    """fal status -> ComfyUI's progress bar and a websocket message for the frontend (the server log gets the fal
    client's own lines)."""

    def __init__(self, n_requests: int, node_id):
        self.node_id = node_id
        self.total = max(n_requests, 1) * _UNITS
        self.values = [0] * max(n_requests, 1)
        self.lock = threading.Lock()
        self.failed = threading.Event()  # the progress hook raised (ComfyUI interrupt): cancel
        self.progress = Progress(self.total, node_id)

    def cancel_check(self) -> bool:
        return self.failed.is_set() or processing_interrupted()

    def for_request(self, index: int):
        def on_status(st):
            with self.lock:
                self.values[index] = max(self.values[index], _PROGRESS.get(st.state, 0))
                value = sum(self.values)
            # the log has the client's lines (one per status change and per fal log line): not said again here
            send_status(STATUS_EVENT, {
                "node": self.node_id, "request_id": st.request_id, "state": st.state,
                "queue_position": st.queue_position, "elapsed": round(st.elapsed, 1),
                "log": "\n".join(st.logs), "index": index,
            })
            try:
                self.progress.update(value)
            except Exception:  # noqa: BLE001 - ComfyUI's interrupt
                self.failed.set()
        return on_status

    def done(self):
        try:
            self.progress.update(self.total)
        except Exception:  # noqa: BLE001 - a cancel after the results are in changes nothing
            pass


class SDXLCNFalImg2Img:
    DESCRIPTION = (f"SDXL ControlNet (Canny) image-to-image on fal ({ENDPOINT}): "
                   "the same inputs and outputs as the local sampler, without a local GPU. fal bills each request. "
                   f"Key: FAL_KEY environment variable or <ComfyUI user dir>/{USER_FOLDER}/{KEY_FILE_NAME}.")
    CATEGORY = f"{CATEGORY}/sampling"
    RETURN_TYPES = SAMPLER_RETURN_TYPES
    RETURN_NAMES = SAMPLER_RETURN_NAMES
    # fal seeds each request once (every image of it from that seed), not seed + i per image as the local sampler
    OUTPUT_TOOLTIPS = (SAMPLER_OUTPUT_TOOLTIPS[0], "The seed of the first request (fal seeds a request once: its "
                       "images all come from that seed).", *SAMPLER_OUTPUT_TOOLTIPS[2:])
    FUNCTION = "generate"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                **image_inputs(),
                **_fal_widgets(),
            },
            "optional": {
                "loras": ("STRING", {
                    "multiline": True, "default": "",
                    "tooltip": "LoRAs fal loads, one per line: 'https://.../lora.safetensors:0.8' (URL, then an "
                               "optional ':scale', default 1)."}),
                "sync_mode": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "fal: return the images inline as data URIs instead of as files on fal's CDN."}),
                "request_id": ("STRING", {
                    "default": "",
                    "tooltip": "Fetch the finished result of an earlier fal request by id (from the server log, "
                               "which lists the unfetched ids at each run of this node, or "
                               f"`{request_log.cli_command()} fal-pending` run from ComfyUI's folder) instead of "
                               "submitting (and paying) again. Several ids: one per line; each result is also "
                               "saved to the output folder."}),
                "max_concurrency": ("INT", {
                    "default": 4, "min": 1, "max": 16,
                    "tooltip": "An input batch of B images is B fal requests; at most this many run at once."}),
                "timeout_s": ("INT", {
                    "default": int(DEFAULT_TIMEOUT_S), "min": 10, "max": 3600,
                    "tooltip": "Seconds to wait for fal. The request id stays recorded: fetch it later by id."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def generate(self, image, control_image, loras="", sync_mode=False, request_id="", max_concurrency=4,
                 timeout_s=DEFAULT_TIMEOUT_S, unique_id=None, **widgets):
        common = _fal_options(timeout_s)
        ids = [i.strip() for i in (request_id or "").replace(",", "\n").splitlines() if i.strip()]
        try:
            if ids:
                return self._fetch(ids, unique_id, common)
            requests = self._requests(image, control_image, loras, sync_mode, widgets)
            _mention_pending(common["request_log_dir"])
            reporter = _Reporter(len(requests), unique_id)
            results = self._run(requests, reporter, int(max_concurrency), common)
            seed = int(widgets["seed"])
        except FalCancelled:
            throw_if_interrupted()  # ComfyUI's own interruption inside ComfyUI
            raise
        reporter.done()
        images, flags = [], []
        for r in results:
            images.extend(r.images)
            flags.extend(r.has_nsfw_concepts)
        _warn_flags(flags)
        return (pil_to_image(images), seed, json.dumps(flags), results[-1].prompt)

    @staticmethod
    def _fetch(ids, unique_id, common):
        """Results fetched by id: each saved to the output folder as it arrives, then marked completed; sizes may
        differ (see :mod:`.fal_fetch`)."""
        from .fal_fetch import batch_of_first_size, fetch_ids

        reporter = _Reporter(len(ids), unique_id)
        results, saved, out = fetch_ids(ids, reporter, common)
        reporter.done()
        images, flags, prompt = batch_of_first_size(results, saved, out, common.get("request_log_dir"))
        _warn_flags(flags)
        return (pil_to_image(images), results[0][1].seed, json.dumps(flags), prompt)

    @staticmethod
    def _requests(image, control_image, loras, sync_mode, widgets) -> list[GenerationRequest]:
        requests = build_requests(widgets, image, control_image, loras=parse_loras(loras), sync_mode=bool(sync_mode))
        refuse_edge_maps(requests)
        return requests

    @staticmethod
    def _run(requests, reporter: _Reporter, max_concurrency: int, common):
        """The results in request order, each marked completed once it reached the user: returned as the node's
        output, or, in a partly failed batch, saved to the output folder (:func:`.fal_fetch.keep_completed`)."""
        from ..pipeline.fal.client import run_remote_batch
        from .fal_fetch import keep_completed

        try:
            results = run_remote_batch(requests, max_concurrency=max_concurrency, on_status_for=reporter.for_request,
                                       cancel_check=reporter.cancel_check, record_completed=False, **common)
        except FalBatchIncomplete as exc:
            raise keep_completed(exc, common["request_log_dir"]) from None
        for r in results:
            request_log.record(common["request_log_dir"], "completed", r.request_id)
        return results


def _mention_pending(log_dir) -> None:
    """Paid results never fetched (e.g. ComfyUI restarted while waiting): name them in the server log."""
    try:
        pending = request_log.pending(log_dir) if log_dir is not None else []
    except OSError:
        return
    if pending:
        ids = ", ".join(r["request_id"] for r in pending[-5:])
        who = current_target()
        what, how = ("fal request(s) were never fetched (paid)", "without paying again") if who == "fal" else \
            ("request(s) were never fetched", f"from {who} without running it again")
        log.warning("SDXLCNFalImg2Img: %d earlier %s: %s%s. Put an id into request_id to fetch its result %s, or run "
                    "`%s fal-pending` from ComfyUI's folder", len(pending), what, ids,
                    " (the latest 5)" if len(pending) > 5 else "", how, request_log.cli_command())


def _warn_flags(flags) -> None:
    if any(flags):
        log.warning("SDXLCNFalImg2Img: %s flagged %d of %d images (has_nsfw_concepts)", current_target(), sum(flags),
                    len(flags))


def refuse_edge_maps(requests) -> None:
    """fal (and a server of its endpoint) runs Canny on the control image itself: an edge map sent to it gives edges of
    edges."""
    import numpy as np

    from ..pipeline.canny import looks_like_edge_map

    for i, r in enumerate(requests):
        if not r.apply_canny or looks_like_edge_map(np.asarray(r.control_image_url.convert("RGB"))):
            raise FalValidationError(
                "control_image", f"(request {i + 1}) is an edge map (e.g. from the Canny Edges node), but "
                f"{current_target()} runs Canny on the control image itself and would find the edges of the edges. "
                "Connect the source "
                "picture (the Canny node's input) to control_image; to run on an edge map, use the local sampler "
                "with apply_canny off")


def _fal_widgets() -> dict:
    """The sampler's widgets, with the tooltips that differ on fal."""
    widgets = request_widgets()
    kind, opts = widgets["seed"]
    widgets["seed"] = (kind, {**opts, "tooltip": "fal's seed for the request: fal seeds a request's num_images once "
                                                 "(not seed + i per image as the local sampler does). An input batch "
                                                 "of B images is B requests: request k gets seed + k x num_images."})
    return widgets


def run_requests_on_fal(requests, unique_id=None, max_concurrency: int = 4, timeout_s: float = DEFAULT_TIMEOUT_S):
    """Run already-validated requests on fal with this node's progress, status and cancel handling
    (the local sampler's ``fallback``). Returns the results in request order."""
    reporter = _Reporter(len(requests), unique_id)
    try:
        results = SDXLCNFalImg2Img._run(requests, reporter, int(max_concurrency), _fal_options(timeout_s))
    except FalCancelled:
        throw_if_interrupted()  # ComfyUI's own interruption inside ComfyUI
        raise
    reporter.done()
    return results
