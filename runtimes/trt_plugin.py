"""The MythosMoE TensorRT plugin, registered with TensorRT's quickly deployable plugin API
(`tensorrt.plugin`, TensorRT >= 10.9 for AOT implementations).

Name and attributes are what the ONNX `plugin` lowering emits (exporters/onnx_ops.py): op
`MythosMoE`, namespace `mythos_deploy`, version "1"; inputs x [N, D], topk_idx [N, K] int64,
gates [N, K], w_gate/w_up [E, F, D], w_down [E, D, F]; attributes num_experts, top_k,
expert_dim; one output y [N, D] like x.

- shape and type inference (`register`): y is x's shape and type;
- formats (`autotune`): fp32, fp16 or bf16 for every float input and the output, int64 indices;
- AOT implementation (`aot_impl`): the single-launch Triton kernel (`fused_kernel`) compiled
  to PTX for the build GPU's compute capability; the engine then runs it without Python;
- JIT fallback (`impl`): the Triton kernels through torch (grouped by expert for long
  inputs), used when the engine is built without AOT (`build --plugin jit`).

`register()` takes the `tensorrt.plugin` and `tensorrt` modules as arguments so the logic can
be exercised without TensorRT (tests/runtimes/test_trt_plugin.py drives it with stand-ins);
nothing here has run against a real TensorRT in this project's CI.
"""

from __future__ import annotations

from types import ModuleType

from mythos_deploy.contract import PLUGIN_NAMESPACE, PLUGIN_OP
from mythos_deploy.errors import InputError, MissingDependencyError

PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{PLUGIN_OP}"
FLOATS = "FP32|FP16|BF16"

_registered: set[int] = set()


def import_tensorrt() -> tuple[ModuleType, ModuleType]:
    try:
        import tensorrt as trt
        import tensorrt.plugin as trtp
    except ImportError:
        raise MissingDependencyError("tensorrt not installed: pip install 'mythos-deploy[tensorrt]' "
                                     "(TensorRT >= 10.9 with tensorrt.plugin; NVIDIA GPU machines only)") from None
    return trt, trtp


def dtype_name(trt: ModuleType, dtype) -> str:
    for name, attr in (("fp32", "float32"), ("fp16", "float16"), ("bf16", "bfloat16")):
        if dtype == getattr(trt, attr):
            return name
    raise InputError(f"MythosMoE plugin: unsupported input type {dtype} (fp32, fp16 or bf16)")


def launch(trtp: ModuleType, x_desc, w_gate_desc, topk_desc, compiled) -> tuple:
    """Launch parameters and scalar arguments of the fused kernel as TensorRT symbolic
    expressions of the (dynamic) input shapes: grid (N, ceil(D / BLOCK_DY)); args D, F, K."""
    from mythos_deploy import moe_kernel as mk
    N, D = x_desc.shape_expr[0], x_desc.shape_expr[1]
    F, K = w_gate_desc.shape_expr[1], topk_desc.shape_expr[1]
    params = trtp.KernelLaunchParams()
    params.grid_x = N
    params.grid_y = trtp.cdiv(D, mk.BLOCK_DY)
    params.block_x = compiled.metadata.num_warps * 32
    params.shared_mem = compiled.metadata.shared
    extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(v) for v in (D, F, K)])
    return params, extra


def register(trtp: ModuleType | None = None, trt: ModuleType | None = None, device_cc: int | None = None,
             mode: str = "both") -> str:
    """Register the plugin (idempotent per `trtp` module); returns its id. `mode`: "aot" (the
    engine embeds the kernel and runs without Python), "jit" (Python impl at run time), or
    "both". `device_cc` is the compute capability AOT kernels are compiled for (default: the
    current CUDA device)."""
    if mode not in ("aot", "jit", "both"):
        raise InputError(f"plugin mode must be aot, jit or both, got {mode!r}")
    if trtp is None or trt is None:
        trt, trtp = import_tensorrt()
    if id(trtp) in _registered:
        return PLUGIN_ID

    @trtp.register(PLUGIN_ID)
    def _desc(x, topk_idx, gates, w_gate, w_up, w_down, num_experts: int, top_k: int, expert_dim: int):
        return x.like()

    @trtp.autotune(PLUGIN_ID)
    def _formats(x, topk_idx, gates, w_gate, w_up, w_down, num_experts: int, top_k: int, expert_dim: int, outputs):
        # positions: x, topk_idx, gates, w_gate, w_up, w_down, y; the float ones share one type
        return [trtp.AutoTuneCombination(f"{FLOATS}, INT64, {FLOATS}, {FLOATS}, {FLOATS}, {FLOATS}, {FLOATS}")]

    if mode in ("aot", "both"):
        _register_aot(trtp, trt, device_cc)
    if mode in ("jit", "both"):
        _register_jit(trtp)
    _registered.add(id(trtp))
    return PLUGIN_ID


def _register_aot(trtp, trt, device_cc):
    @trtp.aot_impl(PLUGIN_ID)
    def _aot(x, topk_idx, gates, w_gate, w_up, w_down, num_experts: int, top_k: int, expert_dim: int, outputs, tactic: int):
        from mythos_deploy.moe_aot import compile_fused
        cc = device_cc
        if cc is None:
            import torch
            major, minor = torch.cuda.get_device_capability()
            cc = 10 * major + minor
        compiled = compile_fused(dtype_name(trt, x.dtype), cc)
        params, extra = launch(trtp, x, w_gate, topk_idx, compiled)
        return compiled.metadata.name.encode(), compiled.asm["ptx"].encode(), params, extra


def _register_jit(trtp):
    @trtp.impl(PLUGIN_ID)
    def _jit(x, topk_idx, gates, w_gate, w_up, w_down, num_experts: int, top_k: int, expert_dim: int, outputs, stream: int):
        import torch
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            ts = [torch.as_tensor(t, device="cuda") for t in (x, topk_idx, gates, w_gate, w_up, w_down)]
            run_jit(*ts, torch.as_tensor(outputs[0], device="cuda"))


def run_jit(x, topk_idx, gates, w_gate, w_up, w_down, y) -> None:
    """The JIT implementation on torch tensors: y <- experts(x) (grouped by expert for long
    inputs), written into TensorRT's output buffer."""
    from mythos_deploy.moe_kernel import moe_experts_triton
    y.copy_(moe_experts_triton(x, topk_idx, gates, w_gate, w_up, w_down))
