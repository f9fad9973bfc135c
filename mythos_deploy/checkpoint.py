"""Checkpoint directories: config.json + model.safetensors (+ tokenizer files) + manifest.json.

Weights are read without pickle: safetensors, or a torch file through `weights_only=True`.
Shapes are checked against the config before anything is assigned.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from mythos_deploy.config import MythosConfig
from mythos_deploy.errors import MythosError, CheckpointError, ConfigError
from mythos_deploy.manifest import atomic_output_dir, read_manifest, sha256_file, verify_files, write_manifest
from mythos_deploy.model import MythosModel

CONFIG, WEIGHTS = "config.json", "model.safetensors"
TIED = "head.weight"  # tied to embed.weight; never stored
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _torch_load_reason(exc: Exception) -> str:
    """The cause inside torch.load's error, without its advice to retry with
    weights_only=False (which would run the file's pickled code)."""
    text = str(exc).replace("\x1b[1m", "").replace("\x1b[0m", "")
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return (f"it holds a Python object ({found.group(1)}), not only tensors; "
                "save a plain state dict or .safetensors")
    boilerplate = ("weights_only", "Weights only load failed", "trusted source", "Check the documentation",
                   "Please file an issue", "load it", "two options")
    lines = [ln.replace("WeightsUnpickler error:", "").strip() for ln in text.splitlines()
             if not any(b in ln for b in boilerplate)]
    lines = [ln for ln in lines if ln]
    if not lines:
        return type(exc).__name__
    if "Unsupported operand" in lines[0] or "load key" in lines[0]:
        return f"not a torch tensor file ({lines[0]})"
    return re.split(r"(?<=\.)\s", lines[0], maxsplit=1)[0][:200]


def read_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a flat name -> tensor dict from .safetensors or a torch file, never via pickle."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from None
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise CheckpointError(f"{path} cannot be loaded safely (weights_only=True; no pickled code is "
                              f"ever run): {_torch_load_reason(exc)}") from None
    if isinstance(data, dict) and "state_dict" in data and isinstance(data["state_dict"], dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{path} does not hold a flat state dict of tensors")
    return data


def expected_shapes(cfg: MythosConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = MythosModel(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    shapes.pop(TIED)
    return shapes


def _all_finite(t: torch.Tensor, chunk: int = 1 << 22) -> bool:
    """torch.isfinite in slices: on a whole 1 GB expert table it allocates 1.4 GB of temporaries."""
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(flat[i:i + chunk]).all()) for i in range(0, flat.numel(), chunk))


def check_state_dict(cfg: MythosConfig, state: dict[str, torch.Tensor], source: str) -> None:
    want = expected_shapes(cfg)
    problems = [f"missing {k}" for k in want if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in want and k != TIED]
    problems += [f"{k}: file has {tuple(state[k].shape)}, config needs {want[k]}"
                 for k in want if k in state and tuple(state[k].shape) != want[k]]
    if TIED in state and "embed.weight" in state and not torch.equal(state[TIED], state["embed.weight"]):
        problems.append("head.weight differs from embed.weight (the model ties them)")
    if problems:
        shown = "; ".join(problems[:8]) + (f"; ... {len(problems) - 8} more" if len(problems) > 8 else "")
        raise CheckpointError(f"{source} does not match the config: {shown}")
    bad = [k for k, v in state.items() if v.is_floating_point() and not _all_finite(v)]
    if bad:
        raise CheckpointError(f"{source} has NaN/Inf values in: {', '.join(bad[:5])}")


def model_from_state(cfg: MythosConfig, state: dict[str, torch.Tensor], source: str,
                     dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> MythosModel:
    check_state_dict(cfg, state, source)
    with torch.device("meta"):
        model = MythosModel(cfg)
    state = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
             for k, v in state.items() if k != TIED}
    model.load_state_dict(state, strict=False, assign=True)
    model.head.weight = model.embed.weight
    model.build_rope()
    return model.eval()


def save_checkpoint(model: MythosModel, out_dir: str | Path, overwrite: bool = False,
                    tokenizer: dict[str, str] | None = None, extra_files: dict[str, str] | None = None,
                    **provenance) -> Path:
    from safetensors.torch import save_file
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items() if k != TIED}
    with atomic_output_dir(out_dir, overwrite) as tmp:
        model.cfg.save(tmp / CONFIG)
        try:
            save_file(state, str(tmp / WEIGHTS))
        except Exception as exc:  # safetensors wraps OSError (disk full, EFBIG) in SafetensorError
            if type(exc).__name__ != "SafetensorError":
                raise
            raise MythosError(f"failed writing {out_dir}/{WEIGHTS}: {str(exc).strip()}") from None
        for name, text in {**(tokenizer or {}), **(extra_files or {})}.items():  # tokenizer: file name -> text
            (tmp / name).write_text(text, encoding="utf-8")
        write_manifest(tmp, "checkpoint", config=model.cfg.to_dict(), **provenance)
    return Path(out_dir)


def load_config(ckpt_dir: str | Path) -> MythosConfig:
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {ckpt_dir}")
    if not (ckpt_dir / CONFIG).is_file():
        raise CheckpointError(f"{ckpt_dir} has no {CONFIG}")
    try:
        return MythosConfig.load(ckpt_dir / CONFIG)
    except ConfigError as exc:
        raise CheckpointError(f"{ckpt_dir / CONFIG}: {exc}") from None


def load_checkpoint(ckpt_dir: str | Path, dtype: str | torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", verify: bool = True) -> MythosModel:
    ckpt_dir = Path(ckpt_dir)
    cfg = load_config(ckpt_dir)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise CheckpointError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    from mythos_deploy.stats import check_fits
    try:
        check_fits(cfg, torch.finfo(dtype).bits // 8, f"{ckpt_dir}/{CONFIG}")
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    if verify and (ckpt_dir / "manifest.json").exists():
        verify_files(ckpt_dir, read_manifest(ckpt_dir))
    state = read_weights_file(ckpt_dir / WEIGHTS)
    return model_from_state(cfg, state, str(ckpt_dir / WEIGHTS), dtype, device)


def checkpoint_sha256(ckpt_dir: str | Path) -> str:
    return sha256_file(Path(ckpt_dir) / WEIGHTS)
