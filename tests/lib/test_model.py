"""The model's dtype: ``auto`` resolved for the machine (dagster_project/lib/model.py, resolve_dtype), and the
resolved dtype is what the resources, the provenance record and the config hash carry."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from dagster_project.config import ModelSpec, Profile, load_profile
from dagster_project.lib import model as model_lib
from dagster_project.lib.model import ModelError, cpu_flags, resolve_dtype

X86_AVX2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu sse2 avx avx2 fma\n"
X86_AMX = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n"


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    """``machine(cuda=..., flags=...)``: what torch and the flag reader say about this machine."""

    def set_(cuda: bool = False, flags: set[str] | None = None) -> None:
        monkeypatch.setattr(model_lib.torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(model_lib, "cpu_flags", lambda: None if flags is None else frozenset(flags))

    return set_


def test_cpu_flags_are_read_from_cpuinfo(tmp_path: Path) -> None:
    for text, expect in ((X86_AVX2, {"fpu", "sse2", "avx", "avx2", "fma"}), (ARM, {"fp", "asimd", "bf16", "i8mm"})):
        (tmp_path / "cpuinfo").write_text(text)
        assert cpu_flags(tmp_path / "cpuinfo") == expect
    (tmp_path / "cpuinfo").write_text(X86_AMX)
    assert {"amx_bf16", "avx512_bf16"} <= cpu_flags(tmp_path / "cpuinfo")  # type: ignore[operator]
    assert cpu_flags(tmp_path / "missing") is None
    (tmp_path / "cpuinfo").write_text("processor\t: 0\n")
    assert cpu_flags(tmp_path / "cpuinfo") is None


def test_auto_is_bfloat16_on_cuda(machine) -> None:  # noqa: ANN001
    machine(cuda=True, flags={"avx2"})
    assert resolve_dtype("auto") == "bfloat16"
    assert resolve_dtype("auto", "cuda:1") == "bfloat16"
    assert resolve_dtype("auto", "cpu") == "float32"  # a CPU asked for on a GPU machine: the CPU's rule


@pytest.mark.parametrize(("flags", "expect"), [
    ({"avx2", "amx_bf16", "amx_tile"}, "bfloat16"),
    ({"avx2", "avx512f", "avx512_bf16"}, "bfloat16"),
    ({"avx2", "avx512f"}, "float32"),  # AVX-512 without its BF16 extension: no native bf16 matmul
    ({"avx2", "fma"}, "float32"),
    (None, "float32"),  # flags unreadable (not Linux): float32, the same answer on every run
])
def test_auto_on_the_cpu_follows_its_bf16_flags(machine, flags: set[str] | None, expect: str) -> None:  # noqa: ANN001
    machine(cuda=False, flags=flags)
    assert resolve_dtype("auto") == expect
    assert resolve_dtype("auto", "cpu") == expect


def test_a_fixed_dtype_is_kept_and_a_bad_one_named(machine) -> None:  # noqa: ANN001
    machine(cuda=False, flags=None)
    for d in ("bfloat16", "float32", "float16"):
        assert resolve_dtype(d) == d
    with pytest.raises(ModelError, match="model dtype must be 'auto' or one of .*got 'int8'"):
        resolve_dtype("int8")


def test_resources_provenance_and_hash_carry_the_resolved_dtype(machine) -> None:  # noqa: ANN001
    from dagster_project.provenance import activation_record
    from dagster_project.resources import resources_for

    default = load_profile("default")
    assert default.model.dtype == "auto"
    fixed = {d: default.model_copy(update={"model": default.model.model_copy(update={"dtype": d})})
             for d in ("bfloat16", "float32")}
    for flags, resolved in (({"avx512_bf16"}, "bfloat16"), ({"avx2"}, "float32")):
        machine(cuda=False, flags=flags)
        model = resources_for(default, lake_root="/tmp/unused")["model"]
        assert model.dtype == resolved and model.resolved_dtype() == resolved
        assert activation_record(model, "sae", "resid_post", "h")["dtype"] == resolved
        # activations in bf16 and fp32 differ: the hash is that of the resolved dtype, not of the word 'auto'
        assert default.config_hash() == fixed[resolved].config_hash()
    assert fixed["bfloat16"].config_hash() != fixed["float32"].config_hash()
    # a resource built with 'auto' by hand still records the resolved dtype
    assert activation_record(SimpleNamespace(model_id="m", dtype="auto", device="cpu", sae_dtype="float32",
                                             max_tokens=8), "sae", "resid_post", "h")["dtype"] == "float32"


def test_profile_yaml_accepts_auto() -> None:
    prof = Profile(name="p", model=ModelSpec(id="m", dtype="auto"), sae={"source": "train"}, layers=[1])
    assert prof.model.dtype == "auto"
