"""Shared fixtures."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_grounding.py"


@pytest.fixture(scope="session")
def tg():
    """``scripts/train_grounding.py`` imported as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("train_grounding", TRAIN_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_grounding"] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def toys():
    """``toys(family) -> (model, processor)``: each tiny random model built once per test module, in float32
    on the CPU (tests/test_engine.py overrides it with its device and dtype settings)."""
    from lmms_prune.toy.models import build_processor, build_tiny_model

    cache: dict[str, tuple] = {}

    def get(family):
        if family not in cache:
            cache[family] = (build_tiny_model(family), build_processor(family))
        return cache[family]

    return get


@pytest.fixture(scope="module")
def left_padded_toys():
    """Like :func:`toys`, with each processor's tokenizer padding on the left (batched generation)."""
    from lmms_prune.toy.models import build_processor, build_tiny_model

    cache: dict[str, tuple] = {}

    def get(family):
        if family not in cache:
            proc = build_processor(family)
            proc.tokenizer.padding_side = "left"
            cache[family] = (build_tiny_model(family), proc)
        return cache[family]

    return get


@pytest.fixture(autouse=True)
def _no_run_sampling_from_another_test():
    """A wrapper records its run's frame sampling process-wide (lmms_prune.video.register_run_sampling: one run
    per lmms-eval process); a test that makes a wrapper must not decide how a later test's task samples clips."""
    from lmms_prune import video

    video.register_run_sampling(None)
    yield
    video.register_run_sampling(None)

