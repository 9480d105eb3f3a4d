"""Files: atomic writes, JSONL with row-level errors, hashes.

Everything a stage writes goes through :func:`atomic_write_*` (write to a
temporary name in the same folder, fsync, rename) so a half-written file is
never taken as done.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import DataError, UserError


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _finite(obj: Any, where: str) -> Any:
    """Refuse NaN/inf so that no NaN ever reaches a file."""
    if isinstance(obj, float) and not math.isfinite(obj):
        raise UserError(f"refusing to write a non-finite number ({obj}) at {where}")
    if isinstance(obj, dict):
        for k, v in obj.items():
            _finite(v, f"{where}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _finite(v, f"{where}[{i}]")
    return obj


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    _finite(obj, str(path))
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    lines = []
    for i, r in enumerate(rows):
        _finite(r, f"{path} row {i + 1}")
        lines.append(json.dumps(r, ensure_ascii=False))
    atomic_write_text(path, "\n".join(lines) + ("\n" if lines else ""))


def append_jsonl(path: str | os.PathLike, row: dict) -> None:
    """Append one metrics row (used for metrics.jsonl logs)."""
    _finite(row, str(path))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def read_jsonl(path: str | os.PathLike, required: Iterable[str] = ()) -> list[dict]:
    """Read a JSONL file; errors name the file, the row (1-based line) and the field."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: file not found")
    required = list(required)
    rows: list[dict] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"malformed JSON ({e.msg}); fix or remove that line",
                                path=str(path), row=lineno) from None
            if not isinstance(row, dict):
                raise DataError("expected a JSON object per line", path=str(path), row=lineno)
            for col in required:
                if col not in row:
                    raise DataError(f"missing column; each row needs {required}",
                                    path=str(path), row=lineno, field=col)
            rows.append(row)
    if not rows:
        raise DataError("empty file: no rows to read", path=str(path))
    return rows


def iter_files(path: str | os.PathLike) -> Iterator[Path]:
    p = Path(path)
    if p.is_file():
        yield p
    else:
        yield from sorted(x for x in p.rglob("*") if x.is_file())


def hash_path(path: str | os.PathLike) -> str:
    """SHA-256 over a file, or over every file of a folder (names and bytes)."""
    h = hashlib.sha256()
    base = Path(path)
    for f in iter_files(base):
        if f.name.startswith("."):
            continue
        h.update(str(f.relative_to(base) if base.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def atomic_dir(final: str | os.PathLike) -> Path:
    """Return a fresh temporary folder beside ``final``; call :func:`commit_dir` when done."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def commit_dir(tmp: Path, final: str | os.PathLike) -> None:
    """Move a finished temporary folder into place (replacing an older one)."""
    final = Path(final)
    if final.exists():
        old = final.parent / f".{final.name}.old"
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)


def check_free_space(path: str | os.PathLike, need_bytes: int, what: str) -> None:
    """Refuse to start writing when the disk cannot hold the output."""
    p = Path(path)
    while not p.exists():
        p = p.parent
    free = shutil.disk_usage(p).free
    if free < need_bytes:
        raise UserError(f"{path}: not enough free disk space for {what}: needs about "
                        f"{need_bytes / 2**20:.0f} MiB, {free / 2**20:.0f} MiB free; free some space")
