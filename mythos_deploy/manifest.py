"""Artifact manifests and atomic output directories.

Every artifact directory carries `manifest.json`: what made it (tool version, kind, options,
source hash) and the sha256 of every file. Directories are written to a temporary sibling and
renamed into place only when complete, so a failed stage leaves nothing that looks finished.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from mythos_deploy.errors import CheckpointError, InputError, MythosError
from mythos_deploy.options import OnnxExportOptions, QuantMode
from mythos_deploy.version import __version__

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def tool_version() -> str:
    return __version__


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: Path, kind: str, **fields: Any) -> dict[str, Any]:
    files = {p.relative_to(directory).as_posix(): sha256_file(p)
             for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST}
    manifest = {"format": FORMAT_VERSION, "kind": kind, "tool": "mythos-deploy",
                "tool_version": tool_version(), **fields, "files": files}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return manifest


def carried_fields(manifest: dict[str, Any]) -> dict[str, Any]:
    """A manifest's own fields, without the ones write_manifest sets itself: what a derived
    artifact passes on to write_manifest."""
    return {k: v for k, v in manifest.items() if k not in ("files", "format", "kind", "tool", "tool_version")}


def read_manifest(directory: Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{directory} has no {MANIFEST}; is it a mythos-deploy artifact?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is corrupt: {exc}") from None
    if not isinstance(data, dict) or "files" not in data or "kind" not in data:
        raise CheckpointError(f"{path} is not a mythos-deploy manifest")
    return data


def _json(manifest: "Manifest | dict[str, Any]") -> dict[str, Any]:
    return manifest.data if isinstance(manifest, Manifest) else manifest


def check_manifest_version(manifest: "Manifest | dict[str, Any]", path: Path) -> None:
    manifest = _json(manifest)
    if manifest.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: manifest format {manifest.get('format')!r} is not {FORMAT_VERSION}; "
                              "re-export with this version of mythos-deploy")
    theirs, ours = str(manifest.get("tool_version", "?")), tool_version()
    if theirs.split(".")[:2] != ours.split(".")[:2]:
        raise CheckpointError(f"{path} was made by mythos-deploy {theirs}; this is {ours}. Re-export it "
                              "(or pass verify=False / --no-verify to load it anyway)")


@dataclass(frozen=True)
class Manifest:
    """A manifest.json, parsed and checked once when its artifact is opened. `data` is the
    JSON as written (what a derived artifact carries on); ONNX and TensorRT artifacts also
    have their export options, typed."""
    data: dict[str, Any]
    options: OnnxExportOptions | None = None

    @classmethod
    def parse(cls, data: dict[str, Any], where: str | Path = "manifest") -> "Manifest":
        if not isinstance(data, dict) or "files" not in data or "kind" not in data:
            raise CheckpointError(f"{where}: not a mythos-deploy manifest")
        options = None
        if data["kind"] in ("onnx", "tensorrt"):
            raw = data.get("options")
            if not isinstance(raw, dict) or "loop" not in raw or "loops" not in raw:
                raise CheckpointError(f"{where}: the manifest records no export options")
            try:
                options = OnnxExportOptions.from_manifest(raw)
            except (InputError, TypeError) as exc:
                raise CheckpointError(f"{where}: the manifest's export options are invalid ({exc})") from None
        return cls(data, options)

    @classmethod
    def read(cls, directory: str | Path) -> "Manifest":
        return cls.parse(read_manifest(Path(directory)), Path(directory) / MANIFEST)

    @property
    def kind(self) -> str:
        return self.data["kind"]

    @property
    def files(self) -> dict[str, str]:
        return self.data["files"]

    @property
    def config(self) -> dict[str, Any]:
        return self.data["config"]

    @property
    def source(self) -> dict[str, Any]:
        return self.data.get("source") or {}

    @property
    def quantization(self) -> dict[str, Any] | None:
        return self.data.get("quantization") or None

    @property
    def quant_mode(self) -> QuantMode | None:
        q = self.quantization
        return QuantMode(q["mode"]) if q and q.get("mode") in tuple(QuantMode) else None

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def with_options(self, **changes: Any) -> "Manifest":
        """A copy whose export options differ (for instance the standard-lowering twin of a
        plugin export, which onnxruntime can run)."""
        options = dataclasses.replace(self.options, **changes)
        return Manifest({**self.data, "options": options.to_dict()}, options)

    def with_fields(self, **fields: Any) -> "Manifest":
        return Manifest({**self.data, **fields}, self.options)


def verify_files(directory: Path, manifest: "Manifest | dict[str, Any]") -> None:
    """Check every file listed in the manifest exists and has the recorded sha256."""
    manifest = _json(manifest)
    bad = []
    for rel, digest in manifest["files"].items():
        path = Path(directory) / rel
        if not path.is_file():
            bad.append(f"{rel} (missing)")
        elif sha256_file(path) != digest:
            bad.append(f"{rel} (sha256 mismatch)")
    if bad:
        raise CheckpointError(f"{directory} does not match its manifest: {', '.join(bad)}")


def _output_parent(target: Path, overwrite: bool) -> Path:
    """The directory `target` will be created in (made if needed); refuses an existing target."""
    if target.exists() and not overwrite:
        raise MythosError(f"output {target} already exists (pass --force to replace it)")
    parent = target.parent if str(target.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MythosError(f"cannot write to {parent}: {exc.strerror or exc}") from None
    return parent


def check_writable(target: str | Path, overwrite: bool = False) -> None:
    """Fail fast (before minutes of work) if `target` cannot be created."""
    parent = _output_parent(Path(target), overwrite)
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as exc:
        raise MythosError(f"cannot write to {parent}: {exc.strerror or exc}") from None


@contextlib.contextmanager
def output_lock(target: Path, parent: Path) -> Iterator[None]:
    """An exclusive advisory lock on `parent/.NAME.lock` so a second writer of the same output
    fails at once instead of racing (the final rename is atomic either way). POSIX only."""
    try:
        import fcntl
    except ImportError:  # Windows: the atomic rename is the only guard
        yield
        return
    lock = parent / f".{target.name}.lock"
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise MythosError(f"cannot write to {parent}: {exc.strerror or exc}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise MythosError(f"another mythos-export is writing {target} right now "
                              f"(lock {lock}); wait for it to finish") from None
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.unlink(lock)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output_dir(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `target` only if the block succeeds. A second
    writer of the same target fails at once (output_lock)."""
    target = Path(target)
    parent = _output_parent(target, overwrite)
    with output_lock(target, parent):
        _output_parent(target, overwrite)  # again: a writer that held the lock may have made it
        yield from _atomic_output_dir(target, parent)


def _atomic_output_dir(target: Path, parent: Path) -> Iterator[Path]:
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; an artifact is an ordinary directory
    except OSError as exc:
        raise MythosError(f"cannot write to {parent}: {exc.strerror or exc}") from None
    try:
        yield tmp
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=parent))
            os.replace(target, old / "x")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise MythosError(f"failed writing {target}: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
