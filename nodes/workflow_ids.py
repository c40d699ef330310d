"""The shipped workflows' node ids: ``scripts/make_workflows.py`` writes the workflows with them, and ComfyUI's
endpoint (``serve_workflow.py``) finds the nodes it sets and reads back by them. Saved workflows keep these ids:
never renumber."""

IMAGE, CANNY, LOADER, SAMPLER, SAVE, LORA = 1, 2, 3, 4, 5, 6
# the _comfy_models workflow: ComfyUI's own loaders feeding the pack's pipeline node (at LOADER)
CHECKPOINT_LOADER, COMFY_LORA_LOADER, CONTROLNET_LOADER = 7, 8, 9
