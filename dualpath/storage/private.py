"""Files and directories that only the cluster's user can read (docs/SECURITY.md, "The block store").

A stored block tells whoever can read it, or merely see its name, that a prompt with that prefix was
served: its key is a hash of the prompt's tokens and the model, which anyone can compute. So the
store's directories are 0700 and its files 0600, set exactly with chmod / fchmod, not left to the
process's umask (a common 022 would make both world-readable).
"""

from __future__ import annotations

import logging
import os

DIR_MODE, FILE_MODE = 0o700, 0o600

log = logging.getLogger(__name__)


def private_dir(path: str) -> None:
    """Make a directory that only this user can list or enter. An existing one is left as it is: it may
    be a mount point, or a directory its owner shares on purpose (the store's own subdirectories are
    tightened by ``tighten`` instead)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)  # parents (~/.cache) keep usual modes
    try:
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        return
    os.chmod(path, DIR_MODE)  # mkdir's mode passes through the umask: set it exactly


def private_file(path: str, flags: int) -> int:
    """os.open(path, flags | O_CREAT) for a file only this user can read; returns the descriptor."""
    fd = os.open(path, flags | os.O_CREAT, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)  # exact, whatever the umask (a file that already existed included)
    except BaseException:
        os.close(fd)
        raise
    return fd


def tighten(path: str, mode: int, want: int) -> None:
    """Take group and other access away from something the store made before it was private (an
    older version wrote 0755 / 0644). One owned by another user is left alone, with a warning."""
    if mode & 0o077:
        try:
            os.chmod(path, want)
        except OSError as e:
            log.warning("store: cannot make %s private (%s); other users may read it", path, e.strerror)
