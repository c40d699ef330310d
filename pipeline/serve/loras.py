"""``loras[i].path`` on the stand-alone ``serve``: a LoRA file's name in the server's LoRA folder(s) (``--loras-dir``)
or, only where the operator allows it (``--lora-urls``, optionally only from some hosts: ``--lora-url-host``), an
https URL downloaded once into a size-capped cache (:func:`..local.lora_sources.cached_download`).

The submit checks each entry's form (nothing is read from the network there): a name must be a ``.safetensors`` file
in a LoRA folder, a URL must be https, allowed, and not written as an address inside the network. The worker then
turns each entry into a local file before it generates: a name is looked up again (it may have gone), a URL is
downloaded under :mod:`.fetch`'s rules (no address inside the network, a size cap, one deadline) unless cached, and
every file must be a LoRA in safetensors form. A refusal is a 422 naming ``loras[i].path`` and the option that would
allow what was asked. Messages never show a path on the server.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..errors import RequestError
from ..local.lora.sources import LORA_DOWNLOAD_TIMEOUT_S, MAX_LORA_DOWNLOAD_BYTES, LoraError
from . import fetch
from .protocol import invalid

DIR_OPTION = "--loras-dir"
URLS_OPTION = "--lora-urls"
HOST_OPTION = "--lora-url-host"
CACHE_OPTION = "--lora-cache-mb"
DEFAULT_CACHE_MB = 8192
MAX_URL_CHARS = 8192
SUFFIX = ".safetensors"


def _loc(i: int) -> list:
    return ["body", "loras", i, "path"]


def _field(i: int) -> str:
    return f"loras[{i}].path"


def inside(file: Path, folder) -> bool:
    """Whether ``file``'s real place (links followed) is inside ``folder``'s: a link in the LoRA folder that points
    elsewhere serves nothing (a request could otherwise test which files exist beyond it)."""
    try:
        return Path(file).resolve().is_relative_to(Path(folder).resolve())
    except OSError:
        return False


def is_url(path: str) -> bool:
    return "://" in path[:12]


def host_allowed(host: str, hosts: frozenset) -> bool:
    """``host`` is one of ``hosts`` or below one (``cdn.example.com`` under ``example.com``); any host when empty."""
    host = host.lower().rstrip(".")
    return not hosts or any(host == h or host.endswith("." + h) for h in hosts)


@dataclass(frozen=True)
class LoraRules:
    dirs: tuple = ()  # the LoRA folders (Paths), searched in order
    urls: bool = False  # https URLs allowed
    hosts: frozenset = frozenset()  # lower-case host names URLs may name (empty: any public host)
    cache_dir: Path | None = None
    cache_bytes: int = DEFAULT_CACHE_MB * 2**20
    timeout_s: float = LORA_DOWNLOAD_TIMEOUT_S

    @property
    def any(self) -> bool:
        return bool(self.dirs) or self.urls

    def summary(self) -> str:
        """For the start-up line."""
        parts = []
        if self.dirs:
            parts.append(f"LoRAs by name: {sum(len(self.names(d)) for d in self.dirs)} .safetensors file(s) in "
                         f"{', '.join(str(d) for d in self.dirs)}")
        if self.urls:
            hosts = f"from {', '.join(sorted(self.hosts))}" if self.hosts else "from any public host"
            parts.append(f"LoRA URLs (https) {hosts}, cached in {self.cache_dir} "
                         f"(at most {self.cache_bytes / 2**20:g} MiB)")
        return "; ".join(parts) or f"loras refused (no {DIR_OPTION}, no {URLS_OPTION})"

    @staticmethod
    def names(folder: Path) -> list[str]:
        """The LoRA names the folder serves: its .safetensors files whose real place is inside it."""
        try:
            return [p.relative_to(folder).as_posix() for p in Path(folder).rglob("*" + SUFFIX)
                    if p.is_file() and inside(p, folder)]
        except OSError:
            return []

    # ---- at the submit: the form of each entry, nothing from the network ---------------------------------------
    def check(self, loras, policy: fetch.Policy | None = None) -> None:
        """422 naming ``loras[i].path`` for the first entry this server cannot load."""
        for i, lora in enumerate(loras or ()):
            path = str(lora.get("path", "") if isinstance(lora, dict) else getattr(lora, "path", "")).strip()
            try:
                self._check_url(i, path, policy) if is_url(path) else self.find(i, path)
            except RequestError as exc:
                raise invalid(_loc(i), exc.detail) from None

    def _check_url(self, i: int, url: str, policy) -> None:
        shown = fetch.shown(url)
        if not self.urls:
            also = "; or name a .safetensors file in its LoRA folder" if self.dirs else ""
            raise RequestError(_field(i), f"{shown} is a URL: this server downloads no LoRAs unless its operator "
                                          f"allows it (serve {URLS_OPTION}){also}")
        if not url[:8].lower().startswith("https://"):
            raise RequestError(_field(i), f"{shown} is not an https URL; this server downloads LoRAs over https only")
        if len(url) > MAX_URL_CHARS:
            raise RequestError(_field(i), f"is a URL of {len(url)} characters; this server takes at most "
                                          f"{MAX_URL_CHARS}")
        try:
            parts = fetch.split(url)
            address = fetch.numeric_address(parts.hostname)
            if address is not None and (policy or fetch.Policy()).refuses(address):
                raise fetch.Refused(fetch.INTERNAL_MSG)
        except fetch.FetchError as exc:
            raise RequestError(_field(i), f"{shown} {exc}") from None
        if not host_allowed(parts.hostname, self.hosts):
            raise RequestError(_field(i), f"{shown}: this server downloads LoRAs only from the hosts its operator "
                                          f"lists (serve {HOST_OPTION} HOST adds one); {parts.hostname} is not one")

    def find(self, i: int, name: str) -> Path:
        """The file of a LoRA name; :class:`RequestError` naming ``loras[i].path`` otherwise."""
        shown = repr(name[:200])
        if not self.dirs:
            also = f", or allows https URLs with serve {URLS_OPTION}" if not self.urls else ""
            raise RequestError(_field(i), f"{shown}: this server has no LoRA folder (its operator gives one with "
                                          f"serve {DIR_OPTION} DIR{also})")
        pure = PurePosixPath(name)
        if not name or "\\" in name or "\x00" in name or pure.is_absolute() or ".." in pure.parts or \
                name.startswith("~") or ":" in name:
            raise RequestError(_field(i), f"{shown} is not a LoRA name: give a file name in this server's LoRA "
                                          f"folder (e.g. my-style{SUFFIX}, or sub/my-style{SUFFIX}), never a path")
        if not name.lower().endswith(SUFFIX):
            raise RequestError(_field(i), f"{shown} is not a {SUFFIX} file name; this server loads LoRAs in "
                                          "safetensors form only (its operator puts them in the folder given with "
                                          f"serve {DIR_OPTION})")
        for folder in self.dirs:
            candidate = Path(folder) / pure
            if candidate.is_file() and inside(candidate, folder):
                return candidate
        raise RequestError(_field(i), f"{shown} is not in this server's LoRA folder; name one of its {SUFFIX} files "
                                      f"(its operator adds LoRAs to the folder given with serve {DIR_OPTION})")

    # ---- in the worker: local files --------------------------------------------------------------------------
    def local_file(self, i: int, path: str, policy: fetch.Policy, log=None) -> Path:
        """The local file of entry ``i``, checked to be a LoRA in safetensors form (a URL downloaded unless cached);
        :class:`RequestError` naming ``loras[i].path`` otherwise."""
        from ..local.lora.adapters import check_lora_file, is_safetensors
        from ..local.lora.sources import cached_download

        if not is_url(path):
            file = self.find(i, path)
        else:
            self._check_url(i, path, policy)
            if log is not None:
                log(f"downloading {_field(i)}")
            try:
                file = cached_download(path, self.cache_dir, max_bytes=MAX_LORA_DOWNLOAD_BYTES,
                                       timeout=self.timeout_s, cache_bytes=self.cache_bytes,
                                       fetch=lambda url, most, secs: _download(url, most, secs, policy))
            except LoraError as exc:
                raise RequestError(_field(i), exc.detail) from None
        try:
            if not is_safetensors(file):
                raise LoraError(path, f"{fetch.shown(path) if is_url(path) else repr(path)} is not a safetensors file; "
                                      "this server loads LoRAs in safetensors form only")
            check_lora_file(file, path, allow_pickle=False)
        except LoraError as exc:
            if is_url(path):
                file.unlink(missing_ok=True)  # not kept: the next request downloads it again
            raise RequestError(_field(i), private(exc.detail, file, path)) from None
        return file


def _download(url: str, max_bytes: int, timeout: float, policy) -> bytes:
    """``url``'s body under :mod:`.fetch`'s rules; :class:`LoraError` saying why not."""
    try:
        return fetch.get_ok(url, max_bytes=max_bytes, timeout_s=timeout, policy=policy)
    except fetch.FetchError as exc:
        raise LoraError(url, str(exc)) from None


def private(text: str, file: Path, given: str) -> str:
    """``text`` with the server's path of ``file`` replaced by the name or URL the request gave."""
    shown = fetch.shown(given) if is_url(given) else given
    for form in {str(file.resolve()), str(file.absolute()), str(file)}:
        text = text.replace(form, shown)
    return text
