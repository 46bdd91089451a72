"""What the three preprocessing scripts share besides atomic writes (`files`): a check that a
NIfTI file is complete, a parallel job runner with a tqdm bar whose workers die with it, and
the closing summary (written / skipped / failed, with reasons, and warnings); and what every
command of the project shares on the command line: its parser (`command_parser`: named as it
was called, defaults in the help, `--version`), the way it ends (`run_command`: a known error
as one `error: ...` line and exit status 1, Ctrl-C quietly with 130), `positive_float`.

Run as a module it is torchrun whose failure ends the same way (`torchrun`), which run_ssl.sh
and run_finetune.sh launch through: `python -m preprocessing.runner --nproc_per_node 2 main_desd.py ...`."""

from __future__ import annotations

import argparse
import ctypes
import importlib.metadata
import json
import math
import multiprocessing
import os
import signal
import struct
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import nibabel as nib
import numpy as np
from tqdm import tqdm


def version() -> str:
    """The project's version, as installed (`make install` installs it editable)."""
    try:
        return importlib.metadata.version("desd")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed: make install)"


def command_parser(description: str, parents=(), add_help: bool = True) -> argparse.ArgumentParser:
    """A command's parser: its usage names the program as it was called (`desd-predict`, or
    `predict.py`), the help shows every default, and `--version` answers."""
    parser = argparse.ArgumentParser(
        description=description, parents=list(parents), add_help=add_help, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    return parser


def parse_with_config(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse `argv`, where `--config FILE` (a JSON object of flag values, such as a run's
    args.json or a recipe) supplies the defaults and the command line still wins. Keys that are
    no flag of the command (a run's rank, world size, ...) are ignored, with one line naming
    them; a file that cannot be read is a parse error naming it."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default="")
    path = pre.parse_known_args(argv)[0].config
    if path:
        try:
            with open(path) as f:
                values = json.load(f)
            if not isinstance(values, dict):
                raise ValueError(f"a JSON {type(values).__name__}, not an object of flag values")
        except (OSError, ValueError) as err:
            parser.error(f"--config {path!r}: {err}")
        flags = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "version", "config")}
        ignored = sorted(set(values) - set(flags) - {"config"})
        if ignored:
            print(f"--config {path}: not flags of this command, ignored: {', '.join(ignored)}", file=sys.stderr)
        for dest, value in values.items():
            if dest in flags:
                flags[dest].required = False  # the file supplies it
                parser.set_defaults(**{dest: value})
    return parser.parse_args(argv)


KNOWN_ERRORS = (ValueError, KeyError, OSError, RuntimeError)  # what the project raises with a message naming the file or flag


def run_command(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run a command's `main(argv)`: a known error ends as one `error: ...` line on stderr with exit
    status 1 (DESD_DEBUG=1 shows the traceback instead); Ctrl-C ends quietly with 130."""
    try:
        return int(main(argv) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except SystemExit as stop:
        if isinstance(stop.code, str):  # a refusal raised as SystemExit("message")
            print(f"error: {stop.code}", file=sys.stderr)
            return 1
        raise
    except KNOWN_ERRORS as err:
        if os.environ.get("DESD_DEBUG", "0") not in ("", "0"):
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err  # KeyError's str() quotes its message
        print(f"error: {message} (DESD_DEBUG=1 shows where)", file=sys.stderr)
        return 1


def entry(main: Callable[[list[str] | None], int | None]) -> Callable[[list[str] | None], int]:
    """The installed command (`[project.scripts]`) of a module's `main`, run by `run_command`."""
    return lambda argv=None: run_command(main, argv)


def positive_float(s: str) -> float:
    """argparse type: a finite number above 0 (a spacing, a size), refused at parse time."""
    try:
        value = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{s!r}: expected a number above 0")
    return value


@dataclass
class JobResult:
    """Outcome of one input: `written` and `skipped` list output names; `error` says why it
    failed (outputs written before the failure stay listed); `warnings` are implausible but
    usable findings."""

    name: str
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    error: str | None = None
    warnings: list[str] = field(default_factory=list)


# ============ input checks ============


def nifti_problem(path: str) -> str | None:
    """Why a NIfTI file is not whole, or None: a header that does not parse, a `.nii` shorter
    than its header promises, or a `.nii.gz` whose gzip trailer (the uncompressed size) does
    not match the header's voxel count, as a cut-short download or copy leaves it. SimpleITK
    would read the missing voxels as zeros. Reads the header and the last 4 bytes only."""
    try:
        image = nib.load(path)
        offset = int(image.dataobj.offset)  # the file's; image.header's offset is reset for writing
    except Exception as err:
        return f"unreadable NIfTI header ({err})"
    expected = offset + int(np.prod(image.shape)) * image.get_data_dtype().itemsize
    size = os.path.getsize(path)
    if path.endswith(".gz"):
        with open(path, "rb") as f:
            if size < 18 or f.read(2) != b"\x1f\x8b":
                return "not a gzip file"
            f.seek(-4, os.SEEK_END)
            (isize,) = struct.unpack("<I", f.read(4))
        if isize != expected % 2**32:
            return f"truncated or corrupt: the gzip stream holds {isize} bytes, the header needs {expected}"
        return None
    if size < expected:
        return f"truncated: {size} bytes, the header needs {expected}"
    return None


def spacing_warnings(path: str, spacing) -> list[str]:
    """Spacings outside 0.2-10 mm are seldom CT; say so."""
    odd = [s for s in spacing if not 0.2 <= s <= 10]
    return [f"{path}: implausible spacing {tuple(round(s, 4) for s in spacing)} mm (CT is 0.2-10 mm)"] if odd else []


# ============ running jobs ============


def _die_with_parent(parent: int) -> None:
    """Worker initialiser: be killed when the parent dies, even by `kill -9` (Linux)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)


def _safe_call(job: Callable[..., JobResult], item) -> JobResult:
    try:
        return job(item)
    except Exception as err:  # reported in the summary, with the input's name
        return JobResult(name=str(item), error=f"{type(err).__name__}: {err}")


def run_jobs(job: Callable[..., JobResult], items: Iterable, workers: int, desc: str, start_method: str | None = None) -> list[JobResult]:
    """Run job(item) for every item on `workers` processes, with a progress bar. A failing item
    does not stop the others; the workers die with this process. `start_method` "spawn" is
    for callers that have run torch already: a child forked from a process whose OpenMP
    threads are running can hang in its first parallel operation."""
    items = list(items)
    if workers <= 1:
        return [_safe_call(job, it) for it in tqdm(items, desc=desc, unit="file")]
    context = multiprocessing.get_context(start_method) if start_method else None
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_die_with_parent, initargs=(os.getpid(),)) as pool:
        return list(tqdm(pool.map(_safe_call, [job] * len(items), items, chunksize=1), total=len(items), desc=desc, unit="file"))


def summarise(results: list[JobResult], what: str) -> int:
    """Print the closing summary; return the exit status (1 if anything failed)."""
    counts = Counter()
    for r in results:
        counts["written"] += len(r.written)
        counts["skipped"] += len(r.skipped)
    failed = [r for r in results if r.error]
    warnings = [w for r in results for w in r.warnings]
    print(f"{what}: {counts['written']} written, {counts['skipped']} skipped as already done, {len(failed)} failed")
    for w in warnings:
        print(f"  WARNING {w}", file=sys.stderr)
    for r in failed:
        print(f"  FAILED {r.name}: {r.error}", file=sys.stderr)
    return 1 if failed else 0


def make_output_dir(path: str, flag: str = "--out_dir") -> None:
    """Create a script's output folder, or stop naming it and the flag that picks another."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise SystemExit(f"cannot create the output folder {path!r} ({err.strerror or err}): give a writable one with {flag}") from None
    if not os.access(path, os.W_OK):
        raise SystemExit(f"the output folder {path!r} is not writable: give a writable one with {flag}")


def torchrun(argv: list[str] | None = None) -> int:
    """torchrun (`torch.distributed.run`) with its arguments. A worker's failure ends with one
    `error:` line naming the script, the rank and the exit status, after the worker's own message,
    where torchrun prints a traceback and a ChildFailedError block (DESD_DEBUG=1 keeps them).
    Returns the failed worker's exit status (1 for a signal), or 130 on Ctrl-C."""
    import logging

    from torch.distributed import run as distributed_run
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    debug = os.environ.get("DESD_DEBUG", "0") not in ("", "0")
    if not debug:  # its log line of the failure says what the error line below says
        logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    try:
        distributed_run.main(argv)
    except ChildFailedError as failed:
        if debug:
            raise
        rank, failure = failed.get_first_failure()
        how = f"exit status {failure.exitcode}" if failure.exitcode > 0 else f"signal {failure.signal_name()}"
        print(f"error: {failed.name} failed on rank {rank} with {how} (its message is above)", file=sys.stderr)
        return failure.exitcode if failure.exitcode > 0 else 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(torchrun())
