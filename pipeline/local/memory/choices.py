"""What users choose about how the models run: the memory modes and the dtypes, one table each.

Each row holds a choice's name (as the loader node's menu, ``generate`` and ``serve`` take it), what it needs, what it
does and so its help line. The placement code (placement.py) applies a memory mode's ``offload`` method and keeps
``compile`` away from a mode that streams ``per_layer``; the loader refuses a mode that ``needs_gpu`` on the CPU;
devices.py turns a dtype's name into torch's; the node's tooltips and the CLI's help are built here. A new memory
mode is a row in MEMORY_MODES (and, when ``auto`` may pick it, a case in memory_plan.py); a new dtype a row in DTYPES.
The order of the rows is the order of the node's menus: saved workflows depend on the names and the defaults.
Imports nothing heavy (the node pack and ``--help`` read it).
"""

from __future__ import annotations

from dataclasses import dataclass

from .plan import NEEDS_AT_1024


@dataclass(frozen=True)
class Choice:
    name: str  # as users write it: the node's menu value, the CLI's argument
    does: str  # what it does, in the user's words
    needs: str = ""  # what it needs (memory, hardware), said in its help line
    speed: str = ""  # how fast it runs, compared with the others


@dataclass(frozen=True)
class MemoryMode(Choice):
    offload: str | None = None  # the diffusers pipeline method that places the weights (None: ``pipe.to(device)``)
    per_layer: bool = False  # hooks on every layer, weights on ``meta`` between uses: nothing a compiled graph holds

    @property
    def needs_gpu(self) -> bool:
        """It moves weights between the CPU and a GPU, so it is refused on the CPU."""
        return self.offload is not None


@dataclass(frozen=True)
class Dtype(Choice):
    torch_name: str | None = None  # ``torch.<torch_name>``; None: the device's default (devices.default_dtype)
    spellings: tuple[str, ...] = ()  # other names the library takes for it ("float16", "half")


def _needs(mode: str, cards: str) -> str:
    return f"{NEEDS_AT_1024[mode]} at 1024x1024, {cards}"


MEMORY_MODES_TABLE = (
    MemoryMode("auto", "chosen when the pipeline loads, from the free GPU memory and the models' sizes (the log says "
                       "what and why)"),
    MemoryMode("none", "all on the GPU", _needs("none", "16 GB cards"), "fastest"),
    MemoryMode("model_cpu_offload", "one model on the GPU at a time", _needs("model_cpu_offload", "12 GB cards"),
               "a little slower", offload="enable_model_cpu_offload"),
    MemoryMode("sequential_cpu_offload", "layer by layer, streamed to the GPU",
               _needs("sequential_cpu_offload", "8 GB cards"), "much slower", offload="enable_sequential_cpu_offload",
               per_layer=True),
)
DTYPES_TABLE = (
    Dtype("auto", "bf16 on CUDA cards of compute capability 8.0+ (Ampere and newer), fp16 "
                  "on older ones, XPU without bf16 and MPS, fp32 on the CPU"),
    Dtype("fp16", "16-bit floats", "half of fp32's memory", torch_name="float16", spellings=("float16", "half")),
    Dtype("bf16", "16-bit floats with fp32's range", "half of fp32's memory",
          "fast on CUDA cards of compute capability 8.0+, emulated and slow on older cards and most CPUs",
          torch_name="bfloat16", spellings=("bfloat16",)),
    Dtype("fp32", "32-bit floats", "twice the memory of fp16", torch_name="float32", spellings=("float32",)),
)
DEFAULT = "auto"  # the default of both, everywhere
MEMORY_MODES = tuple(m.name for m in MEMORY_MODES_TABLE)
DTYPES = tuple(d.name for d in DTYPES_TABLE)
_MODES = {m.name: m for m in MEMORY_MODES_TABLE}


def memory_mode_row(name: str) -> MemoryMode | None:
    """The row of memory mode ``name`` (None for a name that is none of them)."""
    return _MODES.get(name)


def help_text(lead: str, table, notes: dict | None = None) -> str:
    """``lead``, then one sentence per row: its name, what it does (with a host's ``notes[name]``), how fast it runs
    and what it needs; for the CLI's and serve's help and the loader node's tooltips."""
    notes = notes or {}
    lines = [lead]
    for row in table:
        note = f"; {notes[row.name]}" if row.name in notes else ""
        more = "; ".join(t for t in (row.speed, row.needs) if t)
        more = f" ({more})" if more else ""
        lines.append(f"{row.name}{' (default)' if row.name == DEFAULT else ''}: {row.does}{note}{more}.")
    return " ".join(lines)


def memory_mode_help(notes: dict | None = None) -> str:
    return help_text("Where the weights sit in GPU memory.", MEMORY_MODES_TABLE, notes)


def dtype_help(notes: dict | None = None) -> str:
    return help_text("Weights precision.", DTYPES_TABLE, notes)
