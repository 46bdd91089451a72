"""Atomic writes and their temporaries, for every writer of the project: preprocessing outputs,
checkpoints, JSON results, predictions and plots.

A file is written under a hidden temporary name beside its final one
(`.<stem>.partial<pid><ext>`, the extension kept so that writers choose the format by it), then
renamed over the final name. A killed run thus never leaves a file under the final name that
a rerun would take for finished; it may leave a temporary, which `remove_stale_partials`
deletes once its writer is gone, while another live run's temporaries are left alone.

Output folders are checked before any lock or work (`prepare_output_folder`), names taken from
a flag stay inside their folder (`name_inside`), and no file that a tool did not write is
written over unless told to (`refuse_overwrite`)."""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from collections.abc import Callable

TWO_FILE_ENDINGS = (".mhd", ".nhdr")  # a header naming a data file beside it (.raw, .zraw, ...)
PARTIAL = re.compile(r"^\..*\.partial(\d+)(\.nii\.gz|\.[^.]*)?$")


def split_ending(name: str) -> tuple[str, str]:
    """(stem, ending) of a file name, `.nii.gz` counted as one ending: the project's one rule."""
    ending = ".nii.gz" if name.endswith(".nii.gz") else os.path.splitext(name)[1]
    return name[: len(name) - len(ending)], ending


def partial_name(path: str) -> str:
    """The temporary name beside `path`, hidden and naming the writing process."""
    folder, name = os.path.split(path)
    stem, ext = split_ending(name)
    return os.path.join(folder, f".{stem}.partial{os.getpid()}{ext}")


def previous_name(path: str) -> str:
    """Where `write_atomic(..., keep_previous=True)` keeps the file it replaces."""
    root, ext = os.path.splitext(path)
    return f"{root}.prev{ext}"


def prepare_output_folder(folder: str, flag: str) -> str:
    """Create `folder` where needed and check that a file can be written in it (a probe file is
    created and removed: permission bits alone say nothing to root or on a read-only mount).
    Refuses, naming `flag`, a path that is a file or a folder that cannot be written; nothing is
    written then."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise NotADirectoryError(f"{flag} {folder!r} is a file, not a folder: give a folder (a new one is created)")
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise PermissionError(
            f"{flag} {folder!r} cannot be written ({err.strerror or err}); nothing was written: give a folder you can write to"
        ) from None
    return folder


def refuse_overwrite(path: str, ours: Callable[[str], bool], what: str, overwrite: bool = False) -> None:
    """Never write over a file that the tool did not write (`ours(path)` tells, from the file's
    content) unless told to: refused naming the file, `what` the tool writes, and --overwrite."""
    if os.path.exists(path) and not overwrite and not ours(path):
        raise FileExistsError(f"{path!r} exists and is not {what}: give another name, or pass --overwrite")


def is_png(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(8) == b"\x89PNG\r\n\x1a\n"
    except OSError:
        return False


def name_inside(folder: str, name: str, flag: str) -> str:
    """`folder`/`name` for a file name taken from a flag, refused where it would leave `folder`
    (a path separator, `..`, an absolute path)."""
    if not name or name in (".", "..") or os.path.basename(name) != name or "/" in name or "\\" in name:
        raise ValueError(f"{flag} {name!r}: expected a plain file name, without folders, so that the file stays in {folder!r}")
    return os.path.join(folder, name)


def write_atomic(path: str, write: Callable[[str], None], keep_previous: bool = False, fsync: bool = False) -> None:
    """Call write(tmp) on the temporary name, then rename it over `path`. A failed write leaves
    the file already at `path` as it was and says so, naming a full disk where that is the
    cause (torch.save reports one only as "unexpected pos"). `fsync` flushes the data to disk
    before the rename, for files a power cut must not lose (checkpoints). With `keep_previous`
    the replaced file is kept as `previous_name(path)`. A format of two files (TWO_FILE_ENDINGS)
    is written into a hidden temporary folder under the final names, then moved out data file
    first and header last, so that no file of the result keeps a temporary name."""
    tmp = partial_name(path)
    if path.endswith(TWO_FILE_ENDINGS):
        os.makedirs(tmp)
        target = os.path.join(tmp, os.path.basename(path))
        try:
            _write_reporting(path, target, write, fsync)
            header = os.path.basename(path)
            for name in sorted(os.listdir(tmp), key=lambda n: n == header):  # the header last
                os.replace(os.path.join(tmp, name), os.path.join(os.path.dirname(os.path.abspath(path)), name))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    try:
        _write_reporting(path, tmp, write, fsync)
        if keep_previous and os.path.exists(path):
            os.replace(path, previous_name(path))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_reporting(path: str, tmp: str, write: Callable[[str], None], fsync: bool) -> None:
    """write(tmp), flushed to disk with `fsync`; a failure is reported for `path`, naming a
    full disk where that is the cause."""
    try:
        write(tmp)
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    except (OSError, RuntimeError) as err:
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
        full = getattr(err, "errno", None) == errno.ENOSPC or free < 64 * 2**20
        raise OSError(
            errno.ENOSPC if full else getattr(err, "errno", None) or errno.EIO,
            f"could not write {path!r}{': the disk is full' if full else ''} ({err}); "
            f"{free / 2**20:.0f} MiB free there. "
            f"{'The file already there is unchanged.' if os.path.exists(path) else 'Nothing was written.'}",
        ) from err


def pid_alive(pid: int) -> bool:
    """Whether a live process with this PID exists on this machine. A zombie (killed, not yet
    reaped, as the workers of a killed run can stay where nothing reaps them) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc (not Linux): trust kill()
    return state not in ("Z", "X")


def remove_stale_partials(folder: str) -> int:
    """Delete the temporaries of writers that are gone (a killed run's) and return how many;
    those of a live process, another run working in the same folder, are left alone."""
    if not os.path.isdir(folder):
        return 0
    removed = 0
    for f in os.listdir(folder):
        m = PARTIAL.match(f)
        if m and not pid_alive(int(m.group(1))):
            try:
                path = os.path.join(folder, f)
                if os.path.isdir(path):  # a two-file format's temporary folder
                    shutil.rmtree(path)
                else:
                    os.remove(path)
                removed += 1
            except FileNotFoundError:  # its owner renamed it meanwhile
                pass
    return removed
