"""The project's option vocabularies as StrEnums, and the decoding options.

Each enum is the one list of its choices: the CLI declares its options with these types (typer
lists the choices itself), the dataclasses of the exporters and runtimes coerce to them with
`choose`, and a member compares equal to its string, so manifests stay plain JSON.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, TypeVar

from mythos_deploy.errors import InputError


def env_int(name: str, default: int, unit: str) -> int:
    """An integer environment setting (MYTHOS_*), `default` when unset; anything else than an
    integer is an InputError naming the variable."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise InputError(f"{name} must be an integer number of {unit}, got {raw!r}") from None

if TYPE_CHECKING:
    from mythos_deploy.config import MythosConfig


class LoopMode(StrEnum):
    """How the recurrent core is in the graph: unrolled, an ONNX Loop, or one step per call."""
    UNROLL = "unroll"
    LOOP = "loop"
    STEPPED = "stepped"


class LoopExport(StrEnum):
    """How a `loop` graph is built: the step graph composed into a Loop, or torch.export while_loop."""
    COMPOSE = "compose"
    WHILE_LOOP = "while_loop"


class MoeLowering(StrEnum):
    """What the MoE node becomes: the TensorRT plugin, com.microsoft::MoE, or plain ONNX ops."""
    STANDARD = "standard"
    ORT = "ort"
    PLUGIN = "plugin"


class PastForm(StrEnum):
    """Which past rows a graph reads: only the filled ones (sliced) or the whole buffer (masked)."""
    SLICED = "sliced"
    MASKED = "masked"


class MlaForm(StrEnum):
    """MLA attention in the graph: kv_up absorbed into query/output, or the latent re-expanded."""
    ABSORBED = "absorbed"
    EXPANDED = "expanded"


class ExitMode(StrEnum):
    """ACT early exit (SEMANTICS.md): none is exact (OpenMythos's numbers); fill-forward and
    propagate stop a call's loop once every position has halted and are approximate."""
    NONE = "none"
    FILL_FORWARD = "fill-forward"
    PROPAGATE = "propagate"


class ExportDtype(StrEnum):
    """Float type of an exported graph."""
    FP32 = "fp32"
    FP16 = "fp16"


class WeightDtype(StrEnum):
    """Float type eager weights are loaded in."""
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"


class Precision(StrEnum):
    """TensorRT builder precision."""
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"
    FP8 = "fp8"


class QuantMode(StrEnum):
    """Quantization of an ONNX export: onnxruntime modes, then TensorRT Q/DQ modes."""
    INT8 = "int8"
    INT4 = "int4"
    FP16 = "fp16"
    QDQ_INT8 = "qdq-int8"
    QDQ_INT4 = "qdq-int4"
    FP8 = "fp8"

    @property
    def is_qdq(self) -> bool:
        return self in (QuantMode.QDQ_INT8, QuantMode.QDQ_INT4, QuantMode.FP8)


class PluginMode(StrEnum):
    """How a TensorRT engine runs the MoE plugin: AOT-compiled kernel (no Python) or the JIT impl."""
    AOT = "aot"
    JIT = "jit"


class BackendName(StrEnum):
    AUTO = "auto"
    EAGER = "eager"
    ONNXRUNTIME = "onnxruntime"
    TENSORRT = "tensorrt"


class Provider(StrEnum):
    CPU = "cpu"
    CUDA = "cuda"


E = TypeVar("E", bound=StrEnum)


def plain_dict(options: Any) -> dict[str, Any]:
    """An options dataclass as plain JSON values (its enums as their strings)."""
    return {k: (str(v) if isinstance(v, StrEnum) else v) for k, v in dataclasses.asdict(options).items()}


def choose(enum: type[E], value: object, option: str) -> E:
    """`value` as a member of `enum`, or a one-line InputError naming `option` and the choices."""
    try:
        return enum(value)
    except ValueError:
        raise InputError(f"{option} must be one of {', '.join(enum)}, got {value!r}") from None


@dataclass(frozen=True)
class DecodeOptions:
    """How each token runs the recurrent core: loop count (None: the config's max_loop_iters,
    or an export's trained depth), ACT threshold (None: the config's) and exit mode."""
    n_loops: int | None = None
    act_threshold: float | None = None
    exit: ExitMode = ExitMode.NONE

    def __post_init__(self):
        object.__setattr__(self, "exit", choose(ExitMode, self.exit, "exit"))
        n = self.n_loops
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise InputError(f"n_loops must be an integer >= 1, got {n!r}")
        if self.act_threshold is not None and not 0.0 < float(self.act_threshold) <= 1.0:
            raise InputError(f"act_threshold must be in (0, 1], got {self.act_threshold}")


@dataclass(frozen=True)
class OnnxExportOptions:
    """How a checkpoint is exported to ONNX; an artifact's manifest records them (`options`).
    Strings are accepted and coerced to the enums (a one-line InputError names a bad one)."""
    loop: LoopMode = LoopMode.UNROLL
    loops: int | None = None  # default: the config's max_loop_iters
    moe: MoeLowering = MoeLowering.STANDARD
    opset: int = 18
    dtype: ExportDtype = ExportDtype.FP32
    validate: bool = True
    mla: MlaForm = MlaForm.ABSORBED  # MLA attention form in the graph (ignored for GQA)
    # past rows read: sliced (only [0, past_len): cost follows the context, not the buffer; a
    # data-dependent shape) or masked (the whole buffer, unfilled rows masked: static shapes,
    # as TensorRT engines captured in CUDA graphs need). None: masked for the plugin lowering
    # (the TensorRT path), sliced otherwise.
    past: PastForm | None = None
    # how a `loop` graph is built: compose (the exported step graph placed in an ONNX Loop at
    # the ONNX level, shared with unroll/stepped) or while_loop (the whole model through
    # torch.export while_loop, lowered to an ONNX Loop by torch.onnx)
    loop_export: LoopExport = LoopExport.COMPOSE

    def __post_init__(self):
        for name, enum, option in (("loop", LoopMode, "--loop"), ("moe", MoeLowering, "--moe"),
                                   ("dtype", ExportDtype, "--dtype"), ("mla", MlaForm, "--mla"),
                                   ("loop_export", LoopExport, "--loop-export")):
            object.__setattr__(self, name, choose(enum, getattr(self, name), option))
        if self.past is not None:
            object.__setattr__(self, "past", choose(PastForm, self.past, "--past"))

    @classmethod
    def from_manifest(cls, options: dict[str, Any]) -> "OnnxExportOptions":
        """The options an artifact was exported with (its manifest's `options`). Manifests
        written before `past` existed describe graphs that read the whole buffer: masked."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{"past": PastForm.MASKED, **{k: v for k, v in options.items() if k in known}})

    def resolved(self, cfg: "MythosConfig") -> "OnnxExportOptions":
        loops = cfg.max_loop_iters if self.loops is None else self.loops
        past = self.past or (PastForm.MASKED if self.moe == MoeLowering.PLUGIN else PastForm.SLICED)
        return dataclasses.replace(self, loops=loops, past=past)

    def to_dict(self) -> dict[str, Any]:
        return plain_dict(self)
