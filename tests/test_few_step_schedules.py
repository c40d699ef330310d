"""Few-step LoRAs on their authors' grids: each schedule as the LoRA's model card builds it for diffusers, checked on
what the pipeline actually runs (the timesteps the UNet is called with, the scheduler class whose ``step`` runs and the
eta it gets) on the tiny models. The expected timesteps are the cards' own, written here from the cards, never
computed by our code.

What the cards say (diffusers usage, SDXL):
- SDXL-Lightning (ByteDance/SDXL-Lightning): ``EulerDiscreteScheduler.from_config(..., timestep_spacing="trailing")``,
  ``num_inference_steps`` = the step count the LoRA was distilled for; the 4-step grid is 999/749/499/249.
- Hyper-SD (ByteDance/Hyper-SD): 2/4/8-step LoRAs ``DDIMScheduler.from_config(..., timestep_spacing="trailing")``;
  the 1-step LoRA ``TCDScheduler`` with ``pipe(..., num_inference_steps=1, guidance_scale=0, eta=1.0,
  timesteps=[800])``.
- DMD2 (tianweiy/DMD2): ``LCMScheduler``, ``pipe(..., num_inference_steps=4, guidance_scale=0,
  timesteps=[999, 749, 499, 249])``.
- LCM-LoRA (latent-consistency/lcm-lora-sdxl): ``LCMScheduler``, 4 steps, guidance 1: LCM's 50-step distillation
  schedule, 4 of it: 999/759/499/259.
- TCD-LoRA (h1t/TCD-SDXL-LoRA): ``TCDScheduler``, 4 steps, guidance 0, ``eta=0.3``: 999/759/499/259.
img2img (fal's ``strength``) keeps the last int(steps x strength) of the list: at 0.95 a 4-step list loses its first.
"""

from __future__ import annotations

import functools
import logging

import pytest

from sdxl_controlnet_img2img.pipeline.errors import RequestError
from sdxl_controlnet_img2img.pipeline.local.generate import generate
from sdxl_controlnet_img2img.pipeline.request import GenerationRequest

GRID = {  # the cards' grids: trailing spacing (Lightning, Hyper-SD), LCM's distillation schedule (LCM, TCD)
    2: [999, 499],
    4: [999, 749, 499, 249],
    8: [999, 874, 749, 624, 499, 374, 249, 124],
}
LCM_4 = [999, 759, 499, 259]

# id -> (scheduler, num_inference_steps, timesteps field, the card's timesteps, the card's class, the card's eta)
# (eta None: the class's step takes none; DDIM's is the pipeline's default 0.0, as the card passes none)
CARDS = {
    "lightning-2step": ("euler_trailing", 2, "", GRID[2], "EulerDiscreteScheduler", None),
    "lightning-4step": ("euler_trailing", 4, "", GRID[4], "EulerDiscreteScheduler", None),
    "lightning-8step": ("euler_trailing", 8, "", GRID[8], "EulerDiscreteScheduler", None),
    "hyper-sd-2step": ("ddim_trailing", 2, "", GRID[2], "DDIMScheduler", 0.0),
    "hyper-sd-4step": ("ddim_trailing", 4, "", GRID[4], "DDIMScheduler", 0.0),
    "hyper-sd-8step": ("ddim_trailing", 8, "", GRID[8], "DDIMScheduler", 0.0),
    "hyper-sd-1step": ("tcd_eta1", 1, "800", [800], "TCDScheduler", 1.0),
    "dmd2-4step": ("lcm", 4, [999, 749, 499, 249], [999, 749, 499, 249], "LCMScheduler", None),
    "lcm-lora-4step": ("lcm", 4, "", LCM_4, "LCMScheduler", None),
    "tcd-lora-4step": ("tcd", 4, "", LCM_4, "TCDScheduler", 0.3),
}


@pytest.fixture(scope="module")
def files(pair_files):
    return pair_files


def _request(files, **fields):
    if not fields.get("local_timesteps", True):
        del fields["local_timesteps"]  # the field's default: the scheduler's own timesteps
    return GenerationRequest.from_dict({"prompt": "a castle", "image_url": str(files / "init.png"),
                                        "control_image_url": str(files / "control.png"), "seed": 3,
                                        "guidance_scale": 1.0, **fields})


def run_recorded(pipe, request, monkeypatch, step_class):
    """Run ``request``; return (the timesteps the UNet was called with, the eta of each ``step_class.step`` call)."""
    import diffusers

    timesteps, etas = [], []
    cls = getattr(diffusers, step_class)
    own = cls.step

    @functools.wraps(own)  # keeps step's signature: the pipeline passes eta only to a step that takes it
    def step(self, *args, **kwargs):
        etas.append(kwargs.get("eta"))
        return own(self, *args, **kwargs)

    monkeypatch.setattr(cls, "step", step)

    def on_unet(_module, args, kwargs):
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        timesteps.append(float(t.flatten()[0]) if hasattr(t, "flatten") else float(t))

    hook = pipe.unet.register_forward_pre_hook(on_unet, with_kwargs=True)
    try:
        generate(pipe, request)
    finally:
        hook.remove()
        monkeypatch.undo()
    assert all(t == int(t) for t in timesteps), timesteps
    return [int(t) for t in timesteps], etas


@pytest.mark.parametrize("card", list(CARDS))
def test_each_few_step_lora_runs_its_cards_timesteps(tiny_pipe, files, monkeypatch, card):
    """At strength 1 the UNet sees the card's list, in the card's scheduler class with the card's eta."""
    scheduler, steps, timesteps, expected, cls, eta = CARDS[card]
    req = _request(files, local_scheduler=scheduler, num_inference_steps=steps, local_timesteps=timesteps,
                   strength=1.0)
    ran, etas = run_recorded(tiny_pipe, req, monkeypatch, cls)
    assert ran == expected
    assert etas == [eta] * len(expected)


@pytest.mark.parametrize("card", [c for c in CARDS if CARDS[c][1] > 1])
def test_img2img_strength_keeps_the_tail_of_the_cards_list(tiny_pipe, files, monkeypatch, card):
    """fal's default strength 0.95 runs the last int(steps x 0.95) of the card's timesteps: still on its grid."""
    scheduler, steps, timesteps, expected, cls, _eta = CARDS[card]
    req = _request(files, local_scheduler=scheduler, num_inference_steps=steps, local_timesteps=timesteps,
                   strength=0.95)
    ran, _ = run_recorded(tiny_pipe, req, monkeypatch, cls)
    assert ran == expected[len(expected) - int(steps * 0.95):]
    if steps == 4:
        assert ran == expected[1:]


def test_timesteps_are_refused_where_they_cannot_run(tiny_pipe, files):
    base = {"prompt": "x", "image_url": "a.png", "control_image_url": "b.png"}
    with pytest.raises(RequestError, match=r"local_timesteps: gives 4 timesteps but num_inference_steps is 25: set "
                                           r"num_inference_steps to 4"):
        GenerationRequest.from_dict({**base, "local_timesteps": [999, 749, 499, 249]})
    with pytest.raises(RequestError, match=r"local_timesteps: \[749, 999\] must be strictly descending"):
        GenerationRequest.from_dict({**base, "local_timesteps": "749, 999", "num_inference_steps": 2})
    with pytest.raises(RequestError, match=r"local_timesteps\[0\]: must be between 0 and 999, got 1000"):
        GenerationRequest.from_dict({**base, "local_timesteps": [1000], "num_inference_steps": 1})
    with pytest.raises(RequestError, match=r"local_timesteps: '999, late' is not a comma-separated list"):
        GenerationRequest.from_dict({**base, "local_timesteps": "999, late", "num_inference_steps": 2})
    assert GenerationRequest.from_dict({**base, "local_timesteps": " "}).local_timesteps == ()
    # DDIM's set_timesteps takes no custom list (diffusers' own rule): refused before any model work
    req = _request(files, local_scheduler="ddim_trailing", num_inference_steps=2, local_timesteps="999, 499")
    with pytest.raises(RequestError, match=r"local_timesteps: the 'ddim_trailing' scheduler \(DDIMScheduler\) takes "
                                           r"no custom timesteps; pick one that does \(.*lcm.*\)"):
        generate(tiny_pipe, req)


def test_custom_timesteps_last_one_call_only(tiny_pipe, files, monkeypatch):
    """The shared pipeline's scheduler gets its own schedule back after a call with custom timesteps."""
    dmd2 = _request(files, local_scheduler="lcm", num_inference_steps=4, local_timesteps="999, 749, 499, 249",
                    strength=1.0)
    assert run_recorded(tiny_pipe, dmd2, monkeypatch, "LCMScheduler")[0] == [999, 749, 499, 249]
    lcm = _request(files, local_scheduler="lcm", num_inference_steps=4, strength=1.0)
    assert run_recorded(tiny_pipe, lcm, monkeypatch, "LCMScheduler")[0] == LCM_4


def test_fal_refuses_custom_timesteps():
    from sdxl_controlnet_img2img.pipeline.fal.errors import FalValidationError
    from sdxl_controlnet_img2img.pipeline.fal.files import fal_arguments

    req = GenerationRequest.from_dict({"prompt": "x", "image_url": "a.png", "control_image_url": "b.png",
                                       "local_timesteps": [800], "num_inference_steps": 1, "strength": 1.0})
    with pytest.raises(FalValidationError, match=r"local_timesteps: .*local-only"):
        fal_arguments(req)


# ---- the one-line warning when a few-step schedule runs at settings no few-step LoRA is made for ------------------

WARNING = "few-step LoRAs need CFG about 1 (guidance_scale 1-2) and 2-8 steps"


@pytest.mark.parametrize("scheduler, guidance, steps, warns", [
    ("lcm", 1.0, 4, False), ("euler_trailing", 2.0, 8, False), ("tcd_eta1", 1.0, 1, False),
    ("default", 7.5, 25, False), ("dpmpp_2m_karras", 7.5, 30, False),
    ("lcm", 7.5, 4, True), ("tcd", 1.0, 9, True), ("euler_trailing", 2.5, 4, True), ("ddim_trailing", 1.0, 25, True),
])
def test_few_step_warning(scheduler, guidance, steps, warns):
    from sdxl_controlnet_img2img.pipeline.local.schedulers import few_step_warning

    req = GenerationRequest.from_dict({"prompt": "x", "image_url": "a.png", "control_image_url": "b.png",
                                       "local_scheduler": scheduler, "guidance_scale": guidance,
                                       "num_inference_steps": steps, "strength": 1.0})
    line = few_step_warning(req)
    assert (line is not None) == warns
    if warns:
        assert WARNING in line and "\n" not in line and repr(scheduler) in line


def test_the_node_warns_once_per_run(tiny_pipe, caplog):
    import numpy as np
    import torch
    from pictures import make_test_image

    from sdxl_controlnet_img2img import NODE_CLASS_MAPPINGS
    from sdxl_controlnet_img2img.pipeline.handle import PipelineHandle

    def batch(*pils):
        return torch.from_numpy(np.stack([np.asarray(p, dtype=np.float32) / 255.0 for p in pils]))

    node = NODE_CLASS_MAPPINGS["SDXLCNImg2Img"]()
    args = dict(pipeline=PipelineHandle(tiny_pipe), image=batch(make_test_image(64, 64, 1), make_test_image(64, 64, 3)),
                control_image=batch(make_test_image(64, 64, 2)), prompt="x", negative_prompt="",
                controlnet_conditioning_scale=0.5, image_size="none", width=64, height=64, num_inference_steps=2,
                guidance_scale=7.5, strength=1.0, seed=1, num_images=2, enable_safety_checker=False,
                expand_prompt=False, apply_canny=True, scheduler="lcm")
    with caplog.at_level(logging.WARNING, logger="sdxl_controlnet_img2img"):
        node.sample(**args)  # 2 init images x 2 images: four generations, one line
    assert [r.getMessage() for r in caplog.records if WARNING in r.getMessage()] == [
        "SDXLCNImg2Img: scheduler 'lcm' is a few-step LoRA's schedule, run here with guidance_scale 7.5 and 2 steps: "
        f"{WARNING} (README: 'Few-step LoRAs')"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sdxl_controlnet_img2img"):
        node.sample(**{**args, "guidance_scale": 1.0, "num_images": 1})
    assert not [r for r in caplog.records if WARNING in r.getMessage()]


def test_the_cli_warns_once(tiny_models, tmp_path, capsys):
    import json

    from pictures import make_test_image

    from sdxl_controlnet_img2img.pipeline.cli import main

    make_test_image(64, 64, 1).save(tmp_path / "init.png")
    make_test_image(64, 64, 2).save(tmp_path / "control.png")
    (tmp_path / "req.json").write_text(json.dumps({
        "prompt": "x", "image_url": "init.png", "control_image_url": "control.png", "num_inference_steps": 10,
        "strength": 0.2, "guidance_scale": 1.0, "num_images": 2, "local_scheduler": "euler_trailing"}))
    assert main(["generate", "--request", str(tmp_path / "req.json"), "--checkpoint", str(tiny_models["checkpoint"]),
                 "--controlnet", str(tiny_models["controlnet"]), "--out", str(tmp_path / "out")]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if WARNING in line]
    assert lines == ["warning: scheduler 'euler_trailing' is a few-step LoRA's schedule, run here with guidance_scale "
                     f"1 and 10 steps: {WARNING} (README: 'Few-step LoRAs')"]


# ---- the shipped _fast workflow lands on its LoRA's grid -----------------------------------------------------------

def test_fast_workflow_runs_lightning_4step_on_its_grid(tiny_pipe, files, monkeypatch):
    """The _fast workflow's sampler settings, run: SDXL-Lightning's 4-step LoRA sees its card's 999/749/499/249 less
    the first (strength 0.95), i.e. 749/499/249, not 5 x 0.95's 799/599/399/199."""
    import json
    from pathlib import Path

    api = json.loads((Path(__file__).resolve().parent.parent / "workflows" / "api" /
                      "sdxl_controlnet_img2img_fast.json").read_text())
    by_type = {n["class_type"]: n["inputs"] for n in api.values()}
    assert by_type["SDXLCNLoraLoader"]["lora_name"] == "sdxl_lightning_4step_lora.safetensors"
    s = by_type["SDXLCNImg2Img"]
    req = _request(files, num_inference_steps=s["num_inference_steps"], strength=s["strength"],
                   guidance_scale=s["guidance_scale"], local_scheduler=s["scheduler"],
                   local_timesteps=s.get("timesteps", ""))
    ran, _ = run_recorded(tiny_pipe, req, monkeypatch, "EulerDiscreteScheduler")
    assert ran == [749, 499, 249]


def test_serve_under_comfyui_hands_the_timesteps_to_the_sampler():
    """A fal-protocol request to ComfyUI's serve route runs as the shipped workflow: its local_timesteps reach the
    sampler's timesteps input (and none leaves the input empty, the scheduler's own)."""
    from sdxl_controlnet_img2img.nodes.serve_workflow import workflow_for

    args = {"prompt": "x", "num_inference_steps": 4, "local_scheduler": "lcm", "local_timesteps": [999, 749, 499, 249]}
    sampler = workflow_for(args, "init.png", "control.png")["4"]["inputs"]
    assert sampler["scheduler"] == "lcm"
    req = GenerationRequest.from_dict({"prompt": "x", "image_url": "a.png", "control_image_url": "b.png",
                                       "num_inference_steps": 4, "local_timesteps": sampler["timesteps"]})
    assert req.local_timesteps == (999, 749, 499, 249)
    assert workflow_for({"prompt": "x"}, "init.png", "control.png")["4"]["inputs"]["timesteps"] == ""
