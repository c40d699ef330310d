"""Run by tests/test_comfy_memory.py under ComfyUI's interpreter, with ComfyUI's own model management imported from
its checkout (``--cpu``: this machine has no GPU). Prints one JSON line of findings; the test asserts on them.

usage: python comfy_memory_probe.py COMFYUI_DIR PACK_ROOT TINY_MODELS_DIR
"""

from __future__ import annotations

import gc
import json
import sys
import weakref
from pathlib import Path

from comfy_probe_start import start

comfy_dir, pack_root, tiny_dir = (Path(a) for a in sys.argv[1:4])
pack = start(comfy_dir, pack_root)
import comfy.model_management as mm  # noqa: E402
import torch  # noqa: E402
from comfy.model_patcher import ModelPatcher  # noqa: E402

from sdxlcn_pack.nodes import comfy_memory  # noqa: E402
from sdxlcn_pack.pipeline.local.models.loading import cached_pipeline  # noqa: E402
from sdxlcn_pack.pipeline.local.memory.placement import memory_mode_of  # noqa: E402
from sdxlcn_pack.pipeline.local.tiny_models import build_tiny_models  # noqa: E402

found: dict = {}
models = build_tiny_models(tiny_dir)
found["device_dtype"] = [comfy_memory.device_and_dtype()[0], str(comfy_memory.device_and_dtype()[1])]

Loader = pack.NODE_CLASS_MAPPINGS["SDXLCNLoader"]
Sampler = pack.NODE_CLASS_MAPPINGS["SDXLCNImg2Img"]
# inside ComfyUI the loader takes only names its model folders list: the tiny models' folders become model folders
import folder_paths  # noqa: E402

folder_paths.add_model_folder_path("diffusers", str(Path(models["checkpoint"]).parent))
folder_paths.add_model_folder_path("controlnet", str(Path(models["controlnet"]).parent))
handle = Loader().load(Path(models["checkpoint"]).name, Path(models["controlnet"]).name)[0]
pipe = handle.get_pipe()
found["placement"] = memory_mode_of(pipe)
patcher = comfy_memory.patcher_of(pipe)
found["registered"] = patcher is not None


def ours_loaded() -> bool:
    return any(lm.model is comfy_memory.patcher_of(cached_pipeline()) for lm in mm.current_loaded_models
               if cached_pipeline() is not None)


spec_inputs = Sampler.INPUT_TYPES()["required"]
widgets = {k: v[1]["default"] for k, v in spec_inputs.items() if len(v) > 1 and isinstance(v[1], dict) and "default" in v[1]}
image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
widgets.update(prompt="a house", seed=3, num_inference_steps=4, image_size="none")


def sample():
    return Sampler().sample(pipeline=handle, image=image, control_image=image, **widgets)[0]


first = sample()
found["loaded_after_sampling"] = ours_loaded()

# ComfyUI's "Unload models" (POST /free) runs unload_all_models(), here with ours the only model loaded (where
# freeing inside ComfyUI's loop would break its bookkeeping): on a CPU ComfyUI the weights go at once
pipe_ref = weakref.ref(pipe)
del pipe
mm.unload_all_models()
gc.collect()
found["untracked_after_unload"] = not ours_loaded() and len(mm.current_loaded_models) == 0
found["weights_released_after_unload"] = cached_pipeline() is None and pipe_ref().unet.device.type == "meta"

# the next run loads it again, registers it again and gives the same picture; the emptied pipeline is let go
second = sample()
gc.collect()
found["emptied_pipeline_let_go"] = pipe_ref() is None
found["reloaded"] = cached_pipeline() is not None and comfy_memory.patcher_of(cached_pipeline()) is not None
found["same_picture_after_reload"] = bool(torch.equal(first, second))

# one of ComfyUI's own models, loaded as ComfyUI loads its models: our run does not unload it
other = ModelPatcher(torch.nn.Linear(64, 64), load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())
mm.load_models_gpu([other])
patcher = comfy_memory.patcher_of(cached_pipeline())
sample()
found["other_kept_loaded"] = any(lm.model is other for lm in mm.current_loaded_models) and ours_loaded()

# a large free_memory request (another model needing everything) evicts ours too
mm.free_memory(1e30, mm.get_torch_device())
found["evicted_by_big_request"] = not ours_loaded() and cached_pipeline() is None
print("PROBE " + json.dumps(found))
