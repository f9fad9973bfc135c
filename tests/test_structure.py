"""The installed layout: one top-level package, the layers contract, no import cycles."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# top-level folder -> where it installs (pyproject.toml [tool.setuptools.package-dir])
LAYOUT = {"mythos_deploy": "mythos_deploy", "exporters": "mythos_deploy/exporters", "runtimes": "mythos_deploy/runtimes",
          "serving": "mythos_deploy/serving"}


def _installed_tree(dest: Path) -> Path:
    """The package as it is installed: exporters/ and runtimes/ inside mythos_deploy/."""
    for src, rel in LAYOUT.items():
        shutil.copytree(ROOT / src, dest / rel, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def test_wheel_installs_one_top_level_package(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in LAYOUT:
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("mythos_deploy-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
        top_level = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        listed = z.read(top_level[0]).decode().split() if top_level else sorted(top)
    assert top == {"mythos_deploy"}, top
    assert listed == ["mythos_deploy"], listed
    assert "mythos_deploy/exporters/onnx_export.py" in names
    assert "mythos_deploy/serving/openai_server.py" in names
    assert "mythos_deploy/runtimes/loader.py" in names
    assert not any(n.startswith(("benchmarks/", "mythos_deploy/benchmarks/")) for n in names)


def test_only_the_namespace_imports_outside_the_checkout(tmp_path):
    code = """
import importlib, sys
import mythos_deploy.exporters.onnx_export, mythos_deploy.runtimes.loader
assert 'exporters' not in sys.modules and 'runtimes' not in sys.modules
for name in ('exporters', 'runtimes', 'serving', 'benchmarks'):
    try:
        importlib.import_module(name)
    except ImportError:
        continue
    raise SystemExit(f'{name} is importable as a top-level package')
print('ok')
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                       env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr


def test_import_linter_contracts_hold(tmp_path):
    """pyproject.toml's import-linter contracts (layers; no cycles), on the installed layout."""
    tree = _installed_tree(tmp_path / "site")
    lint = Path(sys.executable).with_name("lint-imports")
    r = subprocess.run([str(lint), str(ROOT / "pyproject.toml"), "--no-cache"],
                       capture_output=True, text=True, cwd=tree, env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "2 kept, 0 broken" in r.stdout, r.stdout[-2000:]


def test_the_layers_contract_catches_an_upward_import(tmp_path):
    """The contract is not vacuous: a core module importing an exporter breaks it."""
    tree = _installed_tree(tmp_path / "site")
    cfg = tree / "mythos_deploy" / "config.py"
    cfg.write_text(cfg.read_text() + "\nfrom mythos_deploy.exporters import onnx_export  # noqa\n")
    lint = Path(sys.executable).with_name("lint-imports")
    r = subprocess.run([str(lint), str(ROOT / "pyproject.toml"), "--no-cache"],
                       capture_output=True, text=True, cwd=tree, env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"})
    assert r.returncode != 0
    assert "mythos_deploy.config -> mythos_deploy.exporters.onnx_export" in r.stdout, r.stdout[-3000:]
