"""SAEs behind one interface: sae-lens releases, GemmaScope-2 folders, sae-lens folders, or trained here.

Whatever the source, the result is a sae-lens ``SAE`` whose ``encode`` maps residual vectors
``[..., d_in]`` to feature activations ``[..., d_sae]``. Training uses sae-lens's own ``SAETrainer`` on
activation vectors we collect, and saves in sae-lens's format (``SAE.load_from_disk`` reloads it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

log = logging.getLogger(__name__)

FINISHED_MARKER = "FINISHED.json"


class SAEError(ValueError):
    """An SAE could not be loaded, or does not fit the model."""


class NativeEncoder(torch.nn.Module):
    """The encoder half of a JumpReLU or TopK SAE in plain torch: one ``addmm`` and an activation.

    Built from a sae-lens SAE's weights (``from_saelens``) it gives the same activations; it skips the
    hook points and lets the extraction run the encode in the dtype of its choice on the device.
    """

    def __init__(self, W_enc: torch.Tensor, b_enc: torch.Tensor, *, threshold: torch.Tensor | None = None,
                 k: int | None = None, b_dec_in: torch.Tensor | None = None) -> None:
        super().__init__()
        if (threshold is None) == (k is None):
            raise SAEError("a native encoder needs exactly one of threshold (JumpReLU) or k (TopK)")
        self.W_enc = torch.nn.Parameter(W_enc.detach().clone(), requires_grad=False)
        self.b_enc = torch.nn.Parameter(b_enc.detach().clone(), requires_grad=False)
        self.threshold = None if threshold is None else torch.nn.Parameter(
            threshold.detach().clone().clamp_min(0), requires_grad=False)
        self.b_dec_in = None if b_dec_in is None else torch.nn.Parameter(b_dec_in.detach().clone(),
                                                                        requires_grad=False)
        self.k = k

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @torch.inference_mode()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1]).to(self.W_enc.dtype)
        if self.b_dec_in is not None:
            x = x - self.b_dec_in
        pre = torch.addmm(self.b_enc, x, self.W_enc)
        if self.threshold is not None:
            acts = pre * (pre > self.threshold)
        else:
            assert self.k is not None  # __init__ takes exactly one of threshold and k
            vals, idx = pre.topk(self.k, dim=-1, sorted=False)
            acts = torch.zeros_like(pre).scatter_(-1, idx, vals.relu())
        return acts.reshape(*shape[:-1], -1)

    @classmethod
    def from_saelens(cls, sae: Any) -> NativeEncoder | None:
        """A native encoder equal to ``sae.encode``, or None where the SAE does more than we replicate."""
        cfg = sae.cfg
        arch = cfg.architecture() if callable(getattr(cfg, "architecture", None)) else getattr(cfg, "architecture", "")
        if getattr(cfg, "normalize_activations", "none") != "none" or getattr(cfg, "reshape_activations", "none") != "none":
            return None
        b_dec_in = sae.b_dec.detach() if getattr(cfg, "apply_b_dec_to_input", False) else None
        W_enc, b_enc = sae.W_enc.detach(), sae.b_enc.detach()
        if arch == "topk" and getattr(cfg, "rescale_acts_by_decoder_norm", False):
            norm = sae.W_dec.detach().norm(dim=-1)  # (x W + b) * n == x (W * n) + b * n
            W_enc, b_enc = W_enc * norm[None, :], b_enc * norm
        elif getattr(cfg, "rescale_acts_by_decoder_norm", False):
            return None
        if arch == "jumprelu":
            return cls(W_enc, b_enc, threshold=sae.threshold, b_dec_in=b_dec_in)
        if arch == "topk":
            return cls(W_enc, b_enc, k=int(cfg.k), b_dec_in=b_dec_in)
        return None


@dataclass
class LoadedSAE:
    sae: Any  # sae_lens.SAE, or a NativeEncoder
    sae_id: str  # a stable identity recorded with every partition
    d_in: int
    d_sae: int

    def __post_init__(self) -> None:
        self.encoder = self.sae if isinstance(self.sae, NativeEncoder) else NativeEncoder.from_saelens(self.sae)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if self.encoder is not None:
            return self.encoder.encode(x)
        return self.sae.encode(x)

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> LoadedSAE:
        if self.encoder is not None:
            self.encoder.to(device=device, dtype=dtype)
        if not isinstance(self.sae, NativeEncoder):
            self.sae.to(device)
        return self


def _weights_digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().to("cpu", torch.float32).contiguous()
        h.update(k.encode())
        h.update(t.numpy().tobytes()[: 1 << 20])  # first MiB of each tensor: enough to tell SAEs apart
        h.update(str(tuple(t.shape)).encode())
    return h.hexdigest()[:12]


def _check_finite(state: dict[str, torch.Tensor], where: str) -> None:
    for k, t in state.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise SAEError(f"{where}: tensor {k!r} has NaN or infinite values")


def load_gemmascope_dir(path: str | Path, device: str = "cpu") -> LoadedSAE:
    """A GemmaScope-2 folder: ``params.safetensors`` (w_enc, b_enc, threshold, w_dec, b_dec), optional config.json."""
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

    path = Path(path)
    params = path / "params.safetensors"
    if not params.is_file():
        raise SAEError(f"{path}: no params.safetensors (a GemmaScope-2 folder holds config.json + params.safetensors)")
    raw = load_file(str(params))
    missing = {"w_enc", "b_enc", "threshold", "w_dec", "b_dec"} - raw.keys()
    if missing:
        raise SAEError(f"{params}: missing tensors {sorted(missing)}")
    _check_finite(raw, str(params))
    d_in, d_sae = raw["w_enc"].shape
    cfg = JumpReLUSAEConfig(d_in=int(d_in), d_sae=int(d_sae), dtype="float32", device=device)
    sae = JumpReLUSAE(cfg)
    state = {
        "W_enc": raw["w_enc"].float(),
        "W_dec": raw["w_dec"].float(),
        "b_enc": raw["b_enc"].float(),
        "b_dec": raw["b_dec"].float(),
        "threshold": raw["threshold"].float(),
    }
    sae.load_state_dict(state)
    sae.to(device)
    return LoadedSAE(sae, f"gemmascope:{path.name}@{_weights_digest(state)}", int(d_in), int(d_sae))


def load_saelens_dir(path: str | Path, device: str = "cpu") -> LoadedSAE:
    from sae_lens import SAE

    path = Path(path)
    if not (path / "cfg.json").is_file():
        raise SAEError(f"{path}: not a sae-lens folder (no cfg.json)")
    marker = path.parent / FINISHED_MARKER if path.name == "sae" else path / FINISHED_MARKER
    sae = SAE.load_from_disk(str(path), device=device)
    state = {k: v for k, v in sae.state_dict().items()}
    _check_finite(state, str(path))
    ident = f"saelens:{path}@{_weights_digest(state)}"
    if marker.is_file():
        ident = json.loads(marker.read_text()).get("sae_id", ident)
    return LoadedSAE(sae, ident, int(sae.cfg.d_in), int(sae.cfg.d_sae))


def load_release(release: str, sae_id: str, device: str = "cpu") -> LoadedSAE:
    from sae_lens import SAE

    sae = SAE.from_pretrained(release, sae_id, device=device)
    return LoadedSAE(sae, f"release:{release}/{sae_id}", int(sae.cfg.d_in), int(sae.cfg.d_sae))


def check_fits(sae: LoadedSAE, d_model: int, where: str) -> None:
    if sae.d_in != d_model:
        raise SAEError(
            f"{where}: SAE {sae.sae_id} has d_in={sae.d_in} but the model's residual width is {d_model}; "
            "use an SAE trained on this model"
        )


# ------------------------------------------------------------------------------------------ training


@dataclass
class TrainResult:
    path: Path
    sae_id: str
    variance_explained: float
    mse: float
    l0: float
    dead_fraction: float
    n_train: int
    n_heldout: int
    seconds: float


def train_topk(
    vectors: torch.Tensor,
    out_dir: str | Path,
    *,
    width: int,
    k: int,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    heldout_fraction: float = 0.05,
    progress: Callable[[int, int], None] | None = None,
    location: str | None = None,
) -> TrainResult:
    """Train a TopK SAE with sae-lens on ``vectors`` ([n, d_in] float32) and save it in sae-lens format.

    The folder is written aside and renamed into place with a ``FINISHED.json`` marker last, so a killed
    run never leaves a half-trained SAE that a reader would load as finished. ``location`` is where the
    folder will finally live, recorded in the marker (default ``out_dir``; an S3 lake builds the folder
    locally and uploads it, see ``lake.staged_dir``).
    """
    import time

    from sae_lens import SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig

    t0 = time.time()
    if vectors.ndim != 2 or vectors.shape[0] < 100:
        raise SAEError(f"need at least 100 activation vectors to train an SAE, got shape {tuple(vectors.shape)}")
    if not torch.isfinite(vectors).all():
        raise SAEError("activation vectors for SAE training contain NaN or infinite values")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    perm = torch.randperm(vectors.shape[0], generator=g)
    n_held = max(64, int(vectors.shape[0] * heldout_fraction))
    held, train = vectors[perm[:n_held]].float(), vectors[perm[n_held:]].float()
    d_in = train.shape[1]
    # Gemma's residual stream has norms in the thousands: train on vectors scaled to norm ~sqrt(d_in) and
    # fold the factor into the weights afterwards (feature activations are those of the scaled space).
    scale = float(math.sqrt(d_in) / train.norm(dim=-1).mean())
    train = train * scale
    cfg = TopKTrainingSAEConfig(d_in=d_in, d_sae=width, k=k, dtype="float32", device="cpu")
    sae = TopKTrainingSAE(cfg)
    with torch.no_grad():  # start the decoder bias at the data mean (Gemma's residual has a large mean)
        sae.b_dec.copy_(train.mean(0))
    steps_per_epoch = max(1, train.shape[0] // batch_size)
    total_steps = steps_per_epoch * epochs
    trainer_cfg = SAETrainerConfig(
        total_training_samples=total_steps * batch_size,
        train_batch_size_samples=batch_size,
        lr=lr,
        lr_end=lr / 10,
        lr_scheduler_name="cosineannealing",
        lr_warm_up_steps=min(100, total_steps // 10),
        device="cpu",
        n_batches_for_norm_estimate=10,
        dead_feature_window=max(50, steps_per_epoch),
        feature_sampling_window=max(100, steps_per_epoch),
    )

    def batches() -> Iterator[torch.Tensor]:
        step = 0
        for epoch in range(epochs + 1):
            order = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(seed + 1 + epoch))
            for i in range(steps_per_epoch):
                yield train[order[i * batch_size : (i + 1) * batch_size]]
                step += 1
                if progress and step % 50 == 0:
                    progress(min(step, total_steps), total_steps)

    trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=batches())
    trained = trainer.fit()
    trained.fold_activation_norm_scaling_factor(scale)
    train = train / scale
    trained.eval()
    with torch.no_grad():
        feats = trained.encode(held)
        recon = trained.decode(feats)
        mse = float(((recon - held) ** 2).sum(-1).mean())
        var = float(((held - held.mean(0)) ** 2).sum(-1).mean())
        l0 = float((feats > 0).float().sum(-1).mean())
        fired = torch.zeros(width, dtype=torch.bool)
        for i in range(0, train.shape[0], 8192):
            fired |= (trained.encode(train[i : i + 8192]) > 0).any(0)
    ve = 1.0 - mse / var if var > 0 else float("nan")
    digest = _weights_digest({k: v for k, v in trained.state_dict().items()})
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".tmp-{uuid.uuid4().hex}"
    trained.save_inference_model(str(tmp / "sae"))
    sae_id = f"trained:topk-{width}-k{k}@{digest}"
    result = TrainResult(
        path=out_dir,
        sae_id=sae_id,
        variance_explained=ve,
        mse=mse,
        l0=l0,
        dead_fraction=float(1 - fired.float().mean()),
        n_train=int(train.shape[0]),
        n_heldout=int(held.shape[0]),
        seconds=time.time() - t0,
    )
    (tmp / FINISHED_MARKER).write_text(json.dumps({**result.__dict__, "path": location or str(out_dir)}, indent=2))
    if out_dir.exists():
        old = out_dir.parent / f".tmp-old-{uuid.uuid4().hex}"
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)
    log.info("trained SAE %s: variance explained %.3f, L0 %.1f", sae_id, ve, l0)
    return result


def load_trained(out_dir: str | Path, device: str = "cpu") -> LoadedSAE:
    """Load an SAE trained by :func:`train_topk`; refuses a folder without its FINISHED marker."""
    out_dir = Path(out_dir)
    marker = out_dir / FINISHED_MARKER
    if not marker.is_file():
        raise SAEError(
            f"{out_dir}: no finished SAE here (missing {FINISHED_MARKER}); materialize the `sae` asset for this layer"
        )
    info = json.loads(marker.read_text())
    loaded = load_saelens_dir(out_dir / "sae", device=device)
    loaded.sae_id = info["sae_id"]
    return loaded


