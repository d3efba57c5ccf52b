"""Where this code runs from: the repository checkout of an editable install, if any."""

from __future__ import annotations

from pathlib import Path


def repo_root() -> Path | None:
    """The checkout Baton runs from (editable install), if any: the directory holding pyproject.toml;
    None when the package is installed from a wheel."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "pyproject.toml").is_file() and (parent / "operator" / "baton").is_dir():
            return parent
    return None
