"""ComfyUI node classes: thin adapters from ComfyUI types to the ``pipeline`` library."""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
