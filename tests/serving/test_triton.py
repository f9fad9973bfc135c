"""The Triton model repository under a real tritonserver (the nvidia-pytriton wheel's) on
loopback ports: concurrent requests through the generate extension (HTTP generate and
generate_stream) and tritonclient's gRPC streaming give `generate`'s greedy tokens."""

import json
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.serving.servers import free_ports, stop, wait_ready

CLI = Path(sys.executable).parent / "mythos-export"
TRITON_ENV = Path(sys.prefix).parent / ".venv-triton"
PROMPTS = ["k4;q7;mk;rm;cq;wr;?w", "a1;?a", "b2;cb;?c", "x9;yx;zy;?z"]


def _tritonserver_or_skip():
    from mythos_deploy.errors import MythosError
    from mythos_deploy.serving.triton_repo import check_python_env, find_tritonserver
    try:
        dist = find_tritonserver()
    except MythosError as exc:
        pytest.skip(f"no tritonserver here: {exc}")
    if not (TRITON_ENV / "bin" / "python").is_file():
        pytest.skip(f"no {TRITON_ENV} (the numpy<2 environment `make install` makes for Triton's Python backend)")
    check_python_env(TRITON_ENV, dist)


class Triton:
    def __init__(self, repo: Path, wait_ready_model: str | None):
        self.http, self.grpc, self.metrics = free_ports(3)
        self.proc = subprocess.Popen([str(CLI), "triton-serve", str(repo), "--http-port", str(self.http),
                                      "--grpc-port", str(self.grpc), "--metrics-port", str(self.metrics),
                                      "--python-env", str(TRITON_ENV)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.url = f"http://127.0.0.1:{self.http}"
        if wait_ready_model is not None:
            wait_ready(self.proc, f"{self.url}/v2/models/{wait_ready_model}/ready", 120, "tritonserver")

    def stop(self) -> int:
        return stop(self.proc)


@pytest.fixture(scope="module")
def triton(demo_exports, tmp_path_factory):
    _tritonserver_or_skip()
    repo = tmp_path_factory.mktemp("repo")
    r = subprocess.run([str(CLI), "triton-repo", str(demo_exports["loop"]), "-o", str(repo), "--name", "hops",
                        "--max-batch", "4", "--max-len", "48"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    cfg = (repo / "hops" / "config.pbtxt").read_text()
    assert "decoupled: true" in cfg and 'name: "text_input"' in cfg and 'name: "text_output"' in cfg
    server = Triton(repo, "hops")
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def expected(demo_exports):
    """`mythos-export generate`'s greedy text for each prompt (3 new tokens)."""
    out = {}
    for p in PROMPTS:
        r = subprocess.run([str(CLI), "generate", str(demo_exports["loop"]), "--prompt", p, "--max-new-tokens", "3",
                            "--json"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        out[p] = json.loads(r.stdout.strip().splitlines()[-1])["text"]
    return out


def test_concurrent_http_generate_and_generate_stream(triton, expected):
    got = {}

    def one(p, stream):
        body = {"text_input": p, "max_tokens": 3, "temperature": 0.0, "stream": stream}
        if stream:
            text = ""
            with httpx.stream("POST", f"{triton.url}/v2/models/hops/generate_stream", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        text += json.loads(line[6:]).get("text_output", "")
            got[(p, stream)] = text
        else:
            got[(p, stream)] = httpx.post(f"{triton.url}/v2/models/hops/generate", json=body,
                                          timeout=60).json()["text_output"]
    threads = [threading.Thread(target=one, args=(p, s)) for p in PROMPTS for s in (False, True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got == {(p, s): expected[p] for p in PROMPTS for s in (False, True)}


def test_grpc_streaming_with_tritonclient(triton, expected):
    grpcclient = pytest.importorskip("tritonclient.grpc")
    results: "queue.Queue" = queue.Queue()
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{triton.grpc}")
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        for i, p in enumerate(PROMPTS):
            inputs = [grpcclient.InferInput("text_input", [1], "BYTES"), grpcclient.InferInput("max_tokens", [1], "INT32"),
                      grpcclient.InferInput("stream", [1], "BOOL")]
            inputs[0].set_data_from_numpy(np.array([p.encode()], dtype=np.object_))
            inputs[1].set_data_from_numpy(np.array([3], dtype=np.int32))
            inputs[2].set_data_from_numpy(np.array([True]))
            client.async_stream_infer("hops", inputs, request_id=str(i), enable_empty_final_response=True)
        texts, done = {str(i): "" for i in range(len(PROMPTS))}, set()
        deadline = time.time() + 60
        while len(done) < len(PROMPTS) and time.time() < deadline:
            result, error = results.get(timeout=60)
            assert error is None, error
            rid = result.get_response().id
            out = result.as_numpy("text_output")
            if out is not None:
                texts[rid] += b"".join(out.reshape(-1)).decode()
            if result.get_response().parameters["triton_final_response"].bool_param:
                done.add(rid)
    finally:
        client.stop_stream()
        client.close()
    assert [texts[str(i)] for i in range(len(PROMPTS))] == [expected[p] for p in PROMPTS]


def test_a_changed_artifact_is_refused_at_load(demo_exports, tmp_path):
    _tritonserver_or_skip()
    repo = tmp_path / "repo"
    r = subprocess.run([str(CLI), "triton-repo", str(demo_exports["loop"]), "-o", str(repo), "--name", "hops", "--copy"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    graph = repo / "hops" / "1" / "artifact" / "model.onnx"
    data = bytearray(graph.read_bytes())
    data[-1] ^= 1
    graph.write_bytes(bytes(data))
    server = Triton(repo, None)
    code = server.stop() if server.proc.wait(120) is None else server.proc.returncode
    log = server.proc.stdout.read()
    assert code != 0 and "sha256" in log, log[-3000:]
