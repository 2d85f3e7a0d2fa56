"""The large English corpus reader (ssa_megatron.data.debian_corpus) and the dataset shard tool."""
import gzip
import hashlib
import json
import os

import numpy as np
import pytest

from ssa_megatron.data import debian_corpus as dc
from ssa_megatron.data.corpus import CorpusError
from ssa_megatron.data.shards import join_dataset, split_dataset


def _prose(topic, n=8):
    return " ".join(f"The {topic} number {i} was placed in the box, and it is said that all of them "
                    f"were there when we came back to see what they had done with it."
                    for i in range(n))


NAV = ('<div class="sphinxsidebar"><ul><li>Sidebar link</li></ul></div>'
       '<nav><a href="x">Next chapter</a></nav>')


def _page(body, title="Page"):
    return (f"<html><head><title>{title}</title><script>var junk = 1;</script></head>"
            f'<body><div class="wy-nav-content">{NAV}<div class="document">{body}</div></div>'
            f'<div class="footer">Copyright 2024 Somebody</div><p>Shared footer line on every page</p>'
            f"</body></html>")


def _write(path, text, gz=False):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data = text.encode("utf-8")
    with (gzip.open(path, "wb") if gz else open(path, "wb")) as f:
        f.write(data)


def _b64(n):
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    out = ""
    while True:
        out = alphabet[n % 64] + out
        n //= 64
        if n == 0:
            return out


def _fake_tree(root):
    html = os.path.join(root, "pkg-html", "usr", "share", "doc", "pkg", "html")
    _write(os.path.join(html, "a.html"), _page(f"<h1>Cats</h1><p>{_prose('cat')}</p>"
                                                f'<div class="sphinxsidebar">Local sidebar entry</div>'
                                                f'<div role="navigation">Local nav entry</div>'
                                                f"<pre>def f(x):\n    return x</pre>"))
    _write(os.path.join(html, "b.html"), _page(f"<p>{_prose('dog')}</p>"))
    # the same text as a.html up to case and spacing: a duplicate
    _write(os.path.join(html, "sub", "c.html.gz"),
           _page(f"<h1>CATS</h1>  <p>{_prose('cat').upper()}</p><pre>def f(x):\n    return x</pre>"),
           gz=True)
    _write(os.path.join(html, "d.html"), _page("<p>Too short to keep.</p>"))
    code = "\n".join(f"x{i} = compute(y{i}, z{i}) + {i} * w[{i}]" for i in range(60))
    _write(os.path.join(html, "e.html"), _page(f"<pre>{code}</pre>"))
    _write(os.path.join(html, "_sources", "a.txt"), _prose("source"))  # excluded
    _write(os.path.join(html, "_modules", "m.html"), _page(f"<p>{_prose('module')}</p>"))
    # a dictd dictionary: header entry, two entries (one under two headwords)
    entries = [("00databaseinfo", "This is the database header"), ("apple", _prose("apple", 4)),
               ("pear", _prose("pear", 4))]
    data, index = b"", []
    for word, text in entries:
        raw = text.encode()
        index.append(f"{word}\t{_b64(len(data))}\t{_b64(len(raw))}\n")
        if word == "pear":
            index.append(f"poire\t{_b64(len(data))}\t{_b64(len(raw))}\n")
        data += raw
    ddir = os.path.join(root, "pkg-dict", "usr", "share", "dictd")
    _write(os.path.join(ddir, "test.index"), "".join(index))
    os.makedirs(ddir, exist_ok=True)
    with gzip.open(os.path.join(ddir, "test.dict.dz"), "wb") as f:
        f.write(data)
    _write(os.path.join(root, "pkg-pod", "usr", "share", "perl", "5", "pod", "p.pod"),
           f"=head1 NAME\n\nperlthing - B<bold> and C<code>\n\n=begin html\n\n<b>raw</b>\n\n=end html\n\n"
           f"{_prose('pod')}\n\n=cut\n")


SOURCES = (dc._html("pkg-html"),
           dc.Source("pkg-dict", ("usr/share/dictd/*.index",), kind="dictd", boilerplate=False),
           dc.Source("pkg-pod", ("usr/share/perl/*/pod/*.pod",)),
           dc.Source("pkg-missing", ("usr/share/doc/*.html",)))


def test_reader_filters_dedups_and_is_deterministic(tmp_path):
    _fake_tree(str(tmp_path / "root"))
    out1, out2 = str(tmp_path / "one.jsonl"), str(tmp_path / "two.jsonl")
    r = dc.build_corpus(SOURCES, out1, root=str(tmp_path / "root"), workers=1)
    dc.build_corpus(SOURCES, out2, root=str(tmp_path / "root"), workers=2)
    assert open(out1, "rb").read() == open(out2, "rb").read()
    docs = [json.loads(line) for line in open(out1, encoding="utf-8")]
    st = r.packages["pkg-html"]
    # a, b, c(duplicate of a), d(too short), e(code): _sources and _modules never read
    assert (st.files, st.kept, st.duplicates, st.too_short, st.not_prose) == (5, 2, 1, 1, 1)
    assert r.packages["pkg-dict"].kept == 1 and r.packages["pkg-pod"].kept == 1
    assert r.documents == len(docs) == 4
    text = "\n".join(d["text"] for d in docs)
    for gone in ("var junk", "Sidebar link", "Local sidebar entry", "Local nav entry",
                 "Next chapter", "Copyright 2024", "Shared footer line",
                 "database header", "<b>raw</b>", "B<", "source number", "module number"):
        assert gone not in text, gone
    cats = next(d["text"] for d in docs if "cat number 0" in d["text"])
    assert cats.startswith("Cats\n\nThe cat number 0")
    assert "def f(x):\n    return x" in cats  # <pre> keeps its lines
    dict_doc = next(d["text"] for d in docs if d["source"] == "pkg-dict")
    assert dict_doc.count("pear number 0") == 1  # two headwords, one entry
    assert "perlthing - bold and code" in text
    # ordered by the de-duplication hash, so a contiguous --split samples every package
    keys = [dc.normalised_key(d["text"]) for d in docs]
    assert keys == sorted(keys)
    stats = json.load(open(out1 + ".stats.json"))
    assert stats["missing_packages"] == ["pkg-missing"] and stats["documents"] == 4
    with pytest.raises(CorpusError, match="none of the 1 corpus packages"):
        dc.build_corpus(SOURCES[3:], str(tmp_path / "x.jsonl"), root=str(tmp_path / "root"))


def test_repeated_paragraphs_and_pdf_reflow():
    seen = set()
    filler = "Lorem " + _prose("filler", 3)
    first, dropped = dc.drop_seen_paragraphs(f"Intro one.\n\n{filler}", seen)
    assert dropped == 0 and filler in first
    second, dropped = dc.drop_seen_paragraphs(f"Intro two.\n\n{filler}\n\nOwn text.", seen)
    assert dropped == 1 and second == "Intro two.\n\nOwn text."
    wrapped = ("This paragraph was set by TeX and broken into lines of about sixty charac-\n"
               "ters, which pdftotext keeps as hard line breaks in its output text,\n"
               "so they are joined again.\n\n\\begin{document}\n  x\n\\end{document}")
    assert dc.reflow_paragraphs(wrapped) == (
        "This paragraph was set by TeX and broken into lines of about sixty characters, which "
        "pdftotext keeps as hard line breaks in its output text, so they are joined again."
        "\n\n\\begin{document}\nx\n\\end{document}")


def test_xz_shards_join_without_zstandard(tmp_path, monkeypatch):
    """xz shards (``--format xz``) are written and joined with Python's own lzma: a machine
    without the zstandard package joins them; damaged or mismatched xz shards are refused."""
    import builtins
    real_import = builtins.__import__

    def no_zstandard(name, *args, **kwargs):
        if name == "zstandard":
            raise ImportError("no zstandard here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_zstandard)
    rng = np.random.default_rng(1)
    prefix = str(tmp_path / "data" / "corpus_text_document")
    os.makedirs(os.path.dirname(prefix))
    files = {".bin": rng.integers(0, 3000, size=200_000, dtype=np.uint16).tobytes(),
             ".idx": rng.bytes(3000)}
    for ext, data in files.items():
        with open(prefix + ext, "wb") as f:
            f.write(data)
    with pytest.raises(CorpusError, match="--format xz"):
        split_dataset(prefix, str(tmp_path / "z"), max_bytes=1 << 16)
    shard_dir = str(tmp_path / "shards")
    manifest = split_dataset(prefix, shard_dir, max_bytes=1 << 16, fmt="xz", level=1)
    assert manifest["format"] == "xz"
    shards = [s for e in manifest["files"] for s in e["shards"]]
    assert len(shards) >= 4 and all(s["file"].endswith(".xz") and s["bytes"] <= 1 << 16 for s in shards)
    join_dataset(shard_dir, str(tmp_path / "back"))
    for ext, data in files.items():
        assert open(str(tmp_path / "back" / "corpus_text_document") + ext, "rb").read() == data
    with pytest.raises(CorpusError, match="preset from 0 to 9"):
        split_dataset(prefix, str(tmp_path / "bad"), fmt="xz", level=12)
    # a damaged shard is refused before it is decompressed; one that decompresses to another
    # size, or is no xz at all, with a manifest that agrees with its bytes (edited by hand, or
    # from another build) is refused after; nothing is left behind either way
    mpath = os.path.join(shard_dir, "manifest.json")
    first = os.path.join(shard_dir, manifest["files"][0]["shards"][0]["file"])
    packed = open(first, "rb").read()
    open(first, "wb").write(packed[:50] + bytes([packed[50] ^ 1]) + packed[51:])
    with pytest.raises(CorpusError, match="is damaged"):
        join_dataset(shard_dir, str(tmp_path / "again"))
    m = json.load(open(mpath))
    m["files"][0]["shards"][0]["sha256"] = hashlib.sha256(open(first, "rb").read()).hexdigest()
    json.dump(m, open(mpath, "w"))
    with pytest.raises(CorpusError, match="is not valid xz .* split again"):
        join_dataset(shard_dir, str(tmp_path / "again"))
    open(first, "wb").write(packed)
    m["files"][0]["shards"][0].update(sha256=hashlib.sha256(packed).hexdigest(),
                                      raw_size=m["files"][0]["shards"][0]["raw_size"] + 1)
    json.dump(m, open(mpath, "w"))
    with pytest.raises(CorpusError, match="decompressed to"):
        join_dataset(shard_dir, str(tmp_path / "again"))
    assert os.listdir(tmp_path / "again") == []


def test_shards_round_trip_and_damage(tmp_path):
    rng = np.random.default_rng(0)
    prefix = str(tmp_path / "data" / "corpus_text_document")
    os.makedirs(os.path.dirname(prefix))
    # token-like data: compressible, but not to nothing
    bin_bytes = rng.integers(0, 3000, size=300_000, dtype=np.uint16).tobytes()
    files = {".bin": bin_bytes, ".idx": rng.bytes(5000), ".tokenizer.model": b"spm"}
    for ext, data in files.items():
        with open(prefix + ext, "wb") as f:
            f.write(data)
    shard_dir = str(tmp_path / "shards")
    manifest = split_dataset(prefix, shard_dir, max_bytes=1 << 16, level=3)
    bin_entry = next(e for e in manifest["files"] if e["name"].endswith(".bin"))
    assert len(bin_entry["shards"]) >= 5
    assert all(s["bytes"] <= 1 << 16 for e in manifest["files"] for s in e["shards"])
    written = join_dataset(shard_dir, str(tmp_path / "back"))
    assert sorted(os.path.basename(p) for p in written) == sorted(
        "corpus_text_document" + ext for ext in files)
    for ext, data in files.items():
        assert open(str(tmp_path / "back" / "corpus_text_document") + ext, "rb").read() == data
    assert join_dataset(shard_dir, str(tmp_path / "back"))  # the same files again: fine
    # a split never overwrites a set already there; a join never replaces other content
    before = {n: open(os.path.join(shard_dir, n), "rb").read() for n in os.listdir(shard_dir)}
    with pytest.raises(CorpusError, match="is not empty"):
        split_dataset(prefix, shard_dir, max_bytes=1 << 17, level=3)
    assert {n: open(os.path.join(shard_dir, n), "rb").read() for n in os.listdir(shard_dir)} == before
    assert not [n for n in os.listdir(shard_dir) if n.startswith(".partial-")]
    empty = tmp_path / "empty"  # an existing empty directory (a mount point, say) is fine
    empty.mkdir()
    split_dataset(prefix, str(empty), max_bytes=1 << 17, level=3)
    assert (empty / "manifest.json").exists() and not [n for n in os.listdir(empty) if n.startswith(".")]
    cut = tmp_path / "cut"  # an interrupted split's leftover is named
    (cut / ".partial-123").mkdir(parents=True)
    with pytest.raises(CorpusError, match=r"\.partial-123 is left by an interrupted split"):
        split_dataset(prefix, str(cut))
    other = str(tmp_path / "other")
    os.makedirs(other)
    open(os.path.join(other, "corpus_text_document.bin"), "wb").write(b"mine")
    with pytest.raises(CorpusError, match="exists with other content"):
        join_dataset(shard_dir, other)
    assert open(os.path.join(other, "corpus_text_document.bin"), "rb").read() == b"mine"
    assert sorted(os.listdir(other)) == ["corpus_text_document.bin"]
    victim = os.path.join(shard_dir, bin_entry["shards"][2]["file"])
    raw = bytearray(open(victim, "rb").read())
    raw[100] ^= 1
    open(victim, "wb").write(bytes(raw))
    with pytest.raises(CorpusError, match="is damaged"):
        join_dataset(shard_dir, str(tmp_path / "again"))
    assert not os.path.exists(tmp_path / "again" / "corpus_text_document.bin")
    assert os.listdir(tmp_path / "again") == []
    os.unlink(victim)
    with pytest.raises(CorpusError, match="is missing"):
        join_dataset(shard_dir, str(tmp_path / "again"))
    with pytest.raises(CorpusError, match="not found"):
        split_dataset(str(tmp_path / "nothing"), shard_dir)
