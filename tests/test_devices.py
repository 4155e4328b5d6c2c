"""--device / --dtype parsing: valid values and one-line errors naming the fix."""

import pytest
import torch

from workbench.devices import DTYPE_CHOICES, parse_device, parse_dtype
from workbench.errors import InputError


def test_cpu_device():
    assert parse_device("cpu") == torch.device("cpu")
    assert parse_device(" CPU ") == torch.device("cpu")
    assert parse_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize("bad", ["gpu", "tpu", "", "cuda:", "cuda:x", "cuda:-1", "cpu:1", "mps"])
def test_unknown_device_names_the_choices(bad):
    with pytest.raises(InputError, match="'cpu', 'cuda' or 'cuda:N'|CPU has no index") as err:
        parse_device(bad)
    assert "\n" not in str(err.value)


def test_non_string_device():
    with pytest.raises(InputError, match="must be a string"):
        parse_device(0)


def _fake_cuda(monkeypatch, *, built: bool, available: bool, count: int) -> None:
    monkeypatch.setattr(torch.version, "cuda", "12.4" if built else None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


@pytest.mark.parametrize("name", ["cuda", "cuda:0", torch.device("cuda:1")])
def test_cuda_without_cuda_build(monkeypatch, name):
    _fake_cuda(monkeypatch, built=False, available=False, count=0)
    with pytest.raises(InputError, match=r"no CUDA support \(torch .*\): use --device cpu, or install a CUDA build"):
        parse_device(name)


def test_cuda_build_without_gpu(monkeypatch):
    _fake_cuda(monkeypatch, built=True, available=False, count=0)
    with pytest.raises(InputError, match="CUDA is not available.*use --device cpu"):
        parse_device("cuda")


def test_cuda_index_out_of_range_says_how_many(monkeypatch):
    _fake_cuda(monkeypatch, built=True, available=True, count=2)
    assert parse_device("cuda") == torch.device("cuda")
    assert parse_device("CUDA:1") == torch.device("cuda:1")
    assert parse_device(torch.device("cuda", 0)) == torch.device("cuda:0")
    with pytest.raises(InputError, match=r"only 2 GPUs are visible \(valid cuda:0..cuda:1\)"):
        parse_device("cuda:2")
    _fake_cuda(monkeypatch, built=True, available=True, count=1)
    with pytest.raises(InputError, match="only 1 GPU is visible"):
        parse_device("cuda:1")


@pytest.mark.parametrize("text, expected", [
    ("float32", torch.float32), ("fp32", torch.float32), ("float", torch.float32), ("FP32", torch.float32),
    ("bfloat16", torch.bfloat16), ("bf16", torch.bfloat16), ("BF16", torch.bfloat16),
    ("float16", torch.float16), ("fp16", torch.float16), ("half", torch.float16), (" Half ", torch.float16),
    ("torch.bfloat16", torch.bfloat16),
    (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
])
def test_dtype_aliases(text, expected):
    assert parse_dtype(text) == expected


@pytest.mark.parametrize("bad", ["int8", "float64", "fp8", "", "double", 32, None])
def test_unknown_dtype_names_the_valid_strings(bad):
    with pytest.raises(InputError, match="use one of float32, fp32, float, bfloat16, bf16, float16, fp16, half"):
        parse_dtype(bad)


def test_non_floating_torch_dtype():
    with pytest.raises(InputError, match="non-floating dtype torch.int8: use one of float32, bfloat16, float16"):
        parse_dtype(torch.int8)
    with pytest.raises(InputError, match="unsupported floating dtype torch.float64"):
        parse_dtype(torch.float64)


def test_dtype_choices_are_canonical_and_parse():
    assert DTYPE_CHOICES == ("float32", "bfloat16", "float16")
    assert [parse_dtype(name) for name in DTYPE_CHOICES] == [torch.float32, torch.bfloat16, torch.float16]
