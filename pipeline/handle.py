"""The value that travels along ``SDXLCN_PIPELINE`` links: a loaded pipeline plus the LoRAs chosen for it.

The LoRA set is part of the value, not of the shared pipeline object, so two graph branches
with different LoRAs on the same base do not disturb each other: the set is applied just
before sampling.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .request import LoraSpec


@dataclass(frozen=True)
class PipelineHandle:
    pipe: object  # a loaded StableDiffusionXLControlNetImg2ImgPipeline
    loras: tuple[LoraSpec, ...] = ()
    source: dict = field(default_factory=dict)  # what was loaded (checkpoint, controlnet, dtype, ...), for display

    def with_lora(self, spec: LoraSpec) -> "PipelineHandle":
        return replace(self, loras=self.loras + (spec,))
