import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from mythos_deploy import CheckpointError, MythosConfig, MythosError, from_openmythos, from_openmythos_file, load_checkpoint, save_checkpoint
from mythos_deploy.checkpoint import read_weights_file
from mythos_deploy.manifest import atomic_output_dir, read_manifest
from mythos_deploy.openmythos_import import convert_state_dict
from oracle import make_openmythos


def test_roundtrip_is_exact_and_tied(tiny_ckpt, tiny_model):
    loaded = load_checkpoint(tiny_ckpt)
    assert loaded.head.weight is loaded.embed.weight
    assert "head.weight" not in load_file(str(tiny_ckpt / "model.safetensors"))
    saved, back = tiny_model.state_dict(), loaded.state_dict()
    assert saved.keys() == back.keys() and all(torch.equal(saved[k], back[k]) for k in saved)  # bit for bit
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # the loaded tensors are memory-mapped at the file's (unaligned) offsets, so a SIMD kernel
        # may sum in another order: equal up to float32 rounding, not bit for bit
        torch.testing.assert_close(loaded(ids).logits, tiny_model(ids).logits, rtol=0, atol=1e-6)
    manifest = read_manifest(tiny_ckpt)
    assert manifest["kind"] == "checkpoint"
    assert set(manifest["files"]) == {"config.json", "model.safetensors", "tokenizer.json"}


def test_load_in_half_precision(tiny_ckpt):
    m = load_checkpoint(tiny_ckpt, dtype="bf16")
    assert m.embed.weight.dtype == torch.bfloat16 and m.rope_cos.dtype == torch.float32
    with pytest.raises(CheckpointError, match="unknown dtype"):
        load_checkpoint(tiny_ckpt, dtype="fp8")


def _rewrite(ckpt, fn):
    state = load_file(str(ckpt / "model.safetensors"))
    fn(state)
    save_file(state, str(ckpt / "model.safetensors"))


def test_shape_mismatch_lists_every_problem(tiny_ckpt):
    def damage(state):
        state["embed.weight"] = state["embed.weight"][:100]
        del state["norm.weight"]
        state["extra.weight"] = torch.zeros(1)
    _rewrite(tiny_ckpt, damage)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(tiny_ckpt, verify=False)
    msg = str(exc.value)
    assert "missing norm.weight" in msg and "unexpected extra.weight" in msg
    assert "embed.weight: file has (100, 64), config needs (256, 64)" in msg


def test_tampered_file_fails_manifest_check(tiny_ckpt):
    _rewrite(tiny_ckpt, lambda s: s["norm.weight"].mul_(2))
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        load_checkpoint(tiny_ckpt)
    load_checkpoint(tiny_ckpt, verify=False)  # explicit override still loads


def test_nan_weights_are_refused(tiny_ckpt):
    _rewrite(tiny_ckpt, lambda s: s["norm.weight"].fill_(float("nan")))
    with pytest.raises(CheckpointError, match="NaN"):
        load_checkpoint(tiny_ckpt, verify=False)


def test_corrupt_and_missing_files(tiny_ckpt, tmp_path):
    (tiny_ckpt / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="safetensors"):
        load_checkpoint(tiny_ckpt, verify=False)
    (tiny_ckpt / "config.json").write_text('{"dim": 65}')
    with pytest.raises(CheckpointError, match="dim"):
        load_checkpoint(tiny_ckpt)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(tmp_path / "empty")


def test_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_output_dir(target) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    with atomic_output_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(MythosError, match="already exists"):
        with atomic_output_dir(target):
            pass
    with atomic_output_dir(target, overwrite=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(os.listdir(target)) == ["b"] and sorted(os.listdir(tmp_path)) == ["out"]


@pytest.mark.parametrize("attn", ["mla", "gqa"])
def test_import_from_files(tmp_path, attn):
    cfg = MythosConfig.from_name("tiny").replace(attn_type=attn)
    om = make_openmythos(cfg.to_dict(), seed=11)
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    torch.save(om.state_dict(), tmp_path / "om.pt")
    sd = {k: v.contiguous() for k, v in om.state_dict().items() if not k.startswith("freqs") and k != "head.weight"}
    save_file(sd, str(tmp_path / "om.safetensors"))
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = om(ids)
        for name in ("om.pt", "om.safetensors"):
            model = from_openmythos_file(tmp_path / name)
            torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=1e-5)


def test_pickled_objects_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))
    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    (tmp_path / "config.json").write_text(json.dumps(MythosConfig.from_name("tiny").to_dict()))
    with pytest.raises(CheckpointError, match="weights_only") as info:
        from_openmythos_file(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()
    # the cause, and never torch's advice to retry with weights_only=False
    assert "Python object (posix.system)" in str(info.value) or "Python object (nt.system)" in str(info.value)
    assert "False" not in str(info.value) and "\n" not in str(info.value)
    (tmp_path / "junk.pt").write_bytes(b"not a torch file at all\n" * 4)
    with pytest.raises(CheckpointError, match="not a torch tensor file") as info:
        read_weights_file(tmp_path / "junk.pt")
    assert "False" not in str(info.value)


def test_import_errors_name_what_is_wrong(tmp_path):
    cfg = MythosConfig.from_name("tiny")
    om = make_openmythos(cfg.to_dict())
    state = om.state_dict()
    del state["recurrent.block.ffn.routed_experts.2.up.weight"]
    with pytest.raises(CheckpointError, match="missing experts \\[2\\]"):
        convert_state_dict(cfg, state)
    torch.save(om.state_dict(), tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match="--config"):
        from_openmythos_file(tmp_path / "w.pt")
    wrong = cfg.replace(dim=32, n_heads=2, n_kv_heads=1)
    (tmp_path / "config.json").write_text(json.dumps(wrong.to_dict()))
    with pytest.raises(CheckpointError, match="does not match the config"):
        from_openmythos_file(tmp_path / "w.pt")


def test_saved_import_roundtrips(tmp_path):
    om = make_openmythos(MythosConfig.from_name("tiny").to_dict(), seed=5)
    save_checkpoint(from_openmythos(om), tmp_path / "ck")
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        torch.testing.assert_close(load_checkpoint(tmp_path / "ck")(ids).logits, om(ids), rtol=0, atol=1e-5)
