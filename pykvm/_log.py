"""Loggers that cost nothing until they have something to show.

``logging`` and what it imports (traceback, linecache, tokenize, string) is a noticeable
part of ``pykvm run``'s start-up where Python runs under emulation (the lab). A
:class:`LazyLogger` imports it on the first message that could be shown: a warning or an
error always, a debug or info message only once ``logging`` is loaded (an application that
configures logging has imported it; otherwise Python's default drops those levels anyway).
"""
from __future__ import annotations

import sys
from typing import Any


class LazyLogger:
    """``logging.getLogger(name)``, fetched on first real use."""

    __slots__ = ("name", "_logger")

    def __init__(self, name: str) -> None:
        self.name = name
        self._logger: Any = None

    def _get(self) -> Any:
        if self._logger is None:
            import logging

            self._logger = logging.getLogger(self.name)
        return self._logger

    def debug(self, msg: str, *args: Any, **kwargs: Any) -> None:
        if "logging" in sys.modules:
            self._get().debug(msg, *args, **kwargs)

    def info(self, msg: str, *args: Any, **kwargs: Any) -> None:
        if "logging" in sys.modules:
            self._get().info(msg, *args, **kwargs)

    def __getattr__(self, attr: str) -> Any:  # warning, error, exception, isEnabledFor, ...
        return getattr(self._get(), attr)


def get_logger(name: str) -> LazyLogger:
    return LazyLogger(name)
