"""The "proclock" logger, without importing logging into a program that does not."""

from __future__ import annotations

import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

DEBUG = 10  # logging.DEBUG


class _Log:
    """logging.getLogger("proclock"), without importing logging into a program that does not.

    A program that never imported logging has configured no handler, so there is nothing
    that could show a debug line: checking is then free, and `import proclock` stays cheap.
    """

    __slots__ = ("_logger",)

    def __init__(self) -> None:
        self._logger: Any = None

    def isEnabledFor(self, level: int) -> bool:  # noqa: N802  (the logging API's name)
        logger = self._logger
        if logger is None:
            logging = sys.modules.get("logging")
            if logging is None:
                return False
            logger = self._logger = logging.getLogger("proclock")
        return logger.isEnabledFor(level)  # type: ignore[no-any-return]

    def debug_enabled(self) -> bool:
        """isEnabledFor(DEBUG), answered without a call into logging when nothing changed.

        Asked at every acquisition: logging's own check walks the logger's cache through two
        method calls. The answer is kept for the logging module's configuration generation.
        """
        logger = self._logger
        if logger is None:
            return self.isEnabledFor(DEBUG)
        # logging keeps each level's answer in Logger._cache and clears it whenever the
        # configuration changes (setLevel, disable, dictConfig): read it, else ask.
        cached = logger._cache.get(DEBUG)  # noqa: SLF001
        if cached is None or logger.disabled:
            return bool(logger.isEnabledFor(DEBUG))
        return bool(cached)

    def debug(self, msg: str, *args: object) -> None:
        if self.isEnabledFor(DEBUG):
            self._logger.debug(msg, *args)

    def error(self, msg: str, *args: object) -> None:
        """Errors are logged whether or not the program imported logging (lastResort shows)."""
        import logging  # noqa: PLC0415

        logging.getLogger("proclock").error(msg, *args)


log = _Log()
