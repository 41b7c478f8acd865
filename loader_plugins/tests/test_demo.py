"""make_demo: shards, index.json, config.json, loadable by safetensors, sizes; parse_size."""

from __future__ import annotations

import json

import pytest
import torch

from loader_plugins.bench.demo import _split_shards, demo_shape, make_demo, parse_size

safetensors = pytest.importorskip("safetensors")
from safetensors import safe_open  # noqa: E402

_LAYER_TENSORS = {
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
    "input_layernorm.weight", "post_attention_layernorm.weight",
}


def _load_all(paths):
    out = {}
    for path in paths:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                assert name not in out, f"{name} in two shards"
                out[name] = (path.name, f.get_tensor(name))
    return out


def test_sharded_checkpoint_is_complete_and_loads(tmp_path):
    paths = make_demo(tmp_path, "6MB", shards=3, progress=False)

    assert [p.name for p in paths] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    tensors = _load_all(paths)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {name: shard for name, (shard, _) in tensors.items()}
    total = sum(t.numel() * t.element_size() for _, t in tensors.values())
    assert index["metadata"]["total_size"] == total
    assert abs(total - 6_000_000) / 6_000_000 < 0.02
    # headers are small: each file is its tensors plus a few KiB
    assert sum(p.stat().st_size for p in paths) - total < 64 * 1024

    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    h, layers, vocab = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    expected = {"model.embed_tokens.weight": (vocab, h), "lm_head.weight": (vocab, h), "model.norm.weight": (h,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        expected |= {
            p + "self_attn.q_proj.weight": (config["num_attention_heads"] * config["head_dim"], h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "mlp.down_proj.weight": (h, config["intermediate_size"]),
            p + "input_layernorm.weight": (h,),
        }
    for name, shape in expected.items():
        assert tuple(tensors[name][1].shape) == shape, name
    layer_names = {n.split(".", 3)[3] for n in tensors if n.startswith("model.layers.")}
    assert layer_names == _LAYER_TENSORS
    assert len(tensors) == 3 + 9 * layers

    for name, (_, t) in tensors.items():
        assert t.dtype == torch.bfloat16
        assert torch.isfinite(t.float()).all(), name
    norm = tensors["model.layers.0.input_layernorm.weight"][1].float()
    assert 0.5 <= norm.min() and norm.max() < 1.0
    weight = tensors["model.layers.0.mlp.up_proj.weight"][1].float()
    assert 2**-11 <= weight.abs().min() and weight.abs().max() < 2**-7
    assert abs((weight > 0).float().mean() - 0.5) < 0.05  # both signs
    assert weight.std() > 2**-10


def test_defaults_two_shards_and_size_strings(tmp_path):
    paths = make_demo(tmp_path, 2_000_000, progress=False)
    assert len(paths) == 2
    assert {p.name for p in tmp_path.iterdir()} == {
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "model.safetensors.index.json", "config.json",
        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
    }
    total = json.loads((tmp_path / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    assert abs(total - 2_000_000) / 2_000_000 < 0.02
    # shards are balanced by bytes
    sizes = [p.stat().st_size for p in paths]
    assert max(sizes) < 0.75 * sum(sizes)


def test_same_seed_same_bytes(tmp_path):
    a = make_demo(tmp_path / "a", "1MB", seed=3, progress=False)
    b = make_demo(tmp_path / "b", "1MB", seed=3, progress=False)
    c = make_demo(tmp_path / "c", "1MB", seed=4, progress=False)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert [p.read_bytes() for p in a] != [p.read_bytes() for p in c]


def test_tensor_data_is_not_repetitive(tmp_path):
    # Nothing dedupes: every 4 KiB page of a tensor differs.
    (path, *_) = make_demo(tmp_path, "8MB", shards=2, progress=False)
    with safe_open(str(path), framework="pt") as f:
        t = f.get_tensor("model.embed_tokens.weight")
    pages = t.reshape(-1).view(torch.uint8)
    pages = pages[: pages.numel() // 4096 * 4096].reshape(-1, 4096)
    assert pages.shape[0] > 100
    assert len({bytes(row.numpy()) for row in pages}) == pages.shape[0]


@pytest.mark.parametrize("dtype, st_dtype", [("float16", torch.float16), ("float32", torch.float32)])
def test_other_dtypes(tmp_path, dtype, st_dtype):
    paths = make_demo(tmp_path, "1MB", dtype=dtype, progress=False)
    tensors = _load_all(paths)
    assert {t.dtype for _, t in tensors.values()} == {st_dtype}
    for name, (_, t) in tensors.items():
        magnitude = t.float().abs()
        low, high = (0.5, 1.0) if name.endswith("norm.weight") else (2**-11, 2**-7)
        assert low <= magnitude.min() and magnitude.max() < high, name
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == dtype


def test_progress_bar_goes_to_stderr(tmp_path, capsys):
    pytest.importorskip("tqdm")
    make_demo(tmp_path, "1MB", progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "demo" in captured.err


def test_rerun_overwrites_but_refuses_foreign_safetensors(tmp_path):
    make_demo(tmp_path, "1MB", progress=False)
    make_demo(tmp_path, "1MB", progress=False)  # same names: overwritten
    assert not list(tmp_path.glob("*.partial"))
    with pytest.raises(FileExistsError, match="model-00001-of-00002.safetensors"):
        make_demo(tmp_path, "1MB", shards=3, progress=False)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="shards must be between 1 and the tensor count"):
        make_demo(tmp_path, "1MB", shards=10_000, progress=False)
    with pytest.raises(ValueError, match="unsupported dtype"):
        make_demo(tmp_path, "1MB", dtype="int8", progress=False)


@pytest.mark.parametrize("size, hidden", [("1GB", 2048), ("3.36GB", 4096), ("16GB", 8192), ("140GB", 8192)])
def test_shapes_for_real_sizes(size, hidden):
    target = parse_size(size)
    shape = demo_shape(target)
    assert shape.hidden_size == hidden
    assert shape.num_hidden_layers >= 4
    assert shape.num_attention_heads * shape.head_dim == hidden
    assert shape.num_attention_heads % shape.num_key_value_heads == 0
    assert abs(shape.total_bytes - target) / target < 0.001
    assert shape.total_bytes <= target


@pytest.mark.parametrize(
    "sizes, n",
    [([10] * 10, 2), ([10] * 10, 10), ([1000, 1, 1, 1, 1], 4), ([1, 1, 1, 1, 1000], 3), ([5, 1000, 5], 3),
     ([3, 7, 1, 9, 2, 8, 4, 6], 5), ([100], 1)],
)
def test_split_shards_contiguous_and_none_empty(sizes, n):
    assign = _split_shards(sizes, n)
    assert len(assign) == len(sizes)
    assert assign == sorted(assign)
    assert set(assign) == set(range(n))


def test_split_shards_balances_bytes():
    sizes = [7] * 1000
    assign = _split_shards(sizes, 4)
    per_shard = [assign.count(s) for s in range(4)]
    assert max(per_shard) - min(per_shard) <= 1


@pytest.mark.parametrize(
    "text, expected",
    [("3GB", 3 * 10**9), ("1.5G", 1_500_000_000), ("512MiB", 512 * 2**20), ("100MB", 10**8),
     ("4096", 4096), (4096, 4096), ("2 GiB", 2 * 2**30), ("1kb", 1000), ("0", 0)],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "abc", "3XB", "-1", -5, True])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_cli_output_cut_short_by_the_reader_is_not_an_error(tmp_path):
    """``model-streamer inspect DIR | head``: the pipe closes before the table is written."""
    import subprocess
    import sys

    make_demo(tmp_path, "6MB", shards=2, progress=False)
    proc = subprocess.Popen([sys.executable, "-m", "loader_plugins.cli", "inspect", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()                       # the reader is gone before the first line
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()
    assert b"BrokenPipeError" not in err and b"Traceback" not in err, err.decode()


def test_demo_has_a_tokenizer_of_its_vocabulary(tmp_path):
    """vllm serve needs a tokenizer: the demo's is made locally, exactly the model's vocabulary."""
    from transformers import AutoTokenizer

    make_demo(tmp_path, "1MB", progress=False)
    vocab = json.loads((tmp_path / "config.json").read_text())["vocab_size"]
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(tok) == vocab
    ids = tok("Hello, my name is")["input_ids"]
    assert ids[0] == tok.bos_token_id == 1 and tok.eos_token_id == 2
    assert tok.decode(ids, skip_special_tokens=True) == "Hello, my name is"
    assert {p.name for p in tmp_path.iterdir()} >= {"tokenizer.json", "tokenizer_config.json",
                                                     "special_tokens_map.json", "generation_config.json"}


def test_demo_without_tokenizer_gets_one_later(tmp_path):
    from loader_plugins.bench.demo import write_demo_tokenizer

    make_demo(tmp_path, "1MB", progress=False, tokenizer=False)
    assert not (tmp_path / "tokenizer.json").exists()
    write_demo_tokenizer(tmp_path)
    from tokenizers import Tokenizer

    vocab = json.loads((tmp_path / "config.json").read_text())["vocab_size"]
    assert Tokenizer.from_file(str(tmp_path / "tokenizer.json")).get_vocab_size() == vocab
