"""What the embedded data set builders (``vl_align.embedded``: easy-VQA, ``vl_align.scenes``, ``vl_align.motion``)
share: a folder's ``BUILD_INFO.json`` and the check that it holds a complete build of the same version and
fingerprint, the paths of a builder's file table, jsonl writing, and the locked, atomic build of a folder.

A builder's file table (``FILES``) maps a name (``pairs_train``, ``caption_corpus``, ``readme``, ``build_info``...)
to a file name in the built folder; ``build_info`` is written last, so its presence marks a complete build.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from dvlp_common.io import building_folder

__all__ = ["build_once", "built_paths", "is_built", "params_fingerprint", "read_build_info", "write_build_files",
           "write_jsonl"]


def params_fingerprint(builder_version: str, params: Mapping) -> str:
    """The fingerprint of a build drawn from ``params`` alone (scenes, motion): sha256 of the builder version and
    the parameters as sorted JSON. A built folder records it; another value rebuilds the folder."""
    return hashlib.sha256(json.dumps({"builder": builder_version, **params}, sort_keys=True).encode()).hexdigest()


def read_build_info(out_dir: Path, files: Mapping[str, str]) -> dict | None:
    """The folder's ``BUILD_INFO.json``, or None when it is missing or unreadable (no complete build)."""
    try:
        return json.loads((out_dir / files["build_info"]).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_built(out_dir: Path, files: Mapping[str, str], builder_version: str, fingerprint: str) -> bool:
    """Whether ``out_dir`` holds a complete build (every file of the table) of this version and fingerprint."""
    info = read_build_info(out_dir, files)
    return (
        info is not None
        and info.get("builder_version") == builder_version
        and info.get("fingerprint") == fingerprint
        and all((out_dir / name).is_file() for name in files.values())
    )


def built_paths(out_dir: Path, files: Mapping[str, str]) -> dict[str, Path]:
    """``{name: path}`` of the table's files in ``out_dir``: what a builder returns."""
    return {k: out_dir / name for k, name in files.items()}


def write_jsonl(path: Path, records: Sequence[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def write_build_files(folder: Path, files: Mapping[str, str], jsonl: Mapping[str, Sequence[dict]],
                      corpus: Sequence[str], readme: str, info: dict) -> None:
    """The files of a build into ``folder``: each ``jsonl[name]`` as ``files[name]``, the caption corpus (one sentence
    a line), the README and, last, ``BUILD_INFO.json`` (``info``)."""
    for name, records in jsonl.items():
        write_jsonl(folder / files[name], records)
    (folder / files["caption_corpus"]).write_text("".join(s + "\n" for s in corpus), encoding="utf-8", newline="\n")
    (folder / files["readme"]).write_text(readme, encoding="utf-8", newline="\n")
    (folder / files["build_info"]).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")


def build_once(out_dir: Path, files: Mapping[str, str], builder_version: str, fingerprint: str, force: bool,
               write: Callable[[Path], None]) -> dict[str, Path]:
    """Build ``out_dir`` with ``write(tmp)`` (which writes every file of the table into the temporary folder ``tmp``,
    naming final paths under ``out_dir``) and return :func:`built_paths`.

    Idempotent (a complete build of the same version and fingerprint is returned as is unless ``force``), locked (a
    file lock beside ``out_dir`` serialises concurrent builders) and atomic (``tmp`` is a sibling folder renamed into
    place, so a reader never sees a half-written build).
    """
    from filelock import FileLock

    if not force and is_built(out_dir, files, builder_version, fingerprint):
        return built_paths(out_dir, files)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out_dir) + ".lock"):
        if force or not is_built(out_dir, files, builder_version, fingerprint):  # else built while we waited
            with building_folder(out_dir) as tmp:
                write(tmp)
    return built_paths(out_dir, files)
