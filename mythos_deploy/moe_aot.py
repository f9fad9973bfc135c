"""Ahead-of-time compilation of the MoE plugin kernels to PTX (and cubin) for NVIDIA targets,
without a GPU: sm_87 (Jetson Orin) and sm_90 (H100/H200). A TensorRT AOT plugin loads these
so the engine runs without Python.

Writes, per dtype and target: `<kernel>_<dtype>_sm<cc>.ptx` / `.cubin` and `kernels.json`
(entry names, launch grid rules, block sizes, warps, shared memory, sha256 of each file).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from mythos_deploy.errors import MissingDependencyError

TARGETS = (87, 90)
DTYPES = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}


def _triton():
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:
        raise MissingDependencyError("the MoE plugin kernels need triton: pip install 'mythos-deploy[triton]'") from None
    return triton, ASTSource, GPUTarget


def _jit(kernel):
    """A compilable JITFunction even when TRITON_INTERPRET=1 made `kernel` an interpreter
    wrapper (both keep the Python function as `.fn`)."""
    from triton.runtime.jit import JITFunction
    return kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)


def _source(kernel, signature: dict, constexprs: dict):
    """What triton.compile takes for `kernel` with this signature and these constexprs."""
    _, ASTSource, _ = _triton()
    return ASTSource(fn=_jit(kernel), signature={**signature, **{c: "constexpr" for c in constexprs}},
                     constexprs=constexprs)


def fused_signature(ptr: str) -> dict:
    """The single-launch kernel's arguments, in TensorRT AOT order: inputs (as the ONNX node
    passes them: int64 routing indices), scalar extra arguments, then the output."""
    return {"x_ptr": ptr, "idx_ptr": "*i64", "gate_ptr": ptr, "wg_ptr": ptr, "wu_ptr": ptr, "wd_ptr": ptr,
            "D": "i32", "F": "i32", "K": "i32", "y_ptr": ptr}


def fused_constexprs() -> dict:
    from mythos_deploy import moe_kernel as mk
    return {"BLOCK_F": mk.BLOCK_F, "BLOCK_D": mk.BLOCK_D, "BLOCK_DY": mk.BLOCK_DY}


def compile_fused(dtype: str, cc: int):
    """Compile the single-launch kernel for one dtype (fp32/fp16/bf16) and compute capability."""
    triton, _, GPUTarget = _triton()
    from mythos_deploy import moe_kernel as mk
    src = _source(mk.fused_kernel, fused_signature(f"*{DTYPES[dtype]}"), fused_constexprs())
    return triton.compile(src, target=GPUTarget("cuda", cc, 32))


def compile_kernels(out_dir: str | Path, dtypes=("fp32", "fp16", "bf16"), targets=TARGETS) -> dict:
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    triton, _, GPUTarget = _triton()
    from mythos_deploy import moe_kernel as mk
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for dt in dtypes:
        t = f"*{DTYPES[dt]}"
        tiles = {"order_ptr": "*i32", "tile_e_ptr": "*i32", "tile_lo_ptr": "*i32", "tile_hi_ptr": "*i32"}
        per_token = {"BLOCK_F": mk.BLOCK_F, "BLOCK_D": mk.BLOCK_D}
        grouped = {"BLOCK_M": mk.BLOCK_M, **per_token, "IEEE": dt == "fp32"}
        sigs = {
            "up": (mk.up_kernel, {"x_ptr": t, "idx_ptr": "*i32", "gate_ptr": t, "wg_ptr": t, "wu_ptr": t,
                                   "hg_ptr": "*fp32", "D": "i32", "F": "i32", "K": "i32"},
                   "grid = (N*K, ceil(F/BLOCK_F))", per_token),
            "down": (mk.down_kernel, {"hg_ptr": "*fp32", "idx_ptr": "*i32", "wd_ptr": t, "y_ptr": t,
                                       "D": "i32", "F": "i32", "K": "i32"}, "grid = (N, ceil(D/BLOCK_D))", per_token),
            "up_grouped": (mk.up_grouped_kernel, {"x_ptr": t, **tiles, "gate_ptr": t, "wg_ptr": t, "wu_ptr": t,
                                            "hg_ptr": "*fp32", "D": "i32", "F": "i32", "K": "i32"},
                           "grid = (tiles, ceil(F/BLOCK_F)); tiles from expert_tiles()", grouped),
            "down_grouped": (mk.down_grouped_kernel, {"hg_ptr": "*fp32", **tiles, "wd_ptr": t, "yp_ptr": "*fp32",
                                                "D": "i32", "F": "i32"},
                             "grid = (tiles, ceil(D/BLOCK_D)); y = yp.view(N, K, D).sum(1)", grouped),
            "fused": (mk.fused_kernel, fused_signature(t), "grid = (N, ceil(D/BLOCK_DY)); the TensorRT AOT plugin's kernel",
                      fused_constexprs()),
        }
        for name, (kernel, sig, grid, consts) in sigs.items():
            src = _source(kernel, sig, consts)
            for cc in targets:
                compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32))
                stem = f"moe_{name}_{dt}_sm{cc}"
                files = {}
                for ext in ("ptx", "cubin"):
                    data = compiled.asm[ext]
                    data = data.encode() if isinstance(data, str) else data
                    (out_dir / f"{stem}.{ext}").write_bytes(data)
                    files[ext] = {"file": f"{stem}.{ext}", "sha256": hashlib.sha256(data).hexdigest()}
                md = compiled.metadata
                entries.append({"kernel": name, "dtype": dt, "sm": cc, "entry": md.name, "grid": grid,
                                "num_warps": md.num_warps, "shared_bytes": md.shared, "constexprs": consts,
                                "signature": sig, **files})
    index = {"kernels": entries, "triton": triton.__version__}
    (out_dir / "kernels.json").write_text(json.dumps(index, indent=2) + "\n")
    return index
