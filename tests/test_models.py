"""Model loading (local directories, errors) and the embedded default."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import FAMILIES
from efficientgpt.errors import UserError
from efficientgpt.models.loading import load_model, resolve_model_path
from efficientgpt.models.tiny import tiny_model


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_models_generate_with_the_kv_cache(family):
    model = tiny_model(family)
    ids = torch.tensor([[2, 3, 4]])
    out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=1)
    assert out.shape == (1, 7)


def test_local_directory_round_trip(tmp_path, tiny_embedded):
    d = tmp_path / "m"
    tiny_embedded.model.save_pretrained(d)
    tiny_embedded.tokenizer.save_pretrained(d)
    assert (d / "model.safetensors").exists()
    loaded = load_model(str(d))
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(loaded.model(ids).logits, tiny_embedded.model(ids).logits)
    assert loaded.describe()["parameters"] == sum(p.numel() for p in tiny_embedded.model.parameters())


def test_bad_model_specs_name_the_path(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"model directory '.*empty' has no config.json; expected a directory written by"):
        resolve_model_path(str(tmp_path / "empty"))
    with pytest.raises(UserError, match=r"model directory '\./missing/model' does not exist"):
        resolve_model_path("./missing/model")
    with pytest.raises(UserError, match=r"could not load model 'no-such-org/no-such-model' \(hub id\)"):
        load_model("no-such-org/no-such-model")
    with pytest.raises(UserError, match=r"unknown embedded preset 'huge'.*embedded:tiny"):
        resolve_model_path("embedded:huge")


def test_pickle_only_checkpoints_are_refused(tmp_path):
    model = tiny_model("gpt2")
    model.save_pretrained(tmp_path / "m", safe_serialization=True)
    (tmp_path / "m" / "model.safetensors").rename(tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(UserError, match="could not load model"):
        load_model(str(tmp_path / "m"), tokenizer=False)


def test_embedded_tiny_is_cached_and_described(tiny_embedded_path):
    assert (tiny_embedded_path / "model.safetensors").exists()
    assert not (tiny_embedded_path / "checkpoints").exists()
    info = json.loads((tiny_embedded_path / "efficientgpt_pretrain.json").read_text())
    assert info["preset"]["name"] == "tiny" and len(info["data_sha256"]) == 64
    assert resolve_model_path("embedded:tiny") == str(tiny_embedded_path)
