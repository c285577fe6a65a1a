"""Numbered exit codes shared by cogen's commands, each with a one-line meaning."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    ERROR = 1  # an unexpected failure; the log has the traceback
    CONFIG = 2  # bad flags, environment variables or config file
    PROTOCOL = 3  # the swarm speaks an incompatible protocol version
    NETWORK = 4  # cannot start or join the DHT
    MODEL = 5  # the model cannot be found, converted or loaded
    DATA = 6  # the domain's data cannot be read
    INTERRUPTED = 130  # stopped before it could finish its work
