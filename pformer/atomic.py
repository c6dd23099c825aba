"""Putting a finished folder in place so that a reader never sees a mix of old and new files."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


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
