"""Library chatter that says nothing to our users, silenced where it arises; everything else still shows.

- :func:`drop_known_noise` filters exact messages at the loggers that emit them: diffusers' "modules that
  should be kept in float32: []" (an empty list: nothing is at stake, logged on every VAE cast) and transformers'
  "`CLIPImageProcessor` / `SiglipImageProcessor` requires torchvision (not installed); falling back to ...Pil"
  (printed when diffusers' pipeline modules import those names; our safety checker asks for the PIL processor
  itself, safety.py, and Siglip's belongs to other diffusers pipelines, never built here). Installed when
  ``pipeline.local`` is imported, so it applies before diffusers/transformers are (with torchvision installed the
  transformers message never comes).
- :class:`quiet_libraries` silences diffusers/transformers below errors for the span of one call whose own
  warnings we report better (LoRA loading lists other adapters' weights as "missing"), and PEFT's "Already found a
  `peft_config`" warning, which every LoRA after the first raises: keeping several adapters is what the pack does
  (the LoRA loader says in its own line how many it keeps).
- :func:`no_progress_bars` turns off diffusers' and transformers' tqdm bars ("Loading pipeline components...",
  "Loading weights") while any pack load runs (the load lock holds it): in ComfyUI's log they were screens of
  carriage-return lines per load; the pack says what it loaded, and in how long, in one line of its own.
"""

from __future__ import annotations

import logging
import threading
import warnings
from contextlib import contextmanager

_NOISE = {
    "diffusers.models.modeling_utils": "that should be kept in float32: []",
    "transformers.utils.import_utils": "requires torchvision (not installed); falling back to",
}
# PEFT's warnings.warn when a second adapter joins a model (peft/tuners/tuners_utils.py)
PEFT_SECOND_ADAPTER = r"Already found a `peft_config` attribute in the model"


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
    """Silence diffusers'/transformers' warnings and PEFT's second-adapter warning for one call (restored
    afterwards)."""

    def __enter__(self):
        import diffusers.utils.logging as dl
        import transformers.utils.logging as tl

        self._levels = [(m, m.get_verbosity()) for m in (dl, tl)]
        for m, _ in self._levels:
            m.set_verbosity_error()
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.filterwarnings("ignore", message=PEFT_SECOND_ADAPTER, category=UserWarning)
        return self

    def __exit__(self, *exc):
        self._warnings.__exit__(*exc)
        for m, level in self._levels:
            m.set_verbosity(level)
        return False


_bars = threading.Lock()
_bars_held = [0, []]  # blocks open in any thread, [(module, enabled before the first)]


def _bar_modules() -> list:
    import diffusers.utils.logging as dl
    import transformers.utils.logging as tl

    return [dl, tl]


@contextmanager
def no_progress_bars():
    """diffusers' and transformers' progress bars off while any such block is open (in any thread); the first block
    to open records whether each was on, the last to close puts that back."""
    with _bars:
        if _bars_held[0] == 0:
            _bars_held[1] = [(m, m.is_progress_bar_enabled()) for m in _bar_modules()]
            for m, _ in _bars_held[1]:
                m.disable_progress_bar()
        _bars_held[0] += 1
    try:
        yield
    finally:
        with _bars:
            _bars_held[0] -= 1
            if _bars_held[0] == 0:
                for m, enabled in _bars_held[1]:
                    if enabled:
                        m.enable_progress_bar()
                _bars_held[1] = []
