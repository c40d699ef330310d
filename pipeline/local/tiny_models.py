"""Tiny SDXL-shaped models with random weights, for tests and the offline demo.

They use the real diffusers/transformers classes with tiny configs, and a CLIP
tokenizer built from a vocabulary written on the spot, so everything that loads
a real SDXL + ControlNet checkpoint (diffusers folder layout) loads these too.
Nothing here touches the network.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .quiet import no_progress_bars

_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_WORDS = [
    "ice", "fortress", "aurora", "skies", "polar", "wildlife", "twilight", "cartoon",
    "illustration", "animation", "face", "male", "female", "a", "photo", "of", "cat",
    "dog", "castle", "red", "blue", "green", "mountain", "lake", "forest", "city",
]


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins that byte-level BPE (GPT-2, CLIP) uses for raw bytes."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    symbols = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def _write_bpe_files(folder: Path, tokens: list[str], merges: list[str]) -> None:
    """Write vocab.json (token -> id, first occurrence wins) and merges.txt (duplicates dropped)."""
    vocab: dict[str, int] = {}
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n", encoding="utf-8")


def write_clip_tokenizer(folder: str | os.PathLike) -> Path:
    """Write a small byte-level CLIP BPE vocabulary and load a CLIPTokenizer from it."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokens = ["<|startoftext|>", "<|endoftext|>", "!"]
    # every single byte-level symbol, with and without the end-of-word mark
    for ch in _byte_symbols():
        tokens.append(ch)
        tokens.append(ch + "</w>")
    merges = []
    seen = set(tokens)
    for word in _WORDS:
        # merge letters left to right so whole words become single tokens
        current = word[0]
        for i, ch in enumerate(word[1:], start=1):
            last = i == len(word) - 1
            right = ch + ("</w>" if last else "")
            merges.append(f"{current} {right}")
            current = current + right
            if current not in seen:
                tokens.append(current)
                seen.add(current)
    _write_bpe_files(folder, tokens, merges)
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    tok.save_pretrained(folder)
    return folder


# The tiny UNet (scale 1) described in the original LDM ("SGM") terms, as ComfyUI and SDXL's own configs describe
# a UNet: what a host that holds these weights in LDM modules reports (see skeleton.unet_config_from_ldm).
TINY_UNET_LDM_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 80, "in_channels": 4, "model_channels": 32,
    "num_res_blocks": [2, 2], "transformer_depth": [0, 0, 2, 2], "channel_mult": [1, 2],
    "transformer_depth_middle": 2, "use_linear_in_transformer": True, "context_dim": 64, "num_head_channels": 16,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2], "use_temporal_attention": False, "use_temporal_resblock": False,
}
TINY_ADDITION_TIME_EMBED_DIM = 8


def tiny_components(seed: int = 0, scale: int = 1):
    """Build the tiny SDXL components (unet, vae, text encoders, tokenizers, scheduler) and a ControlNet.
    ``scale`` widens the UNet and ControlNet (8: a ~600 MB pipeline, big enough to see in a process's memory)."""
    import tempfile

    import torch
    from diffusers import AutoencoderKL, ControlNetModel, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    # what the tiny UNet and its ControlNet share (a ControlNet mirrors its UNet's down path)
    shared = dict(
        block_out_channels=(32 * scale, 64 * scale),
        layers_per_block=2,
        in_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TINY_ADDITION_TIME_EMBED_DIM,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 * 8 + 32
        cross_attention_dim=64,
    )
    unet = UNet2DConditionModel(sample_size=32, out_channels=4, up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                **shared)
    torch.manual_seed(seed + 1)
    controlnet = ControlNetModel(conditioning_embedding_out_channels=(8, 16, 32, 32),  # downsamples by 8, like the VAE
                                 **shared)
    # SDXL base's own scheduler config (its keys for other schedulers too: clip_sample and set_alpha_to_one false),
    # so a scheduler built from_config of it, as LoRA cards do, is the one built on the real model
    from .models.sdxl_config import SDXL_BASE_CONFIG

    scheduler = EulerDiscreteScheduler.from_pretrained(SDXL_BASE_CONFIG, subfolder="scheduler")
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(
        # four blocks, so the VAE downsamples by 8 as SDXL's does
        block_out_channels=[8, 16, 32, 32],
        layers_per_block=1,
        norm_num_groups=8,
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        latent_channels=4,
        sample_size=32,
        scaling_factor=0.13025,
    )
    text_config = CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=5,
        pad_token_id=1,
        vocab_size=1000,
        hidden_act="gelu",
        projection_dim=32,
    )
    torch.manual_seed(seed + 3)
    text_encoder = CLIPTextModel(text_config)
    torch.manual_seed(seed + 4)
    text_encoder_2 = CLIPTextModelWithProjection(text_config)
    with tempfile.TemporaryDirectory() as tmp:
        write_clip_tokenizer(tmp)
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
        tokenizer_2 = CLIPTokenizer.from_pretrained(tmp)
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "scheduler": scheduler,
    }, controlnet


# the file or folder name of each tiny model, and the ComfyUI model folder it belongs in (where the tiny workflows,
# workflows/tiny/ and workflows/api/*_tiny.json, look for it)
TINY_NAMES = {"checkpoint": "tiny-sdxl", "controlnet": "tiny-controlnet-canny", "lora": "tiny-sdxl-lora.safetensors"}
COMFYUI_FOLDERS = {"checkpoint": "diffusers", "controlnet": "controlnet", "lora": "loras"}


def tiny_model_paths(root: str | os.PathLike, comfyui: bool = False) -> dict[str, Path]:
    """Where :func:`build_tiny_models` puts each model: all in ``root``, or (``comfyui``) ``root`` being ComfyUI's
    ``models`` folder, each in its own model folder (diffusers/, controlnet/, loras/)."""
    root = Path(root)
    return {k: (root / COMFYUI_FOLDERS[k] if comfyui else root) / name for k, name in TINY_NAMES.items()}


def build_tiny_models(root: str | os.PathLike, seed: int = 0, scale: int = 1, comfyui: bool = False) -> dict[str, Path]:
    """Save a tiny SDXL base (diffusers folder), a tiny ControlNet (diffusers folder) and a tiny LoRA for that base
    (a .safetensors file) under ``root`` (see :func:`tiny_model_paths`).

    Returns ``{"checkpoint": <folder>, "controlnet": <folder>, "lora": <file>}``. Idempotent: each model is written
    under a temporary name and renamed when complete, so one that exists is complete and is reused.
    """
    import shutil

    from diffusers import StableDiffusionXLControlNetImg2ImgPipeline

    paths = tiny_model_paths(root, comfyui)
    missing = [k for k, p in paths.items() if not p.exists()]
    if not missing:
        return paths
    components, controlnet = tiny_components(seed, scale)
    with no_progress_bars():  # transformers' "Writing model shards" bar per text encoder: the CLI says what it wrote
        for kind in missing:
            final = paths[kind]
            final.parent.mkdir(parents=True, exist_ok=True)
            partial = final.with_name(f".{final.name}.partial")
            shutil.rmtree(partial, ignore_errors=True) if partial.is_dir() else partial.unlink(missing_ok=True)
            if kind == "checkpoint":
                pipe = StableDiffusionXLControlNetImg2ImgPipeline(**components, controlnet=controlnet)
                _save_base(pipe, partial)
            elif kind == "controlnet":
                controlnet.save_pretrained(partial)
            else:
                write_tiny_lora(components["unet"], partial, seed=seed)
            readable_by_all(partial)
            os.replace(partial, final)
    return paths


def readable_by_all(path: Path) -> None:
    """Mode 644 for ``path`` and every file under it, as the configs beside them get: safetensors (so diffusers' and
    transformers' save_pretrained) writes weight files readable by their owner only, so another user running
    ComfyUI on the same machine could not read them."""
    for f in (path.rglob("*") if path.is_dir() else [path]):
        if f.is_file():
            os.chmod(f, 0o644)


def _save_base(pipe, base_dir: Path) -> None:
    """A plain SDXL base folder (no controlnet entry), like stabilityai/stable-diffusion-xl-base-1.0."""
    for name in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        getattr(pipe, name).save_pretrained(base_dir / name)
    index = {
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": "0.42.1",
        "force_zeros_for_empty_prompt": True,
        "add_watermarker": None,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (base_dir / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")


def write_tiny_lora(unet, path: str | os.PathLike, seed: int = 0, rank: int = 4, amplitude: float = 0.5) -> Path:
    """A random-weight LoRA for the tiny UNet, in the diffusers/PEFT layout (``unet.<module>.lora_A.weight`` and
    ``lora_B.weight`` for each attention projection, as SDXL LoRAs train them), so the LoRA and few-step workflows
    can run on the tiny models. Its weights are large enough to change the picture visibly."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed + 10)
    state = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and ".attentions." in name and name.endswith(
                (".to_q", ".to_k", ".to_v", ".to_out.0")):
            state[f"unet.{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=gen) * amplitude
            state[f"unet.{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=gen) * amplitude
    path = Path(path)
    save_file(state, str(path), metadata={"format": "pt"})
    readable_by_all(path)
    return path


# ---- tiny safety checker and prompt-expansion model (issue 8) ------------------------------------

TINY_EXPANSION_WORDS = [
    "detailed", "cinematic", "sharp", "focus", "elegant", "intricate", "highly", "beautiful",
    "dramatic", "light", "vivid", "colors", "epic", "atmosphere", "glowing", "soft",
    "majestic", "serene", "golden", "hour", "stunning", "crisp", "moody", "rich",
]
_TINY_OTHER_WORDS = ["cat", "dog", "photo", "of", "a", "castle", "forest", "red", "ugly", "blurry"]


def build_tiny_safety_checker(folder: str | os.PathLike, seed: int = 0, flag_everything: bool = False) -> Path:
    """Save a random-weight ``StableDiffusionSafetyChecker`` (tiny CLIP config) and its processor config.

    The layout is CompVis/stable-diffusion-safety-checker's: config.json, model.safetensors,
    preprocessor_config.json (in the same old-style form as the real file). With the default
    thresholds (all ones, cosine <= 1) nothing is flagged; ``flag_everything`` sets the concept
    thresholds to -2 so every image is flagged.
    """
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2,
                     "num_hidden_layers": 1, "vocab_size": 100, "projection_dim": 16,
                     "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1},
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4,
                       "num_hidden_layers": 2, "image_size": 32, "patch_size": 8, "projection_dim": 16},
        projection_dim=16,
    )
    torch.manual_seed(seed)
    model = StableDiffusionSafetyChecker(config).eval()
    with torch.no_grad():
        model.concept_embeds.copy_(torch.randn_like(model.concept_embeds))
        model.special_care_embeds.copy_(torch.randn_like(model.special_care_embeds))
        model.concept_embeds_weights.fill_(-2.0 if flag_everything else 1.0)
        model.special_care_embeds_weights.fill_(1.0)
    model.save_pretrained(folder, safe_serialization=True)
    processor = {
        "crop_size": 32, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3, "size": 32,
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(processor, indent=2), encoding="utf-8")
    return folder


def write_gpt2_tokenizer(folder: str | os.PathLike, words=None) -> Path:
    """Write a small byte-level GPT-2 BPE vocabulary where each word (with its leading space) is one token."""
    from transformers import GPT2Tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    words = list(words if words is not None else TINY_EXPANSION_WORDS + _TINY_OTHER_WORDS)
    space = "\u0120"  # byte-level BPE's symbol for a leading space
    tokens = ["<|endoftext|>"] + _byte_symbols()
    merges = []
    seen = set(tokens)
    for word in words:
        current = space
        for ch in word:
            merges.append(f"{current} {ch}")
            current += ch
            if current not in seen:
                tokens.append(current)
                seen.add(current)
    _write_bpe_files(folder, tokens, merges)
    tok = GPT2Tokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    tok.save_pretrained(folder)
    return folder


def build_tiny_prompt_expander(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Save a random-weight tiny ``GPT2LMHeadModel`` + written tokenizer + ``positive.txt``, in the
    layout of Fooocus' fooocus_expansion folder."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = Path(folder)
    write_gpt2_tokenizer(folder)
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    eos = vocab["<|endoftext|>"]
    config = GPT2Config(vocab_size=len(vocab), n_positions=128, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=eos, eos_token_id=eos)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "positive.txt").write_text("\n".join(TINY_EXPANSION_WORDS) + "\n", encoding="utf-8")
    return folder
