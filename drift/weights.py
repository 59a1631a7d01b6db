"""Weights on disk: checkpoints (saved with their sha256, loaded without unpickling code), backbone weights files,
and ImageNet weights through timm's hub cache (a local file, the Hugging Face cache, or a download from
``HF_ENDPOINT``; ``HF_HUB_OFFLINE`` honoured), each failure named with the file or model at fault."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import timm
import torch

from .models import Classifier, build


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(model: Classifier, path: str | os.PathLike, meta: dict | None = None) -> str:
    """Write the model's state (tensors and plain metadata only) atomically; returns the file's sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"arch": model.arch, "num_classes": model.num_classes, "input_size": model.input_size,
               "state_dict": model.state_dict()}
    payload["meta"] = {k: str(v) for k, v in (meta or {}).items()}
    from .safefile import RecordingWriter, exclusive_tmp, write_error

    tmp, fd = exclusive_tmp(path)  # never through a link planted at <name>.tmp
    writer = None
    try:
        with os.fdopen(fd, "wb") as fh:
            writer = RecordingWriter(fh)  # torch's zip writer hides the OSError of a full disk: remember it
            torch.save(payload, writer)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        # Disk full, quota, read-only folder: no partial file is left under either name.
        tmp.unlink(missing_ok=True)
        raise write_error(path, (writer and writer.error) or exc, "checkpoint") from None
    return sha256_file(path)


def load_state(path: str | os.PathLike) -> dict:
    """Read a checkpoint or weights file without unpickling arbitrary objects (safetensors or weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors" or path.name.endswith("model.safetensors"):
        from safetensors.torch import load_file

        try:
            return {"state_dict": load_file(str(path))}
        except Exception as exc:  # safetensors raises its own error types for a truncated or foreign file
            raise ValueError(f"cannot read weights from {path}: not a valid safetensors file ({exc})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, or pickled objects that weights_only refuses
        raise ValueError(f"cannot read weights from {path}: {exc}") from exc
    if isinstance(obj, dict) and "state_dict" in obj:
        return obj
    if isinstance(obj, dict):
        return {"state_dict": obj}
    raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")


def load_checkpoint(path: str | os.PathLike, arch: str, num_classes: int, dropout: float = 0.2) -> Classifier:
    """A :class:`Classifier` restored from :func:`save_checkpoint`'s file (with its input size); arch and C
    must match."""
    obj = load_state(path)
    if obj.get("arch", arch) != arch or int(obj.get("num_classes", num_classes)) != num_classes:
        raise ValueError(
            f"checkpoint {path} is {obj.get('arch')} with {obj.get('num_classes')} classes, "
            f"expected {arch} with {num_classes}"
        )
    model = build(arch, num_classes, dropout, int(obj.get("input_size", 0)))
    model.load_state_dict(obj["state_dict"])
    return model


def load_backbone_weights(model: Classifier, state: dict, source: str) -> None:
    """Load a backbone state dict (timm names, optionally prefixed ``backbone.``); classifier keys are dropped."""
    sd = state.get("state_dict", state)
    sd = {k.removeprefix("backbone."): v for k, v in sd.items()}
    own = model.backbone.state_dict()
    kept = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in kept]
    if missing:
        raise ValueError(
            f"{source}: {len(missing)} backbone tensors of {model.arch} missing or of another shape "
            f"(first: {missing[:3]}); is this a {model.spec.timm_name} checkpoint?"
        )
    model.backbone.load_state_dict(kept)


def _hub_cache_dir() -> Path:
    """timm's (Hugging Face's) local model cache, read from the environment at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home) / "hub"


_HUB_TRUE = frozenset({"1", "ON", "YES", "TRUE"})


class _WeightsUnavailableError(FileNotFoundError, ValueError):
    """No ImageNet weights in the local cache, and none could be downloaded.

    A ``ValueError`` like every other configuration error, and a ``FileNotFoundError`` as the weights are a missing
    file.
    """


def _hub_source(name: str) -> tuple[str, str | None, list[str]]:
    """Where timm reads the pretrained weights of ``name`` from on the Hugging Face hub.

    Args:
        name: timm model name.

    Returns:
        The repo id, the revision (None: the default branch) and the weight file names in timm's order: a
        safetensors file first, then the pickled file it stands in for. An empty repo id when timm knows no hub
        weights for ``name``.
    """
    cfg = timm.models.get_pretrained_cfg(name)
    hub = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub:
        return "", None, []
    repo, _, revision = hub.partition("@")
    filename = getattr(cfg, "hf_hub_filename", None) or "pytorch_model.bin"
    if filename.endswith(".safetensors"):
        return repo, revision or None, [filename]
    safe = {"pytorch_model.bin": "model.safetensors", "open_clip_pytorch_model.bin": "open_clip_model.safetensors"}
    alt = safe.get(filename) or (filename[:-4] + ".safetensors" if filename.endswith(".bin") else None)
    return repo, revision or None, [alt, filename] if alt else [filename]


def _hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is on, as huggingface_hub read it at import or now."""
    from huggingface_hub import constants

    now = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(constants.HF_HUB_OFFLINE) or now.strip().upper() in _HUB_TRUE


def _hub_endpoint() -> str:
    """The hub's address: ``HF_ENDPOINT`` as set now, else what huggingface_hub read at import (huggingface.co)."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _why(exc: BaseException) -> str:
    """One line on why a download failed: the error and the error it wraps, if any."""
    parts = []
    for err in (exc, exc.__cause__):
        if err is not None:
            lines = str(err).strip().splitlines()
            parts.append(f"{type(err).__name__}: {lines[0][:160]}" if lines else type(err).__name__)
    return ", caused by ".join(parts)


def _fetch_hub_weights(name: str, arch: str, cache: Path) -> tuple[str, str, str]:
    """The local path of timm's pretrained weights of ``name``: from the Hugging Face cache ``cache`` when there,
    else downloaded into it (unless offline).

    Args:
        name: timm model name.
        arch: registry name, for the error message.
        cache: the hub cache folder.

    Returns:
        Repo id, file name and local path of the weights.

    Raises:
        _WeightsUnavailableError: timm has no hub weights for ``name``, or they are neither in the cache nor
            downloadable; the message names the repo, the files, the cache and the ways to provide them.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo, revision, filenames = _hub_source(name)
    local = f"set model.weights_file to a .safetensors/.pth file of {name}"
    if not repo:
        raise _WeightsUnavailableError(f"no ImageNet weights for {arch}: timm names no Hugging Face repo for {name}; "
                                       f"{local}")
    offline, endpoint = _hub_offline(), _hub_endpoint()
    failures, unreachable = [], False
    for filename in filenames:
        try:
            path = hf_hub_download(repo, filename, revision=revision, cache_dir=str(cache),
                                   local_files_only=offline or unreachable, endpoint=endpoint)
            return repo, filename, str(path)
        except Exception as exc:  # not in the repo or cache, hub unreachable or refusing, disk full: reported below
            if not unreachable:
                failures.append(f"{filename}: {_why(exc)}")
            # An unreachable hub (after huggingface_hub's retries) is not asked again: further files, cache only.
            unreachable = unreachable or isinstance(exc, LocalEntryNotFoundError)
    looked = " or ".join(f"{repo}/{f}" for f in filenames) + (f" (revision {revision})" if revision else "")
    how = ("offline mode is on (HF_HUB_OFFLINE), so nothing was downloaded" if offline
           else f"downloading from {endpoint} failed ({'; '.join(failures)})"
           + ("; on a machine without network access, HF_HUB_OFFLINE=1 skips the attempt" if unreachable else ""))
    raise _WeightsUnavailableError(
        f"no ImageNet weights for {arch} (timm model {name}): {looked} is not in the Hugging Face cache {cache}, and "
        f"{how}. To provide them, {local}, or copy ~/.cache/huggingface/hub from a machine with network access "
        f"(where the weights have been loaded once) to {cache}."
    )


def _read_weights(path: str | os.PathLike) -> dict:
    """:func:`load_state`, with a one-line reason when ``torch.load`` refuses the file.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is not a safetensors file nor a state dict saved by ``torch.save``; names the file.
    """
    try:
        return load_state(path)
    except ValueError as exc:
        if exc.__cause__ is None:  # already one line naming the file
            raise
        lines = [ln.strip() for ln in str(exc.__cause__).splitlines() if ln.strip()]
        unpickler = [ln[ln.rfind(" ", 0, ln.find("Unpickler error")) + 1:] + " " + nxt
                     for ln, nxt in zip(lines, [*lines[1:], ""]) if "Unpickler error" in ln]
        why = unpickler[0] if unpickler else lines[0] if lines else type(exc.__cause__).__name__
        raise ValueError(f"cannot read weights from {path}: not a safetensors file nor a state dict saved by "
                         f"torch.save that loads with weights_only=True ({why[:200].strip()})") from None


def _load_error_summary(exc: BaseException) -> str:
    """``load_state_dict``'s error in one line: each kind of mismatch, its count and the first keys."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    parts = []
    for ln in lines[1:]:
        kind, _, keys = ln.partition(": ")
        if kind.endswith("key(s) in state_dict"):
            names = [k.strip('" ') for k in keys.split(", ")]
            parts.append(f"{kind.removesuffix(' in state_dict').lower()}: {len(names)} (first: {', '.join(names[:3])})")
        else:
            parts.append(ln[:160])
    return "; ".join(parts[:3])[:400] if parts else (lines[0] if lines else type(exc).__name__)


def _with_placeholder_head(name: str, sd: dict) -> dict:
    """``sd`` with timm's classifier of ``name`` replaced by zeros of the pretrained shape.

    The classifier is never used (the study's head is new), so a backbone-only file, or one with another number of
    classes, passes timm's strict load like a full ImageNet checkpoint.
    """
    with torch.device("meta"):
        ref = timm.create_model(name)
    heads = ref.pretrained_cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    if not heads:
        return dict(sd)
    prefixes = tuple(h + "." for h in heads)
    out = {k: v for k, v in sd.items() if not k.startswith(prefixes)}
    out.update({k: torch.zeros(v.shape, dtype=v.dtype) for k, v in ref.state_dict().items() if k.startswith(prefixes)})
    return out


def _timm_pretrained_state(name: str, state: dict, source: str) -> dict:
    """``state`` passed through timm's own loading of pretrained weights for ``name`` (its key conversions, then a
    strict load), as the full model's state dict.

    Raises:
        ValueError: ``state`` does not hold the weights of ``name``; the message names ``source``.
    """
    sd = state.get("state_dict", state)
    if not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{source} holds no tensors of {name} (empty, or not a state dict)")
    sd = _with_placeholder_head(name, sd)
    try:
        ref = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"state_dict": sd})
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"{source} does not hold the weights of timm's {name}: {_load_error_summary(exc)}") from None
    return ref.state_dict()


def check_preprocessing(model: Classifier) -> None:
    """Refuse ImageNet weights for a model whose input normalisation is not the one timm's pretrained config of
    the weights declares (:func:`drift.models.pretrained_preprocessing`): the weights would see inputs on
    another scale than in their training.

    Raises:
        ValueError: naming the architecture, the weights and both normalisations.
    """
    from .models import pretrained_preprocessing

    want = pretrained_preprocessing(model.arch)
    have = model.normalization
    if any(abs(a - b) > 1e-6 for k in ("mean", "std") for a, b in zip(have[k], want[k])):
        raise ValueError(f"{model.arch}: the model normalises its input with mean {have['mean']}, std {have['std']}, "
                         f"but timm's pretrained config of {want['weights']} declares mean {list(want['mean'])}, "
                         f"std {list(want['std'])}: correct drift.models.REGISTRY[{model.arch!r}]")


def load_imagenet(model: Classifier, weights_file: str | None = None) -> str:
    """Load ImageNet weights into the backbone of ``model``; the head stays as initialised.

    The weights come from ``weights_file`` when given, else from timm's pretrained weights on the Hugging Face hub,
    fetched the way timm fetches them: from the local cache (``HF_HUB_CACHE``, or ``HF_HOME``/hub, by default
    ``~/.cache/huggingface/hub``) when there, else downloaded once into it from ``HF_ENDPOINT`` (huggingface.co by
    default). ``HF_HUB_OFFLINE=1`` allows the cache only. Hub files go through timm's key conversions and a strict
    load, as with ``timm.create_model(name, pretrained=True)``. The model's input normalisation must be the one
    timm's pretrained config of the weights declares (:func:`check_preprocessing`; a ``weights_file`` is taken to
    hold the weights of timm's default pretrained tag).

    Args:
        model: the classifier whose backbone receives the weights.
        weights_file: a local .safetensors/.pth file of the backbone (timm names, optionally prefixed
            ``backbone.``, or a drift checkpoint); empty or None: timm's pretrained weights.

    Returns:
        Where the weights came from: the file, or the hub repo, file and commit.

    Raises:
        FileNotFoundError: ``weights_file`` does not exist.
        ValueError: a file is not a valid checkpoint of the backbone (the message names the file), or no weights
            are cached and none can be downloaded (the message names the timm model, the repo and files looked
            for, the cache folder and how to provide the weights; this error is also a FileNotFoundError).
    """
    name = model.spec.timm_name
    check_preprocessing(model)
    if weights_file:
        state = _read_weights(weights_file)
        try:
            load_backbone_weights(model, state, weights_file)
        except ValueError as direct:
            # timm's own file of the model (as found on the hub), if its keys need timm's conversion.
            try:
                converted = _timm_pretrained_state(name, state, str(weights_file))
            except ValueError:
                raise direct from None
            load_backbone_weights(model, converted, str(weights_file))
        return str(weights_file)
    cache = _hub_cache_dir()
    repo, filename, path = _fetch_hub_weights(name, model.arch, cache)
    where = f"{repo}/{filename} (cached as {path})"
    try:
        state = _read_weights(path)
    except (OSError, ValueError) as exc:
        folder = cache / ("models--" + repo.replace("/", "--"))
        raise ValueError(f"{exc}. It is {repo}/{filename} from the Hugging Face hub: delete {folder} to download "
                         f"it again, or set model.weights_file") from None
    load_backbone_weights(model, _timm_pretrained_state(name, state, where), where)
    commit = Path(path).parent.name if Path(path).parent.parent.name == "snapshots" else "unknown"
    return f"timm pretrained {repo}/{filename} (commit {commit})"
