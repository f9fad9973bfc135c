"""Commands on checkpoints: init, import-openmythos, inspect, generate, parity."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from mythos_deploy.cli.app import app, out, err, handle_errors, parse_ids, fmt_bytes
from mythos_deploy.errors import InputError
from mythos_deploy.options import BackendName, DecodeOptions, ExitMode, Provider, WeightDtype


TOKENIZER_HELP = ("A Hugging Face tokenizer: a tokenizer.json, or a directory with tokenizer.json and "
                  "tokenizer_config.json / special_tokens_map.json (BOS, EOS). Copied into the checkpoint; "
                  "its vocabulary must fit vocab_size.")


@app.command(epilog="Examples: mythos-export init --preset tiny --set max_loop_iters=6 --seed 1 -o ckpt/tiny\n\n"
                    "mythos-export init --preset tiny --tokenizer my-tokenizer/ --set vocab_size=8000 -o ckpt/tok")
def init(
    output: Path = typer.Option(..., "-o", "--output", help="Checkpoint directory to create."),
    preset: str = typer.Option("tiny", help="tiny, bench, 1b, 3b, 10b, 50b, 100b, 500b or 1t."),
    set_: List[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="Override a config field: key=value (repeatable)."),
    seed: int = typer.Option(0, help="Seed for the random weights."),
    tokenizer: Optional[Path] = typer.Option(None, help=TOKENIZER_HELP + " Default: the byte tokenizer "
                                                         "(when vocab_size >= 256)."),
    force: bool = typer.Option(False, "--force", help="Replace OUTPUT if it exists."),
    force_plan: bool = typer.Option(False, "--force-plan", help="Run even if the memory model predicts it will not "
                                                                "fit this machine's RAM or disk."),
) -> None:
    """Make a checkpoint with random weights (OpenMythos's initialisation) from a preset.
    Refused up front when the memory model (inspect --plan) says it will not fit here."""
    with handle_errors():
        from mythos_deploy.checkpoint import save_checkpoint
        from mythos_deploy.config import MythosConfig, parse_overrides
        from mythos_deploy.model import MythosModel
        from mythos_deploy.stats import parameter_counts
        from mythos_deploy.tokenizer import ByteTokenizer, tokenizer_files

        cfg = MythosConfig.from_name(preset).replace(**parse_overrides(set_))
        from mythos_deploy.plan import check_plan, plan_stage
        total = parameter_counts(cfg)["total"]
        line = check_plan(plan_stage(cfg, "init"), output, force_plan)
        if total > 100_000_000:
            err.print(f"plan: {escape(line)}")
        files = (tokenizer_files(tokenizer, cfg.vocab_size) if tokenizer is not None
                 else ByteTokenizer().files() if cfg.vocab_size >= 256 else None)
        with err.status(f"initialising {total / 1e6:.2f}M parameters"):
            model = MythosModel(cfg).init_weights(seed)
            save_checkpoint(model, output, overwrite=force, tokenizer=files,
                            source={"kind": "init", "preset": preset, "seed": seed, "overrides": set_})
        out.print(f"wrote {output} ({total / 1e6:.2f}M parameters, preset {preset})")


@app.command("import-openmythos",
             epilog="Example: mythos-export import-openmythos om.pt --config om_config.json --tokenizer om-tokenizer/ -o ckpt/om")
def import_openmythos(
    path: Path = typer.Argument(..., help="OpenMythos weights: .safetensors, or a torch state dict (.pt/.pth/.bin; loaded with weights_only=True)."),
    output: Path = typer.Option(..., "-o", "--output", help="Checkpoint directory to create."),
    config: Optional[Path] = typer.Option(None, help="JSON of OpenMythos MythosConfig fields (default: config.json beside PATH)."),
    tokenizer: Optional[Path] = typer.Option(None, help=TOKENIZER_HELP + " Without it, text prompts need "
                                                         "--prompt-ids."),
    force: bool = typer.Option(False, "--force", help="Replace OUTPUT if it exists."),
) -> None:
    """Convert OpenMythos 0.5.0 weights into a mythos-deploy checkpoint (no pickle is executed)."""
    with handle_errors():
        from mythos_deploy.checkpoint import save_checkpoint
        from mythos_deploy.manifest import sha256_file
        from mythos_deploy.openmythos_import import from_openmythos_file
        from mythos_deploy.tokenizer import tokenizer_files

        model = from_openmythos_file(path, config)
        files = None if tokenizer is None else tokenizer_files(tokenizer, model.cfg.vocab_size)
        save_checkpoint(model, output, overwrite=force, tokenizer=files,
                        source={"kind": "openmythos", "file": path.name, "sha256": sha256_file(path)})
        out.print(f"imported {path} -> {output}")

@app.command(epilog="Examples: mythos-export inspect ckpt/tiny   |   mythos-export inspect --preset 1t --json")
def inspect(
    path: Optional[Path] = typer.Argument(None, help="A checkpoint or ONNX artifact directory."),
    preset: Optional[str] = typer.Option(None, help="Inspect a preset's config instead of a directory."),
    loops: Optional[int] = typer.Option(None, help="Loop count for cache sizes (default max_loop_iters)."),
    dtype: str = typer.Option("fp32", metavar="fp32|fp16|bf16|int8", help="Cache element type for byte counts: fp32, fp16, bf16, int8."),
    halting: bool = typer.Option(True, "--halting/--no-halting", help="Checkpoints: run 4 seeded random prompts and report "
                                                                     "the ACT halting profile (ill-conditioned positions)."),
    plan: bool = typer.Option(False, "--plan", help="The memory model: predicted peak RAM, disk and time of init, export "
                                                    "(with and without the parity gate), int4 quantization and int4 generate, "
                                                    "and whether each fits this machine."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """Parameters (total, active per token per loop), cache bytes per token and the config;
    for checkpoints also how ACT halting behaves on sample prompts; with --plan what each
    stage needs (mythos-export inspect --preset 3b --plan)."""
    with handle_errors():
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
        profile = None
        if plan:
            halting = False
        if halting and path is not None and artifact is None:
            from mythos_deploy.checkpoint import load_checkpoint
            from mythos_deploy.stats import halting_profile
            with err.status("halting profile: 4 random prompts"):
                profile = halting_profile(load_checkpoint(path), n_loops=loops)
        params = parameter_counts(cfg)
        cache = cache_bytes_per_token(cfg, loops, dtype)
        report = {"source": str(path) if path else f"preset:{preset}", "config": cfg.to_dict(),
                  "parameters": params, "cache_bytes_per_token": cache, "cache_dtype": dtype,
                  "cache_reduction": {k: round(cache[k] / cache["mythos_deploy"], 3)
                                      for k in ("openmythos", "equivalent_gqa", "equivalent_mha")}}
        if artifact:
            report["artifact"] = artifact
        if profile:
            report["halting"] = profile
        if path is not None:
            from mythos_deploy.tokenizer import has_tokenizer, load_tokenizer
            if has_tokenizer(path):
                report["tokenizer"] = load_tokenizer(path, cfg.vocab_size).summary()
        if plan:
            from mythos_deploy.plan import available_memory, duration_text, free_disk, plan_all, plan_dict
            plans = plan_all(cfg)
            mem, disk = available_memory(), free_disk(Path.cwd())
            report["plan"] = {"stages": plan_dict(plans), "available_memory": mem, "free_disk": disk}
        if as_json:
            print(json.dumps(report, indent=2))
            return
        if plan:
            t = Table(title=f"plan ({report['source']}; this machine: {(mem or 0) / 1e9:.1f} GB RAM available, "
                            f"{(disk or 0) / 1e9:.1f} GB disk free)")
            for col in ("stage", "peak RAM", "disk", "time (2 cores)", "fits here"):
                t.add_column(col, justify="left" if col in ("stage", "fits here") else "right")
            for p in plans:
                fits = (mem is None or p.peak_rss <= mem) and (disk is None or p.disk <= disk)
                t.add_row(p.stage, f"{p.peak_rss / 1e9:.1f} GB", f"{p.disk / 1e9:.1f} GB", duration_text(p.seconds),
                          "[green]yes[/green]" if fits else "[red]no[/red]")
            out.print(t)
            return
        t = Table(title=f"parameters ({report['source']})")
        t.add_column("part"), t.add_column("count", justify="right")
        for k, v in params.items():
            t.add_row(k.replace("_", " "), f"{v:,}")
        out.print(t)
        c = Table(title=f"cache per token, {cache['slots']} slots, {dtype}")
        c.add_column("layout"), c.add_column("bytes/token", justify="right"), c.add_column("x ours", justify="right")
        for k in ("mythos_deploy", "openmythos", "equivalent_gqa", "equivalent_mha"):
            c.add_row(k.replace("_", " "), fmt_bytes(cache[k]), f"{cache[k] / cache['mythos_deploy']:.2f}")
        out.print(c)
        g = Table(title="config")
        g.add_column("field"), g.add_column("value", justify="right")
        for k, v in cfg.to_dict().items():
            g.add_row(k, str(v))
        out.print(g)
        if profile:
            p = profile
            out.print(f"halting on {p['prompts']} random prompts x {p['length']} tokens, {p['n_loops']} loops: mean loops "
                      f"used {p['mean_loops_used']:.2f}, never halted {p['never_halted_fraction']:.1%}, "
                      f"ill-conditioned {p['ill_conditioned_fraction']:.1%} (cumulative halting probability "
                      f"< {p['threshold']:g}; min {p['min_cumulative_halt_prob']:.2e})")
            if p["ill_conditioned_fraction"] > 0:
                out.print("[yellow]note:[/yellow] ill-conditioned positions output a near-zero vector that the coda's "
                          "RMSNorm rescales: their logits depend on rounding, so an export or a quantization can "
                          "disagree with eager there (check it with mythos-export parity)")
        if "tokenizer" in report:
            t = report["tokenizer"]
            out.print(f"tokenizer: {t['vocab_size']} ids, BOS {t['bos_id']} ({'added' if t['add_bos'] else 'not added'}), "
                      f"EOS {', '.join(map(str, t['eos_ids'])) or 'none'}")
        if artifact:
            a = Table(title="artifact")
            a.add_column("field"), a.add_column("value")
            for k, v in artifact.items():
                a.add_row(k, escape(json.dumps(v) if isinstance(v, (dict, list)) else str(v)))
            out.print(a)


@app.command(epilog="Examples: mythos-export generate ckpt/tiny --prompt 'hello' --max-new-tokens 16\n\n"
                    "mythos-export generate out/tiny-onnx --prompt-ids 1,2,3 --temperature 0.8 --top-p 0.9 --seed 7 --json\n\n"
                    "mythos-export generate out/tiny-loop --prompt 'x' --loops 8 --exit fill-forward\n\n"
                    "mythos-export generate out/tiny-onnx --prompt 'a' --prompt 'a longer one' --max-batch 4 --json")
def generate(
    path: Path = typer.Argument(..., help="A checkpoint directory (eager) or an ONNX artifact directory (onnxruntime)."),
    prompt: List[str] = typer.Option([], help="Text prompt, encoded with the artifact's tokenizer (BOS added "
                                              "when its config says so). Repeat it for several requests at once."),
    prompt_ids: List[str] = typer.Option([], metavar="1,2,3", help="Comma-separated token ids, e.g. 1,2,3 "
                                                                   "(repeatable)."),
    requests: Optional[Path] = typer.Option(None, metavar="FILE.jsonl", help="One request per line: "
                                            '{"prompt": "text"} or {"prompt_ids": [1, 2]}, with optional '
                                            "max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, "
                                            "stop_ids; the other options are the defaults."),
    max_batch: int = typer.Option(8, help="Several requests run together through the batching engine, at most "
                                          "this many at once (each at its own length)."),
    chunk: int = typer.Option(64, help="Several requests: prompt tokens prefilled per engine step."),
    max_new_tokens: int = typer.Option(32, help="Tokens to generate."),
    greedy: bool = typer.Option(False, "--greedy", help="Greedy decoding (the default when no sampling option is given)."),
    temperature: Optional[float] = typer.Option(None, help="Sampling temperature (0 = greedy)."),
    top_k: int = typer.Option(0, help="Sample from the k most likely tokens (0 = off)."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling mass (1.0 = off)."),
    repetition_penalty: float = typer.Option(1.0, help="Penalise tokens already in the sequence (1.0 = off)."),
    seed: int = typer.Option(0, help="Sampling seed."),
    loops: Optional[int] = typer.Option(None, help="Recurrent loops per token (default max_loop_iters; may exceed it)."),
    act_threshold: Optional[float] = typer.Option(None, help="ACT halting threshold in (0, 1] (default from config)."),
    exit_mode: ExitMode = typer.Option(ExitMode.NONE, "--exit", help="none: every loop for every token (exact); fill-forward: stop a "
                                                          "token's loop once halted, later cache slots copy the last latent "
                                                          "(loop/stepped exports, and eager); propagate: stop once halted, "
                                                          "later slots computed from the halted state (eager, loop and stepped exports)."),
    stop_ids: Optional[str] = typer.Option(None, metavar="ID,ID", help="Comma-separated ids that end generation "
                                                                        "(default: the tokenizer's EOS ids; 'none': no stop ids)."),
    max_length: Optional[int] = typer.Option(None, help="Cap on prompt + generated length (default max_seq_len)."),
    backend: BackendName = typer.Option(BackendName.AUTO, help="auto (from the manifest), eager, onnxruntime or tensorrt (engine directories "
                                             "from mythos-export build)."),
    provider: Provider = typer.Option(Provider.CPU, help="cpu or cuda (onnxruntime-gpu; for checkpoints the torch-on-CUDA path, with the "
                                             "Triton MoE kernel when triton is installed)."),
    dtype: WeightDtype = typer.Option(WeightDtype.FP32, help="Checkpoints only: fp32, fp16 or bf16."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip the manifest version and sha256 checks."),
    as_json: bool = typer.Option(False, "--json", help="Print token ids, per-token loops used and timings as JSON."),
) -> None:
    """Generate from a checkpoint or an exported artifact, streaming tokens. Several prompts
    (or --requests) run together through the continuous-batching engine; results come back
    per request, in order."""
    with handle_errors():
        from mythos_deploy.cli.batch import run_batch
        from mythos_deploy.runtimes import load
        from mythos_deploy.runtimes.generation import generate as run_generation
        from mythos_deploy.runtimes.sampling import SamplingParams

        if not prompt and not prompt_ids and requests is None:
            raise InputError("give --prompt TEXT, --prompt-ids 1,2,3 or --requests FILE.jsonl")
        sampling_given = temperature is not None or top_k != 0 or top_p != 1.0
        if greedy and sampling_given:
            raise InputError("--greedy cannot be combined with --temperature/--top-k/--top-p")
        params = SamplingParams(greedy=not sampling_given, temperature=1.0 if temperature is None else temperature,
                                top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty, seed=seed)
        engine = load(path, backend=backend, provider=provider, verify=not no_verify, dtype=dtype)
        tok = engine.tokenizer
        if prompt and tok is None:
            raise InputError(f"{path} carries no tokenizer.json; give --prompt-ids instead of --prompt "
                             "(or make the checkpoint with --tokenizer PATH)")
        if stop_ids is not None:
            stops = parse_ids(stop_ids, "--stop-ids") if stop_ids.strip().lower() != "none" else []
        else:  # the tokenizer's EOS ids
            stops = list(tok.eos_ids) if tok else []
        decode = DecodeOptions(loops, act_threshold, exit_mode)
        if requests is not None or len(prompt) + len(prompt_ids) > 1:
            run_batch(engine, prompt, prompt_ids, requests, max_new_tokens, params, stops, decode, max_length,
                      max_batch, chunk, as_json)
            return
        ids = tok.encode(prompt[0]) if prompt else parse_ids(prompt_ids[0], "--prompt-ids")
        if not ids:
            raise InputError("the prompt is empty")
        stream = tok.stream(ids) if tok else None

        def show(ev) -> None:
            piece = stream.push(ev.tokens[0]) if stream else f"{ev.tokens[0]} "
            out.print(piece, end="", markup=False, highlight=False)

        result = run_generation(engine, ids, max_new_tokens, sampling=params, stop_tokens=stops, decode=decode,
                                max_length=max_length, on_event=None if as_json else show)
        if as_json:
            data = {"backend": engine.name, **result.to_dict()}
            data["text"] = tok.decode(result.tokens[0]) if tok else None
            print(json.dumps(data))
        else:
            out.print(stream.flush() if stream else "", markup=False, highlight=False)
            n = len(result.decode_seconds)
            rate = f", {n / sum(result.decode_seconds):.1f} tok/s decode" if n else ""
            err.print(f"[dim]{escape(engine.name)}: {len(result.tokens[0])} tokens, mean loops used "
                      f"{sum(result.loops_used[0]) / len(result.loops_used[0]):.2f}, prefill "
                      f"{result.prefill_seconds * 1e3:.1f} ms{rate}, stop: {result.stop_reason}[/dim]")


@app.command(epilog="Examples: mythos-export parity ckpt/tiny out/tiny-onnx\n\n"
                    "mythos-export parity out/tiny-loop out/tiny-loop --exit-b fill-forward --tolerance 1 --json")
def parity(
    a: Path = typer.Argument(..., help="Reference artifact (checkpoint or ONNX directory)."),
    b: Path = typer.Argument(..., help="Artifact to check against A."),
    tokens: int = typer.Option(32, help="Greedy tokens per prompt (B is teacher-forced with A's tokens)."),
    prompts: int = typer.Option(3, help="Number of random prompts (seeded)."),
    prompt_len: int = typer.Option(8, help="Prompt length."),
    loops: Optional[int] = typer.Option(None, help="Loop count for both (default: each artifact's default)."),
    exit_a: ExitMode = typer.Option(ExitMode.NONE, help="A's exit mode: none, fill-forward or propagate (eager, loop/stepped exports)."),
    exit_b: ExitMode = typer.Option(ExitMode.NONE, help="B's exit mode: none, fill-forward or propagate (eager, loop/stepped exports)."),
    tolerance: float = typer.Option(1e-4, help="Max abs logit error allowed."),
    min_agreement: float = typer.Option(1.0, help="Minimum greedy-token agreement."),
    seed: int = typer.Option(0, help="Prompt seed."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Compare two artifacts/backends on the same prompts; exit 4 beyond tolerance."""
    with handle_errors():
        import numpy as np

        from mythos_deploy.errors import ParityError
        from mythos_deploy.runtimes import load
        from mythos_deploy.runtimes.parity import compare

        ea, eb = load(a), load(b)
        rng = np.random.default_rng(seed)
        plist = rng.integers(0, ea.cfg.vocab_size, size=(prompts, prompt_len)).tolist()
        report = compare(ea, eb, plist, tokens, decode_a=DecodeOptions(loops, None, exit_a),
                         decode_b=DecodeOptions(loops, None, exit_b), tolerance=tolerance, min_agreement=min_agreement)
        if as_json:
            print(json.dumps(report.to_dict(), indent=2))
        else:
            t = Table(title=f"parity: {escape(report.a)} ({exit_a}) vs {escape(report.b)} ({exit_b})")
            for col in ("prompt", "steps", "max abs logit err", "greedy agree", "loops_used agree", "loops run A/B"):
                t.add_column(col, justify="right")
            for i, r in enumerate(report.prompts):
                t.add_row(str(i), str(r.steps), f"{r.max_abs_logit_error:.2e}", f"{r.greedy_agreement:.3f}",
                          f"{r.loops_used_agreement:.3f}", f"{r.loops_run_a:.2f}/{r.loops_run_b:.2f}")
            out.print(t)
            verdict = "[green]PASS[/green]" if report.passed else "[bold red]FAIL[/bold red]"
            out.print(f"{verdict}: max abs logit error {report.max_abs_logit_error:.2e} (tolerance {tolerance:g}), "
                      f"greedy agreement {report.greedy_agreement:.3f} (min {min_agreement:g})")
        if not report.passed:
            raise ParityError(f"{b} differs from {a} beyond tolerance")
