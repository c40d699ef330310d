"""The SDXL configuration folder that single-file loading needs, assembled without the hub.

The pack ships SDXL base 1.0's configs (``configs/sdxl_base``: model index, scheduler, UNet,
VAE, both text encoders, tokenizer settings). The CLIP BPE vocabulary (``vocab.json`` +
``merges.txt``, the same file for both SDXL tokenizers) is not shipped; it comes from the
first of these that exists:

1. ``$SDXLCN_CLIP_TOKENIZER_DIR``: a folder with ``vocab.json`` and ``merges.txt``;
2. the host ComfyUI's ``comfy/sd1_tokenizer`` (found through the importable ``comfy`` package,
   ``$COMFYUI_DIR``, or the folders above this pack in ``custom_nodes``);
3. the ``open_clip_torch`` package's ``bpe_simple_vocab_16e6.txt.gz``, turned into
   ``vocab.json``/``merges.txt`` by :func:`clip_vocab_from_bpe_gz` (the same derivation
   OpenAI's CLIP tokenizer does in memory).

The assembled folder is written once under ``$SDXLCN_CACHE_DIR`` (default
:func:`..folders.cache_root`) and reused.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from ...errors import ModelLoadError
from ...folders import cache_root

CONFIGS = Path(__file__).resolve().parent / "configs"
SDXL_BASE_CONFIG = CONFIGS / "sdxl_base"
CONTROLNET_SDXL_CONFIG = CONFIGS / "controlnet_sdxl"

TOKENIZER_HELP = (
    "The CLIP tokenizer vocabulary (vocab.json + merges.txt) was not found. Run inside ComfyUI (its "
    "comfy/sd1_tokenizer is used), or set COMFYUI_DIR to a ComfyUI checkout, or set SDXLCN_CLIP_TOKENIZER_DIR to a "
    "folder holding vocab.json and merges.txt, or `pip install open_clip_torch`, or pass a config folder "
    "(config_dir / --config-dir) that has tokenizer/ and tokenizer_2/."
)


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable character table, in CLIP's order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def clip_vocab_from_bpe_gz(gz_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` derived from CLIP's ``bpe_simple_vocab_16e6.txt.gz``.

    Same construction as OpenAI's ``SimpleTokenizer``: 256 byte symbols, the same with ``</w>``,
    one token per merge (the first 48,894), then the two special tokens: 49,408 in all.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(gz_path, "rb").read().decode("utf-8").split("\n")
    merges = [m for m in lines[1:] if m.strip()][: 49152 - 256 - 2]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return out


def _comfy_tokenizer_dirs():
    spec = None
    try:
        spec = importlib.util.find_spec("comfy")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            yield Path(loc) / "sd1_tokenizer"
    if os.environ.get("COMFYUI_DIR"):
        yield Path(os.environ["COMFYUI_DIR"]) / "comfy" / "sd1_tokenizer"
    # <ComfyUI>/custom_nodes/<this pack>/pipeline/local/models/sdxl_config.py: the pack, custom_nodes, ComfyUI
    here = Path(__file__).resolve()
    for parent in here.parents[2:5]:
        yield parent / "comfy" / "sd1_tokenizer"


def find_clip_vocab() -> tuple[Path, str]:
    """(folder with vocab.json + merges.txt, where it came from). Raises ModelLoadError if none is found."""
    env = os.environ.get("SDXLCN_CLIP_TOKENIZER_DIR")
    if env:
        d = Path(env)
        if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
            return d, f"SDXLCN_CLIP_TOKENIZER_DIR={d}"
        raise ModelLoadError(f"SDXLCN_CLIP_TOKENIZER_DIR={d} has no vocab.json + merges.txt. {TOKENIZER_HELP}")
    for d in _comfy_tokenizer_dirs():
        if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
            return d, f"ComfyUI ({d})"
    spec = importlib.util.find_spec("open_clip")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            gz = Path(loc) / "bpe_simple_vocab_16e6.txt.gz"
            if gz.is_file():
                out = cache_root() / "clip_vocab_from_open_clip"
                if not (out / "vocab.json").is_file():
                    tmp = Path(tempfile.mkdtemp(dir=_mkdir(cache_root())))
                    clip_vocab_from_bpe_gz(gz, tmp)
                    _replace_dir(tmp, out)
                return out, f"open_clip ({gz})"
    raise ModelLoadError(TOKENIZER_HELP)


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def _replace_dir(tmp: Path, final: Path) -> None:
    try:
        tmp.rename(final)
    except OSError:  # another process won the race, or the folder exists
        shutil.rmtree(tmp, ignore_errors=True)


def _digest(paths) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def sdxl_config_dir() -> Path:
    """The bundled SDXL base config plus tokenizer vocabularies, as a folder ``from_single_file(config=)`` takes."""
    vocab_dir, _source = find_clip_vocab()
    files = [p for p in SDXL_BASE_CONFIG.rglob("*") if p.is_file()]
    digest = _digest(files + [vocab_dir / "vocab.json", vocab_dir / "merges.txt"])
    final = cache_root() / f"sdxl_base_config-{digest}"
    if (final / "model_index.json").is_file():
        return final
    tmp = Path(tempfile.mkdtemp(dir=_mkdir(cache_root())))
    shutil.copytree(SDXL_BASE_CONFIG, tmp, dirs_exist_ok=True)
    for sub in ("tokenizer", "tokenizer_2"):
        for name in ("vocab.json", "merges.txt"):
            shutil.copyfile(vocab_dir / name, tmp / sub / name)
    _replace_dir(tmp, final)
    return final
