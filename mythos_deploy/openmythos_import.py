"""Import OpenMythos 0.5.0 weights: from a live `open_mythos.OpenMythos` or a weights file.

Name mapping (explicit; everything else is identical by construction):
  recurrent.block.ffn.routed_experts.{e}.{gate,up,down}.weight -> stacked
  recurrent.block.ffn.experts_{gate,up,down}[e]
  freqs_cis, freqs_cis_mla (complex RoPE buffers) -> dropped (rebuilt as real tables)
  head.weight -> dropped (tied to embed.weight)
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import torch

from mythos_deploy.checkpoint import model_from_state, read_weights_file
from mythos_deploy.config import MythosConfig
from mythos_deploy.errors import CheckpointError
from mythos_deploy.model import MythosModel

_EXPERT = re.compile(r"^recurrent\.block\.ffn\.routed_experts\.(\d+)\.(gate|up|down)\.weight$")
_DROP = {"freqs_cis", "freqs_cis_mla"}


def convert_state_dict(cfg: MythosConfig, om_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, torch.Tensor]] = {"gate": {}, "up": {}, "down": {}}
    for name, tensor in om_state.items():
        if name in _DROP:
            continue
        m = _EXPERT.match(name)
        if m:
            experts[m.group(2)][int(m.group(1))] = tensor
        else:
            out[name] = tensor
    for part, found in experts.items():
        missing = sorted(set(range(cfg.n_experts)) - set(found))
        extra = sorted(set(found) - set(range(cfg.n_experts)))
        if missing or extra:
            raise CheckpointError(
                f"routed expert '{part}' weights: missing experts {missing[:8]}, unexpected {extra[:8]} "
                f"(config has n_experts={cfg.n_experts})")
        shapes = {tuple(t.shape) for t in found.values()}
        if len(shapes) != 1:
            raise CheckpointError(f"routed expert '{part}' weights have differing shapes: {sorted(shapes)}")
        out[f"recurrent.block.ffn.experts_{part}"] = torch.stack([found[e] for e in range(cfg.n_experts)])
    return out


def config_from_openmythos(om_cfg: Any) -> MythosConfig:
    data = dataclasses.asdict(om_cfg) if dataclasses.is_dataclass(om_cfg) else dict(om_cfg)
    return MythosConfig.from_dict(data)


def from_openmythos(om_model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> MythosModel:
    """Convert a live OpenMythos model object (weights are copied)."""
    cfg = config_from_openmythos(om_model.cfg)
    state = {k: v.detach().clone() for k, v in om_model.state_dict().items()}
    return model_from_state(cfg, convert_state_dict(cfg, state), "OpenMythos model", dtype)


def from_openmythos_file(weights: str | Path, config: str | Path | None = None,
                         dtype: torch.dtype = torch.float32) -> MythosModel:
    """Convert OpenMythos weights saved as .safetensors or a torch state dict, plus its config
    (a JSON file of MythosConfig fields; defaults to config.json beside the weights)."""
    weights = Path(weights)
    if not weights.is_file():
        raise CheckpointError(f"weights file not found: {weights}")
    config = Path(config) if config is not None else weights.parent / "config.json"
    if not config.is_file():
        raise CheckpointError(f"no config for {weights}: pass --config FILE (looked for {config})")
    cfg = MythosConfig.load(config)
    state = read_weights_file(weights)
    return model_from_state(cfg, convert_state_dict(cfg, state), str(weights), dtype)
