"""Atomic writes: a reader never sees a half-written file or a mix of old and new files in a folder.

Every file or folder the project leaves behind for later (configs, checkpoint state, saved models, caches, built
data sets, exports) is written through one of these:

* :func:`write_text_atomic` / :func:`write_json_atomic`: one file, written beside its final name and renamed;
* :func:`writing_file`: the same for any writer, which is handed the temporary name;
* :func:`building_folder`: a folder filled under a temporary sibling name and put in place by :func:`replace_folder`
  only when the block ends without an error.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


_UMASK = os.umask(0)  # read once (os.umask can only be read by setting it), and put back at once
os.umask(_UMASK)


def replace_folder(tmp: Path, out: Path) -> None:
    """Rename the finished folder ``tmp`` to ``out`` (same file system). An existing ``out`` is moved aside first
    and put back if the new one cannot go in, so a failure leaves the previous folder intact."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, old / out.name)
    try:
        os.replace(tmp, out)
    except OSError:
        os.replace(old / out.name, out)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def building_folder(out: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``out``; when the block ends without an error it becomes ``out`` (an
    older ``out`` is replaced), otherwise it is deleted and ``out`` is left as it was."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes it 0700; a shared cache or run folder must be readable as mkdir's
    try:
        yield tmp
        replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def writing_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file name beside ``path`` for any writer (``torch.save``, ``np.save``...); when the block
    ends without an error the file is renamed over ``path``, otherwise it is deleted and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it 0600; the finished file gets what open() would give it
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it over ``path``."""
    with writing_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="\n")


def write_json_atomic(path: str | os.PathLike, data: Any, indent: int | None = 2) -> None:
    write_text_atomic(path, json.dumps(data, indent=indent) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The rows of a JSON-lines log (none when it does not exist yet)."""
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def put_step_row(path: str | os.PathLike, row: dict) -> None:
    """Add ``row`` (with its ``step``) to a per-step curve log, replacing the rows from that step on: an evaluation
    hook that a resumed run calls again for its checkpoint's step stays idempotent. Written atomically."""
    rows = [r for r in read_jsonl(path) if r["step"] < row["step"]] + [row]
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


__all__ = ["replace_folder", "building_folder", "writing_file", "write_text_atomic", "write_json_atomic", "read_jsonl",
           "put_step_row"]
