"""Native CPU float32 kernels (the MoE experts, the LM head + loss, attention, RMSNorm, rotary),
compiled on first use.

`csrc/experts.c` runs every expert of a layer in one call: the sort by expert, the products, the
activation and the weighted combine. Two regimes (see its header):

- a few rows per expert (decode-size batches, up to `MAX_MEAN_ROWS` on average, inference): the work
  is reading the chosen experts' weights, which MKL's few-row GEMMs stream at about half the
  machine's read bandwidth; register-blocked loops stream each expert's weights front to back;
- many rows per expert (prefill, batches; and every training call, forward and backward): the work
  is arithmetic; each thread takes an equal share of the sorted rows and runs its experts' products
  on its own with moekit's blocked GEMM (`csrc/gemm.c`: AVX-512 where the CPU has it, about twice
  the MKL inside torch on this AMD machine; the BLAS's sgemm, the one torch links, called through a
  pointer, for products too small for it), the gathers, activation and combine fused around them
  while the blocks are in cache. Taken only where that sgemm is found and passes a check on a small
  problem (`blas_sgemm`).

Entries: `sorted_rows` (rows already sorted by a dispatcher), `routed` (a routing's assignments as
they come, sorted by expert in C: the MoE layer's inference path, `ExpertBank.forward_routed`),
`topk_layer` (at decode sizes the top-k softmax router too, `csrc/router.c`: the whole layer in one
call, kept prepared by `MoE._native_inference`), `sorted_rows` with a hidden to save and
`sorted_rows_backward` (under autograd, `fused.FusedExperts`). The same per-thread GEMM scheme runs
the LM head and its cross-entropy (`csrc/cross_entropy.c`, `linear_cross_entropy`) and scaled
dot-product attention both ways (`csrc/attention.c`, `attention`), `gemm` / `linear` run the
model's linear layers on torch's threads, and one pass per row runs RMSNorm (`csrc/norms.c`) and
rotary (`csrc/rope.c`) both ways. `docs/benchmarks.md` has what each changed.

The sources ship with the package and are compiled together by the system's C compiler (`$CC`, else
`cc`) with `-O3 -march=native -fopenmp` into a cache folder (`$MOEKIT_CACHE_DIR`, else
`~/.cache/moekit`; a private temporary folder if that cannot be written), once per source text,
compiler and CPU; a library built elsewhere is never loaded.
The build writes a temporary file and renames it, so processes starting together (torchrun) cannot
load a half-written library. Linked against libgomp by soname, the kernels run on the OpenMP
runtime torch has already loaded: torch's own thread pool.

They apply on CPU to float32 contiguous tensors (the expert kernels: the activations below; in
training all but GPT-OSS's), on Linux x86-64 with AVX2 and FMA; everything else, a missing compiler
or a failed build takes the torch path (the same results up to float32 rounding). MOEKIT_NATIVE=0 in
the environment turns them all off, MOEKIT_NATIVE_MANY=0 the GEMM-based ones (the many-row regime,
the LM head + loss, attention and the linear layers), MOEKIT_NATIVE_GEMM=blas sends their products to
the BLAS's sgemm.

The decode-size layer call (`TopKLayer`, kept prepared by the MoE layer) checks that it still applies
and calls the kernel in one C++ call where it can: `csrc/decode.cpp`, a Python extension module
compiled on first use by the system's C++ compiler (`$CXX`, else `c++`) against this Python's and
this torch's headers, cached like the library (`decode_module`). On the flushed caches of a decode
step, the same checks in Python took a third of a one-token layer call (docs/benchmarks.md). Where it
cannot be built, or with MOEKIT_DECODE_CALL=0, the checks run in Python and the kernel through ctypes.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.util
import logging
import os
import platform
import subprocess
import sys
import sysconfig
import tempfile
import threading
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from moekit.moe.grouped import GroupPlan
from moekit.moe.memory import scratch

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
# compiled together into one library, with the headers beside them (common.h)
SOURCES = tuple(
    CSRC / f"{name}.c"
    for name in ("experts", "router", "cross_entropy", "norms", "rope", "attention", "gemm")
)


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return ""


# (activation, is_glu) -> the kernel's activation code
ACTIVATIONS = {
    ("swiglu", True): 0,
    ("geglu", True): 1,
    ("gpt_oss", True): 2,
    ("relu", False): 3,
    ("gelu", False): 4,
    ("silu", False): 5,
}
# Past a few rows per expert the few-row kernel is bound by arithmetic, not memory (one thread
# computes at ~75 GFLOP/s at 16 rows), and the many-row regime's GEMMs catch up as groups grow.
# With the BLAS's sgemm (and with moekit's GEMM on AVX2 alone) the two met at 32 rows per expert
# (layer forward, cold weights, in turns: 32 rows 1.00x / 0.98x, 48 rows 1.07x / 1.11x few / many,
# Mixtral-like / fine-grained); with moekit's AVX-512 GEMM (twice as fast) between 12 rows
# (0.82x / 0.88x) and 16 (1.12x / 1.08x). Up to this mean the few-row kernel runs, past it the
# many-row regime (benchmarks/bench_native.py; docs/benchmarks.md).
MAX_MEAN_ROWS = 14 if "avx512f" in _cpu_flags().split() else 32
# The many-row regime's blocks: rows of one expert per round of sgemm calls, as many as fit a
# thread's block buffers in about this many bytes (forward: inputs, hidden, activations, outputs;
# backward: twice as many), between 16 and 1024 rows: the Mixtral-like layer's forward takes 799
# rows, its backward 585, the fine-grained one 1024 both ways.
BLOCK_BYTES = 16 << 20
# The kernel's work memory (per thread: its [rows, D] outputs and a few rows of hidden activations) is
# kept between calls (memory.scratch); past this size the torch path, with its fixed-size row blocks,
# runs instead (the layer's shapes here use 1-4 MiB; a DeepSeek-V3-sized layer at 64 tokens ~30 MiB).
# The many-row regime keeps a [T, D] accumulator per thread but the first, and its blocks' buffers:
# 40 MiB for the Mixtral-like layer at 4096 tokens on two threads; its backward adds one expert's
# partial weight gradients per thread but the first: 51 MiB.
MAX_WORK_BYTES = 64 << 20
# The activations whose derivative the backward has (GPT-OSS's clamped GLU takes torch's path).
TRAINING_ACTIVATIONS = {k: v for k, v in ACTIVATIONS.items() if k[0] != "gpt_oss"}
ENABLED = os.environ.get("MOEKIT_NATIVE", "1") != "0"
MANY_ROWS = os.environ.get("MOEKIT_NATIVE_MANY", "1") != "0"
# "blas": every matrix product of the kernels by the BLAS's sgemm; default: moekit's own GEMM
# (csrc/gemm.c) for all but the smallest products (common.h's gemm_rm; see `use_blas_gemm`)
BLAS_GEMM = os.environ.get("MOEKIT_NATIVE_GEMM", "") == "blas"
# A prepared decode-size layer call checks its guards and runs in one C++ call (csrc/decode.cpp,
# `decode_module`); off (MOEKIT_DECODE_CALL=0), TopKLayer does the same in Python and ctypes.
DECODE_CALL = os.environ.get("MOEKIT_DECODE_CALL", "1") != "0"


class Experts(NamedTuple):
    """An expert bank's tensors and activation, as the kernel takes them."""

    w_in_EDH: Tensor  # [E, D, H]
    w_out_EFD: Tensor  # [E, F, D]
    b_in_EH: Tensor | None  # [E, H]
    b_out_ED: Tensor | None  # [E, D]
    activation: str
    is_glu: bool


_lock = threading.RLock()  # re-entrant: finding the sgemm (under the lock) loads the library
_state: dict[str, object] = {}  # "lib": the loaded library or None once a load was tried


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


def build(
    sources: Path | Sequence[Path] = SOURCES, folder: Path | None = None, extra_flags: Sequence[str] = ()
) -> Path:
    """Compile `sources` (one or several C files, headers beside them) into a shared library in the
    cache (if not there yet) -> its path. `extra_flags` go to the compiler after the usual ones (the
    tests build the AVX2-only GEMM with -mno-avx512f).

    Raises RuntimeError with the compiler's message when the build fails."""
    compiler = os.environ.get("CC", "cc")
    flags = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", *extra_flags]
    return _compile(sources, compiler, flags, ["-lm"], folder)


def build_decode(folder: Path | None = None) -> Path:
    """Compile csrc/decode.cpp (the prepared decode-size layer call, a Python extension module)
    against this Python's and this torch's headers and libraries -> its path in the cache (built once
    per source text, compiler, Python and torch). Raises RuntimeError when the build fails."""
    torch_dir = Path(torch.__file__).parent
    include, lib = torch_dir / "include", torch_dir / "lib"
    flags = [
        "-O2",
        "-std=c++17",
        "-shared",
        "-fPIC",
        "-w",  # (torch's headers warn under C++17)
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        f"-I{sysconfig.get_paths()['include']}",
        f"-I{include}",
        f"-I{include / 'torch' / 'csrc' / 'api' / 'include'}",
    ]
    libs = [f"-L{lib}", "-lc10", "-ltorch_cpu", "-ltorch_python", f"-Wl,-rpath,{lib}"]
    versions = f"{sys.version} {torch.__version__}"
    return _compile(CSRC / "decode.cpp", os.environ.get("CXX", "c++"), flags, libs, folder, versions)


def _compile(
    sources: Path | Sequence[Path],
    compiler: str,
    flags: Sequence[str],
    libs: Sequence[str],
    folder: Path | None,
    versions: str = "",
) -> Path:
    """`compiler flags sources -o LIB libs` into `folder` (default: the cache), named by a hash of
    the sources, their headers, the command, `versions` and the CPU's flags; nothing done where that
    library is there. Written to a temporary file and renamed: processes starting together
    (torchrun) never load a half-written one."""
    sources = [sources] if isinstance(sources, Path) else list(sources)
    names = ", ".join(source.name for source in sources)
    headers = sorted({h for source in sources for h in source.parent.glob("*.h")})
    texts = [f.read_bytes() for f in (*sources, *headers)]
    command = " ".join([compiler, *flags, *libs, versions])
    key = hashlib.sha256(b"\0".join([*texts, command.encode(), _cpu_flags().encode()]))
    stem = sources[0].stem if len(sources) == 1 else "moekit-native"
    if folder is None:
        folder = cache_dir() / "native"
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:  # an unwritable home: a private folder for this process (built each time)
            folder = Path(tempfile.mkdtemp(prefix="moekit-native-"))
    target = folder / f"{stem}-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.stem, suffix=".so.tmp", dir=folder)
    os.close(fd)
    log.info("compiling %s into %s (once: kept there)", names, folder)
    try:
        done = subprocess.run(
            [compiler, *flags, *map(str, sources), "-o", tmp, *libs],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if done.returncode != 0:  # (the message's last lines: a C++ build's can run to thousands)
            message = "\n".join(done.stderr.strip().splitlines()[-40:])
            raise RuntimeError(f"{compiler} failed to build {names}:\n{message}")
        os.replace(tmp, target)
    except (OSError, subprocess.SubprocessError) as err:
        raise RuntimeError(f"could not run the compiler {compiler!r} for {names}: {err}") from err
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _load(path: Path | None = None) -> ctypes.CDLL:
    """The library at `path` (default: built from SOURCES) with its entries' signatures."""
    lib = ctypes.CDLL(str(path or build()))
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    sorted_rows = [p, p, p, p, i64]  # x, token, weight, bounds, G
    bank = [p, p, p, p, i64, i64, i32, i32, i64]  # w_in, w_out, b_in, b_out, D, F, glu, act, N
    lib.moekit_few_rows.argtypes = [*sorted_rows, *bank, p, p, i32]  # out, work, threads
    lib.moekit_few_rows.restype = None
    # T, out, work, threads, sgemm, block rows, h_save
    lib.moekit_many_rows.argtypes = [*sorted_rows, *bank, i64, p, p, i32, p, i64, p]
    lib.moekit_many_rows.restype = None
    # x, expert_idx, weight, top_k, E, ..., out, work, threads, sgemm, block rows
    lib.moekit_routed.argtypes = [p, p, p, i64, i64, *bank, p, p, i32, p, i64]
    lib.moekit_routed.restype = i32
    # x, T, gate, gate bias, K, renormalize, logits, probs, expert_idx, weight, E, ..., (no N) out, work,
    # threads
    lib.moekit_topk_layer.argtypes = [p, i64, p, p, i64, i32, p, p, p, p, i64, *bank[:-1], p, p, i32]
    lib.moekit_topk_layer.restype = i32
    lib.moekit_topk_layer_packed.argtypes = [p, p, p]  # x, out, the other arguments (TopKLayer)
    lib.moekit_topk_layer_packed.restype = i32
    lib.moekit_many_rows_backward.argtypes = [
        *sorted_rows,
        *[p] * 5,  # w_in, w_out, b_out, h_save, grad_out
        *[i64, i64, i32, i32, i64, i64],  # D, F, glu, act, N, T
        *[p] * 6,  # grad_x, grad_weight, grad_w_in, grad_w_out, grad_b_in, grad_b_out
        *[p, i32, p, i64],  # work, threads, sgemm, block rows
    ]
    lib.moekit_many_rows_backward.restype = i32
    lib.moekit_linear_cross_entropy.argtypes = [p, p, p, p, i64, i64, i64, i64, ctypes.c_float, i32]
    lib.moekit_linear_cross_entropy.argtypes += [p, p, p, p, p, i32, p, i64]  # loss, grads, work, ...
    lib.moekit_linear_cross_entropy.restype = i32
    lib.moekit_cross_entropy_work_floats.argtypes = [i64, i64, i32, i64]
    lib.moekit_cross_entropy_work_floats.restype = i64
    lib.moekit_rms_norm.argtypes = [p, p, ctypes.c_float, i64, i64, p, p, i32]
    lib.moekit_rms_norm.restype = None
    lib.moekit_rms_norm_backward.argtypes = [p, p, p, p, i64, i64, p, p, p, i32]
    lib.moekit_rms_norm_backward.restype = None
    lib.moekit_rms_norm_backward_work_floats.argtypes = [i64, i32]
    lib.moekit_rms_norm_backward_work_floats.restype = i64
    lib.moekit_rope.argtypes = [p, i64, i64, i64, i64, i64, i64, i64, p, p, i32, p, i32]
    lib.moekit_rope.restype = None
    rows = [p, i64, i64, i64]  # a tensor's data and its batch, head and row strides
    sizes = [i64] * 6 + [ctypes.c_float, i32]  # B, H, G, S, T, K, scale, causal
    lib.moekit_attention.argtypes = [*rows * 3, *sizes, *rows, p, p, i32, p]  # out, lse, work, threads, sgemm
    lib.moekit_attention.restype = None
    lib.moekit_attention_backward.argtypes = [*rows * 5, p, *sizes, p, p, p, p, i32, p]
    lib.moekit_attention_backward.restype = None
    lib.moekit_attention_work_floats.argtypes = [i64, i32]
    lib.moekit_attention_work_floats.restype = i64
    for name in (
        "moekit_few_rows_work_floats",
        "moekit_many_rows_work_floats",
        "moekit_many_rows_backward_work_floats",
    ):
        getattr(lib, name).argtypes = [i64, i64, i64, i32, i32] + ([] if "few" in name else [i64])
        getattr(lib, name).restype = i64
    if hasattr(lib, "moekit_set_gemm"):  # (a build of older sources, bench_native --baseline, has none)
        lib.moekit_set_gemm.argtypes = [i32]
        lib.moekit_set_gemm.restype = None
        lib.moekit_gemm.argtypes = [i32, i32, i64, i64, i64, p, i64, p, i64, ctypes.c_float, p, i64]
        lib.moekit_gemm.restype = i32
        lib.moekit_matmul.argtypes = [*lib.moekit_gemm.argtypes, i32]
        lib.moekit_matmul.restype = i32
        lib.moekit_set_gemm(int(BLAS_GEMM))
    return lib


def use_blas_gemm(blas: bool) -> None:
    """Whether the kernels' matrix products run by the BLAS's sgemm (True) or by moekit's own GEMM
    (False, the default; csrc/gemm.c): for comparing the two in one process. The products keep
    their shapes; only who computes them changes."""
    global BLAS_GEMM
    BLAS_GEMM = blas
    lib = library()
    if lib is not None:
        lib.moekit_set_gemm(int(blas))


def gemm(
    a: Tensor, b: Tensor, c: Tensor, beta: float = 0.0, ta: bool = False, tb: bool = False, threads: int = 1
) -> Tensor:
    """c = op(a) @ op(b) + beta c by moekit's own GEMM (csrc/gemm.c), in place (op: the transpose
    where `ta` / `tb`; a stored [k, m] then, b [n, k]), on `threads` threads (the longer side of c
    split between them). CPU float32, each with contiguous rows (a row stride, a column stride of 1).
    The kernels call it from C; the model's linear layers (`linear`) and the tests from here."""
    lib = library()
    if lib is None:
        raise RuntimeError("the native kernels are unavailable here")
    for name, t in (("a", a), ("b", b), ("c", c)):
        if t.dtype != torch.float32 or t.device.type != "cpu" or t.dim() != 2 or t.stride(1) != 1:
            raise ValueError(
                f"gemm: {name} must be a 2-D CPU float32 tensor with contiguous rows, got "
                f"{t.dtype} {tuple(t.shape)} strides {t.stride()}"
            )
    m, k = (a.shape[1], a.shape[0]) if ta else tuple(a.shape)
    kb, n = (b.shape[1], b.shape[0]) if tb else tuple(b.shape)
    if kb != k or tuple(c.shape) != (m, n):
        raise ValueError(
            f"gemm: op(a) is [{m}, {k}], op(b) [{kb}, {n}], c {tuple(c.shape)}: expected op(b) [{k}, n] "
            f"and c [{m}, {n}]"
        )
    args = (int(ta), int(tb), m, n, k, a.data_ptr(), a.stride(0), b.data_ptr(), b.stride(0), beta)
    status = lib.moekit_matmul(*args, c.data_ptr(), c.stride(0), threads)
    if status != 0:
        raise MemoryError("gemm: the packing buffers could not be allocated")
    return c


def applies_linear(x_ND: Tensor, weight_OD: Tensor, bias_O: Tensor | None) -> bool:
    """Whether `linear` runs x @ weight^T (+ bias): CPU float32 contiguous tensors, the kernels on, at
    least 12 rows per thread and 64 input and output features (narrower products stay with torch)."""
    return (
        ENABLED
        and MANY_ROWS
        and not BLAS_GEMM
        and x_ND.dim() == 2
        and applies_rows(x_ND, weight_OD, bias_O)  # (first: not while tracing, which has no threads)
        and x_ND.shape[0] >= 12 * torch.get_num_threads()
        and min(weight_OD.shape) >= 64
        and hasattr(library(), "moekit_matmul")  # (not in a build of older sources: bench_native --baseline)
    )


def linear(x_ND: Tensor, weight_OD: Tensor, bias_O: Tensor | None) -> Tensor:
    """x @ weight^T (+ bias) by moekit's GEMM on torch's threads -> [N, O], with its own backward
    where autograd records (`_Linear`). Where `applies_linear`: the model's linear layers
    (model.layers.linear) and a router's gate over many experts."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x_ND, weight_OD, bias_O)):
        return _Linear.apply(x_ND, weight_OD, bias_O)
    return _linear_forward(x_ND, weight_OD, bias_O)


def _linear_forward(x_ND: Tensor, weight_OD: Tensor, bias_O: Tensor | None) -> Tensor:
    out_NO = x_ND.new_empty(x_ND.shape[0], weight_OD.shape[0])
    gemm(x_ND, weight_OD, out_NO, tb=True, threads=torch.get_num_threads())
    return out_NO if bias_O is None else out_NO.add_(bias_O)


class _Linear(torch.autograd.Function):
    """x [N, D] @ weight [O, D]^T (+ bias [O]) by moekit's GEMM both ways (on torch's threads):
    dL/dx = g weight, dL/dweight = g^T x, dL/dbias = the column sums of g."""

    @staticmethod
    def forward(ctx, x_ND, weight_OD, bias_O):  # type: ignore[override]
        ctx.save_for_backward(x_ND, weight_OD)
        ctx.has_bias = bias_O is not None
        return _linear_forward(x_ND, weight_OD, bias_O)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_NO):  # type: ignore[override]
        x_ND, weight_OD = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        grad_NO = grad_NO.contiguous()
        threads = torch.get_num_threads()
        grad_x = grad_w = grad_b = None
        if need_x:
            grad_x = gemm(grad_NO, weight_OD, torch.empty_like(x_ND), threads=threads)
        if need_w:
            grad_w = gemm(grad_NO, x_ND, torch.empty_like(weight_OD), ta=True, threads=threads)
        if need_b and ctx.has_bias:
            grad_b = grad_NO.sum(0)
        return grad_x, grad_w, grad_b


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


def decode_module() -> Any:
    """The compiled decode-size layer call (csrc/decode.cpp: `Call`, what TopKLayer.fast is), or None
    where it cannot be had: the kernels off, DECODE_CALL off, no C++ compiler or torch headers (then
    TopKLayer checks its guards in Python and calls the kernel through ctypes; reason logged once)."""
    if "decode" in _state:
        return _state["decode"]
    with _lock:
        if "decode" not in _state:
            module = None
            if not DECODE_CALL:
                log.info("the C++ decode call is off (MOEKIT_DECODE_CALL=0)")
            elif library() is not None:
                try:
                    spec = importlib.util.spec_from_file_location("moekit_decode", build_decode())
                    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
                    spec.loader.exec_module(module)  # type: ignore[union-attr]
                except (RuntimeError, OSError, ImportError) as err:
                    log.warning("the C++ decode call is unavailable, checking its guards in Python: %s", err)
                    module = None
            _state["decode"] = module
    return _state["decode"]


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
    floats = library().moekit_many_rows_work_floats(tokens, dim, hidden, 1, torch.get_num_threads(), 2)
    out, status = _routed(x, expert_idx, weight, top_k, bank, address, 2, floats)
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


def applies_rows(*tensors: Tensor, rows_strided: bool = False) -> bool:
    """What every kernel here needs of its tensors (None entries are skipped): CPU float32 contiguous
    memory (with `rows_strided`, only the last dim contiguous), outside torch.compile tracing
    (traced tensors have no memory to hand to C), with the kernels on and built. RMSNorm needs
    nothing more."""
    return (
        ENABLED
        and all(
            t.device.type == "cpu"
            and t.dtype == torch.float32
            and (t.stride(-1) == 1 if rows_strided else t.is_contiguous())
            for t in tensors
            if t is not None
        )
        and not torch.compiler.is_compiling()
        and library() is not None
    )


def applies(x: Tensor, experts: Experts, num_rows: int, num_groups: int, strategy: str = "auto") -> bool:
    """Whether a kernel can run an inference call with `num_rows` rows in `num_groups` non-empty
    expert groups (without building anything when it cannot). It stands in for the grouped products'
    strategy "auto" only: a pinned strategy (tests, benchmarks) runs as asked."""
    if not _usable(x, experts, num_groups, strategy, ACTIVATIONS):
        return False
    many = _many(num_rows, num_groups)
    if many is False:
        return False
    return _work_floats("forward", x, num_rows, experts, many is not None) * 4 <= MAX_WORK_BYTES


def applies_training(
    x: Tensor, experts: Experts, num_rows: int, num_groups: int, strategy: str = "auto"
) -> bool:
    """Whether the many-row kernel's forward (saving the pre-activation hidden) and its backward can
    run a call under autograd: a usable sgemm and an activation whose derivative the kernel has
    (TRAINING_ACTIVATIONS), at any rows per expert. Layer forward+backward against the torch path
    (cold, in turns): 1.01-1.15x (Mixtral-like) and 1.15-1.38x (fine-grained) at 1-256 tokens,
    1.07-1.43x at 512-4096 (docs/benchmarks.md)."""
    return (
        _usable(x, experts, num_groups, strategy, TRAINING_ACTIVATIONS)
        and MANY_ROWS
        and blas_sgemm() is not None
        and _work_floats("backward", x, num_rows, experts, True) * 4 <= MAX_WORK_BYTES
    )


def _usable(x: Tensor, experts: Experts, num_groups: int, strategy: str, activations) -> bool:
    return (
        strategy == "auto"
        and (experts.activation, experts.is_glu) in activations
        and num_groups > 0
        and applies_rows(x, *experts[:4])
    )


def _few(num_rows: int, num_groups: int) -> bool:
    """Whether a call is in the few-row regime (at most MAX_MEAN_ROWS rows per group on average)."""
    return num_rows <= MAX_MEAN_ROWS * num_groups


def _many(num_rows: int, num_groups: int) -> int | None | bool:
    """The regime of a call: None for few rows, the sgemm's address for many, False for neither
    (many rows and no usable sgemm)."""
    if _few(num_rows, num_groups):
        return None
    address = blas_sgemm() if MANY_ROWS else None
    return False if address is None else address


def _block_rows(num_rows: int, floats_per_row: int, threads: int) -> int:
    per_thread = -(-num_rows // max(threads, 1))
    return max(1, min(per_thread, max(16, min(1024, BLOCK_BYTES // (4 * floats_per_row)))))


def _work_floats(kind: str, x: Tensor, num_rows: int, experts: Experts, many: bool) -> int:
    """Floats of work memory a call needs (the kernel's own count); `kind` "forward" or "backward"."""
    return _kernel_work(kind, *_shape_key(x, num_rows, experts), many)[0]


@functools.lru_cache(maxsize=1024)
def _kernel_work(
    kind: str, tokens: int, num_rows: int, dim: int, hidden: int, is_glu: bool, threads: int, many: bool
) -> tuple[int, int]:
    # cached: `applies` and the call itself both ask, once per layer call
    lib = library()
    if not many:
        return lib.moekit_few_rows_work_floats(num_rows, dim, hidden, int(is_glu), threads), 0
    hidden_in = 2 * hidden if is_glu else hidden
    per_row = 2 * dim + hidden_in + hidden if kind == "forward" else 3 * dim + 2 * hidden + hidden_in
    rows = _block_rows(num_rows, per_row, threads)
    entry = (
        lib.moekit_many_rows_work_floats if kind == "forward" else lib.moekit_many_rows_backward_work_floats
    )
    return entry(tokens, dim, hidden, int(is_glu), threads, rows), rows


def sorted_rows(
    x_TD: Tensor,
    token_N: Tensor,
    weight_N: Tensor,
    plan: GroupPlan,
    experts: Experts,
    h_NH: Tensor | None = None,
) -> Tensor:
    """out [T, D] = sum over rows n of weight_N[n] * expert_n(x_TD[token_N[n]]), rows sorted by
    expert as `plan` says (what a dispatcher gives). No autograd; call where `applies(...)`.

    With `h_NH` [N, H] (contiguous) the many-row regime runs at any rows per expert and writes the
    pre-activation hidden of the plan's rows there, what `sorted_rows_backward` and the torch path's
    backward take; call where `applies_training(...)` then."""
    return _sorted(x_TD, token_N, weight_N, plan, experts, h_NH)


def _sorted(x_TD, token_N, weight_N, plan, experts, h_NH) -> Tensor:
    token_N = token_N.to(torch.int64).contiguous()
    weight_N = weight_N.to(torch.float32).contiguous()
    bounds_G3 = torch.tensor(plan.bounds, dtype=torch.int64).reshape(-1, 3)
    rows = (token_N.data_ptr(), weight_N.data_ptr(), bounds_G3.data_ptr(), bounds_G3.shape[0])
    num_rows = token_N.shape[0]
    many = _many(num_rows, bounds_G3.shape[0]) if h_NH is None else blas_sgemm()
    floats, block_rows = _kernel_work("forward", *_shape_key(x_TD, num_rows, experts), many is not None)
    if many is None:
        return _run("moekit_few_rows", x_TD, rows, num_rows, experts, (), floats)[0]
    extra = (x_TD.shape[0], many, block_rows, None if h_NH is None else h_NH.data_ptr())
    return _run("moekit_many_rows", x_TD, rows, num_rows, experts, extra, floats)[0]


def _shape_key(x: Tensor, num_rows: int, experts: Experts) -> tuple:
    return (
        x.shape[0],
        num_rows,
        x.shape[-1],
        experts.w_out_EFD.shape[1],
        experts.is_glu,
        torch.get_num_threads(),
    )


def routed(x_TD: Tensor, expert_idx_A: Tensor, weight_A: Tensor, top_k: int, experts: Experts) -> Tensor:
    """`sorted_rows` straight from a token-choice routing: assignment a (token-major, T * top_k of
    them) sends token a // top_k to expert expert_idx_A[a] with weight weight_A[a] -> out [T, D].
    The sort by expert happens in the kernel. No autograd; call where `applies(...)`."""
    expert_idx_A = expert_idx_A.to(torch.int64).contiguous()
    weight_A = weight_A.to(torch.float32).contiguous()
    num_experts, num_rows = experts.w_in_EDH.shape[0], expert_idx_A.shape[0]
    many = _many(num_rows, min(num_rows, num_experts))
    floats, block_rows = _kernel_work("forward", *_shape_key(x_TD, num_rows, experts), many is not None)
    out, status = _routed(x_TD, expert_idx_A, weight_A, top_k, experts, many, block_rows, floats)
    if status == -1:
        bad = expert_idx_A[(expert_idx_A < 0) | (expert_idx_A >= num_experts)]
        raise ValueError(f"expert indices {bad.tolist()[:8]} are outside [0, {num_experts})")
    if status != 0:
        raise MemoryError(f"the native expert kernel could not allocate its index arrays ({status})")
    return out


def applies_topk_layer(
    x_TD: Tensor, gate_ED: Tensor, bias_E: Tensor | None, top_k: int, experts: Experts, strategy: str = "auto"
) -> bool:
    """Whether `topk_layer` can run the layer: decode-size batches (the few-row regime for T * top_k
    rows; past it the router's torch ops cost little beside the experts' products), what `applies`
    asks of them, and the gate's weight and bias in CPU float32 contiguous memory."""
    num_rows = x_TD.shape[0] * top_k
    num_groups = min(num_rows, experts.w_in_EDH.shape[0])
    return (
        _few(num_rows, num_groups)
        and applies_rows(gate_ED, bias_E)
        and applies(x_TD, experts, num_rows, num_groups, strategy)
    )


def topk_layer(
    x_TD: Tensor, gate_ED: Tensor, bias_E: Tensor | None, top_k: int, renormalize: bool, experts: Experts
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor] | None:
    """An MoE layer's inference behind a top-k softmax router (router.TopKRouter) in one call:
    logits = x gate^T (+ bias), probs = softmax(logits), each token's top_k probabilities (largest
    first; divided by their sum if `renormalize`) and the experts' weighted outputs ->
    (out [T, D], logits [T, E], probs [T, E], expert_idx [T * top_k], weight [T * top_k]), what the
    router and `routed` give. None when a logit is not finite (the router's own path reports it) or
    where `applies_topk_layer` does not hold. No autograd (csrc/router.c)."""
    result = TopKLayer(x_TD, gate_ED, bias_E, top_k, renormalize, experts)(x_TD)
    return None if result is None else (result[0], *result[1].tensors())


def topk_layer_calls() -> int:
    """How many times the library's one-call layer ran (csrc/router.c), by any path; 0 without it."""
    lib = library()
    return 0 if lib is None else ctypes.c_int64.in_dll(lib, "moekit_topk_layer_calls").value


class Guards(NamedTuple):
    """What a prepared call (TopKLayer) was prepared for, as it was then: it applies while all hold
    (csrc/decode.cpp's header). Its holder names its own state; TopKLayer adds the input's size and
    layout, the thread count, this thread and the library's switches."""

    same: tuple = ()  # (dict, key, value): dict.get(key) is value; dict None: the holder's __dict__
    sizes: tuple = ()  # (dict, size): len(dict) == size
    tensors: tuple = ()  # tensors whose memory stays where it was


NO_GUARDS = Guards()


def same(d: dict, *keys: Any, holder: bool = False) -> list[tuple[dict | None, Any, Any]]:
    """Guards.same entries for d's values at `keys` (as they are now; None where missing). With
    `holder`, d is the holder's own __dict__, named by None: the holder keeps the call in that dict,
    and a call holding it would make a reference cycle (a deleted model's weights kept until the
    garbage collector runs)."""
    return [(None if holder else d, k, d.get(k)) for k in keys]


# A prepared call allocates its outputs (each its own tensor) a few at a time, up to this many and
# this many bytes ahead: on the caches a decode step's other layers flush, the first torch.empty of a
# call costs 25-55 us and the next ones 2-3 us each (measured after a 256 MiB read).
OUTPUT_BATCH = 8
OUTPUT_BATCH_BYTES = 64 << 10


class KernelRouting:
    """The routing of one `TopKLayer` call: (logits [T, E], probs [T, E], expert_idx [T * K],
    weight [T * K]), as `topk_layer` gives them. The kernel writes them into buffers the prepared
    call keeps; they are copied out when first read (`tensors`), or by the next call before it
    writes there while this object is still referenced. A decode step that never reads its routing
    allocates nothing for it."""

    __slots__ = ("_tensors", "_copied", "__weakref__")  # (the C++ call sets the first two itself)

    def __init__(self, buffers: tuple[Tensor, Tensor, Tensor, Tensor]):
        self._tensors, self._copied = buffers, False

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if not self._copied:
            self._tensors, self._copied = tuple(t.clone() for t in self._tensors), True
        return self._tensors  # type: ignore[return-value]


def _no_routing() -> None:
    return None


# Dispatch keys of the tensors of a tracer or transform (torch.export's fake and functional tensors,
# vmap's batched ones): their memory, if any, is not their values.
_TRACED_KEYS = tuple(
    getattr(torch._C.DispatchKey, name)
    for name in ("Python", "PythonTLSSnapshot", "Functionalize", "FuncTorchBatched", "FuncTorchGradWrapper")
)


def _plain(x: Tensor) -> bool:
    """Whether x's memory holds its values, contiguous on the CPU (csrc/decode.cpp's input_fits)."""
    if not (x.is_cpu and x.is_contiguous()):
        return False
    keys = torch._C._dispatch_keys(x)
    return not any(keys.has(key) for key in _TRACED_KEYS)


class TopKLayer:
    """`topk_layer` prepared for one layer's tensors and token count: the checks and the arguments of
    the native call that do not change between calls (pointers, sizes, the work memory, the routing's
    buffers) are done once, outputs are allocated a few at a time, and each call is the call. A
    decode step runs every other layer between two calls of the same layer, and their weights flush
    the caches: each of the few dozen Python and torch steps of checking and building the call then
    misses in the caches on torch's code and data: prepared, a one-token layer call right after a 256 MiB read took 80-90 us
    less (1.12-1.14x, in turns with the unprepared call).

    Valid while its guards hold (`holds`: the holder's `Guards`, the input's size and layout, the
    thread count, this thread, the library's switches). Where the C++ call can be built (`fast`:
    csrc/decode.cpp), the guards are checked and the kernel called there: with `direct` (the type of
    the holder's output, where the holder's call does nothing but forward), `fast(holder, x)` is the
    whole decode-size call from the holder's `__call__` -> direct(out, holder, x, routing, top_k) as
    that type's __init__ would make it, None where a guard fails. A copy or pickle of the holder
    drops it."""

    def __init__(
        self,
        x_TD: Tensor,
        gate_ED: Tensor,
        bias_E: Tensor | None,
        top_k: int,
        renormalize: bool,
        experts: Experts,
        strategy: str = "auto",
        guards: Guards = NO_GUARDS,
        direct: type | None = None,
    ) -> None:
        """Prepared where `applies_topk_layer`; elsewhere the call answers None (kept all the same:
        the guards say when to ask again)."""
        self._guard(x_TD, guards)
        self.top_k, self._fn, self.fast = top_k, None, None
        self._last = _no_routing  # () -> the last call's KernelRouting while referenced, else None
        if not applies_topk_layer(x_TD, gate_ED, bias_E, top_k, experts, strategy):
            return
        tokens, dim = x_TD.shape
        num_experts = gate_ED.shape[0]
        num_rows = tokens * top_k
        floats, _ = _kernel_work("forward", *_shape_key(x_TD, num_rows, experts), False)
        # The pool's buffer stays valid for this call after later uses of the pool (held here), and
        # is shared with them: this thread's kernel calls run one at a time (the guards name the thread).
        (work,) = scratch(x_TD, (floats,), pool="native")
        self._routing = (
            torch.empty((tokens, num_experts)),  # logits
            torch.empty((tokens, num_experts)),  # probs
            torch.empty(num_rows, dtype=torch.int64),  # expert_idx
            torch.empty(num_rows),  # weight
        )
        # (out, its data pointer): made a batch at a time, up to OUTPUT_BATCH and OUTPUT_BATCH_BYTES
        self._outputs: list[tuple[Tensor, int]] = []
        batch = max(1, min(OUTPUT_BATCH, OUTPUT_BATCH_BYTES // (tokens * dim * 4)))
        self._new_outputs = functools.partial(_new_outputs, (tokens, dim), batch)
        gate = (gate_ED.data_ptr(), None if bias_E is None else bias_E.data_ptr(), top_k, int(renormalize))
        routing = tuple(t.data_ptr() for t in self._routing)
        # the call's other arguments, packed once (moekit_topk_layer_packed: tokens, gate, routing,
        # bank, work, threads; a missing pointer is 0)
        args = (
            tokens,
            *gate,
            *routing,
            num_experts,
            *_bank_args(experts, dim),
            work.data_ptr(),
            torch.get_num_threads(),
        )
        self._args = (ctypes.c_int64 * len(args))(*(0 if a is None else a for a in args))
        self._args_ptr = ctypes.addressof(self._args)
        self._work = work
        self._fn = library().moekit_topk_layer_packed
        decode = decode_module()
        if decode is not None:
            self.fast = decode.Call(
                ctypes.cast(self._fn, ctypes.c_void_p).value,
                self._args_ptr,
                tokens,
                dim,
                self._threads,
                self._thread,
                self._guards.same,
                self._guards.sizes,
                self._guards.tensors,
                self._pointers,
                self._new_outputs,  # (not a bound method: that would make a reference cycle)
                KernelRouting,
                self._routing,
                None if direct is None else (direct, top_k),
            )

    def _guard(self, x_TD: Tensor, guards: Guards) -> None:
        """Keeps what the call is prepared for: `guards` and the library's switches, the input's
        size and layout, the thread count and this thread."""
        switches = (*same(globals(), "ENABLED", "MAX_MEAN_ROWS"), *same(_state, "lib"))
        self._guards = guards._replace(same=(*guards.same, *switches))
        self._pointers = tuple(t.data_ptr() for t in guards.tensors)
        self._input = (x_TD.shape, x_TD.dtype, _plain(x_TD))
        self._threads, self._thread = torch.get_num_threads(), threading.get_ident()

    @classmethod
    def declined(cls, x_TD: Tensor, guards: Guards = NO_GUARDS) -> TopKLayer:
        """A call that answers None, for a holder whose layer cannot run here (kept all the same:
        the guards say when to ask again)."""
        call = cls.__new__(cls)
        call._guard(x_TD, guards)
        call.top_k, call._fn, call.fast, call._last = 0, None, None, _no_routing
        return call

    def holds(self, holder: Any, x_TD: Tensor) -> bool:
        """Whether the call is still `holder`'s for input x_TD: every guard holds (autograd off)."""
        if self.fast is not None:
            return self.fast.guards_hold(holder, x_TD)
        guards, own = self._guards, holder.__dict__
        return (
            not torch.is_grad_enabled()
            and (x_TD.shape, x_TD.dtype, _plain(x_TD)) == self._input
            and torch.get_num_threads() == self._threads
            and threading.get_ident() == self._thread
            and all((own if d is None else d).get(k) is v for d, k, v in guards.same)
            and all(len(d) == n for d, n in guards.sizes)
            and all(t.data_ptr() == p for t, p in zip(guards.tensors, self._pointers))
        )

    def __deepcopy__(self, memo: dict) -> None:
        return None  # a copied layer has other tensors: it prepares its own

    def __reduce__(self) -> tuple:
        return (_nothing, ())

    def __call__(self, x_TD: Tensor) -> tuple[Tensor, KernelRouting] | None:
        """-> (out [T, D], the call's routing), or None where the layer takes torch's path. The
        guards unchecked (the caller checks `holds`)."""
        if self._fn is None:
            return None
        if self.fast is not None:
            return self.fast.run(x_TD)
        last = self._last()
        if last is not None:  # still referenced: its routing moves out of the buffers written now
            last.tensors()
        outputs = self._outputs
        if not outputs:
            outputs.extend((t, t.data_ptr()) for t in self._new_outputs())
        out_TD, out_ptr = outputs.pop()
        status = self._fn(x_TD.data_ptr(), out_ptr, self._args_ptr)
        if status == 1:
            return None
        if status != 0:
            raise MemoryError(f"the native expert kernel could not allocate its index arrays ({status})")
        routing = KernelRouting(self._routing)
        self._last = weakref.ref(routing)
        return out_TD, routing


def _nothing() -> None:
    return None


def _new_outputs(shape: tuple[int, int], count: int) -> list[Tensor]:
    """A batch of a prepared call's outputs (one torch.empty after the caches were flushed costs
    25-55 us; the next few 2-3)."""
    return [torch.empty(shape) for _ in range(count)]


def _routed(x_TD, expert_idx_A, weight_A, top_k, experts, sgemm, block_rows, floats) -> tuple[Tensor, int]:
    num_experts = experts.w_in_EDH.shape[0]
    rows = (expert_idx_A.data_ptr(), weight_A.data_ptr(), top_k, num_experts)
    return _run("moekit_routed", x_TD, rows, expert_idx_A.shape[0], experts, (sgemm, block_rows), floats)


def _run(
    entry: str,
    x: Tensor,
    rows: tuple,
    num_rows: int,
    experts: Experts,
    extra: tuple,
    floats: int,
) -> tuple[Tensor, int | None]:
    """Call the kernel's forward `entry`: x, its row arguments `rows`, the expert bank's, then (some
    of `extra`) out, work (`floats` of it), threads and `extra`'s rest -> (out, x's shape: the
    experts' weighted outputs; the entry's status)."""
    lib = library()
    threads = torch.get_num_threads()
    (work,) = scratch(x, (floats,), pool="native")
    out = x.new_zeros(x.shape)
    bank = (*_bank_args(experts, x.shape[-1]), num_rows)
    before = extra[:1] if entry == "moekit_many_rows" else ()  # T precedes out there
    after = extra[len(before) :]
    status = getattr(lib, entry)(
        x.data_ptr(), *rows, *bank, *before, out.data_ptr(), work.data_ptr(), threads, *after
    )
    return out, status


def _bank_args(experts: Experts, dim: int) -> tuple:
    """The expert bank as the forward entries take it: w_in, w_out, b_in, b_out, D, F, glu, act."""
    _, w_out_EFD, _, _, activation, is_glu = experts
    hidden = w_out_EFD.shape[1]
    return (*_bank_pointers(experts), dim, hidden, int(is_glu), ACTIVATIONS[(activation, is_glu)])


def _bank_pointers(experts: Experts) -> tuple:
    return tuple(None if t is None else t.data_ptr() for t in experts[:4])


def sorted_rows_backward(
    x_TD: Tensor,
    token_N: Tensor,
    weight_N: Tensor,
    plan: GroupPlan,
    experts: Experts,
    h_NH: Tensor,
    grad_out_TD: Tensor,
    grads: dict[str, Tensor | None],
) -> None:
    """The backward of `sorted_rows` (with a saved hidden h_NH) given dL/dout [T, D], into the tensors of `grads` (None:
    not needed): "x" [T, D], "b_in" [E, H] and "b_out" [E, D] are added to (zero them first),
    "w_in" [E, D, H] and "w_out" [E, F, D] are written for the experts with rows only (zero the
    others), "weight" [N] float32 is written. Call where `applies_training(...)`."""
    lib = library()
    w_in_EDH, w_out_EFD, _, b_out_ED, activation, is_glu = experts
    token_N = token_N.to(torch.int64).contiguous()
    weight_N = weight_N.to(torch.float32).contiguous()
    bounds_G3 = torch.tensor(plan.bounds, dtype=torch.int64).reshape(-1, 3)
    num_rows = token_N.shape[0]
    floats, block_rows = _kernel_work("backward", *_shape_key(x_TD, num_rows, experts), True)
    (work,) = scratch(x_TD, (floats,), pool="native")
    pointers = [
        None if grads.get(k) is None else grads[k].data_ptr()
        for k in ("x", "weight", "w_in", "w_out", "b_in", "b_out")
    ]
    status = lib.moekit_many_rows_backward(
        x_TD.data_ptr(),
        token_N.data_ptr(),
        weight_N.data_ptr(),
        bounds_G3.data_ptr(),
        bounds_G3.shape[0],
        w_in_EDH.data_ptr(),
        w_out_EFD.data_ptr(),
        None if b_out_ED is None else b_out_ED.data_ptr(),
        h_NH.data_ptr(),
        grad_out_TD.data_ptr(),
        x_TD.shape[-1],
        w_out_EFD.shape[1],
        int(is_glu),
        ACTIVATIONS[(activation, is_glu)],
        num_rows,
        x_TD.shape[0],
        *pointers,
        work.data_ptr(),
        torch.get_num_threads(),
        blas_sgemm(),
        block_rows,
    )
    if status != 0:
        raise MemoryError(f"the native expert backward could not allocate its index array ({status})")


# ------------------------------------------------------------------ LM head and cross-entropy


def applies_cross_entropy(h_ND: Tensor, weight_VD: Tensor, bias_V: Tensor | None, chunk_rows: int) -> bool:
    """Whether `linear_cross_entropy` can run the LM head and loss (model/cross_entropy.py): CPU
    float32 contiguous tensors, a usable sgemm, work memory (a [chunk_rows, V] chunk per thread and a
    [V, D] accumulator per thread but the first) within MAX_WORK_BYTES."""
    if not (
        MANY_ROWS and h_ND.shape[0] > 0 and applies_rows(h_ND, weight_VD, bias_V) and blas_sgemm() is not None
    ):
        return False
    dim, vocab = weight_VD.shape[1], weight_VD.shape[0]
    floats = library().moekit_cross_entropy_work_floats(dim, vocab, torch.get_num_threads(), chunk_rows)
    return floats * 4 <= MAX_WORK_BYTES


def linear_cross_entropy(
    h_ND: Tensor,
    weight_VD: Tensor,
    bias_V: Tensor | None,
    targets_N: Tensor,
    ignore_index: int,
    scale: float,
    grads: dict[str, Tensor | None] | None,
    chunk_rows: int,
) -> float:
    """The summed loss terms of the LM head h W^T (+ b) against `targets_N` (`ignore_index`: none),
    each thread on its own rows in chunks of `chunk_rows` (csrc/cross_entropy.c). With `grads`, the
    gradients of `scale` * loss go into its tensors: "h" [N, D] and "w" [V, D] are written, "b" [V]
    (or None) is added to. Targets must be in [0, V) or `ignore_index` (the caller checks). Call
    where `applies_cross_entropy(...)`."""
    lib = library()
    threads = torch.get_num_threads()
    dim, vocab = weight_VD.shape[1], weight_VD.shape[0]
    (work,) = scratch(
        h_ND, (lib.moekit_cross_entropy_work_floats(dim, vocab, threads, chunk_rows),), pool="native"
    )
    targets_N = targets_N.to(torch.int64).contiguous()
    loss = ctypes.c_double(0.0)
    pointers = (
        [None] * 3
        if grads is None
        else [None if grads.get(k) is None else grads[k].data_ptr() for k in "hwb"]
    )
    status = lib.moekit_linear_cross_entropy(
        h_ND.data_ptr(),
        weight_VD.data_ptr(),
        None if bias_V is None else bias_V.data_ptr(),
        targets_N.data_ptr(),
        ignore_index,
        h_ND.shape[0],
        dim,
        vocab,
        scale,
        int(grads is not None),
        ctypes.byref(loss),
        *pointers,
        work.data_ptr(),
        threads,
        blas_sgemm(),
        chunk_rows,
    )
    if status != 0:
        raise MemoryError(f"the native cross-entropy could not allocate its per-thread sums ({status})")
    return loss.value


# ------------------------------------------------------------------------------------ RMSNorm


def rms_norm(x: Tensor, weight_D: Tensor, eps: float, keep_r: bool) -> tuple[Tensor, Tensor | None]:
    """y = x / rms(x) * weight over the last dim (csrc/norms.c), and with `keep_r` the [..., 1]
    reciprocal rms the backward takes. Call where `applies_rows(x, weight_D)`."""
    dim = x.shape[-1]
    y = torch.empty_like(x)
    r = x.new_empty(*x.shape[:-1], 1) if keep_r else None
    rows = x.numel() // dim if dim else 0
    library().moekit_rms_norm(
        x.data_ptr(),
        weight_D.data_ptr(),
        eps,
        rows,
        dim,
        y.data_ptr(),
        None if r is None else r.data_ptr(),
        torch.get_num_threads(),
    )
    return y, r


def rms_norm_backward(
    x: Tensor, weight_D: Tensor, r: Tensor, grad_y: Tensor, need_x: bool, need_w: bool
) -> tuple[Tensor | None, Tensor | None]:
    """(dL/dx, dL/dweight) of `rms_norm` given dL/dy, each only if needed. Call where
    `applies_rows(x, weight_D, r, grad_y)`."""
    lib, dim, threads = library(), x.shape[-1], torch.get_num_threads()
    grad_x = torch.empty_like(x) if need_x else None
    grad_w = torch.empty_like(weight_D) if need_w else None
    (work,) = scratch(x, (lib.moekit_rms_norm_backward_work_floats(dim, threads),), pool="native")
    lib.moekit_rms_norm_backward(
        x.data_ptr(),
        weight_D.data_ptr(),
        r.data_ptr(),
        grad_y.data_ptr(),
        x.numel() // dim,
        dim,
        None if grad_x is None else grad_x.data_ptr(),
        None if grad_w is None else grad_w.data_ptr(),
        work.data_ptr(),
        threads,
    )
    return grad_x, grad_w


# ------------------------------------------------------------------------------------- rotary


def applies_rope(x_BHSK: Tensor, cos_SK: Tensor, sin_SK: Tensor) -> bool:
    """Whether `rope` can rotate x [B, H, S, K] (any strides but a contiguous K) by full-width tables
    [S, K]: CPU float32, even K, tables without gradients."""
    return (
        ENABLED
        and x_BHSK.dim() == 4
        and x_BHSK.stride(-1) == 1
        and cos_SK.shape == sin_SK.shape == x_BHSK.shape[-2:]
        and x_BHSK.shape[-1] % 2 == 0
        and not (cos_SK.requires_grad or sin_SK.requires_grad)
        and applies_rows(cos_SK, sin_SK)
        and x_BHSK.device.type == "cpu"
        and x_BHSK.dtype == torch.float32
    )


def rope(x_BHSK: Tensor, cos_SK: Tensor, sin_SK: Tensor, backward: bool) -> Tensor:
    """x * cos + rotate_half(x) * sin (csrc/rope.c) -> a contiguous [B, H, S, K]; with `backward`,
    x is dL/dy and the result dL/dx. Call where `applies_rope(...)`."""
    B, H, S, K = x_BHSK.shape
    out = torch.empty(B, H, S, K, dtype=x_BHSK.dtype)
    sB, sH, sS, _ = x_BHSK.stride()
    library().moekit_rope(
        x_BHSK.data_ptr(),
        sB,
        sH,
        sS,
        B,
        H,
        S,
        K,
        cos_SK.data_ptr(),
        sin_SK.data_ptr(),
        int(backward),
        out.data_ptr(),
        torch.get_num_threads(),
    )
    return out


# ------------------------------------------------------------------ attention


def applies_attention(q_BHSK: Tensor, k_BGTK: Tensor, v_BGTK: Tensor, causal: bool, scale: float) -> bool:
    """Whether `attention` can run scaled dot-product attention (model/layers.py): CPU float32 with
    the head dim contiguous, H a multiple of G, a positive scale, S == T when causal (no cache
    offset), and a usable sgemm."""
    (B, H, S, K), (_, G, T, _) = q_BHSK.shape, k_BGTK.shape
    return (
        MANY_ROWS
        and k_BGTK.shape[0] == B
        and k_BGTK.shape[-1] == K
        and v_BGTK.shape == k_BGTK.shape
        and H % G == 0
        and scale > 0
        and (S == T or not causal)
        and S > 0
        and applies_rows(q_BHSK, k_BGTK, v_BGTK, rows_strided=True)
        and blas_sgemm() is not None
    )


def _rows(t: Tensor) -> tuple:
    return (t.data_ptr(), *t.stride()[:3])


def _attention_work(q_BHSK: Tensor, keys: int, threads: int) -> Tensor:
    (work,) = scratch(q_BHSK, (library().moekit_attention_work_floats(keys, threads),), pool="attention")
    return work


def attention(
    q_BHSK: Tensor, k_BGTK: Tensor, v_BGTK: Tensor, causal: bool, scale: float
) -> tuple[Tensor, Tensor]:
    """softmax(scale q k^T (+ causal mask)) v with query head h reading key/value head h // (H / G)
    (csrc/attention.c) -> (out [B, H, S, K], a view of [B, S, H, K] memory; the rows' log-sum-exp
    [B, H, S], what `attention_backward` takes). No autograd; call where `applies_attention(...)`."""
    (B, H, S, K), G, T = q_BHSK.shape, k_BGTK.shape[1], k_BGTK.shape[2]
    threads = torch.get_num_threads()
    work = _attention_work(q_BHSK, T, threads)
    out_BSHK = q_BHSK.new_empty((B, S, H, K))
    out_BHSK = out_BSHK.transpose(1, 2)
    lse_BHS = q_BHSK.new_empty((B, H, S))
    library().moekit_attention(
        *_rows(q_BHSK), *_rows(k_BGTK), *_rows(v_BGTK), B, H, G, S, T, K, scale, int(causal),
        *_rows(out_BHSK), lse_BHS.data_ptr(), work.data_ptr(), threads, blas_sgemm(),
    )  # fmt: skip
    return out_BHSK, lse_BHS


def attention_backward(
    q_BHSK: Tensor,
    k_BGTK: Tensor,
    v_BGTK: Tensor,
    out_BHSK: Tensor,
    lse_BHS: Tensor,
    grad_BHSK: Tensor,
    causal: bool,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of `attention` given dL/dout (head dim contiguous) -> (dq [B, H, S, K],
    dk [B, G, T, K], dv [B, G, T, K]), contiguous."""
    (B, H, S, K), G, T = q_BHSK.shape, k_BGTK.shape[1], k_BGTK.shape[2]
    threads = torch.get_num_threads()
    work = _attention_work(q_BHSK, T, threads)
    dq, dk, dv = (
        q_BHSK.new_empty(q_BHSK.shape),
        k_BGTK.new_empty(k_BGTK.shape),
        v_BGTK.new_empty(v_BGTK.shape),
    )
    library().moekit_attention_backward(
        *_rows(q_BHSK), *_rows(k_BGTK), *_rows(v_BGTK), *_rows(out_BHSK), *_rows(grad_BHSK),
        lse_BHS.data_ptr(), B, H, G, S, T, K, scale, int(causal),
        dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), work.data_ptr(), threads, blas_sgemm(),
    )  # fmt: skip
    return dq, dk, dv
