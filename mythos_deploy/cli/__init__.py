"""`mythos-export`: a thin typer + rich layer over the library.

`app` holds the shared pieces (error handling, consoles); each `*_commands` module registers
its commands on it when imported, in the order `--help` lists them.
"""

from mythos_deploy.cli.app import app, main
from mythos_deploy.cli import model_commands, export_commands, demo_commands, serve_commands  # noqa: F401  (registration)

__all__ = ["app", "main"]
