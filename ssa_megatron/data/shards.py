"""Carry a preprocessed dataset in compressed shards of bounded size, and put it back together.

:func:`split_dataset` compresses every file of a dataset prefix (``<prefix>.bin``, ``.idx`` and the
``.tokenizer.*`` copies the preprocessor writes) with zstd (fast; the ``zstandard`` package) or xz
(Python's own ``lzma``: nothing to install where the files are joined, and smaller shards, but
slow to write) into shards of at most ``max_bytes`` each, every shard decompressible on its own, and writes ``manifest.json`` with the sha256 of every
shard and of every whole file. :func:`join_dataset` checks each shard against the manifest,
decompresses, checks each rebuilt file's size and sha256, and only then moves the files into
place (an error leaves no partial dataset behind). ``tools/corpus_shards.py`` is the command line.
"""
from __future__ import annotations

import glob
import hashlib
import json
import lzma
import os
import shutil
from typing import List, Optional

from ssa_megatron.data.corpus import CorpusError
from ssa_megatron.data.tokenizer import file_sha256

MANIFEST = "manifest.json"
DEFAULT_MAX_BYTES = 60 << 20
FORMATS = ("zstd", "xz")
DEFAULT_LEVELS = {"zstd": 10, "xz": 9}
DEFAULT_LEVEL = DEFAULT_LEVELS["zstd"]


def _zstd():
    try:
        import zstandard
    except ImportError:
        raise CorpusError("the zstandard package is missing; pip install zstandard, or split "
                          "with --format xz (Python's own lzma)") from None
    return zstandard


class _Codec:
    """One shard format: ``compress(raw)``, ``decompress(packed, raw_size)`` and the suffix."""

    def __init__(self, fmt: str, level: Optional[int] = None, threads: int = 0):
        if fmt not in FORMATS:
            raise CorpusError(f"unknown shard format {fmt!r}; use one of {', '.join(FORMATS)}")
        self.format = fmt
        self.level = DEFAULT_LEVELS[fmt] if level is None else level
        if fmt == "zstd":
            zstd = _zstd()
            self.suffix = "zst"
            self._cctx = zstd.ZstdCompressor(level=self.level, threads=threads)
            self._dctx = zstd.ZstdDecompressor()
        else:
            if not 0 <= self.level <= 9:
                raise CorpusError(f"--level for xz is a preset from 0 to 9, not {self.level}")
            self.suffix = "xz"

    def compress(self, raw: bytes) -> bytes:
        if self.format == "zstd":
            return self._cctx.compress(raw)
        return lzma.compress(raw, format=lzma.FORMAT_XZ, preset=self.level)

    def decompress(self, packed: bytes, raw_size: int, path: str) -> bytes:
        if self.format == "zstd":
            return self._dctx.decompress(packed, max_output_size=raw_size)
        try:
            return lzma.decompress(packed, format=lzma.FORMAT_XZ)
        except lzma.LZMAError as err:  # its sha256 matched: the manifest names the wrong format
            raise CorpusError(f"shard {path} is not valid xz ({err}) although its sha256 matches "
                              "the manifest; the manifest's format does not fit its shards: "
                              "split again") from None


def dataset_files(prefix: str) -> List[str]:
    """``<prefix>.bin``, ``<prefix>.idx`` and the other ``<prefix>.*`` files, sorted."""
    files = sorted(p for p in glob.glob(glob.escape(prefix) + ".*") if os.path.isfile(p)
                   and ".tmp-" not in p)
    names = {os.path.basename(p) for p in files}
    base = os.path.basename(prefix)
    if base + ".bin" not in names or base + ".idx" not in names:
        raise CorpusError(f"{prefix}.bin / {prefix}.idx not found; pass the prefix given to "
                          f"preprocess_data.py --output-prefix")
    return files


def split_dataset(prefix: str, out_dir: str, max_bytes: int = DEFAULT_MAX_BYTES,
                  level: Optional[int] = None, threads: int = 0, fmt: str = "zstd") -> dict:
    """Write the shards and ``manifest.json`` of dataset ``prefix`` into ``out_dir`` (new or
    empty: another set there is never overwritten); returns the manifest. The set is built in
    ``out_dir/.partial-<pid>`` and moved up when complete, ``manifest.json`` last, so an
    interrupted split leaves no set that ``join`` would take. Raw pieces are sized from the
    compression ratio seen so far and shrunk until their compressed form fits ``max_bytes``.
    ``level`` defaults to the format's own (zstd 10, xz preset 9)."""
    codec = _Codec(fmt, level, threads)
    if max_bytes < 1 << 16:
        raise CorpusError(f"--max-mib must allow shards of at least 64 KiB, not {max_bytes} bytes")
    files = dataset_files(prefix)
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        leftover = sorted(n for n in os.listdir(out_dir) if n.startswith(".partial-"))
        raise CorpusError(f"{out_dir} is not empty " + (
            f"({leftover[0]} is left by an interrupted split: remove it)" if leftover else
            "(it may hold another shard set); split into a new or empty directory"))
    partial = os.path.join(out_dir, f".partial-{os.getpid()}")
    try:
        os.makedirs(partial)
        manifest = _write_shards(codec, files, partial, max_bytes)
        names = sorted(os.listdir(partial), key=lambda n: n == MANIFEST)  # the manifest last
        for name in names:
            os.replace(os.path.join(partial, name), os.path.join(out_dir, name))
        os.rmdir(partial)
    except OSError as err:
        raise CorpusError(f"cannot write the shards in {out_dir}: {err.strerror or err}") from None
    finally:
        if os.path.isdir(partial):
            shutil.rmtree(partial)
    return manifest


def _write_shards(codec: _Codec, files, out_dir, max_bytes) -> dict:
    """The shards and manifest of ``files`` in ``out_dir``; returns the manifest."""
    manifest = {"format": codec.format, "max_bytes": max_bytes, "files": []}
    ratio = 1.0
    for path in files:
        name = os.path.basename(path)
        size = os.path.getsize(path)
        entry = {"name": name, "size": size, "sha256": file_sha256(path), "shards": []}
        with open(path, "rb") as f:
            offset = 0
            while offset < size or (size == 0 and not entry["shards"]):
                raw_len = min(size - offset, max(1 << 16, int(max_bytes / ratio * 0.97)))
                while True:
                    f.seek(offset)
                    raw = f.read(raw_len)
                    packed = codec.compress(raw)
                    if len(packed) <= max_bytes:
                        break
                    raw_len = max(1, int(raw_len * max_bytes / len(packed) * 0.95))
                if raw:
                    ratio = max(len(packed) / len(raw), 1e-3)
                shard = f"{name}.{len(entry['shards']):03d}.{codec.suffix}"
                with open(os.path.join(out_dir, shard), "wb") as out:
                    out.write(packed)
                entry["shards"].append({"file": shard, "raw_size": len(raw), "bytes": len(packed),
                                        "sha256": hashlib.sha256(packed).hexdigest()})
                offset += len(raw)
        manifest["files"].append(entry)
    with open(os.path.join(out_dir, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def join_dataset(shard_dir: str, out_dir: str, manifest_path: Optional[str] = None) -> List[str]:
    """Rebuild the files listed in ``shard_dir/manifest.json`` into ``out_dir``, checking every
    shard and every file; returns the paths written. Nothing is left in place on a mismatch."""
    manifest_path = manifest_path or os.path.join(shard_dir, MANIFEST)
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise CorpusError(f"{manifest_path} not found; copy manifest.json with the shards") from None
    except ValueError:
        raise CorpusError(f"{manifest_path} is not valid JSON; copy it again") from None
    if manifest.get("format") not in FORMATS:
        raise CorpusError(f"{manifest_path}: unknown shard format {manifest.get('format')!r}; "
                          f"this version joins {', '.join(FORMATS)}")
    codec = _Codec(manifest["format"])
    for entry in manifest["files"]:
        final = os.path.join(out_dir, entry["name"])
        if os.path.exists(final) and (os.path.getsize(final) != entry["size"]
                                      or file_sha256(final) != entry["sha256"]):
            raise CorpusError(f"{final} exists with other content; move it away or join into "
                              "another directory")
    os.makedirs(out_dir, exist_ok=True)
    temps, finals = [], []
    try:
        for entry in manifest["files"]:
            final = os.path.join(out_dir, entry["name"])
            tmp = final + f".tmp-{os.getpid()}"
            temps.append(tmp)
            h = hashlib.sha256()
            with open(tmp, "wb") as out:
                for shard in entry["shards"]:
                    spath = os.path.join(shard_dir, shard["file"])
                    try:
                        with open(spath, "rb") as f:
                            packed = f.read()
                    except FileNotFoundError:
                        raise CorpusError(f"shard {spath} is missing; copy all "
                                          f"{sum(len(e['shards']) for e in manifest['files'])} "
                                          f"shards listed in the manifest") from None
                    if hashlib.sha256(packed).hexdigest() != shard["sha256"]:
                        raise CorpusError(f"shard {spath} is damaged (sha256 differs from the "
                                          f"manifest); copy it again")
                    raw = codec.decompress(packed, shard["raw_size"], spath)
                    if len(raw) != shard["raw_size"]:
                        raise CorpusError(f"shard {spath} decompressed to {len(raw)} bytes, the "
                                          f"manifest says {shard['raw_size']}; copy it again")
                    h.update(raw)
                    out.write(raw)
            if os.path.getsize(tmp) != entry["size"] or h.hexdigest() != entry["sha256"]:
                raise CorpusError(f"rebuilt {entry['name']} does not match its sha256 in the "
                                  f"manifest; the shards come from different builds")
            finals.append(final)
        # the .idx last: a dataset counts as present only once both .bin and .idx are there
        order = sorted(range(len(finals)), key=lambda i: finals[i].endswith(".idx"))
        for i in order:
            os.replace(temps[i], finals[i])
        return finals
    finally:
        for t in temps:
            if os.path.exists(t):
                os.unlink(t)


__all__ = ["split_dataset", "join_dataset", "dataset_files", "DEFAULT_MAX_BYTES", "FORMATS"]
