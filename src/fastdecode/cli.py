"""`fastdecode <command>`: each command lives in fastdecode/commands/<name>.py and exposes
``add_parser(subparsers)`` and ``run(args) -> int``."""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from .errors import FastdecodeError

COMMANDS = ("generate", "quantize", "report", "ppl", "diagnose", "bench",
            "study")
DESCRIPTION = ("Fast, faithful batch-1 decoding of RoPE decoder LLMs: generate text, "
               "quantize a model, measure perplexity and decode speed, plot the history.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastdecode", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"fastdecode.commands.{name}").add_parser(sub)
    return parser


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"fastdecode: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    old_format = warnings.formatwarning
    warnings.formatwarning = _one_line_warning  # a user sees one line, not our source
    try:
        return int(args.run(args) or 0)
    except FastdecodeError as e:
        print(f"fastdecode {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = old_format


if __name__ == "__main__":
    sys.exit(main())
