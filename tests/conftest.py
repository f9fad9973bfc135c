import os
from pathlib import Path

import pytest
import torch

from mythos_deploy import MythosConfig, MythosModel

# `make test` runs two pytest-xdist workers on the 2-core machine: one thread each, torch and
# onnxruntime (its idle pool threads spin, which two workers cannot afford)
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("MYTHOS_ORT_THREADS", "1")
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


@pytest.fixture(scope="session")
def tiny_cfg() -> MythosConfig:
    return MythosConfig.from_name("tiny")


@pytest.fixture(scope="session")
def tiny_model(tiny_cfg) -> MythosModel:
    return MythosModel(tiny_cfg).init_weights(seed=0).eval()


@pytest.fixture
def tiny_ckpt(tmp_path, tiny_model):
    from mythos_deploy import save_checkpoint
    from mythos_deploy.tokenizer import ByteTokenizer
    path = tmp_path / "tiny"
    save_checkpoint(tiny_model, path, tokenizer=ByteTokenizer().files())
    return path


@pytest.fixture(scope="session")
def om_pair():
    """OpenMythos models (mla, gqa) with spread halting, and their imported reference models."""
    from mythos_deploy import from_openmythos
    from oracle import make_openmythos
    pairs = {}
    for attn in ("mla", "gqa"):
        cfg = MythosConfig.from_name("tiny").replace(attn_type=attn)
        om = make_openmythos(cfg.to_dict(), seed=7)
        pairs[attn] = (om, from_openmythos(om))
    return pairs


@pytest.fixture(scope="session")
def stepped_fp32(om_pair):
    """One torch export per attention type; every loop mode and lowering is built from it."""
    from mythos_deploy.exporters.onnx_export import OnnxExportOptions, export_form
    from mythos_deploy.exporters.torch_to_onnx import export_stepped
    opts = OnnxExportOptions()  # the default export form (absorbed MLA)
    return {attn: export_stepped(export_form(model, opts), "fp32", 18) for attn, (_, model) in om_pair.items()}


@pytest.fixture(scope="session")
def artifacts(om_pair, stepped_fp32, tmp_path_factory):
    """Artifact directories: {(attn, loop): (checkpoint_dir, onnx_dir)} (standard MoE lowering)."""
    from mythos_deploy.exporters.onnx_export import OnnxExportOptions, export_onnx
    from mythos_deploy import save_checkpoint
    from mythos_deploy.tokenizer import ByteTokenizer
    root = tmp_path_factory.mktemp("artifacts")
    out = {}
    for attn, (_, model) in om_pair.items():
        ck = root / f"ck-{attn}"
        save_checkpoint(model, ck, tokenizer=ByteTokenizer().files())
        for loop in ("unroll", "loop", "stepped"):
            od = root / f"onnx-{attn}-{loop}"
            export_onnx(ck, od, OnnxExportOptions(loop=loop, validate=False), stepped=stepped_fp32[attn])
            out[(attn, loop)] = (ck, od)
    return out


@pytest.fixture(scope="session")
def masked_artifacts(artifacts, stepped_fp32, tmp_path_factory):
    """`artifacts` exported with --past masked (whole buffers, static shapes): what the
    TensorRT build and backend take. Same keys."""
    from mythos_deploy.exporters.onnx_export import OnnxExportOptions, export_onnx
    root = tmp_path_factory.mktemp("masked")
    out = {}
    for (attn, loop), (ck, _) in artifacts.items():
        od = root / f"onnx-{attn}-{loop}"
        export_onnx(ck, od, OnnxExportOptions(loop=loop, validate=False, past="masked"), stepped=stepped_fp32[attn])
        out[(attn, loop)] = (ck, od)
    return out


DEMO_CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "hops"


@pytest.fixture(scope="session")
def demo_checkpoint() -> Path:
    """The shipped, trained demo checkpoint (committed)."""
    assert (DEMO_CHECKPOINT / "model.safetensors").is_file(), f"the demo checkpoint is missing from {DEMO_CHECKPOINT}"
    return DEMO_CHECKPOINT


@pytest.fixture(scope="session")
def demo_exports(demo_checkpoint, tmp_path_factory):
    """The shipped demo checkpoint exported as an ONNX Loop and unrolled, from one torch
    export: {"loop": dir, "unroll": dir, "unroll-plugin": dir (the TensorRT plugin lowering)}."""
    pytest.importorskip("onnxruntime")
    from mythos_deploy.exporters.onnx_export import OnnxExportOptions, export_form, export_onnx
    from mythos_deploy.exporters.torch_to_onnx import export_stepped
    from mythos_deploy import load_checkpoint
    stepped = export_stepped(export_form(load_checkpoint(demo_checkpoint), OnnxExportOptions()), "fp32", 18)
    root = tmp_path_factory.mktemp("hops")
    out = {}
    for loop in ("loop", "unroll"):
        out[loop] = root / loop
        export_onnx(demo_checkpoint, out[loop], OnnxExportOptions(loop=loop, validate=False), stepped=stepped)
    out["unroll-plugin"] = root / "unroll-plugin"
    export_onnx(demo_checkpoint, out["unroll-plugin"], OnnxExportOptions(loop="unroll", moe="plugin", validate=False),
                stepped=stepped)
    return out


@pytest.fixture(scope="session")
def demo_qdq8(demo_exports, tmp_path_factory):
    """The demo checkpoint's unrolled plugin export quantized with qdq-int8 (1 calibration prompt)."""
    from mythos_deploy.exporters.quantize import QuantizeOptions, quantize_artifact
    out = tmp_path_factory.mktemp("qdq8") / "q8"
    quantize_artifact(demo_exports["unroll-plugin"], out, QuantizeOptions(mode="qdq-int8", calib_prompts=1))
    return out
