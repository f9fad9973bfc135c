"""`mythos-export serve` as a real process on a loopback port, driven by the official openai
client (sync and async, streaming and not) and by httpx for what the client will not send."""

import asyncio
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.serving.servers import free_ports, stop, wait_ready

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")
NAME = "tiny-chat"


class Served:
    def __init__(self, artifact: Path, *args: str):
        (self.port,) = free_ports(1)
        self.url = f"http://127.0.0.1:{self.port}"
        cli = Path(sys.executable).parent / "mythos-export"
        env = {**os.environ, "MYTHOS_ORT_THREADS": "1"}
        self.proc = subprocess.Popen([str(cli), "serve", str(artifact), "--port", str(self.port), *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        wait_ready(self.proc, self.url + "/health", 90, "the server")

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics").text
        return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))

    def stop(self) -> int:
        return stop(self.proc, 30)


@pytest.fixture(scope="module")
def chat_artifact(tmp_path_factory, tiny_model):
    """The tiny model with the byte tokenizer and a chat template, exported as an ONNX Loop."""
    from mythos_deploy import save_checkpoint
    from mythos_deploy.exporters.onnx_export import export_onnx
    from mythos_deploy.options import OnnxExportOptions
    from mythos_deploy.tokenizer import ByteTokenizer
    root = tmp_path_factory.mktemp("serve")
    files = {**ByteTokenizer().files(), "tokenizer_config.json": json.dumps({"chat_template": CHAT_TEMPLATE})}
    save_checkpoint(tiny_model, root / "ck", tokenizer=files)
    export_onnx(root / "ck", root / NAME, OnnxExportOptions(loop="loop", validate=False))
    return root / NAME


@pytest.fixture(scope="module")
def server(chat_artifact):
    s = Served(chat_artifact, "--max-batch", "4", "--max-len", "96", "--chunk", "8")
    yield s
    assert s.stop() == 0  # SIGTERM: a clean exit


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _solo_text(artifact, prompt, n, temperature=0.0, seed=0, top_p=1.0):
    """What the engine alone gives: the in-process generation, detokenised like the server."""
    from mythos_deploy.runtimes import SamplingParams, generate, load
    b = load(artifact)
    ids = b.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
    sp = SamplingParams(greedy=temperature == 0, temperature=temperature or 1.0, top_p=top_p, seed=seed)
    toks = generate(b, ids, n, sampling=sp).tokens[0]
    stream = b.tokenizer.stream(ids)
    return "".join(stream.push(t) for t in toks) + stream.flush()


def test_models_health_and_a_completion(server, client, chat_artifact):
    assert [m.id for m in client.models.list().data] == [NAME]
    r = client.completions.create(model=NAME, prompt="hello there", max_tokens=7, temperature=0)
    assert r.choices[0].text == _solo_text(chat_artifact, "hello there", 7)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len("hello there") and r.usage.completion_tokens == 7
    r = client.completions.create(model=NAME, prompt=[5, 6, 7, 8], max_tokens=5, temperature=0)
    assert r.choices[0].text == _solo_text(chat_artifact, [5, 6, 7, 8], 5)


def test_streaming_sync_and_async_equal_the_whole_answer(server, client):
    whole = client.completions.create(model=NAME, prompt="stream me", max_tokens=12, temperature=0).choices[0].text
    chunks = list(client.completions.create(model=NAME, prompt="stream me", max_tokens=12, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason == "length" and len(chunks) >= 2

    async def main():
        ac = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        text = ""
        async for c in await ac.completions.create(model=NAME, prompt="stream me", max_tokens=12, temperature=0,
                                                   stream=True):
            text += c.choices[0].text
        full = await ac.completions.create(model=NAME, prompt="stream me", max_tokens=12, temperature=0)
        await ac.close()
        return text, full.choices[0].text
    assert asyncio.run(main()) == (whole, whole)


def test_chat_renders_the_template(server, client, chat_artifact):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    r = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=6, temperature=0)
    prompt = "system: be brief\nuser: hi\nassistant: "
    assert r.choices[0].message.content == _solo_text(chat_artifact, prompt, 6)
    assert r.choices[0].message.role == "assistant" and r.usage.prompt_tokens == len(prompt)
    stream = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=6, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == r.choices[0].message.content


def test_concurrent_seeded_clients_get_their_solo_outputs(server, client):
    reqs = [dict(prompt="p" * (1 + 5 * i), max_tokens=10 + i, temperature=0.9, top_p=0.95, seed=100 + i)
            for i in range(6)]
    solo = [client.completions.create(model=NAME, **r).choices[0].text for r in reqs]
    got = [None] * len(reqs)

    def one(i):
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        got[i] = c.completions.create(model=NAME, **reqs[i]).choices[0].text
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got == solo
    # stop strings cut the text where they first appear
    full = solo[2]
    stop = full[3:5]
    if stop and stop not in full[:3] + full[3:4]:
        r = client.completions.create(model=NAME, stop=[stop], **reqs[2])
        assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"


def test_a_dropped_stream_frees_its_slot(server, client):
    body = {"model": NAME, "prompt": "x", "max_tokens": 90, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    deadline = time.time() + 20
    while server.metric("mythos_running_requests") != 0 and time.time() < deadline:
        time.sleep(0.1)
    assert server.metric("mythos_running_requests") == 0
    assert server.metric("mythos_generated_tokens_total") > 0
    r = client.completions.create(model=NAME, prompt="after", max_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3


@pytest.mark.parametrize("body, status, match", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    ({"model": NAME, "prompt": "x", "max_tokens": "ten"}, 400, "max_tokens must be an integer"),
    ({"model": NAME, "prompt": 7}, 400, "prompt must be"),
    ({"model": NAME, "prompt": ["a", "b"]}, 400, "one prompt per request"),
    ({"model": "nope", "prompt": "x"}, 404, "does not exist"),
    ({"model": NAME, "prompt": "x" * 90, "max_tokens": 10}, 400, "longer than this server's context"),
    ({"model": NAME, "prompt": "x" * 200}, 400, "slots hold 96 positions"),
    ({"model": NAME, "prompt": [1, 99999]}, 400, "out of range"),
    ({"model": NAME, "prompt": "x", "temperature": 5}, 400, "temperature must be in"),
    ({"model": NAME, "prompt": "x", "top_p": 0}, 400, "top_p must be in"),
    ({"model": NAME, "prompt": "x", "n": 2}, 400, "only n = 1"),
    ({"model": NAME, "prompt": "x", "seed": -1}, 400, "seed must be"),
    ({"model": NAME, "prompt": "x", "stop": [""]}, 400, "stop must be"),
    ({"model": NAME, "prompt": "x", "stream": "yes"}, 400, "stream must be a boolean"),
    ({"model": NAME, "prompt": ""}, 400, "empty"),
])
def test_malformed_requests_get_openai_errors(server, body, status, match):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + "/v1/completions", content=data, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert re.search(match, err["message"]) and err["type"]


def test_oversized_bodies_wrong_routes_and_the_client_errors(server, client):
    r = httpx.post(server.url + "/v1/completions", content=b"x" * (2 << 20), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "larger than" in r.json()["error"]["message"]
    assert httpx.get(server.url + "/v1/nothing").status_code == 404
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="x")
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model=NAME, messages=[])
    # the server still serves after all of them
    assert client.completions.create(model=NAME, prompt="ok", max_tokens=2, temperature=0).usage.completion_tokens == 2


def test_api_key_and_a_model_without_a_chat_template(demo_exports):
    s = Served(demo_exports["loop"], "--api-key", "sekret", "--max-batch", "2", "--max-len", "40")
    try:
        name = demo_exports["loop"].name
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0).models.list()
        assert httpx.get(s.url + "/v1/models").status_code == 401
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="sekret", max_retries=0)
        r = c.completions.create(model=name, prompt="k4;q7;mk;rm;cq;wr;?w", max_tokens=1, temperature=0)
        assert r.choices[0].text == "4"  # the trained demo answers its 4-hop query
        with pytest.raises(openai.BadRequestError, match="no chat template"):
            c.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}])
        assert httpx.get(s.url + "/health").status_code == 200  # not behind the key
    finally:
        assert s.stop() == 0


def test_a_full_queue_answers_503_and_the_server_goes_on(chat_artifact):
    # the eager checkpoint at 64 loops: slow enough per token that the first request holds its slot
    s = Served(chat_artifact.parent / "ck", "--max-batch", "1", "--max-queue", "1", "--max-len", "96",
               "--model-name", NAME, "--loops", "64")
    try:
        body = {"model": NAME, "prompt": "x", "max_tokens": 80, "temperature": 0, "stream": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=60) as first:
            lines = first.iter_lines()  # kept: a dropped iterator closes the stream (a disconnect)
            next(lines)  # running: holds the only slot
            waiting = threading.Thread(target=lambda: httpx.post(s.url + "/v1/completions", timeout=60,
                                                                 json={**body, "stream": False}))
            waiting.start()
            deadline = time.time() + 10
            while s.metric("mythos_queue_depth") < 1 and time.time() < deadline:
                time.sleep(0.02)
            assert s.metric("mythos_running_requests") == 1
            r = httpx.post(s.url + "/v1/completions", json={**body, "stream": False}, timeout=60)
            assert r.status_code == 503 and "queue is full" in r.json()["error"]["message"]
        waiting.join(60)
        ok = httpx.post(s.url + "/v1/completions", json={**body, "max_tokens": 2, "stream": False}, timeout=60)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
    finally:
        assert s.stop() == 0
