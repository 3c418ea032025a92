"""The `ppcr` console script. Each sub-command lives in the module that implements it."""

from __future__ import annotations

import argparse
import importlib
import os
import pickle
import sys

# sub-command -> (module, help). The module provides `add_arguments(parser)` and `run(args) -> int`.
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("ppcr.data.synref", "generate a SynRef suite in the REFER layout"),
    "convert-refs": ("ppcr.data.refer", "convert a REFER refs(<splitBy>).p pickle to JSON, safely"),
    "train": ("ppcr.training.train", "train one variant at a profile"),
    "evaluate": ("ppcr.evaluation.evaluate", "evaluate a variant and write results.json"),
    "predict": ("ppcr.evaluation.predict", "segment one image from an expression and save an overlay"),
    "convert": ("ppcr.model.convert_glamm", "convert GLaMM's released weights into stage 3's starting checkpoint"),
    "bench": ("ppcr.perf.bench", "measure throughput, latency and memory"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ppcr",
        description="PPCR reproduction: data generation, training, evaluation and prediction.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        module = importlib.import_module(module_name)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError, pickle.UnpicklingError) as err:  # bad input: one line, no traceback
        if os.environ.get("PPCR_DEBUG"):
            raise
        print(f"ppcr {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
