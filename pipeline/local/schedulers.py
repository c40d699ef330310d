"""The samplers users pick beside SDXL's default, each built from the loaded pipeline's own scheduler config (never
a hub download). The pipeline object is shared, so its original scheduler is kept and restored for "default"."""

from __future__ import annotations

import inspect
import weakref
from contextlib import contextmanager

from ..errors import RequestError
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
    # few-step LoRAs, each as its model card builds it for diffusers: LCM-LoRA (LCMScheduler; DMD2 too, with its
    # card's timesteps 999/749/499/249), TCD-LoRA (TCDScheduler called with eta = gamma 0.3), SDXL-Lightning (Euler
    # with trailing timesteps: ComfyUI's sgm_uniform), Hyper-SD's 2/4/8-step LoRAs (DDIM, trailing) and its 1-step
    # LoRA (TCDScheduler called with eta 1.0, at timestep 800)
    "lcm": ("LCMScheduler", {}),
    "tcd": ("TCDScheduler", {}),
    "euler_trailing": ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"}),
    "ddim_trailing": ("DDIMScheduler", {"timestep_spacing": "trailing"}),
    "tcd_eta1": ("TCDScheduler", {}),
}
# what a scheduler needs in the pipeline call (the default call passes none of these)
SCHEDULER_CALL_KWARGS = {"tcd": {"eta": 0.3}, "tcd_eta1": {"eta": 1.0}}
FEW_STEP_SCHEDULERS = ("lcm", "tcd", "euler_trailing", "ddim_trailing", "tcd_eta1")
FEW_STEP_MAX_GUIDANCE, FEW_STEP_MAX_STEPS = 2.0, 8
SCHEDULER_TOOLTIP = (
    "Sampler (local only; fal always uses its own). default: the model's own (Euler for SDXL base), as fal runs it. "
    "euler_ancestral: Euler a, more variation. dpmpp_2m: DPM++ 2M, sharp in few steps. dpmpp_2m_karras: with Karras "
    "sigmas, the most used SDXL choice. dpmpp_2m_sde_karras: stochastic DPM++ 2M SDE. unipc: UniPC, good at 10-20 "
    "steps. ddim: DDIM. Few-step LoRAs (2-8 steps, guidance_scale about 1) need their own, as their cards build "
    "them: euler_trailing (Euler, trailing timesteps = ComfyUI's sgm_uniform) for SDXL-Lightning; ddim_trailing for "
    "Hyper-SD's 2/4/8-step LoRAs; tcd_eta1 (TCD, eta 1.0) for Hyper-SD's 1-step LoRA with timesteps 800; lcm for "
    "LCM-LoRA, and for DMD2 with timesteps 999, 749, 499, 249; tcd (eta = gamma 0.3) for TCD-LoRA."
)
TIMESTEPS_TOOLTIP = (
    "Local only: the timesteps to run instead of the scheduler's own, descending and comma-separated, as a LoRA's "
    "card passes them: 999, 749, 499, 249 for DMD2 (scheduler lcm, 4 steps); 800 for Hyper-SD's 1-step LoRA "
    "(tcd_eta1, 1 step, strength 1). Their count must equal num_inference_steps; img2img runs the last "
    "int(steps x strength) of them. Empty: the scheduler's own."
)

_ORIGINAL: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # pipe -> the scheduler it was loaded with
_BUILT: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # pipe -> {name: scheduler}


def use_scheduler(pipe, name: str, timesteps=()) -> None:
    """Make ``name`` the pipeline's scheduler (built once per pipeline from its original scheduler's config); refuse
    custom ``timesteps`` it cannot take (before any model work)."""
    original = _ORIGINAL.setdefault(pipe, pipe.scheduler)
    if name == DEFAULT_SCHEDULER:
        pipe.scheduler = original
    else:
        built = _BUILT.setdefault(pipe, {})
        if name not in built:
            import diffusers

            cls_name, extra = SCHEDULER_RECIPES[name]
            built[name] = getattr(diffusers, cls_name).from_config(original.config, **extra)
        pipe.scheduler = built[name]
    check_custom_timesteps(pipe.scheduler, name, timesteps)


def scheduler_call_kwargs(name: str) -> dict:
    """Extra keyword arguments of the pipeline call for scheduler ``name`` (TCD's eta)."""
    return dict(SCHEDULER_CALL_KWARGS.get(name, {}))


def check_custom_timesteps(scheduler, name: str, timesteps) -> None:
    """Refuse ``timesteps`` for a scheduler whose ``set_timesteps`` takes none (diffusers' rule)."""
    if timesteps and not _takes_timesteps(type(scheduler)):
        import diffusers

        takes = [n for n, (cls, _) in SCHEDULER_RECIPES.items() if _takes_timesteps(getattr(diffusers, cls))]
        raise RequestError("local_timesteps", f"the {name!r} scheduler ({type(scheduler).__name__}) takes no custom "
                                              f"timesteps; pick one that does ({', '.join(takes)}) or leave "
                                              "timesteps empty")


def _takes_timesteps(cls) -> bool:
    return "timesteps" in inspect.signature(cls.set_timesteps).parameters


@contextmanager
def custom_timesteps(scheduler, timesteps):
    """While inside, ``scheduler.set_timesteps(n, device)`` sets ``timesteps`` instead, as diffusers'
    ``retrieve_timesteps`` does for a pipeline called with ``timesteps=``: the ControlNet img2img pipeline takes no
    such argument and calls ``set_timesteps(num_inference_steps)`` itself (the request holds n == len(timesteps),
    so its ``get_timesteps`` keeps the last int(n x strength) of them)."""
    if not timesteps:
        yield
        return
    own = scheduler.set_timesteps

    def set_timesteps(num_inference_steps=None, device=None, **_ignored):
        own(device=device, timesteps=list(timesteps))

    scheduler.set_timesteps = set_timesteps  # shadows the class's method on this instance only
    try:
        yield
    finally:
        del scheduler.set_timesteps


def few_step_warning(request) -> str | None:
    """One line when a few-step LoRA's schedule runs with settings no few-step LoRA is made for, else None."""
    name = request.local_scheduler
    guidance, steps = float(request.guidance_scale), int(request.num_inference_steps)
    if name not in FEW_STEP_SCHEDULERS or guidance <= FEW_STEP_MAX_GUIDANCE and steps <= FEW_STEP_MAX_STEPS:
        return None
    return (f"scheduler {name!r} is a few-step LoRA's schedule, run here with guidance_scale {guidance:g} and "
            f"{steps} steps: few-step LoRAs need CFG about 1 (guidance_scale 1-{FEW_STEP_MAX_GUIDANCE:g}) and "
            f"2-{FEW_STEP_MAX_STEPS} steps (README: 'Few-step LoRAs')")
