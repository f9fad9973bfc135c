import pytest

from exporters.torch_to_onnx import export_stepped
from mythos_deploy import MythosConfig, from_openmythos
from oracle import make_openmythos


@pytest.fixture(scope="session")
def om_pair():
    """OpenMythos models (mla, gqa) with spread halting, and their imported reference models."""
    pairs = {}
    for attn in ("mla", "gqa"):
        cfg = MythosConfig.from_name("tiny").replace(attn_type=attn)
        om = make_openmythos(cfg.to_dict(), seed=7)
        pairs[attn] = (om, from_openmythos(om))
    return pairs


@pytest.fixture(scope="session")
def stepped_fp32(om_pair):
    """One torch export per attention type; every loop mode and lowering is built from it."""
    return {attn: export_stepped(model, "fp32", 18) for attn, (_, model) in om_pair.items()}
