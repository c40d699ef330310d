"""Library chatter that says nothing to our users, silenced where it arises; everything else still shows.

- :func:`drop_known_noise` filters exact messages at the loggers that emit them: diffusers' "modules that
  should be kept in float32: []" (an empty list: nothing is at stake, logged on every VAE cast) and transformers'
  "`CLIPImageProcessor` / `SiglipImageProcessor` requires torchvision (not installed); falling back to ...Pil"
  (printed when diffusers' pipeline modules import those names; our safety checker asks for the PIL processor
  itself, safety.py, and Siglip's belongs to other diffusers pipelines, never built here). Installed when
  ``pipeline.local`` is imported, so it applies before diffusers/transformers are (with torchvision installed the
  transformers message never comes).
- :class:`quiet_libraries` silences diffusers/transformers below errors for the span of one call whose own
  warnings we report better (LoRA loading lists other adapters' weights as "missing").
"""

from __future__ import annotations

import logging

_NOISE = {
    "diffusers.models.modeling_utils": "that should be kept in float32: []",
    "transformers.utils.import_utils": "requires torchvision (not installed); falling back to",
}


class _DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            return self.text not in record.getMessage()
        except Exception:  # noqa: BLE001 - a record that cannot be formatted is not ours to judge
            return True


def drop_known_noise() -> None:
    """Install the filters (idempotent)."""
    for name, text in _NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) for f in logger.filters):
            logger.addFilter(_DropMessage(text))


class quiet_libraries:
    """Silence diffusers'/transformers' warnings for one call (restored afterwards)."""

    def __enter__(self):
        import diffusers.utils.logging as dl
        import transformers.utils.logging as tl

        self._levels = [(m, m.get_verbosity()) for m in (dl, tl)]
        for m, _ in self._levels:
            m.set_verbosity_error()
        return self

    def __exit__(self, *exc):
        for m, level in self._levels:
            m.set_verbosity(level)
        return False
