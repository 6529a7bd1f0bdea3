"""The safetensors and torch checkpoint formats: layout, sharding, tied weights, safe loading."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from treadle.components import CheckpointFormat
from treadle.errors import ConfigError, TreadleError, TreadleWarning
from treadle.plugins.checkpoint import safetensors_format as stf
from treadle.plugins.checkpoint._tensors import parse_size, split_shared
from treadle.plugins.checkpoint.safetensors_format import (
    ALIASES_KEY,
    SafetensorsFormat,
    load_weights_into,
)
from treadle.plugins.checkpoint.torch_format import TorchFormat

FORMATS = [SafetensorsFormat, TorchFormat]


# -- a tiny GPT-2-like model in plain torch, with the output head tied to the embedding


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.attn(self.ln_1(x)).chunk(3, dim=-1)
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y)
        return x + self.mlp(self.ln_2(x))


class TinyGPT(nn.Module):
    # The transformers convention: lm_head is the tied copy, wte the stored original.
    _tied_weights_keys = ["lm_head.weight"]

    def __init__(self, vocab: int = 64, dim: int = 16, layers: int = 2, ctx: int = 8) -> None:
        super().__init__()
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(vocab, dim),
                "wpe": nn.Embedding(ctx, dim),
                "h": nn.ModuleList(Block(dim) for _ in range(layers)),
                "ln_f": nn.LayerNorm(dim),
            }
        )
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.transformer.wte.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1])
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


class UndeclaredTinyGPT(TinyGPT):
    _tied_weights_keys = None  # no declaration: the first name in sorted order is stored


def make_model(seed: int = 0, cls: type[TinyGPT] = TinyGPT) -> TinyGPT:
    torch.manual_seed(seed)
    return cls()


def hf_load_sharded_checkpoint(
    model: nn.Module, folder: Path, strict: bool = True
) -> tuple[list[str], list[str]]:
    """transformers' ``load_sharded_checkpoint`` for safetensors, re-written without it."""
    with open(folder / "model.safetensors.index.json", encoding="utf-8") as f:
        index = json.load(f)
    shard_files = list(set(index["weight_map"].values()))
    loaded_keys = index["weight_map"].keys()
    model_keys = model.state_dict().keys()
    missing = [key for key in model_keys if key not in loaded_keys]
    unexpected = [key for key in loaded_keys if key not in model_keys]
    if strict and (missing or unexpected):
        raise RuntimeError(f"Error(s) in loading state_dict: {missing} {unexpected}")
    for shard_file in shard_files:
        state_dict = load_file(os.path.join(folder, shard_file))
        model.load_state_dict(state_dict, strict=False)
        del state_dict
    return missing, unexpected


def sample_tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "float": torch.randn(3, 4),
        "bf16": torch.randn(5).to(torch.bfloat16),
        "int": torch.arange(7, dtype=torch.int64),
        "bool": torch.tensor([True, False]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "transposed": torch.randn(4, 6).t(),  # not contiguous
    }


# -- both formats


@pytest.mark.parametrize("fmt_cls", FORMATS)
def test_round_trip_of_a_small_dict(tmp_path: Path, fmt_cls: type[CheckpointFormat]) -> None:
    fmt = fmt_cls()
    tensors = sample_tensors()
    files = fmt.save_tensors(tmp_path, "state", tensors)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(files)
    loaded = fmt.load_tensors(tmp_path, "state")
    assert loaded.keys() == tensors.keys()
    for key, tensor in tensors.items():
        assert loaded[key].dtype == tensor.dtype
        assert torch.equal(loaded[key], tensor), key
        assert loaded[key].device.type == "cpu"


@pytest.mark.parametrize("fmt_cls", FORMATS)
def test_save_replaces_a_file_atomically(
    tmp_path: Path, fmt_cls: type[CheckpointFormat], monkeypatch: pytest.MonkeyPatch
) -> None:
    fmt = fmt_cls()
    fmt.save_tensors(tmp_path, "state", {"a": torch.ones(3)})
    before = sorted(p.name for p in tmp_path.iterdir())

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    # The writer fails half-way: the previous file must survive and no temporary remain.
    monkeypatch.setattr(stf, "save_file", crash)
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        fmt.save_tensors(tmp_path, "state", {"a": torch.zeros(3)})
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert torch.equal(fmt.load_tensors(tmp_path, "state")["a"], torch.ones(3))


@pytest.mark.parametrize("fmt_cls", FORMATS)
def test_missing_checkpoint_is_a_clear_error(
    tmp_path: Path, fmt_cls: type[CheckpointFormat]
) -> None:
    with pytest.raises(TreadleError, match=r"no .* checkpoint 'model'"):
        fmt_cls().load_tensors(tmp_path, "model")


@pytest.mark.parametrize("fmt_cls", FORMATS)
def test_tied_model_round_trip_stays_tied(tmp_path: Path, fmt_cls: type[CheckpointFormat]) -> None:
    model = make_model(0)
    fmt = fmt_cls()
    fmt.save_model(tmp_path, model, model.state_dict())
    state = fmt.load_model(tmp_path, model)
    # The two names come back as one tensor (safetensors: by alias; torch: by pickle memo).
    assert state["lm_head.weight"].data_ptr() == state["transformer.wte.weight"].data_ptr()
    fresh = make_model(1)
    fresh.load_state_dict(state)
    assert fresh.lm_head.weight is fresh.transformer.wte.weight
    idx = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(fresh(idx), model(idx))


# -- safetensors: layout and sharding


def test_single_file_layout(tmp_path: Path) -> None:
    files = SafetensorsFormat().save_tensors(tmp_path, "model", {"a": torch.ones(2)})
    assert files == ["model.safetensors"]
    assert not (tmp_path / "model.safetensors.index.json").exists()
    with safetensors.safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_sharding_obeys_the_limit_and_indexes_every_key(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tensors = {f"layer{i}.weight": torch.randn(10 * (i % 4 + 1)) for i in range(12)}
    tensors["big"] = torch.randn(200)  # 800 bytes: above the limit, so alone in its shard
    limit = 300
    files = SafetensorsFormat(max_shard_size=limit).save_tensors(tmp_path, "model", tensors)

    shards = files[:-1]
    assert files[-1] == "model.safetensors.index.json"
    assert len(shards) > 3
    assert shards == [
        f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)
    ]

    text = (tmp_path / files[-1]).read_text()
    index = json.loads(text)
    assert text == json.dumps(index, indent=2, sort_keys=True) + "\n"
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    assert index["weight_map"].keys() == tensors.keys()
    assert set(index["weight_map"].values()) == set(shards)

    for shard in shards:
        with safetensors.safe_open(tmp_path / shard, "pt") as f:
            assert f.metadata()["format"] == "pt"
            keys = list(f.keys())
            assert all(index["weight_map"][k] == shard for k in keys)
            size = sum(f.get_tensor(k).nbytes for k in keys)
        assert size <= limit or len(keys) == 1, (shard, size)

    loaded = SafetensorsFormat().load_tensors(tmp_path, "model")
    assert all(torch.equal(loaded[k], t) for k, t in tensors.items())


def test_greedy_packing_matches_save_pretrained(tmp_path: Path) -> None:
    # 100-byte tensors, limit 250: [a b] [c d] [e]; the 400-byte one alone; then [f].
    tensors = {k: torch.zeros(25) for k in "abcde"}
    tensors["huge"] = torch.zeros(100)
    tensors["f"] = torch.zeros(25)
    SafetensorsFormat(250).save_tensors(tmp_path, "model", tensors)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    groups: dict[str, list[str]] = {}
    for key, file in index["weight_map"].items():
        groups.setdefault(file, []).append(key)
    assert sorted(sorted(v) for v in groups.values()) == [
        ["a", "b"],
        ["c", "d"],
        ["e"],
        ["f"],
        ["huge"],
    ]
    assert index["weight_map"]["e"] == "model-00003-of-00005.safetensors"


def test_resaving_with_fewer_shards_removes_stale_files(tmp_path: Path) -> None:
    tensors = {k: torch.zeros(25) for k in "abcd"}
    SafetensorsFormat(150).save_tensors(tmp_path, "model", tensors)
    SafetensorsFormat(150).save_tensors(tmp_path, "optimizer", tensors)
    files = SafetensorsFormat().save_tensors(tmp_path, "model", tensors)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert [n for n in names if n.startswith("model")] == files == ["model.safetensors"]
    assert len([n for n in names if n.startswith("optimizer")]) == 5  # other stems untouched


def test_hf_style_reader_loads_our_shards(tmp_path: Path) -> None:
    model = make_model(0)
    SafetensorsFormat(max_shard_size=5000).save_model(tmp_path, model, model.state_dict())
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1

    fresh = make_model(1)
    missing, unexpected = hf_load_sharded_checkpoint(fresh, tmp_path, strict=False)
    # Exactly what save_pretrained produces: the tied copy is left for the model to re-tie.
    assert missing == ["lm_head.weight"]
    assert unexpected == []
    assert fresh.lm_head.weight is fresh.transformer.wte.weight
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key

    # An untied model passes transformers' strict check.
    plain = nn.Sequential(nn.Linear(40, 40), nn.Linear(40, 40))
    other = tmp_path / "plain"
    other.mkdir()
    SafetensorsFormat(max_shard_size=8000).save_model(other, plain, plain.state_dict())
    copy = nn.Sequential(nn.Linear(40, 40), nn.Linear(40, 40))
    hf_load_sharded_checkpoint(copy, other, strict=True)
    assert all(
        torch.equal(a, b) for a, b in zip(copy.state_dict().values(), plain.state_dict().values())
    )


# -- safetensors: tied and shared tensors


def test_tied_gpt_round_trips_through_sharded_safetensors(tmp_path: Path) -> None:
    model = make_model(0)
    files = SafetensorsFormat(max_shard_size="5KB").save_model(tmp_path, model, model.state_dict())
    assert len(files) > 2

    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"]  # stored once, under wte
    assert index["metadata"][ALIASES_KEY] == {"lm_head.weight": "transformer.wte.weight"}
    unique = {p.data_ptr(): p for p in model.parameters()}.values()
    assert index["metadata"]["total_size"] == sum(p.nbytes for p in unique)
    holder = tmp_path / index["weight_map"]["transformer.wte.weight"]
    with safetensors.safe_open(holder, "pt") as f:
        assert json.loads(f.metadata()[ALIASES_KEY]) == {"lm_head.weight": "transformer.wte.weight"}

    fresh = make_model(1)
    state = SafetensorsFormat().load_model(tmp_path, fresh)
    assert state["lm_head.weight"] is state["transformer.wte.weight"]
    fresh.load_state_dict(state)
    assert fresh.lm_head.weight is fresh.transformer.wte.weight
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_without_declared_tied_keys_the_first_sorted_name_is_stored(tmp_path: Path) -> None:
    model = make_model(0, UndeclaredTinyGPT)
    SafetensorsFormat().save_model(tmp_path, model, model.state_dict())
    with safetensors.safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = list(f.keys())
        assert "lm_head.weight" in keys
        assert "transformer.wte.weight" not in keys
        assert json.loads(f.metadata()[ALIASES_KEY]) == {"transformer.wte.weight": "lm_head.weight"}


def test_partial_views_of_one_storage_are_stored_as_copies(tmp_path: Path) -> None:
    base = torch.arange(12.0)
    tensors = {
        "whole": base,
        "head": base[:4],
        "tail": base[6:],
        "same": base,
        "grid": base.view(3, 4),
    }
    stored, aliases = split_shared(tensors)
    assert aliases == {"whole": "same"}  # "same" < "whole"
    # One view keeps the original memory (the first name: "grid"), the others are copies.
    ptrs = [t.untyped_storage().data_ptr() for t in stored.values()]
    assert len(set(ptrs)) == len(stored) == 4
    assert stored["grid"].untyped_storage().data_ptr() == base.untyped_storage().data_ptr()

    SafetensorsFormat().save_tensors(tmp_path, "t", tensors)
    loaded = SafetensorsFormat().load_tensors(tmp_path, "t")
    assert loaded["whole"] is loaded["same"]
    for key, tensor in tensors.items():
        assert torch.equal(loaded[key], tensor), key


def test_empty_tensors_are_not_taken_for_aliases() -> None:
    stored, aliases = split_shared({"a": torch.zeros(0), "b": torch.zeros(0)})
    assert aliases == {}
    assert stored.keys() == {"a", "b"}


# -- safetensors: checks before loading


def test_strict_key_check_lists_missing_and_unexpected_before_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = nn.ModuleDict({"a": nn.Linear(2, 2), "b": nn.Linear(2, 2)})
    SafetensorsFormat(max_shard_size=30).save_model(tmp_path, source, source.state_dict())
    target = nn.ModuleDict({"a": nn.Linear(2, 2), "c": nn.Linear(2, 2)})

    def no_reading(*args: object) -> None:
        raise AssertionError("tensors were read before the key check")

    monkeypatch.setattr(stf, "_load_all", no_reading)
    with pytest.raises(TreadleError) as info:
        SafetensorsFormat().load_model(tmp_path, target)
    message = str(info.value)
    assert "Missing keys (in the model, not in the checkpoint): c.bias, c.weight." in message
    assert "Unexpected keys (in the checkpoint, not in the model): b.bias, b.weight." in message
    assert "model.safetensors.index.json" in message


def test_shape_mismatch_is_reported_from_the_header(tmp_path: Path) -> None:
    source = nn.Linear(3, 2)
    SafetensorsFormat().save_model(tmp_path, source, source.state_dict())
    with pytest.raises(TreadleError, match=r"weight \(checkpoint \[2, 3\], model \[4, 3\]\)"):
        SafetensorsFormat().load_model(tmp_path, nn.Linear(3, 4))


def test_load_weights_into_reads_one_shard_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = make_model(0)
    files = SafetensorsFormat(max_shard_size="4KB").save_model(tmp_path, model, model.state_dict())
    fresh = make_model(1)
    calls: list[int] = []
    original = nn.Module.load_state_dict

    def spy(
        self: nn.Module, state_dict: dict[str, torch.Tensor], *args: object, **kwargs: object
    ) -> object:
        if self is fresh:
            calls.append(len(state_dict))
        return original(self, state_dict, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "load_state_dict", spy)
    result = load_weights_into(fresh, tmp_path)
    assert result == ([], [])
    assert len(calls) == len(files) - 1  # once per shard
    assert sum(calls) == len(model.state_dict())  # every name, the alias included
    assert fresh.lm_head.weight is fresh.transformer.wte.weight
    idx = torch.tensor([[3, 1, 4, 1, 5]])
    assert torch.equal(fresh(idx), model(idx))


def test_load_weights_into_non_strict_and_dtype_cast(tmp_path: Path) -> None:
    source = nn.ModuleDict({"a": nn.Linear(2, 2), "b": nn.Linear(2, 2)})
    SafetensorsFormat().save_model(tmp_path, source, source.state_dict())
    target = nn.ModuleDict({"a": nn.Linear(2, 2), "c": nn.Linear(2, 2)}).to(torch.float64)
    with pytest.raises(TreadleError, match="Missing keys"):
        load_weights_into(target, tmp_path)
    result = load_weights_into(target, tmp_path, strict=False)
    assert result.missing_keys == ["c.bias", "c.weight"]
    assert result.unexpected_keys == ["b.bias", "b.weight"]
    assert target["a"].weight.dtype == torch.float64
    assert torch.equal(target["a"].weight, source["a"].weight.double())


def test_load_weights_into_a_meta_model(tmp_path: Path) -> None:
    model = make_model(0)
    SafetensorsFormat(max_shard_size="5KB").save_model(tmp_path, model, model.state_dict())
    with torch.device("meta"):
        empty = TinyGPT()
    load_weights_into(empty, tmp_path)
    assert empty.lm_head.weight is empty.transformer.wte.weight
    assert not any(p.is_meta for p in empty.parameters())
    idx = torch.tensor([[0, 1, 2]])
    assert torch.equal(empty(idx), model(idx))


def test_meta_model_with_transient_buffer_warns(tmp_path: Path) -> None:
    with torch.device("meta"):
        model = nn.Linear(2, 2)
        model.register_buffer("rope", torch.zeros(2), persistent=False)
    SafetensorsFormat().save_tensors(
        tmp_path, "model", {"weight": torch.ones(2, 2), "bias": torch.ones(2)}
    )
    with pytest.warns(TreadleWarning, match="rope"):
        load_weights_into(model, tmp_path)
    assert torch.equal(model.weight, torch.ones(2, 2))


def test_other_framework_is_refused(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2)}, tmp_path / "model.safetensors", metadata={"format": "flax"})
    with pytest.raises(TreadleError, match=r"model\.safetensors declares format 'flax'"):
        SafetensorsFormat().load_tensors(tmp_path, "model")


def test_file_without_metadata_is_accepted(tmp_path: Path) -> None:
    # Plain safetensors.torch.save_file writes no metadata; transformers loads such files too.
    save_file({"a": torch.ones(2)}, tmp_path / "model.safetensors")
    assert torch.equal(SafetensorsFormat().load_tensors(tmp_path, "model")["a"], torch.ones(2))


def test_missing_shard_and_corrupt_file(tmp_path: Path) -> None:
    SafetensorsFormat(100).save_tensors(tmp_path, "model", {k: torch.zeros(25) for k in "abc"})
    (tmp_path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(TreadleError, match=r"names the shard 'model-00002-of-00003\.safetensors'"):
        SafetensorsFormat().load_tensors(tmp_path, "model")
    (tmp_path / "x.safetensors").write_bytes(b"\x01\x02garbage")
    with pytest.raises(TreadleError, match=r"x\.safetensors is not a readable safetensors file"):
        SafetensorsFormat().load_tensors(tmp_path, "x")


LFS_POINTER = (
    "version https://git-lfs.github.com/spec/v1\n"
    "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
    "size 548105171\n"
)


@pytest.mark.parametrize(
    ("fmt_cls", "file"), [(SafetensorsFormat, "model.safetensors"), (TorchFormat, "model.pt")]
)
def test_git_lfs_pointer_is_detected(
    tmp_path: Path, fmt_cls: type[CheckpointFormat], file: str
) -> None:
    (tmp_path / file).write_text(LFS_POINTER)
    with pytest.raises(TreadleError, match="git-lfs pointer"):
        fmt_cls().load_tensors(tmp_path, "model")


def test_git_lfs_pointer_shard_is_detected(tmp_path: Path) -> None:
    SafetensorsFormat(100).save_tensors(tmp_path, "model", {k: torch.zeros(25) for k in "ab"})
    (tmp_path / "model-00002-of-00002.safetensors").write_text(LFS_POINTER)
    with pytest.raises(
        TreadleError, match=r"model-00002-of-00002\.safetensors is a git-lfs pointer"
    ):
        SafetensorsFormat().load_tensors(tmp_path, "model")


# -- size strings


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1234, 1234),
        ("5GB", 5 * 10**9),
        ("200MB", 200 * 10**6),
        ("10KB", 10_000),
        ("1.5GiB", int(1.5 * 2**30)),
        ("64MiB", 64 * 2**20),
        ("2KiB", 2048),
        ("100", 100),
        ("100B", 100),
        (" 3 gb ", 3 * 10**9),
    ],
)
def test_size_strings(value: int | str, expected: int) -> None:
    assert parse_size(value) == expected
    assert SafetensorsFormat(value).max_shard_size == expected


@pytest.mark.parametrize(
    "value", ["5 GBs", "GB", "-1GB", "1e9", "5XB", "", 0, -5, True, 1.5, None, "0MB"]
)
def test_invalid_size_strings(value: object) -> None:
    with pytest.raises(ConfigError, match=r'max_shard_size=.*"200MB".*KiB/MiB/GiB') as info:
        SafetensorsFormat(value)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)


# -- torch format: safe loading


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


class _Custom:
    pass


def test_torch_format_refuses_a_code_running_pickle(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    torch.save({"weight": torch.ones(2), "evil": _Payload(marker)}, tmp_path / "model.pt")
    with pytest.raises(TreadleError, match=r"weights_only=True\) rejected it") as info:
        TorchFormat().load_tensors(tmp_path, "model")
    assert "system" in str(info.value)  # the refused global is named
    assert not marker.exists()


def test_torch_format_refuses_custom_objects(tmp_path: Path) -> None:
    torch.save({"obj": _Custom()}, tmp_path / "model.pt")
    with pytest.raises(TreadleError, match="refused to load"):
        TorchFormat().load_tensors(tmp_path, "model")


def test_torch_format_rejects_non_tensor_content(tmp_path: Path) -> None:
    torch.save([torch.ones(1)], tmp_path / "model.pt")
    with pytest.raises(TreadleError, match="mapping of names to tensors"):
        TorchFormat().load_tensors(tmp_path, "model")


def test_torch_format_keeps_sharing_in_the_file(tmp_path: Path) -> None:
    model = make_model(0)
    assert TorchFormat().save_model(tmp_path, model, model.state_dict()) == ["model.pt"]
    state = TorchFormat().load_tensors(tmp_path, "model")
    assert state["lm_head.weight"].untyped_storage().data_ptr() == (
        state["transformer.wte.weight"].untyped_storage().data_ptr()
    )


# -- packaging


def test_import_treadle_does_not_import_the_formats() -> None:
    code = (
        "import sys, treadle; "
        "assert not [m for m in sys.modules if m.startswith('treadle.plugins.checkpoint')]"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_safetensors_entry_point_resolves_to_the_format() -> None:
    from importlib.metadata import entry_points

    (entry,) = [e for e in entry_points(group="treadle.checkpoint") if e.name == "safetensors"]
    assert entry.load() is SafetensorsFormat
    assert SafetensorsFormat.name == "safetensors"
    assert TorchFormat.name == "torch"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fmt_cls", FORMATS)
def test_cuda_tensors_are_saved_from_the_device(
    tmp_path: Path, fmt_cls: type[CheckpointFormat]
) -> None:
    model = make_model(0).cuda()
    fmt = fmt_cls(**({"max_shard_size": "5KB"} if fmt_cls is SafetensorsFormat else {}))
    fmt.save_model(tmp_path, model, model.state_dict())
    state = fmt.load_model(tmp_path, model)
    assert all(t.device.type == "cpu" for t in state.values())
    # Tied on the device, tied in the file (safetensors: alias; torch: one storage copy).
    assert state["lm_head.weight"].data_ptr() == state["transformer.wte.weight"].data_ptr()
    for key, value in model.state_dict().items():
        assert torch.equal(state[key], value.cpu()), key
    fresh = make_model(1).cuda()
    if fmt_cls is SafetensorsFormat:
        load_weights_into(fresh, tmp_path)
    else:
        fresh.load_state_dict(state)
    assert fresh.lm_head.weight is fresh.transformer.wte.weight
    assert torch.equal(fresh.transformer.wte.weight, model.transformer.wte.weight)
