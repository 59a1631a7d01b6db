"""The benchmarked hot paths of drift, each declared once: how its inputs are built, its implementations, and the
check that an implementation's output is right.

* :data:`CAMS`: Grad-CAM++ and LayerCAM of a batch; drift's engine (one forward and one backward pass serve both
  maps) against pytorch-grad-cam (``GradCAMPlusPlus`` and ``LayerCAM``, a forward and a backward pass each).
* :data:`JACOBIAN`: the exact input Jacobian J (B, C, D) = dz/dx by each route of ``drift.fisher.input_jacobian``.
* :data:`IFIM_SPECTRUM`: the iFIM eigenvalues of ``drift.fisher.ifim`` (eigenvectors not formed).
* :data:`FISHER_GRAM`, :data:`FISHER_PROJECT`, :data:`TOPK_IOU`: the Triton kernels of ``drift_kernels``
  (public entry, and the launcher the entry calls once it has validated the inputs) against the torch references.

Every consumer times these declarations and nothing else: the asv suites (``time_pipeline``, ``time_kernels``,
``track_kernels``), the pytest-benchmark tests in ``tests/benchmarks`` and the scripts ``bench/cam_speed.py``,
``bench/jacobian_routes.py`` and ``bench/gpu_kernels.py``. Shapes are the consumer's choice (an asv parameter, a
random odd shape in a test, a command-line option); the input builders take them and a seed.

torch, numpy and drift are imported inside the functions: asv imports this module while discovering the suites,
and a benchmarked commit that lacks a module skips the benchmark (``NotImplementedError``) instead of failing it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ._support import generator, need, need_attr

#: Classes of the benchmark classifiers.
N_CLASSES = 5
#: The study's top-k fractions of a map.
FRACTIONS = (0.05, 0.1, 0.2, 0.3)
#: pytorch-grad-cam's Grad-CAM++ denominator term; drift takes it as ``eps`` so both engines compute the same maps.
PGC_EPS = 1e-6


@dataclass(frozen=True)
class HotPath:
    """A benchmarked computation.

    Attributes:
        name: short name.
        inputs: builds the inputs from the consumer's shape arguments, ``device`` and ``seed``.
        implementations: ``implementations()[name](inputs)`` returns a call without arguments that computes the
            output on those inputs (set-up such as hooks or the kernel's compilation happens before, not in it).
        check: ``check(inputs, name, output)`` compares the output of implementation ``name`` with an
            independent reference; returns the measured errors and raises AssertionError beyond the tolerance.
    """

    name: str
    inputs: Callable[..., Any]
    implementations: Callable[[], Mapping[str, Callable[[Any], Callable[[], Any]]]]
    check: Callable[[Any, str, Any], dict[str, float]]

    def call(self, implementation: str, inputs: Any) -> Callable[[], Any]:
        """The timed call of one implementation on ``inputs``."""
        impls = self.implementations()
        if implementation not in impls:
            raise NotImplementedError(f"{self.name} has no implementation {implementation!r} in this commit")
        return impls[implementation](inputs)


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """One torch thread and one BLAS thread, for the references: many small operations (per-sample autograd,
    LAPACK on a few hundred rows) that thread pools spinning against each other slow down many times over."""
    torch = need("torch")
    threadpool_limits = need_attr(need("threadpoolctl"), "threadpool_limits")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(before)


def _rel(got, exact) -> float:
    """max |got - exact| / max |exact| (float64)."""
    torch = need("torch")
    got, exact = torch.as_tensor(got).double().cpu(), torch.as_tensor(exact).double().cpu()
    return float((got - exact).abs().max() / exact.abs().max().clamp_min(torch.finfo(torch.float64).tiny))


# ---------------------------------------------------------------------------------------------------- models


def small_cnn(num_classes: int = N_CLASSES, in_chans: int = 1, widths: tuple[int, ...] = (8, 16, 16)):
    """Conv-BN-ReLU blocks (stride 2), global pooling and a linear head, eval-mode BatchNorm with random running
    statistics (so that it is more than the identity): a test-sized classifier (B, in_chans, H, W) -> (B, C)."""
    nn = need("torch.nn")
    layers = []
    for a, b in zip((in_chans, *widths[:-1]), widths):
        bn = nn.BatchNorm2d(b)
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        layers += [nn.Conv2d(a, b, 3, stride=2, padding=1), bn, nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[-1], num_classes))


def classifier(arch: str, device, seed: int = 0, num_classes: int = N_CLASSES, dtype=None):
    """``small_cnn`` or drift's classifier of ``arch`` (timm backbone and head, grayscale input), random init,
    eval mode, on ``device``."""
    torch = need("torch")
    torch.manual_seed(seed)
    if arch == "small_cnn":
        model = small_cnn(num_classes)
    else:
        model = need_attr(need("drift.models"), "build")(arch, num_classes)
    return model.to(device=device, dtype=dtype).eval()


def images(batch: int, size: int, device, seed: int = 7, dtype=None):
    """A batch (B, 1, size, size) of uniform [0, 1) grayscale images."""
    torch = need("torch")
    return torch.rand(batch, 1, size, size, generator=generator(seed), dtype=dtype or torch.float32).to(device)


# ------------------------------------------------------------------------------------------------------ CAMs


@dataclass
class CamInputs:
    model: Any
    x: Any
    targets: Any


def cam_inputs(arch: str, size: int, batch: int, device, seed: int = 0) -> CamInputs:
    """drift's classifier of ``arch``, a batch of grayscale images and a seeded target class per image."""
    torch = need("torch")
    targets = torch.randint(0, N_CLASSES, (batch,), generator=generator(seed + 1)).to(device)
    return CamInputs(classifier(arch, device, seed), images(batch, size, device, seed), targets)


def _cams_drift(inp: CamInputs) -> Callable[[], dict]:
    """Both maps from one pass, brought to the reference's output: min-max per map at the input size, NumPy."""
    attribution = need("drift.attribution")
    cams, normalize, upsample = (need_attr(attribution, n) for n in ("cams", "normalize", "upsample"))
    size = tuple(inp.x.shape[-2:])

    def run() -> dict:
        raw = cams(inp.model, inp.x, inp.targets, methods=("gradcam++", "layercam"), eps=PGC_EPS)
        return {m: normalize(upsample(v, size), "minmax").cpu().numpy() for m, v in raw.items()}

    return run


def _cams_pytorch_grad_cam(inp: CamInputs) -> Callable[[], dict]:
    """pytorch-grad-cam's GradCAMPlusPlus and LayerCAM, one object at a time (two live objects would both hook
    every forward pass)."""
    pgc = need("pytorch_grad_cam")
    target = need_attr(need("pytorch_grad_cam.utils.model_targets"), "ClassifierOutputTarget")
    wanted = [target(int(t)) for t in inp.targets.tolist()]

    def run() -> dict:
        out = {}
        for name, cls in (("gradcam++", pgc.GradCAMPlusPlus), ("layercam", pgc.LayerCAM)):
            cam = cls(model=inp.model, target_layers=[inp.model.cam_layer])
            try:
                out[name] = cam(input_tensor=inp.x, targets=wanted)
            finally:
                cam.activations_and_grads.release()
        inp.model.zero_grad(set_to_none=True)
        return out

    return run


def _cams_check(inp: CamInputs, implementation: str, out: dict) -> dict[str, float]:
    """The other engine's maps (one thread), equal to 1e-4 after min-max normalisation; not all maps constant."""
    np = need("numpy")
    other = "pytorch-grad-cam" if implementation == "drift" else "drift"
    with single_thread():
        ref = CAMS.call(other, inp)()
    err = 0.0
    for m in ("gradcam++", "layercam"):
        assert out[m].shape == ref[m].shape, (m, out[m].shape, ref[m].shape)
        assert (np.ptp(out[m].reshape(len(out[m]), -1), axis=1) > 0).any(), f"{m}: every map is constant"
        err = max(err, float(np.abs(out[m] - ref[m]).max()))
    assert err <= 1e-4, f"max |{implementation} - {other}| after min-max = {err}"
    return {"max_abs_diff": err}


CAMS = HotPath(
    "cams",
    cam_inputs,
    lambda: {"drift": _cams_drift, "pytorch-grad-cam": _cams_pytorch_grad_cam},
    _cams_check,
)


# ---------------------------------------------------------------------------------------- Jacobian, spectrum


@dataclass
class JacobianInputs:
    model: Any
    x: Any


def jacobian_inputs(
    arch: str, size: int, batch: int, device, seed: int = 0, dtype=None, num_classes: int = N_CLASSES
) -> JacobianInputs:
    """A classifier (``small_cnn`` or a drift architecture) and a batch of grayscale images, in ``dtype``."""
    model = classifier(arch, device, seed, num_classes, dtype)
    return JacobianInputs(model, images(batch, size, device, seed, dtype))


def _routes() -> dict[str, Callable[[JacobianInputs], Callable[[], Any]]]:
    fisher = need("drift.fisher")
    input_jacobian = need_attr(fisher, "input_jacobian")
    routes = getattr(fisher, "JACOBIAN_ROUTES", {"loop": None})

    def route(name: str):
        return lambda inp: lambda: input_jacobian(inp.model, inp.x, route=name)[0]

    return {name: route(name) for name in routes}


def brute_force_jacobian(model, x):
    """(B, C, D) float64 NumPy from ``torch.autograd.functional.jacobian`` of the whole batch (B, C, B, *S),
    whose off-diagonal blocks must vanish (in eval mode the samples of a batch do not interact).

    The batched forward, as the engine's: a batch of one can take other kernels, whose rounding may flip a max-pool
    argmax between nearly equal inputs and so pick another (equally valid) subgradient.
    """
    torch, np = need("torch"), need("numpy")
    B = x.shape[0]
    full = torch.autograd.functional.jacobian(lambda xb: model(xb), x)
    full = full.reshape(B, full.shape[1], B, -1).double().cpu().numpy()
    idx = np.arange(B)
    diag = full[idx, :, idx]
    off = full.copy()
    off[idx, :, idx] = 0
    assert np.abs(off).max() <= 1e-12 * np.abs(diag).max(), "samples of a batch interact: not in eval mode?"
    return diag


def _jacobian_check(inp: JacobianInputs, implementation: str, J) -> dict[str, float]:
    """J against the brute-force Jacobian: shape (B, C, D), relative error <= 1e-5."""
    with single_thread():
        ref = brute_force_jacobian(inp.model, inp.x)
    assert tuple(J.shape) == ref.shape, (tuple(J.shape), ref.shape)
    err = _rel(J, ref)
    assert err <= 1e-5, f"route {implementation}: max relative error {err}"
    return {"max_rel_error": err}


JACOBIAN = HotPath("jacobian", jacobian_inputs, _routes, _jacobian_check)


def _spectrum(inp: JacobianInputs) -> Callable[[], Any]:
    ifim = need_attr(need("drift.fisher"), "ifim")
    return lambda: ifim(inp.model, inp.x, eigenvectors=False).eigenvalues


def fisher_eigenvalues(J, p):
    """Descending eigenvalues of F = J^T (diag(p) - p p^T) J for one sample, J (C, D), p (C,), float64 NumPy.

    The D x D matrix itself when D <= 1024; for larger inputs the same nonzero eigenvalues from the C x C matrix
    M^1/2 J J^T M^1/2, M = diag(p) - p p^T.
    """
    np = need("numpy")
    M = np.diag(p) - np.outer(p, p)
    if J.shape[1] <= 1024:
        return np.linalg.eigvalsh(J.T @ M @ J)[::-1]
    w, V = np.linalg.eigh(M)
    half = V @ np.diag(np.sqrt(np.clip(w, 0, None))) @ V.T
    return np.linalg.eigvalsh(half @ J @ J.T @ half)[::-1]


def _spectrum_check(inp: JacobianInputs, implementation: str, eigenvalues) -> dict[str, float]:
    """The C - 1 eigenvalues (rank F <= C - 1, softmax head) against the brute-force Fisher matrix's, relative to
    the largest: <= 1e-4."""
    torch = need("torch")
    with single_thread():
        J = brute_force_jacobian(inp.model, inp.x)
        with torch.no_grad():
            p = torch.softmax(inp.model(inp.x).double(), dim=1).cpu().numpy()
    worst = 0.0
    for b in range(J.shape[0]):
        want = fisher_eigenvalues(J[b], p[b])[: p.shape[1] - 1]
        got = eigenvalues[b].double().cpu().numpy()
        assert got.shape == want.shape, (got.shape, want.shape)
        worst = max(worst, float(abs(got - want).max() / want[0]))
    assert worst <= 1e-4, f"max eigenvalue error {worst} of the largest"
    return {"max_rel_error": worst}


IFIM_SPECTRUM = HotPath("ifim_spectrum", jacobian_inputs, lambda: {"drift": _spectrum}, _spectrum_check)


# --------------------------------------------------------------------------------------------------- kernels

#: Floor of the kernels' error rule: a different (split-D) summation order than the reference's still carries a few
#: float32 ulps of the largest entry when the reference happens to round almost exactly.
ULPS = 8 * 1.1920928955078125e-07


@dataclass
class FisherInputs:
    """J (B, C, D) standard normal in ``dtype``, p (B, C) = softmax(3 z) float32 (z standard normal), x (B, D)
    uniform [0, 1) in ``dtype`` (None without x), W (B, C, m) standard normal float32."""

    J: Any
    p: Any
    x: Any
    W: Any


def fisher_inputs(B: int, C: int, D: int, device, seed: int = 0, dtype=None, m: int = 4, with_x: bool = True):
    """:class:`FisherInputs`, drawn on ``device`` from a generator seeded by ``seed``."""
    torch = need("torch")
    g = generator(seed, device)
    dt = dtype or torch.float32
    J = torch.randn(B, C, D, generator=g, device=device).to(dt)
    p = torch.softmax(3 * torch.randn(B, C, generator=g, device=device, dtype=torch.float64), 1).float()
    x = torch.rand(B, D, generator=g, device=device).to(dt) if with_x else None
    W = torch.randn(B, C, m, generator=g, device=device)
    return FisherInputs(J, p, x, W)


def _kernel_module(name: str):
    return need(f"drift_kernels.{name}")


def _triton(t) -> None:
    """NotImplementedError (asv: skipped) unless the Triton kernel is what runs on ``t``: a CUDA tensor, or any
    tensor under Triton's interpreter (``TRITON_INTERPRET=1``), and ``DRIFT_KERNELS`` not forcing the reference."""
    if need("drift_kernels").backend(t) != "triton":
        raise NotImplementedError("the Triton kernels run on CUDA devices (or under TRITON_INTERPRET=1) only")


def _fisher_implementations(op: str) -> dict[str, Callable[[FisherInputs], Callable[[], Any]]]:
    dk = need("drift_kernels")
    entry, reference = need_attr(dk, op), need_attr(dk, f"{op}_reference")
    if op == "fisher_gram":

        def args(i: FisherInputs) -> tuple:
            return (i.J, i.p, i.x, "softmax")

    else:

        def args(i: FisherInputs) -> tuple:
            return (i.J, i.p, i.W, "softmax")

    def kernel(i: FisherInputs) -> Callable[[], Any]:
        _triton(i.J)
        return lambda: entry(*args(i))

    def launcher(i: FisherInputs) -> Callable[[], Any]:
        _triton(i.J)
        entry(*args(i))  # validates the inputs once, untimed (and compiles the kernel)
        return lambda: _kernel_module(f"{op}_kernel")._launch(*args(i))

    return {
        "kernel": kernel,
        "launcher": launcher,
        "reference": lambda i: lambda: reference(*args(i)),
    }


def _factor_chunks(i: FisherInputs, chunk: int = 8):
    """(slice, G) over chunks of samples: the Fisher factor in float64, G_c = sqrt(p_c) (J_c - sum_j p_j J_j)
    (drift.fisher's module docstring), from the rounded inputs, on their device."""
    torch = need("torch")
    B = i.J.shape[0]
    for s in range(0, B, chunk):
        sl = slice(s, min(B, s + chunk))
        J, p = i.J[sl].double(), i.p[sl].double()
        yield sl, p.sqrt().unsqueeze(-1) * (J - torch.einsum("bc,bcd->bd", p, J).unsqueeze(1))


def fisher_gram_exact(i: FisherInputs):
    """K = G G^T (B, C, C) and G x (B, C) (None without x), float64."""
    torch = need("torch")
    K, Gx = [], []
    for sl, G in _factor_chunks(i):
        K.append(G @ G.transpose(1, 2))
        if i.x is not None:
            Gx.append(torch.einsum("bcd,bd->bc", G, i.x[sl].double()))
    return torch.cat(K), (torch.cat(Gx) if Gx else None)


def fisher_project_exact(i: FisherInputs):
    """G^T W (B, D, m), float64."""
    torch = need("torch")
    return torch.cat([G.transpose(1, 2) @ i.W[sl].double() for sl, G in _factor_chunks(i)])


def _kernel_rule(err: float, ref_err: float, implementation: str) -> dict[str, float]:
    # The reference accumulates in fp32 over D terms: a few float32 ulps at most, whatever the input dtype.
    assert ref_err <= 1e-5, f"reference error {ref_err}"
    assert err <= max(2 * ref_err, ULPS), f"{implementation}: error {err} > 2 x the reference's {ref_err}"
    return {"max_rel_error": err, "reference_max_rel_error": ref_err}


def gram_error(i: FisherInputs, out) -> float:
    """Relative error of (K, G x) against float64 (the larger of the two)."""
    K_exact, Gx_exact = fisher_gram_exact(i)
    K, Gx = out
    assert tuple(K.shape) == tuple(K_exact.shape), (tuple(K.shape), tuple(K_exact.shape))
    return max(_rel(K, K_exact), _rel(Gx, Gx_exact) if Gx_exact is not None else 0.0)


def _gram_check(i: FisherInputs, implementation: str, out) -> dict[str, float]:
    """K and G x against float64: relative error <= max(2 x the torch reference's, ULPS)."""
    return _kernel_rule(gram_error(i, out), gram_error(i, FISHER_GRAM.call("reference", i)()), implementation)


def project_error(i: FisherInputs, V) -> float:
    """Relative error of G^T W against float64."""
    exact = fisher_project_exact(i)
    assert tuple(V.shape) == tuple(exact.shape), (tuple(V.shape), tuple(exact.shape))
    return _rel(V, exact)


def _project_check(i: FisherInputs, implementation: str, V) -> dict[str, float]:
    """G^T W against float64: relative error <= max(2 x the torch reference's, ULPS)."""
    ref = FISHER_PROJECT.call("reference", i)()
    return _kernel_rule(project_error(i, V), project_error(i, ref), implementation)


FISHER_GRAM = HotPath("fisher_gram", fisher_inputs, lambda: _fisher_implementations("fisher_gram"), _gram_check)
FISHER_PROJECT = HotPath(
    "fisher_project", fisher_inputs, lambda: _fisher_implementations("fisher_project"), _project_check
)


@dataclass
class MapInputs:
    """Two stacks (N, H, W) of maps quantised to ``levels`` values in [0, 1] (many ties, so the tie rule decides
    much of each top-k set, as in upsampled coarse CAMs) and the tie rule: ``"fractional"`` (the study's, the
    entries' default) or ``"index"`` (integer counts)."""

    a: Any
    b: Any
    ties: str


def map_inputs(
    N: int, H: int, W: int, device, seed: int = 0, dtype=None, levels: int = 8, ties: str = "fractional"
) -> MapInputs:
    torch = need("torch")
    g = generator(seed, device)
    dt = dtype or torch.float32

    def draw():
        return (torch.randint(0, levels, (N, H, W), generator=g, device=device).float() / (levels - 1)).to(dt)

    return MapInputs(draw(), draw(), ties)


def _topk_implementations() -> dict[str, Callable[[MapInputs], Callable[[], Any]]]:
    dk = need("drift_kernels")
    entry, reference = dk.topk_iou, need_attr(dk, "topk_iou_reference")

    def kernel(i: MapInputs) -> Callable[[], Any]:
        _triton(i.a)
        return lambda: entry(i.a, i.b, FRACTIONS, ties=i.ties)

    def launcher(i: MapInputs) -> Callable[[], Any]:
        _triton(i.a)
        entry(i.a, i.b, FRACTIONS, ties=i.ties)  # validates the maps once, untimed (and compiles the kernel)
        return lambda: _kernel_module("topk_iou_kernel")._launch(i.a, i.b, FRACTIONS, i.ties)

    return {
        "kernel": kernel,
        "launcher": launcher,
        "reference": lambda i: lambda: reference(i.a, i.b, FRACTIONS, ties=i.ties),
    }


def topk_weights(maps, k: int, ties: str):
    """(N, P) float64 top-k membership of each map (N, P), by value descending: ``"index"``, the first k of a
    stable sort of -value (ties to the lower flat index); ``"fractional"``, 1 above the k-th largest value t and
    (k - #{v > t}) / #{v == t} at it."""
    np = need("numpy")
    if ties == "index":
        w = np.zeros(maps.shape)
        np.put_along_axis(w, np.argsort(-maps, axis=1, kind="stable")[:, :k], 1.0, axis=1)
        return w
    t = -np.partition(-maps, k - 1, axis=1)[:, k - 1 : k]
    above, tied = maps > t, maps == t
    return above + tied * ((k - above.sum(1, keepdims=True)) / tied.sum(1, keepdims=True))


def topk_mismatches(i: MapInputs, out, rows: int = 64) -> int:
    """Entries of (intersection, union) that differ from a NumPy brute force of the tie rule (exactly for
    ``"index"``, beyond 1e-9 k for ``"fractional"``), over at most ``rows`` evenly spaced maps; the IoU must equal
    their ratio. inter = sum_i w_a,i w_b,i and union = 2k - inter, w from :func:`topk_weights`."""
    np = need("numpy")
    inter, union, iou = (t.double().cpu().numpy() for t in out)
    N, H, W = i.a.shape
    pick = np.unique(np.linspace(0, N - 1, min(N, rows)).round().astype(int))
    fa = i.a[pick].float().reshape(len(pick), -1).cpu().numpy()
    fb = i.b[pick].float().reshape(len(pick), -1).cpu().numpy()
    bad = 0
    for t, f in enumerate(FRACTIONS):
        k = math.ceil(round(f * H * W, 9))
        want_i = (topk_weights(fa, k, i.ties) * topk_weights(fb, k, i.ties)).sum(1)
        want_u = 2 * k - want_i
        tol = 0 if i.ties == "index" else 1e-9 * k
        bad += int((np.abs(inter[pick, t] - want_i) > tol).sum() + (np.abs(union[pick, t] - want_u) > tol).sum())
        np.testing.assert_allclose(iou[pick, t], want_i / want_u, rtol=1e-6)
    return bad


def _topk_check(i: MapInputs, implementation: str, out) -> dict[str, float]:
    """Intersections and unions equal to the brute force's, to the count."""
    bad = topk_mismatches(i, out)
    assert bad == 0, f"{implementation}: {bad} counts differ from the brute force"
    return {"mismatches": float(bad)}


TOPK_IOU = HotPath("topk_iou", map_inputs, _topk_implementations, _topk_check)

#: Every declared hot path by name.
HOT_PATHS = {p.name: p for p in (CAMS, JACOBIAN, IFIM_SPECTRUM, FISHER_GRAM, FISHER_PROJECT, TOPK_IOU)}
