"""Open an artifact directory as a Backend, chosen from its manifest (or forced)."""

from __future__ import annotations

from pathlib import Path

from mythos_deploy.errors import CheckpointError, InputError
from mythos_deploy.manifest import Manifest, check_manifest_version, verify_files
from mythos_deploy.options import BackendName, MoeLowering, Provider, QuantMode, WeightDtype, choose
from mythos_deploy.runtimes.base import Backend

PROVIDERS = {Provider.CPU: ["CPUExecutionProvider"], Provider.CUDA: ["CUDAExecutionProvider", "CPUExecutionProvider"]}


def load(path: str | Path, backend: BackendName | str = BackendName.AUTO, provider: Provider | str = Provider.CPU,
         threads: int = 0, verify: bool = True, dtype: WeightDtype | str = WeightDtype.FP32) -> Backend:
    """A checkpoint directory opens with the eager backend, an ONNX directory with
    onnxruntime, an engine directory with TensorRT. `verify` checks the manifest's version
    and every file's sha256. The backend carries the artifact's tokenizer (`.tokenizer`)."""
    opened = _open(path, backend, provider, threads, verify, dtype)
    opened.artifact_dir = Path(path)
    return opened


def _open(path, backend, provider, threads, verify, dtype) -> Backend:
    path = Path(path)
    backend = choose(BackendName, backend, "backend")
    provider = choose(Provider, provider, "provider")
    dtype = choose(WeightDtype, dtype, "dtype")
    if not path.is_dir():
        raise CheckpointError(f"artifact directory not found: {path}")
    manifest = Manifest.read(path)
    if verify:
        check_manifest_version(manifest.data, path)
        verify_files(path, manifest.data)
    kind = manifest.kind
    if backend == BackendName.TENSORRT and kind != "tensorrt":
        raise InputError(f"{path} is a {kind!r} artifact; build TensorRT engines first: mythos-export build {path} -o OUT")
    if dtype != WeightDtype.FP32 and kind != "checkpoint":
        raise InputError(f"--dtype applies to checkpoints; {path} was exported as {manifest.options.dtype}")
    if kind == "checkpoint":
        if backend == BackendName.ONNXRUNTIME:
            raise InputError(f"{path} is a checkpoint; export it first: mythos-export onnx {path} -o OUT")
        from mythos_deploy.checkpoint import load_checkpoint
        from mythos_deploy.runtimes.eager import EagerBackend
        device = "cuda" if provider == Provider.CUDA else "cpu"
        if device == "cuda":  # the torch-on-CUDA path: MoE through the Triton kernel when installed
            from mythos_deploy.moe import use_triton_kernel
            use_triton_kernel()
        return EagerBackend(load_checkpoint(path, dtype=str(dtype), device=device, verify=False))
    if kind == "onnx":
        if backend == BackendName.EAGER:
            raise InputError(f"{path} is an ONNX artifact; the eager backend needs its checkpoint "
                             f"({manifest.source.get('checkpoint', '?')})")
        if manifest.options.moe == MoeLowering.PLUGIN:
            raise InputError(f"{path} uses the TensorRT MythosMoE plugin, which onnxruntime cannot run; "
                             "build a TensorRT engine from it or re-export with --moe standard or --moe ort")
        if manifest.quant_mode == QuantMode.QDQ_INT4:
            raise InputError(f"{path} holds TensorRT int4 weights (trt::TRT_INT4DequantizeLinear), which onnxruntime "
                             "cannot run; build a TensorRT engine from it, or quantize with --mode int4 for onnxruntime")
        from mythos_deploy.runtimes.onnxruntime_backend import OrtBackend
        return OrtBackend(path, manifest, PROVIDERS[provider], threads)
    if kind == "tensorrt":
        if backend not in (BackendName.AUTO, BackendName.TENSORRT):
            raise InputError(f"{path} holds TensorRT engines; only the tensorrt backend runs them")
        from mythos_deploy.runtimes.tensorrt_backend import TensorRTBackend
        return TensorRTBackend(path, manifest)
    raise CheckpointError(f"{path}: unsupported artifact kind {kind!r}")
