"""A native CPU kernel for the experts at a few tokens, compiled on first use.

At decode-size batches the experts' cost is reading the chosen experts' weights from memory. With
1-8 rows per expert MKL's GEMMs stream a cold weight matrix at about half the machine's read
bandwidth, and the experts take a dozen small calls each. `csrc/few_rows.c` runs every expert of a
layer in one call, each thread streaming whole experts' weights front to back (see its header).
Two entries: `few_rows` takes rows already sorted by a dispatcher, `routed` takes a routing's
assignments as they come and sorts them by expert in C (the MoE layer's inference path at these
sizes, `ExpertBank.forward_routed`). `docs/benchmarks.md` ("Native few-row kernel") has what it changed in the layer cells and in
generation.

The source ships with the package and is compiled by the system's C compiler (`$CC`, else `cc`)
with `-O3 -march=native -fopenmp` into a cache folder (`$MOEKIT_CACHE_DIR`, else
`~/.cache/moekit`; a private temporary folder if that cannot be written), once per source,
compiler and CPU; a library built elsewhere is never loaded.
The build writes a temporary file and renames it, so processes starting together (torchrun) cannot
load a half-written library. Linked against libgomp by soname, the kernel runs on the OpenMP
runtime torch has already loaded: torch's own thread pool.

It applies to inference (no autograd) on CPU, float32, contiguous weights, the activations below,
Linux on x86-64 with AVX2 and FMA, and small groups (`MAX_MEAN_ROWS`); everything else, a missing
compiler or a failed build takes the torch path (the same results up to float32 rounding).
MOEKIT_NATIVE=0 in the environment turns it off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from moekit.moe.grouped import GroupPlan
from moekit.moe.memory import scratch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "few_rows.c"
# (activation, is_glu) -> the kernel's activation code
ACTIVATIONS = {
    ("swiglu", True): 0,
    ("geglu", True): 1,
    ("gpt_oss", True): 2,
    ("relu", False): 3,
    ("gelu", False): 4,
    ("silu", False): 5,
}
# Past a few rows per expert the kernel is bound by arithmetic, not memory (one thread computes at
# ~75 GFLOP/s at 16 rows), and MKL's GEMMs catch up as groups grow. Layer forward with cold weights,
# torch path / native in turns (benchmarks/bench_native.py): 16 rows per expert 1.37-1.70x, 24 rows
# 1.22-1.37x, 32 rows 1.10-1.25x (fine-grained) and 1.17-1.22x (Mixtral-like), 48 rows 0.99-1.01x,
# 64 rows 0.86-0.93x.
MAX_MEAN_ROWS = 32
# The kernel's work memory (per thread: its [rows, D] outputs and a few rows of hidden activations) is
# kept between calls (memory.scratch); past this size the torch path, with its fixed-size row blocks,
# runs instead (the layer's shapes here use 1-4 MiB; a DeepSeek-V3-sized layer at 64 tokens ~30 MiB).
MAX_WORK_BYTES = 64 << 20
ENABLED = os.environ.get("MOEKIT_NATIVE", "1") != "0"


class Experts(NamedTuple):
    """An expert bank's tensors and activation, as the kernel takes them."""

    w_in_EDH: Tensor  # [E, D, H]
    w_out_EFD: Tensor  # [E, F, D]
    b_in_EH: Tensor | None  # [E, H]
    b_out_ED: Tensor | None  # [E, D]
    activation: str
    is_glu: bool


_lock = threading.Lock()
_state: dict[str, object] = {}  # "lib": the loaded library or None once a load was tried


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return ""


def _supported_machine() -> bool:
    flags = _cpu_flags().split()
    return (
        platform.system() == "Linux"
        and platform.machine() in ("x86_64", "AMD64")
        and "avx2" in flags
        and "fma" in flags
    )


def cache_dir() -> Path:
    root = os.environ.get("MOEKIT_CACHE_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "moekit"


def build(source: Path = SOURCE, folder: Path | None = None) -> Path:
    """Compile `source` into a shared library in the cache (if not there yet) -> its path.

    Raises RuntimeError with the compiler's message when the build fails."""
    compiler = os.environ.get("CC", "cc")
    flags = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
    text = source.read_bytes()
    key = hashlib.sha256(
        b"\0".join([text, compiler.encode(), " ".join(flags).encode(), _cpu_flags().encode()])
    )
    if folder is None:
        folder = cache_dir() / "native"
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:  # an unwritable home: a private folder for this process (built each time)
            folder = Path(tempfile.mkdtemp(prefix="moekit-native-"))
    target = folder / f"{source.stem}-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.stem, suffix=".so.tmp", dir=folder)
    os.close(fd)
    try:
        done = subprocess.run(
            [compiler, *flags, str(source), "-o", tmp, "-lm"], capture_output=True, text=True, timeout=300
        )
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed to build {source.name}:\n{done.stderr.strip()}")
        os.replace(tmp, target)
    except (OSError, subprocess.SubprocessError) as err:
        raise RuntimeError(f"could not run the C compiler {compiler!r} for {source.name}: {err}") from err
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _load() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(build()))
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.moekit_few_rows.argtypes = [p, p, p, p, i64, p, p, p, p, i64, i64, i32, i32, i64, p, p, i32]
    lib.moekit_few_rows.restype = None
    lib.moekit_routed.argtypes = [p, p, p, i64, i64, p, p, p, p, i64, i64, i32, i32, i64, p, p, i32]
    lib.moekit_routed.restype = i32
    lib.moekit_few_rows_work_floats.argtypes = [i64, i64, i64, i32, i32]
    lib.moekit_few_rows_work_floats.restype = i64
    return lib


def library() -> ctypes.CDLL | None:
    """The compiled kernel, or None where it cannot be had (reason logged once)."""
    if "lib" in _state:
        return _state["lib"]  # type: ignore[return-value]
    with _lock:
        if "lib" not in _state:
            lib = None
            if not ENABLED:
                log.info("native kernels off (MOEKIT_NATIVE=0)")
            elif not _supported_machine():
                log.info("native kernels need Linux on x86-64 with AVX2 and FMA")
            else:
                try:
                    lib = _load()
                except (RuntimeError, OSError) as err:
                    log.warning("native kernels unavailable, using torch: %s", err)
            _state["lib"] = lib
    return _state["lib"]  # type: ignore[return-value]


def status() -> str:
    """One line for reports (benchmarks): whether the kernel is in use, and if not, why."""
    if not ENABLED:
        return "off (MOEKIT_NATIVE=0)"
    lib = library()
    if lib is None:
        return "off (no compiler, a failed build, or not Linux x86-64 with AVX2 and FMA)"
    return f"on ({Path(lib._name).name})"


def applies(x: Tensor, experts: Experts, num_rows: int, num_groups: int, strategy: str = "auto") -> bool:
    """Whether the kernel can run a call with `num_rows` rows in `num_groups` non-empty expert
    groups (without building anything when it cannot). It stands in for the grouped products'
    strategy "auto" only: a pinned strategy (tests, benchmarks) runs as asked."""
    tensors = [t for t in (x, *experts[:4]) if t is not None]
    return (
        ENABLED
        and strategy == "auto"
        and (experts.activation, experts.is_glu) in ACTIVATIONS
        and num_groups > 0
        and num_rows <= MAX_MEAN_ROWS * num_groups
        and all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors)
        and not torch.compiler.is_compiling()  # traced tensors have no memory to hand to C
        and library() is not None
        and _work_floats(num_rows, x.shape[-1], experts) * 4 <= MAX_WORK_BYTES
    )


def _work_floats(num_rows: int, dim: int, experts: Experts) -> int:
    """Floats of work memory a call of `num_rows` rows needs (the kernel's own count)."""
    return _kernel_work_floats(
        num_rows, dim, experts.w_out_EFD.shape[1], experts.is_glu, torch.get_num_threads()
    )


@functools.lru_cache(maxsize=1024)
def _kernel_work_floats(num_rows: int, dim: int, hidden: int, is_glu: bool, threads: int) -> int:
    # cached: `applies` and the call itself both ask, once per layer call
    return library().moekit_few_rows_work_floats(num_rows, dim, hidden, int(is_glu), threads)


def few_rows(x_TD: Tensor, token_N: Tensor, weight_N: Tensor, plan: GroupPlan, experts: Experts) -> Tensor:
    """out [T, D] = sum over rows n of weight_N[n] * expert_n(x_TD[token_N[n]]), rows sorted by
    expert as `plan` says (what a dispatcher gives). No autograd; call where `applies(...)`."""
    token_N = token_N.to(torch.int64).contiguous()
    weight_N = weight_N.to(torch.float32).contiguous()
    bounds_G3 = torch.tensor(plan.bounds, dtype=torch.int64)
    rows = (token_N.data_ptr(), weight_N.data_ptr(), bounds_G3.data_ptr(), bounds_G3.shape[0])
    return _run("moekit_few_rows", x_TD, rows, token_N.shape[0], experts)[0]


def routed(x_TD: Tensor, expert_idx_A: Tensor, weight_A: Tensor, top_k: int, experts: Experts) -> Tensor:
    """`few_rows` straight from a token-choice routing: assignment a (token-major, T * top_k of them)
    sends token a // top_k to expert expert_idx_A[a] with weight weight_A[a] -> out [T, D]. The sort
    by expert happens in the kernel. No autograd; call where `applies(...)`."""
    expert_idx_A = expert_idx_A.to(torch.int64).contiguous()
    weight_A = weight_A.to(torch.float32).contiguous()
    num_experts = experts.w_in_EDH.shape[0]
    rows = (expert_idx_A.data_ptr(), weight_A.data_ptr(), top_k, num_experts)
    out, status = _run("moekit_routed", x_TD, rows, expert_idx_A.shape[0], experts)
    if status == -1:
        bad = expert_idx_A[(expert_idx_A < 0) | (expert_idx_A >= num_experts)]
        raise ValueError(f"expert indices {bad.tolist()[:8]} are outside [0, {num_experts})")
    if status != 0:
        raise MemoryError(f"the native expert kernel could not allocate its index arrays ({status})")
    return out


def _run(entry: str, x: Tensor, rows: tuple, num_rows: int, experts: Experts) -> tuple[Tensor, int | None]:
    """Call the kernel's `entry` with its row arguments `rows` (after x) and the arguments both
    entries share -> (out, x's shape: zeros plus the experts' weighted outputs; the entry's status)."""
    lib = library()
    w_in_EDH, w_out_EFD, b_in_EH, b_out_ED, activation, is_glu = experts
    dim, hidden = x.shape[-1], w_out_EFD.shape[1]
    threads = torch.get_num_threads()
    (work,) = scratch(x, (_work_floats(num_rows, dim, experts),), pool="native")
    out = x.new_zeros(x.shape)
    status = getattr(lib, entry)(
        x.data_ptr(),
        *rows,
        w_in_EDH.data_ptr(),
        w_out_EFD.data_ptr(),
        None if b_in_EH is None else b_in_EH.data_ptr(),
        None if b_out_ED is None else b_out_ED.data_ptr(),
        dim,
        hidden,
        int(is_glu),
        ACTIVATIONS[(activation, is_glu)],
        num_rows,
        out.data_ptr(),
        work.data_ptr(),
        threads,
    )
    return out, status
