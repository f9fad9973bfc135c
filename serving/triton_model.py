"""The Triton Inference Server Python-backend model (copied into a repository as model.py).

Decoupled (`model_transaction_policy { decoupled: true }`): `execute` hands each request to
one batching engine per model instance and returns at once, so the requests of many Triton
clients are decoded together; tokens go back through each request's response sender, from
the engine's thread. Tensors follow Triton's generate extension and its vLLM backend:
`text_input` (BYTES) in, `max_tokens`, `stream`, `temperature`, `top_p`, `seed`, `stop`
optional; `text_output` (BYTES) out: one response per text piece with `stream` true, else
one response with the whole text. The artifact's files are checked against its manifest's
sha256 (and the manifest against the one recorded when the repository was written) when the
model loads. No multiprocessing: the backend stub's embedded interpreter trips over it.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np

import triton_python_backend_utils as pb_utils  # provided by the Python backend stub


def _param(config: dict, key: str, default=None):
    return config.get("parameters", {}).get(key, {}).get("string_value", default)


def _scalar(request, name: str, default):
    t = pb_utils.get_input_tensor_by_name(request, name)
    if t is None:
        return default
    arr = t.as_numpy().reshape(-1)
    return arr[0].item() if arr.size else default


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        from mythos_deploy.manifest import sha256_file
        from mythos_deploy.options import DecodeOptions
        from mythos_deploy.runtimes import load
        from mythos_deploy.runtimes.engine import Engine

        here = Path(args["model_repository"]) / args["model_version"]
        artifact = Path(_param(config, "artifact"))
        if not artifact.is_absolute():
            artifact = here / artifact
        expected = _param(config, "manifest_sha256")
        if expected and sha256_file(artifact / "manifest.json") != expected:
            raise pb_utils.TritonModelException(f"{artifact}: its manifest changed since the repository was "
                                                "written (mythos-export triton-repo again)")
        backend = load(artifact, verify=True)  # every file against the manifest's sha256
        self.tokenizer = backend.tokenizer
        if self.tokenizer is None:
            raise pb_utils.TritonModelException(f"{artifact} carries no tokenizer: text_input needs one")
        self.engine = Engine(backend, max_batch=int(_param(config, "max_batch", "8")),
                             max_len=int(_param(config, "max_len", str(min(backend.cfg.max_seq_len, 2048)))),
                             chunk=int(_param(config, "chunk", "64")),
                             decode=DecodeOptions(exit=_param(config, "exit", "none"))).start()
        self.lock = threading.Lock()

    def execute(self, requests):
        from mythos_deploy.errors import MythosError
        from mythos_deploy.runtimes.engine import Request
        from mythos_deploy.runtimes.sampling import SamplingParams
        for request in requests:
            sender = request.get_response_sender()
            try:
                text = pb_utils.get_input_tensor_by_name(request, "text_input")
                if text is None:
                    raise ValueError("text_input is required")
                prompt = text.as_numpy().reshape(-1)[0]
                prompt = prompt.decode("utf-8") if isinstance(prompt, bytes) else str(prompt)
                temperature = float(_scalar(request, "temperature", 0.0))
                stops = pb_utils.get_input_tensor_by_name(request, "stop")
                stop_strings = [s.decode() if isinstance(s, bytes) else str(s)
                                for s in (stops.as_numpy().reshape(-1) if stops is not None else [])]
                sp = SamplingParams(greedy=temperature == 0, temperature=temperature or 1.0,
                                    top_p=float(_scalar(request, "top_p", 1.0)), seed=int(_scalar(request, "seed", 0)))
                req = Request(self.tokenizer.encode(prompt), int(_scalar(request, "max_tokens", 16)), sp,
                              list(self.tokenizer.eos_ids))
                _Stream(self, req, sender, bool(_scalar(request, "stream", False)), [s for s in stop_strings if s])
            except (MythosError, ValueError, UnicodeDecodeError) as exc:
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))),
                            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None

    def finalize(self):
        self.engine.stop(cancel=True)


class _Stream:
    """One request: detokenise as tokens arrive (engine thread), cut at stop strings, send."""

    def __init__(self, model, req, sender, stream: bool, stops: list[str]):
        self.sender, self.stream, self.stops = sender, stream, stops
        self.text, self.sent, self.cut = "", 0, False
        self.detok = model.tokenizer.stream(req.prompt)
        self.handle = model.engine.submit(req, on_token=self.on_token)

    def _send(self, piece: str | None, final: bool) -> None:
        flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0
        if piece is None:
            self.sender.send(flags=flags)
            return
        out = pb_utils.Tensor("text_output", np.array([piece.encode("utf-8")], dtype=np.object_))
        self.sender.send(pb_utils.InferenceResponse(output_tensors=[out]), flags=flags)

    def on_token(self, handle, tok) -> None:
        if tok is None:  # the request ended
            if handle.finish_reason == "error":
                self.sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(handle.error)),
                                 flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                return
            if self.cut:
                return
            self.text += self.detok.flush()
            rest = self.text[self.sent:]
            self._send((rest or None) if self.stream else self.text, True)
            return
        if self.sender.is_cancelled():  # the client went away
            self.cut = True
            handle.cancel()
            return
        self.text += self.detok.push(tok.id)
        hits = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.cut = True
            self.text = self.text[:min(hits)]
            handle.cancel()
            self._send(self.text[self.sent:] if self.stream else self.text, True)
            return
        hold = max((len(s) for s in self.stops), default=1) - 1
        safe = len(self.text) - hold
        if self.stream and safe > self.sent:
            self._send(self.text[self.sent:safe], False)
            self.sent = safe
