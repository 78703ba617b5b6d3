"""Publish an output folder whole or not at all, even when the process is killed mid-write.

    with atomic_dir(Path("out/model")) as tmp:    # tmp: a fresh sibling `.model.evomerge-tmp-<pid>-XXXX`
        write_everything_into(tmp)
    # out/model is now the new folder; before, it was the previous one (or absent)

The folder is built in a temp sibling and swapped in with one `renameat2(RENAME_EXCHANGE)` on Linux
(elsewhere: move the old folder aside, rename, delete), so a reader sees the previous complete result or
the new one. A killed run leaves its temp sibling behind; the next run on the same target deletes the
siblings whose process is gone (and puts back a previous result a kill left aside), so leftovers never
break it. Write failures (disk full, read-only, a parent that is a file) become one-line EvomergeErrors.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from evomerge.errors import EvomergeError

TMP_TAG = "evomerge-tmp"
OLD_TAG = "evomerge-old"
_SIBLING = re.compile(rf"^\.(?P<name>.+)\.(?P<tag>{TMP_TAG}|{OLD_TAG})-(?P<pid>\d+)-")
_HINTS = {
    errno.ENOSPC: "free disk space or choose another output folder",
    errno.EDQUOT: "free disk space or choose another output folder",
    errno.EFBIG: "free disk space or choose another output folder",
    errno.EACCES: "choose a writable output folder",
    errno.EPERM: "choose a writable output folder",
    errno.EROFS: "choose a writable output folder",
    errno.ENOTDIR: "a parent of the output path is a file; choose another output folder",
    errno.EEXIST: "a parent of the output path is a file; choose another output folder",
}
MARKER = "recipe.yaml"  # with `evomerge.outputs`: an earlier evomerge output, safe to replace


def output_error(target: Path, exc: OSError) -> EvomergeError:
    """One line naming the output, the OS reason and the fix (temp paths are ours, not the user's: omitted)."""
    name = str(exc.filename or "")
    where = f" at {name}" if name and name != str(target) and f".{TMP_TAG}-" not in name else ""
    hint = _HINTS.get(exc.errno or 0, "choose another output folder")
    return EvomergeError(f"{target}: cannot write the output ({exc.strerror or exc}{where}); {hint}")


def check_replaceable(target: Path, ours: Callable[[Path], bool] | None = None, what: str = "") -> None:
    """Refuse to replace anything but a missing folder, an empty one, or an earlier output of ours: by default an
    evomerge export (`is_evomerge_output`); `ours` and `what` (its description, for the message) say otherwise."""
    ancestor = target.parent
    while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise EvomergeError(f"{target}: its parent {ancestor} is a file, not a folder; choose another output folder")
    if not os.path.lexists(target):
        return
    if target.is_symlink() or not target.is_dir():
        raise EvomergeError(f"{target}: exists and is not a folder; choose a new or empty output folder")
    if not any(target.iterdir()) or (ours or is_evomerge_output)(target):
        return
    what = what or f"an evomerge output (no {MARKER} recording its files)"
    raise EvomergeError(f"{target}: exists and is not {what}; choose a new or empty output folder")


def is_evomerge_output(folder: Path) -> bool:
    """A folder export wrote: its recipe.yaml records the files next to it (a user's own recipe does not)."""
    import yaml

    try:
        data = yaml.safe_load((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return False
    block = data.get("evomerge") if isinstance(data, dict) else None
    return isinstance(block, dict) and bool(block.get("outputs"))


@contextmanager
def atomic_dir(target: Path | str, ours: Callable[[Path], bool] | None = None, what: str = "") -> Iterator[Path]:
    """Yield an empty temp folder next to `target`; on success it becomes `target` in one step.
    `ours`, `what`: which existing folders it may replace (`check_replaceable`)."""
    target = Path(os.path.abspath(target))
    check_replaceable(target, ours, what)
    clean_stale(target)
    created: list[Path] = []
    tmp: Path | None = None
    try:
        created = _make_parents(target.parent)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{TMP_TAG}-{os.getpid()}-", dir=target.parent))
        yield tmp
        _open_permissions(tmp)
        _publish(tmp, target)
    except OSError as exc:
        raise output_error(target, exc) from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)  # after a swap, tmp holds the previous result
        if not target.exists():
            for folder in reversed(created):
                _rmdir_quietly(folder)


def clean_stale(target: Path) -> list[Path]:
    """Delete temp siblings of `target` left by runs that are no longer alive; returns what was removed."""
    removed = []
    try:
        siblings = list(target.parent.iterdir())
    except OSError:
        return removed
    for path in siblings:
        match = _SIBLING.match(path.name)
        if not match or match["name"] != target.name or pid_alive(int(match["pid"])):
            continue
        aside = path / target.name
        if match["tag"] == OLD_TAG and not os.path.lexists(target) and aside.is_dir():
            os.replace(aside, target)  # killed between the two renames: the previous result comes back
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def process_start(pid: int) -> str | None:
    """The process's start time (Linux `/proc`), to tell a live process from a later one that reuses its pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def pid_alive(pid: int, start: str | None = None) -> bool:
    """Whether process `pid` on this host still runs (the one that left a temp folder or holds a study);
    with `start` (its `process_start` back then), the same process rather than a reused pid."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        pass
    return start is None or process_start(pid) in (None, start)


def _make_parents(folder: Path) -> list[Path]:
    """mkdir -p, returning the folders it created (removed again if the write fails)."""
    missing = []
    while not os.path.lexists(folder):
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        path.mkdir()
    return list(reversed(missing))


def _rmdir_quietly(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def _open_permissions(folder: Path) -> None:
    """mkdtemp/mkstemp (ours, and safetensors' own writer) create owner-only entries; give everything inside the
    modes `save_pretrained` leaves under the user's umask (folders 0755, files 0644 with umask 022), at every
    depth, so another user, a container or a serving process can read the output."""
    mask = os.umask(0)
    os.umask(mask)
    folder.chmod(0o777 & ~mask)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


def _publish(new: Path, target: Path) -> None:
    """`new` becomes `target`; a previous target ends up at `new` (exchange) or is deleted (fallback)."""
    if not os.path.lexists(target):
        os.replace(new, target)
        return
    if _exchange(new, target):
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.{OLD_TAG}-{os.getpid()}-", dir=target.parent))
    os.replace(target, old / target.name)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old / target.name, target)
        raise
    finally:
        if not os.path.lexists(old / target.name) or os.path.lexists(target):
            shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def write_file_atomic(path: Path | str, data: str | bytes) -> Path:
    """Write one file whole or not at all (temp file beside it, then rename); readable by all (0644)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def savefig_atomic(fig, path: Path | str, **kwargs) -> Path:
    """A matplotlib figure as a PNG, written atomically."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", **kwargs)
    return write_file_atomic(path, buf.getvalue())
