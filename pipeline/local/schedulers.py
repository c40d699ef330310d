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
}
SCHEDULER_TOOLTIP = (
    "Sampler (local only; fal always uses its own). default: the model's own (Euler for SDXL base), as fal runs it. "
    "euler_ancestral: Euler a, more variation. dpmpp_2m: DPM++ 2M, sharp in few steps. dpmpp_2m_karras: with Karras "
    "sigmas, the most used SDXL choice. dpmpp_2m_sde_karras: stochastic DPM++ 2M SDE. unipc: UniPC, good at 10-20 "
    "steps. ddim: DDIM."
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
