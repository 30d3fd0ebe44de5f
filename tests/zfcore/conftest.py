"""Fixtures for the zfcore tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run the test with one torch thread, restoring the count after. The analysis tests make
    many small calls (single-image forwards, L-BFGS steps on a few hundred rows), where a second
    thread gains nothing; on a loaded machine its spin-waits made them 20x slower."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)
