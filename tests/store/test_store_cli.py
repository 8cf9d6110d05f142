"""The ``hyprstream store`` subcommands, driven through their argparse parser."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hyprstream.errors import StoreError, ValidationError
from hyprstream.store import Store, generate_key
from hyprstream.store.cli import add_parser

pytestmark = pytest.mark.integration


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="hyprstream")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


def test_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["store", "--help"], *([["store", c, "--help"] for c in ("info", "ingest", "query", "search", "compact")])):
        with pytest.raises(SystemExit) as exit_:
            run(*argv)
        assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "Merge a table's small segments" in out and "--key-file" in out


def test_ingest_info_query_compact(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = str(tmp_path / "s")
    pq.write_table(pa.table({"sensor": ["a", "b", "a"], "value": [1.0, 2.0, 4.0]}), tmp_path / "in.parquet")
    (tmp_path / "in.csv").write_text("sensor,value\nb,8.0\n")
    assert run("store", "ingest", store, "r", str(tmp_path / "in.parquet"), "--create") == 0
    assert run("store", "ingest", store, "r", str(tmp_path / "in.csv")) == 0
    assert capsys.readouterr().out == "3 rows appended to r\n1 rows appended to r\n"
    assert run("store", "info", store, "--schema") == 0
    out = capsys.readouterr().out
    assert out.startswith("r: 4 rows,") and "retention: none" in out and "  value: double" in out
    assert run("store", "query", store, "SELECT sensor, sum(value) AS s FROM r GROUP BY sensor ORDER BY sensor") == 0
    assert capsys.readouterr().out == '"sensor","s"\n"a",5\n"b",10\n'
    assert run("store", "query", store, "SELECT count(*) AS n FROM r", "--format", "json") == 0
    assert json.loads(capsys.readouterr().out) == {"n": 4}
    assert run("store", "compact", store, "r") == 0
    assert capsys.readouterr().out == "r: 2 -> 1 segments\n"


def test_search(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    schema = pa.schema([("id", pa.int64()), ("emb", pa.list_(pa.float32(), 2))])
    with Store.open(tmp_path / "s", create=True) as s:
        s.create_table("docs", schema)
        emb = pa.array([[1, 0], [0, 1], [0.5, 0.5]], pa.list_(pa.float32(), 2))
        s.append("docs", pa.table({"id": [10, 11, 12], "emb": emb}, schema=schema))
    assert run("store", "search", str(tmp_path / "s"), "docs", "emb", "--vector", "1,0.1", "-k", "2",
               "--columns", "id", "--format", "json") == 0
    hits = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [h["id"] for h in hits] == [10, 12]
    np.save(tmp_path / "q.npy", np.array([[0, 1], [1, 0]], np.float32))
    assert run("store", "search", str(tmp_path / "s"), "docs", "emb", "--vectors", str(tmp_path / "q.npy"),
               "-k", "1", "--metric", "inner_product") == 0
    assert capsys.readouterr().out.splitlines()[1:] == ["0,0,1,1", "1,0,0,1"]


def test_encrypted_store_with_key_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = generate_key()
    (tmp_path / "key").write_text(key.hex())
    with Store.open(tmp_path / "s", create=True, key=key) as s:
        s.create_table("t", pa.schema([("x", pa.int64())]))
        s.append("t", pa.table({"x": [1, 2]}))
    assert run("store", "query", str(tmp_path / "s"), "SELECT sum(x) AS s FROM t",
               "--key-file", str(tmp_path / "key")) == 0
    assert capsys.readouterr().out == '"s"\n3\n'
    with pytest.raises(StoreError, match="encrypted"):
        run("store", "info", str(tmp_path / "s"))


def test_errors_are_hyprstream_errors(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        run("store", "info", str(tmp_path / "missing"))
    (tmp_path / "x.txt").write_text("1")
    with pytest.raises(ValidationError, match="unknown input format"):
        run("store", "ingest", str(tmp_path / "s"), "t", str(tmp_path / "x.txt"), "--create")
    Store.open(tmp_path / "s", create=True).close()
    (tmp_path / "in.csv").write_text("x\n1\n")
    with pytest.raises(StoreError, match="--create"):
        run("store", "ingest", str(tmp_path / "s"), "t", str(tmp_path / "in.csv"))


def test_jsonl_ingest_and_parquet_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = str(tmp_path / "s")
    (tmp_path / "in.jsonl").write_text('{"mote": 1, "temp": 20.5}\n{"mote": 2, "temp": 22.0}\n{"mote": 1, "temp": 21.5}\n')
    assert run("store", "ingest", store, "readings", str(tmp_path / "in.jsonl"), "--create") == 0
    out = tmp_path / "mean.parquet"
    assert run("store", "query", store, "SELECT mote, avg(temp) AS t FROM readings GROUP BY mote ORDER BY mote",
               "--out", str(out)) == 0
    assert pq.read_table(out).to_pydict() == {"mote": [1, 2], "t": [21.0, 22.0]}
    assert "2 rows written" in capsys.readouterr().out


def test_main_cli_reports_store_errors_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from hyprstream.cli import main

    assert main(["store", "info", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no store here" in err
