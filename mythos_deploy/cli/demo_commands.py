"""Demo-task commands: train-demo, eval-hops."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from mythos_deploy.cli.app import app, out, err, handle_errors, parse_ids
from mythos_deploy.errors import InputError
from mythos_deploy.options import DecodeOptions, ExitMode


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
    with handle_errors():
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
        save_checkpoint(model, output, overwrite=force, tokenizer=ByteTokenizer(n_bytes=128).files(),
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
    hops_: str = typer.Option("1,2,3,4,5,6,7,8", "--hops", metavar="K,K", help="Hop counts (trained on 1-4)."),
    loops: str = typer.Option("1,2,3,4,6,8,12,16", metavar="N,N", help="n_loops values (trained with 6)."),
    count: int = typer.Option(100, help="Problems per cell."),
    seed: int = typer.Option(1234, help="Problem seed (the same problems for every backend)."),
    compare: Optional[Path] = typer.Option(None, help="A second artifact that must make exactly the same predictions (exit 4 otherwise)."),
    act_threshold: Optional[float] = typer.Option(None, help="ACT halting threshold (default: the checkpoint's, 0.99)."),
    exit_mode: ExitMode = typer.Option(ExitMode.NONE, "--exit", help="ACT exit mode for every cell: none (exact), fill-forward "
                                                                     "or propagate (eager, loop and stepped exports)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Task accuracy by hop count x n_loops, mean ACT loops at the answer, and the per-token
    ACT depth of a sample prompt, through any runtime."""
    with handle_errors():
        import numpy as np
        from rich.progress import BarColumn, Progress, TextColumn

        from mythos_deploy.errors import ParityError
        from mythos_deploy.manifest import atomic_output_dir
        from mythos_deploy.runtimes import load
        from mythos_deploy.runtimes import hops_eval

        hop_list, loop_list = parse_ids(hops_, "--hops"), parse_ids(loops, "--loops")
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
                                                  decode=DecodeOptions(act_threshold=act_threshold, exit=exit_mode)))
        result = results[0]
        result["depths"] = hops_eval.token_depths(backends[0][1], decode=DecodeOptions(act_threshold=act_threshold,
                                                                                        exit=exit_mode))
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
            done = d["loops_computed"]
            out.print(f"loops computed per token, decoded one token per call (exit {d['exit']}): mean "
                      f"{np.mean(done):.2f} of {d['n_loops']}, {1 - np.mean(done) / d['n_loops']:.0%} saved", highlight=False)
            if compare:
                out.print("[green]identical predictions[/green] in every cell" if result["compare"]["identical"]
                          else "[bold red]predictions differ:[/bold red] " + "; ".join(result["compare"]["differences"]))
            if output:
                out.print(f"wrote {output}/hops_eval.json and hops_eval.png")
        if compare and not result["compare"]["identical"]:
            raise ParityError(f"{compare} does not make the same predictions as {path}")
