"""Error types the library raises. Every message names the input at fault and the fix."""


class SDXLCNError(Exception):
    """Base class for errors a user can act on (shown verbatim in ComfyUI's error dialog).

    Every subclass reports its module as ``sdxlcn``: ComfyUI's error dialog names an exception by its dotted
    path, which would otherwise carry the pack's folder name (``comfyui-sdxl-...pipeline.fal.errors.FalKeyMissing``).
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.__module__ = "sdxlcn"


class RequestError(SDXLCNError, ValueError):
    """A request field is missing or out of range.

    ``field`` is the fal field name (e.g. ``"strength"``), so callers can point at the widget.
    """

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


class ImageInputError(SDXLCNError, ValueError):
    """An image input could not be read or decoded."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


class ModelLoadError(SDXLCNError, RuntimeError):
    """A model file or folder cannot be loaded as what it was given as."""


class GenerationCancelled(SDXLCNError):
    """Raised from a step callback to stop a running generation."""


SDXLCNError.__module__ = "sdxlcn"
