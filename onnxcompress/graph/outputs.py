"""Where a command writes: every output checked before any work, written under temporary names in
its own folder, and renamed into place together at the end.

An :class:`OutputPlan` knows every path a command will write and every path it reads. Before
any work it refuses (OutputError, one sentence) a write whose folder is missing, is not a
folder or cannot be written, a write that is a folder, and any write that is, after resolving
links, one of the inputs or another output. Writers then get a temporary file beside each output
(:meth:`OutputPlan.temp`, created like ``open(path, "w")`` would: mode 0666 less the umask), and
:meth:`OutputPlan.commit` renames them all into place. Leaving the ``with`` block without a commit
(an error, a failed gate, KeyboardInterrupt) deletes every temporary file: nothing is left behind.
"""
from __future__ import annotations

import dataclasses
import errno
import logging
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

from onnxcompress.errors import OutputError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Role:
    """A path and what it is for the user ("the output model", "--data"), for messages."""

    what: str
    path: Path
    folder_reads: tuple[str, ...] = ()  # when `path` is a folder: the suffixes of the files in it that are read


def _temp_name(final: Path) -> Path:
    return final.with_name(f".{final.name[:200]}.{secrets.token_hex(4)}.tmp")


def _create_temp(final: Path) -> Path:
    """An empty new file beside `final`, never an existing one, mode 0666 & ~umask like open(..., "w")."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(64):
        tmp = _temp_name(final)
        try:
            os.close(os.open(tmp, flags, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise OutputError(f"cannot create a temporary file beside '{final}'")


def _same(a: Path, b: Path) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


class OutputPlan:
    """The outputs of one command, checked against each other and against its inputs up front."""

    def __init__(self, writes: Iterable[Role], reads: Iterable[Role] = ()):
        self.writes = [w for w in writes if w.path is not None]
        self.reads = [r for r in reads if r.path is not None]
        self._staged: dict[Path, Path] = {}  # final -> temporary
        self._committed = False

    def check(self) -> OutputPlan:
        """Refuse, before any work, every output that cannot or must not be written."""
        for i, w in enumerate(self.writes):
            _check_writable(w)
            for r in self.reads:
                if _same(w.path, r.path):
                    raise OutputError(f"{w.what} '{w.path}' is {r.what} '{r.path}'; choose another path "
                                      "(inputs are never overwritten)")
                if r.folder_reads and r.path.is_dir() and _same(w.path.parent, r.path) \
                        and w.path.suffix.lower() in r.folder_reads:
                    raise OutputError(f"{w.what} '{w.path}' would be one of the files of {r.what} '{r.path}'; "
                                      "choose another folder (inputs are never overwritten)")
            for other in self.writes[:i]:
                if _same(w.path, other.path):
                    raise OutputError(f"{w.what} '{w.path}' and {other.what} '{other.path}' are the same file; "
                                      "give them different paths")
        return self

    def temp(self, final: str | os.PathLike) -> Path:
        """A new empty temporary file that becomes `final` at :meth:`commit`."""
        final = Path(final)
        if not any(_same(final, w.path) or final == w.path for w in self.writes):
            raise ValueError(f"'{final}' is not one of the planned outputs")  # our bug, not the user's
        if final in self._staged:
            return self._staged[final]
        try:
            tmp = _create_temp(final)
        except OSError as e:
            raise OutputError(f"cannot write '{final}': {e.strerror or e}") from e
        self._staged[final] = tmp
        return tmp

    def drop(self, final: str | os.PathLike) -> None:
        """Do not write `final` after all (its temporary file is deleted)."""
        tmp = self._staged.pop(Path(final), None)
        if tmp is not None:
            tmp.unlink(missing_ok=True)

    def staged(self, final: str | os.PathLike) -> Path | None:
        """The temporary file that becomes `final` at :meth:`commit`, if one was written."""
        return self._staged.get(Path(final))

    def staged_bytes(self, *finals: str | os.PathLike) -> int:
        """Bytes written so far for these outputs (those staged)."""
        return sum(self._staged[Path(f)].stat().st_size for f in finals if Path(f) in self._staged)

    def commit(self) -> None:
        """Rename every temporary file into place. When a rename fails, the ones already made are
        undone (a file they replaced comes back, a new one goes) and every temporary is removed."""
        done: list[tuple[Path, Path | None]] = []  # (output, hard link to the file it replaced)
        for final, tmp in list(self._staged.items()):
            backup = None
            try:
                backup = _keep_old(final)
                os.replace(tmp, final)
            except BaseException as e:  # Ctrl-C between two renames too: never half of the outputs
                if backup is not None:
                    backup.unlink(missing_ok=True)
                for old_final, old_backup in reversed(done):
                    _undo(old_final, old_backup)
                self.discard()
                if isinstance(e, OSError):
                    raise OutputError(f"cannot write '{final}': {e.strerror or e}") from e
                raise
            del self._staged[final]
            done.append((final, backup))
        self._committed = True
        for _, backup in done:
            if backup is not None:
                backup.unlink(missing_ok=True)

    def discard(self) -> None:
        for tmp in self._staged.values():
            try:
                tmp.unlink(missing_ok=True)
            except OSError as e:  # never hide the error that brought us here
                log.warning("could not remove temporary file %s: %s", tmp, e)
        self._staged.clear()

    def __enter__(self) -> OutputPlan:
        return self

    def __exit__(self, *exc) -> None:
        self.discard()


def _keep_old(final: Path) -> Path | None:
    """A second name (hard link) for the file `final` replaces, to put it back if the commit fails."""
    if not final.is_file() or final.is_symlink():
        return None
    backup = _temp_name(final)
    try:
        os.link(final, backup)
        return backup
    except OSError:  # no hard links here: a failed commit cannot bring the old file back
        return None


def _undo(final: Path, backup: Path | None) -> None:
    """Put back the file `final` replaced (or remove `final` when it replaced none)."""
    try:
        if backup is not None:
            os.replace(backup, final)
        else:
            final.unlink(missing_ok=True)
    except OSError as e:
        log.warning("could not undo the write of %s: %s", final, e)


def _check_writable(w: Role) -> None:
    try:
        _check_folder_and_file(w)
        probe = _create_temp(w.path)  # the only sure test: create (and remove) a file there, as the write will
        probe.unlink()
    except OSError as e:
        reason = "file name too long" if e.errno == errno.ENAMETOOLONG else (e.strerror or str(e))
        raise OutputError(f"cannot write {w.what} '{w.path}': {reason}") from e


def _check_folder_and_file(w: Role) -> None:
    path, folder = w.path, w.path.parent
    if not folder.exists():
        raise OutputError(f"cannot write {w.what} '{path}': folder '{folder}' does not exist")
    if not folder.is_dir():
        raise OutputError(f"cannot write {w.what} '{path}': '{folder}' is not a folder")
    if path.is_dir():
        raise OutputError(f"cannot write {w.what} '{path}': it is a folder")
    if path.exists() and not path.is_file():
        raise OutputError(f"cannot write {w.what} '{path}': it exists and is not a regular file")
