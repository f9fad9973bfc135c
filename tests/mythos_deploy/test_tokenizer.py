"""Tokenizers through the `tokenizers` library: the byte tokenizer in Hugging Face format, and
BPE tokenizers trained here on the spot (never downloaded), carried from checkpoint to artifact."""

import json
import shutil

import pytest
from typer.testing import CliRunner

pytest.importorskip("tokenizers")
from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

from mythos_deploy import hops  # noqa: E402
from mythos_deploy.cli import app  # noqa: E402
from mythos_deploy.errors import CheckpointError, InputError  # noqa: E402
from mythos_deploy.tokenizer import ByteTokenizer, read_tokenizer  # noqa: E402

runner = CliRunner()
CORPUS = ["héllo wörld, ça va? naïve café", "日本語のテキストと絵文字 🙂🙃", "the loop runs again and again",
          "Ελληνικά και русский текст", "mixed: 東京 → Zürich, 1234 ✓"]
TEXTS = ["héllo 日本 wörld", "🙂 naïve → café", "plain ascii", "Zürich ✓ русский", "  spaced\tout\n"]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def last_json(r):
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A byte-level BPE with <s>/</s> trained on the spot, saved as a Hugging Face directory:
    tokenizer.json, tokenizer_config.json (add_bos_token) and special_tokens_map.json."""
    tok = HFTokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 20, trainer)
    d = tmp_path_factory.mktemp("tok") / "bpe"
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "add_bos_token": True}))
    (d / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": "</s>"}, "bos_token": "<s>"}))
    return d


@pytest.fixture(scope="module")
def tok_ckpt(trained, tmp_path_factory):
    ck = tmp_path_factory.mktemp("tokck") / "ck"
    r = run("init", "--preset", "tiny", "--set", "vocab_size=320", "--set", "max_loop_iters=2",
            "--tokenizer", trained, "-o", ck)
    assert r.exit_code == 0, r.output
    return ck


def test_byte_tokenizer_is_a_hugging_face_tokenizer(tmp_path):
    spec = ByteTokenizer(offset=3, specials={"<pad>": 0, "<eos>": 2})
    (tmp_path / "tokenizer.json").write_text(spec.json())
    hf = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))  # another tool reads it as it is
    text = "aé日\x00"
    assert hf.encode(text).ids == [b + 3 for b in text.encode()]
    assert hf.token_to_id("<eos>") == 2 and hf.decode([*hf.encode(text).ids]) == text
    tok = read_tokenizer(tmp_path)
    assert tok.vocab_size == 259 and tok.encode(text) == hf.encode(text).ids
    # the ASCII-only demo tokenizer refuses what it cannot encode rather than dropping it
    with pytest.raises(InputError, match="cannot encode: 'é'"):
        (tmp_path / "tokenizer.json").write_text(ByteTokenizer(n_bytes=128).json())
        read_tokenizer(tmp_path).encode("café")


def test_the_old_byte_format_loads_with_the_same_ids(tmp_path):
    (tmp_path / "tokenizer.json").write_text(json.dumps({"type": "bytes", "offset": 2, "specials": {"<s>": 1}}))
    tok = read_tokenizer(tmp_path)
    assert tok.encode("hé") == [b + 2 for b in "hé".encode()] and tok.hf.token_to_id("<s>") == 1


def test_demo_checkpoint_is_migrated_and_hops_ids_are_unchanged():
    from mythos_deploy.checkpoint import load_checkpoint
    data = json.loads(open("checkpoints/hops/tokenizer.json").read())
    assert data["model"]["type"] == "BPE" and "type" not in data
    load_checkpoint("checkpoints/hops")  # its manifest hashes still verify
    tok = read_tokenizer("checkpoints/hops")
    for n_hops in range(1, 7):
        for problem in hops.eval_set(n_hops, 10):
            assert tok.encode(problem.text) == hops.encode(problem.text)


@pytest.mark.parametrize("text", TEXTS)
def test_trained_bpe_round_trips_text_and_adds_bos(trained, text):
    tok = read_tokenizer(trained)
    ids = tok.encode(text)
    assert ids[0] == tok.hf.token_to_id("<s>") and ids.count(ids[0]) == 1
    assert tok.decode(ids) == text and tok.eos_ids == (tok.hf.token_to_id("</s>"),)
    # and a tokenizer.json given alone has no BOS/EOS config
    alone = read_tokenizer(trained / "tokenizer.json")
    assert alone.encode(text) == ids[1:] and alone.eos_ids == ()


@pytest.mark.parametrize("text", TEXTS)
def test_streaming_prints_each_character_once_it_is_complete(trained, text):
    tok = read_tokenizer(trained)
    ids = tok.encode(text)
    stream = tok.stream(ids[:1])
    pieces = [stream.push(i) for i in ids[1:]]
    assert "".join(pieces) == text and "\ufffd" not in "".join(pieces) and stream.flush() == ""
    # a byte tokenizer splits every multi-byte character: it comes out once, on its last byte
    byte_tok = ByteTokenizer()
    (trained.parent / "bytes").mkdir(exist_ok=True)
    (trained.parent / "bytes" / "tokenizer.json").write_text(byte_tok.json())
    bt = read_tokenizer(trained.parent / "bytes")
    stream = bt.stream([])
    pieces = [stream.push(i) for i in bt.encode(text)]
    assert "".join(pieces) == text and all(p == "" or "\ufffd" not in p for p in pieces)
    assert [p for p in pieces if p] == list(text)
    stream = bt.stream(bt.encode("a"))
    assert stream.push("é".encode()[0]) == "" and stream.flush() == "\ufffd"  # cut short: shown at the end


def test_vocab_mismatch_is_refused_with_both_numbers(trained, tmp_path):
    r = run("init", "--preset", "tiny", "--tokenizer", trained, "-o", tmp_path / "ck")
    assert r.exit_code == 2 and "has 300 ids but the model's vocab_size is 256" in r.output, r.output
    assert not (tmp_path / "ck").exists() and "Traceback" not in r.output


def test_generate_text_from_a_checkpoint_and_its_export(tok_ckpt, artifacts, tmp_path):
    manifest = json.loads((tok_ckpt / "manifest.json").read_text())
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= set(manifest["files"])
    prompt = "héllo 日本"
    r = run("generate", tok_ckpt, "--prompt", prompt, "--max-new-tokens", "6", "--stop-ids", "none", "--json")
    assert r.exit_code == 0, r.output
    want = last_json(r)
    tok = read_tokenizer(tok_ckpt)
    assert want["prompt"] == [tok.encode(prompt)] and want["text"] == tok.decode(want["tokens"][0])
    r = run("inspect", tok_ckpt, "--json", "--no-halting")
    assert json.loads(r.stdout)["tokenizer"] == {"vocab_size": 300, "bos_id": 0, "add_bos": True, "eos_ids": [1]}
    # an export keeps its own copy (quantized artifacts and engine directories: test_quantize,
    # test_trt_build): it works with its source checkpoint gone
    ck, src = artifacts[("mla", "unroll")]
    ox = tmp_path / "ox"
    shutil.copytree(src, ox)
    data = json.loads((ox / "manifest.json").read_text())
    assert data["files"]["tokenizer.json"] == json.loads((ck / "manifest.json").read_text())["files"]["tokenizer.json"]
    data["source"]["checkpoint"] = str(tmp_path / "gone")
    (ox / "manifest.json").write_text(json.dumps(data))
    runs = [run("generate", d, "--prompt", prompt, "--max-new-tokens", "6", "--json") for d in (ck, ox)]
    assert all(r.exit_code == 0 for r in runs), runs[1].output
    assert last_json(runs[0])["tokens"] == last_json(runs[1])["tokens"]
    assert last_json(runs[1])["prompt"] == [list(prompt.encode())]


def test_eos_from_the_tokenizer_config_stops_generation(trained, tok_ckpt, tmp_path):
    r = run("generate", tok_ckpt, "--prompt", "the loop", "--max-new-tokens", "6", "--stop-ids", "none", "--json")
    first = last_json(r)["tokens"][0][0]
    # a checkpoint whose EOS is the token the model emits first
    ck = tmp_path / "ck"
    shutil.copytree(tok_ckpt, ck)
    vocab = json.loads((ck / "tokenizer.json").read_text())
    token = next(k for k, v in {**vocab["model"]["vocab"], **{t["content"]: t["id"] for t in vocab["added_tokens"]}}.items()
                 if v == first)
    (ck / "special_tokens_map.json").write_text(json.dumps({"eos_token": token}))
    r = run("generate", ck, "--prompt", "the loop", "--max-new-tokens", "6", "--json", "--no-verify")
    data = last_json(r)
    assert data["tokens"][0] == [first] and data["stop_reason"] == "stop_token"
    r = run("generate", ck, "--prompt", "the loop", "--max-new-tokens", "6", "--json", "--no-verify", "--stop-ids", "none")
    assert len(last_json(r)["tokens"][0]) == 6
    # streamed text is the JSON's text: this random model emits a UTF-8 continuation byte over
    # and over, which the stream holds back and prints, as replacement characters, at the end
    r = run("generate", tok_ckpt, "--prompt", "the loop", "--max-new-tokens", "6", "--stop-ids", "none")
    data = last_json(run("generate", tok_ckpt, "--prompt", "the loop", "--max-new-tokens", "6", "--stop-ids", "none",
                         "--json"))
    assert r.stdout == data["text"] + "\n" and "\ufffd" in data["text"]


@pytest.mark.parametrize("damage", ["truncate", "tamper", "bad-eos", "not-a-tokenizer"])
@pytest.mark.parametrize("verify", [True, False], ids=["verified", "no-verify"])
def test_corrupt_or_tampered_tokenizer_gives_one_line(tok_ckpt, tmp_path, damage, verify):
    ck = tmp_path / "ck"
    shutil.copytree(tok_ckpt, ck)
    path = ck / ("special_tokens_map.json" if damage == "bad-eos" else "tokenizer.json")
    text = path.read_text()
    path.write_text({"truncate": text[: len(text) // 2], "tamper": text.replace('"Ġ', '"X', 1),
                     "bad-eos": json.dumps({"eos_token": "<nope>"}),
                     "not-a-tokenizer": json.dumps({"vocab": {}})}[damage])
    r = run("generate", ck, "--prompt", "hi", "--max-new-tokens", "2", *([] if verify else ["--no-verify"]))
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2 and lines[-1].startswith("error:") and "Traceback" not in r.output, r.output
    if verify:
        assert "sha256" in r.output or "does not match" in r.output or "modified" in r.output, r.output


def test_tokenizer_paths_that_are_not_tokenizers(tmp_path):
    (tmp_path / "sp").mkdir()
    (tmp_path / "sp" / "tokenizer.model").write_bytes(b"\x00")
    with pytest.raises(InputError, match="no tokenizer.json .it has tokenizer.model"):
        read_tokenizer(tmp_path / "sp")
    with pytest.raises(InputError, match="not found"):
        read_tokenizer(tmp_path / "missing.json")
    (tmp_path / "t.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        read_tokenizer(tmp_path / "t.json")


def test_import_openmythos_with_a_tokenizer(trained, tmp_path):
    import torch
    from mythos_deploy import MythosConfig
    from oracle import make_openmythos
    cfg = MythosConfig.from_name("tiny").replace(vocab_size=300)
    torch.save(make_openmythos(cfg.to_dict(), seed=1).state_dict(), tmp_path / "om.pt")
    (tmp_path / "om.json").write_text(json.dumps(cfg.to_dict()))
    r = run("import-openmythos", tmp_path / "om.pt", "--config", tmp_path / "om.json", "--tokenizer", trained,
            "-o", tmp_path / "ck")
    assert r.exit_code == 0, r.output
    assert read_tokenizer(tmp_path / "ck").encode("café") == read_tokenizer(trained).encode("café")
    small = cfg.replace(vocab_size=256)
    torch.save(make_openmythos(small.to_dict(), seed=1).state_dict(), tmp_path / "om2.pt")
    (tmp_path / "om2.json").write_text(json.dumps(small.to_dict()))
    r = run("import-openmythos", tmp_path / "om2.pt", "--config", tmp_path / "om2.json", "--tokenizer", trained,
            "-o", tmp_path / "ck2")
    assert r.exit_code == 2 and "300 ids" in r.output and not (tmp_path / "ck2").exists()
