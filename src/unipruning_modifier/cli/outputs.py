"""One writer per output: the claim a run holds on ``--output`` / ``--save-saliency``.

A claim is an exclusive ``flock`` on ``.NAME.lock`` beside the output, taken before any work and
held until the run ends; a second run on the same path fails at once, naming the holder's PID
(the kernel drops the lock when its holder dies, even by ``kill -9``). Under the lock, leftovers
of dead runs beside the output are swept: staging folders and temporary files
(``.NAME.partial-PID-...``, checkpoint/files.py) whose PID no longer runs are removed, and an
old output that a killed run had moved aside is put back. The new output is written into a
staging folder (or temporary file) beside it and published with one atomic exchange, so a
reader sees the old output or the whole new one, never a mix or nothing.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import shutil
from contextlib import ExitStack, contextmanager
from pathlib import Path

from .common import UsageError, log

__all__ = ["OutputClaim", "check_free_space", "check_output", "claim_outputs", "output_path"]

_REPLACED = "-replaced"  # suffix of an old output moved aside by the two-rename fallback
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


class OutputClaim:
    """The exclusive right of this run to write ``path`` (see the module docstring)."""

    def __init__(self, path: Path, flag: str):
        self.path, self.flag = path, flag
        self.lock = path.parent / f".{path.name}.lock"
        self._fd: int | None = None
        self._partials: list[Path] = []

    def __enter__(self) -> "OutputClaim":
        while self._fd is None:
            try:
                fd = os.open(self.lock, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as error:
                raise UsageError(f"{self.flag} {self.path}: cannot write in {self.path.parent} ({error.strerror})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise UsageError(
                    f"{self.flag} {self.path} is being written by another unipruning run (pid {holder}); "
                    f"wait for it to end or choose another {self.flag}"
                ) from None
            try:
                current = os.stat(self.lock).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:  # else its holder removed it while we opened it: take the new one
                self._fd = fd
            else:
                os.close(fd)
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)
        self._sweep()
        return self

    def __exit__(self, *exc) -> None:
        for partial in self._partials:
            _remove(partial)
        self.lock.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None

    def _sweep(self) -> None:
        """Remove what dead runs left beside the output; put back an old output one moved aside."""
        from ..checkpoint.files import partial_owner

        for entry in sorted(self.path.parent.iterdir()):
            pid = partial_owner(entry.name, self.path.name)
            if pid is None or _alive(pid):
                continue
            if entry.name.endswith(_REPLACED) and not os.path.lexists(self.path):
                entry.rename(self.path)
                log(f"restored {self.path}, which run {pid} had moved aside before it was killed")
            else:
                _remove(entry)
                log(f"removed {entry.name}, left in {self.path.parent} by run {pid}, which no longer runs")

    def partial(self, suffix: str = "") -> Path:
        """A fresh staging path beside the output, removed when the claim ends unless published."""
        from ..checkpoint.files import partial_sibling

        path = partial_sibling(self.path, suffix)
        self._partials.append(path)
        return path

    def publish(self, staged: Path) -> None:
        """Move a complete staged output into place; an old output is replaced in the same step."""
        umask = os.umask(0)
        os.umask(umask)
        staged.chmod((0o777 if staged.is_dir() else 0o666) & ~umask)  # staging is private while written
        if not os.path.lexists(self.path) or (staged.is_file() and self.path.is_file()):
            os.replace(staged, self.path)
        elif _exchange(staged, self.path):
            _remove(staged)  # now the old output
        else:  # no atomic exchange here (e.g. NFS): a killed run is undone by the next claim's sweep
            from ..checkpoint.files import partial_sibling

            aside = partial_sibling(self.path, _REPLACED)
            self.path.rename(aside)
            try:
                staged.rename(self.path)
            except BaseException:
                aside.rename(self.path)
                raise
            _remove(aside)


def output_path(value: str, flag: str = "--output") -> Path:
    """The absolute path of an output folder, whose parent must exist."""
    path = Path(value).expanduser().resolve()
    if not path.parent.is_dir():
        raise UsageError(f"{flag} {value}: parent folder {path.parent} does not exist")
    return path


def check_output(claim: "OutputClaim", overwrite: bool) -> None:
    """A claimed output may be written: absent, an empty folder, or replaceable with ``--overwrite``."""
    path = claim.path
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise UsageError(f"{claim.flag} {path} exists and is not empty (pass --overwrite to replace it)")


@contextmanager
def claim_outputs(*outputs: tuple[Path | None, str]):
    """Claims on every (path, flag) given (None paths skipped), in order, held together."""
    with ExitStack() as stack:
        yield [stack.enter_context(OutputClaim(path, flag)) if path is not None else None for path, flag in outputs]


def check_free_space(needs: list[tuple[Path, str, int]]) -> None:
    """Refuse to start when a filesystem has less room than the outputs written to it will need
    (``needs``: output path, its flag, estimated bytes)."""
    by_device: dict[int, list[tuple[Path, str, int]]] = {}
    for path, flag, size in needs:
        by_device.setdefault(os.stat(path.parent).st_dev, []).append((path, flag, size))
    for entries in by_device.values():
        total = sum(size for _, _, size in entries)
        free = shutil.disk_usage(entries[0][0].parent).free
        if free < total:
            what = " and ".join(f"{flag} {path} (~{size / 2**20:.0f} MiB)" for path, flag, size in entries)
            raise UsageError(
                f"{what}: {entries[0][0].parent} has {free / 2**20:.0f} MiB free, about {total / 2**20:.0f} MiB are "
                "needed; free some space or write elsewhere"
            )
