"""The image's build checks every C extension the project has: a silent fallback there
would ship an image without the data plane thread (pyproject's ext-modules are optional)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_image_build_imports_every_extension() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extensions = {e["name"] for e in project["tool"]["setuptools"]["ext-modules"]}
    check = re.search(r'python3 -c "import ([^"]+)"', (ROOT / "Containerfile").read_text())
    assert check, "the Containerfile no longer imports the extensions after pip install"
    assert {name.strip() for name in check.group(1).split(",")} == extensions
