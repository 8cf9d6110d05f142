"""Every Python example in docs/api.md runs, in order, against a live core on loopback."""

import re
from pathlib import Path

import pytest

from hyprstream.core import signing
from hyprstream.core.audit import AuditLog, verify_file
from hyprstream.core.auth import Authenticator, Principal, Role, TokenRegistry
from hyprstream.core.repository import ModelRepository
from hyprstream.core.server import CoreFlightServer
from hyprstream.core.storage import LocalStorage

pytestmark = pytest.mark.integration

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def test_api_examples_run(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 7
    tokens = TokenRegistry()
    tokens.add("doc-admin", Principal("fog-a", Role.ADMIN))
    audit_key, token_key = signing.generate_key(), signing.generate_key()
    audit = AuditLog(tmp_path / "audit.jsonl", audit_key, sync=False)
    server = CoreFlightServer(ModelRepository(LocalStorage(tmp_path / "models", sync=False), audit=audit),
                              Authenticator(tokens), token_key=token_key)
    try:
        monkeypatch.setenv("HYPRSTREAM_CORE", server.start_background())
        monkeypatch.setenv("HYPRSTREAM_TOKEN", "doc-admin")
        monkeypatch.setenv("HYPRSTREAM_FOG", "fog-a")
        namespace: dict = {}
        for block in blocks:
            exec(compile(block, str(DOC), "exec"), namespace)  # noqa: S102 - our own documentation
    finally:
        server.stop()
        audit.close()
    out = capsys.readouterr().out
    assert "{'model': 'example', 'version': 0}" in out
    assert "0 {'fc1': {}} ['fc1.weight', 'fc1.bias'] [0. 0. 0. 0.]" in out
    assert "'version': 1, 'staleness': {'fc1': 0}, 'weight': 1.0, 'update_norm': 0.5" in out
    assert "delta contains NaN or Inf" in out
    assert "'clocks': {'fc1': {'fog-a': 1}, 'head': {}}, 'max_update_norm': 100.0}" in out
    assert "[0, 1]" in out
    assert "hyprstream.audit-head/1 True" in out
    assert "[('model.register', 'ok'), ('model.push', 'ok'), ('model.push', 'refused')]" in out
    assert "True True" in out
    assert "reader 3600 3" in out
    assert "role 'reader' of 'dashboard' may not push" in out
    assert "missing credentials: send 'authorization: Bearer <token>'" in out
    assert "True True False" in out
    assert "token revoked (jti " in out
    assert "[(0, None, 0, 0.0), (1, 'fog-a', 5, 0.5)]" in out  # SQL through the ADBC driver
    assert "[{'action': 'access.refused', 'n': " in out
    assert verify_file(tmp_path / "audit.jsonl", audit_key.public_key()).ok
