"""Images into and out of fal: input images as URLs, data URIs or uploads, and the result decoded.

Input images: http(s) URLs and data URIs go as given. Local paths, ``file://`` URLs and PIL images
become data URIs, or are uploaded to fal's storage (``fal_client``'s upload) when the encoded file is
over :data:`~.settings.UPLOAD_THRESHOLD_BYTES` (2 MiB; a data URI that large makes every request body
heavy, and fal's request size limit is reached sooner). The result comes back as the same
:class:`GenerationResult` as a local run, images as PIL.
"""

from __future__ import annotations

import base64
import json
import mimetypes
import os
import time
import urllib.parse
import urllib.request
from pathlib import Path

from ..errors import ImageInputError
from ..images import decode_image, download, encode_image, load_image
from ..request import GenerationRequest
from ..result import GenerationResult
from .errors import FalImageDownloadError, FalNoImages, FalValidationError
from .key import redact
from .settings import FalSettings, log
from .transport import Waiter, call_with_retries


def _image_bytes(value, field_name: str) -> tuple[bytes, str, str] | None:
    """(bytes, content type, file name) for a local image input; None when it goes to fal as given."""
    from PIL import Image

    if isinstance(value, Image.Image):
        data, ctype = encode_image(value.convert("RGB") if value.mode not in ("RGB", "L") else value, "png")
        return data, ctype, f"{field_name}.png"
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise ImageInputError(field_name, f"cannot be sent: got {type(value).__name__}; give a path, an http(s) URL, "
                                          "a data URI or a PIL image")
    s = value.strip()
    low = s[:16].lower()
    if low.startswith(("http://", "https://", "data:")):
        return None
    if low.startswith("file://"):
        s = urllib.request.url2pathname(urllib.parse.urlsplit(s).path)
    p = Path(s).expanduser()
    if not p.is_file():
        raise ImageInputError(field_name, f"file not found: {p}; check the path")
    load_image(str(p), field_name)  # a readable image, or a clear error before anything is paid
    ctype = mimetypes.guess_type(p.name)[0] or "image/png"
    return p.read_bytes(), ctype, p.name


def prepare_image(value, field_name: str, client, waiter: Waiter, settings: FalSettings) -> str:
    """The value of an image field as fal takes it: a URL, a data URI, or a fal storage URL."""
    got = _image_bytes(value, field_name)
    if got is None:
        return value.strip() if isinstance(value, str) else value
    data, ctype, name = got
    if len(data) <= settings.upload_threshold_bytes:
        return f"data:{ctype};base64,{base64.b64encode(data).decode('ascii')}"
    kwargs = {"file_name": name}
    if settings.upload_repository:
        kwargs["repository"] = settings.upload_repository
    log.info("fal: uploading %s (%d bytes) to fal storage", field_name, len(data))
    return call_with_retries(waiter, lambda: client.upload(data, ctype, **kwargs),
                              f"uploading {field_name}", settings, None)


_LOCAL_ONLY_WHY = {
    "apply_canny": "fal always runs Canny on the control image itself",
    "local_scheduler": "fal runs its own sampler",
    "local_control_start": "on fal the ControlNet acts in every step",
    "local_control_end": "on fal the ControlNet acts in every step",
    "local_timesteps": "fal runs its own sampler's timesteps",
}


def _as_written(value) -> str:
    """A request value as the request JSON writes it (a list, not a Python tuple; true, not True)."""
    try:
        return json.dumps(list(value) if isinstance(value, tuple) else value)
    except (TypeError, ValueError):
        return repr(value)


def check_request(request: GenerationRequest, target: str = "fal") -> dict:
    """Everything that can be checked before anything is sent (or announced as billed): the fields fal takes and
    each local image input (found, readable). Returns :func:`fal_arguments`."""
    args = fal_arguments(request, target)
    for name in ("image_url", "control_image_url"):
        _image_bytes(args[name], name)
    return args


def fal_arguments(request: GenerationRequest, target: str = "fal") -> dict:
    """``request.to_fal_arguments()``, checked for what only works locally; ``target`` runs it (as messages name it:
    :attr:`.settings.FalSettings.target`)."""
    args = request.to_fal_arguments()
    for i, lora in enumerate(request.loras):
        if not str(lora.path).lower().startswith(("http://", "https://")):
            raise FalValidationError(
                f"loras[{i}].path",
                f"{lora.path!r} is a local file; fal needs a LoRA URL (https://...). Upload it (e.g. to Hugging "
                "Face or fal storage) or run locally")
    local = request.local_only_changes()
    if local:
        name = next(iter(local))
        why = _LOCAL_ONLY_WHY.get(name, "fal has no such field") if target == "fal" else \
            f"fal's endpoint, which {target} serves, has no such field"
        raise FalValidationError(name, f"{_as_written(local[name])} is a local-only setting ({why}): leave it at its "
                                       f"default to run on {target}, or run locally")
    return args


def decode_result(data, request: GenerationRequest | None, request_id: str, settings: FalSettings,
                   timings: dict) -> GenerationResult:
    result = f"the result of request {request_id} from {settings.target}"
    if not isinstance(data, dict):
        raise FalNoImages(f"{result} is not an object; no images came back", request_id)
    entries = data.get("images") or []
    if not isinstance(entries, list):  # an answer fal does not give: read again by id, never paid for again
        raise ValueError(f"its images field is a {type(entries).__name__}, not a list")
    if not entries:
        raise FalNoImages(
            f"{result} holds no images (keys: {sorted(data)}); nothing to return. Try again"
            f"{settings.billing(' (a new request is billed again)')}.", request_id)
    images = []
    t = time.perf_counter()
    for i, entry in enumerate(entries):
        url = entry.get("url") if isinstance(entry, dict) else entry
        where = f"images[{i}]"
        if not isinstance(url, str) or not url:
            raise FalImageDownloadError(f"{result}: {where} has no url", request_id)
        try:
            if url[:5].lower() == "data:":
                img = load_image(url, where)
            elif url[:8].lower().startswith(("https://", "http://")):
                raw = download(url, where, max_bytes=settings.max_download_bytes, timeout=settings.download_timeout_s)
                img = decode_image(where, raw, f"the image at {where}")
            else:
                raise ImageInputError(where, "is neither an http(s) URL nor a data URI")
        except ImageInputError as exc:
            raise FalImageDownloadError(
                f"request {request_id}: result image {redact(exc)}. The result is kept by {settings.target} for a "
                f"while: fetch it again by id {request_id}.", request_id) from None
        images.append(img)
    timings["download"] = time.perf_counter() - t
    flags = data.get("has_nsfw_concepts")
    if not isinstance(flags, list):
        flags = [False] * len(images)
    remote_t = data.get("timings") if isinstance(data.get("timings"), dict) else {}
    all_timings = {f"fal_{k}": float(v) for k, v in remote_t.items() if isinstance(v, (int, float))}
    all_timings.update(timings)
    seed = data.get("seed", request.seed if request is not None else None)
    prompt = data.get("prompt") or (request.prompt if request is not None else "")
    expanded = data.get("expanded_prompt")
    if expanded is None and request is not None and request.expand_prompt and data.get("prompt") and \
            data.get("prompt") != request.prompt:
        expanded = data.get("prompt")
    return GenerationResult(
        images=images,
        seed=int(seed) if seed is not None else 0,
        has_nsfw_concepts=[bool(f) for f in flags],
        width=images[0].width,
        height=images[0].height,
        prompt=prompt,
        expanded_prompt=expanded,
        timings=all_timings,
        request_id=request_id,
    )
