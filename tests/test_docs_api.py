"""Every Python example in docs/api.md runs, in order, against a live core on loopback."""

import re
from pathlib import Path

import pytest

from hyprstream.core.auth import Principal, Role, TokenRegistry
from hyprstream.core.repository import ModelRepository
from hyprstream.core.server import CoreFlightServer

pytestmark = pytest.mark.integration

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def test_api_examples_run(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 5
    tokens = TokenRegistry()
    tokens.add("doc-admin", Principal("fog-a", Role.ADMIN))
    server = CoreFlightServer(ModelRepository(tmp_path), tokens)
    try:
        monkeypatch.setenv("HYPRSTREAM_CORE", server.start_background())
        monkeypatch.setenv("HYPRSTREAM_TOKEN", "doc-admin")
        monkeypatch.setenv("HYPRSTREAM_FOG", "fog-a")
        namespace: dict = {}
        for block in blocks:
            exec(compile(block, str(DOC), "exec"), namespace)  # noqa: S102 - our own documentation
    finally:
        server.stop()
    out = capsys.readouterr().out
    assert "{'model': 'example', 'version': 0}" in out
    assert "0 {'fc1': {}} ['fc1.weight', 'fc1.bias'] [0. 0. 0. 0.]" in out
    assert "'version': 1, 'staleness': {'fc1': 0}, 'weight': 1.0, 'update_norm': 0.5" in out
    assert "delta contains NaN or Inf" in out
    assert "'clocks': {'fc1': {'fog-a': 1}, 'head': {}}" in out
    assert "[0, 1]" in out
