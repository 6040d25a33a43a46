"""The README and the docs: short, linked, built strictly, and written from the code where they list it."""

import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme() -> str:
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        return f.read()


def test_the_readme_is_short_and_its_links_lead_somewhere():
    readme = _readme()
    assert len(readme.splitlines()) <= 200
    links = [target for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme) if "://" not in target]
    assert links, "the README links to the docs"
    assert not [t for t in links if not os.path.exists(os.path.join(REPO, t))]


def test_no_page_cites_an_issue_or_a_file_outside_the_repository():
    pages = [os.path.join(root, name) for root, _, names in os.walk(os.path.join(REPO, "docs"))
             for name in names if name.endswith(".md")]
    for path in [os.path.join(REPO, "README.md"), *pages]:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        assert not re.search(r"\bissues? \d+|DESIGN\.md|\.\./shared", text), path


def test_the_docs_build_strictly(tmp_path):
    """Strict: a link to a missing page or heading, or an unknown generated reference, fails."""
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=REPO, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    with open(tmp_path / "site" / "reference" / "config" / "index.html", encoding="utf-8") as f:
        config_page = f.read()
    assert "model.trunk.passthrough" in config_page and "<!-- reference" not in config_page
    with open(tmp_path / "site" / "reference" / "registries" / "index.html", encoding="utf-8") as f:
        assert "ridge_head" in f.read()
