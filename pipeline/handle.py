"""The value that travels along ``SDXLCN_PIPELINE`` links: where the pipeline comes from, plus the LoRAs chosen.

The handle is light: made by the loader node it holds a *reference* to the pipeline (what it was loaded from,
:class:`~.local.loading.PipelineRef`), not the pipeline itself. ComfyUI's output cache may keep old handles
(``--cache-lru``, ``--cache-ram``); they then keep no weights alive, so replacing or freeing the pipeline gives
its memory back, and a handle whose pipeline was freed loads it again when it is next used.

The LoRA set is part of the value, not of the shared pipeline object, so two graph branches with different
LoRAs on the same base do not disturb each other: the set is applied just before sampling.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .request import LoraSpec


@dataclass(frozen=True)
class PipelineHandle:
    pipe: object = None  # a pipeline held directly (library use, tests); None when ``ref`` finds it
    loras: tuple[LoraSpec, ...] = ()
    source: dict = field(default_factory=dict)  # what was loaded (checkpoint, controlnet, dtype, ...), for display
    ref: object = None  # an object whose get() returns the pipeline, loading it again when it was freed

    def get_pipe(self):
        """The pipeline: the one held, or the one ``ref`` finds (reloaded transparently when it was freed)."""
        if self.pipe is not None:
            return self.pipe
        if self.ref is None:
            raise ValueError("pipeline: this SDXLCN_PIPELINE value holds no pipeline; connect a loader node")
        return self.ref.get()

    def with_lora(self, spec: LoraSpec) -> "PipelineHandle":
        return replace(self, loras=self.loras + (spec,))
