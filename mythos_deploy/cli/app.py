"""The `mythos-export` app and what every command shares.

Every command turns a `MythosError` into one red line on stderr and a non-zero exit; `--debug`
shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import errno
import time
from typing import Callable, Iterator

import typer
from rich.console import Console
from rich.markup import escape

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
def handle_errors() -> Iterator[None]:
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


def parse_ids(text: str, what: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise InputError(f"{what} must be comma-separated integers, got {text!r}") from None
    return ids



def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


@contextlib.contextmanager
def stage_progress(planned_seconds: float | None = None, quiet: bool = False) -> Iterator[Callable[[str], None]]:
    """A live line for a long job: the stage, a bar against the memory model's predicted time,
    the stage's and the job's elapsed time and the time left by the plan. Each finished stage
    is printed with its duration, so a log shows where the minutes went. Yields `stage(text)`;
    "A: B" is step B of stage A."""
    from rich.progress import BarColumn, Progress, ProgressColumn, SpinnerColumn, TextColumn
    from rich.progress_bar import ProgressBar
    from rich.text import Text

    planned = float(planned_seconds) if planned_seconds else None
    state = {"top": None, "t0": time.monotonic(), "start": time.monotonic()}

    class PlanBar(BarColumn):
        def render(self, task):
            done = time.monotonic() - state["start"]
            if planned is None:
                return ProgressBar(total=None, width=self.bar_width, pulse=True, animation_time=task.get_time())
            return ProgressBar(total=planned, completed=min(done, 0.99 * planned), width=self.bar_width)

    class Times(ProgressColumn):
        def render(self, task):
            now = time.monotonic()
            text = f"{clock(now - state['t0'])} in stage, {clock(now - state['start'])} in all"
            if planned is not None:
                left = planned - (now - state["start"])
                text += f", ~{clock(left)} left by the plan" if left > 0 else f", {clock(-left)} past the plan"
            return Text(text, style="progress.elapsed")

    def finish_stage(now: float) -> None:
        if state["top"] is not None and not quiet:
            progress.console.print(f"  [green]done[/green] {escape(state['top'])} in {now - state['t0']:.1f} s",
                                   highlight=False)

    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), PlanBar(bar_width=24), Times(),
                        console=err, transient=True, disable=quiet)
    with progress:
        task = progress.add_task("starting", total=None)

        def stage(text: str) -> None:
            top, now = text.split(":")[0], time.monotonic()
            if top != state["top"]:
                finish_stage(now)
                state.update(top=top, t0=now)
            progress.update(task, description=escape(text))

        yield stage
        finish_stage(time.monotonic())


def main() -> None:
    app()
