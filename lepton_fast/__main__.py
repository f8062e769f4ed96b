"""Command line: `lepton-fast info`, `lepton-fast demo` (or `python -m lepton_fast ...`)."""
from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    from lepton_fast.tasks import runner
    from lepton_fast.version import __version__

    parser = argparse.ArgumentParser(prog="lepton-fast", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, build record and the backend each op uses")
    demo = sub.add_parser("demo", help="cross-domain transfer (MNIST -> scikit-learn digits by default), one table",
                          description=runner.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    runner.add_arguments(demo)
    args = parser.parse_args(argv)
    try:
        return _run(args, demo)
    except BrokenPipeError:  # `lepton-fast info | head`: the reader left; say nothing more (Python's docs' recipe)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _run(args, demo) -> int:
    from lepton_fast.tasks import DataUnavailable, runner

    if args.command == "info":
        import lepton_fast

        lepton_fast.info()
    elif args.command == "demo":
        runner.check_arguments(args, demo)
        try:
            return runner.main(args)
        except DataUnavailable as e:  # the message says what to fetch; a traceback would bury it
            print(f"lepton-fast demo: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
