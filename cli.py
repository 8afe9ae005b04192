"""How every command fails: an expected failure is one line on stderr, naming the file or key and what to do, and
exit status 2; `--debug` (or FVLM_DEBUG=1) shows the traceback instead. Anything unexpected keeps its traceback.

Expected failures are the ones a user can mend: a config that does not parse or names an unknown key, a file or
directory that is missing, unreadable or damaged (a truncated checkpoint, undecodable media), a data set not in
its layout, an output directory that would be overwritten, a full disk. `sys.exit("message")` inside a command
ends the same way.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable
from typing import Any


class UserError(Exception):
    """A failure the user can mend, with a message that says how (a damaged checkpoint, an occupied output, a config
    key that does not exist, media that do not decode: config.ConfigError and frames.MediaError are ones too)."""


EXPECTED: tuple[type[BaseException], ...] = (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
                                             PermissionError)  # fmt: skip


def message(e: BaseException) -> str:
    """The one line for an expected failure."""
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return f"no space left on the device while writing {e.filename or 'a file'}: free some space and run again"
    if (
        isinstance(e, OSError)
        and e.filename
        and e.strerror
        and type(e) in (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
    ):
        return f"{e.filename}: {e.strerror}"  # the bare OS error, not a message of ours that names the file
    return " ".join(str(e).split())  # one line


def expected(e: BaseException) -> bool:
    return isinstance(e, EXPECTED) or (isinstance(e, OSError) and e.errno == errno.ENOSPC)


def run(main: Callable[[list[str]], Any], argv: list[str] | None = None) -> Any:
    """Run a command's `main(argv)` the way every command of the project fails (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("FVLM_DEBUG", "").lower() in ("1", "true", "yes")
    argv = [a for a in argv if a != "--debug"]
    try:
        return main(argv)
    except SystemExit as e:  # sys.exit("message") inside a command: the same one line and status
        if not isinstance(e.code, str):
            raise
        print(f"error: {message(UserError(e.code.removeprefix('error: ')))}", file=sys.stderr)
        raise SystemExit(2) from None
    except BaseException as e:  # noqa: BLE001 - sorted into expected and unexpected just below
        if debug or not expected(e):
            raise
        print(f"error: {message(e)}", file=sys.stderr)
        raise SystemExit(2) from None
