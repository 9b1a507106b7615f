"""Work-directory artefacts: atomic writes, the resolved config, and per-stage completion marks.

Layout of a work directory (one config per directory):

    config.json           the resolved config and its hash (written on the first run)
    <stage>/...           the stage's artefacts (arrays as .npz, tables as .json)
    <stage>/DONE.json     written last, atomically: {"config_hash": ..., "inputs": {...},
                          "files": {name: sha256}, "seconds": {...}}

Every file is written atomically (``runtime.files``), so a crash leaves either the old file or
the new one, never a torn one. A stage counts as done only when its ``DONE.json`` is readable,
names the current config hash and the current fingerprints of its inputs (files it reads,
``study.fingerprints``, and the records of the stages before it), and every file it lists still
has the SHA-256 recorded; otherwise it is redone from its start, with a warning naming the
reason. Every JSON artefact is strict JSON (a NaN is an error naming its key), and a damaged
artefact read by a later stage raises DamagedArtifact naming the file.

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

import zipfile
import zlib

import numpy as np
from absl import logging

from refusal_jax.runtime import distributed
from refusal_jax.runtime.files import atomic_path, write_bytes_atomically
from refusal_jax.study.fingerprints import changed_inputs, file_sha256

CONFIG_FILE = "config.json"
DONE_FILE = "DONE.json"
# Config sections that do not change results, hence are left out of the hash.
UNHASHED_SECTIONS = ("runtime",)
_ABSENT = "<absent>"


class WorkdirConfigMismatch(ValueError):
    """The work directory was written by a different config."""


class DamagedArtifact(ValueError):
    """An artefact cannot be read (truncated, corrupted or not what it should be)."""


def write_json(path: str | os.PathLike, value: Any) -> None:
    """Writes ``value`` as indented strict JSON (no NaN / infinity), atomically, once (process
    0). A non-finite number raises ValueError naming its key."""
    distributed.write_once(f"write {path}", write_bytes_atomically, Path(path),
                           (to_json(value, path) + "\n").encode("utf-8"))


def to_json(value: Any, path: str | os.PathLike = "<value>") -> str:
    """``value`` as indented strict JSON; ValueError naming the key of a NaN or infinity."""
    try:
        return json.dumps(value, indent=2, default=_json_default, allow_nan=False)
    except ValueError:
        offending = _first_non_finite(value)
        if offending is None:
            raise
        raise ValueError(f"cannot write {path}: {offending} is not a finite number (JSON has "
                         "no NaN or infinity)") from None


def _first_non_finite(value: Any, key: str = "") -> str | None:
    """The key path (``a.b[3]``) of the first NaN / infinity in ``value``."""
    if isinstance(value, Mapping):
        items = ((f"{key}.{name}" if key else str(name), item) for name, item in value.items())
    elif isinstance(value, (list, tuple)):
        items = ((f"{key}[{index}]", item) for index, item in enumerate(value))
    elif isinstance(value, np.ndarray):
        bad = np.argwhere(~np.isfinite(value)) if value.dtype.kind == "f" else []
        return f"{key}{list(bad[0])} = {value[tuple(bad[0])]}" if len(bad) else None
    elif isinstance(value, (float, np.floating)) and not np.isfinite(value):
        return f"{key or 'the value'} = {value}"
    else:
        return None
    for name, item in items:
        found = _first_non_finite(item, name)
        if found:
            return found
    return None


def read_json(path: str | os.PathLike) -> Any:
    """The JSON value in ``path``; DamagedArtifact naming the file when it is not JSON."""
    try:
        return json.loads(Path(path).read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise DamagedArtifact(f"{path} is not valid JSON ({error}); it was truncated or "
                              "corrupted: delete it (or its stage's DONE.json) and rerun the "
                              "stage") from None


def read_json_if_intact(path: str | os.PathLike) -> Any:
    """The JSON value in ``path``, or None when the file is missing or damaged (with a
    warning naming it): for partial results that are recomputed when unreadable."""
    if not Path(path).exists():
        return None
    try:
        return read_json(path)
    except DamagedArtifact as error:
        logging.warning("%s; it is computed again", error)
        return None


def write_arrays(path: str | os.PathLike, arrays: Mapping[str, Any]) -> None:
    """Writes named arrays to one ``.npz`` file, atomically, once (process 0)."""
    distributed.write_once(f"write {path}", _write_npz, Path(path), arrays)


def _write_npz(path: Path, arrays: Mapping[str, Any]) -> None:
    with atomic_path(path, suffix=".npz") as temporary:  # np.savez appends .npz to other names
        np.savez(temporary, **{name: np.asarray(value) for name, value in arrays.items()})


def read_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The named arrays of an ``.npz`` file; DamagedArtifact naming the file when unreadable."""
    try:
        with np.load(path) as data:
            return {name: data[name] for name in data.files}
    except (zipfile.BadZipFile, zlib.error, ValueError, EOFError, KeyError) as error:
        raise DamagedArtifact(f"{path} is not a readable .npz file ({error}); it was truncated "
                              "or corrupted: delete it (or its stage's DONE.json) and rerun "
                              "the stage") from None


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


def bind_workdir(workdir: str | os.PathLike, config: Mapping[str, Any], *,
                 write: bool = True) -> str:
    """Saves the resolved config in ``workdir`` (unless ``write`` is False) or checks it
    against the saved one.

    Returns the config hash. Raises WorkdirConfigMismatch, naming the keys that differ, when
    a stage finished in the directory under a config whose hash differs; a saved config under
    which no stage finished (e.g. a run that failed on a missing model) is replaced.
    """
    workdir = Path(workdir)
    if write:
        workdir.mkdir(parents=True, exist_ok=True)
    digest = config_hash(config)
    saved_path = workdir / CONFIG_FILE
    # Round-trip through JSON so tuples and lists compare equal to what was saved.
    resolved = json.loads(json.dumps(dict(config), default=_json_default))
    record = {"config_hash": digest, "config": resolved}
    saved = _read_saved_config(saved_path)
    if saved == record:
        return digest
    if saved is not None and saved.get("config_hash") != digest and _finished_stages(workdir):
        old, new = _flatten(saved.get("config", {})), _flatten(resolved)
        differing = sorted(key for key in old.keys() | new.keys()
                           if old.get(key) != new.get(key)
                           and key.split(".")[0] not in UNHASHED_SECTIONS)
        listing = ", ".join(f"{key}: {_short(old.get(key, _ABSENT))} -> "
                            f"{_short(new.get(key, _ABSENT))}" for key in differing[:10])
        raise WorkdirConfigMismatch(
            f"work directory {workdir} was written by a different config (hash "
            f"{saved.get('config_hash')} there, {digest} now; differing keys: {listing}). "
            "Use a new --workdir for this config, or delete the old one to start over.")
    if write:
        write_json(saved_path, record)
    return digest


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _read_saved_config(path: Path) -> dict | None:
    """The saved config record, or None when absent or damaged (it is then rewritten)."""
    if not path.exists():
        return None
    try:
        saved = read_json(path)
    except DamagedArtifact as error:
        logging.warning("%s; writing it again", error)
        return None
    return saved if isinstance(saved, dict) else None


def _finished_stages(workdir: Path) -> list[str]:
    return sorted(marker.parent.name for marker in workdir.glob(f"*/{DONE_FILE}"))


def file_checksums(stage_dir: str | os.PathLike, files: list[str]) -> dict[str, str]:
    """Relative name -> SHA-256 of each of the stage's files."""
    return {name: file_sha256(Path(stage_dir) / name) for name in sorted(files)}


def stage_record(stage_dir: str | os.PathLike) -> dict | None:
    """The stage's ``DONE.json`` record, or None when absent or damaged (with a warning)."""
    marker = Path(stage_dir) / DONE_FILE
    if not marker.exists():
        return None
    try:
        record = read_json(marker)
    except DamagedArtifact as error:
        logging.warning("%s; the stage runs again", error)
        return None
    if not isinstance(record, dict) or not isinstance(record.get("files"), dict):
        logging.warning("%s is not a completion record of this version; the stage runs again",
                        marker)
        return None
    return record


def stage_done(stage_dir: str | os.PathLike, digest: str,
               inputs: Mapping[str, str] | None = None) -> bool:
    """Whether the stage finished for the config with hash ``digest`` and the input
    fingerprints ``inputs``, with every file it wrote unchanged since (SHA-256).

    Logs a warning naming the reason (changed input, missing or damaged file) when a finished
    stage must run again.
    """
    record = stage_record(stage_dir)
    if record is None or record.get("config_hash") != digest:
        return False
    changed = changed_inputs(record.get("inputs", {}), dict(inputs or {}))
    if changed:
        logging.warning("stage %s: its inputs changed since it ran (%s); it runs again",
                        Path(stage_dir).name, ", ".join(changed))
        return False
    for name, checksum in record["files"].items():
        path = Path(stage_dir) / name
        if not path.is_file():
            logging.warning("stage %s: its file %s is missing; the stage runs again",
                            Path(stage_dir).name, path)
            return False
        if file_sha256(path) != checksum:
            logging.warning("stage %s: its file %s changed or is damaged (checksum differs "
                            "from the one recorded when the stage finished); the stage runs "
                            "again", Path(stage_dir).name, path)
            return False
    return True


def mark_done(stage_dir: str | os.PathLike, digest: str, files: list[str],
              timing: Mapping[str, float] | None = None,
              inputs: Mapping[str, str] | None = None) -> None:
    """Records that the stage finished, with its inputs' fingerprints and the SHA-256 of each
    of its files; call after all its files were written."""
    write_json(Path(stage_dir) / DONE_FILE,
               {"config_hash": digest, "inputs": dict(inputs or {}),
                "files": file_checksums(stage_dir, files), "seconds": dict(timing or {})})


def record_digest(record: Mapping[str, Any] | None) -> str:
    """A short digest of a stage's completion record (its files' checksums and inputs): what a
    later stage records as its input from this stage."""
    if record is None:
        return _ABSENT
    text = json.dumps({"files": record["files"], "inputs": record.get("inputs", {})},
                      sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
