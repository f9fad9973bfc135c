"""A Triton Inference Server model repository for an artifact, and tritonserver started on it.

    REPO/NAME/config.pbtxt      Python backend, decoupled, generate-extension tensors
    REPO/NAME/1/model.py        serving/triton_model.py: the batching engine per instance
    REPO/NAME/1/artifact/       the artifact, copied (--copy), or referenced by absolute path

tritonserver itself comes from NVIDIA's container (`/opt/tritonserver`) or, on a machine
without it, from the `nvidia-pytriton` wheel, which ships tritonserver and its Python backend
(`find_tritonserver`); `triton_command` assembles the backend directory (the stub for the
running Python next to libtriton_python.so) and the environment it needs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import subprocess
from dataclasses import dataclass
from pathlib import Path

from mythos_deploy.errors import CheckpointError, InputError, MissingDependencyError
from mythos_deploy.manifest import Manifest, check_manifest_version, sha256_file, verify_files

MODEL_PY = Path(__file__).with_name("triton_model.py")
_NAME_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


def config_pbtxt(name: str, instances: int, params: dict[str, str]) -> str:
    def tensor(n, dt, dims, optional=True):
        return (f'  {{ name: "{n}" data_type: {dt} dims: [ {dims} ]'
                f'{" optional: true" if optional else ""} }}')
    inputs = [tensor("text_input", "TYPE_STRING", "1", optional=False), tensor("max_tokens", "TYPE_INT32", "1"),
              tensor("stream", "TYPE_BOOL", "1"), tensor("temperature", "TYPE_FP32", "1"),
              tensor("top_p", "TYPE_FP32", "1"), tensor("seed", "TYPE_UINT64", "1"), tensor("stop", "TYPE_STRING", "-1")]
    parameters = "\n".join(f'parameters: {{ key: "{k}" value: {{ string_value: {json.dumps(v)} }} }}'
                           for k, v in params.items())
    return (f'name: "{name}"\nbackend: "python"\nmax_batch_size: 0\n'
            "model_transaction_policy { decoupled: true }\n"
            "input [\n" + ",\n".join(inputs) + "\n]\n"
            'output [\n  { name: "text_output" data_type: TYPE_STRING dims: [ -1 ] }\n]\n'
            f"instance_group [ {{ count: {instances} kind: KIND_CPU }} ]\n{parameters}\n")


def write_repo(artifact: Path, repo: Path, name: str, instances: int = 1, max_batch: int = 8,
               max_len: int | None = None, chunk: int = 64, exit: str = "none", copy: bool = False,
               force: bool = False) -> Path:
    """Write REPO/NAME for `artifact` (checked first: its manifest version and every sha256).
    Nothing is left half-written: the model directory is built beside its place, then moved."""
    artifact = Path(artifact).resolve()
    if not artifact.is_dir():
        raise CheckpointError(f"artifact directory not found: {artifact}")
    if not name or set(name) - _NAME_OK:
        raise InputError(f"--name must be letters, digits, '_', '-' or '.', got {name!r}")
    if not 1 <= instances <= 64:
        raise InputError(f"--instances must be in 1..64, got {instances}")
    manifest = Manifest.read(artifact)
    check_manifest_version(manifest, artifact)
    verify_files(artifact, manifest)
    if not (artifact / "tokenizer.json").is_file():
        raise InputError(f"{artifact} carries no tokenizer.json: Triton's text_input needs one")
    from mythos_deploy.config import MythosConfig
    cfg = MythosConfig.from_dict(manifest.config if manifest.kind != "checkpoint" else
                                 json.loads((artifact / "config.json").read_text()))
    length = max_len or min(cfg.max_seq_len, 2048)
    if not 2 <= length <= cfg.max_seq_len:
        raise InputError(f"--max-len must be in [2, max_seq_len={cfg.max_seq_len}], got {length}")
    dest = Path(repo) / name
    if dest.exists() and not force:
        raise InputError(f"{dest} exists; pass --force to replace it")
    tmp = Path(repo) / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (tmp / "1").mkdir(parents=True)
        shutil.copyfile(MODEL_PY, tmp / "1" / "model.py")
        if copy:
            shutil.copytree(artifact, tmp / "1" / "artifact")
        params = {"artifact": "artifact" if copy else str(artifact),
                  "manifest_sha256": sha256_file(artifact / "manifest.json"),
                  "max_batch": str(max_batch), "max_len": str(length), "chunk": str(chunk), "exit": str(exit)}
        (tmp / "config.pbtxt").write_text(config_pbtxt(name, instances, params))
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


@dataclass(frozen=True)
class TritonDist:
    binary: Path
    python_backend: Path  # directory with libtriton_python.so
    stub: Path | None  # triton_python_backend_stub for this Python (None: the backend has its own)
    libs: Path | None  # shared libraries the binary needs (the wheel's)


def find_tritonserver() -> TritonDist:
    """NVIDIA's container first (/opt/tritonserver), else the nvidia-pytriton wheel's copy."""
    opt = Path("/opt/tritonserver")
    if (opt / "bin" / "tritonserver").is_file():
        return TritonDist(opt / "bin" / "tritonserver", opt / "backends" / "python", None, None)
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError("tritonserver not found: run inside NVIDIA's Triton container, or "
                                     "pip install nvidia-pytriton (it ships tritonserver and its Python backend)")
    root = Path(spec.submodule_search_locations[0])
    dist = root / "tritonserver"
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise MissingDependencyError(f"nvidia-pytriton has no Python backend stub for Python {version}")
    return TritonDist(dist / "bin" / "tritonserver", dist / "backends" / "python", stub,
                      root.parent / "nvidia_pytriton.libs")


def check_python_env(env_dir: Path, dist: TritonDist) -> Path:
    """The Python environment whose interpreter the backend stub runs model.py with: it must
    import mythos_deploy, and (for the nvidia-pytriton wheel's stub, built against NumPy 1.x)
    hold numpy < 2, which `make install` puts in .venv-triton. Returns its bin directory."""
    bin_dir = Path(env_dir) / "bin"
    py = bin_dir / "python"
    if not py.is_file():
        raise InputError(f"--python-env {env_dir}: no bin/python there")
    probe = subprocess.run([str(py), "-c", "import numpy, mythos_deploy.runtimes.engine; print(numpy.__version__)"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        raise InputError(f"--python-env {env_dir} cannot import mythos_deploy ({last}); pip install mythos-deploy there")
    if dist.stub is not None and int(probe.stdout.strip().split(".")[0]) >= 2:
        raise InputError(f"--python-env {env_dir} has numpy {probe.stdout.strip()}; the Python backend stub of "
                         "nvidia-pytriton is built against NumPy 1.x and corrupts BYTES tensors under NumPy 2: "
                         "use an environment with numpy<2 (make install makes .venv-triton)")
    return bin_dir


def triton_command(repo: Path, workdir: Path, http_port: int, grpc_port: int, metrics_port: int,
                   python_bin: Path | None = None, dist: TritonDist | None = None,
                   exit_timeout: int = 10) -> tuple[list[str], dict[str, str]]:
    """The tritonserver command line and environment for `repo`; the backend directory is
    assembled under `workdir` (the wheel's backend with the stub for this Python). The stub
    runs model.py with the interpreter first on PATH: `python_bin`'s."""
    dist = dist or find_tritonserver()
    backends = workdir / "backends"
    if dist.stub is not None:
        py = backends / "python"
        py.mkdir(parents=True, exist_ok=True)
        for f in dist.python_backend.iterdir():
            if f.is_file():
                shutil.copy2(f, py / f.name)
        shutil.copy2(dist.stub, py / "triton_python_backend_stub")
    else:
        backends = dist.python_backend.parent
    env = dict(os.environ)
    if dist.libs is not None:
        env["LD_LIBRARY_PATH"] = ":".join(p for p in (str(dist.libs), env.get("LD_LIBRARY_PATH")) if p)
    env["PATH"] = f"{python_bin or Path(sys.executable).parent}:{env.get('PATH', '')}"
    env.pop("PYTHONPATH", None)
    cmd = [str(dist.binary), f"--model-repository={Path(repo).resolve()}", f"--backend-directory={backends}",
           f"--http-port={http_port}", f"--grpc-port={grpc_port}", f"--metrics-port={metrics_port}",
           "--exit-on-error=true", "--log-verbose=0", f"--exit-timeout-secs={exit_timeout}"]
    return cmd, env
