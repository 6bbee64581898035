"""A process that sees only what the container image has: tests/test_deploy.py puts this folder on PYTHONPATH and
Python imports this module at start-up (as it does any `sitecustomize`).

Importable stay the standard library, ortserve itself, and the distributions pinned in the file named by
$ORTSERVE_SLIM_REQUIREMENTS (requirements-server.txt). Any other installed package -- torch, Jupyter, tritonclient,
grpcio-tools -- fails to import as it would in the image, and so does the course's own training and lesson code
(BLOCKED_ORTSERVE). Each refused import is reported on stderr as `slim-image: blocked import NAME`, so a test can
tell what the process tried to use even where a library swallows the ImportError (optional imports).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.metadata
import os
import re
import sys
import sysconfig
from pathlib import Path

BLOCKED_ORTSERVE = frozenset({"ortserve.zoo", "ortserve.zoo_cli", "ortserve.data", "ortserve.figures",
                              "ortserve.exercises"})  # fmt: skip
SITE_PACKAGES = {Path(sysconfig.get_paths()[key]).resolve() for key in ("purelib", "platlib")}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned(requirements: Path) -> frozenset[str]:
    lines = (line.split("#")[0].strip() for line in requirements.read_text().splitlines())
    return frozenset(normalise(line.split("==")[0]) for line in lines if "==" in line)


class SlimImage(importlib.abc.MetaPathFinder):
    def __init__(self, allowed: frozenset[str]) -> None:
        self.allowed = allowed
        self._providers: dict[str, list[str]] | None = None  # top-level module -> distributions (computed lazily)

    def find_spec(self, name, path=None, target=None):
        if name in BLOCKED_ORTSERVE or (path is None and self._outside_the_image(name)):
            sys.stderr.write(f"slim-image: blocked import {name}\n")
            raise ModuleNotFoundError(f"No module named {name!r} in the server image", name=name)
        return None  # let the usual finders find it

    def _outside_the_image(self, name: str) -> bool:
        """A top-level module installed in site-packages by a distribution the image does not have."""
        spec = importlib.machinery.PathFinder.find_spec(name)
        if spec is None:
            return False
        locations = list(spec.submodule_search_locations or []) or [spec.origin]
        if not any(loc and any(Path(loc).resolve().is_relative_to(site) for site in SITE_PACKAGES)
                   for loc in locations):  # fmt: skip
            return False  # the standard library, or a source checkout
        if self._providers is None:
            self._providers = importlib.metadata.packages_distributions()
        return not any(normalise(dist) in self.allowed for dist in self._providers.get(name, ()))


if os.environ.get("ORTSERVE_SLIM_REQUIREMENTS"):
    sys.meta_path.insert(0, SlimImage(pinned(Path(os.environ["ORTSERVE_SLIM_REQUIREMENTS"]))))
