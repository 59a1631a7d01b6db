"""Compile the kernels for a GPU target without a GPU: registers, spills and shared memory per launch.

A kernel compiled for the wrong budget fails only on the machine that runs it: shared memory beyond the block
limit is refused at launch, and register spills turn a bandwidth-bound reduction into a local-memory-bound one.
This module answers both questions on any machine with the ``ptxas`` bundled in the Triton wheel:

* :func:`compile_kernel` compiles one ``@triton.jit`` kernel for given argument values and meta-parameters for
  one target (``sm_80``, ``sm_89``, ``sm_90a``) and returns a :class:`CompileReport` (registers a thread, spill
  stores and loads, stack frame, shared memory a program, whether that fits the target's block limit).
* :func:`record_launches` runs a launcher (``_launch`` of a kernel module, exactly as the dispatch layer calls
  it) on fake CUDA tensors, with the kernels replaced by recorders: it returns the launches the launcher makes
  on a GPU (grid, argument values, meta-parameters, num_warps), without allocating or launching anything.
* :func:`dispatch_launches` does that for one operation and problem shape; :func:`check` compiles the result.

Triton's global state (interpreter knob, environment variables, active driver, the launch helpers of the
kernel modules) is restored after every call, so interpreter tests in the same process keep working.

Command line (prints one table row per kernel launch and target)::

    python -m drift_kernels.compile_check [--ops fisher_gram fisher_project topk_iou] [--classes 5 14 100 200]
        [--dtypes float32 float16 bfloat16] [--ties fractional index] [--targets sm_80 sm_89 sm_90a] [--markdown]
        [--m 4 13] [--dims 150528 268203]           # fisher_project's m; D of the Fisher kernels
        [--device]                                  # this machine's GPU instead of --targets
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib
import inspect
import os
import pickle
import re
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

#: Kernel modules whose launchers :func:`record_launches` can run (each has ``_launch`` and ``@triton.jit`` kernels).
KERNEL_MODULES = ("fisher_gram_kernel", "fisher_project_kernel", "topk_iou_kernel")


@dataclasses.dataclass(frozen=True)
class Target:
    """A GPU compilation target.

    Attributes:
        name: ptxas architecture name (``sm_90a`` uses Hopper-only instructions such as wgmma).
        arch: compute capability as Triton writes it (90 for sm_90a).
        shared_limit: largest dynamic shared memory one block may opt in to, in bytes.
        n_sm: streaming multiprocessors of the reference GPU, given to launchers that size their grid by it.
        gpus: the GPUs this target stands for.
        max_warps_per_sm: resident warps an SM holds (64 on sm_80 / sm_90, 48 on sm_86 / sm_89).
        shared_per_sm: shared memory an SM holds for all its resident blocks, in bytes.
    """

    name: str
    arch: int
    shared_limit: int
    n_sm: int
    gpus: str
    max_warps_per_sm: int = 64
    shared_per_sm: int = 233472


TARGETS: dict[str, Target] = {
    "sm_80": Target("sm_80", 80, 166912, 108, "A100", 64, 167936),
    "sm_89": Target("sm_89", 89, 101376, 142, "L40S, RTX 40xx (sm_86 has the same shared limit)", 48, 102400),
    "sm_90a": Target("sm_90a", 90, 232448, 132, "H100, H200", 64, 233472),
}

#: Registers of an SM, and the most blocks it holds at once (sm_80 to sm_90).
REGISTERS_PER_SM = 65536
MAX_BLOCKS_PER_SM = 24


def occupancy(report: CompileReport, target: str | Target) -> int:
    """Blocks of a compiled kernel an SM holds at once: the least of the register, warp and shared-memory limits.

    Registers are allocated per warp in units of 256 (8 a thread): a block takes
    ceil(regs * 32 / 256) * 256 * num_warps of the SM's 65536; warps are limited by ``max_warps_per_sm``;
    shared memory by ``shared_per_sm`` (plus 1 KB the runtime reserves per block).
    """
    tgt = _target(target)
    if report.error:
        return 0
    per_block_regs = -(-report.registers * 32 // 256) * 256 * report.num_warps
    by_regs = REGISTERS_PER_SM // max(1, per_block_regs)
    by_warps = tgt.max_warps_per_sm // report.num_warps
    by_shared = tgt.shared_per_sm // (report.shared + 1024)
    return max(0, min(by_regs, by_warps, by_shared, MAX_BLOCKS_PER_SM))


def _target(target: str | Target) -> Target:
    return TARGETS[target] if isinstance(target, str) else target


def device_target(device: int | str | torch.device = 0) -> Target:
    """The :class:`Target` of a CUDA device of this machine: its capability, SM count and shared memory limit.

    Queries CUDA when called (never at import). The name is the one ptxas and Triton use for the capability
    (``sm_90a`` for 9.0, ``sm_86`` for 8.6).

    Args:
        device: a CUDA device index, name or ``torch.device``.

    Returns:
        The target, e.g. ``Target("sm_90a", 90, 232448, 132, "NVIDIA H200")``.
    """
    props = torch.cuda.get_device_properties(device)
    arch = 10 * props.major + props.minor
    try:
        from triton.backends.nvidia.compiler import sm_arch_from_capability

        name = sm_arch_from_capability(arch)
    except ImportError:  # Triton without its NVIDIA backend: compilation reports the error per launch
        name = f"sm_{arch}{'a' if arch >= 90 else ''}"
    limit = int(getattr(props, "shared_memory_per_block_optin", 0) or 0)
    if not limit:
        limit = next((t.shared_limit for t in TARGETS.values() if t.arch == arch), TARGETS["sm_89"].shared_limit)
    warps = int(getattr(props, "max_threads_per_multi_processor", 2048) or 2048) // 32
    per_sm = int(getattr(props, "shared_memory_per_multiprocessor", 0) or 0) or limit + 1024
    return Target(name, arch, limit, props.multi_processor_count, props.name, warps, per_sm)


@dataclasses.dataclass(frozen=True)
class CompileReport:
    """Resources of one kernel compiled for one target.

    Attributes:
        kernel: kernel function name.
        target: target name (see :data:`TARGETS`).
        num_warps: warps a program.
        registers: registers a thread (ptxas).
        spill_stores: bytes of register spill stores a thread (ptxas).
        spill_loads: bytes of register spill loads a thread (ptxas).
        stack_frame: bytes of stack frame (local memory) a thread, spills and local arrays (ptxas).
        shared: dynamic shared memory a program, in bytes (Triton's allocation).
        shared_limit: the target's per-block shared memory limit, in bytes.
        error: why the kernel did not compile (the numbers are then -1); empty when it did.
    """

    kernel: str
    target: str
    num_warps: int
    registers: int
    spill_stores: int
    spill_loads: int
    stack_frame: int
    shared: int
    shared_limit: int
    error: str = ""

    @property
    def ok(self) -> bool:
        """Compiled, no spills, shared memory within the target's limit."""
        return not self.error and self.spills == 0 and self.fits_shared

    @property
    def spills(self) -> int:
        """Spill stores + loads, in bytes a thread."""
        return self.spill_stores + self.spill_loads

    @property
    def fits_shared(self) -> bool:
        """Whether the program's shared memory fits the target's per-block limit (else the launch fails)."""
        return self.shared <= self.shared_limit


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch as a launcher makes it.

    Attributes:
        module: the module that holds the kernel.
        name: the kernel's attribute name there (its function name).
        grid: launch grid.
        args: positional argument values; tensors are replaced by :class:`TensorArg` (dtype, aligned pointer).
        meta: keyword arguments: constexpr meta-parameters and launch options (num_warps, num_stages).
    """

    module: str
    name: str
    grid: tuple
    args: tuple
    meta: Mapping[str, Any]

    @property
    def fn(self) -> Callable:
        """The kernel's Python function (the body under ``@triton.jit``)."""
        return _kernel_fn(self.module, self.name)

    @property
    def num_warps(self) -> int:
        return int(self.meta.get("num_warps", 4))

    def describe(self) -> str:
        """The constexpr meta-parameters and num_warps, e.g. ``C_PAD=16 BLOCK_D=512 w8``."""
        params = inspect.signature(self.fn).parameters
        parts = [f"{k}={_short(v)}" for k, v in self.meta.items() if k in params and _is_tile(k)]
        return " ".join(parts + [f"w{self.num_warps}"])


@dataclasses.dataclass(frozen=True)
class TensorArg:
    """Stand-in for a tensor argument: Triton specialises a pointer on its dtype and 16-byte alignment only."""

    dtype: torch.dtype

    def data_ptr(self) -> int:
        return 0  # aligned, as fresh allocations are


def _short(v: Any) -> str:
    return str(v) if not isinstance(v, bool) else str(int(v))


def _is_tile(name: str) -> bool:
    """Meta-parameters worth printing: upper-case constexprs (tile sizes, switches)."""
    return name.isupper() or name.upper() == name


# --------------------------------------------------------------------------------------------------------------
# ptxas
# --------------------------------------------------------------------------------------------------------------


def ptxas_path() -> str | None:
    """Path of the ptxas that Triton uses (``TRITON_PTXAS_PATH`` or the wheel's), or None when there is none."""
    try:
        import triton  # noqa: F401
        from triton import knobs

        return knobs.nvidia.ptxas.path
    except Exception:  # no Triton, no NVIDIA backend, or no runnable ptxas
        return None


_PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "stack_frame": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


def _ptxas_resources(ptx: str, gpu_name: str, fmad: bool) -> dict[str, int]:
    """Registers, stack frame and spill bytes a thread from ``ptxas -v``, with the flags Triton compiles with."""
    path = ptxas_path()
    if path is None:
        raise RuntimeError("ptxas not found: install triton with its NVIDIA backend or set TRITON_PTXAS_PATH")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [path, "-lineinfo", *([] if fmad else ["--fmad=false"]), "-v", "--regAllocOptLevel=2"]
        cmd += [f"--gpu-name={gpu_name}", src, "-o", os.path.join(tmp, "k.cubin")]
        run = subprocess.run(cmd, capture_output=True, text=True)
    log = run.stdout + run.stderr
    if run.returncode != 0:
        raise RuntimeError(f"ptxas failed for {gpu_name}:\n{log}")
    out = {}
    for key, pattern in _PTXAS_RE.items():
        found = pattern.findall(log)
        if not found:
            raise RuntimeError(f"no {key} in the ptxas log:\n{log}")
        out[key] = max(int(v) for v in found)
    return out


# --------------------------------------------------------------------------------------------------------------
# Compilation for a target, with Triton's state restored
# --------------------------------------------------------------------------------------------------------------

_LOCK = threading.RLock()


class _TargetDriver:
    """Minimal stand-in for Triton's active driver: reports the compilation target, and nothing else."""

    def __init__(self, target: Any) -> None:
        self._target = target

    def get_current_target(self) -> Any:
        return self._target

    def get_current_device(self) -> int:
        return 0

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"compiling without a GPU: the driver's {name!r} is not available")


@contextlib.contextmanager
def _compiling_for(target: Any) -> Iterator[None]:
    """Compiled (not interpreted) code generation for target; knobs, environment and driver restored after."""
    from triton import knobs
    from triton.runtime import driver

    with _LOCK, knobs.runtime.scope(), knobs.compilation.scope():
        saved = driver._active
        knobs.runtime.interpret = False
        knobs.runtime.override_arch = None
        driver.set_active(_TargetDriver(target))
        try:
            yield
        finally:
            driver._active = saved


def _raw_function(kernel: Any) -> Callable:
    """The Python function under a JITFunction, InterpretedFunction or Autotuner (or the function itself)."""
    fn = kernel
    while not inspect.isfunction(fn):
        inner = getattr(fn, "fn", None)
        if inner is None:
            raise TypeError(f"not a Triton kernel: {kernel!r}")
        fn = inner
    return fn


def _compiles_here() -> bool:
    """Whether this process can generate GPU code: Triton's own library was decorated for compilation.

    Under ``TRITON_INTERPRET=1`` at Triton's import, its ``@triton.jit`` library functions are interpreter
    objects and code generation in this process is impossible; compilation then runs in worker processes.
    """
    import triton.language.standard as standard
    from triton.runtime.jit import JITFunction

    return isinstance(standard.sum, JITFunction)


@functools.cache
def _jit(fn: Callable) -> Any:
    from triton.runtime.jit import JITFunction

    return JITFunction(fn)


#: A compilation job: (module, kernel attribute name, argument values, meta-parameters, target).
_Job = tuple[str, str, tuple, tuple, Target]


def _kernel_fn(module: str, name: str) -> Callable:
    return _raw_function(getattr(importlib.import_module(module), name))


def _compile_job(job: _Job) -> CompileReport:
    """Compile one job in this process (which must compile, see :func:`_compiles_here`); errors are reported."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource
    from triton.runtime.jit import create_function_from_signature

    module, name, args, meta, tgt = job
    gpu_target = GPUTarget("cuda", tgt.arch, 32)
    kwargs = dict(meta, debug=False, instrumentation_mode="")
    try:
        with _compiling_for(gpu_target):
            jit = _jit(_kernel_fn(module, name))
            backend = CUDABackend(gpu_target)
            # Triton's own launch-time specialisation: pointer alignment, ints divisible by 16, ints equal to 1.
            binder = create_function_from_signature(jit.signature, jit.params, backend)
            bound, specialization, options = binder(*args, **kwargs)
            options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, specialization, options)
            compiled = triton.compile(ASTSource(jit, signature, constexprs, attrs), target=gpu_target,
                                      options=options.__dict__)  # fmt: skip
        md = compiled.metadata
        res = _ptxas_resources(compiled.asm["ptx"], tgt.name, bool(md.enable_fp_fusion))
        return CompileReport(name, tgt.name, md.num_warps, shared=md.shared, shared_limit=tgt.shared_limit, **res)
    except Exception as err:  # reported per launch: one bad configuration must not hide the others
        msg = f"{type(err).__name__}: {err}"
        return CompileReport(name, tgt.name, int(dict(meta).get("num_warps", 4)), -1, -1, -1, -1, -1,
                             tgt.shared_limit, error=msg[-4000:])  # fmt: skip


def _serve() -> None:
    """Worker: read a pickled list of jobs on stdin, write the pickled list of reports on stdout."""
    jobs = pickle.load(sys.stdin.buffer)
    reports = [_compile_job(job) for job in jobs]
    sys.stdout.buffer.write(pickle.dumps(reports))
    sys.stdout.buffer.flush()


def _compile_in_workers(jobs: list[_Job], n_workers: int) -> list[CompileReport]:
    """Compile jobs in fresh processes started with ``TRITON_INTERPRET=0``, jobs dealt round-robin."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    chunks = [jobs[i::n_workers] for i in range(n_workers)]
    procs = []
    for _ in chunks:
        proc = subprocess.Popen(
            # Imported by name (not run as __main__), so that the pickled reports name this module's classes.
            [sys.executable, "-c", f"from {__name__} import _serve; _serve()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
        )  # fmt: skip
        procs.append(proc)
    results: dict[int, CompileReport] = {}
    for w, (proc, chunk) in enumerate(zip(procs, chunks)):
        out, err = proc.communicate(pickle.dumps(chunk))
        if proc.returncode != 0:
            raise RuntimeError(f"compile worker failed (exit {proc.returncode}):\n{err.decode(errors='replace')}")
        for i, rep in enumerate(pickle.loads(out)):
            results[w + i * n_workers] = rep
    return [results[i] for i in range(len(jobs))]


#: Reports by job: every compilation once per process.
_REPORTS: dict[_Job, CompileReport] = {}


def _freeze(args: Sequence[Any], meta: Mapping[str, Any]) -> tuple[tuple, tuple]:
    args = tuple(TensorArg(a.dtype) if isinstance(a, torch.Tensor) else a for a in args)
    return args, tuple(sorted(meta.items()))


def compile_many(items: Sequence[tuple[Launch, str | Target]], workers: int | None = None) -> list[CompileReport]:
    """Reports of (launch, target) pairs (a target name of :data:`TARGETS` or a :class:`Target`), in order,
    compiled in parallel where needed.

    Compilations are cached per process. In a process that runs kernels through Triton's interpreter the
    compiler runs in up to ``workers`` subprocesses (default: the CPU count, at most 4); elsewhere it runs in this
    process unless ``workers`` > 1 is given.
    """
    jobs = [(ln.module, ln.name, *_freeze(ln.args, ln.meta), _target(t)) for ln, t in items]
    todo = list(dict.fromkeys(j for j in jobs if j not in _REPORTS))
    if todo:
        with _LOCK:
            if _compiles_here() and (workers or 1) <= 1:
                reports = [_compile_job(j) for j in todo]
            else:
                n = max(1, min(len(todo), workers or min(4, os.cpu_count() or 1)))
                reports = _compile_in_workers(todo, n)
            _REPORTS.update(zip(todo, reports))
    return [_REPORTS[j] for j in jobs]


def compile_kernel(kernel: Any, args: Sequence[Any], meta: Mapping[str, Any], target: str = "sm_90a") -> CompileReport:
    """Compile a Triton kernel for a GPU target, without a GPU, and report its resources.

    Args:
        kernel: a module-level ``@triton.jit`` kernel (compiled or interpreted form).
        args: positional argument values as the launcher passes them: tensors (or :class:`TensorArg`) for
            pointers, Python ints / floats / bools for scalars. Triton's launch-time specialisation applies
            (pointers 16-byte aligned, ints divisible by 16, ints equal to 1 become constants).
        meta: constexpr meta-parameters by name, plus ``num_warps`` / ``num_stages``.
        target: a key of :data:`TARGETS`.

    Returns:
        The :class:`CompileReport`; a kernel that does not compile (or that ptxas rejects) has ``error`` set.
    """
    fn = _raw_function(kernel)
    args, meta_items = _freeze(args, meta)
    launch = Launch(fn.__module__, fn.__name__, (), args, dict(meta_items))
    if _kernel_fn(launch.module, launch.name) is not fn:
        raise ValueError(f"{fn.__name__} is not a module-level kernel of {fn.__module__}")
    return compile_many([(launch, target)])[0]


def compile_launch(launch: Launch, target: str = "sm_90a") -> CompileReport:
    """:func:`compile_kernel` for a recorded :class:`Launch`."""
    return compile_many([(launch, target)])[0]


# --------------------------------------------------------------------------------------------------------------
# Recording the launches a launcher makes on a GPU
# --------------------------------------------------------------------------------------------------------------


class _Recorder:
    """Takes the place of a kernel object: ``kernel[grid](*args, **meta)`` appends a :class:`Launch`."""

    def __init__(self, module: str, name: str, sink: list[Launch]) -> None:
        self._module = module
        self._name = name
        self._sink = sink

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        def launch(*args: Any, **meta: Any) -> None:
            g = grid(meta) if callable(grid) else grid
            g = tuple(g) if isinstance(g, (tuple, list)) else (g,)
            args, items = _freeze(args, meta)
            self._sink.append(Launch(self._module, self._name, g, args, dict(items)))

        return launch


def _kernel_modules() -> list[Any]:
    return [importlib.import_module(f"{__package__}.{name}") for name in KERNEL_MODULES]


@contextlib.contextmanager
def _gpu_launch_context(n_sm: int, sink: list[Launch]) -> Iterator[None]:
    """Launchers see a CUDA device of n_sm SMs and compiled (not interpreted) kernels; every kernel records.

    Patched for the duration, then restored: ``TRITON_INTERPRET``, and in ``_common`` and each kernel module
    the kernel objects, ``launch_device`` (no CUDA context) and ``sm_count``.
    """
    from triton.runtime.jit import KernelInterface

    from . import _common

    modules = [_common, *_kernel_modules()]
    saved_env = os.environ.get("TRITON_INTERPRET")
    patched: list[tuple[Any, str, Any]] = []

    def patch(mod: Any, name: str, value: Any) -> None:
        patched.append((mod, name, getattr(mod, name)))
        setattr(mod, name, value)

    with _LOCK:
        try:
            os.environ["TRITON_INTERPRET"] = "0"
            for mod in modules:
                for name, obj in list(vars(mod).items()):
                    if isinstance(obj, KernelInterface):
                        patch(mod, name, _Recorder(mod.__name__, name, sink))
                if hasattr(mod, "launch_device"):
                    patch(mod, "launch_device", lambda t: contextlib.nullcontext())
                if hasattr(mod, "sm_count"):
                    patch(mod, "sm_count", lambda device: n_sm)
            yield
        finally:
            for mod, name, value in reversed(patched):
                setattr(mod, name, value)
            if saved_env is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = saved_env


def record_launches(module: str, make_args: Callable[[], tuple], n_sm: int = 132, **kwargs: Any) -> list[Launch]:
    """The kernel launches ``<module>._launch(*make_args(), **kwargs)`` makes on a CUDA device of n_sm SMs.

    The launcher runs for real (its host logic, allocations and meta-parameter choices) but on fake CUDA tensors
    (``torch._subclasses.FakeTensorMode``: shapes, dtypes and strides, no memory), and its kernels record
    instead of launching. No GPU is needed and CUDA is never initialised.

    Args:
        module: a name of :data:`KERNEL_MODULES`.
        make_args: builds the launcher's positional arguments; called inside the fake mode, so tensors it
            creates with ``device="cuda"`` are fake CUDA tensors.
        n_sm: SM count reported to launchers that size their grids by it.
        **kwargs: keyword arguments for ``_launch``.

    Returns:
        The launches, in launch order.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    mod = importlib.import_module(f"{__package__}.{module}")
    sink: list[Launch] = []
    with _gpu_launch_context(n_sm, sink), FakeTensorMode():
        mod._launch(*make_args(), **kwargs)
    return sink


# --------------------------------------------------------------------------------------------------------------
# The launches of the dispatch layer for the study's problems
# --------------------------------------------------------------------------------------------------------------

#: Problem sizes of the study: D = 3 x 224 x 224 inputs, B = 8 samples a call; m = 4 columns of W for
#: fisher_project; N = 4096 map pairs of 224 x 224 pixels and the four top-k fractions of drift.metrics.
STUDY_D = 3 * 224 * 224
#: D of InceptionV3's 299 px inputs: odd, so rows of J are not 16-byte aligned (no vector loads; more registers).
STUDY_D_ODD = 3 * 299 * 299
STUDY_B = 8
STUDY_M = 4
STUDY_MAPS = (4096, 224, 224)
STUDY_FRACTIONS = (0.05, 0.1, 0.2, 0.3)


@dataclasses.dataclass(frozen=True)
class Case:
    """One dispatch-level problem: operation, classes, J dtype, head, x (fisher_gram), m (fisher_project).

    For topk_iou only dtype (of the maps) and ties (the tie rule) matter; C, head, with_x and m are ignored.
    """

    op: str
    C: int = 5
    dtype: torch.dtype = torch.float32
    head: str = "softmax"
    with_x: bool = False
    m: int = STUDY_M
    B: int = STUDY_B
    D: int = STUDY_D
    ties: str = "fractional"

    def describe(self) -> str:
        dt = str(self.dtype).removeprefix("torch.")
        if self.op == "topk_iou":
            n, h, w = STUDY_MAPS
            return f"N={n} {h}x{w} T={len(STUDY_FRACTIONS)} {dt}{' index' if self.ties == 'index' else ''}"
        d = "" if self.D == STUDY_D else f" D={self.D}"
        if self.op == "fisher_project":
            return f"C={self.C} m={self.m} {dt} {self.head}{d}"
        return f"C={self.C} {dt} {self.head}{' +x' if self.with_x else ''}{d}"


def dispatch_launches(case: Case, target: str | Target = "sm_90a") -> list[Launch]:
    """The launches the dispatch layer makes for case on a GPU of target's kind (see :func:`record_launches`)."""
    tgt = _target(target)
    dt = case.dtype

    if case.op == "fisher_gram":

        def make() -> tuple:
            J = torch.empty(case.B, case.C, case.D, dtype=dt, device="cuda")
            p = torch.empty(case.B, case.C, dtype=torch.float32, device="cuda")
            x = torch.empty(case.B, case.D, dtype=torch.float32, device="cuda") if case.with_x else None
            return J, p, x, case.head

        return record_launches("fisher_gram_kernel", make, tgt.n_sm)
    if case.op == "fisher_project":

        def make() -> tuple:
            J = torch.empty(case.B, case.C, case.D, dtype=dt, device="cuda")
            p = torch.empty(case.B, case.C, dtype=torch.float32, device="cuda")
            W = torch.empty(case.B, case.C, case.m, dtype=torch.float32, device="cuda")
            return J, p, W, case.head

        return record_launches("fisher_project_kernel", make, tgt.n_sm)
    if case.op == "topk_iou":

        def make() -> tuple:
            a = torch.empty(*STUDY_MAPS, dtype=dt, device="cuda")
            return a, torch.empty_like(a), STUDY_FRACTIONS, case.ties

        return record_launches("topk_iou_kernel", make, tgt.n_sm)
    raise ValueError(f"unknown op {case.op!r}; expected fisher_gram, fisher_project or topk_iou")


@dataclasses.dataclass(frozen=True)
class Row:
    """One table row: a launch of a case compiled for a target."""

    case: Case
    launch: Launch
    report: CompileReport


def check(
    cases: Sequence[Case], targets: Sequence[str | Target] = tuple(TARGETS), workers: int | None = None
) -> list[Row]:
    """Compile every launch of every case for every target (see :func:`dispatch_launches`, :func:`compile_many`)."""
    planned = [(case, launch, t) for case in cases for t in targets for launch in dispatch_launches(case, t)]
    reports = compile_many([(launch, t) for _, launch, t in planned], workers)
    return [Row(case, launch, rep) for (case, launch, _), rep in zip(planned, reports)]


def study_cases(
    ops: Sequence[str] = ("fisher_gram", "fisher_project", "topk_iou"),
    classes: Sequence[int] = (5, 14, 100, 200),
    dtypes: Sequence[torch.dtype] = (torch.float32, torch.float16, torch.bfloat16),
    heads: Sequence[str] = ("softmax", "sigmoid"),
    with_x: Sequence[bool] = (False, True),
    ms: Sequence[int] = (STUDY_M,),
    ties: Sequence[str] = ("fractional",),
    dims: Sequence[int] = (STUDY_D,),
) -> list[Case]:
    """Every combination of the given options (x for fisher_gram, m for fisher_project, D for both; topk_iou:
    dtype x ties)."""
    cases = []
    for op in ops:
        if op == "topk_iou":
            cases += [Case(op, dtype=dt, ties=rule) for dt in dtypes for rule in ties]
            continue
        for D in dims:
            for C in classes:
                for dt in dtypes:
                    for head in heads:
                        if op == "fisher_gram":
                            cases += [Case(op, C, dt, head, x, D=D) for x in with_x]
                        else:
                            cases += [Case(op, C, dt, head, m=m, D=D) for m in ms]
    return cases


def _faults(rep: CompileReport) -> list[str]:
    if rep.error:
        return ["does not compile"]
    return (["spills"] if rep.spills else []) + ([] if rep.fits_shared else ["over shared limit"])


def format_table(rows: Sequence[Row], markdown: bool = False) -> str:
    """The rows as an aligned text table (or a Markdown table): resources per kernel x config x target."""
    head = ["kernel", "case", "launch", "target", "regs", "spill st/ld B", "stack B", "shared B", "limit B", "ok"]
    body = []
    for r in rows:
        rep = r.report
        verdict = "yes" if rep.ok else "NO: " + ", ".join(_faults(rep))
        body.append([
            rep.kernel.removeprefix("_"), r.case.describe(), r.launch.describe(), rep.target, str(rep.registers),
            f"{rep.spill_stores}/{rep.spill_loads}", str(rep.stack_frame), str(rep.shared), str(rep.shared_limit),
            verdict,
        ])  # fmt: skip
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*row) for row in body]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: compile the dispatch layer's launches for the chosen cases and targets, print the table.

    Returns 0 when every launch compiles without spills and fits its target's shared memory, 1 otherwise.
    """
    parser = argparse.ArgumentParser(prog="python -m drift_kernels.compile_check", description=__doc__.split("\n")[0])
    parser.add_argument("--ops", nargs="+", default=["fisher_gram", "fisher_project", "topk_iou"])
    parser.add_argument("--classes", nargs="+", type=int, default=[5, 14, 100, 200])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float16", "bfloat16"])
    parser.add_argument("--heads", nargs="+", default=["softmax", "sigmoid"])
    parser.add_argument("--with-x", nargs="+", choices=["no", "yes"], default=["no", "yes"], help="fisher_gram")
    parser.add_argument("--m", nargs="+", type=int, default=[STUDY_M], help="columns of W (fisher_project)")
    parser.add_argument("--dims", nargs="+", type=int, default=[STUDY_D], help="D, input dimensions (Fisher kernels)")
    parser.add_argument(
        "--ties", nargs="+", choices=["fractional", "index"], default=["fractional", "index"], help="topk_iou"
    )
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument(
        "--device", action="store_true", help="compile for this machine's CUDA device 0 (capability, SMs, shared limit)"
    )
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--workers", type=int, default=None, help="compile in this many subprocesses")
    args = parser.parse_args(argv)
    if ptxas_path() is None:
        print("ptxas not found: install triton with its NVIDIA backend or set TRITON_PTXAS_PATH", file=sys.stderr)
        return 2
    dtypes = [getattr(torch, name) for name in args.dtypes]
    with_x = [x == "yes" for x in args.with_x]
    cases = study_cases(args.ops, args.classes, dtypes, args.heads, with_x, args.m, args.ties, args.dims)
    targets: list[str | Target] = list(args.targets)
    if args.device:
        if not torch.cuda.is_available():
            print("--device: no CUDA device on this machine", file=sys.stderr)
            return 2
        targets = [device_target(0)]
        tgt = targets[0]
        print(f"device 0: {tgt.gpus}, {tgt.name}, {tgt.n_sm} SMs, {tgt.shared_limit} B shared memory a block")
    rows = check(cases, targets, workers=args.workers)
    print(format_table(rows, markdown=args.markdown))
    bad = [r for r in rows if not r.report.ok]
    for r in bad:
        if r.report.error:
            print(f"\n{r.report.kernel} {r.case.describe()} {r.report.target}: {r.report.error}", file=sys.stderr)
    print(f"\n{len(rows)} launches, {len(bad)} that do not compile, spill or exceed the shared limit")
    return 1 if bad else 0


if __name__ == "__main__":
    # The importable module's main, not this __main__ copy: compile workers unpickle its classes by module name.
    from drift_kernels.compile_check import main as _main

    sys.exit(_main())
