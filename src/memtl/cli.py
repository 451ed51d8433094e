"""``memtl <command>``: the tools around training (training itself is ``python train.py``).

    memtl bench [--geometry ...]     side-by-side memory/speed benchmark (python -m memtl.tools.bench)
    memtl recon [--layers 6,12,24]   MEFT reconstruction error vs depth and precision
    memtl gradcheck                  MEFT reversible gradients vs plain autograd (the exactness table)
    memtl estimate [--backbone ...]  predicted peak memory per method, and whether it fits a budget
    memtl report <runs folder>       paper-style table, memory table and Pareto plot of a sweep
    memtl options [method ...]       each method option: default, what it is, the values it allows
    memtl gpu-check [--device cpu]   the prepared GPU check: gradients, bench, estimator, training (make gpu-check)
"""
from __future__ import annotations

import argparse
import sys

COMMANDS = {"bench": "memtl.tools.bench", "recon": "memtl.tools.recon",
            "gradcheck": "memtl.tools.gradcheck", "estimate": "memtl.tools.estimate",
            "report": "memtl.tools.report", "options": "memtl.methods.options",
            "gpu-check": "memtl.tools.gpu_check"}


class ArgumentParser(argparse.ArgumentParser):
    """argparse with bad input as one line (``error: ...``, exit 2) instead of the usage block."""

    def error(self, message: str):
        self.exit(2, f"error: {message}: see {self.prog} --help\n")


def check_out_file(out: str | None) -> None:
    """``--out FILE``: its folder must exist and be writable, checked before any work is done."""
    import os
    from pathlib import Path

    from memtl.errors import ConfigError

    if out is None:
        return
    path = Path(out).expanduser()
    parent = path.parent
    if path.is_dir() or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        why = ("is a folder" if path.is_dir() else f"{parent} is not a folder" if not parent.is_dir()
               else f"{parent} is not writable")
        raise ConfigError(f"cannot write --out {out}: {why}; give a file path in a folder you can write")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        if not argv:
            print(f"error: no command given: choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command '{command}': choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    import importlib

    return importlib.import_module(COMMANDS[command]).main(rest)


if __name__ == "__main__":
    sys.exit(main())
