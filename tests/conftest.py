"""Suite-wide set-up: one compilation cache on disk for the session, and compiled programs
released after each test module."""

import os
import shutil
import tempfile

import jax
import pytest

# Many modules compile the same programs (the tiny study runs in several of them, and the
# programs are released after each module, below), and subprocesses inherit the variables: a
# program compiled once in the session is read back from this directory afterwards. The
# directory is new for each session, so no run depends on an earlier one.
_CACHE_DIR = tempfile.mkdtemp(prefix="refusal_jax_test_programs_")
os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_CACHE_DIR, ignore_errors=True)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drops JAX's compiled programs after each test module. The suite compiles thousands of
    programs in one process, and XLA:CPU maps memory for each; without this the process
    aborted inside XLA's compiler at 86% of the suite (2026-12-06, twice, at the same test)."""
    yield
    jax.clear_caches()
