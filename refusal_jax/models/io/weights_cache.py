"""A disk cache of GGUF models as loaded: the dequantised weights with any LoRA adapter merged
in, the config and the tokenizer, so that a model is dequantised once and read back after.

An entry is keyed by the SHA-256 of the GGUF file and of the adapter file, the weights' dtype
and the cache format, so an edited or replaced file never reads a stale entry. A file's SHA-256
is recorded with its size and modification time (``hashes.json``); while both are unchanged the
recorded hash is used and the file is not read again.

Where: ``$REFUSAL_JAX_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/refusal_jax``, else
``~/.cache/refusal_jax``; entries are in its ``weights/`` folder. What it costs: an entry holds
every weight in its dtype (4 bytes a parameter in float32) and the tokenizer's files; the sizes
of the default model's entries are in docs/benchmarks.md. Clearing it: :func:`clear`, or delete
the folder (``rm -r ~/.cache/refusal_jax``); the next load rebuilds what it needs.

Entries are written to a temporary folder beside their place and renamed into it, so a crash or
another process loading the same model never sees a partial entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from safetensors import safe_open
from safetensors.flax import save_file

from refusal_jax.models.config import ModelConfig
from refusal_jax.models.io.tokenizer import load_tokenizer
from refusal_jax.models.params import Params, is_spec, param_specs

CACHE_DIR_ENV = "REFUSAL_JAX_CACHE_DIR"
# Bumped whenever what an entry holds, or how loading builds it, changes.
CACHE_FORMAT = 1
_WEIGHTS_FILE = "params.safetensors"
_CONFIG_FILE = "hf_config.json"
_TOKENIZER_DIR = "tokenizer"
_HASHES_FILE = "hashes.json"
_HASH_CHUNK = 1 << 22


def cache_dir() -> Path:
    """The cache's root folder (see the module docstring)."""
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "refusal_jax"


def clear() -> int:
    """Deletes every cached entry and recorded hash; returns the bytes freed."""
    root = cache_dir()
    freed = sum(path.stat().st_size for path in root.rglob("*") if path.is_file())
    shutil.rmtree(root, ignore_errors=True)
    return freed


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a file, read again only when its size or modification time changed."""
    path = Path(path).resolve()
    stat = path.stat()
    stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    index_path = cache_dir() / _HASHES_FILE
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    known = index.get(str(path))
    if known and all(known.get(key) == value for key, value in stamp.items()):
        return known["sha256"]
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(_HASH_CHUNK):
            digest.update(chunk)
    index[str(path)] = dict(stamp, sha256=digest.hexdigest())
    _write_atomically(index_path, json.dumps(index, indent=1, sort_keys=True).encode())
    return digest.hexdigest()


def entry_key(gguf_path: Path, adapter_path: Path | None, dtype: Any) -> str:
    """The name of the entry of ``gguf_path`` with ``adapter_path`` merged, in ``dtype``."""
    parts = [f"format={CACHE_FORMAT}", f"dtype={jnp.dtype(dtype).name}",
             f"gguf={file_sha256(gguf_path)}",
             f"adapter={file_sha256(adapter_path) if adapter_path is not None else ''}"]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def entry_path(key: str) -> Path:
    return cache_dir() / "weights" / key


def load(key: str) -> tuple[dict, Params, Any] | None:
    """``(hf_config, params, tokenizer)`` of the entry ``key``, or None when there is none."""
    entry = entry_path(key)
    if not (entry / _WEIGHTS_FILE).is_file():
        return None
    hf_config = json.loads((entry / _CONFIG_FILE).read_text())
    with safe_open(str(entry / _WEIGHTS_FILE), framework="numpy") as stream:
        tensors = jax.device_put({name: stream.get_tensor(name) for name in stream.keys()})
    specs = param_specs(ModelConfig.from_hf_config(hf_config))
    params = jax.tree_util.tree_map_with_path(
        lambda path, spec: tensors[jax.tree_util.keystr(path)], specs, is_leaf=is_spec)
    return hf_config, params, load_tokenizer(entry / _TOKENIZER_DIR)


def store(key: str, hf_config: dict, params: Params, tokenizer: Any) -> Path:
    """Writes the entry ``key``; an entry already there (another process's) is kept."""
    entry = entry_path(key)
    entry.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{key}."))
    try:
        temporary.chmod(0o777 & ~_umask())  # mkdtemp's folder is private
        flat, _ = jax.tree_util.tree_flatten_with_path(params)
        save_file({jax.tree_util.keystr(path): leaf for path, leaf in flat},
                  str(temporary / _WEIGHTS_FILE))
        (temporary / _CONFIG_FILE).write_text(json.dumps(hf_config))
        tokenizer.save_pretrained(temporary / _TOKENIZER_DIR)
        os.replace(temporary, entry)
    except OSError:
        if not (entry / _WEIGHTS_FILE).is_file():
            raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return entry


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
