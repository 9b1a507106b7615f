"""Content fingerprints of the files a study reads: checkpoints, adapters, prompt and evaluation
files. A stage's ``DONE.json`` records the fingerprints of its inputs (``study.artifacts``), so
new weights at the same path or an edited prompt file make the stages that read them run again.

A fingerprint is the SHA-256 of a file's bytes. Hashing a checkpoint of many GiB on every
resume would be slow, so digests are cached in the work directory by (absolute path, size,
modification time in ns, inode): an unchanged file is read once per work directory; any write
changes its modification time and is hashed again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from refusal_jax.models.io.checkpoints import default_gguf_path
from refusal_jax.models.loading import BASE_MODEL, DEFAULT_MODEL, ORGANISM, ORGANISM_ADAPTER
from refusal_jax.runtime.files import write_text_atomically
from refusal_jax.text import BUILTIN_SETS

CACHE_FILE = ".fingerprints.json"
# Where the built-in prompt sets are shipped (package data).
BUILTIN_DIR = Path(__file__).resolve().parents[1] / "data"
_CHUNK = 1 << 24
# Files of an HF checkpoint directory that do not decide results.
_IGNORED_SUFFIXES = (".md", ".lock", ".gitattributes")


def file_sha256(path: Path) -> str:
    """SHA-256 of the file's bytes, hex."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class FingerprintCache:
    """Digests of files keyed by (path, size, mtime_ns, inode), kept in ``<workdir>/CACHE_FILE``.

    A damaged or unreadable cache is ignored (everything is hashed again); a read-only work
    directory keeps the cache in memory only.
    """

    def __init__(self, workdir: Path):
        self.path = Path(workdir) / CACHE_FILE
        try:
            entries = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            entries = {}
        self.entries: dict[str, str] = entries if isinstance(entries, dict) else {}
        self.changed = False

    def digest(self, path: Path) -> str:
        path = path.resolve()
        status = path.stat()
        key = f"{path}|{status.st_size}|{status.st_mtime_ns}|{status.st_ino}"
        if key not in self.entries:
            self.entries[key] = file_sha256(path)
            self.changed = True
        return self.entries[key]

    def save(self) -> None:
        if not self.changed:
            return
        try:
            write_text_atomically(self.path, json.dumps(self.entries, indent=1, sort_keys=True))
        except OSError:
            return  # a read-only work directory: hash again next time
        self.changed = False


def source_files(source: str) -> list[Path]:
    """The files whose bytes decide a model source's weights, tokenizer and template.

    Named sources: the GGUF and (for the organism) the committed adapter. A ``.gguf`` file:
    itself. An HF directory: its files (not ``*.md``, hidden files or subdirectories). Hub ids
    and ``random:`` presets have no local files: their name (and the seed) identify them.
    """
    if source in (DEFAULT_MODEL, ORGANISM, BASE_MODEL):
        try:
            files = [default_gguf_path()]
        except FileNotFoundError:  # loading the model then says how to install it
            files = []
        if source != BASE_MODEL:
            files += [ORGANISM_ADAPTER, ORGANISM_ADAPTER.with_suffix(".json")]
        return [path for path in files if path.is_file()]
    path = Path(os.path.expanduser(source))
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(child for child in path.iterdir()
                      if child.is_file() and not child.name.startswith(".")
                      and not child.name.endswith(_IGNORED_SUFFIXES))
    return []


def prompt_files(sources: Iterable[str]) -> list[Path]:
    """The files behind prompt-set sources: built-in set names and JSON paths (``hf:`` ids have
    none)."""
    files = []
    for source in sources:
        if source in BUILTIN_SETS:
            files.append(BUILTIN_DIR / f"{source}.json")
        elif source and not source.startswith("hf:"):
            path = Path(os.path.expanduser(source))
            if path.is_file():
                files.append(path)
    return files


def fingerprint(files: Iterable[Path], cache: FingerprintCache) -> dict[str, str]:
    """Path -> SHA-256 of each file (sorted, duplicates once)."""
    return {str(path): cache.digest(path) for path in sorted(set(files))}


def changed_inputs(recorded: Mapping[str, str], current: Mapping[str, str]) -> list[str]:
    """The inputs (paths) whose fingerprint differs, appeared or disappeared."""
    return sorted(name for name in recorded.keys() | current.keys()
                  if recorded.get(name) != current.get(name))
