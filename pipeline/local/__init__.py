"""Local generation with diffusers: loading, devices, LoRA, generate, safety checker, prompt expansion."""

from .quiet import drop_known_noise

# Every way into diffusers/transformers here goes through this package (the CLI's make-tiny-models, generate, the
# nodes): filter the chatter known to be harmless before any of those libraries is imported. Logging filters only.
drop_known_noise()
