"""The files one run writes, as a set: all of them or none.

Each file is written to a temporary file in its own folder, and the set is renamed into place only when
every file is ready; if anything fails before that, the temporary files are removed and existing files are
untouched. A new file gets the permissions ``open()`` would give it (``0o666`` less the umask, as with
``torch.save``); a file replaced with ``--force`` keeps its own.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path
from types import TracebackType

__all__ = ["OutputSet"]


class OutputSet:
    """Stage files with :meth:`stage` (and removals with :meth:`remove`), then :meth:`commit` them together.

    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> with OutputSet() as outputs:
    ...     outputs.stage(folder / "a.txt").write_text("a")
    ...     outputs.commit()
    1
    >>> sorted(p.name for p in folder.iterdir())
    ['a.txt']
    """

    def __init__(self) -> None:
        self._staged: list[tuple[Path, Path]] = []  # (temporary file, target)
        self._modes: dict[Path, int] = {}  # the permissions open() gave each temporary file
        self._removals: list[Path] = []
        self.committed: list[Path] = []

    def stage(self, target: Path) -> Path:
        """A new empty temporary file next to ``target``, to be renamed to ``target`` on commit."""
        while True:
            tmp = target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp"
            try:
                # created by open(), so the umask applies as it does to torch.save's files
                os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
                break
            except FileExistsError:
                continue
        # some writers replace the file (safetensors makes it private): its mode is set again on commit
        self._modes[tmp] = stat.S_IMODE(tmp.stat().st_mode)
        self._staged.append((tmp, target))
        return tmp

    def remove(self, target: Path) -> None:
        """Remove ``target`` on commit (a stale file that belongs with the ones written)."""
        self._removals.append(target)

    def discard(self) -> None:
        """Remove every temporary file; nothing is written."""
        for tmp, _ in self._staged:
            tmp.unlink(missing_ok=True)
        self._staged.clear()
        self._removals.clear()
        self._modes.clear()

    def commit(self) -> None:
        """Rename every staged file into place; if one rename fails, put back what was there before."""
        backups: list[tuple[Path, Path | None]] = []  # (target, its previous content moved aside, or None)
        try:
            for target in self._removals:
                if target.exists():
                    removed = self._aside(target)
                    os.replace(target, removed)
                    backups.append((target, removed))
            for tmp, target in self._staged:
                aside: Path | None = None
                os.chmod(tmp, self._modes[tmp])
                if target.exists():
                    os.chmod(tmp, stat.S_IMODE(target.stat().st_mode))
                    aside = self._aside(target)
                    os.replace(target, aside)
                backups.append((target, aside))
                os.replace(tmp, target)
        except BaseException:
            for target, previous in reversed(backups):
                if any(target == t for _, t in self._staged):
                    target.unlink(missing_ok=True)
                if previous is not None:
                    os.replace(previous, target)
            self.discard()
            raise
        for _, old in backups:
            if old is not None:
                old.unlink(missing_ok=True)
        self.committed = [target for _, target in self._staged]
        self._staged.clear()
        self._removals.clear()

    @staticmethod
    def _aside(target: Path) -> Path:
        return target.parent / f".{target.name}.{secrets.token_hex(4)}.old"

    def __enter__(self) -> OutputSet:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.discard()  # after a commit there is nothing left to discard
