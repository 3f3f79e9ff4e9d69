#!/usr/bin/env python3
"""Print the pip constraints of one image: requirements.lock, with the image's own pins in place of the lock's.

    python docker/constraints.py requirements.lock docker/requirements-cuda.txt > /tmp/constraints.txt
    pip install -c /tmp/constraints.txt -r docker/requirements-cuda.txt -e ".[gpu]"

An image's requirements file lists what the image installs beyond ``troupe`` itself, one package a
line: ``name==version`` pins that package for this image and replaces the lock's line for it (the
file's comments say why the image leaves the lock there); a bare ``name`` takes the lock's version
and must be in the lock. Every other lock line is kept, so each image installs the versions CI
tested except where its file says otherwise. Standard library only: it runs before anything is
installed. ``tests/test_images.py`` imports it.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

_LINE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*(?:==\s*([^\s;#]+))?\s*$")


def canonical(name: str) -> str:
    """PEP 503 normalised project name (``PyYAML`` -> ``pyyaml``, ``torch_npu`` -> ``torch-npu``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_requirements(path: str | Path) -> dict[str, str | None]:
    """``{canonical name: version or None}`` of a requirements or lock file (``name==version`` / ``name``).

    Raises:
        ValueError: a line that is neither (ranges, URLs and options have no place in these files).
    """
    out: dict[str, str | None] = {}
    for n, raw in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = _LINE.match(line)
        if not m:
            raise ValueError(f"{path}:{n}: expected `name==version` or `name`, got {raw.strip()!r}")
        out[canonical(m.group(1))] = m.group(3)
    return out


def constraints(lock: str | Path, image_requirements: str | Path) -> list[str]:
    """Constraint lines: the lock's, those the image pins replaced by the image's pins.

    Raises:
        ValueError: a bare name (no ``==``) in the image file that the lock does not pin either.
    """
    pinned = read_requirements(lock)
    own = read_requirements(image_requirements)
    loose = sorted(n for n, v in own.items() if v is None and not pinned.get(n))
    if loose:
        raise ValueError(f"{image_requirements}: {', '.join(loose)}: not in {lock}; pin them (name==version)")
    merged = {**pinned, **{n: v for n, v in own.items() if v is not None}}
    return [f"{n}=={v}" for n, v in sorted(merged.items()) if v]


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(f"usage: {sys.argv[0]} requirements.lock docker/requirements-<image>.txt")
    try:
        print("\n".join(constraints(sys.argv[1], sys.argv[2])))
    except ValueError as e:
        sys.exit(str(e))
