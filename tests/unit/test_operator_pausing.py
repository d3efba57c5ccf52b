"""The gate that stops Baton's per-model loops while kopf pauses this replica for a peer."""

from __future__ import annotations

import asyncio
import inspect

from kopf._cogs.aiokits import aiotoggles
from kopf._core.engines import daemons
from kopf._core.reactor import running

from baton.operator.pausing import PauseGate


def test_the_hook_fits_the_installed_kopf():
    # What install() relies on: spawn_tasks() calls the daemon killer through the module attribute,
    # with the operator's pause toggles as a keyword argument.
    assert "operator_paused" in inspect.signature(daemons.daemon_killer).parameters
    assert "daemons.daemon_killer(" in inspect.getsource(running.spawn_tasks)


def test_install_captures_the_toggles_kopf_hands_to_its_daemon_killer(monkeypatch):
    received = {}

    async def fake_killer(*, settings, memories, operator_paused):
        received["toggles"] = operator_paused

    monkeypatch.setattr(daemons, "daemon_killer", fake_killer)
    gate = PauseGate()
    assert gate.install()

    async def scenario():
        toggles = aiotoggles.ToggleSet(any)
        conflict = await toggles.make_toggle(False, name="peering conflict")
        await daemons.daemon_killer(settings=None, memories=None, operator_paused=toggles)
        assert received["toggles"] is toggles and not gate.paused
        await conflict.turn_to(True)
        assert gate.paused
        resumed = asyncio.create_task(gate.wait(False))
        await asyncio.sleep(0.01)
        assert not resumed.done()
        await conflict.turn_to(False)
        await asyncio.wait_for(resumed, 1)
        assert not gate.paused

    asyncio.run(scenario())


def test_a_gate_kopf_never_reached_stays_open():
    gate = PauseGate()
    assert not gate.paused
    asyncio.run(asyncio.wait_for(gate.wait(False), 1))
