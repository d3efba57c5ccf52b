"""Fixtures for the engine-simulator tests (helpers live in simproc.py)."""

from __future__ import annotations

import pytest
from simproc import EngineProcs


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    procs = EngineProcs(tmp_path_factory.mktemp("engine-sim"))
    yield procs
    procs.stop_all()


@pytest.fixture
def fresh_engines(tmp_path):
    procs = EngineProcs(tmp_path)
    yield procs
    procs.stop_all()
