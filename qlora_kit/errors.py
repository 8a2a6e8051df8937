"""Failures the user causes, and the one place that tells them from programming errors.

Every entry point runs its command through :func:`run_command`. A failure the user can
cause becomes one line, ``qlora-kit: error: ...``, and exit status 2:

- any :class:`UserInputError` (bad recipe, data, model, adapter or output directory;
  readers wrap the parse errors of the files they read into one);
- an ``OSError`` on a path outside the installed program (missing, unreadable, a folder
  where a file should be, read-only);
- a full disk (errno ENOSPC/EDQUOT, or the words of a writer that drops the errno);
- running out of GPU memory (``torch.OutOfMemoryError``) or host memory (``MemoryError``).

Ctrl-C prints one line and exits with 130. Everything else is a bug and keeps its traceback.
:func:`explain_resources` adds what a command knows to the out-of-memory and disk-full
messages: the sizes, the settings that would help, what was kept.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import re
import shutil
import sys
import sysconfig
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

PROG = "qlora-kit"
USER_ERROR_STATUS = 2
INTERRUPTED_STATUS = 130  # 128 + SIGINT, as shells report it

_PATH_ERRNOS = {
    errno.ENOENT,
    errno.EACCES,
    errno.EPERM,
    errno.EISDIR,
    errno.ENOTDIR,
    errno.EROFS,
    errno.ENAMETOOLONG,
    errno.ELOOP,
    errno.EEXIST,
    errno.ENOTEMPTY,
}
_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
# safetensors' Rust writer reports the OS error in its text only ("... (os error 28)").
_DISK_FULL_WORDS = ("No space left on device", "Disk quota exceeded")
# After a failed write, a disk with less than this left counts as full: torch.save's zip
# writer reports a full disk as a bare "unexpected pos ..." without the OS error.
NEARLY_FULL_BYTES = 64 * 2**20


class UserInputError(ValueError):
    """A recipe, file, model or directory that cannot be used; the message names it and says why."""


class MissingFileError(UserInputError, FileNotFoundError):
    """A file or folder the user named does not exist; the message says where it was looked for."""


class ResourceError(UserInputError):
    """The run ran out of GPU memory or disk space; the message says how much and what to change."""


def run_command(command: Callable[[], object]) -> int:
    """Run an entry point's command: 0 when it succeeds, 2 (one line on stderr) when the user caused the failure.

    Programming errors propagate with their traceback.
    """
    try:
        command()
    except KeyboardInterrupt:
        _close_progress_bars()
        print(f"{PROG}: interrupted", file=sys.stderr)
        return INTERRUPTED_STATUS
    except Exception as e:
        message = user_error_message(e)
        if message is None:
            raise
        _close_progress_bars()
        # One line, however the message is laid out (a library's reason can span several).
        print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr)
        return USER_ERROR_STATUS
    return 0


def _close_progress_bars() -> None:
    """End the line an interrupted progress bar left open, so that the error line starts on its own."""
    tqdm = sys.modules.get("tqdm.std")
    # The bars still open (tqdm's registry; if a tqdm release drops it, the line just follows the bar).
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()


def user_error_message(exc: BaseException) -> str | None:
    """The message for a failure the user caused; None for a programming error (the line between the two)."""
    if isinstance(exc, UserInputError):
        return str(exc)
    if is_out_of_memory(exc):
        return out_of_memory_message(exc)
    if isinstance(exc, MemoryError):
        return "out of host memory (RAM): the model or data needs more than this machine has free"
    if is_disk_full(exc):
        return disk_full_message(exc)
    if isinstance(exc, OSError) and exc.errno in _PATH_ERRNOS and exc.filename is not None:
        paths = [str(p) for p in (exc.filename, exc.filename2) if p is not None]
        if not any(_is_program_path(p) for p in paths):
            return f"{' -> '.join(paths)}: {exc.strerror}"
    return None


@contextmanager
def explain_resources(
    doing: str,
    levers: Callable[[], Sequence[str]] = tuple,
    kept: Callable[[], str] = str,
) -> Iterator[None]:
    """Turn running out of GPU memory or disk space inside the block into a :class:`ResourceError`.

    ``doing`` says what was running ("training"); ``levers()`` the settings that need less
    GPU memory; ``kept()`` what is still there and how to continue. Both are called only
    on failure.
    """
    try:
        yield
    except Exception as e:
        if is_out_of_memory(e):
            raise ResourceError(out_of_memory_message(e, doing, levers(), kept())) from e
        if is_disk_full(e):
            raise ResourceError(disk_full_message(e, doing, kept())) from e
        raise


@contextmanager
def saving_to(directory: str | Path) -> Iterator[None]:
    """Report a failed write into ``directory`` as an ENOSPC OSError naming it, when the disk is full.

    Full is what the error says, or, for writers that drop the OS error (torch.save), a disk
    with less than NEARLY_FULL_BYTES left after the failure.
    """
    try:
        yield
    except Exception as e:
        if is_disk_full(e):
            if any(isinstance(c, OSError) and c.filename for c in _chain(e)):
                raise
        elif not isinstance(e, (OSError, RuntimeError)) or (_free_bytes(Path(directory)) or 0) >= NEARLY_FULL_BYTES:
            raise
        raise OSError(errno.ENOSPC, "No space left on device", str(directory)) from e


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is the GPU running out of memory (torch's error, or a CUDA library's)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "CUDA error: out of memory" in str(exc)


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` or an exception it was raised from says the disk (or the quota) is full."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in _DISK_FULL_ERRNOS:
            return True
        if any(words in str(e) for words in _DISK_FULL_WORDS):
            return True
    return False


def out_of_memory_message(exc: BaseException, doing: str = "", levers: Sequence[str] = (), kept: str = "") -> str:
    """What ran out (sizes from torch's message and the CUDA memory statistics), what would help, what was kept."""
    text = str(exc)
    facts = []
    if m := re.search(r"Tried to allocate ([\d.]+ [KMGT]?i?B)", text):
        facts.append(f"tried to allocate {m[1]}")
    if m := re.search(
        r"GPU (\d+) has a total capacity of ([\d.]+ [KMGT]?i?B) of which ([\d.]+ [KMGT]?i?B) is free", text
    ):
        facts.append(f"GPU {m[1]} has {m[2]}, of which {m[3]} was free")
    facts += _cuda_memory_facts()
    message = f"out of GPU memory{f' while {doing}' if doing else ''}"
    if facts:
        message += f" ({'; '.join(facts)})"
    if levers:
        message += ". To need less, change: " + "; ".join(levers)
    else:
        message += ". Use a smaller batch or shorter sequences"
    return message + (f". {kept}" if kept else "")


def disk_full_message(exc: BaseException, doing: str = "", kept: str = "") -> str:
    """Which file could not be written, how much space is left, what was kept."""
    filename = next((e.filename for e in _chain(exc) if isinstance(e, OSError) and e.filename), None)
    message = f"no space left on the disk{f' while {doing}' if doing else ''}"
    if filename is not None:
        free = _free_bytes(Path(filename))
        message += f", writing {filename}" + (f" ({_size(free)} free there)" if free is not None else "")
    message += ": free some space or write to another disk"
    return message + (f". {kept}" if kept else "")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _cuda_memory_facts() -> list[str]:
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return []
    peak = torch.cuda.max_memory_allocated()
    return [f"this process's tensors peaked at {_size(peak)}"] if peak else []


def _free_bytes(path: Path) -> int | None:
    """Free bytes on the disk holding ``path`` (or its nearest existing parent)."""
    for p in (path, *path.parents):
        if p.exists():
            try:
                return shutil.disk_usage(p).free
            except OSError:
                return None
    return None


def _size(n: float) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    i = 0
    while n >= 1024 and i < len(units) - 1:
        n, i = n / 1024, i + 1
    return f"{n:.0f} B" if i == 0 else f"{n:.1f} {units[i]}"


def _program_dirs() -> list[str]:
    """The installed program: our package (kernels included), the standard library and site-packages."""
    dirs = [os.path.dirname(os.path.abspath(__file__))]
    dirs += [sysconfig.get_path(name) for name in ("stdlib", "platstdlib", "purelib", "platlib")]
    spec = importlib.util.find_spec("qlora_kit.kernels")
    if spec is not None and spec.submodule_search_locations:
        dirs += list(spec.submodule_search_locations)
    return [os.path.join(os.path.abspath(d), "") for d in dirs]


def _is_program_path(path: str) -> bool:
    """A file of the program itself: its errors are bugs or a broken install, not the user's input."""
    full = os.path.abspath(path)
    return any(full.startswith(d) for d in _program_dirs())
