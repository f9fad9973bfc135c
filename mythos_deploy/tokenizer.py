"""Tokenizers: Hugging Face `tokenizer.json` files, read through the `tokenizers` library.

A checkpoint (and every artifact made from it) keeps its tokenizer files beside its weights,
hashed in its manifest: `tokenizer.json`, and where the tokenizer has them
`tokenizer_config.json` and `special_tokens_map.json`, which name the BOS and EOS tokens.

The project's own byte tokenizer (ids `offset..offset+n_bytes-1` are the UTF-8 bytes, ids below
`offset` are specials) is written in the same format: a byte-level BPE without merges, so that
`tokenizer.json` always means one thing. The project's earlier format (`{"type": "bytes"}`)
still loads.

`tokenizers` is imported when a tokenizer is first needed, not with `mythos_deploy`.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mythos_deploy.errors import CheckpointError, InputError, MissingDependencyError

TOKENIZER_JSON, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
TOKENIZER_FILES = (TOKENIZER_JSON, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP)
REPLACEMENT = "\ufffd"


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise MissingDependencyError("text prompts need the `tokenizers` package: pip install tokenizers") from None
    return tokenizers


def byte_to_unicode() -> dict[int, str]:
    """The byte-level BPE alphabet: each byte as one printable character (printable ASCII
    and Latin-1 stand for themselves, the rest are shifted past U+0100)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in table)
    table.update({b: chr(256 + n) for n, b in enumerate(shifted)})
    return dict(sorted(table.items()))


@dataclass(frozen=True)
class ByteTokenizer:
    """The project's byte tokenizer, as a spec; `.json()` is its Hugging Face tokenizer.json."""
    offset: int = 0
    specials: dict[str, int] = field(default_factory=dict)
    n_bytes: int = 256  # 128: ASCII only (the demo checkpoint)

    @property
    def vocab_size(self) -> int:
        return self.offset + self.n_bytes

    def json(self) -> str:
        alphabet = byte_to_unicode()
        names = {i: name for name, i in self.specials.items()}
        specials = {names.get(i, f"<|unused_{i}|>"): i for i in range(self.offset)}  # every id below offset
        added = [{"id": i, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
                  "normalized": False, "special": True} for name, i in specials.items()]
        data = {
            "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": None,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
            "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": {**specials, **{alphabet[b]: b + self.offset for b in range(self.n_bytes)}},
                      "merges": []},
        }
        return json.dumps(data, ensure_ascii=False, indent=1) + "\n"

    def files(self) -> dict[str, str]:
        """The files a checkpoint keeps for this tokenizer."""
        return {TOKENIZER_JSON: self.json()}

    @classmethod
    def from_legacy(cls, data: dict, source: str = "tokenizer") -> "ByteTokenizer":
        """The project's earlier tokenizer.json format: {"type": "bytes", "offset", "specials", "n_bytes"}."""
        offset, specials, n_bytes = data.get("offset", 0), data.get("specials", {}), data.get("n_bytes", 256)
        if (not isinstance(offset, int) or offset < 0 or not isinstance(specials, dict)
                or not isinstance(n_bytes, int) or not 1 <= n_bytes <= 256
                or not all(isinstance(v, int) and 0 <= v < offset for v in specials.values())):
            raise CheckpointError(f"{source}: malformed byte tokenizer")
        return cls(offset, {str(k): int(v) for k, v in specials.items()}, n_bytes)


def _special(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


@dataclass
class Tokenizer:
    """A loaded tokenizer: encode adds BOS when the config says so; `eos_ids` are the default
    stop ids of generation."""
    hf: Any  # tokenizers.Tokenizer
    source: str
    bos_id: int | None = None
    add_bos: bool = False
    eos_ids: tuple[int, ...] = ()
    chat_template: str | None = None  # tokenizer_config.json's (the "default" one of a list)
    special_tokens: dict = field(default_factory=dict)  # bos_token / eos_token text, for the template

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer can produce: one past its largest id."""
        ids = [*self.hf.get_vocab(with_added_tokens=True).values()]
        return max(ids) + 1 if ids else 0

    def encode(self, text: str) -> list[int]:
        ids = self.hf.encode(text).ids
        self._check_lossless(text, ids)
        if self.add_bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id, *ids]
        return ids

    def _check_lossless(self, text: str, ids: list[int]) -> None:
        """A tokenizer without an unknown token drops what it cannot represent; refuse that."""
        expected = self.hf.normalizer.normalize_str(text) if self.hf.normalizer is not None else text
        missing = Counter(c for c in expected if not c.isspace()) - Counter(self.decode(ids, special=True))
        if missing:
            shown = "".join(sorted(missing))[:20]
            ascii_only = self.decode(self.hf.encode("\u00e9").ids) != "\u00e9"  # it cannot even encode 'é'
            raise InputError(f"the prompt has characters this tokenizer cannot encode: {shown!r}"
                             f"{' (it covers ASCII only)' if ascii_only else ''} ({self.source})")

    def decode(self, ids: list[int], special: bool = False) -> str:
        """Text of `ids`; ids the tokenizer does not know (a model's padded vocabulary) are left out."""
        known = self.vocab_size
        return self.hf.decode([i for i in ids if 0 <= i < known], skip_special_tokens=not special)

    def stream(self, prompt: list[int] = ()) -> "TextStream":
        return TextStream(self, list(prompt))

    def summary(self) -> dict[str, Any]:
        return {"vocab_size": self.vocab_size, "bos_id": self.bos_id, "add_bos": self.add_bos,
                "eos_ids": list(self.eos_ids)}


class TextStream:
    """Incremental detokenisation: `push(id)` returns the text that id completes. A character
    whose bytes span several tokens comes out once, when its last byte arrives; never as a
    replacement character. The prompt gives the context (leading spaces, merges). `flush()`
    at the end returns what never completed (bytes that are not UTF-8), as the full decode
    would show it."""

    def __init__(self, tok: Tokenizer, prompt: list[int]):
        self.tok = tok
        known = [i for i in prompt if 0 <= i < tok.vocab_size]
        clean = not tok.decode(known).endswith(REPLACEMENT)  # a prompt ending mid-character gives no context
        self._context = known if clean else []
        self._ids: list[int] = []
        self._text = ""
        self._stream = _tokenizers().decoders.DecodeStream(ids=known if clean else None, skip_special_tokens=True)

    def push(self, token: int) -> str:
        if not 0 <= token < self.tok.vocab_size:
            return ""
        self._ids.append(token)
        piece = self._stream.step(self.tok.hf, token) or ""
        self._text += piece
        return piece

    def flush(self) -> str:
        head = self.tok.decode(self._context) + self._text
        full = self.tok.decode(self._context + self._ids)
        rest = full[len(head):] if full.startswith(head) else ""
        self._text += rest
        return rest


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is corrupt: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return data


def _parse_tokenizer_json(path: Path):
    """tokenizers.Tokenizer from a tokenizer.json, either format."""
    tokenizers = _tokenizers()
    data = _read_json(path)
    if data.get("type") == "bytes":  # the project's earlier format
        text = ByteTokenizer.from_legacy(data, str(path)).json()
    else:
        if "model" not in data:
            raise CheckpointError(f"{path} is not a Hugging Face tokenizer.json (it has no 'model')")
        text = path.read_text(encoding="utf-8")
    try:
        return tokenizers.Tokenizer.from_str(text)
    except Exception as exc:  # tokenizers raises a bare Exception with serde's message
        raise CheckpointError(f"{path} is not a valid tokenizer.json: {str(exc).splitlines()[0][:200]}") from None


def tokenizer_source(path: str | Path) -> Path:
    """The tokenizer.json a user points at: the file itself, or the one in a directory."""
    path = Path(path)
    if path.is_dir():
        if not (path / TOKENIZER_JSON).is_file():
            other = sorted(p.name for p in path.glob("*tokenizer*"))
            hint = f" (it has {', '.join(other)}; only the tokenizers format is read)" if other else ""
            raise InputError(f"{path} has no {TOKENIZER_JSON}{hint}")
        return path / TOKENIZER_JSON
    if not path.is_file():
        raise InputError(f"tokenizer not found: {path}")
    return path


def read_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer from a tokenizer.json file alone, or from a directory with tokenizer.json and
    (optionally) tokenizer_config.json / special_tokens_map.json, which name BOS and EOS."""
    json_path = tokenizer_source(path)
    hf = _parse_tokenizer_json(json_path)
    config: dict = {}
    for name in (SPECIAL_TOKENS_MAP, TOKENIZER_CONFIG) if Path(path).is_dir() else ():  # tokenizer_config wins
        if (json_path.parent / name).is_file():
            config.update({k: v for k, v in _read_json(json_path.parent / name).items() if v is not None})
    tok = Tokenizer(hf, str(json_path))

    def token_id(key: str, value: Any) -> int:
        content = _special(value)
        found = None if content is None else hf.token_to_id(content)
        if found is None:
            raise CheckpointError(f"{json_path.parent}: {key} {value!r} is not a token of {TOKENIZER_JSON}")
        return found

    if "bos_token" in config:
        tok.bos_id = token_id("bos_token", config["bos_token"])
    tok.add_bos = bool(config.get("add_bos_token", False))
    if tok.add_bos and tok.bos_id is None:
        raise CheckpointError(f"{json_path.parent}: add_bos_token is set but no bos_token is named")
    eos = config.get("eos_token")
    eos = eos if isinstance(eos, list) else [] if eos is None else [eos]
    tok.eos_ids = tuple(dict.fromkeys(token_id("eos_token", e) for e in eos))
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}]: the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    tok.chat_template = template if isinstance(template, str) and template.strip() else None
    tok.special_tokens = {k: _special(config[k]) for k in ("bos_token", "eos_token") if _special(config.get(k))}
    return tok


def check_vocab(tok: Tokenizer, vocab_size: int, error: type = InputError, suggest_init: bool = False) -> Tokenizer:
    """Refuse a tokenizer with more ids than the model's vocabulary, in one line."""
    if tok.vocab_size > vocab_size:
        hint = f"; they must match (init takes --set vocab_size={tok.vocab_size})" if suggest_init else ""
        raise error(f"the tokenizer {tok.source} has {tok.vocab_size} ids but the model's vocab_size is "
                    f"{vocab_size}{hint}")
    return tok


def tokenizer_files(path: str | Path, vocab_size: int) -> dict[str, str]:
    """The files to copy into a checkpoint from a user's --tokenizer PATH, checked: they
    parse, name tokens that exist, and fit the model's vocabulary."""
    json_path = tokenizer_source(path)
    check_vocab(read_tokenizer(path), vocab_size, suggest_init=True)
    names = [n for n in TOKENIZER_FILES[1:] if Path(path).is_dir() and (json_path.parent / n).is_file()]
    return {TOKENIZER_JSON: json_path.read_text(encoding="utf-8"),
            **{n: (json_path.parent / n).read_text(encoding="utf-8") for n in names}}


def has_tokenizer(directory: str | Path) -> bool:
    return (Path(directory) / TOKENIZER_JSON).is_file()


def load_tokenizer(directory: str | Path, vocab_size: int) -> Tokenizer:
    """The tokenizer kept in a checkpoint or artifact directory, checked against the model."""
    if not has_tokenizer(directory):
        raise InputError(f"{directory} has no {TOKENIZER_JSON}; give --prompt-ids instead of --prompt "
                         "(or make the checkpoint with --tokenizer PATH)")
    return check_vocab(read_tokenizer(directory), vocab_size, error=CheckpointError)


def carry_tokenizer(src_dir: str | Path, dst_dir: str | Path) -> list[str]:
    """Copy the tokenizer files of `src_dir` (a checkpoint or artifact) into a derived
    artifact being written; returns the names copied."""
    copied = [name for name in TOKENIZER_FILES if (Path(src_dir) / name).is_file()]
    for name in copied:
        shutil.copyfile(Path(src_dir) / name, Path(dst_dir) / name)
    return copied
