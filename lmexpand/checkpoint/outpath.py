"""Output-path safety: where an output may go, and how it gets there whole.

* :func:`check_output` is the one check of an output location before any work (every
  command calls it): never an input, inside one or holding one; never over a file or a
  non-empty directory without ``--force``; only where this user can write.
* An output is written to :func:`partial_path` (hidden, beside the target, named for this
  process) and :func:`move_into_place` renames it over the target atomically.
* :func:`clean_stale_partials` removes what killed runs left (their process is gone:
  :func:`left_by_dead_process`) and puts back an old output a killed run had moved aside.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path
from typing import Iterable

from lmexpand.checkpoint.zerocopy import fsync_dir
from lmexpand.errors import TargetError
from lmexpand.faults import kill_point

log = logging.getLogger("lmexpand")

_PARTIAL = ".lmexpand-partial-"
_OLD = ".lmexpand-old-"


def _within(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
        return True
    except ValueError:
        return False


def existing_ancestor(path: Path) -> Path:
    """The nearest ancestor of ``path`` (itself included) that exists."""
    p = path
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    return p


def check_output(target: Path, *, inputs: Iterable[tuple[str, Path]] = (), force: bool = False,
                 label: str = "output", replaces: bool = True, where: str = "") -> Path:
    """The one check of an output location, before any work (every command calls it).

    Refuses, naming the path and the fix: an output that is, contains or lies inside any
    input (symlinks resolved: ``--out`` equal to the model being trained, or a parent of it,
    would delete it under ``--force``); a file where the output directory goes; a parent
    that is a file; a location whose nearest existing parent is not writable; and,
    when the output ``replaces`` what is there, a non-empty one without ``force``. Creates
    nothing. Returns the resolved target. ``inputs`` are (what, path) pairs, e.g.
    ("--model", model_dir), ("--data", file). ``where`` prefixes the message (a recipe's path).
    """
    pre = f"{where}: " if where else ""
    resolved = Path(os.path.abspath(target)).resolve()
    for what, src in inputs:
        src_resolved = Path(src).resolve()
        if resolved == src_resolved:
            raise TargetError(f"{pre}{label} {target} is the {what} {src} this command reads: it would be "
                              f"{'replaced' if replaces else 'written into'}. Choose another {label}.")
        if _within(src_resolved, resolved) and replaces:
            raise TargetError(f"{pre}{label} {target}: the {what} {src} this command reads is inside the output "
                              f"directory, which would be replaced. Choose a {label} that does not hold its inputs.")
        if _within(resolved, src_resolved):
            raise TargetError(f"{pre}{label} {target} is inside the {what} {src} this command reads: writing there "
                              f"changes an input. Choose a {label} outside it.")
    anc = existing_ancestor(resolved)
    if anc != resolved and not anc.is_dir():
        raise TargetError(f"{pre}{label} {target}: its parent {anc} is a file, not a directory. Choose another {label}.")
    place = anc if anc != resolved else resolved.parent  # where the output would be created
    if not os.access(place, os.W_OK | os.X_OK):
        raise TargetError(f"{pre}{label} {target}: {place} is not writable by this user. Choose a {label} where you can "
                          "write, or fix the permissions.")
    if resolved.exists():
        if not resolved.is_dir():
            raise TargetError(f"{pre}{label} {target}: exists and is a file. Remove it or choose another {label}.")
        if replaces and any(resolved.iterdir()) and not force:
            raise TargetError(
                f"{pre}{label} {target}: exists and is not empty. Pass --force to replace it, or choose another {label}."
            )
    return resolved


def check_target(target: Path, *, force: bool, sources: Iterable[Path] = ()) -> Path:
    """A model directory written by the writer: :func:`check_output` with the sources as inputs."""
    return check_output(target, inputs=[("source", Path(s)) for s in sources], force=force, label="output")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def left_by_dead_process(p: Path) -> bool:
    """A temporary path named ``...-PID`` whose writing process is gone (not this one)."""
    pid_text = p.name.rsplit("-", 1)[-1]
    return pid_text.isdigit() and int(pid_text) != os.getpid() and not _pid_alive(int(pid_text))


def partial_path(target: Path) -> Path:
    """Where this process writes ``target`` before renaming it into place (a file or a
    directory): hidden, beside it, named for this process."""
    return target.parent / f".{target.name}{_PARTIAL}{os.getpid()}"


def clean_stale_partials(target: Path) -> None:
    """Remove what killed earlier runs left beside ``target``: every hidden partial output
    (``.NAME.lmexpand-partial-PID``, a file or a directory) or old output moved aside
    (``.NAME.lmexpand-old-PID``) in its directory whose process is gone, whatever output it
    was for; an old output whose target is missing is put back first. Every command that
    writes calls this before writing."""
    parent = target.parent
    if not parent.is_dir():
        return
    for p in parent.glob(f".*{_OLD}*"):
        # a run killed between moving the old output aside and moving the new one in
        original = parent / p.name[1:].rsplit(_OLD, 1)[0]
        if left_by_dead_process(p) and not os.path.lexists(original):
            log.warning("restoring %s from %s (an interrupted run had moved it aside)", original, p.name)
            os.rename(p, original)
    for marker in (_PARTIAL, _OLD):
        for p in parent.glob(f".*{marker}*"):
            if left_by_dead_process(p):
                log.info("removing %s left by an interrupted run", p)
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (Linux ``renameat2(RENAME_EXCHANGE)``); False where
    the system cannot."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    if fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def move_into_place(tmp: Path, target: Path) -> None:
    """Rename the finished ``tmp`` to ``target``. An existing target is swapped out
    atomically where the system allows, so at every instant ``target`` is either the old
    complete output or the new one; elsewhere it is renamed aside first, and a killed run's
    aside copy is put back by the next run (:func:`clean_stale_partials`)."""
    if not target.exists():
        try:
            os.rename(tmp, target)
            fsync_dir(target.parent)
            return
        except OSError as e:  # another writer put a target there in the meantime: replace it
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
    if _exchange(tmp, target):
        fsync_dir(target.parent)
        kill_point("write:after-swap")
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old output
        return
    old = target.parent / f".{target.name}{_OLD}{os.getpid()}"
    os.rename(target, old)
    kill_point("write:between-renames")
    os.rename(tmp, target)
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)
