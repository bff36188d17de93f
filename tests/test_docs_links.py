"""The documentation a user clones is all there: no path points outside the repository or at a missing file."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Files the tools write into bundles and reports, named in the docs but not part of the repository.
GENERATED = {"quality.md", "bench.md", "frontier.md", "quality.json/.md", "conversion.md", "conversion.json/.md",
             "kv_cache.md", "load_memory.md", "expert_reads.md"}
MD_PATH = re.compile(r"[A-Za-z0-9_./-]*\.md\b")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _tracked_text_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return [ROOT / n for n in names if n.endswith((".md", ".py", ".toml", ".txt", ".cfg", ".spec")) or n == "Makefile"]


def _resolves(mention: str, file: Path) -> bool:
    """Relative to the mentioning file's folder or to the repository root, and inside the repository."""
    for base in (file.parent, ROOT):
        target = (base / mention).resolve()
        if target.is_relative_to(ROOT) and target.exists():
            return True
    return False


def test_readme_names_no_path_outside_the_repository():
    text = (ROOT / "README.md").read_text()
    assert "../" not in text
    assert "shared/" not in text
    for mention in MD_PATH.findall(text) + LINK.findall(text):
        if not mention.startswith(("http://", "https://", "#")) and mention not in GENERATED:
            assert _resolves(mention, ROOT / "README.md"), f"README.md names {mention}, not in the repository"
    assert "docs/design.md" in text


def test_every_markdown_path_the_repository_names_exists():
    missing = []
    for file in _tracked_text_files():
        if file == Path(__file__).resolve():
            continue  # this file names the forbidden paths it looks for
        text = file.read_text(errors="replace")
        if "../shared" in text:
            missing.append(f"{file.relative_to(ROOT)}: ../shared")
        for mention in set(MD_PATH.findall(text)):
            if mention in GENERATED or mention == ".md":
                continue
            if not _resolves(mention, file):
                missing.append(f"{file.relative_to(ROOT)}: {mention}")
        if file.suffix == ".md":
            for link in LINK.findall(text):
                if not link.startswith(("http://", "https://", "#", "mailto:")) and not _resolves(link, file):
                    missing.append(f"{file.relative_to(ROOT)}: link {link}")
    assert not missing, "paths that a clone does not have:\n" + "\n".join(missing)
