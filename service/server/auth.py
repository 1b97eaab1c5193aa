"""Reading the server's secrets: the bearer token file and TLS material paths.

The token is read once at start-up and kept only in memory; it is never logged. A
token file that group or others may read is served anyway (operators sometimes mount
secrets that way) but warned about, as ``ssh`` does for private keys.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

__all__ = ["CredentialFileError", "check_readable", "read_token_file"]

logger = logging.getLogger(__name__)
# A bearer token travels as an HTTP/2 header value: visible ASCII, no spaces.
_TOKEN_CHARS = frozenset(chr(c) for c in range(0x21, 0x7F))
MIN_TOKEN_LENGTH = 16


class CredentialFileError(ValueError):
    """A token, certificate or key file is missing, unreadable or malformed."""


def check_readable(path: str | os.PathLike[str], what: str) -> Path:
    """Fail early, naming ``what``, when ``path`` is not a readable regular file.

    Raises:
        CredentialFileError: the file is missing, not a regular file or unreadable.
    """
    file = Path(path)
    if not file.is_file():
        raise CredentialFileError(f"{what} {file}: no such file")
    if not os.access(file, os.R_OK):
        raise CredentialFileError(f"{what} {file}: not readable by this user")
    return file


def read_token_file(path: str | os.PathLike[str]) -> str:
    """The bearer token in ``path``: its content with surrounding whitespace removed.

    Logs a warning (without the token) when group or others may read the file.

    Raises:
        CredentialFileError: missing or unreadable file, empty token, a token with
            spaces or non-ASCII characters (not sendable as a header), or shorter than
            16 characters (guessable).
    """
    file = check_readable(path, "token file")
    mode = stat.S_IMODE(file.stat().st_mode)
    if mode & 0o077:
        logger.warning(
            "token file %s has mode %04o: group or others can read it; run chmod 600 %s", file, mode, file
        )
    try:
        token = file.read_text(encoding="ascii").strip()
    except UnicodeDecodeError:
        raise CredentialFileError(f"token file {file}: the token must be ASCII") from None
    if not token:
        raise CredentialFileError(f"token file {file}: empty")
    if not set(token) <= _TOKEN_CHARS:
        raise CredentialFileError(
            f"token file {file}: the token must be one line of visible ASCII, no spaces"
        )
    if len(token) < MIN_TOKEN_LENGTH:
        raise CredentialFileError(
            f"token file {file}: the token has {len(token)} characters, fewer than {MIN_TOKEN_LENGTH}"
        )
    return token
