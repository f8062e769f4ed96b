"""Command line: `lepton-fast info` (or `python -m lepton_fast info`)."""
from __future__ import annotations

import argparse


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="lepton-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, build record and the backend each op uses")
    args = parser.parse_args(argv)
    if args.command == "info":
        import lepton_fast

        lepton_fast.info()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
