"""Parse command lines with the real argument parsers of our ``python -m`` entry points, and stop.

    echo '[{"module": "learner", "args": ["--runs-dir", "/runs"]}]' | python scripts/check_argv.py

For each item it runs the module as ``__main__`` (as ``python -m`` would) until its first
``ArgumentParser.parse_args`` call returns, and records the parsed namespace instead of going on,
so no server starts and no model loads. A rejected command line (unknown flag, bad type or
choice, missing required flag) is reported with argparse's message. Prints one JSON object per
item: ``{"module", "ok", "error", "parsed"}``; exit status 1 when any item failed.
Checks done after parsing (e.g. pydantic settings built from the namespace) are not run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import runpy
import sys
from collections.abc import Sequence
from typing import Any


class _Parsed(BaseException):
    """Raised from the patched ``parse_args``; a BaseException so ``except Exception`` can't eat it."""

    def __init__(self, namespace: argparse.Namespace) -> None:
        super().__init__("parsed")
        self.namespace = namespace


def parse_only(module: str, args: Sequence[str]) -> dict[str, Any]:
    """The outcome of parsing ``python -m module *args`` with the module's own parser."""
    original = argparse.ArgumentParser.parse_args

    def stop_after_parse(self: argparse.ArgumentParser, *a: Any, **kw: Any) -> argparse.Namespace:
        raise _Parsed(original(self, *a, **kw))

    argparse.ArgumentParser.parse_args = stop_after_parse  # type: ignore[assignment,method-assign]
    saved_argv, err = sys.argv, io.StringIO()
    sys.argv = [f"python -m {module}", *args]
    result: dict[str, Any] = {"module": module, "ok": False, "error": None, "parsed": None}
    try:
        with contextlib.redirect_stderr(err):
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        result["error"] = "the module returned without parsing its command line"
    except _Parsed as parsed:
        result.update(ok=True, parsed={k: str(v) for k, v in vars(parsed.namespace).items()})
    except SystemExit as exit_:
        result["error"] = err.getvalue().strip() or f"exited with {exit_.code!r} before parsing"
    except ImportError as exc:
        result["error"] = f"cannot import {module}: {exc}"
    finally:
        argparse.ArgumentParser.parse_args = original  # type: ignore[method-assign]
        sys.argv = saved_argv
    return result


def main() -> int:
    items = json.load(sys.stdin)
    results = [parse_only(item["module"], item["args"]) for item in items]
    sys.stdout.write("".join(json.dumps(r) + "\n" for r in results))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
