"""An export killed at any point leaves no artifact directory that looks complete, and a
re-run succeeds."""

import signal
import subprocess
import sys
import time

from mythos_deploy.manifest import read_manifest, verify_files


def test_sigkill_during_export_leaves_nothing_complete(tiny_ckpt, tmp_path):
    out = tmp_path / "onnx"
    cmd = [sys.executable, "-m", "mythos_deploy.cli", "onnx", str(tiny_ckpt), "-o", str(out), "--loop", "unroll",
           "--no-validate"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(6)  # inside the torch export (about 15 s on 2 cores)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".onnx.tmp-")]
    assert all(not (tmp_path / name / "manifest.json").exists() for name in leftovers)
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (out / "manifest.json").exists() and (out / "model.onnx").exists()


FULL_DISK = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
sys.argv = ["mythos-export"] + sys.argv[1:]
from mythos_deploy.cli import main
main()
"""


def _run_with_small_disk(args, cwd, env=None):
    import os
    return subprocess.run([sys.executable, "-c", FULL_DISK, *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def test_full_disk_gives_a_clear_error_and_leaves_nothing(tiny_ckpt, tmp_path):
    """A write that fails (a file-size limit stands in for a full disk) exits 2 with one line;
    neither the output nor a temporary sibling is left behind."""
    for args, name in ((["init", "--preset", "tiny", "-o", "ck"], "ck"),
                       (["onnx", str(tiny_ckpt), "-o", "ox", "--no-validate"], "ox"),
                       (["onnx", str(tiny_ckpt), "-o", "ox2"], "ox2")):  # fails in the validation scratch
        r = _run_with_small_disk(args, tmp_path)
        assert r.returncode == 2, (args, r.stderr[-2000:])
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert lines[-1].startswith("error:") and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert "too large" in r.stderr.lower()
        assert not (tmp_path / name).exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{name}.tmp-")]


def test_full_disk_during_an_external_data_export(tiny_ckpt, tmp_path):
    """The large-model path (weight store, then <graph>.onnx.data): a write past the limit is
    one line, and neither the artifact nor the scratch store is left behind."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = {"MYTHOS_EXTERNAL_DATA_BYTES": "2048", "MYTHOS_SCRATCH_DIR": str(scratch)}
    r = _run_with_small_disk(["onnx", str(tiny_ckpt), "-o", "ox", "--no-validate", "--loop", "loop"], tmp_path, env)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("error:") and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "ox").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".ox.tmp-")]
    assert list(scratch.iterdir()) == []


def test_a_second_writer_of_the_same_output_fails_at_once(tmp_path):
    from mythos_deploy.manifest import output_lock
    target = tmp_path / "ck"
    cmd = [sys.executable, "-m", "mythos_deploy.cli", "init", "--preset", "tiny", "-o", str(target)]
    with output_lock(target, tmp_path):  # another writer holds the output
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 2 and "another mythos-export is writing" in r.stderr, r.stderr
        assert not target.exists()
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (target / "manifest.json").exists() and not (tmp_path / ".ck.lock").exists()


def test_the_lock_is_exclusive_in_process_too(tmp_path):
    import pytest
    from mythos_deploy.errors import MythosError
    from mythos_deploy.manifest import atomic_output_dir
    with atomic_output_dir(tmp_path / "a") as tmp:
        (tmp / "x").write_text("1")
        with pytest.raises(MythosError, match="another mythos-export"):
            with atomic_output_dir(tmp_path / "a"):
                pass
    assert (tmp_path / "a" / "x").read_text() == "1"


def test_sigkill_during_quantize_leaves_nothing_complete(tiny_ckpt, tmp_path):
    from mythos_deploy.exporters.onnx_export import OnnxExportOptions, export_onnx
    ox, q = tmp_path / "ox", tmp_path / "q"
    export_onnx(tiny_ckpt, ox, OnnxExportOptions(loop="unroll", validate=False))
    cmd = [sys.executable, "-m", "mythos_deploy.cli", "quantize", str(ox), "-o", str(q), "--mode", "int8"]
    for delay in (2.0, 5.0):  # while importing / while quantizing or gating
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if (q / "manifest.json").exists():  # finished before the kill landed: complete, not partial
            verify_files(q, read_manifest(q))
        leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".q.tmp-")]
        assert all(not (p / "manifest.json").exists() for p in leftovers)
    if q.exists():  # a run finished before its kill: that is a complete artifact, not a partial one
        assert (q / "manifest.json").exists()
    r = subprocess.run(cmd + ["--force"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (q / "manifest.json").exists()
