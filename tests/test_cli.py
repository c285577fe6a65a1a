"""The commands' first contact: help and bad flags without torch or hivemind; errors carry exit codes."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from cogen.core.cli_common import run_main
from cogen.core.exit_codes import CommandError, ExitCode

HEAVY = ("torch", "hivemind", "bitsandbytes", "transformers", "peft")


@pytest.mark.parametrize(
    "module, argv",
    [
        ("cogen.app.cli", ["--help"]),
        ("cogen.node.cli", ["--help"]),
        ("cogen.node.cli", ["--no-such-flag"]),
        ("cogen.coordinator.cli", ["--help"]),
        ("cogen.coordinator.cli", ["merge", "--help"]),
    ],
)
def test_help_and_bad_flags_import_no_heavy_library(module: str, argv: list[str]) -> None:
    probe = (
        f"import sys\nfrom {module} import main\ntry:\n    main({argv!r})\nexcept SystemExit as e:\n"
        f"    code = e.code\nloaded = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print('LOADED', loaded, 'CODE', code)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert "LOADED [] CODE" in out.stdout, out.stdout + out.stderr
    assert "usage:" in out.stdout + out.stderr
    assert "kernels" not in out.stderr  # bitsandbytes' import-time message about optional kernels


class _Full(CommandError):
    exit_code = ExitCode.DATA
    what = "disk"


def test_an_error_carries_its_exit_code_and_a_one_line_message(caplog: pytest.LogCaptureFixture) -> None:
    def body() -> int:
        raise _Full("no space left for gen-000002")

    with caplog.at_level(logging.ERROR, logger="cogen"):
        assert run_main("cogen-x", body) == ExitCode.DATA
    assert caplog.messages == ["cogen-x: disk error: no space left for gen-000002"]


def test_every_failure_a_command_reports_has_its_own_code() -> None:
    from cogen.coordinator.merging.registry import MergeError, UnknownMethodError
    from cogen.core.checkpoint import CheckpointError
    from cogen.core.models import ModelError
    from cogen.core.settings import ConfigError
    from cogen.core.swarm import NetworkError
    from cogen.node.service import DataError
    from cogen.protocols.manifest import ManifestError
    from cogen.protocols.version import IncompatibleProtocolError

    codes = {
        ConfigError: ExitCode.CONFIG, IncompatibleProtocolError: ExitCode.PROTOCOL,
        NetworkError: ExitCode.NETWORK, ModelError: ExitCode.MODEL, CheckpointError: ExitCode.DATA,
        DataError: ExitCode.DATA, MergeError: ExitCode.DATA, UnknownMethodError: ExitCode.CONFIG,
        ManifestError: ExitCode.DATA,
    }  # fmt: skip
    for cls, code in codes.items():
        assert cls.exit_code == code, cls


def test_an_unexpected_failure_is_exit_code_1_with_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    def body() -> int:
        raise KeyError("surprise")

    with caplog.at_level(logging.ERROR, logger="cogen"):
        assert run_main("cogen-x", body) == ExitCode.ERROR
    assert caplog.records[-1].exc_info is not None
