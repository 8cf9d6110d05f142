"""Device discovery on a fog's grid: strict in the simulator, tolerant on a deployed fog."""

from __future__ import annotations

import pytest

from hyprstream.agent.client_app import app as agent_app
from hyprstream.errors import HyprstreamError
from hyprstream.fog.discovery import discover
from hyprstream.fog.loopback import LoopbackGrid

pytestmark = pytest.mark.integration


def test_an_agent_that_does_not_answer_is_left_out_only_when_tolerated(site):
    nodes = [1, 2, 3]
    # node 3 names no store: its query handler fails; node 2's query is lost on the way
    config = {1: {"store-dir": str(site.stores[1])}, 2: {"store-dir": str(site.stores[2])}, 3: {}}
    grid = LoopbackGrid(agent_app, nodes, node_config=config.__getitem__,
                        drop=lambda node, msg: node == 2)
    with pytest.raises(HyprstreamError, match="failed the device query"):
        discover(grid, nodes, timeout_s=0.5)
    found = discover(grid, nodes, timeout_s=0.5, require_all=False)
    assert sorted(found) == [1] and found[1].device_id == site.stores[1].name and found[1].data_bucket > 0


def test_a_silent_agent_is_named_with_the_setting_to_raise(site):
    nodes = [1, 2]
    config = {n: {"store-dir": str(site.stores[n])} for n in nodes}
    grid = LoopbackGrid(agent_app, nodes, node_config=config.__getitem__, drop=lambda node, msg: node == 2)
    with pytest.raises(HyprstreamError, match=r"only 1 of 2 agents answered the device query within 0.5 s; "
                                              r"silent: node\(s\) 2 \(raise rounds.timeout_s; in a simulation, "
                                              r"\[runtime\] round_timeout_s\)"):
        discover(grid, nodes, timeout_s=0.5)
