"""Training utilities: distributed set-up, schedules, checkpoints, logging (docs/method.md, section 6)."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import socket
import subprocess
import threading
import time
from collections import defaultdict, deque

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from models.pretrained import load_checkpoint
from preprocessing import files
from preprocessing.files import pid_alive
from preprocessing.runner import version

__version__ = version()  # the installed project's (pyproject.toml), as `--version` prints it

# ============ command line ============


def bool_flag(s: str) -> bool:
    """Parse 'True'/'False' style values, as DINO's flags do (`--use_fp16 False`)."""
    if s.lower() in {"off", "false", "0", "no"}:
        return False
    if s.lower() in {"on", "true", "1", "yes"}:
        return True
    raise argparse.ArgumentTypeError(f"invalid value for a boolean flag: {s!r}")


def git_sha() -> str:
    here = os.path.dirname(os.path.abspath(__file__))

    def run(cmd):
        return subprocess.check_output(cmd, cwd=here, stderr=subprocess.DEVNULL).decode().strip()

    try:
        sha = run(["git", "rev-parse", "HEAD"])
        dirty = "has uncommitted changes" if run(["git", "status", "--porcelain", "--untracked-files=no"]) else "clean"
        return f"sha: {sha}, status: {dirty}"
    except (OSError, subprocess.CalledProcessError):
        return "sha: unknown (not a git checkout)"


def machine() -> str:
    """The machine line kept beside every figure: architecture, processor model, CPUs, torch and
    GPU. The processor model matters: the same code and seed on another x86 CPU can round
    differently (its vector units pick other kernels), so two runs' weights then differ."""
    import platform

    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()} ({model or 'processor unknown'}), {os.cpu_count()} CPUs, torch {torch.__version__}, {gpu}"


# ============ distributed ============


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


# Float unary functions that ATen may hand to MKL's vector math library on x86 CPUs.
VECTOR_MATH_FUNCTIONS = (
    "sqrt", "rsqrt", "exp", "expm1", "log", "log2", "log10", "log1p", "sin", "cos", "tan", "tanh",
    "sinh", "cosh", "asin", "acos", "atan", "erf", "erfc", "erfinv", "lgamma", "sigmoid", "reciprocal",
)  # fmt: skip


def settle_vector_math() -> None:
    """Call each CPU vector math function once on one thread, then once across all intra-op
    threads, before any training arithmetic. MKL's vector math chooses its code path on first
    use; a first use split across threads can leave one thread's half a few ulps off, and a
    resumed run would then not be bit-identical to an uninterrupted one on the CPU
    (docs/reliability.md)."""
    small, large = torch.full((64,), 0.5), torch.full((1 << 15,), 0.5)
    for name in VECTOR_MATH_FUNCTIONS:
        fn = getattr(torch, name)
        fn(small)
        fn(large)


def init_distributed_mode(args: argparse.Namespace) -> torch.device:
    """Join the process group if launched by torchrun (env://) or SLURM; otherwise run as one
    process without torch.distributed. NCCL on CUDA, gloo on CPU. Sets args.rank,
    args.world_size, args.gpu and returns the device."""
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        args.rank, args.world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", 1)) > 1:
        args.rank, args.world_size = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
        local_rank = int(os.environ.get("SLURM_LOCALID", 0))
        os.environ.setdefault("MASTER_PORT", "29500")
        if "MASTER_ADDR" not in os.environ:
            raise RuntimeError("under SLURM set MASTER_ADDR to the first node's host name")
    else:
        args.rank, args.world_size, local_rank = 0, 1, 0
    if use_cuda:
        args.gpu = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(args.gpu)
        device = torch.device("cuda", args.gpu)
    else:
        args.gpu = None
        device = torch.device("cpu")
    if args.world_size > 1:
        backend = "nccl" if use_cuda else "gloo"
        timeout = datetime.timedelta(minutes=30)
        if args.dist_url == "env://":
            # A store prefix per torchrun restart: after an elastic restart the workers must not
            # find the dead group's keys (gloo would try to reach the killed peers).
            agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            store = dist.TCPStore(
                os.environ["MASTER_ADDR"],
                int(os.environ["MASTER_PORT"]),
                args.world_size,
                is_master=args.rank == 0 and not agent_store,
                timeout=timeout,
            )
            prefix = f"desd/restart{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
            dist.init_process_group(
                backend, store=dist.PrefixStore(prefix, store), world_size=args.world_size, rank=args.rank, timeout=timeout
            )
        else:
            dist.init_process_group(backend, init_method=args.dist_url, world_size=args.world_size, rank=args.rank, timeout=timeout)
        dist.barrier()
    setup_for_distributed(args.rank == 0, args.rank)
    print(f"| process {args.rank} of {args.world_size} on {device}", flush=True, force=True)
    return device


def setup_for_distributed(is_master: bool, rank: int) -> None:
    """Only the main process prints, as DINO's training does. The other ranks still print their
    warnings and errors (lines starting with WARNING or ERROR) and whatever is printed with
    `force=True`, prefixed with their rank."""
    import builtins

    original = getattr(builtins, "_desd_print", builtins.print)
    builtins._desd_print = original

    def print(*args, **kwargs):  # noqa: A001 - replaces the built-in on purpose
        force = kwargs.pop("force", False)
        if is_master:
            original(*args, **kwargs)
        elif force or (args and str(args[0]).lstrip().upper().startswith(("WARNING", "ERROR"))):
            original(f"[rank {rank}]", *args, **kwargs)

    builtins.print = print


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if is_dist():
        t = t.clone()
        dist.all_reduce(t)
        t /= get_world_size()
    return t


# ============ seeds ============

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's output function: a bijection of 64-bit words that mixes every bit."""
    z = z + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def hashed_seed(*keys):
    """A 64-bit seed from integer keys such as (seed, rank, epoch, iteration), by chained
    mixing: for fixed leading keys the last one maps to seeds one to one, and different key
    tuples collide only by chance (about 2^-64 a pair), unlike a linear formula, under which
    rank r at step t gets rank 0's seed of step t + r * stride. Keys may be numpy arrays (one
    seed per element); plain integers give a Python int for torch.Generator.manual_seed."""
    with np.errstate(over="ignore"):
        h = np.uint64(0)
        for key in keys:
            h = _mix64(h ^ np.asarray(key).astype(np.int64).astype(np.uint64))
    return int(h) if np.ndim(h) == 0 else h


# ============ schedules ============


def cosine_scheduler(
    base_value: float, final_value: float, epochs: int, niter_per_ep: int, warmup_epochs: int = 0, start_warmup_value: float = 0.0
) -> np.ndarray:
    """One value per iteration: linear warm-up from start_warmup_value, then a half cosine
    from base_value to final_value."""
    warmup_iters = min(warmup_epochs, epochs) * niter_per_ep  # a run shorter than its warm-up is all warm-up
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_iters > 0 else np.array([])
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / max(len(iters), 1)))
    schedule = np.concatenate((warmup, schedule))
    assert len(schedule) == epochs * niter_per_ep
    return schedule


# ============ optimisation ============


def get_params_groups(model: nn.Module) -> list[dict]:
    """Weight decay on weights only: biases and 1-D parameters (norms) are not regularised."""
    regularized, not_regularized = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(".bias") or param.ndim == 1:
            not_regularized.append(param)
        else:
            regularized.append(param)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


class LARS(torch.optim.Optimizer):
    """SGD with layer-wise adaptive rate scaling; 1-D parameters are neither decayed nor scaled."""

    def __init__(self, params, lr=0, weight_decay=0, momentum=0.9, eta=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if p.ndim != 1:
                    dp = dp.add(p, alpha=group["weight_decay"])
                    param_norm, update_norm = torch.norm(p), torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(param_norm > 0.0, torch.where(update_norm > 0, (group["eta"] * param_norm / update_norm), one), one)
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(dp)
                p.add_(mu, alpha=-group["lr"])


def clip_gradients(model: nn.Module, clip: float) -> None:
    """Clip each parameter's gradient to norm `clip` (DINO's per-tensor clipping), on the
    device: no value is read back to the host."""
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_((clip / (p.grad.norm(2) + 1e-6)).clamp(max=1.0))


def cancel_gradients_last_layer(epoch: int, model: nn.Module, freeze_last_layer: int) -> None:
    """Drop the prototypes' gradients during the first `freeze_last_layer` epochs."""
    if epoch >= freeze_last_layer:
        return
    for name, p in model.named_parameters():
        if "last_layer" in name:
            p.grad = None


@torch.no_grad()
def update_teacher(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """EMA of the student's parameters into the teacher's, paired by name (the teacher has a
    subset: the backbone and the last-stage head). Names missing from the student raise."""
    student_params = dict(student.named_parameters())
    t_params, s_params = [], []
    for name, p in teacher.named_parameters():
        if name not in student_params:
            raise KeyError(f"teacher parameter {name!r} has no student counterpart")
        t_params.append(p.data)
        s_params.append(student_params[name].detach().data)
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1 - momentum)


# ============ checkpoints ============


def with_prefix(state: dict, prefix: str = "module.") -> dict:
    """Keys as the reference saves them from DDP-wrapped models, whatever the world size."""
    return {k if k.startswith(prefix) else prefix + k: v for k, v in state.items()}


def strip_prefix(state: dict, prefix: str = "module.") -> dict:
    return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in state.items()}


def save_atomic(obj: dict, path: str, keep_previous: bool = False) -> None:
    """torch.save through `files.write_atomic`, flushed to disk. With `keep_previous` the file
    being replaced is kept as `<stem>.prev<ext>`, a fallback should `path` be damaged later,
    unless it failed to load in this process: a damaged file never replaces a good backup."""
    rotate = keep_previous and os.path.abspath(path) not in UNREADABLE
    files.write_atomic(path, lambda tmp: torch.save(obj, tmp), keep_previous=rotate, fsync=True)


def detached_copy(obj):
    """`obj` (nested dicts, lists and tuples) with every tensor copied to host memory, so that
    later in-place updates of the originals cannot reach it."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: detached_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(detached_copy(v) for v in obj)
    return obj


class CheckpointWriter:
    """Writes checkpoints on a thread while training goes on. `write` waits for the write before
    it, copies the state to host memory (the next steps cannot change what is written: a copy
    takes a fraction of the time torch.save and fsync do) and writes it through `save_atomic`
    to each of its paths. `wait` returns once the last write is done and raises its error, as
    the write itself would have. A process that stops still finishes the write under way (the
    thread is not a daemon); one that is killed leaves the last complete checkpoint, as a
    synchronous write would."""

    def __init__(self) -> None:
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def write(self, state: dict, paths: list[tuple[str, bool]]) -> None:
        """`paths`: (path, keep_previous) pairs, written in that order."""
        self.wait()
        snapshot = detached_copy(state)

        def run() -> None:
            try:
                for path, keep_previous in paths:
                    save_atomic(snapshot, path, keep_previous=keep_previous)
            except BaseException as err:  # raised in the training thread by `wait`
                self.error = err

        self.thread = threading.Thread(target=run, name="checkpoint-writer")
        self.thread.start()

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error


def save_atomic_json(obj, path: str) -> None:
    """Indented JSON through `files.write_atomic`, flushed to disk."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(json.dumps(obj, indent=2))

    files.write_atomic(path, write, fsync=True)


# checkpoint files that failed to load in this process: never rotated into `.prev` (see save_atomic)
UNREADABLE: set[str] = set()


def checkpoint_position(ckpt: dict) -> tuple[int, int]:
    """(epoch, iteration) at which a checkpoint resumes: how far its run had got."""
    return int(ckpt.get("epoch", 0)), int(ckpt.get("iteration", 0))


def load_latest_checkpoint(output_dir: str, name: str = "checkpoint.pth") -> tuple[str | None, dict | None]:
    """The readable checkpoint of a run that got furthest, by its stored (epoch, iteration),
    whatever the file times (a folder copied without them, or restored from a backup, has
    meaningless ones): `name`, its `.prev` copy or a numbered one. Each file's position is read
    through a memory map first, so only the chosen one is loaded whole. Unreadable (truncated,
    corrupt) files are reported, remembered in UNREADABLE and skipped; (None, None) when there
    is no checkpoint at all."""
    if not os.path.isdir(output_dir):
        return None, None
    stem = os.path.splitext(name)[0]
    candidates = [os.path.join(output_dir, f) for f in os.listdir(output_dir) if f.startswith(stem) and f.endswith(".pth")]
    positions = []
    for path in candidates:
        try:
            positions.append((checkpoint_position(load_checkpoint(path, mmap=True)), path))
        except (RuntimeError, KeyError) as err:
            UNREADABLE.add(os.path.abspath(path))
            print(f"WARNING: {err}; trying the others", flush=True)
    # furthest first; at equal positions the main file, then `.prev`, then numbered ones
    rank = {name: 0, f"{stem}.prev.pth": 1}
    positions.sort(key=lambda p: (-p[0][0], -p[0][1], rank.get(os.path.basename(p[1]), 2), p[1]))
    for _, path in positions:
        try:
            return path, load_checkpoint(path)
        except RuntimeError as err:
            UNREADABLE.add(os.path.abspath(path))
            print(f"WARNING: {err}; trying an older checkpoint", flush=True)
    if candidates:
        raise RuntimeError(f"no readable checkpoint in {output_dir!r} (tried {[os.path.basename(c) for c in candidates]})")
    return None, None


def setting_differences(stored, args, names) -> list[str]:
    """ "name stored (this run: current)" for each of `names` that the stored arguments of an
    earlier run (a dict or a Namespace) hold with another value than `args`: the answer to "is
    this the same run?" for both trainers. Sequences compare by value (a stored list equals a
    tuple, 1 equals 1.0); a name the earlier run did not store is not compared."""
    stored = stored if isinstance(stored, dict) else vars(stored)
    current = args if isinstance(args, dict) else vars(args)

    def norm(v):
        return [float(x) if isinstance(x, int | float) and not isinstance(x, bool) else x for x in v] if isinstance(v, list | tuple) else v

    return [
        f"{k} {norm(stored[k])} (this run: {norm(current.get(k))})"
        for k in names
        if k in stored and norm(stored[k]) != norm(current.get(k))
    ]


def restore(ckpt: dict, path: str, run_variables: dict | None = None, **objects) -> None:
    """Restore each named object (`student=student, optimizer=opt, ...`) from a loaded
    checkpoint by its state_dict, and fill `run_variables` (epoch, iteration) from it."""
    for key, obj in objects.items():
        if obj is None:
            continue
        if key not in ckpt:
            raise KeyError(f"checkpoint {path!r} has no {key!r} entry (has {sorted(ckpt)})")
        state = ckpt[key]
        if key in {"student", "teacher"}:
            state = strip_prefix(state)
        obj.load_state_dict(state)
    print(f"=> resumed {', '.join(k for k, o in objects.items() if o is not None)} from {path!r}", flush=True)
    if run_variables is not None:
        for key in run_variables:
            if key in ckpt:
                run_variables[key] = ckpt[key]


class RunLock:
    """An output folder held by one live run: `<folder>/run.lock` names the PID and host of
    its holder. Taken with O_EXCL; a lock whose holder is gone (same host, PID not alive) is
    taken over; one held by a live process, or by another host, is refused with its owner."""

    def __init__(self, folder: str, flag: str = "--output_dir"):
        self.path = os.path.join(folder, "run.lock")
        self.flag = flag  # the command's flag for another folder, named in the refusal
        self.held = False

    def acquire(self) -> RunLock:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner.get("pid") == os.getpid() and owner.get("host") == me["host"]:
                    self.held = True  # this process already holds it
                    return self
                if owner.get("host") == me["host"] and not pid_alive(int(owner.get("pid", -1))):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(self.path)  # its run was killed: take over
                    continue
                raise RuntimeError(
                    f"{os.path.dirname(self.path)!r} is in use by another run (PID {owner.get('pid')} on {owner.get('host')}, "
                    f"since {owner.get('started')}); use another {self.flag}, or delete {self.path!r} if that run is gone"
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise RuntimeError(f"could not take the lock {self.path!r}")

    def _owner(self) -> dict:
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def release(self) -> None:
        if self.held and self._owner().get("pid") == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)
        self.held = False


@contextlib.contextmanager
def output_folder(folder: str, flag: str = "--output_dir", main: bool = True):
    """Hold `folder` for a run (on the main process; elsewhere nothing): checked for writing
    before the lock (files.prepare_output_folder), locked (one live run a folder), and the
    console teed into `<folder>/console.log` while the run lasts."""
    if not main:
        yield
        return
    files.prepare_output_folder(folder, flag)
    lock = RunLock(folder, flag=flag).acquire()
    try:
        with console_log(folder):
            yield
    finally:
        lock.release()


class _Tee:
    """A console stream that also writes into a log file (progress bars, redrawn with \r, left out)."""

    def __init__(self, stream, log):
        self.stream, self.log = stream, log

    def write(self, text: str) -> int:
        if "\r" not in text and not self.log.closed:
            self.log.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()
        if not self.log.closed:
            self.log.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


@contextlib.contextmanager
def console_log(folder: str):
    """Tee stdout and stderr into `<folder>/console.log` (appended, one header line a run)."""
    import sys

    with open(os.path.join(folder, "console.log"), "a", buffering=1) as log:
        log.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(sys.argv)}\n")
        out, err = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(out, log), _Tee(err, log)
        try:
            yield
        finally:
            sys.stdout, sys.stderr = out, err


# ============ logging ============


class SmoothedValue:
    """A series of values with a windowed median and a global average."""

    def __init__(self, window_size: int = 20, fmt: str = "{global_avg:.4g}"):
        self.deque: deque = deque(maxlen=window_size)
        self.total, self.count, self.fmt = 0.0, 0, fmt

    def update(self, value: float, n: int = 1) -> None:
        self.deque.append(value)
        self.count += n
        self.total += value * n

    @property
    def median(self) -> float:
        return float(np.median(self.deque)) if self.deque else math.nan

    @property
    def global_avg(self) -> float:
        return self.total / max(self.count, 1)

    def __str__(self) -> str:
        return self.fmt.format(median=self.median, global_avg=self.global_avg)


class MetricLogger:
    """Accumulate named values and print a progress line with the ETA every `print_freq` steps."""

    def __init__(self, delimiter: str = "  "):
        self.meters: dict[str, SmoothedValue] = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, **kwargs) -> None:
        for k, v in kwargs.items():
            self.meters[k].update(float(v))

    def __str__(self) -> str:
        return self.delimiter.join(f"{name} {meter}" for name, meter in self.meters.items())

    def log_every(self, iterable, total: int, print_freq: int, header: str = "", later: int = 0):
        """Yield from `iterable`, timing each step and the wait for its data (`data_time`). The
        progress line's ETA covers the whole run: these `total` steps and `later` ones after."""
        start = time.time()
        end = time.time()
        self.step_time = SmoothedValue(fmt="{global_avg:.4f}")
        self.data_time = SmoothedValue(fmt="{global_avg:.4f}")
        width = len(str(total))
        for i, obj in enumerate(iterable):
            self.data_time.update(time.time() - end)
            yield obj
            self.step_time.update(time.time() - end)
            end = time.time()
            if is_main_process() and (i % print_freq == 0 or i == total - 1):
                eta = datetime.timedelta(seconds=int(self.step_time.global_avg * (total - i - 1 + later)))
                print(
                    f"{header} [{i:{width}d}/{total}]  {self}  {self.step_time.global_avg:.3f} s/it  data {self.data_time.global_avg:.3f} s"
                    f"  run eta {eta}",
                    flush=True,
                )
        if is_main_process():
            spent = datetime.timedelta(seconds=int(time.time() - start))
            print(f"{header} total time: {spent} ({(time.time() - start) / max(total, 1):.3f} s / it)", flush=True)


def strict_json(value):
    """NaN and infinities (an absent class's score, say) as None, nested, for strict JSON."""
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def append_json_line(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def drop_epochs_from(log_path: str, epoch: int) -> int:
    """Remove log.txt's lines of epochs `epoch` and later (an epoch is logged as its checkpoint is
    being written: a run stopped before that write completed redoes the epoch and logs it
    again); returns how many went. Lines that are not JSON records stay."""
    if not os.path.exists(log_path):
        return 0
    with open(log_path) as f:
        lines = f.readlines()

    def later(line: str) -> bool:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            return False
        return isinstance(record, dict) and isinstance(record.get("epoch"), int) and record["epoch"] >= epoch

    kept = [line for line in lines if not later(line)]

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.writelines(kept)

    if len(kept) < len(lines):
        files.write_atomic(log_path, write, fsync=True)
    return len(lines) - len(kept)


# ============ curves ============

PRETRAIN_PANELS = [
    ("loss", ["train_loss"]),
    ("per-stage loss", ["train_stage1", "train_stage2", "train_stage3", "train_stage4"]),
    ("teacher entropy", ["train_teacher_entropy"]),
    ("view retrieval (top-1)", ["train_retrieval"]),
    (
        "KL, teacher to student (loss minus entropy)",
        ["train_kl", "train_kl_stage1", "train_kl_stage2", "train_kl_stage3", "train_kl_stage4"],
    ),
    ("learning rate", ["train_lr"]),
    ("teacher temperature", ["train_teacher_temp"]),
]


def read_log(path: str) -> list[dict]:
    """The JSON lines of a log.txt; a line cut short by a crash is skipped."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def panels_for(records: list[dict]) -> list[tuple[str, list[str]]]:
    keys = set().union(*records) if records else set()
    if "train_stage1" in keys:
        return [(title, [k for k in ks if k in keys]) for title, ks in PRETRAIN_PANELS if any(k in keys for k in ks)]
    dice = sorted(k for k in keys if k.startswith("dice_")) + (["mean_dice"] if "mean_dice" in keys else [])
    return [(t, ks) for t, ks in [("loss", ["train_loss"]), ("learning rate", ["lr"]), ("Dice", dice)] if ks]


def plot_logs(paths: list[str], out: str, labels: list[str] | None = None) -> str:
    """Draw the runs' curves into `out` (PNG), written under a temporary name then renamed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [read_log(p) for p in paths]
    labels = labels or [os.path.basename(os.path.dirname(os.path.abspath(p))) or p for p in paths]
    panels = panels_for([r for run in runs for r in run])
    cols = min(3, max(1, len(panels)))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.3 * cols, 3.0 * rows), squeeze=False)
    styles = ["-", "--", ":", "-."]
    for ax, (title, keys) in zip(axes.flat, panels):
        for n, (run, label) in enumerate(zip(runs, labels)):
            for k, key in enumerate(keys):
                points = [(r.get("epoch", i), r[key]) for i, r in enumerate(run) if isinstance(r.get(key), int | float)]
                if points:
                    name = label if len(keys) == 1 else f"{label} {key.replace('train_', '').replace('dice_', '')}"
                    ax.plot(*zip(*points), styles[n % len(styles)], color=f"C{k if len(keys) > 1 else n}", label=name, marker=".")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        if title == "learning rate" and any(v > 0 for line in ax.get_lines() for v in line.get_ydata()):
            ax.set_yscale("log")  # a run at lr 0 (a frozen test run) stays linear
        ax.grid(alpha=0.3)
        if len(runs) > 1 or len(keys) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    return save_figure(fig, out, dpi=100)


def save_figure(fig, out: str, dpi: int = 100, rect=None) -> str:
    """A matplotlib figure laid out (within `rect`, (left, bottom, right, top) in figure
    fractions, where given) and written to `out` (PNG) atomically, then closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout(rect=rect)
    try:
        files.write_atomic(out, lambda tmp: fig.savefig(tmp, dpi=dpi))
    finally:
        plt.close(fig)
    return out


def plot_curves(log_path: str, out: str) -> None:
    """Redraw a run's curves.png from its log.txt; a failure to plot only warns."""
    try:
        plot_logs([log_path], out)
    except Exception as err:  # plotting must never stop a run
        print(f"WARNING: could not draw {out}: {err}")


class Curves:
    """A run's curves.png, redrawn from its log.txt after an epoch once `every` seconds have
    passed since the last drawing (or the run's start), and always after the last epoch. A
    drawing takes seconds: an epoch of a real run takes minutes and gets one each, a short run
    one at its end."""

    def __init__(self, log_path: str, out: str, every: float = 60.0):
        self.log_path, self.out, self.every = log_path, out, every
        self.last = time.monotonic()

    def update(self, last_epoch: bool = False) -> None:
        if last_epoch or time.monotonic() - self.last >= self.every:
            plot_curves(self.log_path, self.out)
            self.last = time.monotonic()


def tensorboard_writer(folder: str):
    """A TensorBoard SummaryWriter on `folder`, or None (with a warning) without the package."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        print(f"WARNING: --tensorboard needs the tensorboard package ({err}); the scalars stay in log.txt")
        return None
    return SummaryWriter(folder)
