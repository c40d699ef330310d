"""The optional fields of the endpoint's schema on the stand-alone ``serve``, and the options that make them run:
``loras`` (names in ``--loras-dir``, https URLs with ``--lora-urls``: :mod:`.loras`), ``enable_safety_checker``
(``--safety-checker PATH``) and ``expand_prompt`` (``--prompt-expansion PATH``), the model folders ``generate`` takes.

A field whose model or option the server lacks is refused at the submit with a 422 naming the field and the option
that would allow it (:func:`refuse_unserved`, for any backend that does not list the field in its ``hooks()``).
The worker turns a stored request into what it runs (:meth:`Extras.prepare`): LoRA names and URLs become checked
local files loaded on its pipeline, and the safety checker and prompt expander the request enables are loaded on
its device (once: later requests reuse them).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import RequestError
from ..request import LoraSpec
from .loras import CACHE_OPTION, DEFAULT_CACHE_MB, DIR_OPTION, HOST_OPTION, URLS_OPTION, LoraRules, private
from .protocol import invalid

SAFETY_OPTION = "--safety-checker"
EXPANSION_OPTION = "--prompt-expansion"
OPTION_OF = {"enable_safety_checker": SAFETY_OPTION, "expand_prompt": EXPANSION_OPTION}
CACHE_FOLDER = "lora-cache"  # in --data-dir


def refuse_unserved(request, hooks: frozenset) -> None:
    """422 for the first optional field ``request`` uses that this server does not run (``hooks``: those it does)."""
    if request.loras and "loras" not in hooks:
        raise invalid(["body", "loras", 0, "path"],
                      f"this server takes no LoRAs: its operator gives a LoRA folder (serve {DIR_OPTION} DIR) or "
                      f"allows https URLs (serve {URLS_OPTION}); send an empty list")
    for name, option in OPTION_OF.items():
        if getattr(request, name) and name not in hooks:
            raise invalid(["body", name], f"this server has no model for {name}: its operator loads one with serve "
                                          f"{option} PATH; set it to false or leave it out")


@dataclass(frozen=True)
class Extras:
    loras: LoraRules = field(default_factory=LoraRules)
    safety_checker: Path | None = None
    prompt_expansion: Path | None = None

    def hooks(self) -> frozenset:
        have = {"loras": self.loras.any, "enable_safety_checker": self.safety_checker is not None,
                "expand_prompt": self.prompt_expansion is not None}
        return frozenset(name for name, yes in have.items() if yes)

    def refuse(self, args: dict, policy=None) -> None:
        """422 naming ``loras[i].path`` for a LoRA this server cannot load (its form only: nothing is fetched)."""
        self.loras.check(args.get("loras"), policy)

    def summary(self) -> str:
        """For the start-up line: what each optional field does here."""
        parts = [self.loras.summary()]
        for name, path in (("enable_safety_checker", self.safety_checker), ("expand_prompt", self.prompt_expansion)):
            parts.append(f"{name} with {path}" if path else f"{name} refused (no {OPTION_OF[name]})")
        return "; ".join(parts)

    def prepare(self, request, device: str, pipe, policy, log=None) -> tuple:
        """``(request, generate's keyword arguments)``: its LoRAs as local files already loaded on ``pipe``, and the
        safety checker and prompt expander it enables. :class:`RequestError` naming the field otherwise."""
        from ..local.lora.fused import preload
        from ..local.lora.sources import LoraError

        specs = []
        for i, spec in enumerate(request.loras):
            file = self.loras.local_file(i, spec.path, policy, log)
            try:
                preload(pipe, str(file))
            except LoraError as exc:
                raise RequestError(f"loras[{i}].path", private(exc.detail, file, spec.path)) from None
            specs.append(LoraSpec(str(file), spec.scale))
        request = replace(request, loras=tuple(specs))
        dtype = getattr(pipe, "dtype", None)
        hooks = {}
        if request.enable_safety_checker:
            from ..local.request_models.safety import load_safety_checker

            hooks["safety_checker"] = load_safety_checker(self._model("enable_safety_checker"), device=device,
                                                          dtype=dtype)
        if request.expand_prompt:
            from ..local.request_models.prompt_expansion import load_prompt_expander

            hooks["prompt_expander"] = load_prompt_expander(self._model("expand_prompt"), device=device, dtype=dtype)
        return request, hooks

    def _model(self, name: str) -> Path:
        path = self.safety_checker if name == "enable_safety_checker" else self.prompt_expansion
        if path is None:  # stored before a restart without the option
            raise RequestError(name, f"this server has no model for {name} any more (serve {OPTION_OF[name]} PATH "
                                     "loads one); submit it again with it false")
        return path


def add_arguments(p) -> None:
    """``serve``'s options for the optional fields."""
    p.add_argument(DIR_OPTION, action="append", default=[], metavar="DIR",
                   help="a folder of LoRA files (.safetensors) requests may name in loras[].path, e.g. "
                        "{\"path\": \"my-style.safetensors\"} (repeatable). Default: none, loras refused")
    p.add_argument(URLS_OPTION, action="store_true",
                   help="let loras[].path be an https URL, downloaded once (under the same outbound rules as image "
                        f"URLs) into {CACHE_FOLDER}/ in --data-dir. Default: refused")
    p.add_argument(HOST_OPTION, action="append", default=[], metavar="HOST",
                   help=f"with {URLS_OPTION}: a host LoRA URLs may name (repeatable; its subdomains too, e.g. "
                        "huggingface.co). Default: any public host")
    p.add_argument(CACHE_OPTION, type=float, default=DEFAULT_CACHE_MB,
                   help=f"size of the LoRA URL cache in MiB; the least recently used files go ({DEFAULT_CACHE_MB})")
    p.add_argument(SAFETY_OPTION, default=None, metavar="PATH",
                   help="safety checker folder (CompVis/stable-diffusion-safety-checker): requests with "
                        "enable_safety_checker true run it. Default: none, refused")
    p.add_argument(EXPANSION_OPTION, default=None, metavar="PATH",
                   help="prompt-expansion model folder (GPT-2 class, e.g. Fooocus' fooocus_expansion): requests with "
                        "expand_prompt true run it. Default: none, refused")


def from_args(args) -> Extras:
    """The options checked (folders there and of the right kind); one error line naming the option otherwise."""
    from ..errors import ModelLoadError, SDXLCNError
    from ..local.request_models.prompt_expansion import check_folder
    from ..local.request_models.safety import split_layout

    dirs = []
    for d in getattr(args, "loras_dir", None) or ():
        folder = Path(d).expanduser()
        if not folder.is_dir():
            raise SDXLCNError(f"{DIR_OPTION} {d}: not a folder; give the folder holding the LoRA files")
        dirs.append(folder)
    hosts = set()
    for h in getattr(args, "lora_url_host", None) or ():
        host = h.strip().lower().rstrip(".")
        if not host or any(c in host for c in "/:@ ") or not host.isascii():
            raise SDXLCNError(f"{HOST_OPTION} {h}: not a host name; give one such as huggingface.co (no scheme, port "
                              "or path)")
        hosts.add(host)
    urls = bool(getattr(args, "lora_urls", False))
    if hosts and not urls:
        raise SDXLCNError(f"{HOST_OPTION} needs {URLS_OPTION}: add it to let requests name LoRAs by https URL")
    cache_mb = getattr(args, "lora_cache_mb", DEFAULT_CACHE_MB)
    if not cache_mb > 0:
        raise SDXLCNError(f"{CACHE_OPTION} {cache_mb:g}: give a size in MiB above 0")
    models = {}
    for option, attr, check in ((SAFETY_OPTION, "safety_checker", split_layout),
                                (EXPANSION_OPTION, "prompt_expansion", check_folder)):
        value = getattr(args, attr, None)
        if value is None:
            continue
        path = Path(value).expanduser()
        try:
            check(path)
        except ModelLoadError as exc:
            raise SDXLCNError(f"{option} {value}: {exc}") from None
        models[attr] = path
    rules = LoraRules(tuple(dirs), urls, frozenset(hosts), Path(args.data_dir) / CACHE_FOLDER,
                      int(cache_mb * 2**20))
    return Extras(rules, **models)
