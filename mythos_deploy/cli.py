"""`mythos-export`: a thin typer + rich layer over the library.

Every command turns a `MythosError` into one red line on stderr and a non-zero exit; `--debug`
shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import importlib.util
import json
from pathlib import Path
from typing import Iterator, List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mythos_deploy.errors import InputError, MythosError

app = typer.Typer(
    name="mythos-export", no_args_is_help=True, add_completion=False, rich_markup_mode="rich",
    help="Export and deploy OpenMythos recurrent-depth transformers.\n\n"
         "Start with: [bold]mythos-export init --preset tiny -o ckpt/tiny[/bold], then "
         "[bold]mythos-export generate ckpt/tiny --prompt 'hello'[/bold] and "
         "[bold]mythos-export onnx ckpt/tiny -o out/tiny-onnx[/bold].")
out = Console()
err = Console(stderr=True)
_state = {"debug": False}


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    _state["debug"] = debug


_STORAGE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except (typer.Exit, typer.Abort):
        raise
    except MythosError as exc:
        if _state["debug"]:
            raise
        err.print(f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    except OSError as exc:
        # disk full, file too large, quota, read-only file system, permission: the user's to fix
        if _state["debug"] or exc.errno not in _STORAGE_ERRNOS:
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        err.print(f"[bold red]error:[/bold red] cannot write{escape(where)}: {escape(str(exc.strerror or exc))}; "
                  "nothing was left half-written", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        err.print("[red]interrupted[/red]")
        raise typer.Exit(130) from None
    except Exception as exc:  # a bug in this project: say so, briefly
        if _state["debug"]:
            raise
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        err.print(f"[bold red]internal error:[/bold red] {type(exc).__name__}: {escape(first)} "
                  "(this is a bug in mythos-deploy; rerun with --debug for the traceback)",
                  highlight=False, soft_wrap=True)
        raise typer.Exit(3) from None


def _parse_ids(text: str, what: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise InputError(f"{what} must be comma-separated integers, got {text!r}") from None
    return ids


@app.command(epilog="Example: mythos-export init --preset tiny --set max_loop_iters=6 --seed 1 -o ckpt/tiny")
def init(
    output: Path = typer.Option(..., "-o", "--output", help="Checkpoint directory to create."),
    preset: str = typer.Option("tiny", help="tiny, bench, 1b, 3b, 10b, 50b, 100b, 500b or 1t."),
    set_: List[str] = typer.Option([], "--set", help="Override a config field: key=value (repeatable)."),
    seed: int = typer.Option(0, help="Seed for the random weights."),
    force: bool = typer.Option(False, "--force", help="Replace OUTPUT if it exists."),
) -> None:
    """Make a checkpoint with random weights (OpenMythos's initialisation) from a preset."""
    with _errors():
        from mythos_deploy.checkpoint import save_checkpoint
        from mythos_deploy.config import MythosConfig, parse_overrides
        from mythos_deploy.model import MythosModel
        from mythos_deploy.stats import parameter_counts
        from mythos_deploy.tokenizer import ByteTokenizer

        cfg = MythosConfig.from_name(preset).replace(**parse_overrides(set_))
        total = parameter_counts(cfg)["total"]
        if total > 2_000_000_000:
            raise MythosError(f"preset {preset!r} has {total / 1e9:.1f}B parameters "
                              f"({total * 4 / 2**30:.0f} GiB in fp32); too large to initialise here. "
                              "Use `mythos-export inspect --preset` to study it.")
        with err.status(f"initialising {total / 1e6:.2f}M parameters"):
            model = MythosModel(cfg).init_weights(seed)
            tokenizer = ByteTokenizer().to_dict() if cfg.vocab_size >= 256 else None
            save_checkpoint(model, output, overwrite=force, tokenizer=tokenizer,
                            source={"kind": "init", "preset": preset, "seed": seed, "overrides": set_})
        out.print(f"wrote {output} ({total / 1e6:.2f}M parameters, preset {preset})")


@app.command("import-openmythos",
             epilog="Example: mythos-export import-openmythos om.pt --config om_config.json -o ckpt/om")
def import_openmythos(
    path: Path = typer.Argument(..., help="OpenMythos weights: .safetensors, or a torch state dict (.pt/.pth/.bin; loaded with weights_only=True)."),
    output: Path = typer.Option(..., "-o", "--output", help="Checkpoint directory to create."),
    config: Optional[Path] = typer.Option(None, help="JSON of OpenMythos MythosConfig fields (default: config.json beside PATH)."),
    force: bool = typer.Option(False, "--force", help="Replace OUTPUT if it exists."),
) -> None:
    """Convert OpenMythos 0.5.0 weights into a mythos-deploy checkpoint (no pickle is executed)."""
    with _errors():
        from mythos_deploy.checkpoint import save_checkpoint
        from mythos_deploy.manifest import sha256_file
        from mythos_deploy.openmythos_import import from_openmythos_file

        model = from_openmythos_file(path, config)
        save_checkpoint(model, output, overwrite=force,
                        source={"kind": "openmythos", "file": path.name, "sha256": sha256_file(path)})
        out.print(f"imported {path} -> {output}")


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


@app.command(epilog="Examples: mythos-export inspect ckpt/tiny   |   mythos-export inspect --preset 1t --json")
def inspect(
    path: Optional[Path] = typer.Argument(None, help="A checkpoint or ONNX artifact directory."),
    preset: Optional[str] = typer.Option(None, help="Inspect a preset's config instead of a directory."),
    loops: Optional[int] = typer.Option(None, help="Loop count for cache sizes (default max_loop_iters)."),
    dtype: str = typer.Option("fp32", help="Cache element type for byte counts: fp32, fp16, bf16, int8."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """Parameters (total, active per token per loop), cache bytes per token and the config."""
    with _errors():
        from mythos_deploy.checkpoint import load_config
        from mythos_deploy.config import MythosConfig
        from mythos_deploy.stats import DTYPE_BYTES, cache_bytes_per_token, parameter_counts

        if (path is None) == (preset is None):
            raise InputError("give either a checkpoint PATH or --preset NAME")
        if dtype not in DTYPE_BYTES:
            raise InputError(f"--dtype must be one of {', '.join(DTYPE_BYTES)}")
        if loops is not None and loops < 1:
            raise InputError(f"--loops must be >= 1, got {loops}")
        artifact = None
        if preset:
            cfg = MythosConfig.from_name(preset)
        elif (path / "manifest.json").is_file() and not (path / "config.json").is_file():
            from mythos_deploy.manifest import read_manifest
            manifest = read_manifest(path)
            cfg = MythosConfig.from_dict(manifest["config"])
            artifact = {k: manifest.get(k) for k in ("kind", "tool_version", "options", "graphs", "source", "validation")}
            loops = loops or manifest.get("options", {}).get("loops")
        else:
            cfg = load_config(path)
        params = parameter_counts(cfg)
        cache = cache_bytes_per_token(cfg, loops, dtype)
        report = {"source": str(path) if path else f"preset:{preset}", "config": cfg.to_dict(),
                  "parameters": params, "cache_bytes_per_token": cache, "cache_dtype": dtype,
                  "cache_reduction": {k: round(cache[k] / cache["mythos_deploy"], 3)
                                      for k in ("openmythos", "equivalent_gqa", "equivalent_mha")}}
        if artifact:
            report["artifact"] = artifact
        if as_json:
            print(json.dumps(report, indent=2))
            return
        t = Table(title=f"parameters ({report['source']})")
        t.add_column("part"), t.add_column("count", justify="right")
        for k, v in params.items():
            t.add_row(k.replace("_", " "), f"{v:,}")
        out.print(t)
        c = Table(title=f"cache per token, {cache['slots']} slots, {dtype}")
        c.add_column("layout"), c.add_column("bytes/token", justify="right"), c.add_column("x ours", justify="right")
        for k in ("mythos_deploy", "openmythos", "equivalent_gqa", "equivalent_mha"):
            c.add_row(k.replace("_", " "), _fmt_bytes(cache[k]), f"{cache[k] / cache['mythos_deploy']:.2f}")
        out.print(c)
        g = Table(title="config")
        g.add_column("field"), g.add_column("value", justify="right")
        for k, v in cfg.to_dict().items():
            g.add_row(k, str(v))
        out.print(g)
        if artifact:
            a = Table(title="artifact")
            a.add_column("field"), a.add_column("value")
            for k, v in artifact.items():
                a.add_row(k, escape(json.dumps(v) if isinstance(v, (dict, list)) else str(v)))
            out.print(a)


@app.command(epilog="Examples: mythos-export generate ckpt/tiny --prompt 'hello' --max-new-tokens 16\n\n"
                    "mythos-export generate out/tiny-onnx --prompt-ids 1,2,3 --temperature 0.8 --top-p 0.9 --seed 7 --json\n\n"
                    "mythos-export generate out/tiny-loop --prompt 'x' --loops 8 --exit fill-forward")
def generate(
    path: Path = typer.Argument(..., help="A checkpoint directory (eager) or an ONNX artifact directory (onnxruntime)."),
    prompt: Optional[str] = typer.Option(None, help="Text prompt (needs tokenizer.json in the checkpoint)."),
    prompt_ids: Optional[str] = typer.Option(None, help="Comma-separated token ids, e.g. 1,2,3."),
    max_new_tokens: int = typer.Option(32, help="Tokens to generate."),
    greedy: bool = typer.Option(False, "--greedy", help="Greedy decoding (the default when no sampling option is given)."),
    temperature: Optional[float] = typer.Option(None, help="Sampling temperature (0 = greedy)."),
    top_k: int = typer.Option(0, help="Sample from the k most likely tokens (0 = off)."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling mass (1.0 = off)."),
    repetition_penalty: float = typer.Option(1.0, help="Penalise tokens already in the sequence (1.0 = off)."),
    seed: int = typer.Option(0, help="Sampling seed."),
    loops: Optional[int] = typer.Option(None, help="Recurrent loops per token (default max_loop_iters; may exceed it)."),
    act_threshold: Optional[float] = typer.Option(None, help="ACT halting threshold in (0, 1] (default from config)."),
    exit_mode: str = typer.Option("none", "--exit", help="none: every loop for every token (exact); fill-forward: stop a "
                                                          "token's loop once halted (loop/stepped exports, and eager)."),
    stop_ids: Optional[str] = typer.Option(None, help="Comma-separated ids that end generation."),
    max_length: Optional[int] = typer.Option(None, help="Cap on prompt + generated length (default max_seq_len)."),
    backend: str = typer.Option("auto", help="auto (from the manifest), eager, onnxruntime or tensorrt (engine directories "
                                             "from mythos-export build)."),
    provider: str = typer.Option("cpu", help="cpu or cuda (onnxruntime-gpu; for checkpoints the torch-on-CUDA path, with the "
                                             "Triton MoE kernel when triton is installed)."),
    dtype: str = typer.Option("fp32", help="Checkpoints only: fp32, fp16 or bf16."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip the manifest version and sha256 checks."),
    as_json: bool = typer.Option(False, "--json", help="Print token ids, per-token loops used and timings as JSON."),
) -> None:
    """Generate from a checkpoint or an exported artifact, streaming tokens."""
    with _errors():
        from mythos_deploy.tokenizer import load_tokenizer
        from runtimes import load
        from runtimes.generation import generate as run_generation
        from runtimes.sampling import SamplingParams

        if (prompt is None) == (prompt_ids is None):
            raise InputError("give exactly one of --prompt TEXT or --prompt-ids 1,2,3")
        sampling_given = temperature is not None or top_k != 0 or top_p != 1.0
        if greedy and sampling_given:
            raise InputError("--greedy cannot be combined with --temperature/--top-k/--top-p")
        params = SamplingParams(greedy=not sampling_given, temperature=1.0 if temperature is None else temperature,
                                top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty, seed=seed)
        engine = load(path, backend=backend, provider=provider, verify=not no_verify, dtype=dtype)
        tok_dir = _tokenizer_dir(path)
        tok = None
        if prompt is not None:
            tok = load_tokenizer(tok_dir, engine.cfg.vocab_size)
            ids = tok.encode(prompt)
        else:
            ids = _parse_ids(prompt_ids, "--prompt-ids")
        if not ids:
            raise InputError("the prompt is empty")
        stops = _parse_ids(stop_ids, "--stop-ids") if stop_ids else []
        if tok is None and (tok_dir / "tokenizer.json").is_file():
            tok = load_tokenizer(tok_dir, engine.cfg.vocab_size)
        def show(ev) -> None:
            piece = tok.decode([ev.tokens[0]]) if tok else f"{ev.tokens[0]} "
            out.print(piece, end="", markup=False, highlight=False)

        result = run_generation(engine, ids, max_new_tokens, params, stops, loops, act_threshold, max_length,
                                exit_mode, on_event=None if as_json else show)
        if as_json:
            data = {"backend": engine.name, **result.to_dict()}
            data["text"] = tok.decode(result.tokens[0]) if tok else None
            print(json.dumps(data))
        else:
            out.print()
            n = len(result.decode_seconds)
            rate = f", {n / sum(result.decode_seconds):.1f} tok/s decode" if n else ""
            err.print(f"[dim]{escape(engine.name)}: {len(result.tokens[0])} tokens, mean loops used "
                      f"{sum(result.loops_used[0]) / len(result.loops_used[0]):.2f}, prefill "
                      f"{result.prefill_seconds * 1e3:.1f} ms{rate}, stop: {result.stop_reason}[/dim]")


def _tokenizer_dir(path: Path) -> Path:
    """A checkpoint keeps tokenizer.json; an ONNX artifact names its source checkpoint."""
    if (path / "tokenizer.json").is_file():
        return path
    try:
        src = json.loads((path / "manifest.json").read_text()).get("source", {}).get("checkpoint")
    except (OSError, ValueError):
        src = None
    return Path(src) if src and (Path(src) / "tokenizer.json").is_file() else path


def _print_validation(report: dict) -> None:
    t = Table(title=f"parity vs eager ({report['dtype']}, {report['loop_mode']})")
    for col in ("scenario", "output", "max abs", "max rel", "limit", ""):
        t.add_column(col, justify="right" if col.startswith("max") or col == "limit" else "left")
    worst: dict[tuple, dict] = {}
    for o in report["outputs"]:
        key = (o["scenario"], "new_* (cache)" if o["output"].startswith("new_") else o["output"])
        if key not in worst or o["max_abs"] / o["limit"] > worst[key]["max_abs"] / worst[key]["limit"]:
            worst[key] = o  # the cache slot closest to (or furthest past) its limit
    for (scenario, output), o in worst.items():
        mark = "[green]ok[/green]" if o["ok"] else "[bold red]FAIL[/bold red]"
        t.add_row(scenario, output, f"{o['max_abs']:.2e}", f"{o['max_rel']:.2e}", f"{o['limit']:.3g}", mark)
    out.print(t)
    out.print(f"greedy agreement {report['greedy_agreement']:.4f} over {report['greedy_positions']} positions; "
              f"loops_used mismatches {report['loops_used_mismatches']}/{report['loops_used_positions']}")
    if report.get("note"):
        out.print(f"[yellow]note:[/yellow] {report['note']}")


@app.command("onnx", epilog="Examples:\n\n"
             "mythos-export onnx ckpt/tiny -o out/tiny-onnx\n\n"
             "mythos-export onnx ckpt/tiny -o out/tiny-loop --loop loop --moe ort\n\n"
             "mythos-export onnx ckpt/tiny -o out/tiny-trt --loop stepped --moe plugin --dtype fp16")
def onnx_cmd(
    path: Path = typer.Argument(..., help="A checkpoint directory."),
    output: Path = typer.Option(..., "-o", "--output", help="ONNX artifact directory to create."),
    loop: str = typer.Option("unroll", help="unroll: n_loops fixed in the graph; loop: one ONNX Loop, n_loops and "
                                            "act_threshold are inputs; stepped: prelude/step/coda graphs for a runtime-driven loop."),
    loops: Optional[int] = typer.Option(None, help="Loop count (unroll) / default loop count recorded in the manifest. Default: max_loop_iters."),
    moe: str = typer.Option("standard", help="MoE lowering. standard: plain ONNX ops (runs anywhere); ort: onnxruntime com.microsoft::MoE "
                                             "(fp32 on CPU); plugin: the TensorRT MythosMoE plugin node."),
    opset: int = typer.Option(18, help="ONNX opset (>= 18)."),
    dtype: str = typer.Option("fp32", help="fp32 or fp16 weights and activations (ACT accumulators stay fp32)."),
    mla: str = typer.Option("absorbed", help="MLA attention in the graph. absorbed: kv_up folded into query/output (DeepSeek-V2), "
                                             "attention in latent space, fastest decode; expanded: OpenMythos's form."),
    past: Optional[str] = typer.Option(None, help="Cache rows the graph reads. sliced: only the filled ones, so decode cost follows "
                                                  "the context, not the runtime's buffer (onnxruntime); masked: the whole buffer "
                                                  "with unfilled rows masked, static shapes (TensorRT, CUDA graphs). "
                                                  "Default: masked with --moe plugin, else sliced."),
    no_validate: bool = typer.Option(False, "--no-validate", help="Skip the onnxruntime parity gate (not recommended)."),
    force: bool = typer.Option(False, "--force", help="Replace OUTPUT if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest and validation report as JSON."),
) -> None:
    """Export a checkpoint to ONNX and gate it on parity with eager PyTorch.

    The artifact holds the graph(s), manifest.json (options, source sha256, the I/O contract,
    sha256 of every file) and validation.json. Outputs that differ from eager beyond
    tolerance exit with status 4 and write nothing.
    """
    with _errors():
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        from exporters.onnx_export import OnnxExportOptions, export_onnx
        from mythos_deploy.errors import ParityError

        opts = OnnxExportOptions(loop=loop, loops=loops, moe=moe, opset=opset, dtype=dtype, validate=not no_validate, mla=mla,
                                 past=past)
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                      console=err, transient=True, disable=as_json) as progress:
            task = progress.add_task("starting", total=None)
            try:
                result = export_onnx(path, output, opts, overwrite=force,
                                     stage=lambda s: progress.update(task, description=s))
            except ParityError as exc:
                progress.stop()
                if exc.report:
                    if as_json:
                        print(json.dumps({"validation": exc.report}, indent=2))
                    else:
                        _print_validation(exc.report)
                raise
        if as_json:
            print(json.dumps({"manifest": result.manifest, "validation": result.report}, indent=2))
            return
        if result.report:
            _print_validation(result.report)
        size = sum(p.stat().st_size for p in output.rglob("*") if p.is_file())
        out.print(f"wrote {output} ({', '.join(result.manifest['graphs'].values())}; "
                  f"{_fmt_bytes(size)}) in {result.seconds:.1f} s")


@app.command(epilog="Examples: mythos-export parity ckpt/tiny out/tiny-onnx\n\n"
                    "mythos-export parity out/tiny-loop out/tiny-loop --exit-b fill-forward --tolerance 1 --json")
def parity(
    a: Path = typer.Argument(..., help="Reference artifact (checkpoint or ONNX directory)."),
    b: Path = typer.Argument(..., help="Artifact to check against A."),
    tokens: int = typer.Option(32, help="Greedy tokens per prompt (B is teacher-forced with A's tokens)."),
    prompts: int = typer.Option(3, help="Number of random prompts (seeded)."),
    prompt_len: int = typer.Option(8, help="Prompt length."),
    loops: Optional[int] = typer.Option(None, help="Loop count for both (default: each artifact's default)."),
    exit_a: str = typer.Option("none", help="A's exit mode: none or fill-forward."),
    exit_b: str = typer.Option("none", help="B's exit mode: none or fill-forward."),
    tolerance: float = typer.Option(1e-4, help="Max abs logit error allowed."),
    min_agreement: float = typer.Option(1.0, help="Minimum greedy-token agreement."),
    seed: int = typer.Option(0, help="Prompt seed."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Compare two artifacts/backends on the same prompts; exit 4 beyond tolerance."""
    with _errors():
        import numpy as np

        from mythos_deploy.errors import ParityError
        from runtimes import load
        from runtimes.parity import compare

        ea, eb = load(a), load(b)
        rng = np.random.default_rng(seed)
        plist = rng.integers(0, ea.cfg.vocab_size, size=(prompts, prompt_len)).tolist()
        report = compare(ea, eb, plist, tokens, loops, None, exit_a, exit_b, tolerance, min_agreement)
        if as_json:
            print(json.dumps(report, indent=2))
        else:
            t = Table(title=f"parity: {escape(report['a'])} ({exit_a}) vs {escape(report['b'])} ({exit_b})")
            for col in ("prompt", "steps", "max abs logit err", "greedy agree", "loops_used agree", "loops run A/B"):
                t.add_column(col, justify="right")
            for i, r in enumerate(report["prompts"]):
                t.add_row(str(i), str(r["steps"]), f"{r['max_abs_logit_error']:.2e}", f"{r['greedy_agreement']:.3f}",
                          f"{r['loops_used_agreement']:.3f}", f"{r['loops_run_a']:.2f}/{r['loops_run_b']:.2f}")
            out.print(t)
            verdict = "[green]PASS[/green]" if report["passed"] else "[bold red]FAIL[/bold red]"
            out.print(f"{verdict}: max abs logit error {report['max_abs_logit_error']:.2e} (tolerance {tolerance:g}), "
                      f"greedy agreement {report['greedy_agreement']:.3f} (min {min_agreement:g})")
        if not report["passed"]:
            raise ParityError(f"{b} differs from {a} beyond tolerance")


@app.command(epilog="Example: mythos-export bench --preset bench --prompt 32 --new-tokens 64 --out benchmarks/results/runtime.json")
def bench(
    preset: str = typer.Option("bench", help="Model size preset (weights: OpenMythos's init from --seed)."),
    prompt: int = typer.Option(32, help="Prompt length."),
    new_tokens: int = typer.Option(64, help="Tokens decoded per configuration."),
    loops: Optional[int] = typer.Option(None, help="Loop count (default max_loop_iters)."),
    threads: int = typer.Option(2, help="CPU threads for torch and onnxruntime."),
    seed: int = typer.Option(0, help="Weight seed."),
    only: str = typer.Option("", help="Comma-separated configuration names to run (OpenMythos always runs)."),
    output: Path = typer.Option(Path("benchmarks/results/runtime.json"), "-o", "--output", help="JSON path (a .png plot lands beside it)."),
) -> None:
    """Decode and prefill latency of every backend in one run: OpenMythos's own cached decoding,
    the eager reference, onnxruntime per loop mode and MoE lowering, exit none and fill-forward;
    plus the memory-bandwidth floor, each configuration's fraction of it, and peak memory.
    Takes a few minutes on the bench preset; needs open-mythos (make install adds it)."""
    with _errors():
        try:
            from benchmarks.runtime_bench import main as run_bench
        except ImportError as exc:
            raise MythosError(f"the benchmarks need a source checkout (make install): {exc}") from None
        if importlib.util.find_spec("open_mythos") is None:
            from mythos_deploy.errors import MissingDependencyError
            raise MissingDependencyError("the benchmark compares against OpenMythos: pip install --no-deps open-mythos==0.5.0")
        data = run_bench(["--preset", preset, "--prompt", str(prompt), "--new-tokens", str(new_tokens),
                          "--threads", str(threads), "--seed", str(seed), "--out", str(output),
                          *(["--loops", str(loops)] if loops else []), *(["--only", only] if only else [])])
        t = Table(title=f"decode, batch 1, {preset}: prompt {prompt}, {new_tokens} new tokens")
        for col in ("configuration", "p50 ms", "p90 ms", "prefill tok/s", "x OpenMythos", "x floor", "loops run", "peak MB"):
            t.add_column(col, justify="left" if col == "configuration" else "right")
        for r in data["results"]:
            t.add_row(escape(r["name"]), f"{r['decode']['p50_ms']:.2f}", f"{r['decode']['p90_ms']:.2f}",
                      f"{r['prefill_tokens_per_s']:.0f}", f"{r['speedup_vs_openmythos']:.2f}", f"{r['x_floor']:.2f}",
                      f"{r['mean_loops_run']:.1f}", f"{r['peak_rss_mb']:.0f}")
        out.print(t)
        out.print(f"copy bandwidth {data['copy_bandwidth_gbs']:.1f} GB/s; floor {data['bandwidth_floor']['ms_per_token']:.2f} ms/token "
                  f"at {data['loops']} loops; wrote {output} and {output.with_suffix('.png')}")


@app.command(epilog="Examples: mythos-export quantize out/tiny-onnx -o out/tiny-int8 --mode int8\n\n"
                    "mythos-export quantize out/tiny-onnx -o out/tiny-int4 --mode int4 --block-size 32\n\n"
                    "mythos-export quantize out/tiny-trt -o out/tiny-qdq8 --mode qdq-int8 --calib 16")
def quantize(
    path: Path = typer.Argument(..., help="An fp32 ONNX artifact directory (onnxruntime modes: --moe standard or ort; "
                                          "TensorRT modes: --loop unroll or stepped, --moe plugin or standard)."),
    output: Path = typer.Option(..., "-o", "--output", help="Quantized artifact directory to create."),
    mode: str = typer.Option("int8", help="onnxruntime CPU: int8 (MatMulNBits int8 weight blocks, int8 activations quantized at run time; "
                                          "embedding int8 too; int8 experts with --moe standard, QMoE with --moe ort), int4 (the same "
                                          "with int4 weights; Jetson-class memory savings), fp16 (native fp16 re-export; GPUs). TensorRT explicit Q/DQ: qdq-int8 "
                                          "(int8 weights + calibrated int8 activations; any NVIDIA GPU incl. Jetson Orin), "
                                          "qdq-int4 (int4 weight-only blocks; Ampere+ incl. Jetson Orin), fp8 (E4M3 weights + "
                                          "activations; Hopper/Ada only: H100/H200/L4/L40, not Jetson Orin)."),
    calib: int = typer.Option(8, "--calib", help="qdq-int8/fp8: generated calibration prompts (16 random tokens + 16 greedy)."),
    gate_tokens: int = typer.Option(256, "--gate-tokens", help="Positions the accuracy gate compares (teacher-forced greedy tokens)."),
    exclude: List[str] = typer.Option([], "--exclude", help="Keep nodes whose name contains this in float (repeatable)."),
    block_size: int = typer.Option(32, help="int8 / int4 / qdq-int4 weight block size along K (one scale per block per output channel)."),
    accuracy_level: int = typer.Option(4, help="int8 / int4 MatMulNBits accuracy level (4 = int8 compute, fastest on CPU; "
                                               "0 = fp32 compute, slow for int8)."),
    accept_accuracy_loss: bool = typer.Option(False, "--accept-accuracy-loss", help="Write the artifact even if the gate fails (recorded in the manifest)."),
    force: bool = typer.Option(False, "--force", help="Replace OUTPUT if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Quantize an ONNX export for onnxruntime or TensorRT, gated on greedy agreement with the
    fp32 export (int8/qdq-int8/fp8 >= 98%, int4/qdq-int4 >= 90%; fp16 uses the export's fp16
    parity gate) and, for train-demo checkpoints, on task accuracy. TensorRT modes are also
    linted for TensorRT's parser; their gate runs in onnxruntime on the same numbers."""
    with _errors():
        from exporters.quantize import QuantizeOptions, quantize_artifact
        from mythos_deploy.errors import ParityError

        opts = QuantizeOptions(mode=mode, block_size=block_size, accuracy_level=accuracy_level, exclude=tuple(exclude),
                               gate_tokens=gate_tokens, calib_prompts=calib, accept_accuracy_loss=accept_accuracy_loss)
        with err.status(f"quantizing ({mode})") as status:
            try:
                result = quantize_artifact(path, output, opts, overwrite=force, stage=lambda s: status.update(s))
            except ParityError as exc:
                if exc.report and as_json:
                    print(json.dumps({"gate": exc.report}, indent=2))
                raise
        if as_json:
            print(json.dumps({k: result[k] for k in ("gate", "sizes", "seconds")}, indent=2))
            return
        g, z = result["gate"], result["sizes"]
        out.print(f"wrote {output} ({mode}): {_fmt_bytes(z['quantized_bytes'])} vs {_fmt_bytes(z['source_bytes'])} fp32 "
                  f"({z['source_bytes'] / max(z['quantized_bytes'], 1):.1f}x smaller); greedy agreement "
                  f"{g['greedy_agreement']:.4f}{' (gate overridden)' if g.get('overridden') else ''}")
        if g.get("task"):
            t = g["task"]
            out.print(f"task accuracy (multi-hop, hops 1-4, {t['problems']} problems): {t['accuracy']:.3f} vs fp32 "
                      f"{t['accuracy_fp32']:.3f} ({t['drop_points']:+.2f} points drop; gate {t['max_drop_points']})")
        if mode == "int4" and result["manifest"]["options"].get("moe") == "standard":
            err.print("note: with the standard MoE lowering, int4 expert tables are dequantized on every call, so "
                      "CPU decode is slower than fp32; for speed, quantize an export made with --moe ort (QMoE)")


@app.command(epilog="Examples: mythos-export lint out/tiny-trt --target trt\n\nmythos-export lint out/tiny-onnx --json")
def lint(
    path: Path = typer.Argument(..., help="An ONNX artifact directory."),
    target: str = typer.Option("trt", help="Target to lint for (trt: TensorRT 10.1's ONNX parser)."),
    show_info: bool = typer.Option(False, "--info", help="Also list informational findings."),
    as_json: bool = typer.Option(False, "--json", help="Print the findings as JSON."),
) -> None:
    """Check an export against TensorRT's ONNX parser without TensorRT: ops and types, opset and
    IR version, Loop/If/TopK/axes restrictions, plugin attributes, Q/DQ zero points. Exit 1 on errors."""
    with _errors():
        from exporters.trt_lint import lint_artifact
        if target != "trt":
            raise InputError(f"--target must be trt, got {target!r}")
        report = lint_artifact(path)
        if as_json:
            print(json.dumps(report, indent=2))
        else:
            shown = [f for f in report["findings"] if show_info or f["severity"] != "info"]
            if shown:
                t = Table(title=f"{escape(report['target'])} lint: {escape(str(path))}")
                for col in ("severity", "graph", "node", "op", "message"):
                    t.add_column(col)
                for f in shown:
                    color = {"error": "red", "warning": "yellow"}.get(f["severity"], "dim")
                    t.add_row(f"[{color}]{f['severity']}[/{color}]", f["graph"], escape(f["node"]), f["op"], escape(f["message"]))
                out.print(t)
            verdict = "[green]passes[/green]" if report["passed"] else "[bold red]fails[/bold red]"
            out.print(f"{verdict}: {report['errors']} error(s), {report['warnings']} warning(s)")
        if not report["passed"]:
            raise typer.Exit(1)


@app.command(epilog="Examples: mythos-export build out/tiny-trt -o out/tiny-engines --precision fp16\n\n"
                    "mythos-export build out/tiny-qdq8 -o out/tiny-int8 --precision int8 --profile batch=1:1:8 "
                    "--timing-cache out/trt.cache\n\n"
                    "mythos-export build out/tiny-trt -o x --dry-run   (profiles and checks, no TensorRT needed)")
def build(
    path: Path = typer.Argument(..., help="An ONNX artifact: --loop unroll or stepped, --moe plugin (or standard); "
                                          "Q/DQ-quantized ones too."),
    output: Path = typer.Option(..., "-o", "--output", help="Engine directory to create (engines + manifest.json)."),
    precision: str = typer.Option("fp16", help="fp32 | fp16 | bf16 | int8 (needs a qdq-int8 artifact) | fp8 (needs an fp8 "
                                               "artifact; Hopper/Ada). Jetson Orin: fp16, int8."),
    profile: List[str] = typer.Option([], "--profile", help="AXIS=MIN:OPT:MAX for batch, seq, past or loops (repeatable). "
                                                            "Defaults: batch=1:1:4, seq=1:32:max_seq_len, past=0:64:max_seq_len."),
    decode_profile: bool = typer.Option(True, "--decode-profile/--no-decode-profile",
                                        help="Add a second optimization profile with seq=1 (decode)."),
    workspace: int = typer.Option(4096, "--workspace", help="Builder workspace limit, MiB."),
    timing_cache: Optional[Path] = typer.Option(None, "--timing-cache", help="Read and update this timing cache file "
                                                                              "(faster rebuilds)."),
    plugin: str = typer.Option("aot", help="aot: the MoE kernel is compiled into the engine (runs without Python); "
                                           "jit: the plugin's Python implementation runs at inference time."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check the artifact, lint it and print the optimization "
                                                          "profiles; build nothing (works without TensorRT)."),
    force: bool = typer.Option(False, "--force", help="Replace OUTPUT if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Build TensorRT engines from an ONNX export: parse, register the MythosMoE plugin, set
    optimization profiles from the I/O contract, build each graph, write atomically. Needs
    TensorRT (pip install 'mythos-deploy[tensorrt]'); everything before it runs anywhere."""
    with _errors():
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        from exporters.trt_build import BuildOptions, build_engines, parse_profile, plan

        opts = BuildOptions(precision=precision, profile=parse_profile(profile), decode_profile=decode_profile,
                            workspace_mib=workspace, timing_cache=str(timing_cache) if timing_cache else None, plugin=plugin)
        if dry_run:
            p = plan(path, opts)
            summary = {"artifact": p["artifact"], "precision": precision, "quantization": p["quantization"],
                       "graphs": list(p["graphs"]), "ranges": p["ranges"], "profiles": p["profiles"]}
            if as_json:
                print(json.dumps(summary, indent=2))
                return
            t = Table(title=f"TensorRT build plan: {escape(str(path))} ({precision})")
            for col in ("graph", "profile", "input", "min", "opt", "max"):
                t.add_column(col, no_wrap=col == "input")
            for g, profs in p["profiles"].items():
                for pname, shapes in profs.items():
                    for name, (lo, opt, hi) in shapes.items():
                        t.add_row(g, pname, name, str(lo), str(opt), str(hi))
            out.print(t)
            out.print("dry run: checks and lint pass; nothing built")
            return
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                      console=err, transient=True, disable=as_json) as progress:
            task = progress.add_task("checking", total=None)
            result = build_engines(path, output, opts, overwrite=force, stage=lambda s: progress.update(task, description=s))
        if as_json:
            print(json.dumps({"manifest": result["manifest"], "seconds": result["seconds"]}, indent=2))
            return
        out.print(f"wrote {output}: {', '.join(result['manifest']['engines'].values())} in {result['seconds']:.1f} s")


@app.command("plugin-kernels", epilog="Example: mythos-export plugin-kernels -o out/moe-kernels --sm 87 --sm 90 --dtype fp16")
def plugin_kernels(
    output: Path = typer.Option(..., "-o", "--output", help="Directory for the PTX/cubin files and kernels.json."),
    sm: List[int] = typer.Option([87, 90], "--sm", help="CUDA compute capability (87 Jetson Orin, 90 H100/H200); repeatable."),
    dtype: List[str] = typer.Option(["fp32", "fp16", "bf16"], "--dtype", help="Kernel storage type; repeatable."),
) -> None:
    """Compile the MoE plugin's Triton kernels ahead of time to PTX and cubin (no GPU needed)."""
    with _errors():
        import os
        from exporters.moe_aot import DTYPES, compile_kernels
        if os.environ.get("TRITON_INTERPRET") == "1":
            raise InputError("unset TRITON_INTERPRET to compile kernels (the interpreter replaces the compiler)")
        bad = [d for d in dtype if d not in DTYPES]
        if bad or any(c < 70 for c in sm):
            raise InputError(f"--dtype must be among {', '.join(DTYPES)} and --sm >= 70; got {dtype}, {sm}")
        with err.status("compiling Triton kernels"):
            index = compile_kernels(output, tuple(dtype), tuple(sm))
        out.print(f"wrote {len(index['kernels'])} kernels (PTX + cubin) for sm {', '.join(map(str, sm))} to {output}")


@app.command("train-demo", epilog="Example: mythos-export train-demo -o checkpoints/hops --seed 0")
def train_demo_cmd(
    output: Path = typer.Option(..., "-o", "--output", help="Checkpoint directory to create."),
    steps: int = typer.Option(5000, help="Optimizer steps (batch 32): about 15 minutes on 2 CPU cores; the curriculum reaches the full task (8 statements, up to 4 hops, 6 loops) after ~1400."),
    seed: int = typer.Option(0, help="Seed for the weights and the generated problems."),
    threads: int = typer.Option(2, help="CPU threads."),
    force: bool = typer.Option(False, "--force", help="Replace OUTPUT if it exists."),
) -> None:
    """Train the demo checkpoint: the reference model with ACT and a ponder cost on the
    multi-hop variable task (`a=7;b=a;?b=` -> 7), problems of up to 4 hops.

    Reproducible from --seed. The log (loss, accuracy, loops used at the answers every 50
    steps) is saved as train_log.json in the checkpoint."""
    with _errors():
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        from mythos_deploy.checkpoint import save_checkpoint
        from mythos_deploy.manifest import check_writable
        from mythos_deploy.tokenizer import ByteTokenizer
        from mythos_deploy.train import TrainOptions, train_demo

        if steps < 1:
            raise InputError(f"--steps must be >= 1, got {steps}")
        check_writable(output, force)
        opts = TrainOptions(steps=steps, seed=seed, threads=threads)
        with Progress(TextColumn("training"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TextColumn("{task.description}"), TimeRemainingColumn(), console=err) as progress:
            task = progress.add_task("", total=steps)

            def log(row: dict) -> None:
                progress.update(task, completed=row["step"],
                                description=f"loss {row['loss']:.3f} acc {row['acc']:.3f} "
                                            f"answer loops {row['answer_loops']:.2f}")
            model, history = train_demo(opts, log)
        save_checkpoint(model, output, overwrite=force, tokenizer=ByteTokenizer(n_bytes=128).to_dict(),
                        source={"kind": "train-demo", "task": "hops", "options": dataclasses.asdict(opts)},
                        extra_files={"train_log.json": json.dumps(history, indent=1) + "\n"})
        last = history[-1]
        out.print(f"wrote {output}: {steps} steps in {last['seconds']:.0f} s, final training accuracy "
                  f"{last['acc']:.3f}, loops at the answers {last['answer_loops']:.2f}")


@app.command("eval-hops", epilog="Examples: mythos-export eval-hops checkpoints/hops\n\n"
                                 "mythos-export eval-hops out/hops-loop --compare checkpoints/hops -o out/hops-eval")
def eval_hops(
    path: Path = typer.Argument(..., help="The demo checkpoint, or an ONNX export of it (--loop loop or stepped)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write hops_eval.json and hops_eval.png here."),
    hops_: str = typer.Option("1,2,3,4,5,6,7,8", "--hops", help="Hop counts (trained on 1-4)."),
    loops: str = typer.Option("1,2,3,4,6,8,12,16", help="n_loops values (trained with 6)."),
    count: int = typer.Option(100, help="Problems per cell."),
    seed: int = typer.Option(1234, help="Problem seed (the same problems for every backend)."),
    compare: Optional[Path] = typer.Option(None, help="A second artifact that must make exactly the same predictions (exit 4 otherwise)."),
    act_threshold: Optional[float] = typer.Option(None, help="ACT halting threshold (default: the checkpoint's, 0.99)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Task accuracy by hop count x n_loops, mean ACT loops at the answer, and the per-token
    ACT depth of a sample prompt, through any runtime."""
    with _errors():
        from rich.progress import BarColumn, Progress, TextColumn

        from mythos_deploy.errors import ParityError
        from mythos_deploy.manifest import atomic_output_dir
        from runtimes import load
        from runtimes import hops_eval

        hop_list, loop_list = _parse_ids(hops_, "--hops"), _parse_ids(loops, "--loops")
        if not hop_list or not loop_list:
            raise InputError("--hops and --loops need at least one value each")
        backends = [(str(path), load(path))] + ([(str(compare), load(compare))] if compare else [])
        results = []
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      console=err, transient=True) as progress:
            for name, backend in backends:
                task = progress.add_task(f"evaluating {name}", total=len(hop_list) * len(loop_list))
                results.append(hops_eval.evaluate(backend, hop_list, loop_list, count, seed,
                                                  progress=lambda d, t, task=task: progress.update(task, completed=d),
                                                  act_threshold=act_threshold))
        result = results[0]
        result["depths"] = hops_eval.token_depths(backends[0][1], act_threshold=act_threshold)
        result["artifact"] = str(path)
        if compare:
            diffs = hops_eval.differences(results[0], results[1])
            result["compare"] = {"artifact": str(compare), "identical": not diffs, "differences": diffs}
        if output:
            with atomic_output_dir(output, overwrite=True) as tmp:
                (tmp / "hops_eval.json").write_text(json.dumps(result, indent=1) + "\n")
                try:
                    hops_eval.plot(result, result["depths"], tmp / "hops_eval.png")
                except ImportError:
                    err.print("matplotlib is not installed: no plot (pip install -e '.[bench]')")
        if as_json:
            print(json.dumps(result, indent=1))
        else:
            t = Table(title=f"accuracy on {count} problems per cell (trained: hops 1-4, "
                            f"n_loops {result['trained_loops']})")
            t.add_column("hops \\ n_loops")
            for n in loop_list:
                t.add_column(str(n), justify="right")
            t.add_column("loops at answer", justify="right")
            acc, used = hops_eval.table(result), hops_eval.table(result, "mean_loops_used")
            col = loop_list.index(result["trained_loops"]) if result["trained_loops"] in loop_list else -1
            for k, row, urow in zip(hop_list, acc, used):
                t.add_row(str(k), *[f"{a:.2f}" for a in row], f"{urow[col]:.2f}")
            out.print(t)
            for n in loop_list:
                if n >= result["trained_loops"]:
                    depth = hops_eval.statement_depth(result, n)
                    out.print(f"n_loops={n}: mean ACT loops at a statement's value, by its hop count: " + ", ".join(
                        f"{h}: {v:.2f}" for h, v in depth.items()), highlight=False)
            d = result["depths"]
            out.print(f"ACT loops per token ({d['n_loops']} max): " + " ".join(
                f"{escape(c)}{v}" for c, v in zip(d["text"], d["loops_used"])), highlight=False)
            if compare:
                out.print("[green]identical predictions[/green] in every cell" if result["compare"]["identical"]
                          else "[bold red]predictions differ:[/bold red] " + "; ".join(result["compare"]["differences"]))
            if output:
                out.print(f"wrote {output}/hops_eval.json and hops_eval.png")
        if compare and not result["compare"]["identical"]:
            raise ParityError(f"{compare} does not make the same predictions as {path}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
