"""The package's floors (docs/architecture.md), read from the import graph.

Every ``import hyprstream...`` statement in the package is read statically -- module level, function level,
and under ``TYPE_CHECKING`` alike -- and a module may import only its own package and the floors below its
own. Tiers stand side by side: ``agent/``, ``fog/`` and ``core/`` never import each other, and ``privacy/`` and
``store/`` import none of them.

What several tiers use stands on a floor below them (core's API, the telemetry records, the learning pieces),
so the rule has no exception.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PACKAGE = Path(__file__).resolve().parents[1] / "hyprstream"

# floor of each top-level module or package of hyprstream (docs/architecture.md, "Floors")
FLOORS: dict[str, int] = {
    # floor 1: shared records, configuration and durable files
    "__init__": 1, "_extras": 1, "errors": 1, "plugins": 1, "config": 1, "codec": 1, "protocol": 1, "durable": 1,
    "vector_clock": 1, "consistency": 1, "runtime": 1, "observe": 1,
    # floor 2: core's API (records, commands, client), telemetry records and broker settings, the local store
    "coreapi": 2, "telemetry": 2, "store": 2,
    # floor 3, each over the ones before it: the data sets (on the store's tables), the learning pieces
    # (tasks, trainer, torch predictor; tasks load the data sets), privacy (DP-SGD makes the trainer private)
    "data": 3, "learning": 4, "privacy": 5,
    # floor 4: the tiers, side by side
    "agent": 6, "fog": 6, "core": 6,
    # beside them: the local deployment, which runs the tiers as processes and imports none of them
    "poc": 6,
    # floor 5: what drives the tiers
    "sim": 7, "dashboard": 7, "cli": 7,
}
# floor 1's modules build on each other in this order (a module imports only earlier ones)
FLOOR_ONE_ORDER = ("errors", "observe", "plugins", "runtime", "_extras", "config", "codec", "durable", "vector_clock", "consistency", "protocol",
                   "__init__")


def _top(name: str) -> str:
    return name.split(".")[1]


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names] if node.module == "hyprstream" \
                else [node.module]
        elif isinstance(node, ast.ImportFrom):  # relative imports stay inside their package
            continue
        else:
            continue
        for name in names:
            if name.startswith("hyprstream.") and _top(name) in FLOORS:
                yield node.lineno, name


def _allowed(own: str, target: str) -> bool:
    if own == target or FLOORS[target] < FLOORS[own]:
        return True
    if FLOORS[own] == FLOORS[target] == 1:
        return FLOOR_ONE_ORDER.index(target) < FLOOR_ONE_ORDER.index(own)
    return own == "cli" and target in ("sim", "dashboard")  # the command line drives the simulator and the dashboard


def crossings() -> dict[tuple[str, str], list[int]]:
    found: dict[tuple[str, str], list[int]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        own = rel.parts[0].removesuffix(".py")
        assert own in FLOORS, f"hyprstream/{rel}: {own!r} has no floor in tests/test_layers.py"
        for line, name in _imports(path):
            if not _allowed(own, _top(name)):
                found.setdefault((rel.as_posix(), name), []).append(line)
    return found


def test_every_import_respects_the_floors() -> None:
    found = crossings()
    assert not found, "imports that cross the floors:\n" + "\n".join(
        f"  hyprstream/{mod}:{lines[0]} imports {name}" for (mod, name), lines in sorted(found.items()))


def test_the_floor_rule_catches_a_tier_importing_another(tmp_path: Path) -> None:
    """The reader sees function-level and TYPE_CHECKING imports, the ways a cycle hides."""
    source = ("from typing import TYPE_CHECKING\n"
              "if TYPE_CHECKING:\n    from hyprstream.fog.aggregator import FogRound\n"
              "def f():\n    import hyprstream.agent.daemon\n    from hyprstream.store import layer_table\n")
    path = tmp_path / "mod.py"
    path.write_text(source)
    names = [name for _, name in _imports(path)]
    assert names == ["hyprstream.fog.aggregator", "hyprstream.agent.daemon", "hyprstream.store"]
    assert [_allowed("core", _top(n)) for n in names] == [False, False, True]
    assert [_allowed("privacy", _top(n)) for n in names] == [False, False, True]
    assert not _allowed("store", "privacy") and _allowed("privacy", "store")
    assert _allowed("privacy", "learning") and not _allowed("learning", "privacy")
    assert not _allowed("learning", "agent") and _allowed("agent", "learning") and _allowed("fog", "learning")
    assert not _allowed("errors", "config") and _allowed("config", "errors")


def test_the_floors_match_docs_architecture() -> None:
    doc = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    section = doc[doc.index("## Floors"):]
    section = section[:section.find("\n## ", 1) if "\n## " in section[1:] else len(section)]
    for name in FLOORS:
        if name != "__init__":
            assert f"`{name}" in section, f"docs/architecture.md's Floors section does not place {name}"
