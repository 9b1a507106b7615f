"""Work-directory artefacts: atomic writes, the resolved config, and per-stage completion marks.

Layout of a work directory (one config per directory):

    config.json           the resolved config and its hash (written on the first run)
    <stage>/...           the stage's artefacts (arrays as .npz, tables as .json)
    <stage>/DONE.json     written last, atomically: {"config_hash": ..., "files": [...]}

Every file is written atomically (``runtime.files``), so a crash leaves either the old file or
the new one, never a torn one. A stage
counts as done only when its ``DONE.json`` names the current config hash and every file it lists
exists; an interrupted stage is therefore redone from its start.

The config hash covers every key except the ``runtime`` section (batch sizes, chunking, the
device mesh), which changes how fast a run goes but not what it computes; a run may therefore
resume on another mesh.

With several processes (a pod), every process computes the same values, only process 0 writes
each file, and all processes wait at a barrier until it is written
(``distributed.write_once``), so any process may read it next.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from refusal_jax.runtime import distributed
from refusal_jax.runtime.files import atomic_path, write_bytes_atomically

CONFIG_FILE = "config.json"
DONE_FILE = "DONE.json"
# Config sections that do not change results, hence are left out of the hash.
UNHASHED_SECTIONS = ("runtime",)
_ABSENT = "<absent>"


class WorkdirConfigMismatch(ValueError):
    """The work directory was written by a different config."""


def write_json(path: str | os.PathLike, value: Any) -> None:
    """Writes ``value`` as indented JSON, atomically, once (process 0)."""
    text = json.dumps(value, indent=2, sort_keys=False, default=_json_default)
    distributed.write_once(f"write {path}", write_bytes_atomically, Path(path),
                           (text + "\n").encode("utf-8"))


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_arrays(path: str | os.PathLike, arrays: Mapping[str, Any]) -> None:
    """Writes named arrays to one ``.npz`` file, atomically, once (process 0)."""
    distributed.write_once(f"write {path}", _write_npz, Path(path), arrays)


def _write_npz(path: Path, arrays: Mapping[str, Any]) -> None:
    with atomic_path(path, suffix=".npz") as temporary:  # np.savez appends .npz to other names
        np.savez(temporary, **{name: np.asarray(value) for name, value in arrays.items()})


def read_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {name: data[name] for name in data.files}


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def config_hash(config: Mapping[str, Any]) -> str:
    """Hash of the config's result-relevant keys (all but ``UNHASHED_SECTIONS``)."""
    relevant = {key: value for key, value in config.items() if key not in UNHASHED_SECTIONS}
    text = json.dumps(relevant, sort_keys=True, default=_json_default)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def bind_workdir(workdir: str | os.PathLike, config: Mapping[str, Any]) -> str:
    """Saves the resolved config in ``workdir`` or checks it against the saved one.

    Returns the config hash. Raises WorkdirConfigMismatch, naming the keys that differ, when
    the directory was written by a config whose hash differs.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    digest = config_hash(config)
    saved_path = workdir / CONFIG_FILE
    # Round-trip through JSON so tuples and lists compare equal to what was saved.
    resolved = json.loads(json.dumps(dict(config), default=_json_default))
    if saved_path.exists():
        saved = read_json(saved_path)
        if saved.get("config_hash") != digest:
            old, new = _flatten(saved.get("config", {})), _flatten(resolved)
            differing = sorted(key for key in old.keys() | new.keys()
                               if old.get(key) != new.get(key)
                               and key.split(".")[0] not in UNHASHED_SECTIONS)
            listing = ", ".join(f"{key}: {old.get(key, _ABSENT)!r} -> {new.get(key, _ABSENT)!r}"
                                for key in differing[:10])
            raise WorkdirConfigMismatch(
                f"work directory {workdir} was written by a different config (hash "
                f"{saved.get('config_hash')} there, {digest} now; differing keys: {listing}). "
                "Use a new --workdir for this config, or delete the old one to start over.")
    write_json(saved_path, {"config_hash": digest, "config": resolved})
    return digest


def stage_done(stage_dir: str | os.PathLike, digest: str) -> bool:
    """Whether the stage finished for the config with hash ``digest`` (all its files present)."""
    marker = Path(stage_dir) / DONE_FILE
    if not marker.exists():
        return False
    record = read_json(marker)
    if record.get("config_hash") != digest:
        return False
    return all((Path(stage_dir) / name).exists() for name in record.get("files", []))


def mark_done(stage_dir: str | os.PathLike, digest: str, files: list[str],
              timing: Mapping[str, float] | None = None) -> None:
    """Records that the stage finished; call after all its files were written."""
    write_json(Path(stage_dir) / DONE_FILE,
               {"config_hash": digest, "files": sorted(files), "seconds": dict(timing or {})})
