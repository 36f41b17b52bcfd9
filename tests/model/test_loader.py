"""Reading checkpoints: lazy safetensors reading of sharded checkpoints (worker/loader/weights.py),
GGUF conversion and the demo model (common/model_files.py).

The demo model is converted once into `default_demo_dir()`, where the rest of the suite finds it.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from common.model_files import (
    ModelFiles,
    ModelFilesError,
    architecture,
    convert_gguf,
    default_demo_dir,
    demo_gguf_path,
    ensure_demo_model,
    resolve_model,
)
from worker.loader.weights import LazyTensor, iter_weights


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[LlamaForCausalLM, Path]:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder, max_shard_size="50KB")
    return model, folder


def test_sharded_checkpoint_yields_every_tensor_once(
    tiny_llama: tuple[LlamaForCausalLM, Path],
) -> None:
    model, folder = tiny_llama
    files = resolve_model(folder)
    assert len(files.weight_files) > 2, "the checkpoint should be sharded for this test"
    expected = model.state_dict()
    names = []
    for name, lazy in iter_weights(files):
        names.append(name)
        assert lazy.shape == tuple(expected[name].shape), name
        assert lazy.dtype == expected[name].dtype, name
        torch.testing.assert_close(lazy.load(), expected[name], rtol=0, atol=0)
    assert sorted(names) == sorted(expected)


def test_lazy_slices_equal_slices_of_the_whole_tensor(
    tiny_llama: tuple[LlamaForCausalLM, Path],
) -> None:
    _, folder = tiny_llama
    weights = dict(iter_weights(resolve_model(folder)))
    q_proj: LazyTensor = weights["model.layers.1.self_attn.q_proj.weight"]
    whole = q_proj.load()
    assert whole.shape == (64, 64)
    rows, cols = q_proj.shape
    # What tensor-parallel ranks ask for: their block of rows (column-parallel) or of columns.
    for rank in range(2):
        row_block = slice(rank * rows // 2, (rank + 1) * rows // 2)
        col_block = slice(rank * cols // 2, (rank + 1) * cols // 2)
        assert torch.equal(q_proj[row_block], whole[row_block])
        assert torch.equal(q_proj[:, col_block], whole[:, col_block])
    assert torch.equal(q_proj[3], whole[3])
    assert torch.equal(q_proj[5:9, 1:60:7], whole[5:9, 1:60:7])
    norm = weights["model.norm.weight"]
    assert torch.equal(norm[10:20], norm.load()[10:20])


def test_index_that_misplaces_a_tensor_is_an_error(
    tiny_llama: tuple[LlamaForCausalLM, Path], tmp_path: Path
) -> None:
    _, folder = tiny_llama
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    index_path = copy / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    name = next(n for n, shard in index["weight_map"].items() if shard == shards[0])
    index["weight_map"][name] = shards[1]
    index_path.write_text(json.dumps(index))
    with pytest.raises(ModelFilesError, match=f"does not hold, e.g. {name}"):
        list(iter_weights(resolve_model(copy)))


def test_failed_conversion_leaves_no_folder(tmp_path: Path) -> None:
    not_gguf = tmp_path / "broken.gguf"
    not_gguf.write_bytes(b"GGUF" + b"\0" * 60)
    abandoned = tmp_path / "cache" / ".broken.partial-999999999-x"
    abandoned.mkdir(parents=True)  # what a killed conversion (pid long gone) leaves behind
    with pytest.raises(ModelFilesError, match="cannot convert"):
        convert_gguf(not_gguf, tmp_path / "cache" / "broken")
    assert list((tmp_path / "cache").iterdir()) == []


# --- The demo model and GGUF files -----------------------------------------------------------


@pytest.fixture(scope="module")
def demo_files() -> ModelFiles:
    return resolve_model(ensure_demo_model(default_demo_dir()))


@pytest.mark.slow
def test_demo_model_is_smollm2(demo_files: ModelFiles) -> None:
    config = demo_files.load_config()
    assert architecture(config) == "LlamaForCausalLM"
    assert (config.num_hidden_layers, config.hidden_size) == (30, 576)
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    assert config.vocab_size == 49152
    assert config.tie_word_embeddings
    assert getattr(config, "quantization_config", None) is None
    assert demo_files.tokenizer_path is not None and demo_files.tokenizer_path.is_file()
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= set(
        demo_files.tokenizer_files()
    )
    weights = dict(iter_weights(demo_files))
    assert len(weights) == 272
    assert "lm_head.weight" not in weights  # tied: the head is the embedding
    assert weights["model.embed_tokens.weight"].shape == (49152, 576)
    assert weights["model.embed_tokens.weight"].dtype == torch.float32


@pytest.mark.slow
def test_demo_model_knows_the_capital_of_france(demo_files: ModelFiles) -> None:
    tokenizer = AutoTokenizer.from_pretrained(demo_files.root)
    model = AutoModelForCausalLM.from_pretrained(demo_files.root).eval()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_ensure_demo_model_is_quick_once_converted(demo_files: ModelFiles) -> None:
    started = time.monotonic()
    assert ensure_demo_model(demo_files.root) == demo_files.root
    assert time.monotonic() - started < 1.0


def write_gguf_subset(source: Path, dest: Path, layers: int) -> None:
    """Copy a GGUF file keeping its first `layers` blocks (quantised bytes copied as they are)."""
    reader = gguf.GGUFReader(source)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(dest, arch)
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue  # the writer writes these itself
        value = layers if field.name == f"{arch}.block_count" else field.contents()
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, field.types[0], sub_type=sub_type)
    kept = [
        t
        for t in reader.tensors
        if not t.name.startswith("blk.") or int(t.name.split(".")[1]) < layers
    ]
    for t in kept:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in kept:
        writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
    writer.close()


@pytest.mark.slow
def test_gguf_file_converts_once_into_the_cache(demo_files: ModelFiles, tmp_path: Path) -> None:
    small_gguf = tmp_path / "smol-2-layers.gguf"
    write_gguf_subset(demo_gguf_path(), small_gguf, layers=2)
    cache = tmp_path / "cache"

    files = resolve_model(small_gguf, cache_dir=cache)
    assert files.root.parent == cache.resolve()
    assert files.root.name.startswith("smol-2-layers-")
    assert files.load_config().num_hidden_layers == 2
    assert "chat_template.jinja" in files.tokenizer_files()
    demo_weights = dict(iter_weights(demo_files))
    small_weights = dict(iter_weights(files))
    assert len(small_weights) == 2 + 2 * 9  # embedding, final norm, 9 per block
    for name, lazy in small_weights.items():
        assert torch.equal(lazy.load(), demo_weights[name].load()), name

    converted_at = files.weight_files[0].stat().st_mtime_ns
    started = time.monotonic()
    again = resolve_model(small_gguf, cache_dir=cache)
    assert again.root == files.root
    assert time.monotonic() - started < 1.0
    assert again.weight_files[0].stat().st_mtime_ns == converted_at
