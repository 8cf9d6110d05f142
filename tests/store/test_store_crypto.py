"""Encryption at rest: segments and log encrypted, keys from files or the environment."""

from __future__ import annotations

import base64
from pathlib import Path

import pyarrow as pa
import pytest

from hyprstream.errors import StoreError
from hyprstream.store import Store, StoreConfig, generate_key, load_key
from hyprstream.store.crypto import KEY_ENV_VAR

SCHEMA = pa.schema([("secret", pa.string())])
PLAINTEXT = "patient-7734-heart-rate"


def all_bytes(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in [*(root / "segments").iterdir(), *(root / "wal").iterdir()])


@pytest.mark.integration
def test_encrypted_store_round_trip_and_no_plaintext_on_disk(tmp_path: Path) -> None:
    key = generate_key()
    root = tmp_path / "s"
    with Store.open(root, create=True, key=key) as s:
        s.create_table("t", SCHEMA)
        s.append("t", pa.table({"secret": [PLAINTEXT] * 3}))
        assert PLAINTEXT.encode() not in all_bytes(root)  # in the log
        s.flush()
        s.append("t", pa.table({"secret": [PLAINTEXT]}))
        with Store.open(root, readonly=True, key=key) as r:
            assert r.read("t").column("secret").to_pylist() == [PLAINTEXT] * 4
    assert PLAINTEXT.encode() not in all_bytes(root)  # in the segments
    with Store.open(root, key=key) as s:
        assert s.num_rows("t") == 4
        assert s.sql("SELECT count(*) AS n FROM t WHERE secret = ?", [PLAINTEXT]).to_pydict() == {"n": [4]}


@pytest.mark.integration
def test_missing_or_wrong_key_is_a_clear_error(tmp_path: Path) -> None:
    root = tmp_path / "s"
    Store.open(root, create=True, key=generate_key()).close()
    with pytest.raises(StoreError, match="store is encrypted"):
        Store.open(root)
    with pytest.raises(StoreError, match="wrong encryption key"):
        Store.open(root, key=generate_key())
    with pytest.raises(StoreError, match="wrong encryption key"):
        Store.open(root, readonly=True, key=generate_key())


@pytest.mark.integration
def test_key_for_a_plain_store_is_refused(tmp_path: Path) -> None:
    Store.open(tmp_path / "s", create=True).close()
    with pytest.raises(StoreError, match="not encrypted"):
        Store.open(tmp_path / "s", key=generate_key())


@pytest.mark.integration
def test_segment_swapped_between_places_fails_to_decrypt(tmp_path: Path) -> None:
    key = generate_key()
    with Store.open(tmp_path / "s", create=True, key=key) as s:
        s.create_table("t", SCHEMA)
        for word in ("a", "b"):
            s.append("t", pa.table({"secret": [word]}))
            s.flush()
    first, second = sorted((tmp_path / "s" / "segments").iterdir())
    data = first.read_bytes()
    second.write_bytes(data)
    # same size; with the checksum check off, authentication is what catches the swap
    with Store.open(tmp_path / "s", key=key, config=StoreConfig(verify_segments=False)) as s:
        with pytest.raises(StoreError, match=f"{second.name}: cannot decrypt"):
            s.read("t")


@pytest.mark.unit
def test_load_key_accepts_raw_hex_and_base64_files(tmp_path: Path) -> None:
    key = generate_key()
    for name, content in (("raw", key), ("hex", key.hex().encode() + b"\n"), ("b64", base64.b64encode(key))):
        (tmp_path / name).write_bytes(content)
        assert load_key(tmp_path / name) == key


@pytest.mark.unit
def test_load_key_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    key = generate_key()
    monkeypatch.setenv(KEY_ENV_VAR, key.hex())
    assert load_key() == key
    monkeypatch.delenv(KEY_ENV_VAR)
    assert load_key() is None


@pytest.mark.unit
def test_bad_keys_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "short").write_text("abcd")
    with pytest.raises(StoreError, match="short: not a 32-byte key"):
        load_key(tmp_path / "short")
    with pytest.raises(StoreError, match="cannot read key file"):
        load_key(tmp_path / "absent")
    monkeypatch.setenv(KEY_ENV_VAR, "zz")
    with pytest.raises(StoreError, match=f"environment variable {KEY_ENV_VAR}"):
        load_key()
