"""Small file helpers: every file we write appears whole or not at all."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """`write(tmp)` fills a temporary file next to `path`, which then replaces `path` in one rename.

    A crash or an error leaves `path` as it was (and no temporary behind). The file gets the permissions
    of any new file (0666 less the umask), not mkstemp's private 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def atomic_save_tensors(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """A safetensors file, written atomically."""
    import safetensors.torch

    contiguous = {k: v.detach().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: safetensors.torch.save_file(contiguous, tmp, metadata=metadata))
