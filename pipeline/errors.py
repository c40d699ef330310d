"""Error types the library raises. Every message names the input at fault and the fix."""


class SDXLCNError(Exception):
    """Base class for errors a user can act on (shown verbatim in ComfyUI's error dialog).

    Every subclass reports its module as ``sdxlcn``: ComfyUI's error dialog names an exception by its dotted
    path, which would otherwise carry the pack's folder name (``comfyui-sdxl-...pipeline.fal.errors.FalKeyMissing``).
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.__module__ = "sdxlcn"


class FieldError(SDXLCNError):
    """The base of every error that names one input: ``field`` is the input's name (the fal field name where there is
    one, e.g. ``"strength"``, so callers can point at the widget) and ``detail`` what is wrong with it, the message
    without the name. Read them instead of taking the message apart.

    The message is ``"<field>: <detail>"``, or ``"<label>: <detail>"`` where the input is named otherwise (a LoRA by
    its file). Further arguments go on to the next base class (``FalError``'s ``request_id``)."""

    def __init__(self, field: str, detail: str, *args, label: str | None = None, **kwargs):
        self.field = field
        self.detail = detail
        super().__init__(f"{field if label is None else label}: {detail}", *args, **kwargs)


class RequestError(FieldError, ValueError):
    """A request field is missing or out of range."""


class ImageInputError(FieldError, ValueError):
    """An image input could not be read or decoded."""


class ModelLoadError(SDXLCNError, RuntimeError):
    """A model file or folder cannot be loaded as what it was given as."""


class ModelInputError(FieldError, ModelLoadError):
    """A :class:`ModelLoadError` naming the input at fault (``field``: device, dtype, memory_mode, a model's label such
    as checkpoint or LoRA), for callers that say the input themselves (ComfyUI's dialog, a LoRA's own error)."""


class GenerationCancelled(SDXLCNError):
    """Raised from a step callback to stop a running generation."""


SDXLCNError.__module__ = "sdxlcn"
