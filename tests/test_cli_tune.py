"""tune / eval --delta / export / merge through the command line, for every registered PEFT method."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_cli
from efficientgpt import cli, registry
from efficientgpt.peft import core

PEFT_FORMAT = {"lora", "dylora", "ia3", "prompt_tuning"}
#: Methods that need more than the defaults: ATTEMPT trains its source prompts first and needs task data.
EXTRA = {"attempt": (["--train-sources", "2", "--source-tasks", "code_or_prose"], "task:docstring_order")}


def _main(capsys, *argv):
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    return json.loads(captured.out)


def test_lora_acceptance_commands(tmp_path, tiny_embedded_path):
    """The exact commands of the delta-core acceptance list, as subprocesses."""
    d, p, m = tmp_path / "D", tmp_path / "P", tmp_path / "M"
    res = json.loads(run_cli("tune", "--model", "embedded:tiny", "--method", "lora", "--targets", "q,v",
                             "--rank", "4", "--steps", "30", "--out", str(d), "--json").stdout)
    assert res["parameters"]["trainable"] == 2 * 2 * 4 * (64 + 64)  # 2 layers x (q, v) x r(d_in + d_out)
    assert res["eval"]["loss_after"] < res["eval"]["loss_before"]
    ev = json.loads(run_cli("eval", "--model", "embedded:tiny", "--delta", str(d), "--data", "embedded:code",
                            "--json", "--max-tokens", "8192").stdout)
    assert ev["delta"]["method"] == "lora" and ev["perplexity"] > 1
    run_cli("export", "--delta", str(d), "--format", "peft", "--out", str(p))
    assert (p / "adapter_config.json").exists() and (p / "adapter_model.safetensors").exists()
    run_cli("merge", "--model", "embedded:tiny", "--delta", str(d), "--out", str(m))
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 4000, (2, 24), generator=torch.Generator().manual_seed(0))
    base = AutoModelForCausalLM.from_pretrained(tiny_embedded_path)
    with torch.no_grad():
        a = peft.PeftModel.from_pretrained(base, p)(input_ids=ids).logits
        b = AutoModelForCausalLM.from_pretrained(m)(input_ids=ids).logits
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", [s.name for s in registry.methods("peft")])
def test_every_method_tunes_evaluates_and_merges(method, tmp_path, capsys, tiny_embedded_path):
    d = tmp_path / "D"
    extra, data = EXTRA.get(method, ([], "embedded:code"))
    res = _main(capsys, "tune", "--model", "embedded:tiny", "--method", method, "--steps", "3", "--data", data,
                "--batch-size", "4", "--eval-tokens", "2048", "--out", str(d), "--json", "--no-progress", *extra)
    assert res["method"] == method and (d / "delta_config.json").exists()
    ev = _main(capsys, "eval", "--model", "embedded:tiny", "--delta", str(d), "--data", data,
               "--max-tokens", "2048", "--json")
    assert ev["delta"]["method"] == method
    if registry.get(method).mergeable:
        merged = _main(capsys, "merge", "--delta", str(d), "--out", str(tmp_path / "M"), "--json")
        assert (tmp_path / "M" / "config.json").exists() and merged["method"] == method
        ev2 = _main(capsys, "eval", "--model", str(tmp_path / "M"), "--data", "embedded:code", "--max-tokens",
                    "2048", "--json")
        assert ev2["loss"] == pytest.approx(ev["loss"], abs=1e-4)
    else:
        assert cli.main(["merge", "--delta", str(d), "--out", str(tmp_path / "M")]) == 1
        assert "is not mergeable" in capsys.readouterr().err
    if method in PEFT_FORMAT:
        _main(capsys, "export", "--delta", str(d), "--out", str(tmp_path / "P"), "--json")
        assert (tmp_path / "P" / "adapter_model.safetensors").exists()
    else:
        assert cli.main(["export", "--delta", str(d), "--out", str(tmp_path / "P")]) == 1
        assert "has no Hugging Face PEFT format" in capsys.readouterr().err


def test_bad_tune_input_is_refused_clearly(tmp_path, capsys, tiny_embedded_path):
    cases = [
        (["--method", "lroa"], "unknown method 'lroa' (did you mean 'lora'?); registered methods:"),
        (["--method", "lora", "--targets", "nope"], "match no module; roles: q, k, v, o"),
        (["--method", "lora", "--rank", "0"], "LoraConfig.rank = 0 is out of range: must be >= 1"),
        (["--method", "lora", "--alpha", "-1"], "LoraConfig.alpha = -1.0 is out of range: must be > 0"),
        (["--method", "lora", "--init", "xavier"], "init = 'xavier' is not allowed"),
    ]
    for extra, msg in cases:
        code = cli.main(["tune", "--model", "embedded:tiny", "--steps", "1", "--out", str(tmp_path / "x"), *extra])
        err = capsys.readouterr().err
        assert code == 1 and msg in err, (extra, err)
    assert not (tmp_path / "x" / "delta_config.json").exists()


def test_delta_onto_the_wrong_base_is_refused(tmp_path, capsys, tiny_embedded):
    d = core.apply(tiny_embedded.model, "lora", registry.get("lora").config_cls(rank=2))
    core.save_delta(d, tmp_path / "D")
    core.remove(tiny_embedded.model)
    from efficientgpt.models.tiny import tiny_model

    other = tmp_path / "other"
    tiny_model("llama").save_pretrained(other)
    tiny_embedded.tokenizer.save_pretrained(other)
    assert cli.main(["eval", "--model", str(other), "--delta", str(tmp_path / "D"), "--max-tokens", "512"]) == 1
    err = capsys.readouterr().err
    assert "refusing to load the lora delta" in err and "hidden_size: delta was made for 64, this model has 32" in err
