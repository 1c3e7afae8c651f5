"""The output while a run writes it: `OUT.partial/`, renamed to `OUT` only when complete.

- Checked before any work (`check`): `--out` is a directory or can be made, not a file, not inside the
  source, writable; no live run holds it; an interrupted run there is continued only with `--resume`,
  and only by the same run.
- Held by one live run (`claim`): `OUT.partial/.lock`, an exclusive flock that the kernel releases when
  the process dies, so a second run on the same `--out` is refused and `--overwrite` never deletes a
  partial output that a live run is writing.
- The resume point (`.gsq-work/state.json`, `save_state`) records the run that made it: every setting
  that shapes the bytes, the source's identity (config.json and the other small files in full, each
  shard by size, modification time and header hash), the gsq version, the ranks and the device kind.
  `--resume` with anything different is refused in one line naming what differs, and leaves the
  partial output as it was.
"""

import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

from gsq import __version__, acts
from gsq.errors import InputError, write_text

LOCK = ".lock"
WORK = ".gsq-work"
IGNORED = ("preset", "device")  # a preset only supplies settings; the device is compared as resolved


def partial_of(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def identity(cfg, src: Path, ranks: int, device: str, flags: tuple = ()) -> dict:
    """What a resume point is bound to (see the module docstring); `flags`: the tool's (default: quantize's)."""
    settings = {k: v for k, v in json.loads(cfg.to_json(flags)).items() if k not in IGNORED}
    return {"settings": settings, "source": fingerprint(src), "gsq": __version__, "ranks": ranks, "device": device}


SMALL = 64 << 20  # files up to this size (config, index, tokenizer, code) are hashed whole


def fingerprint(src: Path) -> dict:
    """The source directory's files: a safetensors shard by size, mtime and header hash (reading 1 TB of
    weights is not an option; rewriting a shard changes its mtime), other large files by size and mtime,
    small ones by their sha256."""
    out = {}
    for f in sorted(p for p in Path(src).iterdir() if p.is_file()):
        stat = f.stat()
        if f.suffix == ".safetensors":
            with open(f, "rb") as fh:
                header = fh.read(min(int.from_bytes(fh.read(8), "little"), stat.st_size))
            out[f.name] = [stat.st_size, stat.st_mtime_ns, hashlib.sha256(header).hexdigest()]
        elif stat.st_size > SMALL:
            out[f.name] = [stat.st_size, stat.st_mtime_ns]
        else:
            out[f.name] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def _flag(key: str, value) -> str:
    shown = ",".join(map(str, value)) if isinstance(value, list) else value
    return f"--{key.replace('_', '-')} {shown}" if not isinstance(value, bool) else f"--{key.replace('_', '-')}={value}"


def difference(run: dict, saved: dict) -> str | None:
    """What differs between this run and the one that made a resume point, in words (None: the same)."""
    if saved.get("gsq") != run["gsq"]:
        return f"it was started by gsq {saved.get('gsq', 'before 0.1.0')}, this is gsq {run['gsq']}"
    for key in sorted(set(run["settings"]) | set(saved["settings"])):
        new, old = run["settings"].get(key), saved["settings"].get(key)
        if new != old:
            return f"this run has {_flag(key, new)}, it was started with {_flag(key, old)}"
    for name in sorted(set(run["source"]) | set(saved["source"])):
        new, old = run["source"].get(name), saved["source"].get(name)
        if new != old:
            what = "is new" if old is None else "is gone" if new is None else "has changed"
            return f"the source model's {name} {what} since it was started"
    for key, what in (("ranks", "ranks"), ("device", "device")):
        if run[key] != saved[key]:
            return f"it ran with {what} {saved[key]}, this run has {run[key]}"
    return None


def holder(partial_dir: Path) -> str | None:
    """The pid of the live run holding `partial_dir`'s lock (None when no live run does)."""
    try:
        fd = os.open(partial_dir / LOCK, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.read(fd, 64).decode(errors="replace").strip() or "?"
    finally:
        os.close(fd)  # (also releases the lock just taken)
    return None


def live_run(partial_dir: Path, pid: str) -> InputError:
    return InputError(f"a live run (pid {pid}) is writing {partial_dir}: wait for it or stop it; --overwrite never "
                      "replaces a live run's output")


def check(cfg, src: Path, run: dict, held: bool = False) -> dict | None:
    """Refuse a bad `--out` before any work (creates nothing). Returns the resume point to continue from
    (`--resume` of the same run), or None to start afresh. `held`: this process holds the lock."""
    if not cfg.out:
        raise InputError("--out DIR is required")
    out = Path(cfg.out)
    partial_dir = partial_of(out)
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise InputError(f"--out {out} is inside the source model {src}: the source is never written to")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file, not a directory")
    parent = next(p for p in [out.resolve().parent, *out.resolve().parent.parents] if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"--out {out} cannot be written: {parent} is not a writable directory")
    pid = None if held else holder(partial_dir)
    if pid:
        raise live_run(partial_dir, pid)
    started = partial_dir.exists() and any(p.name != LOCK for p in partial_dir.iterdir())
    if out.exists() and not (cfg.overwrite or cfg.resume):
        raise InputError(f"output {out} exists: pass --overwrite to replace it")
    if started and not (cfg.resume or cfg.overwrite):
        raise InputError(f"an interrupted run is in {partial_dir}: pass --resume to continue it or --overwrite")
    if cfg.resume and out.exists() and not started:
        raise InputError(f"output {out} is already complete: nothing to resume")
    state = partial_dir / WORK / "state.json"
    if not (cfg.resume and state.exists()):
        return None
    point = json.loads(state.read_text())
    why = difference(run, point["run"]) if "run" in point else "it was started by a gsq that did not record its run"
    if why:
        raise InputError(f"cannot resume {partial_dir}: {why}. Resume with the settings it was started with, or start "
                         "over with --overwrite")
    return point


_held = []  # the open lock files of this process (released by the kernel when it ends)


def claim(cfg, src: Path, run: dict) -> Path:
    """Take `OUT.partial/` for this run (made if needed; under --overwrite without --resume, emptied) and
    hold its lock for the life of the process. Everything `check` refuses is checked again under the lock:
    another run may have started or finished since."""
    partial_dir = partial_of(Path(cfg.out))
    made = not partial_dir.exists()
    partial_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(partial_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise live_run(partial_dir, holder(partial_dir) or "?") from None
    try:
        point = check(cfg, src, run, held=True)
    except InputError:
        if made:
            shutil.rmtree(partial_dir, ignore_errors=True)
        os.close(fd)
        raise
    if point is None:  # a fresh start: whatever an earlier run left goes
        for p in partial_dir.iterdir():
            if p.name != LOCK:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held.append(fd)
    return partial_dir


def save_state(partial_dir: Path, next_layer: int, record: dict, run: dict):
    """The resume point before `next_layer` (its activations are committed already, gsq.acts), written whole
    and renamed into place; then the older activations are removed."""
    work = partial_dir / WORK
    write_text(work / "state.json", json.dumps({"next_layer": next_layer, "record": record, "run": run}))
    acts.drop_old(work, next_layer)


def finish_work(partial_dir: Path):
    """The run is done: its resume point goes (state.json first: a resume never meets half of one)."""
    (partial_dir / WORK / "state.json").unlink()
    shutil.rmtree(partial_dir / WORK)


def release(out: Path):
    """After the rename of `OUT.partial` to `OUT`: the lock file goes (its lock ends with the process)."""
    (out / LOCK).unlink(missing_ok=True)
