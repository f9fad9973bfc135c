"""`import mythos_deploy` and every `--help` work without the heavy optional engines."""

import subprocess
import sys

BLOCK = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in {'tensorrt', 'triton', 'onnxruntime', 'onnx', 'modelopt', 'onnxscript', 'open_mythos', 'tokenizers',
                                     'fastapi', 'uvicorn', 'jinja2', 'prometheus_client'}:
            raise ImportError('blocked for test: ' + name)
sys.meta_path.insert(0, Block())
"""


def test_import_without_optional_engines():
    code = BLOCK + """
import mythos_deploy, mythos_deploy.runtimes, mythos_deploy.exporters
from mythos_deploy.cli import app
from typer.testing import CliRunner
r = CliRunner()
for cmd in ([], ['init'], ['import-openmythos'], ['inspect'], ['generate'], ['serve'], ['triton-repo'], ['triton-serve']):
    res = r.invoke(app, cmd + ['--help'])
    assert res.exit_code == 0, res.output
heavy = [m for m in sys.modules if m.split('.')[0] in {'tensorrt', 'triton', 'onnxruntime', 'onnx', 'tokenizers',
                                                     'fastapi', 'uvicorn'}]
assert not heavy, heavy
print('ok')
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr


def test_serve_without_the_serving_extra_is_one_line(tmp_path):
    code = BLOCK + f"""
from mythos_deploy.cli import app
from typer.testing import CliRunner
res = CliRunner().invoke(app, ['serve', {str(tmp_path)!r}])
assert res.exit_code == 2 and 'pip install' in res.output and 'serve' in res.output and 'Traceback' not in res.output, res.output
print('ok')
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr
