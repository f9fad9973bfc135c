"""Load OpenMythos 0.5.0's model module as a test oracle without its package __init__
(which imports transformers for the tokenizer)."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch


def load_openmythos_main():
    if "open_mythos_main_oracle" in sys.modules:
        return sys.modules["open_mythos_main_oracle"]
    spec = importlib.util.find_spec("open_mythos")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open-mythos==0.5.0 not installed (make install adds it with --no-deps)")
    path = f"{list(spec.submodule_search_locations)[0]}/main.py"
    mod_spec = importlib.util.spec_from_file_location("open_mythos_main_oracle", path)
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules["open_mythos_main_oracle"] = module
    mod_spec.loader.exec_module(module)
    return module


def make_openmythos(cfg_dict: dict, seed: int = 0, spread_halting: bool = True,
                    halt: tuple[float, float] = (-1.5, 0.3)):
    """A random OpenMythos model. With spread_halting, the halting head (bias, weight std =
    `halt`) is set so positions halt at different loops (some never), exercising every ACT
    branch; the router bias is made nonzero so selection and gating differ."""
    om = load_openmythos_main()
    torch.manual_seed(seed)
    model = om.OpenMythos(om.MythosConfig(**cfg_dict)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("injection.B"):
                p.add_(torch.randn_like(p) * 0.1)
            if name.endswith("injection.log_A"):
                p.copy_(torch.randn_like(p))
        if spread_halting:
            model.recurrent.act.halt.weight.normal_(0, halt[1])
            model.recurrent.act.halt.bias.fill_(halt[0])
        model.recurrent.block.ffn.router_bias.copy_(torch.randn(cfg_dict["n_experts"]) * 0.01)
        model.recurrent.lora.scale.weight.normal_(0, 1.0)
    return model
