"""Commands that serve an artifact: serve (OpenAI-compatible HTTP)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from mythos_deploy.cli.app import app, err, handle_errors
from mythos_deploy.errors import InputError, MissingDependencyError
from mythos_deploy.options import BackendName, DecodeOptions, ExitMode, Provider


def _serving_extra():
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise MissingDependencyError("serving needs FastAPI and uvicorn: pip install 'mythos-deploy\\[serve]'") from None
    return uvicorn


def _graceful(uvicorn):
    """uvicorn's Server, except that SIGTERM / SIGINT end it with exit status 0: it stops
    accepting, waits up to the grace period for in-flight requests, cancels the rest (uvicorn
    itself re-raises the signal after shutting down, which a supervisor reads as a crash)."""
    import contextlib
    import signal

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            def stop(sig, frame):
                if self.should_exit and sig == signal.SIGINT:
                    self.force_exit = True  # a second Ctrl-C
                self.should_exit = True
            old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, h in old.items():
                    signal.signal(s, h)
    return Server


@app.command(epilog="Examples: mythos-export serve out/hops-onnx\n\n"
                    "mythos-export serve out/hops-onnx --port 8001 --max-batch 16 --max-len 512 --api-key secret\n\n"
                    "curl localhost:8000/v1/completions -H 'Content-Type: application/json' "
                    "-d '{\"model\": \"hops-onnx\", \"prompt\": \"k4;?k\", \"max_tokens\": 1}'")
def serve(
    path: Path = typer.Argument(..., help="Any artifact `generate` reads: a checkpoint (eager), an ONNX export, "
                                          "TensorRT engines."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (loopback by default; 0.0.0.0 exposes it)."),
    port: int = typer.Option(8000, help="TCP port."),
    max_batch: int = typer.Option(8, help="Requests decoded together (slots in the cache pool)."),
    max_len: Optional[int] = typer.Option(None, help="Positions per slot, prompt + completion (default: the "
                                                     "model's max_seq_len, capped at 2048)."),
    chunk: int = typer.Option(64, help="Prompt tokens prefilled per engine step (bounds how long a long prompt "
                                       "stalls the others)."),
    max_queue: int = typer.Option(256, help="Requests that may wait for a slot; past it a request gets a 503."),
    api_key: Optional[str] = typer.Option(None, envvar="MYTHOS_API_KEY",
                                          help="Require 'Authorization: Bearer KEY' on /v1 (or set MYTHOS_API_KEY)."),
    model_name: Optional[str] = typer.Option(None, help="The model id clients send (default: the directory name)."),
    loops: Optional[int] = typer.Option(None, help="Recurrent loops per token (default: the artifact's)."),
    exit_mode: ExitMode = typer.Option(ExitMode.NONE, "--exit", help="none (exact) or propagate (ACT early exit "
                                                                     "that keeps each request independent)."),
    grace: float = typer.Option(10.0, help="Seconds SIGTERM waits for in-flight requests before cancelling them."),
    backend: BackendName = typer.Option(BackendName.AUTO, help="auto, eager, onnxruntime or tensorrt."),
    provider: Provider = typer.Option(Provider.CPU, help="cpu or cuda."),
    threads: int = typer.Option(0, help="onnxruntime threads (0: every core)."),
) -> None:
    """Serve an artifact over an OpenAI-compatible HTTP API (/v1/completions,
    /v1/chat/completions, /v1/models, /health, /metrics) with continuous batching: concurrent
    clients are decoded together, each getting the tokens it would get alone."""
    with handle_errors():
        uvicorn = _serving_extra()
        from mythos_deploy.runtimes import load
        from mythos_deploy.runtimes.engine import Engine
        from mythos_deploy.serving.openai_server import create_app
        if not 0 < port < 65536:
            raise InputError(f"--port must be in 1..65535, got {port}")
        b = load(path, backend=backend, provider=provider, threads=threads)
        length = max_len or min(b.cfg.max_seq_len, 2048)
        engine = Engine(b, max_batch=max_batch, max_len=length, chunk=chunk, max_queue=max_queue,
                        decode=DecodeOptions(loops, None, exit_mode))
        name = model_name or Path(path).resolve().name
        application = create_app(engine, name, api_key)
        config = uvicorn.Config(application, host=host, port=port, log_level="warning", access_log=False,
                                timeout_graceful_shutdown=grace)
        server = _graceful(uvicorn)(config)
        err.print(f"serving [bold]{escape(name)}[/bold] ({escape(b.name)}) on http://{host}:{port}/v1: "
                  f"{max_batch} slots x {length} positions{', API key required' if api_key else ''}")
        if engine.coupling:
            err.print(f"[yellow]note: {escape(engine.coupling)}[/yellow]")
        server.run()
        if not server.started:
            raise InputError(f"could not listen on {host}:{port} (in use, or not an address of this machine)")
        err.print("[dim]stopped[/dim]")


@app.command("triton-repo", epilog="Examples: mythos-export triton-repo out/hops-onnx -o triton-repo\n\n"
                                   "mythos-export triton-repo out/hops-onnx -o repo --name hops --instances 2 --copy")
def triton_repo(
    path: Path = typer.Argument(..., help="The artifact to serve (with its tokenizer): checkpoint, ONNX export or engines."),
    output: Path = typer.Option(..., "-o", "--output", help="The model repository directory (created if needed)."),
    name: Optional[str] = typer.Option(None, help="Model name in the repository (default: the artifact directory's)."),
    instances: int = typer.Option(1, help="Model instances (each its own process, engine and copy of the weights)."),
    max_batch: int = typer.Option(8, help="Requests each instance decodes together."),
    max_len: Optional[int] = typer.Option(None, help="Positions per slot (default: max_seq_len, capped at 2048)."),
    chunk: int = typer.Option(64, help="Prompt tokens prefilled per engine step."),
    exit_mode: ExitMode = typer.Option(ExitMode.NONE, "--exit", help="none or propagate."),
    copy: bool = typer.Option(False, "--copy", help="Copy the artifact into the repository (default: reference it "
                                                     "by absolute path)."),
    force: bool = typer.Option(False, "--force", help="Replace the model if the repository has it."),
) -> None:
    """Write a Triton Inference Server model repository for an artifact: a decoupled
    Python-backend model (config.pbtxt, model.py) that runs the batching engine, with the
    generate extension's tensors (text_input, max_tokens, stream, temperature, top_p, seed, stop
    -> text_output). The artifact's hashes are checked now and again when Triton loads it."""
    with handle_errors():
        from mythos_deploy.serving.triton_repo import write_repo
        dest = write_repo(path, output, name or Path(path).resolve().name, instances, max_batch, max_len, chunk,
                          str(exit_mode), copy, force)
        err.print(f"wrote {escape(str(dest))} (config.pbtxt, 1/model.py{', 1/artifact' if copy else ''}); "
                  f"serve it: mythos-export triton-serve {escape(str(output))}")


@app.command("triton-serve", epilog="Examples: mythos-export triton-serve triton-repo\n\n"
                                    "mythos-export triton-serve repo --http-port 8000 --grpc-port 8001 --python-env .venv-triton")
def triton_serve(
    repo: Path = typer.Argument(..., help="A model repository (mythos-export triton-repo)."),
    http_port: int = typer.Option(8000, help="HTTP port (KServe v2 and the generate extension)."),
    grpc_port: int = typer.Option(8001, help="gRPC port."),
    metrics_port: int = typer.Option(8002, help="Prometheus metrics port."),
    python_env: Optional[Path] = typer.Option(None, envvar="MYTHOS_TRITON_ENV",
                                              help="Python environment the backend runs model.py in (it must import "
                                                   "mythos_deploy; with nvidia-pytriton's tritonserver, numpy<2). "
                                                   "Default: .venv-triton beside this one, else this one."),
    grace: int = typer.Option(10, help="Seconds SIGTERM waits for in-flight requests."),
) -> None:
    """Start tritonserver on a model repository in the foreground, with the environment it
    needs (from NVIDIA's container, or the nvidia-pytriton wheel's copy on a plain machine);
    SIGTERM stops it cleanly."""
    with handle_errors():
        import signal
        import subprocess
        import sys
        import tempfile

        from mythos_deploy.serving.triton_repo import check_python_env, find_tritonserver, triton_command
        if not Path(repo).is_dir():
            raise InputError(f"model repository not found: {repo}")
        dist = find_tritonserver()
        if python_env is None:
            beside = Path(sys.prefix).parent / ".venv-triton"
            python_env = beside if (beside / "bin" / "python").is_file() else Path(sys.prefix)
        bin_dir = check_python_env(python_env, dist)
        with tempfile.TemporaryDirectory(prefix="mythos-triton-") as work:
            cmd, env = triton_command(repo, Path(work), http_port, grpc_port, metrics_port, bin_dir, dist, grace)
            err.print(f"tritonserver on {escape(str(repo))}: HTTP :{http_port}, gRPC :{grpc_port}, metrics "
                      f":{metrics_port} (model Python: {escape(str(python_env))})")
            proc = subprocess.Popen(cmd, env=env)

            def forward(sig, frame):
                proc.send_signal(signal.SIGTERM)
            old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                code = proc.wait()
            finally:
                for s, h in old.items():
                    signal.signal(s, h)
        if code != 0:
            raise InputError(f"tritonserver exited with status {code} (its log above says why)")
