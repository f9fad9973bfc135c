"""A byte-level tokenizer saved as tokenizer.json in a checkpoint directory.

Ids `offset..offset+255` are the UTF-8 bytes; ids below `offset` are specials. Text prompts
need this file; token-id prompts always work.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from mythos_deploy.errors import CheckpointError, InputError


@dataclass(frozen=True)
class ByteTokenizer:
    offset: int = 0
    specials: dict[str, int] = field(default_factory=dict)
    n_bytes: int = 256  # 128: ASCII only (the demo checkpoint)

    @property
    def vocab_size(self) -> int:
        return self.offset + self.n_bytes

    def encode(self, text: str) -> list[int]:
        data = text.encode("utf-8")
        bad = next((b for b in data if b >= self.n_bytes), None)
        if bad is not None:
            raise InputError(f"the prompt has a byte 0x{bad:02x} outside this tokenizer's range "
                             f"(bytes below {self.n_bytes}{', i.e. ASCII' if self.n_bytes == 128 else ''})")
        return [b + self.offset for b in data]

    def decode(self, ids: list[int]) -> str:
        data = bytes(i - self.offset for i in ids if self.offset <= i < self.offset + self.n_bytes)
        return data.decode("utf-8", errors="replace")

    def to_dict(self) -> dict:
        data = {"type": "bytes", "offset": self.offset, "specials": self.specials}
        return data if self.n_bytes == 256 else {**data, "n_bytes": self.n_bytes}

    @classmethod
    def from_dict(cls, data: dict, source: str = "tokenizer") -> "ByteTokenizer":
        if not isinstance(data, dict) or data.get("type") != "bytes":
            raise CheckpointError(f"{source}: unsupported tokenizer (expected type 'bytes')")
        offset = data.get("offset", 0)
        specials = data.get("specials", {})
        n_bytes = data.get("n_bytes", 256)
        if (not isinstance(offset, int) or offset < 0 or not isinstance(specials, dict)
                or not isinstance(n_bytes, int) or not 1 <= n_bytes <= 256):
            raise CheckpointError(f"{source}: malformed byte tokenizer")
        return cls(offset, {str(k): int(v) for k, v in specials.items()}, n_bytes)


def load_tokenizer(ckpt_dir: str | Path, vocab_size: int) -> ByteTokenizer:
    path = Path(ckpt_dir) / "tokenizer.json"
    if not path.is_file():
        raise InputError(f"{ckpt_dir} has no tokenizer.json; give --prompt-ids instead of --prompt")
    try:
        tok = ByteTokenizer.from_dict(json.loads(path.read_text()), str(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is corrupt: {exc}") from None
    if tok.vocab_size > vocab_size:
        raise CheckpointError(f"{path} needs {tok.vocab_size} ids but the model has vocab_size={vocab_size}")
    return tok
