"""Command line: `lepton-fast info`, `lepton-fast demo` (or `python -m lepton_fast ...`)."""
from __future__ import annotations

import argparse


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="lepton-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, build record and the backend each op uses")
    demo = sub.add_parser("demo", help="cross-domain transfer MNIST -> scikit-learn digits, one table")
    from lepton_fast import demo as demo_module

    demo_module.add_arguments(demo)
    args = parser.parse_args(argv)
    if args.command == "info":
        import lepton_fast

        lepton_fast.info()
    elif args.command == "demo":
        return demo_module.main(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
