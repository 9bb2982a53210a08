"""The on-disk autotune cache and runs/ files: JSON only, atomic writes, merges under a file lock.

Layout under ``<PYKERNELS_CACHE_DIR>/autotune/``::

    <name>.json              the cache of the first environment that tuned <name> here
    <name>.<env_hash>.json   the cache of any other environment (side by side, never overwritten)
    .<name>.lock             serializes read-merge-write of both
    runs/<name>.<YYYYmmdd_HHMMSS>[.<pid>[.<n>]].json   SGLANG_FLASHINFER_AUTOTUNE_CACHE=0 results

The file of this environment is ``<name>.<env_hash>.json`` when it exists, else ``<name>.json``
unless that one belongs to another environment (then the hashed name). Readers never lock: files
are replaced atomically (temp file in the same folder + os.replace), so a reader sees the old or the
new file, never a torn one. The lock is an flock (filelock's UnixFileLock), which the OS drops when
its holder dies, so a killed tuner never blocks the next writer.

An empty, unreadable or malformed file is a miss with a warning; the next write replaces it.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from autotune import env
from pykernels import envs
from pykernels._log import get_logger, warn_once

log = get_logger("autotune")

LOCK_TIMEOUT_S = 300.0  # a write holds the lock for milliseconds; this only bounds a hung holder


def root() -> Path:
    return Path(envs.PYKERNELS_CACHE_DIR).expanduser() / "autotune"


def runs_root() -> Path:
    return root() / "runs"


def plain_path(name: str) -> Path:
    return root() / f"{name}.json"


def env_path(name: str, meta: Mapping) -> Path:
    return root() / f"{name}.{env.env_hash(meta)}.json"


def lock_path(name: str) -> Path:
    return root() / f".{name}.lock"


# ---- reading -----------------------------------------------------------------------------------

def read(path: Path) -> tuple[str, dict | None]:
    """("ok", data) | ("missing", None) | ("corrupt", None) for a cache or runs file."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return "missing", None
    except (OSError, UnicodeDecodeError):
        return "corrupt", None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return "corrupt", None
    ok = (isinstance(data, dict) and isinstance(data.get("_metadata"), dict)
          and isinstance(data.get("entries"), dict))
    return ("ok", data) if ok else ("corrupt", None)


def _warn_corrupt(path: Path) -> None:
    warn_once(log, f"corrupt:{path}",
              "autotune cache %s is empty or corrupt: treated as a miss; the next tuning run "
              "rewrites it", path)


def select(name: str, meta: Mapping) -> Path:
    """The cache file of this environment (see the module docstring); logs a mismatch once."""
    hashed = env_path(name, meta)
    if hashed.exists():
        return hashed
    plain = plain_path(name)
    status, data = read(plain)
    if status == "ok":
        diff = env.mismatches(data["_metadata"], meta)
        if diff:
            warn_once(log, f"mismatch:{plain}:{hashed.name}",
                      "autotune cache %s was written for another environment (%s): not used and "
                      "kept as is; this environment uses %s", plain, env.describe(diff),
                      hashed.name)
            return hashed
    return plain


def load_entries(name: str, meta: Mapping) -> tuple[Path, dict]:
    """(path, entries) of this environment's cache; entries is {} on a miss."""
    path = select(name, meta)
    status, data = read(path)
    if status == "corrupt":
        _warn_corrupt(path)
    if status != "ok":
        return path, {}
    diff = env.mismatches(data["_metadata"], meta)
    if diff:  # only a hashed file edited by hand (or a hash collision) gets here
        warn_once(log, f"mismatch:{path}", "autotune cache %s does not match this environment "
                  "(%s): treated as a miss", path, env.describe(diff))
        return path, {}
    return path, data["entries"]


# ---- writing -----------------------------------------------------------------------------------

def _sort_key(item):
    shape = item[1].get("shape", {}) if isinstance(item[1], dict) else {}
    return tuple((0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v))
                 for v in shape.values()) or ((1, 0, item[0]),)


def document(meta: Mapping, entries: Mapping, info: Mapping, created: str | None = None) -> dict:
    """The JSON body of a cache or runs file, entries sorted by shape (numbers numerically)."""
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    head = {**meta, "env_hash": env.env_hash(meta), **info,
            "created": created or now, "updated": now}
    return {"_metadata": head, "entries": dict(sorted(entries.items(), key=_sort_key))}


def dumps(doc: Mapping) -> str:
    """JSON text of a cache/runs/shipped document: metadata indented, one line per entry, so a
    file stays readable and a diff of two versions shows one line per changed bucket."""
    def block(body: Mapping, pad: str) -> str:
        meta = json.dumps(body.get("_metadata", {}), indent=1).replace("\n", "\n " + pad)
        rows = [f'{pad}  {json.dumps(k)}: {json.dumps(v)}' for k, v in body["entries"].items()]
        inner = ",\n".join(rows)
        return (f'{{\n{pad} "_metadata": {meta},\n{pad} "entries": {{'
                + (f"\n{inner}\n{pad} }}" if rows else "}") + f"\n{pad}}}")

    if "entries" in doc:
        return block(doc, "") + "\n"
    parts = [f" {json.dumps(name)}: {block(body, ' ')}" for name, body in doc.items()]
    return "{\n" + ",\n".join(parts) + "\n}\n"


def atomic_write(path: Path, data: Mapping) -> None:
    """Write JSON to path through a temp file in the same folder and os.replace (atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(dumps(data))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def locked(name: str, timeout: float | None = None):
    """Hold the write lock of `name` (an flock: released by the OS if this process dies)."""
    from filelock import FileLock, Timeout

    path = lock_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path), timeout=LOCK_TIMEOUT_S if timeout is None else timeout)
    try:
        lock.acquire()
    except Timeout:
        raise TimeoutError(f"autotune: could not lock {path} within {lock.timeout:.0f} s: "
                           "another live process is writing the cache") from None
    try:
        yield path
    finally:
        lock.release()


def merge(name: str, meta: Mapping, entries: Mapping, info: Mapping,
          timeout: float | None = None) -> Path:
    """Read-merge-write `entries` into this environment's cache under the lock; new entries
    replace old ones with the same key, every other entry is kept. Returns the path written."""
    with locked(name, timeout):
        path = select(name, meta)
        status, data = read(path)
        if status == "corrupt":
            _warn_corrupt(path)
        keep = status == "ok" and not env.mismatches(data["_metadata"], meta)
        old = data["entries"] if keep else {}
        created = data["_metadata"].get("created") if keep else None
        atomic_write(path, document(meta, {**old, **entries}, info, created))
    return path


def _stamp() -> str:
    return time.strftime("%Y%m%d_%H%M%S")


def write_run(name: str, meta: Mapping, entries: Mapping, info: Mapping) -> Path:
    """Write a fresh runs/ file and return its path (see publish_run: never overwrites)."""
    folder = runs_root()
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(dumps(document(meta, entries, {**info, "mode": "run"})))
        return publish_run(name, Path(tmp))
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def publish_run(name: str, tmp: Path) -> Path:
    """Give the finished file `tmp` (in runs/) its name runs/<name>.<YYYYmmdd_HHMMSS>.json; when
    two runs share a second the pid is added, then a counter. The name is claimed with os.link,
    which fails if it exists, so no run ever overwrites another. `tmp` is left for the caller."""
    folder = Path(tmp).parent
    stamp, pid = _stamp(), os.getpid()
    names = [f"{name}.{stamp}.json", f"{name}.{stamp}.{pid}.json"]
    names += [f"{name}.{stamp}.{pid}.{n}.json" for n in range(1, 1000)]
    for candidate in names:
        target = folder / candidate
        try:
            os.link(tmp, target)
            return target
        except FileExistsError:
            continue
    raise FileExistsError(f"autotune: no free runs/ name for {name} at {stamp}")
