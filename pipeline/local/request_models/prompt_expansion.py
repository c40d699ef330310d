"""Prompt expansion (``expand_prompt``) with a local GPT-2-class causal language model, in the style
Fooocus popularised.

How it works: the prompt, cleaned and followed by a comma, is continued by the language model with
seeded top-k sampling until the token count reaches the next multiple of 75 (one CLIP chunk). When
the model folder has a ``positive.txt`` word list (Fooocus' expansion model ships one), only those
words (as single tokens) and the comma may be sampled, and a token already used is not sampled again;
without the list, any token may follow. The result is the whole text (your prompt first), which is
what the pipeline then uses and what ``result.json`` reports as ``expanded_prompt``.

Determinism: the same prompt, seed, model and device give the same expansion; the seed (reduced
modulo 2**32, as Fooocus does) seeds torch's generator inside :func:`torch.random.fork_rng`, so the
caller's random state is left untouched. Different seeds give different expansions.

The model folder is a ``transformers`` folder that ``AutoModelForCausalLM`` and ``AutoTokenizer``
load: ``config.json`` + weights (``model.safetensors`` or ``pytorch_model.bin``) + tokenizer files
(``vocab.json`` + ``merges.txt`` or ``tokenizer.json``), optionally ``positive.txt``.
Fooocus' model: the files of ``models/prompt_expansion/fooocus_expansion`` in lllyasviel/Fooocus plus
``fooocus_expansion.bin`` from huggingface.co/lllyasviel/misc saved as ``pytorch_model.bin``.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

from ...errors import ModelLoadError
from ..models.load_lock import load_lock
from ..memory.release import SingleModelCache

SEED_MODULUS = 2**32  # Fooocus reduces seeds like this (numpy's seed limit); kept for the same seed -> same text
CHUNK_TOKENS = 75  # one CLIP text chunk: expansion fills the prompt up to the next multiple of this
TOP_K = 100
NEG_INF = -8192.0
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")
WORD_LIST = "positive.txt"

_cache = SingleModelCache()


def clean_prompt(text: str) -> str:
    """Collapse runs of spaces and of commas; strip commas, dots and whitespace from both ends."""
    text = str(text).replace("\r", " ").replace("\n", " ")
    while "  " in text:
        text = text.replace("  ", " ")
    text = re.sub(r"\s*,(\s*,)+", ",", text)  # ", ," -> ","
    return text.strip(",. \r\n")


def check_folder(folder: str | os.PathLike) -> Path:
    """Raise :class:`ModelLoadError` naming what is missing unless ``folder`` holds a causal LM + tokenizer."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ModelLoadError(
            f"prompt expansion: {folder} has no config.json; it should hold a GPT-2-class model "
            "(config.json, pytorch_model.bin or model.safetensors, vocab.json + merges.txt, positive.txt), "
            "e.g. Fooocus' fooocus_expansion"
        )
    try:
        archs = list(json.loads(cfg_path.read_text(encoding="utf-8")).get("architectures") or [])
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"prompt expansion: {cfg_path} is not valid JSON ({exc})") from None
    if not any(a.endswith(("LMHeadModel", "ForCausalLM")) for a in archs):
        raise ModelLoadError(
            f"prompt expansion: {cfg_path} describes {archs or 'an unknown model'}, not a causal language model "
            "(e.g. GPT2LMHeadModel)"
        )
    if not any((folder / n).is_file() for n in WEIGHT_FILES):
        raise ModelLoadError(
            f"prompt expansion: {folder} has config.json but no weights (model.safetensors or pytorch_model.bin); "
            "for Fooocus' model, save fooocus_expansion.bin there as pytorch_model.bin"
        )
    if not any((folder / n).is_file() for n in TOKENIZER_FILES):
        raise ModelLoadError(
            f"prompt expansion: {folder} has no tokenizer (tokenizer.json, or vocab.json + merges.txt)"
        )
    return folder


class _WordListBias:
    """Logits processor: allow only the listed token ids (and the comma), each at most once."""

    def __init__(self, allowed_bias, comma_id: int | None):
        self.allowed_bias = allowed_bias  # [1, vocab]: 0 for allowed ids, NEG_INF elsewhere; None = all allowed
        self.comma_id = comma_id

    def __call__(self, input_ids, scores):
        import torch

        if self.allowed_bias is None:
            bias = torch.zeros_like(scores[:1])
        else:
            bias = self.allowed_bias.to(device=scores.device, dtype=scores.dtype).clone()
        width = bias.shape[1]
        used = input_ids[0].long()
        bias[0, used[used < width]] = NEG_INF  # no word twice
        if self.comma_id is not None and self.comma_id < width:
            bias[0, self.comma_id] = 0
        if bias.shape[1] < scores.shape[1]:  # embedding rows beyond the tokenizer's vocabulary
            pad = torch.full((1, scores.shape[1] - bias.shape[1]), NEG_INF, device=scores.device, dtype=scores.dtype)
            bias = torch.cat([bias, pad], dim=1)
        return scores + bias[:, : scores.shape[1]]


class LocalPromptExpander:
    """The ``prompt_expander`` hook of :func:`pipeline.generate.generate`: ``expander(prompt, seed) -> str``."""

    def __init__(self, model, tokenizer, device: str, words: list[str] | None = None, source: str = ""):
        import torch

        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.source = source
        vocab = tokenizer.get_vocab()
        size = max(len(tokenizer), max(vocab.values()) + 1)
        self.allowed_bias = None
        if words:
            wanted = {"\u0120" + w.strip().lower() for w in words if w.strip()}  # GPT-2 marks a leading space as U+0120
            bias = torch.full((1, size), NEG_INF, dtype=torch.float32)
            ids = [i for tok, i in vocab.items() if tok in wanted]
            if not ids:
                raise ModelLoadError(f"prompt expansion: none of the words in {WORD_LIST} is a single token of {source}")
            bias[0, ids] = 0.0
            self.allowed_bias = bias
        comma = tokenizer.convert_tokens_to_ids(",")
        self.comma_id = comma if isinstance(comma, int) and comma != tokenizer.unk_token_id else None

    def __call__(self, prompt: str, seed: int) -> str:
        import torch
        from transformers import LogitsProcessorList

        text = clean_prompt(prompt)
        if not text:
            return text
        enc = self.tokenizer(text + ",", return_tensors="pt")
        n = int(enc["input_ids"].shape[1])
        budget = CHUNK_TOKENS * int(math.ceil(n / CHUNK_TOKENS)) - n
        limit = getattr(self.model.config, "n_positions", None) or getattr(self.model.config, "max_position_embeddings", None)
        if limit:
            budget = min(budget, int(limit) - n)
        if budget <= 0:
            return text
        enc = {k: v.to(self.device) for k, v in enc.items()}
        devices = [torch.device(self.device).index or 0] if str(self.device).startswith("cuda") else []
        eos = self.tokenizer.eos_token_id
        with torch.random.fork_rng(devices=devices), torch.inference_mode():
            torch.manual_seed(int(seed) % SEED_MODULUS)
            out = self.model.generate(
                **enc,
                do_sample=True,
                top_k=TOP_K,
                max_new_tokens=budget,
                logits_processor=LogitsProcessorList([_WordListBias(self.allowed_bias, self.comma_id)]),
                pad_token_id=eos if eos is not None else 0,
            )
        return clean_prompt(self.tokenizer.decode(out[0], skip_special_tokens=True))


def load_prompt_expander(path: str | os.PathLike, *, device: str | None = None, dtype=None) -> LocalPromptExpander:
    """Load (once; later calls with the same folder/device/dtype reuse it) the expansion model in folder ``path``."""
    from ..memory.devices import default_device

    device = device or default_device()
    folder = check_folder(Path(path).expanduser())
    if dtype is None:
        import torch

        dtype = torch.float16 if device.startswith("cuda") else torch.float32
    key = (str(folder.resolve()), device, str(dtype))
    return _cache.get_or_load(key, lambda: _load(folder, device, dtype))


def _load(folder: Path, device: str, dtype) -> LocalPromptExpander:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        with load_lock():
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"prompt expansion: could not load {folder}: {exc}") from exc
    model.to(device)
    model.eval()
    words = None
    if (folder / WORD_LIST).is_file():
        words = (folder / WORD_LIST).read_text(encoding="utf-8").splitlines()
    return LocalPromptExpander(model, tokenizer, device, words, source=str(folder))


def free_prompt_expander() -> bool:
    """Drop the cached expansion model. Returns whether one was loaded."""
    return _cache.free()


def cached_prompt_expander() -> LocalPromptExpander | None:
    return _cache.current()
