"""The steps of a load that patch torch for the whole process, one thread at a time.

diffusers', transformers' and accelerate's loaders build models under patches that hold for every thread:
``no_init_weights`` swaps ``torch.nn.init``'s functions for no-ops, ``init_empty_weights`` swaps
``nn.Module.register_parameter`` (and with buffers, torch's tensor constructors) for versions that put every new
parameter on ``meta``. Each puts back what it found when it ends. Two such blocks overlapping in two threads (two
loads at once) leave the patches in place for good: every model built later, anyone's, on ``meta`` or uninitialised.
And while one is on, a parameter registered in another thread lands on ``meta``: ``load_state_dict(assign=True)``
filling a model, a new ``nn.Linear``.

So every step of the pack's loads that runs under such patches (building an empty model, ``from_pretrained``,
``from_single_file``) or registers parameters (filling a model) holds :func:`load_lock`: two loads in one process
take turns there (reading the files, most of a load, is outside it). The lock is re-entrant, and when the outermost
block ends, whatever it patched is put back as it was at its start, even where a library left something behind.
Being where every load passes, it is also where the libraries' progress bars are turned off for the load
(:func:`.quiet.no_progress_bars`).
"""

from __future__ import annotations

import sys
import threading
from contextlib import contextmanager, nullcontext

from ..quiet import no_progress_bars

_lock = threading.RLock()
_depth = [0]  # blocks held by the thread that holds the lock (changed only while holding it)


def _patchable() -> list[tuple[object, str]]:
    """(owner, attribute) of what those loaders swap: torch.nn.init's functions (and the same names where
    transformers also patches them), ``nn.Module.register_parameter``/``register_buffer``, torch's tensor
    constructors, transformers' ``init_weights``."""
    import torch
    from torch import nn

    inits = [n for n, f in vars(nn.init).items() if callable(f) and not n.startswith("_")]
    found = [(nn.Module, "register_parameter"), (nn.Module, "register_buffer")]
    found += [(torch, n) for n in ("empty", "zeros", "ones", "full")]
    for name, module in list(sys.modules.items()):
        if module is not None and (name == "torch.nn.init" or name.startswith("torch.nn.modules.")):
            found += [(module, n) for n in inits if n in vars(module)]
    pretrained = getattr(sys.modules.get("transformers.modeling_utils"), "PreTrainedModel", None)
    if pretrained is not None:
        found.append((pretrained, "init_weights"))
    return found


@contextmanager
def load_lock():
    """Hold the process's load lock for the block (see the module's doc); the outermost block puts back the patched
    globals as they were when it began; diffusers' and transformers' progress bars stay off meanwhile."""
    with _lock, no_progress_bars():
        _depth[0] += 1
        before = [(owner, name, vars(owner)[name]) for owner, name in _patchable() if name in vars(owner)] \
            if _depth[0] == 1 else []
        try:
            yield
        finally:
            _depth[0] -= 1
            for owner, name, value in before:
                if vars(owner).get(name) is not value:
                    setattr(owner, name, value)


@contextmanager
def no_random_init():
    """Build models without random initialisation: every weight comes from the file. diffusers and transformers
    build a single file's models on ``meta`` (accelerate's ``init_empty_weights``), where each init still runs,
    through torch's Python reference kernels: building the SDXL UNet, VAE, ControlNet and text encoders took
    1.4-1.6 s of CPU with them and 0.5-0.7 s without them on this 2-core machine. transformers' ``no_init_weights``
    turns off torch.nn.init and ``init_weights`` (buffers such as CLIP's position ids are made by the constructors,
    not by the init). It patches the whole process: held under :func:`load_lock`."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - transformers without it: initialise, slower but the same model
        no_init_weights = nullcontext
    with load_lock(), no_init_weights():
        yield
