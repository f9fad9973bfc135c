import json
import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from mythos_deploy import MythosConfig, load_checkpoint
from mythos_deploy.cli import app
from oracle import make_openmythos

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_init_generate_inspect(tmp_path):
    ck = tmp_path / "ck"
    r = run("init", "--preset", "tiny", "--set", "max_loop_iters=3", "--seed", "2", "-o", ck)
    assert r.exit_code == 0, r.output
    assert load_checkpoint(ck).cfg.max_loop_iters == 3
    r = run("generate", ck, "--prompt-ids", "1,2,3", "--max-new-tokens", "5", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(data["tokens"][0]) == 5 and len(data["loops_used"][0]) == 5
    assert len(data["decode_seconds"]) == 4
    r = run("generate", ck, "--prompt", "hi", "--max-new-tokens", "3", "--temperature", "0.7", "--seed", "1", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.strip().splitlines()[-1])["prompt"] == [[104, 105]]
    r = run("inspect", ck, "--json")
    report = json.loads(r.stdout)
    assert report["parameters"]["total"] == sum(p.numel() for p in load_checkpoint(ck).parameters())
    assert report["cache_bytes_per_token"]["slots"] == 5
    halting = report["halting"]
    assert halting["prompts"] == 4 and 0.0 <= halting["ill_conditioned_fraction"] <= halting["never_halted_fraction"] <= 1.0
    assert 1.0 <= halting["mean_loops_used"] <= 3
    r = run("inspect", ck)
    assert r.exit_code == 0 and "cache per token" in r.stdout and "ill-conditioned" in r.stdout
    r = run("generate", ck, "--prompt-ids", "1,2,3", "--max-new-tokens", "4", "--exit", "propagate", "--json")
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.stdout.strip().splitlines()[-1])["tokens"][0]) == 4


def test_inspect_huge_preset_without_allocating():
    r = run("inspect", "--preset", "1t", "--json")
    assert r.exit_code == 0
    assert json.loads(r.stdout)["parameters"]["total"] > 9e11


def test_import_openmythos_command(tmp_path):
    cfg = MythosConfig.from_name("tiny")
    om = make_openmythos(cfg.to_dict(), seed=1)
    torch.save(om.state_dict(), tmp_path / "om.pt")
    (tmp_path / "om.json").write_text(json.dumps(cfg.to_dict()))
    r = run("import-openmythos", tmp_path / "om.pt", "--config", tmp_path / "om.json", "-o", tmp_path / "ck")
    assert r.exit_code == 0, r.output
    ids = torch.tensor([[9, 8, 7]])
    with torch.no_grad():
        torch.testing.assert_close(load_checkpoint(tmp_path / "ck")(ids).logits, om(ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("args, match", [
    (["generate", "{ck}", "--prompt-ids", "1,2,999"], "out of range"),
    (["generate", "{ck}", "--prompt-ids", "1,x"], "comma-separated"),
    (["generate", "{ck}"], "give --prompt TEXT, --prompt-ids"),
    (["generate", "{ck}", "--prompt-ids", "1", "--greedy", "--temperature", "1"], "cannot be combined"),
    (["generate", "{ck}", "--prompt-ids", "1", "--loops", "0"], "n_loops"),
    (["generate", "{ck}", "--prompt-ids", ",".join(["1"] * 200)], "no room"),
    (["generate", "{tmp}/missing", "--prompt-ids", "1"], "not found"),
    (["init", "--preset", "huge", "-o", "{tmp}/x"], "unknown preset"),
    (["init", "--preset", "tiny", "--set", "n_experts_per_tok=9", "-o", "{tmp}/x"], "n_experts_per_tok"),
    (["init", "--preset", "tiny", "-o", "{ck}"], "already exists"),
    (["inspect"], "either"),
    (["import-openmythos", "{tmp}/nope.pt", "-o", "{tmp}/x"], "not found"),
])
def test_bad_input_exits_nonzero_with_one_line(tmp_path, tiny_ckpt, args, match):
    args = [a.format(ck=tiny_ckpt, tmp=tmp_path) for a in args]
    r = runner.invoke(app, args)
    assert r.exit_code != 0
    assert match in r.output
    assert "Traceback" not in r.output
    assert not (tmp_path / "x").exists()


def test_text_prompt_needs_a_tokenizer(tiny_ckpt):
    os.remove(tiny_ckpt / "tokenizer.json")
    r = run("generate", tiny_ckpt, "--prompt", "hi")
    assert r.exit_code != 0 and "tokenizer.json" in r.output


def test_console_script_help_and_error_exit(tmp_path):
    exe = [sys.executable, "-m", "mythos_deploy.cli"]
    for cmd in ([], ["init"], ["import-openmythos"], ["inspect"], ["generate"]):
        r = subprocess.run(exe + cmd + ["--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "Usage" in r.stdout, r.stderr
    r = subprocess.run(exe + ["generate", str(tmp_path), "--prompt-ids", "1"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr
    r = subprocess.run(exe + ["--debug", "generate", str(tmp_path), "--prompt-ids", "1"], capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_generate_and_parity_on_onnx_artifacts(artifacts):
    ck, od = artifacts[("mla", "stepped")]
    r = run("generate", od, "--prompt-ids", "1,2,3", "--max-new-tokens", "6", "--json", "--loops", "6", "--exit", "fill-forward")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout.strip().splitlines()[-1])
    assert data["backend"].startswith("onnxruntime[stepped") and len(data["tokens"][0]) == 6
    r = run("parity", ck, od, "--tokens", "6", "--prompts", "2", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["passed"]
    # fill-forward against exact at a strict tolerance on a model whose halting varies: the
    # command must report, and exit 4 if the difference exceeds the tolerance
    r = run("parity", od, od, "--exit-b", "fill-forward", "--loops", "8", "--tokens", "16", "--tolerance", "0")
    assert r.exit_code in (0, 4) and "greedy agreement" in r.output
    r = run("generate", od, "--prompt-ids", "1,999")
    assert r.exit_code == 2 and "out of range" in r.output
    r = run("inspect", od, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["artifact"]["options"]["loop"] == "stepped"


def test_generate_several_requests_through_the_engine(tmp_path, demo_exports):
    """Prompts of different lengths (flags and a JSONL file) run together; each request's
    tokens equal its solo run; a bad request fails alone, and the exit status says so."""
    od = demo_exports["loop"]
    prompts = ["k4;q7;mk;rm;cq;wr;?w", "a1;?a", "b2;cb;?c"]
    solo = []
    for p in prompts:
        r = run("generate", od, "--prompt", p, "--max-new-tokens", "3", "--stop-ids", "none", "--json")
        assert r.exit_code == 0, r.output
        solo.append(json.loads(r.stdout.strip().splitlines()[-1])["tokens"][0])
    reqs = tmp_path / "reqs.jsonl"
    reqs.write_text(json.dumps({"prompt": prompts[2], "id": "file"}) + "\n"
                    + json.dumps({"prompt_ids": [1, 99999]}) + "\n")
    r = run("generate", od, "--prompt", prompts[0], "--prompt", prompts[1], "--requests", reqs,
            "--max-new-tokens", "3", "--stop-ids", "none", "--max-batch", "2", "--json")
    assert r.exit_code == 2, r.output  # the out-of-range request
    rows = json.loads(r.stdout.strip().splitlines()[-1])["requests"]
    assert [row["tokens"] for row in rows[:3]] == solo and rows[2]["id"] == "file"
    assert rows[3]["finish_reason"] == "error" and "out of range" in rows[3]["error"]
    r = run("generate", od, "--requests", tmp_path / "missing.jsonl")
    assert r.exit_code == 2 and "cannot read the requests file" in r.output and "Traceback" not in r.output
