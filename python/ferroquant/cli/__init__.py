"""The `ferroquant` command (also `python -m ferroquant`): one module per subcommand, each with
`add_parser(subparsers)` and `run(args) -> exit code`."""

from __future__ import annotations

import argparse
import sys
from types import ModuleType

from .. import __version__
from .._extras import EXTRA_FOR, MissingExtra

_SUBCOMMANDS = (
    "convert",
    "quantize",
    "imatrix",
    "inspect",
    "generate",
    "eval",
    "finetune",
    "demo",
    "bench",
    "doctor",
    "kv_size",
)


def _modules() -> list[ModuleType]:
    import importlib

    return [importlib.import_module(f".{name}", __name__) for name in _SUBCOMMANDS]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ferroquant",
        description="Fast, bit-exact weight quantization with a Rust core.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"ferroquant {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for mod in _modules():
        mod.add_parser(sub)
    return p


def _missing_extra_line(e: ModuleNotFoundError) -> str | None:
    """One line naming the extra for an optional dependency that is not installed, else None."""
    top = (e.name or "").split(".")[0]
    extra = EXTRA_FOR.get(e.name or "") or EXTRA_FOR.get(top)
    if extra is None:
        return None
    return f"needs {top}, which is not installed: pip install 'ferroquant[{extra}]'"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except MissingExtra as e:
        print(f"ferroquant {args.command}: {e.short()}", file=sys.stderr)
        return 3
    except ModuleNotFoundError as e:
        line = _missing_extra_line(e)
        if line is None:
            raise
        print(f"ferroquant {args.command}: {line}", file=sys.stderr)
        return 3
    except (ValueError, OSError, KeyError) as e:
        print(f"ferroquant {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
