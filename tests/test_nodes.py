"""The node classes called as ComfyUI calls them, without ComfyUI."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import numpy as np
import pytest
import torch

from sdxl_controlnet_img2img import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, WEB_DIRECTORY
from sdxl_controlnet_img2img.pipeline.local.generate import generate
from sdxl_controlnet_img2img.pipeline.handle import PipelineHandle
from sdxl_controlnet_img2img.pipeline.request import GenerationRequest

from pictures import make_test_image


def _image_batch(*pils):
    return torch.from_numpy(np.stack([np.asarray(p, dtype=np.float32) / 255.0 for p in pils]))


def _call(node_cls, **kwargs):
    """Call a node the way ComfyUI's executor does: instantiate, call FUNCTION, unwrap {'ui','result'}."""
    out = getattr(node_cls(), node_cls.FUNCTION)(**kwargs)
    if isinstance(out, dict):
        out = out["result"]
    assert isinstance(out, tuple) and len(out) == len(node_cls.RETURN_TYPES)
    return out


def _widget_defaults(node_cls):
    spec = node_cls.INPUT_TYPES()
    values = {}
    for section in ("required", "optional"):
        for name, (typ, *opts) in spec.get(section, {}).items():
            opts = opts[0] if opts else {}
            if isinstance(typ, list):
                values[name] = opts.get("default", typ[0] if typ else None)
            elif "default" in opts:
                values[name] = opts["default"]
    return values


def test_public_node_contract():
    expected = {
        "SDXLCNLoader": "Load SDXL ControlNet Pipeline",
        "SDXLCNCanny": "Canny Edges (OpenCV)",
        "SDXLCNImg2Img": "SDXL ControlNet Img2Img",
        "SDXLCNLoraLoader": "SDXL ControlNet LoRA",
        "SDXLCNFalImg2Img": "SDXL ControlNet Img2Img (fal)",
        "SDXLCNFromComfyModels": "SDXL ControlNet Pipeline from ComfyUI Models",
    }
    assert set(NODE_CLASS_MAPPINGS) == set(expected)
    for name, display in expected.items():
        assert NODE_DISPLAY_NAME_MAPPINGS[name] == display
        cls = NODE_CLASS_MAPPINGS[name]
        assert callable(getattr(cls, cls.FUNCTION)) and cls.CATEGORY.startswith("SDXL ControlNet")
        for section_name, section in cls.INPUT_TYPES().items():
            if section_name == "hidden":
                continue
            for input_name, (typ, *opts) in section.items():
                assert opts and opts[0].get("tooltip"), f"{name}.{input_name} has no tooltip"
    assert WEB_DIRECTORY == "./web"


def test_every_node_sits_in_a_group_under_one_category_root():
    """ComfyUI's node menu shows categories as folders ("SDXL ControlNet/loaders"): every node is in a group under
    the one root, none loose beside the groups, and the nodes that make a pipeline share the loaders group."""
    groups = {name: cls.CATEGORY.split("/") for name, cls in NODE_CLASS_MAPPINGS.items()}
    assert all(len(parts) == 2 and parts[0] == "SDXL ControlNet" for parts in groups.values()), groups
    loaders = {groups[name][1] for name in ("SDXLCNLoader", "SDXLCNLoraLoader", "SDXLCNFromComfyModels")}
    samplers = {groups[name][1] for name in ("SDXLCNImg2Img", "SDXLCNFalImg2Img")}
    assert loaders == {"loaders"} and samplers == {"sampling"}, groups


def test_menus_do_not_depend_on_the_machine():
    """A saved workflow keeps its widget values on any machine: the menus list every choice everywhere (a `device`
    of cuda saved on a GPU machine is still a choice here, on the CPU; whether it can run is said when it runs)."""
    import torch

    devices = NODE_CLASS_MAPPINGS["SDXLCNLoader"].INPUT_TYPES()["optional"]["device"][0]
    assert not torch.cuda.is_available() and {"auto", "cuda", "xpu", "mps", "cpu"} <= set(devices)


def test_sampler_widgets_use_fals_names_and_defaults():
    d = _widget_defaults(NODE_CLASS_MAPPINGS["SDXLCNImg2Img"])
    assert d["controlnet_conditioning_scale"] == 0.5 and d["num_inference_steps"] == 25
    assert d["guidance_scale"] == 7.5 and d["strength"] == 0.95 and d["num_images"] == 1
    assert d["negative_prompt"] == "" and d["image_size"] == "none" and d["apply_canny"] is True
    choices = NODE_CLASS_MAPPINGS["SDXLCNImg2Img"].INPUT_TYPES()["required"]["image_size"][0]
    assert choices == ["none", "square_hd", "square", "portrait_4_3", "portrait_16_9", "landscape_4_3",
                       "landscape_16_9", "custom"]


def test_canny_node_equals_cv2_canny():
    import cv2

    pil = make_test_image(96, 64, seed=3)
    # round-trip through 8-bit, as LoadImage produces it
    batch = _image_batch(pil, make_test_image(96, 64, seed=4))
    (edges,) = _call(NODE_CLASS_MAPPINGS["SDXLCNCanny"], image=batch, low_threshold=100, high_threshold=200)
    assert edges.shape == (2, 64, 96, 3) and edges.dtype == torch.float32
    assert set(torch.unique(edges).tolist()) <= {0.0, 1.0}
    expected = cv2.Canny(np.asarray(pil), 100, 200)
    assert np.array_equal((edges[0, :, :, 0].numpy() * 255).astype(np.uint8), expected)
    assert np.array_equal(edges[0, :, :, 0], edges[0, :, :, 2])
    (l2,) = _call(NODE_CLASS_MAPPINGS["SDXLCNCanny"], image=batch, low_threshold=50, high_threshold=120, l2_gradient=True)
    assert np.array_equal((l2[0, :, :, 0].numpy() * 255).astype(np.uint8), cv2.Canny(np.asarray(pil), 50, 120, L2gradient=True))


def test_canny_node_resolution():
    cls = NODE_CLASS_MAPPINGS["SDXLCNCanny"]
    batch = _image_batch(make_test_image(96, 64, seed=5))
    (edges,) = _call(cls, image=batch, low_threshold=100, high_threshold=200, resolution=128)
    assert edges.shape == (1, 128, 192, 3)


def test_canny_thresholds_the_wrong_way_round_are_used_as_opencv_uses_them(caplog):
    """cv2.Canny takes its two thresholds either way round (the smaller links edges, the larger starts them): the
    node gives what cv2.Canny gives for the same arguments, with one warning line for the batch (it raised)."""
    import cv2

    pil = make_test_image(96, 64, seed=5)
    batch = _image_batch(pil, make_test_image(96, 64, seed=6))
    with caplog.at_level(logging.WARNING, logger="sdxl_controlnet_img2img"):
        (edges,) = _call(NODE_CLASS_MAPPINGS["SDXLCNCanny"], image=batch, low_threshold=200, high_threshold=100)
    expected = cv2.Canny(np.asarray(pil), 200, 100)
    assert expected.any() and np.array_equal((edges[0, :, :, 0].numpy() * 255).astype(np.uint8), expected)
    assert [r.getMessage() for r in caplog.records] == [
        "SDXLCNCanny: low_threshold 200 is above high_threshold 100: using 100/200, as OpenCV does (the smaller "
        "threshold links edges, the larger one starts them)"]


def _sampler_args(handle, image, control, **kw):
    args = _widget_defaults(NODE_CLASS_MAPPINGS["SDXLCNImg2Img"])
    args.update(pipeline=handle, image=image, control_image=control, prompt="ice fortress",
                enable_safety_checker=False, num_inference_steps=4, seed=11)
    args.update(kw)
    return args


def test_sampler_node_equals_library(tiny_pipe):
    init, ctl = make_test_image(64, 64, 1), make_test_image(64, 64, 2)
    handle = PipelineHandle(tiny_pipe)
    images, seed, flags, prompt = _call(NODE_CLASS_MAPPINGS["SDXLCNImg2Img"],
                                        **_sampler_args(handle, _image_batch(init), _image_batch(ctl)))
    assert images.shape == (1, 64, 64, 3) and seed == 11 and json.loads(flags) == [False]
    assert prompt == "ice fortress"
    lib = generate(tiny_pipe, GenerationRequest.from_dict({
        "prompt": "ice fortress", "image_url": init, "control_image_url": ctl, "seed": 11,
        "num_inference_steps": 4, "enable_safety_checker": False}))
    assert np.array_equal(np.round(images[0].numpy() * 255).astype(np.uint8), np.asarray(lib.images[0]))


def test_sampler_batch_gives_b_times_num_images_with_distinct_seeds(tiny_pipe):
    inits = _image_batch(make_test_image(64, 64, 1), make_test_image(64, 64, 3))
    ctl = _image_batch(make_test_image(64, 64, 2))
    handle = PipelineHandle(tiny_pipe)
    images, seed, flags, _ = _call(NODE_CLASS_MAPPINGS["SDXLCNImg2Img"],
                                   **_sampler_args(handle, inits, ctl, num_images=2, num_inference_steps=3, seed=20))
    assert images.shape[0] == 4 and json.loads(flags) == [False] * 4
    # result 3 = init 1, image 1 -> seed 20 + 1*2 + 1
    alone = generate(tiny_pipe, GenerationRequest.from_dict({
        "prompt": "ice fortress", "image_url": make_test_image(64, 64, 3), "control_image_url": make_test_image(64, 64, 2),
        "seed": 23, "num_inference_steps": 3, "enable_safety_checker": False}))
    assert np.array_equal(np.round(images[3].numpy() * 255).astype(np.uint8), np.asarray(alone.images[0]))


def test_sampler_errors_name_the_input(tiny_pipe):
    handle = PipelineHandle(tiny_pipe)
    inits = _image_batch(make_test_image(64, 64, 1), make_test_image(64, 64, 3), make_test_image(64, 64, 4))
    ctl = _image_batch(make_test_image(64, 64, 2), make_test_image(64, 64, 5))
    with pytest.raises(ValueError, match="control_image: a batch of 2 does not match the 3 init images"):
        _call(NODE_CLASS_MAPPINGS["SDXLCNImg2Img"], **_sampler_args(handle, inits, ctl))
    with pytest.raises(ValueError, match=r"^prompt: is empty: write what to generate \(fal's prompt is required\)$"):
        _call(NODE_CLASS_MAPPINGS["SDXLCNImg2Img"], **_sampler_args(handle, inits[:1], ctl[:1], prompt=" "))


def test_pack_imports_cheaply_and_without_diffusers():
    code = (
        "import sys; sys.modules['diffusers'] = None\n"
        "import sdxl_controlnet_img2img as p\n"
        "assert 'SDXLCNImg2Img' in p.NODE_CLASS_MAPPINGS\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'cv2') if sys.modules.get(m) is not None]\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ---- refused before the graph runs (VALIDATE_INPUTS) ------------------------------------------------------------

def test_loader_validates_the_device_and_refuses_wrong_files_before_anything_loads(tiny_models, tmp_path,
                                                                                   monkeypatch):
    """VALIDATE_INPUTS takes the device alone (ComfyUI pins its answer to each argument it takes; the model lists are
    ComfyUI's own check); what a file holds is checked by the node before any weights are read."""
    from sdxl_controlnet_img2img.pipeline.errors import ModelLoadError
    from sdxl_controlnet_img2img.pipeline.local.models import loading

    loader = NODE_CLASS_MAPPINGS["SDXLCNLoader"]
    assert loader.VALIDATE_INPUTS() is True and loader.VALIDATE_INPUTS(device="cpu") is True
    # ComfyUI shows the answer after the input's name ("device - <answer>"): the answer does not name it again
    msg = loader.VALIDATE_INPUTS(device="banana")
    assert isinstance(msg, str) and msg.startswith("'banana' is not a device name")
    if not torch.cuda.is_available():
        msg = loader.VALIDATE_INPUTS(device="cuda")
        assert isinstance(msg, str) and msg.startswith("cuda was asked for")

    def refuse(*args, **kwargs):
        raise AssertionError("weights were read before the bad file was refused")

    monkeypatch.setattr(loading, "build_pipeline", refuse)
    truncated = tmp_path / "half.safetensors"
    truncated.write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{\"a\": {\"dtype\": \"F16\", \"shape\": [4]")
    with pytest.raises(ModelLoadError, match=r"^checkpoint: .*half\.safetensors"):
        _call(loader, checkpoint=str(truncated), controlnet=str(tiny_models["controlnet"]), device="cpu")


def test_lora_node_validates_the_file_before_the_pipeline_loads(tmp_path, monkeypatch):
    from sdxl_controlnet_img2img.nodes.lora_node import _allow_pickle
    from sdxl_controlnet_img2img.pipeline.local.lora.adapters import LoraError

    node = NODE_CLASS_MAPPINGS["SDXLCNLoraLoader"]
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    msg = node.VALIDATE_INPUTS(lora_name=str(junk))
    assert isinstance(msg, str) and "junk.safetensors" in msg and "not a readable safetensors" in msg
    pt = tmp_path / "style.pt"
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, pt)
    # without the server's opt-in a pickle is refused, saying both opt-ins (no workflow can make the server's)
    monkeypatch.delenv("SDXLCN_ALLOW_PICKLE", raising=False)
    msg = node.VALIDATE_INPUTS(lora_name=str(pt))
    assert isinstance(msg, str) and "refused by default" in msg and "SDXLCN_ALLOW_PICKLE=1" in msg and "style.pt" in msg
    with pytest.raises(LoraError, match="SDXLCN_ALLOW_PICKLE=1"):  # the node's allow_pickle alone, when it runs
        _allow_pickle(str(pt), str(pt), True)
    monkeypatch.setenv("SDXLCN_ALLOW_PICKLE", "1")
    assert node.VALIDATE_INPUTS(lora_name=str(pt)) is True  # read, or refused for allow_pickle off, when it runs
    assert _allow_pickle(str(pt), str(pt), True) is True and _allow_pickle(str(pt), str(pt), False) is False
    assert "allow_pickle" in node.INPUT_TYPES()["optional"]


def test_error_types_read_short_in_comfyuis_dialog():
    from sdxl_controlnet_img2img.pipeline.fal.errors import FalKeyMissing
    from sdxl_controlnet_img2img.pipeline.local.lora.adapters import LoraError
    from sdxl_controlnet_img2img.pipeline.errors import RequestError

    for cls in (FalKeyMissing, LoraError, RequestError):
        assert f"{cls.__module__}.{cls.__qualname__}" == f"sdxlcn.{cls.__name__}"


def test_a_diffusers_controlnet_folder_is_listed_once(tmp_path, monkeypatch):
    """models/controlnet holding a diffusers folder and a single file: the folder's own weights file is not a
    second entry. folder_paths is ComfyUI's; here a stand-in answering from a real folder."""
    import os
    import types

    from sdxl_controlnet_img2img.nodes import comfy_hooks, model_folders

    root = tmp_path / "controlnet"
    (root / "canny-sdxl").mkdir(parents=True)
    (root / "canny-sdxl" / "config.json").write_text("{}")
    (root / "canny-sdxl" / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    (root / "single.safetensors").write_bytes(b"x")

    def filenames(name):
        return sorted(os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/")
                      for d, _, fs in os.walk(root) for f in fs)

    fake = types.SimpleNamespace(get_folder_paths=lambda name: [str(root)], get_filename_list=filenames)
    monkeypatch.setattr(model_folders, "folder_paths", lambda: fake)
    monkeypatch.setattr(comfy_hooks, "folder_paths", lambda: fake)
    assert model_folders.controlnet_choices() == ["single.safetensors", "canny-sdxl"]


def test_a_controlnet_folder_with_only_its_weights_file_is_listed_and_loads_as_that_file(tmp_path, monkeypatch):
    """What the shipped workflows' models list downloads for controlnet-canny-sdxl-1.0 (ComfyUI's Missing Models
    dialog lists files, not folders): the folder with diffusion_pytorch_model.safetensors and no config.json. The
    workflows name the folder; it resolves to the file (read with the pack's SDXL ControlNet config). The file keeps
    its own entry, as saved workflows may name it."""
    import os
    import types

    from sdxl_controlnet_img2img.nodes import comfy_hooks, model_folders

    root = tmp_path / "controlnet"
    (root / "controlnet-canny-sdxl-1.0").mkdir(parents=True)
    weights = root / "controlnet-canny-sdxl-1.0" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"x")
    (root / "with-config").mkdir()
    (root / "with-config" / "config.json").write_text("{}")
    (root / "with-config" / "diffusion_pytorch_model.safetensors").write_bytes(b"x")

    def filenames(name):
        return sorted(os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/")
                      for d, _, fs in os.walk(root) for f in fs if f.endswith(".safetensors"))

    def full_path(name, filename):
        path = root / filename
        return str(path) if path.is_file() else None

    fake = types.SimpleNamespace(get_folder_paths=lambda name: [str(root)], get_filename_list=filenames,
                                 get_full_path=full_path)
    monkeypatch.setattr(model_folders, "folder_paths", lambda: fake)
    monkeypatch.setattr(comfy_hooks, "folder_paths", lambda: fake)
    assert model_folders.controlnet_choices() == [
        "controlnet-canny-sdxl-1.0/diffusion_pytorch_model.safetensors", "with-config", "controlnet-canny-sdxl-1.0"]
    assert model_folders.resolve("controlnet", "controlnet-canny-sdxl-1.0") == str(weights)
    assert model_folders.resolve("controlnet", "with-config") == str(root / "with-config")


def test_pickles_are_refused_on_a_torch_whose_weights_only_is_unsafe():
    from sdxl_controlnet_img2img.pipeline.local.models.pickles import refuse_unsafe_torch

    with pytest.raises(ValueError, match=r"lora: pickle files are refused on torch 2\.5.*2\.6 or newer"):
        refuse_unsafe_torch("lora", (2, 5))
    refuse_unsafe_torch("lora", (2, 6))  # 2.6 and newer read pickles with weights_only


def test_the_sampler_refuses_an_empty_prompt_when_queued():
    """ComfyUI calls VALIDATE_INPUTS with the prompt when it is a widget value, and without it when it comes from
    another node (then it is checked when the sampler runs)."""
    validate = NODE_CLASS_MAPPINGS["SDXLCNImg2Img"].VALIDATE_INPUTS
    assert validate(prompt="a cat") is True and validate() is True
    for empty in ("", "  \n"):
        assert validate(prompt=empty) == "is empty: write what to generate (fal's prompt is required)"
