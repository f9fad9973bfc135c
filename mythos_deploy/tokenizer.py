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

    @property
    def vocab_size(self) -> int:
        return self.offset + 256

    def encode(self, text: str) -> list[int]:
        return [b + self.offset for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        data = bytes(i - self.offset for i in ids if self.offset <= i < self.offset + 256)
        return data.decode("utf-8", errors="replace")

    def to_dict(self) -> dict:
        return {"type": "bytes", "offset": self.offset, "specials": self.specials}

    @classmethod
    def from_dict(cls, data: dict, source: str = "tokenizer") -> "ByteTokenizer":
        if not isinstance(data, dict) or data.get("type") != "bytes":
            raise CheckpointError(f"{source}: unsupported tokenizer (expected type 'bytes')")
        offset = data.get("offset", 0)
        specials = data.get("specials", {})
        if not isinstance(offset, int) or offset < 0 or not isinstance(specials, dict):
            raise CheckpointError(f"{source}: malformed byte tokenizer")
        return cls(offset, {str(k): int(v) for k, v in specials.items()})


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
