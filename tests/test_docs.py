"""The documentation holds: the mkdocs site builds with --strict (every page in the nav, every link, anchor,
image and README snippet found), and the README's own links and images, which mkdocs never reads, point
at files and headings that exist."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout}\n{done.stderr}"
    return out


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading (and the site too: mkdocs.yml's toc slugify keeps the same rule)."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def readme_links() -> list[str]:
    text = re.sub(r"```.*?```", "", (REPO / "README.md").read_text(), flags=re.S)  # links in code are not links
    return [target for target in LINK.findall(text) if not re.match(r"[a-z]+:", target)]


def test_docs_site_builds_strict(site):
    pages = {p.relative_to(site).as_posix() for p in site.rglob("index.html")}
    assert {"index.html", "methods/index.html", "text-to-image/index.html", "contributors/index.html"} <= pages
    home = (site / "index.html").read_text()
    assert "runs/quickstart/adapter.safetensors" in home and "--8&lt;--" not in home  # the README's snippet, included


def test_readme_links_and_images_hold(site):
    targets = readme_links()
    assert any(t.startswith("docs/") and "#" in t for t in targets) and any(t.endswith(".png") for t in targets)
    readme_anchors = {github_slug(h) for h in re.findall(r"^#+ (.+)$", (REPO / "README.md").read_text(), re.M)}
    broken = []
    for target in targets:
        path, _, anchor = target.partition("#")
        if not path:
            if anchor not in readme_anchors:
                broken.append(target)
        elif not (REPO / path).exists():
            broken.append(target)
        elif anchor and path.startswith("docs/") and path.endswith(".md"):
            page = Path(path).relative_to("docs").with_suffix("")
            html = (site / ("" if page.name == "index" else page) / "index.html").read_text()
            if f'id="{anchor}"' not in html:
                broken.append(target)
    assert broken == []
