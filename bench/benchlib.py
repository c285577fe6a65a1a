"""What every bench script shares: its error, its ``main`` tail, its child processes, tables and JSON.

Each benchmark used to repeat the same lines: set up logging, run, map a failure to a numbered exit code
with one line of explanation, hand a child's figures back on a marked stdout line, lay out a table,
write the figures atomically. They live here once; the scripts import this module by its plain name
(``bench/`` is a script's own directory). The test network of namespaces is the suite's own helper,
``tests/netns.py``: importing this module puts ``tests/`` on the path, so a script imports it as ``netns``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "tests"))  # tests/netns.py, as ``netns``

RESULT_PREFIX = "COGEN_BENCH_RESULT "  # a child's figures: one JSON line on stdout after this marker
Targets = Mapping[str, tuple[str, float]]  # figure -> (">=" or "<=", target)


class BenchError(RuntimeError):
    """The benchmark cannot run, or a run failed (one-line explanation)."""


def run_main(
    name: str,
    run: Callable[[], int],
    *,
    model_errors: bool = False,
    plain_logging: bool = False,
    unwind_on_sigterm: bool = False,
    errors: tuple[type[Exception], ...] = (BenchError,),
) -> int:
    """A bench script's ``main`` after parsing: run it, and turn a failure into a numbered exit code.

    ``model_errors``: a ``cogen.core.models.ModelError`` exits with ``ExitCode.MODEL``. ``plain_logging``:
    configure logging without cogen's setup (which imports transformers), for the scripts that drive
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


def run_child(script: str, args: Sequence[str], threads: int, what: str) -> dict[str, Any]:
    """Run ``script`` with ``args`` in a fresh process limited to ``threads`` and read its marked line.

    Its stderr (progress) passes through; peak memory is per process, hence one process per figure."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, str(Path(script).resolve()), *args]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, check=False)
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


def write_report(path: Path | None, report: Mapping[str, Any]) -> None:
    """Write ``report`` to ``path`` as JSON, atomically (nothing when ``path`` is None), and say so."""
    if path is None:
        return
    from cogen.core.atomic import write_json_atomic

    write_json_atomic(path, dict(report))
    print(f"wrote {path}", flush=True)
