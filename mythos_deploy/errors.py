"""Typed errors. Everything a user can cause is a `MythosError`; the CLI prints its message
on one line and exits non-zero. `InternalError` marks a bug in this project instead."""


class MythosError(Exception):
    """Base class for every error caused by input: configs, files, arguments."""

    exit_code = 2


class ConfigError(MythosError):
    """An impossible or unknown config value; the message names the field."""


class CheckpointError(MythosError):
    """A missing, corrupt, or mismatched checkpoint or weight file."""


class InputError(MythosError):
    """Bad runtime input: token ids, lengths, sampling parameters, loop counts."""


class CacheError(MythosError):
    """Misuse of the latent cache: budget exceeded, loop count mismatch, batch mismatch."""


class MissingDependencyError(MythosError):
    """An optional engine (tensorrt, triton, onnxruntime-gpu, ...) is not installed."""


class NumericalError(MythosError):
    """NaN or Inf in weights or in a runtime's outputs; the message names the stage."""


class InternalError(Exception):
    """A bug in mythos-deploy, not in the user's input. Not a MythosError on purpose."""


class ParityError(MythosError):
    """An export's outputs differ from the eager reference beyond tolerance."""

    exit_code = 4

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report
