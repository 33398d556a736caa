"""The run directory's safety rules: one writer at a time, only our own outputs replaced, honest resumes.

* `RunLock`: an OS file lock (`fcntl.flock`) on OUT/.diffprune.lock, held while a run writes there. A
  second process on the same folder gets a one-line error naming the first one's pid; a killed process
  releases the lock with its file descriptors, so a stale lock never blocks a `--resume`.
* `check_output_dir`: `--overwrite` replaces only a diffprune run (a folder with our run_config.json),
  never a user's folder or the base model in use; `--resume` refuses when a setting that changes the
  result differs from the run's run_config.json, naming it.
* `newest_complete_checkpoint`: a kill during a Trainer checkpoint write leaves a checkpoint without
  trainer_state.json (written last); such folders are removed and the newest complete one is used.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import shutil
from pathlib import Path

from ..errors import DiffpruneError
from ..io import atomic_write_json

LOCK_NAME = ".diffprune.lock"
RUN_FORMAT = "diffprune-run"
# Settings whose change would make a resumed run differ from an uninterrupted one (save_steps,
# logging_steps, progress only change when things are written or shown).
RESULT_KEYS = ("task", "model", "method", "method_options", "data_dir", "data_files", "seed", "batch_size",
               "eval_batch_size", "grad_accum", "max_length", "doc_stride", "max_train_samples", "max_eval_samples",
               "warmup", "max_grad_norm", "group_by_length")
_UNSET = object()
CHECKPOINT_FILES = ("trainer_state.json", "model.safetensors", "optimizer.pt", "scheduler.pt")


class RunLock:
    """An exclusive, non-blocking flock on OUT/.diffprune.lock; the file holds the holder's pid."""

    def __init__(self, out: Path):
        self.out, self.fd = Path(out), None

    def acquire(self) -> None:
        import fcntl

        if self.fd is not None:
            return
        path = self.out / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # the mode is filtered by the umask
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                os.close(fd)
                raise
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DiffpruneError(f"{self.out} is in use by another diffprune process (pid {holder}); wait "
                                 "for it to finish, stop it, or choose another --output-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None


def entries(out: Path) -> list[Path]:
    """What a folder holds besides our lock file."""
    return [p for p in out.iterdir() if p.name != LOCK_NAME]


def is_run_dir(out: Path) -> bool:
    """Whether `out` holds a run written by diffprune (a run_config.json of ours)."""
    try:
        cfg = json.loads((out / "run_config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and (cfg.get("format") == RUN_FORMAT
                                      or {"output_dir", "task", "method", "method_options"} <= set(cfg))


def _same_path(a, b) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def _inside(child: Path, parent: Path) -> bool:
    child, parent = child.expanduser().resolve(), parent.expanduser().resolve()
    return child == parent or parent in child.parents


def _normal(key: str, value):
    if key == "data_dir" and value is not None:
        return str(Path(value).expanduser().resolve())
    return value


def check_output_dir(out: Path, cfg, lock: RunLock, model_path: str | None, data_files: dict) -> None:
    """Refuse to mix runs, to replace what is not a run, or to resume with other settings.

    Takes the lock when `out` exists already (else `prepare_output_dir` takes it after creating `out`).
    """
    if out.exists() and not out.is_dir():
        raise DiffpruneError(f"--output-dir {out} is an existing file, not a directory; choose another path")
    if model_path is not None and Path(model_path).is_dir() and _inside(Path(model_path), out):
        raise DiffpruneError(f"--output-dir {out} holds the base model {model_path}; choose another path")
    if not out.is_dir():
        return
    if entries(out) and not is_run_dir(out):  # checked before the lock file is made: nothing is written
        what = "--overwrite: " if cfg.overwrite else "--resume: " if cfg.resume else ""
        raise DiffpruneError(f"{what}{out} holds files but is not a diffprune run (no run_config.json of ours), "
                             "so it is left as it is; choose another --output-dir")
    lock.acquire()
    if not entries(out) or cfg.overwrite:
        return
    if not cfg.resume:
        raise DiffpruneError(f"{out} already holds a run; pass --resume to continue it, --overwrite to "
                             "start again, or choose another --output-dir")
    previous = json.loads((out / "run_config.json").read_text())
    current = {**dataclasses.asdict(cfg), "data_files": data_files}
    for key in RESULT_KEYS:
        if key not in previous:  # runs written before this setting was recorded
            continue
        was, now = _normal(key, previous[key]), _normal(key, current[key])
        if key == "method_options" and was != now:
            was, now = was or {}, now or {}

            def shown(options, name):
                return f"={options[name]!r}" if name in options else " unset (the method's default)"

            for name in sorted(set(was) | set(now)):
                if was.get(name, _UNSET) != now.get(name, _UNSET):
                    raise DiffpruneError(f"--resume: {out} was started with {name}{shown(was, name)}, not "
                                         f"{name}{shown(now, name)}; give the same settings, or start again "
                                         "with --overwrite")
        if was != now:
            raise DiffpruneError(f"--resume: {out} was started with {key}={was!r}, not {now!r}; give the same "
                                 "settings, or start again with --overwrite")


def prepare_output_dir(out: Path, cfg, lock: RunLock, data_files: dict) -> None:
    """Create (or, with --overwrite, empty) `out` under the lock and record the run's settings."""
    out.mkdir(parents=True, exist_ok=True)
    lock.acquire()
    if cfg.overwrite:
        for child in entries(out):  # check_output_dir made sure this is a run of ours
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    clean_leftovers(out)
    fresh = not (cfg.resume and (out / "run_config.json").is_file())
    if fresh:
        atomic_write_json(out / "run_config.json",
                          {"format": RUN_FORMAT, **dataclasses.asdict(cfg), "data_files": data_files})


_TMP = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-[0-9a-f]{8}$")


def clean_leftovers(out: Path) -> None:
    """Remove what a killed run left half-written: temporary snapshot folders and temporary files.

    A folder renamed aside (`.snapshot.old-*`) whose replacement never arrived is put back instead.
    """
    folders = [out, *(p for p in (out / "phases").glob("*") if p.is_dir())]
    for folder in folders:
        for child in list(folder.iterdir()):
            m = _TMP.match(child.name)
            if child.name == ".diff.tmp" and child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
            elif m and child.is_dir():
                target = folder / m["name"]
                if m["kind"] == "old" and not target.exists():
                    os.rename(child, target)
                else:
                    shutil.rmtree(child, ignore_errors=True)
            elif child.name.startswith(".") and child.name.endswith(".tmp") and child.is_file():
                child.unlink(missing_ok=True)


def _complete(ckpt: Path) -> bool:
    if not all((ckpt / name).is_file() for name in CHECKPOINT_FILES):
        return False
    try:
        json.loads((ckpt / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return True


def newest_complete_checkpoint(folder: Path, remove: bool = True) -> str | None:
    """The newest complete checkpoint-N in `folder`; incomplete ones (a kill mid-write) are removed
    (by the main process only: `remove=False` on the others)."""
    if not folder.is_dir():
        return None
    found = sorted(((int(m.group(1)), p) for p in folder.iterdir()
                    if p.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", p.name))), reverse=True)
    best = None
    for _, ckpt in found:
        if best is None and _complete(ckpt):
            best = ckpt
        elif remove and not _complete(ckpt):
            shutil.rmtree(ckpt, ignore_errors=True)
    if best is not None:
        check_checkpoint(best)
    return None if best is None else str(best)


def check_checkpoint(ckpt: Path) -> None:
    """Every pickled file of a checkpoint must load with weights_only=True (tensors and plain data only)."""
    import pickle

    import safetensors
    import torch
    from transformers.trainer_pt_utils import safe_globals  # numpy's RNG state types, as the Trainer allows

    try:
        with safetensors.safe_open(str(ckpt / "model.safetensors"), "pt") as f:
            list(f.keys())
    except Exception as exc:
        raise DiffpruneError(f"--resume: {ckpt / 'model.safetensors'} is corrupt or truncated "
                             f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); delete "
                             f"{ckpt} to restart its phase from the beginning") from None
    for name in ("optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state.pth"):
        path = ckpt / name
        if not path.is_file():
            continue
        try:
            with safe_globals():
                torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, AttributeError) as exc:
            text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
            reason = ("it holds pickled objects other than tensors and plain data"
                      if isinstance(exc, pickle.UnpicklingError) and "Weights only load failed" in text
                      else (text.split(". ")[0].splitlines() or [type(exc).__name__])[0][:160])
            raise DiffpruneError(f"--resume: {path} is corrupt or not a plain tensor file, so it is not loaded "
                                 f"({reason}); delete {ckpt} to restart its phase from the beginning") from None
