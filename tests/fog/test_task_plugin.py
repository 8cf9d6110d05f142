"""A task from a third-party package (entry point ``hyprstream.tasks``), installed from a directory: it
is found by name, a broken plugin is refused with a clear error, and the deployed fog trains it over
real SuperNodes without any change to Hyprstream."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from fogrun import ENV, digits_stores, fog_toml, free_port, run_fog_over_supernodes

from hyprstream.core.auth import Principal, Role, TokenRegistry
from hyprstream.core.repository import ModelRepository
from hyprstream.core.server import CoreFlightServer
from hyprstream.coreapi.client import CoreClient
from hyprstream.store.layer_table import to_arrays

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "task-plugin"


def install(package: Path, target: Path) -> None:
    """``pip install`` of ``package`` into ``target`` (offline: no dependencies, no build isolation)."""
    work = target.parent / f"{package.name}-src"
    shutil.copytree(package, work)  # setuptools builds in the source tree: keep the original clean
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                           "--no-index", "--target", str(target), str(work)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def install_module(root: Path, target: Path, module: str, group: str, entries: dict[str, str], code: str) -> None:
    """Write and install (into ``target``) a one-module package ``module`` offering ``entries`` (name ->
    attribute of the module) under the entry-point group ``group``."""
    package = root / module
    package.mkdir()
    points = "\n".join(f'{name} = "{module}:{attribute}"' for name, attribute in entries.items())
    (package / "pyproject.toml").write_text(
        f'[build-system]\nrequires = ["setuptools>=61"]\nbuild-backend = "setuptools.build_meta"\n'
        f'[project]\nname = "{module.replace("_", "-")}"\nversion = "1.0"\n'
        f'[project.entry-points."{group}"]\n{points}\n[tool.setuptools]\npy-modules = ["{module}"]\n')
    (package / f"{module}.py").write_text(textwrap.dedent(code))
    install(package, target)


def run_python(code: str, site: Path) -> subprocess.CompletedProcess:
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(site), ENV.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=120)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("plugins")
    target = root / "site"
    install(EXAMPLE, target)
    install_module(root, target, "broken_tasks", "hyprstream.tasks",
                   {"not-a-task": "NotATask", "half-a-task": "HalfATask", "missing": "Missing", "digits": "NotATask"},
                   """
                   from hyprstream.learning.task import Task

                   class NotATask:
                       pass

                   class HalfATask(Task):
                       n_classes = 2
                   """)
    return target


def test_an_installed_task_is_found_and_a_broken_one_refused_by_name(site):
    proc = run_python("""
        from hyprstream.errors import ValidationError
        from hyprstream.learning.task import get_task, task_names

        names = task_names()
        assert "tiny-digits" in names and "digits" in names, names
        task = get_task("tiny-digits")
        assert task.name == "tiny-digits" and task.layer_groups(task.build_model(0)) == ["body", "head"]
        assert type(get_task("digits")).__name__ == "DigitsTask"  # a plugin never replaces a built-in name
        for name in ("not-a-task", "half-a-task", "missing"):
            try:
                get_task(name)
            except ValidationError as exc:
                print(name, "->", exc)
            else:
                raise AssertionError(name)
        """, site)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    said = dict(line.split(" -> ", 1) for line in proc.stdout.splitlines())
    assert "not a subclass of hyprstream.learning.task.Task" in said["not-a-task"]
    assert "does not implement build_model, load_reference_data, to_table" in said["half-a-task"]
    assert "does not load: AttributeError" in said["missing"]
    assert all("from broken-tasks 1.0" in v for v in said.values())
    # without the package on the path the name is unknown, with the known ones listed
    assert "tiny-digits" not in run_python("from hyprstream.learning.task import task_names; print(task_names())",
                                           site.parent / "empty").stdout


def test_the_deployed_fog_trains_a_plugin_task_over_supernodes(site, tmp_path):
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(site), ENV.get("PYTHONPATH", "")])}
    weights_file = tmp_path / "initial.arrow"
    build = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import pyarrow as pa
        from hyprstream.learning.task import get_task
        from hyprstream.learning.trainer import model_weights
        from hyprstream.store import to_table

        task = get_task("tiny-digits")
        table = to_table(model_weights(task.build_model(seed=0)), layer=task.layer_of)
        with pa.OSFile({str(weights_file)!r}, "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
            w.write_table(table)
        """)], capture_output=True, text=True, env=env, timeout=120)
    assert build.returncode == 0, build.stderr  # the plugin is imported there, never in this process
    with pa.memory_map(str(weights_file)) as src:
        initial = pa.ipc.open_file(src).read_all()

    tokens = TokenRegistry()
    tokens.add("admin-token", Principal("admin", Role.ADMIN))
    tokens.add("fog-token", Principal("fog-plug", Role.FOG))
    server = CoreFlightServer(ModelRepository(tmp_path / "core"), tokens)
    location = server.start_background()
    try:
        with CoreClient(location, "admin-token") as admin:
            admin.register_model("tiny-model", initial)
        stores = digits_stores(tmp_path, 2, 150)
        port = free_port()
        config = fog_toml(tmp_path / "fog.toml", name="fog-plug", location=location, token="fog-token",
                          model="tiny-model", state_dir=tmp_path / "fog-state", body=f"""
[superlink]
port = {port}
[rounds]
task = "tiny-digits"
local_steps = 5
min_agents = 2
min_replies = 2
timeout_s = 180
max_rounds = 1
""")
        run_fog_over_supernodes(config, port, stores, env=env)
        with CoreClient(location, "admin-token") as admin:
            versions = admin.list_versions("tiny-model")
            after = admin.get_weights("tiny-model").table
    finally:
        server.stop()
    assert [v["version"] for v in versions] == [0, 1]
    assert versions[1]["actor"] == "fog-plug" and versions[1]["participants"] == 2
    assert sorted(versions[1]["layers"]) == ["body", "head"]
    before, moved = to_arrays(initial), to_arrays(after)
    assert set(moved) == set(before) == {"body.weight", "body.bias", "head.weight", "head.bias"}
    assert all(not np.allclose(moved[k], before[k]) for k in moved)  # both layer groups trained
