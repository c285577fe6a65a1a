"""Numbered exit codes shared by cogen's commands, each with a one-line meaning.

An error class carries its own code: :class:`CommandError` subclasses (and the few classes in
:mod:`cogen.protocols`, which set the same two attributes) say which code a command exits with and
what failed; :func:`cogen.core.cli_common.run_main` reads them, so no registry needs filling.
"""

from __future__ import annotations

from enum import IntEnum
from typing import ClassVar


class ExitCode(IntEnum):
    OK = 0
    ERROR = 1  # an unexpected failure; the log has the traceback
    CONFIG = 2  # bad flags, environment variables or config file
    PROTOCOL = 3  # the swarm speaks an incompatible protocol version
    NETWORK = 4  # cannot start or join the DHT
    MODEL = 5  # the model cannot be found, converted or loaded
    DATA = 6  # the domain's data cannot be read
    INTERRUPTED = 130  # stopped before it could finish its work


class CommandError(Exception):
    """An error a command reports in one line (``<command>: <what> error: <message>``) and exits on."""

    exit_code: ClassVar[int] = ExitCode.ERROR
    what: ClassVar[str] = "unexpected"
