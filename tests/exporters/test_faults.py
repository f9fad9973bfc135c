"""An export killed at any point leaves no artifact directory that looks complete, and a
re-run succeeds."""

import signal
import subprocess
import sys
import time


def test_sigkill_during_export_leaves_nothing_complete(tiny_ckpt, tmp_path):
    out = tmp_path / "onnx"
    cmd = [sys.executable, "-m", "mythos_deploy.cli", "onnx", str(tiny_ckpt), "-o", str(out), "--loop", "loop"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(6)  # inside the torch export (about 20 s on 2 cores)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".onnx.tmp-")]
    assert all(not (tmp_path / name / "manifest.json").exists() for name in leftovers)
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (out / "manifest.json").exists() and (out / "model.onnx").exists()
