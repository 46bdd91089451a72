"""What the three preprocessing scripts share: atomic writes, a parallel job runner with a
tqdm bar, and the closing summary (written / skipped / failed, with reasons)."""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

from tqdm import tqdm


@dataclass
class JobResult:
    """Outcome of one input: `written` and `skipped` list output names; `error` says why it failed."""

    name: str
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    error: str | None = None


def partial_name(path: str) -> str:
    """Temporary name beside `path`, hidden, keeping the extension so writers pick the format."""
    folder, name = os.path.split(path)
    ext = ".nii.gz" if name.endswith(".nii.gz") else os.path.splitext(name)[1]
    return os.path.join(folder, f".{name[: len(name) - len(ext)]}.partial{os.getpid()}{ext}")


def write_atomic(path: str, write: Callable[[str], None]) -> None:
    """Call write(tmp) then rename tmp to path, so a killed run never leaves a file under the
    final name that a rerun would take for finished."""
    tmp = partial_name(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_stale_partials(folder: str) -> int:
    """Delete temporary files left by a killed run."""
    if not os.path.isdir(folder):
        return 0
    stale = [f for f in os.listdir(folder) if f.startswith(".") and ".partial" in f]
    for f in stale:
        os.remove(os.path.join(folder, f))
    return len(stale)


def _safe_call(job: Callable[..., JobResult], item) -> JobResult:
    try:
        return job(item)
    except Exception as err:  # reported in the summary, with the input's name
        return JobResult(name=str(item), error=f"{type(err).__name__}: {err}")


def run_jobs(job: Callable[..., JobResult], items: Iterable, workers: int, desc: str) -> list[JobResult]:
    """Run job(item) for every item on `workers` processes, with a progress bar. A failing item
    does not stop the others."""
    items = list(items)
    if workers <= 1:
        return [_safe_call(job, it) for it in tqdm(items, desc=desc, unit="file")]
    with ProcessPoolExecutor(workers) as pool:
        return list(tqdm(pool.map(_safe_call, [job] * len(items), items, chunksize=1), total=len(items), desc=desc, unit="file"))


def summarise(results: list[JobResult], what: str) -> int:
    """Print the closing summary; return the exit status (1 if anything failed)."""
    counts = Counter()
    for r in results:
        counts["written"] += len(r.written)
        counts["skipped"] += len(r.skipped)
    failed = [r for r in results if r.error]
    print(f"{what}: {counts['written']} written, {counts['skipped']} skipped as already done, {len(failed)} failed")
    for r in failed:
        print(f"  FAILED {r.name}: {r.error}", file=sys.stderr)
    return 1 if failed else 0
