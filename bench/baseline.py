"""An earlier commit of this repository as a source tree, so a benchmark can measure it beside
the working tree in one run (same machine, same moments)."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def checkout(ref: str, dest: Path) -> Path:
    """The files of commit `ref` under `dest` (created); run code there with PYTHONPATH=dest."""
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest
