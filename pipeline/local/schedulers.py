"""The samplers users pick beside SDXL's default, each built from the loaded pipeline's own scheduler config (never
a hub download). The pipeline object is shared, so its original scheduler is kept and restored for "default"."""

from __future__ import annotations

import weakref

from ..request import DEFAULT_SCHEDULER

# name -> (diffusers class, extra config); "default" is the scheduler the model was loaded with (SDXL base: Euler)
SCHEDULER_RECIPES = {
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler",
                        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    # the SDE variant of DPM++ 2M: needs no torchsde (which diffusers' DPMSolverSDEScheduler would)
    "dpmpp_2m_sde_karras": ("DPMSolverMultistepScheduler",
                            {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    # few-step LoRAs, each as its authors document it for diffusers: LCM-LoRA (LCMScheduler), TCD-LoRA (TCDScheduler,
    # called with eta = gamma 0.3), SDXL-Lightning / Hyper-SD / DMD2 (Euler with trailing timesteps: ComfyUI's
    # sgm_uniform)
    "lcm": ("LCMScheduler", {}),
    "tcd": ("TCDScheduler", {}),
    "euler_trailing": ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"}),
}
# what a scheduler needs in the pipeline call (the default call passes none of these)
SCHEDULER_CALL_KWARGS = {"tcd": {"eta": 0.3}}
SCHEDULER_TOOLTIP = (
    "Sampler (local only; fal always uses its own). default: the model's own (Euler for SDXL base), as fal runs it. "
    "euler_ancestral: Euler a, more variation. dpmpp_2m: DPM++ 2M, sharp in few steps. dpmpp_2m_karras: with Karras "
    "sigmas, the most used SDXL choice. dpmpp_2m_sde_karras: stochastic DPM++ 2M SDE. unipc: UniPC, good at 10-20 "
    "steps. ddim: DDIM. Few-step LoRAs (2-8 steps, guidance_scale 1-2) need their own: lcm for LCM-LoRA, tcd for "
    "TCD-LoRA (gamma 0.3), euler_trailing (Euler, trailing timesteps = ComfyUI's sgm_uniform) for SDXL-Lightning, "
    "Hyper-SD and DMD2."
)

_ORIGINAL: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # pipe -> the scheduler it was loaded with
_BUILT: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # pipe -> {name: scheduler}


def use_scheduler(pipe, name: str) -> None:
    """Make ``name`` the pipeline's scheduler (built once per pipeline from its original scheduler's config)."""
    original = _ORIGINAL.setdefault(pipe, pipe.scheduler)
    if name == DEFAULT_SCHEDULER:
        pipe.scheduler = original
        return
    built = _BUILT.setdefault(pipe, {})
    if name not in built:
        import diffusers

        cls_name, extra = SCHEDULER_RECIPES[name]
        built[name] = getattr(diffusers, cls_name).from_config(original.config, **extra)
    pipe.scheduler = built[name]


def scheduler_call_kwargs(name: str) -> dict:
    """Extra keyword arguments of the pipeline call for scheduler ``name`` (TCD's eta)."""
    return dict(SCHEDULER_CALL_KWARGS.get(name, {}))
