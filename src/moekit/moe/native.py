"""Native CPU kernels for the experts at inference, compiled on first use.

`csrc/experts.c` runs every expert of a layer in one call: the sort by expert, the products, the
activation and the weighted combine, with no autograd. Two regimes (see its header):

- a few rows per expert (decode-size batches, up to `MAX_MEAN_ROWS` on average): the work is
  reading the chosen experts' weights, which MKL's few-row GEMMs stream at about half the machine's
  read bandwidth; register-blocked loops stream each expert's weights front to back;
- many rows per expert (prefill, batches): the work is arithmetic; each thread takes an equal share
  of the sorted rows and runs its experts' products on its own with the BLAS's sgemm (the one torch
  links, called through a pointer), the gathers, activation and combine fused around them while the
  blocks are in cache. Taken only where that sgemm is found and passes a check on a small problem
  (`blas_sgemm`).

Two entries: `sorted_rows` takes rows already sorted by a dispatcher, `routed` takes a routing's
assignments as they come and sorts them by expert in C (the MoE layer's inference path,
`ExpertBank.forward_routed`). `docs/benchmarks.md` ("Native expert kernels") has what they changed in
the layer cells and in generation.

The source ships with the package and is compiled by the system's C compiler (`$CC`, else `cc`)
with `-O3 -march=native -fopenmp` into a cache folder (`$MOEKIT_CACHE_DIR`, else
`~/.cache/moekit`; a private temporary folder if that cannot be written), once per source,
compiler and CPU; a library built elsewhere is never loaded.
The build writes a temporary file and renames it, so processes starting together (torchrun) cannot
load a half-written library. Linked against libgomp by soname, the kernels run on the OpenMP
runtime torch has already loaded: torch's own thread pool.

They apply to inference (no autograd) on CPU, float32, contiguous weights, the activations below,
Linux on x86-64 with AVX2 and FMA; everything else, a missing compiler or a failed build takes the
torch path (the same results up to float32 rounding). MOEKIT_NATIVE=0 in the environment turns both
off, MOEKIT_NATIVE_MANY=0 the many-row regime alone.
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

SOURCE = Path(__file__).with_name("csrc") / "experts.c"
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
# 64 rows 0.86-0.93x. Past it the many-row regime (per-thread sgemm) runs.
MAX_MEAN_ROWS = 32
# The many-row regime's blocks: rows of one expert per pair of sgemm calls, sized so that a block's
# [rows, H] hidden activations take about this many bytes (between 16 and 1024 rows).
BLOCK_HIDDEN_BYTES = 16 << 20
# The kernel's work memory (per thread: its [rows, D] outputs and a few rows of hidden activations) is
# kept between calls (memory.scratch); past this size the torch path, with its fixed-size row blocks,
# runs instead (the layer's shapes here use 1-4 MiB; a DeepSeek-V3-sized layer at 64 tokens ~30 MiB).
# The many-row regime keeps a [T, D] accumulator per thread but the first, and its blocks' buffers:
# 39 MiB for the Mixtral-like layer at 4096 tokens on two threads (1024-row blocks).
MAX_WORK_BYTES = 64 << 20
ENABLED = os.environ.get("MOEKIT_NATIVE", "1") != "0"
MANY_ROWS = os.environ.get("MOEKIT_NATIVE_MANY", "1") != "0"


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
    lib.moekit_many_rows.argtypes = [
        p,
        p,
        p,
        p,
        i64,
        p,
        p,
        p,
        p,
        i64,
        i64,
        i32,
        i32,
        i64,
        i64,
        p,
        p,
        i32,
        p,
        i64,
    ]
    lib.moekit_many_rows.restype = None
    lib.moekit_routed.argtypes = [p, p, p, i64, i64, p, p, p, p, i64, i64, i32, i32, i64, p, p, i32, p, i64]
    lib.moekit_routed.restype = i32
    lib.moekit_few_rows_work_floats.argtypes = [i64, i64, i64, i32, i32]
    lib.moekit_few_rows_work_floats.restype = i64
    lib.moekit_many_rows_work_floats.argtypes = [i64, i64, i64, i32, i32, i64]
    lib.moekit_many_rows_work_floats.restype = i64
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


def blas_sgemm() -> int | None:
    """The address of the BLAS sgemm torch links (Fortran `sgemm_`), or None: not found, or it gave
    a wrong product in the many-row kernel on a small problem checked against torch (the result is
    kept for the process)."""
    if "sgemm" in _state:
        return _state["sgemm"]  # type: ignore[return-value]
    with _lock:
        if "sgemm" not in _state:
            _state["sgemm"] = _find_sgemm()
    return _state["sgemm"]  # type: ignore[return-value]


def _find_sgemm() -> int | None:
    if library() is None:
        return None
    address = None
    for name in (str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"), None):
        try:
            address = ctypes.cast(ctypes.CDLL(name).sgemm_, ctypes.c_void_p).value
            break
        except (OSError, AttributeError):
            continue
    if address is None:
        log.info("no BLAS sgemm found in torch: the native many-row kernel is off")
        return None
    if not sgemm_works(address):
        log.warning(
            "torch's BLAS sgemm gave a wrong product in the native kernel: the many-row kernel is off"
        )
        return None
    return address


def sgemm_works(address: int) -> bool:
    """Whether the many-row kernel with the sgemm at `address` gets a small problem right (three
    experts, blocks of two rows, repeated tokens) against float64 products in torch."""
    gen = torch.Generator().manual_seed(0)
    tokens, dim, hidden, num_experts, top_k = 5, 12, 10, 3, 2
    x = torch.randn(tokens, dim, generator=gen)
    w_in = torch.randn(num_experts, dim, 2 * hidden, generator=gen)
    w_out = torch.randn(num_experts, hidden, dim, generator=gen)
    expert_idx = torch.tensor([0, 1, 1, 2, 0, 2, 1, 0, 2, 1])
    weight = torch.rand(tokens * top_k, generator=gen)
    expected = torch.zeros(tokens, dim, dtype=torch.float64)
    for a, e in enumerate(expert_idx.tolist()):
        h = x[a // top_k].double() @ w_in[e].double()
        expected[a // top_k] += (
            weight[a] * (torch.nn.functional.silu(h[:hidden]) * h[hidden:]) @ w_out[e].double()
        )
    bank = Experts(w_in, w_out, None, None, "swiglu", True)
    rows = _routed_rows(expert_idx, weight, top_k, num_experts)
    out, status = _run("moekit_routed", x, rows, len(expert_idx), bank, (address, 2))
    return status == 0 and torch.allclose(out.double(), expected, rtol=1e-4, atol=1e-4)


def status() -> str:
    """One line for reports (benchmarks): whether the kernels are in use, and if not, why."""
    if not ENABLED:
        return "off (MOEKIT_NATIVE=0)"
    lib = library()
    if lib is None:
        return "off (no compiler, a failed build, or not Linux x86-64 with AVX2 and FMA)"
    if not MANY_ROWS:
        many = "many-row regime off (MOEKIT_NATIVE_MANY=0)"
    elif blas_sgemm() is None:
        many = "many-row regime off (no usable BLAS sgemm)"
    else:
        many = "both regimes"
    return f"on ({Path(lib._name).name}, {many})"


def applies(x: Tensor, experts: Experts, num_rows: int, num_groups: int, strategy: str = "auto") -> bool:
    """Whether a kernel can run a call with `num_rows` rows in `num_groups` non-empty expert
    groups (without building anything when it cannot). It stands in for the grouped products'
    strategy "auto" only: a pinned strategy (tests, benchmarks) runs as asked."""
    tensors = [t for t in (x, *experts[:4]) if t is not None]
    if not (
        ENABLED
        and strategy == "auto"
        and (experts.activation, experts.is_glu) in ACTIVATIONS
        and num_groups > 0
        and all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors)
        and not torch.compiler.is_compiling()  # traced tensors have no memory to hand to C
        and library() is not None
    ):
        return False
    many = _many(num_rows, num_groups)
    if many is False:
        return False
    return _work_floats(x, num_rows, experts, many) * 4 <= MAX_WORK_BYTES


def _many(num_rows: int, num_groups: int) -> tuple[int, int] | None | bool:
    """The regime of a call: None for few rows, (sgemm, block rows) for many, False for neither
    (many rows and no usable sgemm)."""
    if num_rows <= MAX_MEAN_ROWS * num_groups:
        return None
    address = blas_sgemm() if MANY_ROWS else None
    return False if address is None else (address, 0)


def _work_floats(x: Tensor, num_rows: int, experts: Experts, many: tuple[int, int] | None) -> int:
    """Floats of work memory a call of `num_rows` rows needs (the kernel's own count)."""
    return _kernel_work_floats(
        x.shape[0],
        num_rows,
        x.shape[-1],
        experts.w_out_EFD.shape[1],
        experts.is_glu,
        torch.get_num_threads(),
        many is not None,
    )


def _block_rows(num_rows: int, hidden_in: int, threads: int) -> int:
    per_thread = -(-num_rows // max(threads, 1))
    return max(1, min(per_thread, max(16, min(1024, BLOCK_HIDDEN_BYTES // (4 * hidden_in)))))


@functools.lru_cache(maxsize=1024)
def _kernel_work_floats(
    tokens: int, num_rows: int, dim: int, hidden: int, is_glu: bool, threads: int, many: bool
) -> int:
    # cached: `applies` and the call itself both ask, once per layer call
    if not many:
        return library().moekit_few_rows_work_floats(num_rows, dim, hidden, int(is_glu), threads)
    rows = _block_rows(num_rows, 2 * hidden if is_glu else hidden, threads)
    return library().moekit_many_rows_work_floats(tokens, dim, hidden, int(is_glu), threads, rows)


def sorted_rows(x_TD: Tensor, token_N: Tensor, weight_N: Tensor, plan: GroupPlan, experts: Experts) -> Tensor:
    """out [T, D] = sum over rows n of weight_N[n] * expert_n(x_TD[token_N[n]]), rows sorted by
    expert as `plan` says (what a dispatcher gives). No autograd; call where `applies(...)`."""
    token_N = token_N.to(torch.int64).contiguous()
    weight_N = weight_N.to(torch.float32).contiguous()
    bounds_G3 = torch.tensor(plan.bounds, dtype=torch.int64)
    rows = (token_N.data_ptr(), weight_N.data_ptr(), bounds_G3.data_ptr(), bounds_G3.shape[0])
    num_rows = token_N.shape[0]
    many = _many(num_rows, bounds_G3.shape[0])
    entry = "moekit_few_rows" if many is None else "moekit_many_rows"
    return _run(entry, x_TD, rows, num_rows, experts, many)[0]


def routed(x_TD: Tensor, expert_idx_A: Tensor, weight_A: Tensor, top_k: int, experts: Experts) -> Tensor:
    """`sorted_rows` straight from a token-choice routing: assignment a (token-major, T * top_k of
    them) sends token a // top_k to expert expert_idx_A[a] with weight weight_A[a] -> out [T, D].
    The sort by expert happens in the kernel. No autograd; call where `applies(...)`."""
    expert_idx_A = expert_idx_A.to(torch.int64).contiguous()
    weight_A = weight_A.to(torch.float32).contiguous()
    num_experts, num_rows = experts.w_in_EDH.shape[0], expert_idx_A.shape[0]
    rows = _routed_rows(expert_idx_A, weight_A, top_k, num_experts)
    many = _many(num_rows, min(num_rows, num_experts))
    out, status = _run("moekit_routed", x_TD, rows, num_rows, experts, many)
    if status == -1:
        bad = expert_idx_A[(expert_idx_A < 0) | (expert_idx_A >= num_experts)]
        raise ValueError(f"expert indices {bad.tolist()[:8]} are outside [0, {num_experts})")
    if status != 0:
        raise MemoryError(f"the native expert kernel could not allocate its index arrays ({status})")
    return out


def _routed_rows(expert_idx_A: Tensor, weight_A: Tensor, top_k: int, num_experts: int) -> tuple:
    return (expert_idx_A.data_ptr(), weight_A.data_ptr(), top_k, num_experts)


def _run(
    entry: str, x: Tensor, rows: tuple, num_rows: int, experts: Experts, many: tuple[int, int] | None
) -> tuple[Tensor, int | None]:
    """Call the kernel's `entry` with its row arguments `rows` (after x) and the arguments the
    entries share; `many`: (sgemm, block rows or 0 for the default) for the many-row regime, None
    for few rows -> (out, x's shape: zeros plus the experts' weighted outputs; the entry's status)."""
    lib = library()
    w_in_EDH, w_out_EFD, b_in_EH, b_out_ED, activation, is_glu = experts
    dim, hidden = x.shape[-1], w_out_EFD.shape[1]
    threads = torch.get_num_threads()
    extra: tuple = ()
    if many is not None:
        sgemm, block_rows = many
        block_rows = block_rows or _block_rows(num_rows, w_in_EDH.shape[-1], threads)
        floats = lib.moekit_many_rows_work_floats(x.shape[0], dim, hidden, int(is_glu), threads, block_rows)
        extra = (sgemm, block_rows)
    else:
        floats = _work_floats(x, num_rows, experts, None)
    (work,) = scratch(x, (floats,), pool="native")
    out = x.new_zeros(x.shape)
    shared = (
        w_in_EDH.data_ptr(),
        w_out_EFD.data_ptr(),
        None if b_in_EH is None else b_in_EH.data_ptr(),
        None if b_out_ED is None else b_out_ED.data_ptr(),
        dim,
        hidden,
        int(is_glu),
        ACTIVATIONS[(activation, is_glu)],
        num_rows,
    )
    if entry == "moekit_many_rows":
        shared = (*shared, x.shape[0])  # T: the accumulators' rows
    elif entry == "moekit_routed":
        extra = extra or (None, 0)  # no sgemm: few rows
    status = getattr(lib, entry)(
        x.data_ptr(), *rows, *shared, out.data_ptr(), work.data_ptr(), threads, *extra
    )
    return out, status
