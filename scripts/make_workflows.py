"""Write the example workflows (UI format in workflows/, API format in workflows/api/) from the
node definitions, so their widget values always follow INPUT_TYPES order and defaults.

    .venv/bin/python scripts/make_workflows.py

Run it again after changing a node's inputs; tests/test_workflows.py checks the files against the nodes.
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
from sdxl_controlnet_img2img import NODE_CLASS_MAPPINGS  # noqa: E402
from sdxl_controlnet_img2img.nodes import workflow_ids as ID  # noqa: E402
from sdxl_controlnet_img2img.pipeline.local.tiny_models import TINY_NAMES  # noqa: E402

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
EXAMPLE_IMAGE = "sdxlcn_fortress.png"  # copied into ComfyUI's input folder by the pack (nodes/example_inputs.py)

# ComfyUI core nodes used by the examples: (inputs, widgets, outputs)
CORE = {
    "LoadImage": ([], [("image", EXAMPLE_IMAGE), ("upload", "image")], [("IMAGE", "IMAGE"), ("MASK", "MASK")]),
    "SaveImage": ([("images", "IMAGE")], [("filename_prefix", "sdxlcn")], []),
    "CheckpointLoaderSimple": ([], [("ckpt_name", "")], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]),
    "LoraLoader": ([("model", "MODEL"), ("clip", "CLIP")],
                   [("lora_name", ""), ("strength_model", 1.0), ("strength_clip", 1.0)],
                   [("MODEL", "MODEL"), ("CLIP", "CLIP")]),
    "ControlNetLoader": ([], [("control_net_name", "")], [("CONTROL_NET", "CONTROL_NET")]),
}

# Where each model the shipped workflows name comes from: (Hugging Face repo, file in it). The UI workflows carry them
# as ComfyUI's top-level "models" list, which its frontend (1.35) shows in its Missing Models dialog as
# "directory / name" with a Download button when the file is absent; it takes files only (.safetensors/.sft) from
# https://huggingface.co/ or civitai, so a direct /resolve/ link, never a /blob/ page.
DOWNLOADS = {
    "sd_xl_base_1.0.safetensors": ("stabilityai/stable-diffusion-xl-base-1.0", "sd_xl_base_1.0.safetensors"),
    # the README's layout of diffusers/controlnet-canny-sdxl-1.0, its fp16 weights saved under the plain name; the
    # loader reads the folder by this file alone (without config.json: the pack's own SDXL ControlNet config)
    "controlnet-canny-sdxl-1.0/diffusion_pytorch_model.safetensors": (
        "diffusers/controlnet-canny-sdxl-1.0", "diffusion_pytorch_model.fp16.safetensors"),
    "pixel-art-xl.safetensors": ("nerijs/pixel-art-xl", "pixel-art-xl.safetensors"),
    "sdxl_lightning_4step_lora.safetensors": ("ByteDance/SDXL-Lightning", "sdxl_lightning_4step_lora.safetensors"),
}
# a value that names a diffusers folder -> the file the list names for it (the frontend cannot list a folder)
FOLDER_WEIGHTS = {"controlnet-canny-sdxl-1.0": "controlnet-canny-sdxl-1.0/diffusion_pytorch_model.safetensors"}
# the ComfyUI model folder each model-naming widget reads
MODEL_WIDGETS = {
    ("SDXLCNLoader", "checkpoint"): "checkpoints", ("SDXLCNLoader", "controlnet"): "controlnet",
    ("SDXLCNLoader", "vae"): "vae", ("SDXLCNLoraLoader", "lora_name"): "loras",
    ("CheckpointLoaderSimple", "ckpt_name"): "checkpoints", ("LoraLoader", "lora_name"): "loras",
    ("ControlNetLoader", "control_net_name"): "controlnet",
}
EXAMPLE_LORA = "pixel-art-xl.safetensors"

DEFAULT_REQUEST = {
    "prompt": "Ice fortress, aurora skies, polar wildlife, twilight",
    "negative_prompt": "cartoon, illustration, animation. face. male, female",
    "seed": 42,
}


def node_io(type_name):
    """(link inputs [(name, type)], widgets [(name, default)], outputs [(name, type)]) of a node type."""
    if type_name in CORE:
        return CORE[type_name]
    cls = NODE_CLASS_MAPPINGS[type_name]
    spec = cls.INPUT_TYPES()
    links, widgets = [], []
    for section in ("required", "optional"):
        for name, (typ, *opts) in spec.get(section, {}).items():
            opts = opts[0] if opts else {}
            if isinstance(typ, list):
                widgets.append((name, opts.get("default", typ[0] if typ else "")))
            elif typ in WIDGET_TYPES:
                widgets.append((name, opts.get("default")))
            else:
                links.append((name, typ))
    names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
    return links, widgets, list(zip(names, cls.RETURN_TYPES))


def models_list(nodes):
    """ComfyUI's "models" list ({name, url, directory}) for every model a node names, once each, in node order."""
    models = []
    for _, typ, values, _ in nodes:
        for name, default in node_io(typ)[1]:
            folder = MODEL_WIDGETS.get((typ, name))
            value = values.get(name, default)
            if folder is None or value in ("", "none"):
                continue
            file = FOLDER_WEIGHTS.get(value, value)
            repo, path = DOWNLOADS[file]  # a shipped workflow names only models that can be downloaded
            entry = {"name": file, "url": f"https://huggingface.co/{repo}/resolve/main/{path}", "directory": folder}
            if entry not in models:
                models.append(entry)
    return models


def build(nodes, with_models=True):
    """nodes: list of (id, type, {widget: value}, {input: (from_id, slot)}) -> (ui, api) workflow dicts."""
    api, ui_nodes, links = {}, [], []
    out_links = {}
    for order, (nid, typ, values, inputs) in enumerate(nodes):
        link_inputs, widgets, outputs = node_io(typ)
        wv = []
        api_inputs = {}
        for name, default in widgets:
            v = values.get(name, default)
            wv.append(v)
            if name == "seed":
                wv.append("fixed")
            if name != "upload":
                api_inputs[name] = v
        ui_inputs = []
        for name, t in link_inputs:
            entry = {"name": name, "type": t, "link": None}
            if name in inputs:
                src, slot = inputs[name]
                link_id = len(links) + 1
                src_type = node_io(next(n[1] for n in nodes if n[0] == src))[2][slot][1]
                links.append([link_id, src, slot, nid, len(ui_inputs), src_type])
                out_links.setdefault((src, slot), []).append(link_id)
                entry["link"] = link_id
                api_inputs[name] = [str(src), slot]
            ui_inputs.append(entry)
        api[str(nid)] = {"class_type": typ, "inputs": api_inputs}
        ui_nodes.append({
            "id": nid, "type": typ, "pos": [40 + 380 * order, 120 if order % 2 == 0 else 200], "size": [340, 260],
            "flags": {}, "order": order, "mode": 0, "inputs": ui_inputs,
            "outputs": [{"name": n, "type": t, "links": None, "slot_index": i} for i, (n, t) in enumerate(outputs)],
            "properties": {"Node name for S&R": typ}, "widgets_values": wv,
        })
    for node in ui_nodes:
        for i, out in enumerate(node["outputs"]):
            out["links"] = out_links.get((node["id"], i), [])
    ui = {
        "id": "00000000-0000-4000-8000-000000000001", "revision": 0,
        "last_node_id": max(n[0] for n in nodes), "last_link_id": len(links),
        "nodes": ui_nodes, "links": links, "groups": [], "config": {},
        "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4,
    }
    models = models_list(nodes) if with_models else []
    if models:
        ui["models"] = models
    return ui, api


def local_graph(checkpoint, controlnet, sampler_values=None, lora=None):
    nodes = [
        (ID.IMAGE, "LoadImage", {}, {}),
        (ID.CANNY, "SDXLCNCanny", {}, {"image": (ID.IMAGE, 0)}),
        (ID.LOADER, "SDXLCNLoader", {"checkpoint": checkpoint, "controlnet": controlnet}, {}),
    ]
    pipe_src = (ID.LOADER, 0)
    if lora:
        nodes.append((ID.LORA, "SDXLCNLoraLoader", {"lora_name": lora, "strength": 1.0},
                      {"pipeline": (ID.LOADER, 0)}))
        pipe_src = (ID.LORA, 0)
    values = {**DEFAULT_REQUEST, "apply_canny": False, **(sampler_values or {})}
    nodes.append((ID.SAMPLER, "SDXLCNImg2Img", values,
                  {"pipeline": pipe_src, "image": (ID.IMAGE, 0), "control_image": (ID.CANNY, 0)}))
    nodes.append((ID.SAVE, "SaveImage", {}, {"images": (ID.SAMPLER, 0)}))
    return nodes


def comfy_models_graph(checkpoint, controlnet_file, lora):
    """ComfyUI's own loaders (and LoRA stack) feeding our sampler: one copy of SDXL in memory."""
    values = {**DEFAULT_REQUEST, "apply_canny": False}
    return [
        (ID.IMAGE, "LoadImage", {}, {}),
        (ID.CANNY, "SDXLCNCanny", {}, {"image": (ID.IMAGE, 0)}),
        (ID.CHECKPOINT_LOADER, "CheckpointLoaderSimple", {"ckpt_name": checkpoint}, {}),
        (ID.COMFY_LORA_LOADER, "LoraLoader", {"lora_name": lora},
         {"model": (ID.CHECKPOINT_LOADER, 0), "clip": (ID.CHECKPOINT_LOADER, 1)}),
        (ID.CONTROLNET_LOADER, "ControlNetLoader", {"control_net_name": controlnet_file}, {}),
        (ID.LOADER, "SDXLCNFromComfyModels", {}, {"model": (ID.COMFY_LORA_LOADER, 0), "clip": (ID.COMFY_LORA_LOADER, 1),
                                                  "vae": (ID.CHECKPOINT_LOADER, 2),
                                                  "control_net": (ID.CONTROLNET_LOADER, 0)}),
        (ID.SAMPLER, "SDXLCNImg2Img", values,
         {"pipeline": (ID.LOADER, 0), "image": (ID.IMAGE, 0), "control_image": (ID.CANNY, 0)}),
        (ID.SAVE, "SaveImage", {}, {"images": (ID.SAMPLER, 0)}),
    ]


def fal_graph():
    return [
        (ID.IMAGE, "LoadImage", {}, {}),
        (ID.SAMPLER, "SDXLCNFalImg2Img", dict(DEFAULT_REQUEST),
         {"image": (ID.IMAGE, 0), "control_image": (ID.IMAGE, 0)}),
        (ID.SAVE, "SaveImage", {}, {"images": (ID.SAMPLER, 0)}),
    ]


# a few-step LoRA (SDXL-Lightning 4-step) on its card's grid: Euler trailing at the 4 steps it was distilled for
# (999/749/499/249); img2img at strength 0.95 runs the last int(4 x 0.95) = 3 (749/499/249); CFG 1
FAST = {"num_inference_steps": 4, "guidance_scale": 1.0, "scheduler": "euler_trailing"}
# the tiny models (`make-tiny-models`) run at 64x64: a quick check of an install
TINY_SIZE = {"image_size": "custom", "width": 64, "height": 64}


def main(out_root: Path = ROOT):
    real = ("sd_xl_base_1.0.safetensors", "controlnet-canny-sdxl-1.0")
    tiny = (TINY_NAMES["checkpoint"], TINY_NAMES["controlnet"])
    graphs = {
        "sdxl_controlnet_img2img": local_graph(*real),
        "sdxl_controlnet_img2img_lora": local_graph(*real, lora=EXAMPLE_LORA),
        "sdxl_controlnet_img2img_fast": local_graph(*real, FAST, lora="sdxl_lightning_4step_lora.safetensors"),
        "sdxl_controlnet_img2img_comfy_models": comfy_models_graph(
            real[0], FOLDER_WEIGHTS[real[1]], EXAMPLE_LORA),
        "sdxl_controlnet_img2img_fal": fal_graph() if "SDXLCNFalImg2Img" in NODE_CLASS_MAPPINGS else None,
        # tiny offline models, for tests and a quick check of an install (not templates: they live in a subfolder);
        # the LoRA and fast ones with the tiny LoRA. _comfy_models has none: ComfyUI's checkpoint loader recognises
        # SDXL by its full-size layout (320 channels, 2048-wide text embeddings), which no tiny model has
        "tiny/sdxl_controlnet_img2img_tiny": local_graph(*tiny, TINY_SIZE),
        "tiny/sdxl_controlnet_img2img_lora_tiny": local_graph(*tiny, TINY_SIZE, lora=TINY_NAMES["lora"]),
        "tiny/sdxl_controlnet_img2img_fast_tiny": local_graph(*tiny, {**FAST, **TINY_SIZE}, lora=TINY_NAMES["lora"]),
    }
    for name, graph in graphs.items():
        if graph is None:
            print(f"skipped {name}: its node is not defined yet")
            continue
        ui, api = build(graph, with_models=not name.startswith("tiny/"))  # tiny models are made, not downloaded
        ui_path = out_root / "workflows" / f"{name}.json"
        api_path = out_root / "workflows" / "api" / f"{Path(name).name}.json"
        ui_path.parent.mkdir(parents=True, exist_ok=True)
        api_path.parent.mkdir(parents=True, exist_ok=True)
        ui_path.write_text(json.dumps(ui, indent=2) + "\n", encoding="utf-8")
        api_path.write_text(json.dumps(api, indent=2) + "\n", encoding="utf-8")
        print(ui_path.relative_to(out_root), api_path.relative_to(out_root))


if __name__ == "__main__":
    import sys

    # an optional folder to write into instead of the repository (tests compare against the committed files)
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
