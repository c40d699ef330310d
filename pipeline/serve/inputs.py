"""A submitted body, checked the way fal checks it, before anything is queued: HTTP 422 naming the field otherwise.

Nothing here waits on the network: a submit is answered at once. Image fields take what fal takes from an API
client: an ``http(s)`` URL (its form checked now; downloaded by whoever runs the request, :mod:`.downloads`, under
:mod:`.fetch`'s rules: no address inside the network, a size cap and one deadline for the whole download) or a
``data:`` URI (checked now). Local paths and ``file://`` URLs are refused: nothing from a request reaches a file path
on the server. LoRAs are refused for the same reason (a request cannot make the server load files or code). An
image is one of a few formats (:data:`FORMATS`: none of them decodes when opened) and its size is read from its
header and refused before it is decoded. A body is refused before it is parsed when its structure cannot be a
request's (parsing 16 MiB of ``[{},{},...]`` takes 1 GB).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..errors import ImageInputError, RequestError
from ..images import decode_image
from ..request import GenerationRequest
from ..sizes import parse_image_size, target_size
from . import fetch
from .extras import refuse_unserved
from .protocol import HttpError, invalid
from .store import INPUT_NAMES


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 64 * 1024 * 1024  # a request body (data URIs included)
    max_image_bytes: int = 32 * 1024 * 1024  # one input image, decoded or downloaded
    max_input_pixels: int = 4096 * 4096  # one input image's pixels, read from its header before it is decoded
    download_timeout_s: float = 30.0  # all of a request's image downloads, redirects included
    outbound: fetch.Policy = field(default_factory=fetch.Policy.from_env)  # internal addresses image URLs may reach
    max_waiting: int = 100  # waiting requests; more is answered with 429
    sync_wait_s: float = 600.0  # how long a synchronous run waits for its result


# Pillow's names of the formats an input image may have: each is opened from its header alone (Pillow's ICO and ICNS
# decode their largest entry when opened, whatever size the header claims) and decodes to the size it declares
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
FORMATS_TEXT = "PNG, JPEG, WebP, GIF or BMP"
MAX_URL_CHARS = 8192
DECODES = 2  # images decoded at once (submits' checks and workers' runs together)
_DECODER = ThreadPoolExecutor(DECODES, thread_name_prefix="sdxlcn-serve-decode")
# a request is one object of about 25 fields (a few LoRAs, a list of timesteps): far fewer containers and values
MAX_JSON_CONTAINERS = 1000  # objects and arrays
MAX_JSON_VALUES = 20_000  # separators (',' and ':'), about one per value
# every string is a key or a value, preceded by a separator or opening its container: a body with more holds more
# containers or values than are read
MAX_JSON_STRINGS = MAX_JSON_VALUES + MAX_JSON_CONTAINERS + 1
# a JSON string once its escapes are gone, or the rest of the body after an opening quote: one character class
# repeated, which Python's regular expressions match in constant memory (a repeated group keeps a mark per turn:
# 166 bytes per escape, 5 GB for a 57 MiB body of "\n")
_JSON_STRING = re.compile(rb'"[^"]*"?')


def field_loc(name: str) -> list:
    """``"loras[0].path"`` as fal's ``loc``: ``["body", "loras", 0, "path"]``."""
    loc = ["body"]
    for part in name.split("."):
        m = re.fullmatch(r"([^\[]*)((?:\[\d+\])*)", part)
        if m and m.group(1):
            loc.append(m.group(1))
        for idx in re.findall(r"\[(\d+)\]", part):
            loc.append(int(idx))
    return loc


def _message(exc: Exception) -> str:
    text = str(exc)
    field = getattr(exc, "field", None)
    return text[len(field) + 2:] if field and text.startswith(f"{field}: ") else text


def _data_uri_bytes(name: str, value: str, limits: Limits) -> bytes:
    header, sep, payload = value.partition(",")
    if not sep or ";base64" not in header.lower():
        raise invalid(["body", name], "is a data: URI without base64 data; give 'data:image/png;base64,...'")
    if len(payload) * 3 // 4 > limits.max_image_bytes:
        raise invalid(["body", name], f"is over the {limits.max_image_bytes}-byte limit of this server")
    try:
        return base64.b64decode(payload, validate=False)
    except (binascii.Error, ValueError):
        raise invalid(["body", name], "is a data: URI whose base64 data is invalid") from None


def is_url(value: str) -> bool:
    return value[:8].lower().startswith(("http://", "https://"))


def _check_url(name: str, url: str) -> str:
    """An image URL's form (nothing fetched: :mod:`.downloads` fetches it when the request runs)."""
    if len(url) > MAX_URL_CHARS:
        raise invalid(["body", name], f"is a URL of {len(url)} characters; this server takes at most {MAX_URL_CHARS}")
    try:
        fetch.split(url)
    except fetch.FetchError as exc:
        raise invalid(["body", name], f"{fetch.shown(url)} {exc}") from None
    return url


def download(name: str, url: str, limits: Limits, deadline: float | None = None) -> bytes:
    """An image URL's bytes (:mod:`.fetch`'s rules), before ``deadline`` (``time.monotonic()``; default:
    ``download_timeout_s`` from now), which the request's other downloads share; 422 naming the field otherwise."""
    if deadline is None:
        deadline = time.monotonic() + limits.download_timeout_s
    late = (f"{fetch.shown(url)} did not answer in full within {limits.download_timeout_s:g} s, the time this server "
            "gives all of a request's image URLs; give a faster host, or send the image as a data URI")
    if deadline - time.monotonic() <= 0:
        raise invalid(["body", name], late)
    try:
        return fetch.get_ok(url, max_bytes=limits.max_image_bytes, timeout_s=deadline - time.monotonic(),
                            policy=limits.outbound)
    except fetch.FetchError as exc:
        raise invalid(["body", name], late if time.monotonic() >= deadline else str(exc)) from None


def image_size(name: str, data: bytes, limits: Limits) -> tuple[int, int]:
    """(width, height) from the image's header, nothing decoded; 422 when it is none of :data:`FORMATS` or has too
    many pixels (a 147 KB PNG can declare 6144x6144: decoding it would take 750 MB). Pillow's own warning about large
    images is not shown: this message says it."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=FORMATS) as probe:
                w, h = probe.size
    except Image.DecompressionBombError:
        w = h = None
    except Exception:  # noqa: BLE001 - any failure to read is "not an image"
        raise invalid(["body", name], f"is not a readable image of a format this server takes; give a {FORMATS_TEXT}"
                      ) from None
    if w is None or w * h > limits.max_input_pixels:
        size = "declares more pixels" if w is None else f"is {w}x{h} ({w * h / 1e6:.1f} MP), more pixels"
        raise invalid(["body", name], f"{size} than this server decodes ({limits.max_input_pixels / 1e6:.1f} MP, e.g. "
                                      "4096x4096); send a smaller image: the output is at most 2048x2048")
    return w, h


def decode(name: str, data: bytes, where: str):
    """The decoded image (RGB) of bytes :func:`image_size` passed (one of :data:`FORMATS` only), decoded on one of
    :data:`DECODES` threads: a 65 KB PNG may decode to 64 MB (eight submits at once took 2 GB), and the memory a
    decode frees stays with the threads that made it, not with every thread that calls."""
    return _DECODER.submit(decode_image, name, data, where, formats=FORMATS).result()


def check_images(images: dict, image_size_field, limits: Limits) -> None:
    """Input images as bytes (some or all of :data:`INPUT_NAMES`): each one's size read from its header, the output
    size the control image gives (when it is here), then each decoded once, to know it decodes; 422 naming the field
    otherwise."""
    sizes = {name: image_size(name, data, limits) for name, data in images.items()}
    if "control_image_url" in sizes:  # from the header: EXIF rotation swaps the sides, which changes neither the
        try:                          # pixels nor the shorter side
            target_size(parse_image_size(image_size_field), sizes["control_image_url"])
        except RequestError as exc:
            raise invalid(field_loc(exc.field), _message(exc)) from None
    for name, data in images.items():
        try:
            decode(name, data, "the image")
        except ImageInputError as exc:
            raise invalid(["body", name], _message(exc)) from None


def check_webhook(url: str | None, policy: fetch.Policy | None = None) -> str | None:
    """``fal_webhook``: an http(s) URL whose host is not an address inside the network. Only an address written in
    the URL is checked here (nothing waits on the network); a name is resolved and checked at each delivery."""
    if url is None:
        return None
    loc = ["query", "fal_webhook"]
    if not url.lower().startswith(("http://", "https://")) or len(url) > 2048:
        raise invalid(loc, "must be an http(s) URL (at most 2048 characters)")
    try:
        address = fetch.numeric_address(fetch.split(url).hostname)
        if address is not None and (policy or fetch.Policy.from_env()).refuses(address):
            raise fetch.Refused(fetch.INTERNAL_MSG)
    except fetch.Refused as exc:
        raise invalid(loc, f"{fetch.shown(url)} {exc}") from None
    return url


def refuse_broken_text(data) -> None:
    """422 naming the first text (a field's name or value, at any depth) holding a lone surrogate such as
    ``"\\ud800"``: JSON lets one through, but it is no character and cannot be written as UTF-8."""
    stack = [(data, ["body"])]
    while stack:
        value, loc = stack.pop()
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for key, item in items:
            where = loc + [key if isinstance(key, int) else _printable(key)]
            if isinstance(key, str) and _printable(key) != key:
                raise invalid(where, "this field's name holds a lone surrogate (\\ud800-\\udfff), which is no "
                                     "character; send valid UTF-8")
            if isinstance(item, str) and _printable(item) != item:
                raise invalid(where, "holds a lone surrogate (\\ud800-\\udfff), which is no character; send "
                                     "valid UTF-8 text")
            if isinstance(item, (dict, list)):
                stack.append((item, where))


def _printable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def refuse_unlike_a_request(body: bytes) -> None:
    """422 naming the body, before it is parsed, when its structure cannot be a request's: not a UTF-8 JSON object,
    or more strings, containers or values than a request has. Counted outside strings with byte counts and one
    regular expression, in memory a few times the body's (no Python object per value: parsing 16 MiB of
    ``[{},{},...]`` takes 1 GB)."""
    if json.detect_encoding(body) not in ("utf-8", "utf-8-sig"):
        raise invalid(["body"], "must be JSON in UTF-8", "value_error.jsondecode")
    start = body.removeprefix(b"\xef\xbb\xbf").lstrip()[:1]
    if start and start != b"{":
        raise invalid(["body"], "must be a JSON object: {\"prompt\": ..., \"image_url\": ..., \"control_image_url\": "
                                "...}", "type_error.dict")
    # in UTF-8 the bytes of '"' and '\\' occur in no other character; escapes go first, left to right as a parser
    # reads them (each escaped backslash, then each escaped quote), so that every '"' left opens or closes a string
    text = body.replace(b"\\\\", b"").replace(b'\\"', b"") if b"\\" in body else body
    strings = text.count(b'"') // 2
    if strings > MAX_JSON_STRINGS:  # counted before the strings are cut out: each cut costs memory
        raise invalid(["body"], f"holds {strings} strings; a request is one object of a few dozen fields (at most "
                                f"{MAX_JSON_STRINGS} strings are read)", "value_error.jsondecode")
    skeleton = _JSON_STRING.sub(b"", text)
    del text
    containers = skeleton.count(b"{") + skeleton.count(b"[")
    values = skeleton.count(b",") + skeleton.count(b":")
    if containers > MAX_JSON_CONTAINERS or values > MAX_JSON_VALUES:
        raise invalid(["body"], f"holds {containers} objects/arrays and {values} values; a request is one object of "
                                f"a few dozen fields (at most {MAX_JSON_CONTAINERS} objects/arrays and "
                                f"{MAX_JSON_VALUES} values are read)", "value_error.jsondecode")


def parse_body(body: bytes) -> dict:
    """The body as a JSON object; 422 naming the body (or the field holding broken text) otherwise."""
    refuse_unlike_a_request(body or b"")
    try:
        data = json.loads(body or b"null")
    except RecursionError:
        raise invalid(["body"], "nests too deeply to be read (a request is one flat object)",
                      "value_error.jsondecode") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise invalid(["body"], f"is not valid JSON ({exc.__class__.__name__})", "value_error.jsondecode") from None
    refuse_broken_text(data)
    if not isinstance(data, dict):
        raise invalid(["body"], "must be a JSON object: {\"prompt\": ..., \"image_url\": ..., "
                                "\"control_image_url\": ...}", "type_error.dict")
    return data


def check_submission(body: bytes, limits: Limits, hooks: frozenset = frozenset()) -> tuple[dict, dict]:
    """(the request's arguments to store, its ``data:`` input images as bytes): everything checked that can be
    without the network. An image given as a URL stays a URL in the arguments (its stored bytes come later, from
    :mod:`.downloads`); one given as a data URI is stored beside the row (an empty text in the arguments).

    ``hooks``: the optional models this server has (``"enable_safety_checker"``, ``"expand_prompt"``).
    """
    data = parse_body(body)
    try:
        request = GenerationRequest.from_dict(data)
    except RequestError as exc:
        missing = _message(exc).startswith("is required")
        raise invalid(field_loc(exc.field), "field required" if missing else _message(exc),
                      "value_error.missing" if missing else "value_error") from None
    refuse_unserved(request, hooks)  # a field whose model or option this server lacks
    images, urls = {}, {}
    for name in INPUT_NAMES:
        value = getattr(request, name)
        if not isinstance(value, str):
            raise invalid(["body", name], "must be text: an http(s) URL or a data: URI")
        value = value.strip()
        if value[:5].lower() == "data:":
            images[name] = _data_uri_bytes(name, value, limits)
        elif is_url(value):
            urls[name] = _check_url(name, value)
        else:
            raise invalid(["body", name], "must be an http(s) URL or a data: URI (base64); this server opens no "
                                          "files, so local paths and file:// URLs are refused")
    check_images(images, request.image_size, limits)
    request = request.with_seed()
    args = request.to_fal_arguments()
    args.update(request.local_only_changes())
    for name in INPUT_NAMES:
        args[name] = urls.get(name, "")  # a data URI's bytes are stored beside the row
    return args, images


def run_request(args: dict, images: dict) -> GenerationRequest:
    """The stored request again, with its input images decoded (what a worker runs)."""
    data = dict(args)
    for name in INPUT_NAMES:
        data[name] = decode(name, images[name], "the stored input")
    return GenerationRequest.from_dict(data)


def refuse_body_size(length: int, limits: Limits) -> None:
    if length > limits.max_body_bytes:
        raise HttpError(413, [{"loc": ["body"], "msg": f"the body is {length} bytes, over this server's limit of "
                                                       f"{limits.max_body_bytes}; send images as URLs",
                               "type": "value_error.too_large"}])
