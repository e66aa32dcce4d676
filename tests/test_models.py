"""Offline model loading, kinds and pooling, and generic discovery of blocks and Linear layers."""

import json
import shutil

import pytest
import torch

from compress.errors import CompressError
from compress.models import (Pooling, block_linears, default_model_path, detect_kind, find_blocks, find_linears,
                             is_conv1d, load, read_pooling, resolve_model_path)

EXPECTED_BLOCKS = {
    "llama": ("model.layers", 7), "mistral": ("model.layers", 7), "qwen2": ("model.layers", 7),
    "gpt2": ("transformer.h", 4), "opt": ("model.decoder.layers", 6), "bert": ("bert.encoder.layer", 6),
}


@pytest.mark.parametrize("arch", list(EXPECTED_BLOCKS))
def test_blocks_and_linears_found_by_structure(tiny_model, arch):
    loaded = load(tiny_model(arch))
    name, blocks = find_blocks(loaded.model)
    assert (name, len(blocks)) == (EXPECTED_BLOCKS[arch][0], 2)
    per_block = block_linears(loaded.model)
    assert [len(b) for b in per_block] == [EXPECTED_BLOCKS[arch][1]] * 2
    assert all(n.startswith(name) for b in per_block for n in b)
    if arch == "gpt2":
        assert all(is_conv1d(m) for b in per_block for m in b.values())


def test_block_override(tiny_model):
    loaded = load(tiny_model("llama"))
    assert find_blocks(loaded.model, "model.layers")[0] == "model.layers"
    with pytest.raises(CompressError, match="no module"):
        find_blocks(loaded.model, "model.nothing")
    with pytest.raises(CompressError, match="not a non-empty list"):
        find_blocks(loaded.model, "model.norm")


def test_no_block_list_is_a_clear_error():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    with pytest.raises(CompressError, match="--blocks"):
        find_blocks(model)
    assert set(find_linears(model)) == {"0", "2"}


@pytest.mark.parametrize("arch,kind", [("llama", "causal"), ("gpt2", "causal"), ("bert", "masked")])
def test_kind_detection(tiny_model, arch, kind):
    path = tiny_model(arch)
    assert detect_kind(path, json.loads((path / "config.json").read_text())) == kind
    assert load(path).kind == kind


def test_classifier_kind(tiny_model):
    loaded = load(tiny_model("bert", "classifier"))
    assert loaded.kind == "classifier" and loaded.config.num_labels == 3


def test_loaded_logits_match_transformers(tiny_model):
    from transformers import AutoModelForCausalLM

    path = tiny_model("llama")
    ours = load(path).model
    theirs = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True).eval()
    ids = torch.randint(0, 300, (2, 12))
    torch.testing.assert_close(ours(ids).logits, theirs(ids).logits)


def test_default_model_is_embedded_minilm(minilm):
    assert minilm == default_model_path()
    assert (minilm / "model.safetensors").is_file()
    assert resolve_model_path(None) == minilm
    loaded = load(None)
    assert loaded.kind == "embedding" and loaded.name == "all-MiniLM-L6-v2"
    assert loaded.pooling == Pooling("mean", normalize=True)


def test_minilm_embeddings_match_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers", reason="sentence-transformers comes with the demo model")
    texts = ["Quantization makes models smaller.", "A completely different sentence about the weather today."]
    reference = st.SentenceTransformer(str(minilm), device="cpu").encode(texts, convert_to_tensor=True)
    loaded = load(minilm)
    enc = loaded.tokenizer(texts, padding=True, return_tensors="pt")
    ours = loaded.embed(enc["input_ids"], enc["attention_mask"])
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)


def test_pooling_modes():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert Pooling("mean")(hidden, mask).tolist() == [[2.0, 3.0]]
    assert Pooling("cls")(hidden, mask).tolist() == [[1.0, 2.0]]
    assert Pooling("max")(hidden, mask).tolist() == [[3.0, 4.0]]
    assert Pooling("lasttoken")(hidden, mask).tolist() == [[3.0, 4.0]]
    out = Pooling("mean", normalize=True)(hidden, mask)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(1))


def test_read_pooling_cls(tmp_path):
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    assert read_pooling(tmp_path) == Pooling("cls", False)


def test_missing_path(tmp_path):
    with pytest.raises(CompressError, match="does not exist"):
        resolve_model_path(tmp_path / "absent")


def test_hub_id_is_never_downloaded():
    with pytest.raises(CompressError, match="never downloads"):
        resolve_model_path("meta-llama/Llama-3.1-8B")


def test_folder_without_config(tmp_path):
    with pytest.raises(CompressError, match="no config.json"):
        resolve_model_path(tmp_path)


def test_file_instead_of_folder(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(CompressError, match="is a file"):
        resolve_model_path(f)


def test_remote_code_needs_the_flag(tmp_path, tiny_model):
    folder = tmp_path / "custom"
    shutil.copytree(tiny_model("llama"), folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_custom.CustomConfig"}
    config["model_type"] = "custom-remote"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CompressError, match="--trust-remote-code"):
        load(folder)


def test_missing_tensor_is_named(tmp_path, tiny_model):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "broken"
    shutil.copytree(tiny_model("llama"), folder)
    state = load_file(str(folder / "model.safetensors"))
    del state["model.norm.weight"]
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CompressError, match="model.norm.weight"):
        load(folder)


def test_cuda_request_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present; this checks the error without one")
    with pytest.raises(CompressError, match="no CUDA GPU"):
        load(None, device="cuda")
