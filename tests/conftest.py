"""Shared test set-up: CPU JAX, repo root importable, tiny HF checkpoints as fixtures."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
for p in (str(ROOT), str(ROOT / "tests")):
    if p not in sys.path:
        sys.path.insert(0, p)

import pytest  # noqa: E402

SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drops every compiled XLA program after each test module.

    Each XLA:CPU executable keeps ~14 memory mappings of JIT'd code; the whole suite in one
    process compiled enough of them (~4,600) to reach the kernel's vm.max_map_count (65,530;
    65,423 mappings in the core dump), and the next compile's mmap failure segfaulted XLA
    (2026-12-04: in tests/test_trainer.py, at ~95% of the suite). Clearing the caches unmaps
    them (300 compiles: 4,644 -> 635 mappings)."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()
TEST_DATA = ROOT / "tests" / "data"


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """kind -> (directory, torch model) for the three tiny random checkpoints."""
    from hf_models import save_hf_model

    out = {}
    for kind in ("qwen2", "qwen2_tied", "llama"):
        path = tmp_path_factory.mktemp(kind)
        out[kind] = (path, save_hf_model(kind, path))
    return out
