"""Plain text out of the file formats of Debian's documentation (data/debian_corpus.py reads its
packages through :func:`read_document`): HTML pages without scripts, styles and navigation, POD,
info manuals, dictd dictionaries, PDF (pdftotext), fortune files, and plain text with its layout
normalised."""
from __future__ import annotations

import gzip
import os
import re
from html.parser import HTMLParser
from typing import Iterator, List, Optional, Tuple

from ssa_megatron.data.corpus import CorpusError

DICT_GROUP_CHARS = 16384  # dictionary entries joined into one document up to this many characters

_SKIP_TAGS = frozenset("script style head nav header footer noscript svg math button form select "
                       "template iframe object textarea".split())
_VOID_TAGS = frozenset("area base br col embed hr img input link meta param source track wbr".split())
_BLOCK_TAGS = frozenset("p div section article main aside li ul ol dl dt dd h1 h2 h3 h4 h5 h6 tr "
                        "table thead tbody pre blockquote figure figcaption caption hr title "
                        "details summary address center".split())
# class words / ids of navigation elements in the documentation themes Debian ships (Sphinx
# classic, Read the Docs, pydata, DocBook, mdBook, rustdoc, javadoc, haddock); other navigation
# recurs across a package's pages and goes with drop_boilerplate_lines
_BOILER_CLASSES = frozenset("""
sphinxsidebar sphinxsidebarwrapper related footer headerlink wy-nav-side wy-breadcrumbs
rst-versions rst-footer-buttons bd-sidebar bd-sidebar-primary bd-sidebar-secondary bd-header
bd-footer bd-toc bd-header-article prev-next-area navbar nav sidebar breadcrumb breadcrumbs toc
navheader navfooter sidebar-elems sub-nav top-nav bottom-nav topnav bottomnav menu-bar
nav-wrapper nav-chapters nav-wide-wrapper legal-copy table-of-contents search-container
searchbox skip-nav skiplink copyright header navigation menu
""".split())
_NEVER_SKIPPED = frozenset(("html", "body"))


def _is_boilerplate_element(tag: str, attrs) -> bool:
    if tag in _NEVER_SKIPPED:
        return False
    for name, value in attrs:
        if name == "role" and value in ("navigation", "search", "banner", "contentinfo"):
            return True
        if name in ("class", "id") and value:
            if any(word in _BOILER_CLASSES for word in value.lower().split()):
                return True
    return False


class _HTMLText(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: List[str] = []
        self.skip_tag: Optional[str] = None
        self.skip_depth = 0
        self.pre_depth = 0

    def handle_starttag(self, tag, attrs):
        if self.skip_tag is not None:
            if tag == self.skip_tag:
                self.skip_depth += 1
            return
        if tag not in _VOID_TAGS and (tag in _SKIP_TAGS or _is_boilerplate_element(tag, attrs)):
            self.skip_tag, self.skip_depth = tag, 1
            return
        if tag == "br":
            self.parts.append("\n")
        elif tag in ("td", "th"):
            self.parts.append(" ")
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n\n")
            if tag == "pre":
                self.pre_depth += 1

    def handle_startendtag(self, tag, attrs):
        if self.skip_tag is None and tag == "br":
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if self.skip_tag is not None:
            if tag == self.skip_tag:
                self.skip_depth -= 1
                if self.skip_depth == 0:
                    self.skip_tag = None
            return
        if tag in _BLOCK_TAGS:
            self.parts.append("\n\n")
            if tag == "pre" and self.pre_depth:
                self.pre_depth -= 1

    def handle_data(self, data):
        if self.skip_tag is not None:
            return
        self.parts.append(data if self.pre_depth else re.sub(r"\s+", " ", data))


def normalise_layout(text: str) -> str:
    """Trailing spaces off, one leading space (left by collapsed HTML whitespace) off, at most one
    blank line in a row, no blank lines at the ends."""
    out: List[str] = []
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        line = line.rstrip()
        if line.startswith(" ") and not line.startswith("  "):
            line = line[1:]
        if line or (out and out[-1]):
            out.append(line)
    while out and not out[-1]:
        out.pop()
    return "\n".join(out)


def html_to_text(html: str) -> str:
    """The readable text of an HTML page, paragraphs separated by blank lines (see module doc)."""
    parser = _HTMLText()
    try:
        parser.feed(html)
        parser.close()
    except (AssertionError, ValueError):  # pathological markup: keep what was parsed
        pass
    return normalise_layout("".join(parser.parts))


_POD_CODE = re.compile(r"[A-Z]<<+\s+(.*?)\s+>>+|[A-Z]<([^<>]*)>", re.S)


def pod_to_text(pod: str) -> str:
    """Perl POD: headings and items keep their text, other commands and formatting codes go."""
    out: List[str] = []
    skipping = False
    for line in pod.splitlines():
        if line.startswith("="):
            cmd, _, rest = line.partition(" ")
            if cmd == "=begin" or cmd == "=for":
                skipping = cmd == "=begin"
                continue
            if cmd == "=end":
                skipping = False
                continue
            if cmd.startswith(("=head", "=item")):
                out.append(rest.strip())
            continue
        if not skipping:
            out.append(line)
    text = "\n".join(out)
    for _ in range(3):  # nested codes like B<C<x>>
        text = _POD_CODE.sub(lambda m: (m.group(1) if m.group(1) is not None else m.group(2)).split("|")[0], text)
    return normalise_layout(text)


def info_to_text(info: str) -> str:
    """A GNU info file: node headers, tag tables and indirect tables dropped."""
    out: List[str] = []
    for node in info.split("\x1f"):
        node = node.lstrip("\n")
        if node.startswith(("Tag Table:", "Indirect:", "Local Variables:")) or not node:
            continue
        first, _, rest = node.partition("\n")
        out.append(rest if first.startswith("File:") else node)
    return normalise_layout("\n\n".join(out))


_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def _dict_number(s: str) -> int:
    n = 0
    for c in s:
        n = n * 64 + _B64[c]
    return n


def dictd_documents(index_path: str, dict_path: str, group_chars: int = DICT_GROUP_CHARS) -> Iterator[Tuple[str, str]]:
    """Entries of a dictd dictionary (``.index`` + ``.dict[.dz]``) in file order, grouped into
    documents of at least ``group_chars`` characters; the ``00database...`` header entries go."""
    spans = set()
    with open(index_path, encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 3 or parts[0].startswith("00database") or parts[0].startswith("00-database"):
                continue
            try:
                spans.add((_dict_number(parts[1]), _dict_number(parts[2])))
            except KeyError:
                continue
    opener = gzip.open if dict_path.endswith(".dz") or dict_path.endswith(".gz") else open
    with opener(dict_path, "rb") as f:
        data = f.read()
    group: List[str] = []
    size = 0
    start = None
    for off, length in sorted(spans):
        entry = data[off:off + length].decode("utf-8", errors="replace").strip()
        if not entry:
            continue
        if start is None:
            start = off
        group.append(entry)
        size += len(entry)
        if size >= group_chars:
            yield f"{os.path.basename(dict_path)}@{start}", normalise_layout("\n\n".join(group))
            group, size, start = [], 0, None
    if group:
        yield f"{os.path.basename(dict_path)}@{start}", normalise_layout("\n\n".join(group))


_PAGE_NUMBER = re.compile(r"^\s*(?:\d+|[ivxlcdm]+)\s*$", re.I)
PDF_TIMEOUT_S = 60


def reflow_paragraphs(text: str) -> str:
    """Join the hard-wrapped lines of text paragraphs (from PDF) with spaces, undoing end-of-line
    hyphenation; blocks of short lines (code, lists, tables) keep their line breaks."""
    blocks = []
    for block in re.split(r"\n\s*\n", text):
        lines = [l.strip() for l in block.split("\n") if l.strip()]
        if len(lines) > 1 and sum(map(len, lines)) / len(lines) >= 50:
            joined = lines[0]
            for line in lines[1:]:
                if re.search(r"[a-z]-$", joined) and line[:1].islower():
                    joined = joined[:-1] + line
                else:
                    joined += " " + line
            lines = [joined]
        blocks.append("\n".join(lines))
    return normalise_layout("\n\n".join(blocks))


def pdf_to_text(path: str) -> str:
    """Text of a PDF by poppler's ``pdftotext``; page numbers dropped, paragraphs reflowed."""
    import subprocess

    try:
        out = subprocess.run(["pdftotext", "-q", "-enc", "UTF-8", path, "-"], capture_output=True,
                             timeout=PDF_TIMEOUT_S, check=False).stdout
    except FileNotFoundError:
        raise CorpusError("pdftotext is missing; apt-get install poppler-utils") from None
    except subprocess.TimeoutExpired:
        return ""
    pages = out.decode("utf-8", errors="replace").split("\f")
    kept = ["\n".join(l for l in page.split("\n") if not _PAGE_NUMBER.match(l)) for page in pages]
    return reflow_paragraphs("\n\n".join(kept))


def fortune_to_text(text: str) -> str:
    """A fortune cookie file: cookies (separated by ``%`` lines) become paragraphs."""
    cookies = [c.strip("\n") for c in re.split(r"(?m)^%\s*$", text)]
    return normalise_layout("\n\n".join(c for c in cookies if c.strip()))


def _kind_of(path: str) -> str:
    low = path.lower()
    if low.endswith(".gz"):
        low = low[:-3]
    if low.endswith((".html", ".htm", ".xhtml", ".page")):
        return "html"
    if low.endswith(".pod"):
        return "pod"
    if low.endswith(".pdf"):
        return "pdf"
    if re.search(r"\.info(-\d+)?$", low):
        return "info"
    return "text"


def _read_file(path: str) -> str:
    with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
        raw = f.read()
    return raw.decode("utf-8", errors="replace")


def read_document(path: str, kind: str = "auto") -> str:
    """Text of one file by its kind (``auto`` decides from the extension)."""
    kind = _kind_of(path) if kind == "auto" else kind
    if kind == "pdf":
        return pdf_to_text(path)
    raw = _read_file(path)
    if kind == "html":
        return html_to_text(raw)
    if kind == "pod":
        return pod_to_text(raw)
    if kind == "info":
        return info_to_text(raw)
    if kind == "fortune":
        return fortune_to_text(raw)
    return normalise_layout(raw)
