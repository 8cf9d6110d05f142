"""A real browser for the dashboard tests: Debian's headless Chromium renders the page (its scripts run and
fetch from the live server) and hands back the DOM as it stands, or a screenshot."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOTS_ENV = "HYPRSTREAM_SCREENSHOTS"  # a directory to keep the screenshots in (default: the test's tmp_path)


def _run(url: str, *extra: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        args = [CHROMIUM, "--headless", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
                f"--user-data-dir={profile}", "--virtual-time-budget=10000", *extra, url]
        if os.geteuid() == 0:
            args.insert(1, "--no-sandbox")  # Chromium's sandbox refuses to run as root
        return subprocess.run(args, capture_output=True, text=True, timeout=120)


def dom(url: str) -> str:
    """The page's DOM once its scripts ran (Chromium's --dump-dom)."""
    run = _run(url, "--dump-dom")
    assert run.returncode == 0 and "<html" in run.stdout, run.stderr[-2000:]
    return run.stdout


def screenshot(url: str, path: Path, *, size: tuple[int, int] = (1400, 1800)) -> Path:
    keep = os.environ.get(SCREENSHOTS_ENV)
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        path = Path(keep) / path.name
    run = _run(url, f"--window-size={size[0]},{size[1]}", f"--screenshot={path}")
    assert run.returncode == 0 and path.stat().st_size > 10_000, run.stderr[-2000:]
    return path


class Page(HTMLParser):
    """The rendered page's rows (``<tr data-...>`` with their cells' ``data-field``/``data-value``), the
    elements with an id, every tag, and the text."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.rows: list[dict[str, str]] = []
        self.ids: dict[str, dict[str, str]] = {}
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.text: list[str] = []
        self._row: dict[str, str] | None = None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        self.tags.append((tag, a))
        if tag == "tr" and any(k.startswith("data-") for k in a):
            self._row = {k: v for k, v in a.items() if k.startswith("data-")}
            self.rows.append(self._row)
        elif tag == "td" and "data-field" in a and self._row is not None:
            self._row[a["data-field"]] = a.get("data-value", "")
        if "id" in a:
            self.ids[a["id"]] = a

    def handle_endtag(self, tag):
        if tag == "tr":
            self._row = None

    def handle_data(self, data):
        self.text.append(data)

    def rows_with(self, key: str) -> dict[str, dict[str, str]]:
        return {row[key]: row for row in self.rows if key in row}


__all__ = ["CHROMIUM", "Page", "dom", "screenshot"]
