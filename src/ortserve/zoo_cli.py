"""`python -m ortserve models [NAME ...]`: build the zoo's artifacts (all of them by default)."""

from __future__ import annotations

import argparse

from ortserve import zoo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ortserve models", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"models to build, of {sorted(zoo.BUILDERS)} (default: all)")
    parser.add_argument("--repository", action="store_true", help="also lay out the default model repository")
    args = parser.parse_args(argv)
    for name in args.names or sorted(zoo.BUILDERS):
        print(f"{name}: {zoo.ensure(name)}")
    if args.repository:
        print(f"repository: {zoo.ensure_repository()}")
    return 0
