"""Shared fixtures: tiny checkpoints built in seconds, and a tiny demo-target build.

Nothing here downloads anything: every model is created from a config with random weights
(or trained for a few steps on a slice of the stdlib corpus) and saved as a real Hugging Face
checkpoint directory, so the loading code under test is the production code.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from _helpers import ARCHS, save_tiny_checkpoint, tiny_demo_config

os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    # The test models are tiny: one intra-op thread is faster than two fighting over a 2-core
    # machine (measured several times faster under load). Ray and DeepSpeed workers are
    # separate processes and keep their own settings.
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {a: save_tiny_checkpoint(a, root / a) for a in ARCHS}


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dspark-cache")


@pytest.fixture(scope="session")
def tiny_demo_target(demo_cache):
    """The demo-target recipe at fixture size (a few seconds)."""
    from dspark.platform.demo.build import build_demo_target

    return build_demo_target(tiny_demo_config(), demo_cache, progress=False, log=lambda m: None)
