"""SAE loading, training and the native encoder."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from dagster_project.lib.sae import (
    FINISHED_MARKER,
    NativeEncoder,
    SAEError,
    load_gemmascope_dir,
    load_saelens_dir,
    load_trained,
    train_topk,
)
from tests.conftest import write_gemmascope


def planted_vectors(n: int = 3000, d: int = 32, n_dirs: int = 64, seed: int = 0) -> torch.Tensor:
    """Sparse combinations of fixed directions plus a large mean, like a residual stream."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(n_dirs, d, generator=g)
    codes = (torch.rand(n, n_dirs, generator=g) < 0.05) * torch.rand(n, n_dirs, generator=g) * 5
    return codes @ dirs + 40.0


def test_native_encoder_equals_saelens_jumprelu(tmp_path: Path) -> None:
    sae = load_gemmascope_dir(write_gemmascope(tmp_path / "gs", 32, 128, seed=1))
    assert isinstance(sae.encoder, NativeEncoder)
    x = torch.randn(7, 5, 32)
    torch.testing.assert_close(sae.encoder.encode(x), sae.sae.encode(x))


def test_train_save_reload_topk_and_native_encoder(tmp_path: Path) -> None:
    x = planted_vectors()
    res = train_topk(x, tmp_path / "sae", width=128, k=8, epochs=4, batch_size=64, lr=3e-3, seed=0)
    assert res.variance_explained > 0.5, res
    assert res.l0 == pytest.approx(8.0)
    loaded = load_trained(tmp_path / "sae")
    assert loaded.sae_id == res.sae_id and loaded.d_in == 32 and loaded.d_sae == 128
    assert isinstance(loaded.encoder, NativeEncoder)
    torch.testing.assert_close(loaded.encoder.encode(x[:50]), loaded.sae.encode(x[:50]))
    # the saved folder is plain sae-lens format
    again = load_saelens_dir(tmp_path / "sae" / "sae")
    torch.testing.assert_close(again.encode(x[:5]), loaded.encode(x[:5]))


def test_half_trained_sae_is_never_loaded(tmp_path: Path) -> None:
    x = planted_vectors(n=600)
    train_topk(x, tmp_path / "sae", width=64, k=4, epochs=1, batch_size=64, lr=1e-3, seed=0)
    shutil.copytree(tmp_path / "sae", tmp_path / "partial")
    (tmp_path / "partial" / FINISHED_MARKER).unlink()
    with pytest.raises(SAEError, match="no finished SAE"):
        load_trained(tmp_path / "partial")
    with pytest.raises(SAEError, match="no finished SAE"):
        load_trained(tmp_path / "never_trained")


def test_training_refuses_nan_vectors(tmp_path: Path) -> None:
    x = planted_vectors(n=300)
    x[3, 3] = float("nan")
    with pytest.raises(SAEError, match="NaN"):
        train_topk(x, tmp_path / "sae", width=64, k=4, epochs=1, batch_size=64, lr=1e-3, seed=0)
    assert not (tmp_path / "sae").exists()


def test_gemmascope_folder_missing_tensor(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    (tmp_path / "bad").mkdir()
    save_file({"w_enc": torch.zeros(4, 8)}, str(tmp_path / "bad" / "params.safetensors"))
    with pytest.raises(SAEError, match="missing tensors"):
        load_gemmascope_dir(tmp_path / "bad")
