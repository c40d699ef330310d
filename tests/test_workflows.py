"""Every shipped workflow matches the node definitions: types exist, widget values in order and in
range, links type-correct; the default example carries the documented default request."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sdxl_controlnet_img2img import NODE_CLASS_MAPPINGS

ROOT = Path(__file__).resolve().parent.parent
UI_FILES = sorted(p for p in (ROOT / "workflows").rglob("*.json") if "api" not in p.parts and "requests" not in p.parts)
API_FILES = sorted((ROOT / "workflows" / "api").glob("*.json"))

# The ComfyUI core nodes the examples use, as ComfyUI 0.8.0 defines them (CI has no ComfyUI).
CORE = {
    "LoadImage": {"inputs": {}, "widgets": [("image", ("COMBO_FILES", {})), ("upload", ("UPLOAD", {}))],
                  "outputs": ["IMAGE", "MASK"]},
    "SaveImage": {"inputs": {"images": "IMAGE"}, "widgets": [("filename_prefix", ("STRING", {}))], "outputs": []},
    "CheckpointLoaderSimple": {"inputs": {}, "widgets": [("ckpt_name", ([], {}))], "outputs": ["MODEL", "CLIP", "VAE"]},
    "LoraLoader": {"inputs": {"model": "MODEL", "clip": "CLIP"},
                   "widgets": [("lora_name", ([], {})), ("strength_model", ("FLOAT", {"min": -100.0, "max": 100.0})),
                               ("strength_clip", ("FLOAT", {"min": -100.0, "max": 100.0}))],
                   "outputs": ["MODEL", "CLIP"]},
    "ControlNetLoader": {"inputs": {}, "widgets": [("control_net_name", ([], {}))], "outputs": ["CONTROL_NET"]},
}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
DYNAMIC_COMBOS = {"checkpoint", "controlnet", "vae", "lora_name", "ckpt_name", "control_net_name"}  # model file lists: filled by ComfyUI at run time

DOCUMENTED_DEFAULTS = {
    "prompt": "Ice fortress, aurora skies, polar wildlife, twilight",
    "negative_prompt": "cartoon, illustration, animation. face. male, female",
    "controlnet_conditioning_scale": 0.5, "num_inference_steps": 25, "guidance_scale": 7.5, "strength": 0.95,
    "num_images": 1,
}


def node_spec(type_name):
    if type_name in CORE:
        return CORE[type_name]
    assert type_name in NODE_CLASS_MAPPINGS, f"unknown node type {type_name}"
    cls = NODE_CLASS_MAPPINGS[type_name]
    inputs, widgets = {}, []
    for section in ("required", "optional"):
        for name, (typ, *opts) in cls.INPUT_TYPES().get(section, {}).items():
            opts = opts[0] if opts else {}
            if isinstance(typ, list) or typ in WIDGET_TYPES:
                widgets.append((name, (typ, opts)))
            else:
                inputs[name] = typ
    return {"inputs": inputs, "widgets": widgets, "outputs": list(cls.RETURN_TYPES)}


def check_value(node_type, name, spec, value):
    typ, opts = spec
    where = f"{node_type}.{name}={value!r}"
    if isinstance(typ, list):
        if name not in DYNAMIC_COMBOS:
            assert value in typ, f"{where} is not one of {typ}"
        else:
            assert isinstance(value, str) and value, where
    elif typ == "INT":
        assert isinstance(value, int) and not isinstance(value, bool), where
        assert opts.get("min", value) <= value <= opts.get("max", value), f"{where} out of range"
    elif typ == "FLOAT":
        assert isinstance(value, (int, float)) and not isinstance(value, bool), where
        assert opts.get("min", value) <= value <= opts.get("max", value), f"{where} out of range"
    elif typ == "BOOLEAN":
        assert isinstance(value, bool), where
    elif typ == "STRING":
        assert isinstance(value, str), where


def test_there_are_ui_and_api_workflows():
    names = {p.stem for p in API_FILES}
    assert "sdxl_controlnet_img2img" in names and "sdxl_controlnet_img2img_tiny" in names
    assert {p.stem for p in UI_FILES} == names
    # ComfyUI lists top-level workflows as templates: only UI-format files may live there
    for p in (ROOT / "workflows").glob("*.json"):
        assert "nodes" in json.loads(p.read_text())


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_ui_workflow_matches_nodes(path):
    wf = json.loads(path.read_text())
    nodes = {n["id"]: n for n in wf["nodes"]}
    for node in wf["nodes"]:
        spec = node_spec(node["type"])
        values = list(node["widgets_values"])
        for name, wspec in spec["widgets"]:
            assert values, f"{path.name}: {node['type']} has too few widgets_values (missing {name})"
            value = values.pop(0)
            if wspec[0] not in ("COMBO_FILES", "UPLOAD"):
                check_value(node["type"], name, wspec, value)
            if name == "seed":
                assert values.pop(0) in ("fixed", "randomize", "increment", "decrement")
        assert values == [], f"{path.name}: {node['type']} has extra widgets_values {values}"
        assert [i["name"] for i in node["inputs"]] == list(spec["inputs"]), node["type"]
        for i in node["inputs"]:
            assert i["link"] is not None or i["name"] not in ("pipeline", "image", "control_image", "images"), \
                f"{path.name}: {node['type']}.{i['name']} is not connected"
    for link_id, src, src_slot, dst, dst_slot, typ in wf["links"]:
        src_type = node_spec(nodes[src]["type"])["outputs"][src_slot]
        dst_input = nodes[dst]["inputs"][dst_slot]
        assert dst_input["link"] == link_id
        assert src_type == typ == node_spec(nodes[dst]["type"])["inputs"][dst_input["name"]], \
            f"{path.name}: link {link_id} {src_type} -> {dst_input['name']}"


@pytest.mark.parametrize("path", API_FILES, ids=lambda p: p.stem)
def test_api_workflow_matches_nodes(path):
    wf = json.loads(path.read_text())
    for nid, node in wf.items():
        spec = node_spec(node["class_type"])
        widgets = dict(spec["widgets"])
        for name, value in node["inputs"].items():
            if isinstance(value, list):
                src = wf[value[0]]
                assert node_spec(src["class_type"])["outputs"][value[1]] == spec["inputs"][name], f"{nid}.{name}"
            else:
                assert name in widgets, f"{node['class_type']} has no input {name}"
                if widgets[name][0] not in ("COMBO_FILES", "UPLOAD"):
                    check_value(node["class_type"], name, widgets[name], value)
        for name in spec["inputs"]:
            assert isinstance(node["inputs"].get(name), list), f"{node['class_type']}.{name} not connected"


def test_default_example_carries_the_documented_request():
    wf = json.loads((ROOT / "workflows" / "api" / "sdxl_controlnet_img2img.json").read_text())
    sampler = next(n for n in wf.values() if n["class_type"] == "SDXLCNImg2Img")["inputs"]
    for k, v in DOCUMENTED_DEFAULTS.items():
        assert sampler[k] == v, k
    assert sampler["apply_canny"] is False  # the Canny node upstream already made the edge map
    canny = next(n for n in wf.values() if n["class_type"] == "SDXLCNCanny")["inputs"]
    assert (canny["low_threshold"], canny["high_threshold"]) == (100, 200)
    assert not any(n["class_type"] == "SDXLCNLoraLoader" for n in wf.values())
    request = json.loads((ROOT / "workflows" / "requests" / "default.json").read_text())
    for k, v in DOCUMENTED_DEFAULTS.items():
        assert request[k] == v, k


def test_workflows_are_generated_from_the_current_nodes(tmp_path):
    """scripts/make_workflows.py reproduces the committed files (so they cannot drift from INPUT_TYPES)."""
    import subprocess
    import sys

    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_workflows.py"), str(tmp_path)],
                   check=True, capture_output=True)
    committed = {p.relative_to(ROOT): p.read_text() for p in UI_FILES + API_FILES}
    generated = {p.relative_to(tmp_path): p.read_text() for p in (tmp_path / "workflows").rglob("*.json")}
    assert set(generated) == set(committed), "run scripts/make_workflows.py and commit"
    changed = [str(p) for p in committed if committed[p] != generated[p]]
    assert not changed, f"run scripts/make_workflows.py and commit: {changed}"


def test_fast_example_runs_a_few_step_lora_at_its_schedule():
    """The _fast workflow: our loader -> our LoRA node with SDXL-Lightning's 4-step LoRA -> the sampler at the 4 steps
    it was distilled for (x strength 0.95 = 3 run, on its grid: test_few_step_schedules.py runs them), CFG 1,
    euler_trailing; the rest of fal's defaults as in the default example."""
    api = json.loads((ROOT / "workflows" / "api" / "sdxl_controlnet_img2img_fast.json").read_text())
    by_type = {n["class_type"]: n["inputs"] for n in api.values()}
    assert by_type["SDXLCNLoraLoader"]["lora_name"] == "sdxl_lightning_4step_lora.safetensors"
    assert by_type["SDXLCNLoraLoader"]["pipeline"][0] == next(k for k, n in api.items() if n["class_type"] == "SDXLCNLoader")
    sampler = by_type["SDXLCNImg2Img"]
    assert (sampler["num_inference_steps"], sampler["guidance_scale"], sampler["scheduler"], sampler["strength"]) == \
        (4, 1.0, "euler_trailing", 0.95)
    assert int(sampler["num_inference_steps"] * sampler["strength"]) == 3
    assert (ROOT / "workflows" / "sdxl_controlnet_img2img_fast.json").is_file()  # and its UI twin for the Templates
