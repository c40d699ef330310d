"""Local generation with diffusers: loading, devices, LoRA, generate, safety checker, prompt expansion."""
