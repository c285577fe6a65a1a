"""The one harness every benchmark uses: arguments, child processes, tables, targets, the JSON report.

A benchmark is a module run from the checkout's root as ``python -m bench.<family>.<name>``. It builds
its parser with :func:`new_parser` (``--json PATH`` always; presets such as ``--quick`` fill defaults that
explicit flags still override, :func:`parse`), runs under :func:`run_main` (a failure becomes a numbered
exit code and one line), measures its baseline in the same run, prints aligned tables
(:func:`table_lines`) and each ratio with its target (:func:`ratio_line`), and writes its figures with
:func:`write_report` (atomic, with :func:`environment`). A figure that needs a fresh process (peak memory
is per process) comes from :func:`run_child`: the same module re-run with a hidden ``--worker`` flag,
answering through :func:`child_main` with one marked JSON line. Children are started as modules
(:func:`module_command`) with the checkout on their ``PYTHONPATH`` (:func:`child_env`), so they find
``bench`` from any working directory.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import signal
import subprocess
import sys
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

#: the checkout's root: ``python -m bench.X`` runs from here, children get it on their PYTHONPATH
ROOT = Path(__file__).resolve().parents[1]
RESULT_PREFIX = "COGEN_BENCH_RESULT "  # a child's figures: one JSON line on stdout after this marker
Targets = Mapping[str, tuple[str, float]]  # figure -> (">=" or "<=", target)


class BenchError(RuntimeError):
    """The benchmark cannot run, or a run failed (one-line explanation)."""


# ----------------------------------------------------------------- arguments


def new_parser(
    doc: str | None,
    presets: Mapping[str, tuple[str, Mapping[str, Any]]] | None = None,
    *,
    show_defaults: bool = False,
) -> argparse.ArgumentParser:
    """A benchmark's parser: its description is ``doc``'s first paragraph, ``--json PATH`` writes the report.

    ``presets``: ``{name: (help, defaults)}``, each a flag ``--name`` that fills those defaults (see
    :func:`parse`); the benchmark adds its own flags after this."""
    parser = argparse.ArgumentParser(
        description=doc.split("\n\n")[0] if doc else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter if show_defaults else argparse.HelpFormatter,
    )
    parser.add_argument(
        "--json", type=Path, default=None, metavar="PATH", help="write all figures here as JSON (atomically)"
    )
    for name, (help_text, _) in (presets or {}).items():
        parser.add_argument(f"--{name}", action="store_true", help=help_text)
    parser.set_defaults(_presets=dict(presets or {}))
    return parser


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv``; every preset given fills its defaults, and flags given explicitly still win."""
    args = parser.parse_args(argv)
    presets: dict[str, tuple[str, Mapping[str, Any]]] = args._presets
    chosen = [name for name in presets if getattr(args, name.replace("-", "_"))]
    if chosen:
        for name in chosen:
            parser.set_defaults(**presets[name][1])
        args = parser.parse_args(argv)
    del args._presets
    return args


# ----------------------------------------------------------------- running


def run_main(
    name: str,
    run: Callable[[], int],
    *,
    model_errors: bool = False,
    plain_logging: bool = False,
    unwind_on_sigterm: bool = False,
    errors: tuple[type[Exception], ...] = (BenchError,),
) -> int:
    """A benchmark's ``main`` after parsing: run it, and turn a failure into a numbered exit code.

    ``model_errors``: a ``cogen.core.models.ModelError`` exits with ``ExitCode.MODEL``. ``plain_logging``:
    configure logging without cogen's setup (which imports transformers), for the benchmarks that drive
    other processes only. ``unwind_on_sigterm``: SIGTERM unwinds like an exception, so the ``finally``
    blocks remove children and network namespaces. ``errors``: what exits with ``ExitCode.ERROR``.
    """
    from cogen.core.exit_codes import ExitCode

    log = logging.getLogger(f"cogen.bench.{name}")
    if unwind_on_sigterm:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if plain_logging:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    else:
        from cogen.core.telemetry import setup_logging

        setup_logging()
    model_error: tuple[type[Exception], ...] = ()
    if model_errors:
        from cogen.core.models import ModelError

        model_error = (ModelError,)
    try:
        return run()
    except model_error as e:
        log.error("%s: model error: %s", name, e)
        return ExitCode.MODEL
    except errors as e:
        log.error("%s: %s", name, e)
        return ExitCode.ERROR
    except KeyboardInterrupt:
        log.error("%s: interrupted", name)
        return ExitCode.INTERRUPTED


# ----------------------------------------------------------------- one measurement in a fresh process


def child_main(run: Callable[[], dict[str, Any]]) -> int:
    """The ``--worker`` side: quiet logs, then the figures as one marked JSON line for :func:`run_child`."""
    from cogen.core.telemetry import setup_logging

    setup_logging(os.environ.get("COGEN_LOG_LEVEL", "WARNING"))
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    print(RESULT_PREFIX + json.dumps(run()), flush=True)
    return 0


def module_command(module: str, *args: str) -> list[str]:
    """The command line that runs ``module`` (``bench.x.y``) with this interpreter."""
    return [sys.executable, "-m", module, *args]


def child_env(threads: int | None = None) -> dict[str, str]:
    """This process's environment with the checkout first on ``PYTHONPATH`` (``bench`` importable from any
    working directory); ``threads`` limits torch/OpenMP/MKL threads and turns tokenizer threads off."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    return env


def run_child(module: str, args: Sequence[str], threads: int, what: str) -> dict[str, Any]:
    """Run ``module`` with ``args`` in a fresh process limited to ``threads`` and read its marked line.

    Its stderr (progress) passes through; peak memory is per process, hence one process per figure."""
    cmd = module_command(module, *args)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=child_env(threads), check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stdout.splitlines()[-5:])
        raise BenchError(f"{what} failed (exit code {proc.returncode}); see its output above\n{tail}")
    result: dict[str, Any] = json.loads(lines[-1][len(RESULT_PREFIX) :])
    return result


# ----------------------------------------------------------------- report


def meets(targets: Targets, key: str, value: float) -> bool:
    """Whether ``value`` is on the right side of ``key``'s target."""
    op, target = targets[key]
    return value >= target if op == ">=" else value <= target


def targets_json(targets: Targets) -> dict[str, dict[str, Any]]:
    """The finite targets as the JSON reports write them: ``{key: {"op": ..., "value": ...}}``."""
    return {k: {"op": op, "value": v} for k, (op, v) in targets.items() if math.isfinite(v)}


def ratio_line(key: str, value: float | None, targets: Targets, what: str = "", width: int = 20) -> str:
    """One ratio against the baseline measured in the same run: its value (or "not measured"), what it
    divides (``what``), and its target with the verdict where ``targets`` has a finite one."""
    measured = value if value is not None and math.isfinite(value) else None
    notes = [what] if what else []
    if key in targets and math.isfinite(targets[key][1]):
        op, target = targets[key]
        verdict = (
            "" if measured is None else "meets target" if meets(targets, key, measured) else "MISSES target"
        )
        notes.append(f"target {op} {target:g}" + (f": {verdict}" if verdict else ""))
    shown = "not measured" if measured is None else f"{measured:7.3f}"
    return f"{key:<{width}} {shown}   ({'; '.join(notes)})" if notes else f"{key:<{width}} {shown}"


def table_lines(rows: Sequence[Sequence[str]], left: Collection[int] = (0,)) -> list[str]:
    """Rows of cells as aligned lines (columns in ``left`` left-aligned, the others right-aligned), with a
    rule of dashes under the first row (the header)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def environment() -> dict[str, Any]:
    """Where the figures were measured: interpreter, platform, cores, and the versions of the libraries
    that this process has imported (none is imported here)."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "argv": sys.argv[1:],
    }
    for name in ("torch", "hivemind", "transformers", "peft", "bitsandbytes"):
        module = sys.modules.get(name)
        if module is not None:
            env[name] = getattr(module, "__version__", None)
    return env


def write_report(path: Path | None, report: Mapping[str, Any]) -> None:
    """Write ``report`` to ``path`` as JSON, atomically (nothing when ``path`` is None), and say so.

    The report gains an ``environment`` key (:func:`environment`) unless it has one."""
    if path is None:
        return
    from cogen.core.atomic import write_json_atomic

    write_json_atomic(path, {**report, "environment": report.get("environment", environment())})
    print(f"wrote {path}", flush=True)
