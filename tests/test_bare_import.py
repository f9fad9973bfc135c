"""`import mythos_deploy` and every `--help` work without the heavy optional engines."""

import subprocess
import sys

BLOCK = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in {'tensorrt', 'triton', 'onnxruntime', 'onnx', 'modelopt', 'onnxscript', 'open_mythos', 'tokenizers'}:
            raise ImportError('blocked for test: ' + name)
sys.meta_path.insert(0, Block())
"""


def test_import_without_optional_engines():
    code = BLOCK + """
import mythos_deploy, mythos_deploy.runtimes, mythos_deploy.exporters
from mythos_deploy.cli import app
from typer.testing import CliRunner
r = CliRunner()
for cmd in ([], ['init'], ['import-openmythos'], ['inspect'], ['generate']):
    res = r.invoke(app, cmd + ['--help'])
    assert res.exit_code == 0, res.output
heavy = [m for m in sys.modules if m.split('.')[0] in {'tensorrt', 'triton', 'onnxruntime', 'onnx', 'tokenizers'}]
assert not heavy, heavy
print('ok')
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr
