"""The one table of the request's fields: fal's endpoint's input (:data:`.endpoint.ENDPOINT`), then the local-only
extensions. Each row says a field's name, kind, default, range, what it does, its alias and whether fal takes it.

Everything that lists fields is built from :data:`FIELDS`: the request's validation and its fal arguments
(:mod:`.request`), the node widgets (``nodes/sampler_inputs.py``), the CLI's field list (``generate --help``) and
the endpoints' input check. A new fal field is one row here (and its dataclass line in :mod:`.request`).
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_SEED = 2**64 - 1
MAX_NUM_IMAGES = 8
NUM_TRAIN_TIMESTEPS = 1000  # SDXL's: a timestep is a whole number in [0, 999]
# local-only sampler choices (pipeline/local/schedulers.py builds each from the loaded scheduler's config)
DEFAULT_SCHEDULER = "default"
# appended, never reordered (saved workflows keep their values): from "lcm" on, few-step LoRAs' schedules
SCHEDULERS = (DEFAULT_SCHEDULER, "euler_ancestral", "dpmpp_2m", "dpmpp_2m_karras", "dpmpp_2m_sde_karras", "unipc",
              "ddim", "lcm", "tcd", "euler_trailing", "ddim_trailing", "tcd_eta1")
KINDS = ("text", "image", "number", "whole", "switch", "size", "loras", "choice", "timesteps")


@dataclass(frozen=True)
class Field:
    name: str
    kind: str  # one of KINDS: how the value is checked (and which widget shows it)
    default: object
    tooltip: str
    low: float | None = None  # range of a number or whole number
    high: float | None = None
    low_open: bool = False  # the low end itself is refused (strength: 0 runs no step)
    step: float | None = None  # a slider's step in ComfyUI
    required: bool = False
    alias: str | None = None  # a second accepted name (fal's docs call the images both ways)
    fal: bool = True  # sent to fal; False = local only (never sent)
    choices: tuple = ()

    def range_text(self) -> str:
        if self.low is None:
            return ""
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"


FIELDS = (
    Field("prompt", "text", "", "What to generate (fal: prompt, required).", required=True),
    Field("image_url", "image", None, "The init image: a path, a file:// or http(s):// URL or a data: URI.",
          required=True, alias="image"),
    Field("control_image_url", "image", None, "The control image; fal runs Canny (100/200) on it.", required=True,
          alias="control_image"),
    Field("negative_prompt", "text", "", "What to avoid (fal: negative_prompt)."),
    Field("controlnet_conditioning_scale", "number", 0.5,
          "How strongly the Canny edges steer the image (fal default 0.5).", low=0.0, high=1.0, step=0.01),
    Field("image_size", "size", None, "Output size: a fal preset name, {width, height}, or none = the control "
                                      "image's size."),
    Field("num_inference_steps", "whole", 25, "Denoising schedule length; int(steps x strength) steps actually run.",
          low=1, high=50),
    Field("guidance_scale", "number", 7.5,
          "Classifier-free guidance (CFG) scale (fal default 7.5). At 1 or below no unconditional pass runs "
          "(locally: half the UNet and ControlNet work); few-step LoRAs use 1-2.", low=0.0, high=20.0, step=0.1),
    Field("strength", "number", 0.95,
          "How much of the init image is replaced: 1.0 ignores it (fal default 0.95).", low=0.0, high=1.0,
          low_open=True, step=0.01),
    Field("seed", "whole", None, "Image i of a run uses seed + i, so every image can be redone alone.", low=0,
          high=MAX_SEED),
    Field("num_images", "whole", 1, "Images per init image (fal: num_images).", low=1, high=MAX_NUM_IMAGES),
    Field("loras", "loras", (), "LoRAs: a list of {path, scale (default 1)}."),
    Field("enable_safety_checker", "switch", False,
          "Opt-in, as on fal: flag (and black out) NSFW results. Locally this needs the safety checker model in "
          "models/safety_checker (see README)."),
    Field("expand_prompt", "switch", False,
          "Enrich the prompt with a prompt-expansion model (locally: models/prompt_expansion)."),
    Field("sync_mode", "switch", False, "fal: return the images inline as data URIs instead of as files."),
    # local only, never sent to fal (prefixed so they cannot collide with a field fal adds)
    Field("apply_canny", "switch", True,
          "Run Canny (100/200) on the control image first, as fal does. Turn off when the control image is already "
          "an edge map (e.g. from the Canny node).", fal=False),
    Field("local_scheduler", "choice", DEFAULT_SCHEDULER, "The sampler (local only).", fal=False, choices=SCHEDULERS),
    Field("local_control_start", "number", 0.0,
          "Local only: the fraction of the steps at which the ControlNet starts acting (0 = from the first step, as "
          "fal does), like Apply ControlNet's start_percent.", low=0.0, high=1.0, step=0.01, fal=False),
    Field("local_control_end", "number", 1.0,
          "Local only: the fraction of the steps after which the ControlNet stops (1 = to the last step, as fal "
          "does); lower it to let the prompt finish the details.", low=0.0, high=1.0, step=0.01, fal=False),
    Field("local_timesteps", "timesteps", (), "Local only: the timesteps to run instead of the scheduler's own "
                                              "(a few-step LoRA card's list, e.g. 999, 749, 499, 249).", fal=False),
)
FIELD = {f.name: f for f in FIELDS}
ALIASES = {f.alias: f.name for f in FIELDS if f.alias}
DEFAULTS = {f.name: f.default for f in FIELDS}
LOCAL_ONLY = tuple(f.name for f in FIELDS if not f.fal)


def describe_fields() -> str:
    """The fields as lines for a command's help: name (and alias), default in JSON or "required", range, and
    whether fal takes it."""
    import json

    lines = []
    for f in FIELDS:
        name = f"{f.name} (or {f.alias})" if f.alias else f.name
        said = "required" if f.required else "optional" if f.default in (None, ()) else \
            f"default {json.dumps(f.default)}"
        extra = f" in {f.range_text()}" if f.range_text() and f.name != "seed" else ""
        lines.append(f"  {name}: {said}{extra}{'' if f.fal else ' (local only)'}")
    return "\n".join(lines)
