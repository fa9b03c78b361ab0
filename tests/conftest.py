"""Shared test setup: each test starts with a fresh accelerate state.

Several training entry points run in-process (`main(argv)`); accelerate keeps a process-wide singleton, so
a test that builds an `Accelerator` with bf16 would otherwise make the next one with fp32 fail.
"""
from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
