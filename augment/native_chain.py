"""The CPU intensity chain compiled from augment/intensity.c: intensity.apply_intensity's
arithmetic, fused so that each slice goes through every step while it sits in the cache.
A loader worker spends most of its time in this chain; see docs/performance.md.

The library is built on first use with the system C compiler ($CC, else `cc`) into
augment/build/ (or ~/.cache/desd/ where the checkout is read-only): one file per source,
compiler (its file, size and time), flags and CPU, written under a temporary name and renamed, so
processes that start together do not trip over each other. Beside each library, its SHA-256:
a cached library is loaded only while it matches (else it is rebuilt). Where no compiler works, `library()` returns None after
one warning and the torch chain runs instead. DESD_NATIVE=0 turns the library off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings

import torch

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "intensity.c")
# -ffast-math lets the compiler use the C library's vector log and exp; -march=native the
# CPU's widest vectors (the library is built per CPU), dropped where the compiler refuses it
FLAG_SETS = (["-O3", "-ffast-math", "-march=native"], ["-O3", "-ffast-math"])

LINK = "separate link without -ffast-math"  # part of the library's key: older builds set FTZ
_library: ctypes.CDLL | bool | None = None  # None: not tried yet; False: unavailable


def _cpu_features() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor() or platform.machine()


def _compiler_identity(compiler: str) -> tuple:
    """The compiler's resolved file with its size and modification time: a compiler upgraded in
    place gets a new library."""
    path = shutil.which(compiler)
    if path is None:
        return (compiler,)
    st = os.stat(os.path.realpath(path))
    return (os.path.realpath(path), st.st_size, st.st_mtime_ns)


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _intact(path: str) -> bool:
    """Whether the library at `path` is the one built there: its recorded SHA-256 matches."""
    try:
        with open(path + ".sha256") as f:
            return f.read().strip() == _digest(path)
    except OSError:
        return False


def _build() -> str:
    """Path of the compiled library, built if not there yet. Raises OSError or
    subprocess.SubprocessError with the compiler's message."""
    compiler = os.environ.get("CC", "cc")
    with open(SOURCE, "rb") as f:
        source = f.read()
    folders = [os.path.join(os.path.dirname(SOURCE), "build"), os.path.join(os.path.expanduser("~"), ".cache", "desd")]
    errors = []
    for flags in FLAG_SETS:
        key = hashlib.sha256(source + repr((_compiler_identity(compiler), flags, LINK, _cpu_features())).encode()).hexdigest()[:16]
        name = f"intensity-{key}.so"
        for folder in folders:
            if os.path.exists(os.path.join(folder, name)) and _intact(os.path.join(folder, name)):
                return os.path.join(folder, name)
        for folder in folders:
            path = os.path.join(folder, name)
            try:
                os.makedirs(folder, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=".intensity-", suffix=".so", dir=folder)
            except OSError as err:
                errors.append(f"{folder}: {err}")
                continue
            os.close(fd)
            obj = tmp[: -len(".so")] + ".o"
            try:
                # compiled with the flags, linked without them: linking with -ffast-math adds
                # start-up code that turns on flush-to-zero for the whole host process
                compile_cmd = [compiler, *flags, "-fPIC", "-c", SOURCE, "-o", obj]
                link_cmd = [compiler, "-shared", obj, "-o", tmp, "-lm"]
                for cmd in (compile_cmd, link_cmd):
                    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
                    if done.returncode != 0:
                        errors.append(f"{' '.join(cmd)}: {done.stderr.strip()[-500:]}")
                        break
                else:
                    digest = _digest(tmp)
                    with open(tmp + ".sha256", "w") as f:
                        f.write(digest)
                    os.replace(tmp + ".sha256", path + ".sha256")  # the record first: a library is never found without it
                    os.replace(tmp, path)
                    return path
                break  # the next flag set
            finally:
                for leftover in (tmp, obj, tmp + ".sha256"):
                    if os.path.exists(leftover):
                        os.remove(leftover)
    raise OSError("could not build " + SOURCE + ": " + "; ".join(errors))


def library() -> ctypes.CDLL | None:
    """The compiled chain, or None where it cannot be built (or DESD_NATIVE=0)."""
    global _library
    if _library is None:
        _library = False
        if os.environ.get("DESD_NATIVE", "1") != "0":
            try:
                lib = ctypes.CDLL(_build())
            except (OSError, subprocess.SubprocessError) as err:
                warnings.warn(f"the compiled intensity chain is unavailable, the slower torch chain runs instead: {err}", stacklevel=2)
            else:
                lib.desd_intensity.restype = ctypes.c_int
                lib.desd_intensity.argtypes = (
                    [ctypes.c_void_p] * 3 + [ctypes.c_int] * 5 + [ctypes.c_void_p] * 8 + [ctypes.c_int, ctypes.c_uint64]
                )
                lib.desd_normal_room.restype = ctypes.c_size_t
                lib.desd_normal_room.argtypes = [ctypes.c_size_t]
                for name in ("desd_normal", "desd_random_words"):
                    getattr(lib, name).restype = None
                    getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint32, ctypes.c_uint64]
                _library = lib
    return _library or None


def _required() -> ctypes.CDLL:
    """The compiled chain; RuntimeError where it is unavailable."""
    lib = library()
    if lib is None:
        raise RuntimeError("the compiled intensity chain is unavailable (see the warning above)")
    return lib


def apply_intensity(
    x: torch.Tensor, params: dict[str, torch.Tensor], noise: torch.Tensor | None, swap_hw: bool = False, key: int = 0
) -> torch.Tensor:
    """intensity.apply_intensity on the CPU with the compiled chain: x (B, D, H, W) float32,
    params as `intensity.draw_intensity_params` returns them, and standard normal noise of x's
    shape, or None to draw it here under `key` (a 64-bit integer; see augment/intensity.c).
    A given noise tensor's memory takes the result: (B, D, H, W), or (B, D, W, H) with
    swap_hw."""
    lib = _required()
    b, d, h, w = x.shape
    units = params["blur_sigma"].shape[1]
    if x.device.type != "cpu" or (noise is not None and noise.device.type != "cpu"):
        raise ValueError(f"the compiled intensity chain runs on the CPU, not on {x.device}")
    if x.dtype != torch.float32 or d % units or (noise is not None and (noise.dtype != torch.float32 or noise.shape != x.shape)):
        raise ValueError(f"expected float32 x and noise of one shape (B, D, H, W) and D a multiple of {units} units")
    x = x.contiguous()
    out = torch.empty(x.shape) if noise is None else noise.contiguous()

    def per_unit(name: str, dtype=torch.float32) -> torch.Tensor:
        return params[name].to(dtype).contiguous()

    args = [
        per_unit("noise_std").view(b),
        per_unit("blur_on", torch.uint8),
        per_unit("blur_sigma"),
        per_unit("brightness_mul"),
        per_unit("brightness_add"),
        per_unit("contrast"),
        per_unit("gamma"),
        params["gamma_on"][:, 0].to(torch.uint8).contiguous(),  # one flag a view
    ]
    noise_ptr = None if noise is None else out.data_ptr()
    if lib.desd_intensity(x.data_ptr(), noise_ptr, out.data_ptr(), b, d, h, w, units, *(a.data_ptr() for a in args), swap_hw, key):
        raise MemoryError("the compiled intensity chain could not allocate its buffers")
    return out.view(b, d, w, h) if swap_hw else out


def standard_normal(count: int, stream: int, key: int) -> torch.Tensor:
    """The compiled chain's noise for one slice of `count` voxels: its `stream` (the slice's
    index in the batch) under `key`."""
    lib = _required()
    z = torch.empty(lib.desd_normal_room(count))
    lib.desd_normal(z.data_ptr(), count, stream, key)
    return z[:count]


def random_words(n: int, stream: int, key: int) -> torch.Tensor:
    """The raw 32-bit words under the noise (n a multiple of 8), as int64."""
    lib = _required()
    words = torch.empty(n, dtype=torch.int32)
    lib.desd_random_words(words.data_ptr(), n, stream, key)
    return words.to(torch.int64) & 0xFFFFFFFF
