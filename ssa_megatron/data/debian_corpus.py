"""A large English corpus from Debian documentation packages (``prepare_english_corpus.sh --large``).

Each :class:`Source` names a Debian package and the files of it to read, as glob patterns relative
to the package's unpacked tree (``dpkg-deb -x PACKAGE.deb ROOT/PACKAGE``: nothing is installed, so
no dependencies, services or upgrades come with it). Files become documents (one per HTML page, text
file, POD page or info manual; dictionaries give one document per run of consecutive entries):

- Each file is turned into text by data/document_text.py; for HTML, scripts, styles, ``<head>`` and
  navigation (``<nav>``, ``<header>``, ``<footer>`` and elements whose class or id names a sidebar,
  menu, breadcrumb, table of contents, ...) are dropped.
- Within a package, lines that recur in many of its documents (navigation bars, copyright footers,
  "Parameters" headings) are dropped: see :func:`drop_boilerplate_lines`.
- A document is kept only if it is English prose: at least :data:`MIN_WORDS` words, of which at
  least :data:`MIN_STOPWORD_SHARE` are common English function words (code, tables and other
  languages fall far below; see docs/CORPUS.md for the measured shares).
- Documents are de-duplicated by the sha256 of their normalised text (whitespace collapsed, case
  folded), across all packages.

The output is one JSON object per line (``{"text": ..., "source": package}``) ordered by that hash:
a fixed pseudo-random order, so a contiguous ``--split`` of documents (megatron-core's held-out
rule) draws its held-out documents from every package, and the file does not depend on the order
in which the file system lists directories. ``<output>.stats.json`` records the counts.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import math
import multiprocessing
import os
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from ssa_megatron.data.corpus import CorpusError
from ssa_megatron.data.document_text import (dictd_documents, normalise_layout, read_document,  # noqa: F401
                                             reflow_paragraphs)

MIN_WORDS = 100
MIN_STOPWORD_SHARE = 0.28
# a line recurring in at least this share of a package's documents (and in 3 or more) is boilerplate
BOILERPLATE_DOC_SHARE = 0.01

STOPWORDS = frozenset("""
a about above after again against all also an and any are as at be because been before being
below between both but by can could did do does doing down during each either few for from further
had has have having he her here hers him his how however i if in into is it its itself just may
me might more most must my no nor not of off on once only or other our out over own same she
should so some such than that the their theirs them then there these they this those through to
too under until up upon very was we were what when where whether which while who whom why will
with would you your
""".split())

_WORD = re.compile(r"[A-Za-z]+(?:'[a-z]+)?")

# elements never holding text we want
@dataclass(frozen=True)
class Source:
    """Files of one Debian package. ``include``/``exclude`` are globs relative to the root
    (``**`` spans directories); ``kind`` picks the reader (``auto``: by file extension, ``dictd``,
    ``fortune``); ``boilerplate`` turns on the per-package recurring-line filter;
    ``min_stopword_share`` overrides the prose threshold (dictionary entries are terse English)."""
    package: str
    include: Tuple[str, ...]
    exclude: Tuple[str, ...] = ()
    kind: str = "auto"
    boilerplate: bool = True
    min_stopword_share: Optional[float] = None  # None: the corpus-wide threshold


# Sphinx, rustdoc, javadoc and haddock byproducts that are code, indexes or search pages.
_GENERATED = ("**/_sources/**", "**/_modules/**", "**/_static/**", "**/_images/**", "**/genindex*",
              "**/search.html", "**/py-modindex.html", "**/src/**", "**/class-use/**",
              "**/index-files/**", "**/*-tree.html", "**/allclasses*", "**/allpackages*",
              "**/all.html", "**/search-index*", "**/doc-index*", "**/_downloads/**")


def _doc(package: str, *include: str, exclude: Sequence[str] = (), **kw) -> Source:
    return Source(package, tuple(include), tuple(exclude) + _GENERATED, **kw)


def _html(package: str, exclude: Sequence[str] = (), **kw) -> Source:
    return _doc(package, "usr/share/**/*.html", "usr/share/**/*.htm", "usr/share/**/*.xhtml",
                "usr/share/**/*.html.gz", exclude=exclude, **kw)


_HTML_PACKAGES = """
abs-guide ada-reference-manual-2020 apache2-doc autoconf-doc bind9-doc cinder-doc clang-15-doc
cmake-doc dar-docs debian-handbook debian-policy debian-reference-en developers-reference
docutils-doc erlang-doc exim4-doc-html gap-doc gettext-doc git-doc glance-doc gnuplot-doc heat-doc
installation-guide-amd64 ironic-doc keystone-doc kicad-doc-en libvirt-doc lilypond-doc-html
linux-doc-6.1 llvm-15-doc maint-guide manila-doc maxima-doc mh-book neutron-doc nova-doc
octave-doc octavia-doc openjdk-17-doc png-definitive-guide postgresql-doc-15 python-astropy-doc
python-biopython-doc python-celery-doc python-dask-doc python-django-doc python-openstacksdk-doc
python-pandas-doc python-scipy-doc python-skimage-doc python-sklearn-doc python-sqlalchemy-doc
python-statsmodels-doc python-sympy-doc python3.11-doc racket-doc rust-doc sbcl-doc scons-doc
swift-doc twisted-doc vim-doc wireshark-doc xen-doc xorg-docs
""".split()
_TEXLIVE_PACKAGES = """
texlive-latex-extra-doc texlive-pictures-doc texlive-publishers-doc texlive-pstricks-doc
texlive-fonts-extra-doc texlive-latex-base-doc texlive-science-doc texlive-latex-recommended-doc
texlive-metapost-doc texlive-humanities-doc
""".split()
DICT_STOPWORD_SHARE = 0.15

# Debian bookworm main; the survey behind the choice is in docs/CORPUS.md. Order matters only for
# which copy of a repeated paragraph survives (the first).
LARGE_SOURCES: Tuple[Source, ...] = (
    tuple(_html(p) for p in _HTML_PACKAGES)
    + (Source("perl-doc", ("usr/share/perl/*/pod/*.pod",)),
       Source("r-doc-info", ("usr/share/info/*.info*",)))
    + tuple(Source(p, (f"usr/share/dictd/*.index",), kind="dictd", boilerplate=False,
                   min_stopword_share=DICT_STOPWORD_SHARE)
            for p in ("dict-gcide", "dict-wn", "dict-foldoc", "dict-jargon", "dict-devil"))
    + tuple(Source(p, ("usr/share/games/fortunes/*",), exclude=("**/*.dat", "**/*.u8"),
                   kind="fortune", boilerplate=False) for p in ("fortunes", "fortunes-min"))
    + tuple(Source(p, ("usr/share/doc/texlive-doc/**/*.pdf",)) for p in _TEXLIVE_PACKAGES)
)


def _glob_to_regex(pattern: str) -> "re.Pattern":
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def source_files(source: Source, root: str) -> List[str]:
    """The files of ``source`` under ``root``, sorted by relative path; info manuals split in
    ``x.info-1.gz``, ``x.info-2.gz`` parts are kept as their parts."""
    excludes = [_glob_to_regex(p) for p in source.exclude]
    found = set()
    for pattern in source.include:
        for path in glob.glob(os.path.join(root, pattern), recursive=True):
            if not os.path.isfile(path):
                continue
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            if not any(rx.match(rel) for rx in excludes):
                found.add(rel)
    return [os.path.join(root, rel) for rel in sorted(found)]


def _read_one(args: Tuple[str, str]) -> Tuple[str, str]:
    path, kind = args
    try:
        return path, read_document(path, kind)
    except (OSError, EOFError, ValueError):
        return path, ""


def iter_source_documents(source: Source, root: str, pool=None) -> Iterator[Tuple[str, str]]:
    """``(name, text)`` for every document of ``source`` under ``root``, in a fixed order."""
    if source.kind == "dictd":
        for index in source_files(source, root):
            base = index[: -len(".index")]
            dict_path = next((p for p in (base + ".dict.dz", base + ".dict") if os.path.exists(p)), None)
            if dict_path:
                yield from dictd_documents(index, dict_path)
        return
    jobs = [(p, source.kind) for p in source_files(source, root)]
    results = pool.imap(_read_one, jobs, chunksize=8) if pool is not None else map(_read_one, jobs)
    for path, text in results:
        yield os.path.relpath(path, root), text


def drop_boilerplate_lines(texts: List[str], share: float = BOILERPLATE_DOC_SHARE) -> List[str]:
    """Remove from every text the non-empty lines that occur in at least ``max(3, share * n)`` of
    the ``n`` texts (navigation, footers, repeated headings)."""
    limit = max(3, math.ceil(share * len(texts)))
    counts: Counter = Counter()
    for t in texts:
        counts.update({line.strip() for line in t.split("\n") if line.strip()})
    common = {line for line, c in counts.items() if c >= limit}
    if not common:
        return texts
    return [normalise_layout("\n".join(l for l in t.split("\n") if l.strip() not in common))
            for t in texts]


def prose_stats(text: str) -> Tuple[int, float]:
    """``(words, share of them that are English function words)``."""
    words = _WORD.findall(text)
    if not words:
        return 0, 0.0
    return len(words), sum(w.lower() in STOPWORDS for w in words) / len(words)


def is_english_prose(text: str, min_words: int = MIN_WORDS,
                     min_stopword_share: float = MIN_STOPWORD_SHARE) -> bool:
    n, share = prose_stats(text)
    return n >= min_words and share >= min_stopword_share


def drop_seen_paragraphs(text: str, seen: set, min_chars: int = 200) -> Tuple[str, int]:
    """Remove paragraphs of ``min_chars`` or more already in ``seen`` (license texts, filler text
    such as kantlipsum shown by many package manuals) and add the new ones; returns the text
    and how many paragraphs went."""
    out, dropped = [], 0
    for para in text.split("\n\n"):
        if len(para) >= min_chars:
            key = hashlib.blake2b(" ".join(para.split()).casefold().encode("utf-8"),
                                  digest_size=8).digest()
            if key in seen:
                dropped += 1
                continue
            seen.add(key)
        out.append(para)
    return ("\n\n".join(out) if dropped else text), dropped


def normalised_key(text: str) -> bytes:
    """sha256 of the text with whitespace collapsed and case folded: the de-duplication key."""
    return hashlib.sha256(" ".join(text.split()).casefold().encode("utf-8")).digest()


@dataclass
class PackageStats:
    files: int = 0
    documents: int = 0
    kept: int = 0
    duplicates: int = 0
    too_short: int = 0
    not_prose: int = 0
    repeated_paragraphs: int = 0
    characters: int = 0
    words: int = 0


@dataclass
class CorpusResult:
    output: str
    documents: int
    characters: int
    packages: Dict[str, PackageStats] = field(default_factory=dict)
    seconds: float = 0.0


def build_corpus(sources: Sequence[Source], output: str, root: str, workers: int = 1,
                 min_words: int = MIN_WORDS, min_stopword_share: float = MIN_STOPWORD_SHARE,
                 log=None) -> CorpusResult:
    """Read ``sources`` from ``root/<package>`` (``dpkg-deb -x`` trees), filter and de-duplicate, write ``output`` (jsonl ordered by
    document hash) and ``output + '.stats.json'``; atomic (temporary names, then renamed)."""
    t0 = time.perf_counter()
    output = os.path.abspath(output)
    os.makedirs(os.path.dirname(output), exist_ok=True)
    missing = [s.package for s in sources if not source_files(s, os.path.join(root, s.package))]
    if len(missing) == len(sources):
        raise CorpusError(f"none of the {len(sources)} corpus packages has files under {root}/PACKAGE; "
                          f"unpack them there (dpkg-deb -x PACKAGE.deb {root}/PACKAGE)")
    tmp_unsorted = output + f".tmp-{os.getpid()}.unsorted"
    tmp_out = output + f".tmp-{os.getpid()}"
    seen: Dict[bytes, str] = {}
    seen_paragraphs: set = set()
    spans: List[Tuple[bytes, int, int]] = []
    stats: Dict[str, PackageStats] = {}
    pool = multiprocessing.get_context("fork").Pool(workers) if workers > 1 else None
    try:
        with open(tmp_unsorted, "wb") as raw_out:
            for source in sources:
                st = stats.setdefault(source.package, PackageStats())
                docs = list(iter_source_documents(source, os.path.join(root, source.package), pool))
                st.files += len(docs)
                texts = [t for _, t in docs]
                if source.boilerplate and len(texts) > 1:
                    texts = drop_boilerplate_lines(texts)
                threshold = (min_stopword_share if source.min_stopword_share is None
                             else source.min_stopword_share)
                for text in texts:
                    st.documents += 1
                    n_words, share = prose_stats(text)
                    if n_words < min_words:
                        st.too_short += 1
                        continue
                    if share < threshold:
                        st.not_prose += 1
                        continue
                    key = normalised_key(text)
                    if key in seen:
                        st.duplicates += 1
                        continue
                    seen[key] = source.package
                    text, dropped = drop_seen_paragraphs(text, seen_paragraphs)
                    st.repeated_paragraphs += dropped
                    if dropped:
                        n_words = prose_stats(text)[0]
                        if n_words < min_words:
                            st.too_short += 1
                            continue
                    line = (json.dumps({"text": text, "source": source.package}, ensure_ascii=False)
                            + "\n").encode("utf-8")
                    spans.append((key, raw_out.tell(), len(line)))
                    raw_out.write(line)
                    st.kept += 1
                    st.characters += len(text)
                    st.words += n_words
                if log:
                    log(f"{source.package}: {st.files} files, kept {st.kept} documents, "
                        f"{st.characters / 1e6:.1f}M characters (short {st.too_short}, "
                        f"not prose {st.not_prose}, duplicate {st.duplicates})")
        spans.sort()
        with open(tmp_unsorted, "rb") as src, open(tmp_out, "wb") as dst:
            for _, off, length in spans:
                src.seek(off)
                dst.write(src.read(length))
        result = CorpusResult(output, len(spans), sum(s.characters for s in stats.values()), stats,
                              time.perf_counter() - t0)
        with open(tmp_out + ".stats", "w") as f:
            json.dump({"documents": result.documents, "characters": result.characters,
                       "min_words": min_words, "min_stopword_share": min_stopword_share,
                       "root": root, "missing_packages": missing,
                       "packages": {k: vars(v) for k, v in stats.items()}}, f, indent=1)
        os.replace(tmp_out + ".stats", output + ".stats.json")
        os.replace(tmp_out, output)
        return result
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        for t in (tmp_unsorted, tmp_out, tmp_out + ".stats"):
            if os.path.exists(t):
                os.unlink(t)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ssa_megatron.data.debian_corpus",
                                description="English prose from installed Debian documentation packages -> jsonl.")
    p.add_argument("--output", help="jsonl file to write (and <output>.stats.json)")
    p.add_argument("--root", help="directory holding one unpacked tree per package "
                   "(dpkg-deb -x PACKAGE.deb ROOT/PACKAGE)")
    p.add_argument("--workers", type=int, default=2, help="processes reading files (default 2)")
    p.add_argument("--list-packages", action="store_true",
                   help="print the Debian packages the corpus reads, one per line, and exit")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    if a.list_packages:
        print("\n".join(dict.fromkeys(s.package for s in LARGE_SOURCES)))
        return 0
    if not a.output or not a.root:
        print("error: --output (the jsonl file to write) and --root (the unpacked packages) are "
              "required", file=sys.stderr)
        return 2
    try:
        r = build_corpus(LARGE_SOURCES, a.output, root=a.root, workers=a.workers,
                         log=lambda m: print(m, flush=True))
    except CorpusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {r.output}: {r.documents:,} documents, {r.characters / 1e6:.1f}M characters "
          f"from {len(r.packages)} packages in {r.seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
