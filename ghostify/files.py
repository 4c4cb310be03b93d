"""Output files written safely: checked before any work, written to a temp file in the same folder and renamed
into place, so a failure, a full disk or Ctrl-C never leaves a partial file or replaces something that is not
a regular file.
"""

from __future__ import annotations

import os
import secrets
import shutil


def _new_file(folder: str, prefix: str) -> str:
    """Create an empty, uniquely named file with the usual permissions (``0o666`` less the umask, applied by the
    system: unlike ``mkstemp``'s private files, and without changing the process-wide umask to read it)."""
    while True:
        temp = os.path.join(folder, f"{prefix}{secrets.token_hex(6)}.tmp")
        try:
            os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return temp
        except FileExistsError:
            continue


def check_output(path: str, overwrite: bool = True) -> str:
    """Check, before any work, that ``path`` can be written: a regular file (or nothing) in a writable folder.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        FileNotFoundError: its folder does not exist.
        PermissionError: its folder is not writable.
        ValueError: ``path`` is a folder, a device or anything else that is not a regular file (an atomic
            rename would replace it).
    """
    path = os.fspath(path)
    if os.path.lexists(path) and not os.path.isfile(path):
        raise ValueError(f"{path} is not a regular file; refusing to replace it (write to a file path)")
    if not overwrite and os.path.exists(path):
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"folder does not exist: {folder}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write to folder {folder}: permission denied (read-only?)")
    return path


def atomic_write(path: str, write, overwrite: bool = True) -> None:
    """Call ``write(temp_path)`` and rename the result onto ``path``; nothing is left behind on failure.

    Raises:
        OSError: the write failed (a full disk, a read-only file system), with a message that says so; and
            the errors of ``check_output``.
    """
    path = check_output(path, overwrite)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        temp = _new_file(folder, f".{os.path.basename(path)}.")
    except OSError as error:
        raise OSError(f"cannot write {path}: {error.strerror or error}") from None
    try:
        write(temp)
        os.replace(temp, path)
    except OSError as error:
        _remove(temp)
        raise OSError(f"cannot write {path}: {error.strerror or error}") from None
    except RuntimeError as error:  # torch.save's zip writer reports a short write (a full disk) this way
        _remove(temp)
        if "unexpected pos" not in str(error) and "PytorchStreamWriter" not in str(error):
            raise
        free = shutil.disk_usage(folder).free // 2**20
        raise OSError(f"cannot write {path}: the write failed with {free} MiB free on its disk (full?)") from None
    except BaseException:
        _remove(temp)
        raise


def _remove(path: str) -> None:
    if os.path.exists(path):
        os.unlink(path)
