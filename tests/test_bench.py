"""The benchmark harness end to end on a tiny model built here: JSON per run matching the schema, the
Markdown report and plots, skipping and forcing reruns, resuming after an interruption, recording a
failing method and going on, HF PEFT anchors with ratios, and the command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess

import pytest
import torch

from efficientgpt import registry
from efficientgpt.bench import report, runner, schema
from efficientgpt.config import ConfigBase, field
from efficientgpt.errors import UserError


# ---- a tiny world: model directory, tokenizer, two data directories ------------------------------
def _stdlib_text(modules) -> str:
    import importlib
    import inspect

    return "\n\n".join(inspect.getsource(importlib.import_module(m)) for m in modules)


def _docs_text() -> str:
    import importlib

    names = ["argparse", "json", "textwrap", "collections", "functools", "itertools", "pathlib", "re",
             "string", "dataclasses", "statistics", "fractions", "decimal"]
    docs = []
    for n in names:
        mod = importlib.import_module(n)
        docs.append(mod.__doc__ or "")
        docs += [getattr(mod, a).__doc__ or "" for a in sorted(dir(mod)) if not a.startswith("_")][:40]
    return "\n\n".join(d for d in docs if d)


def _split_dir(path, text: str):
    path.mkdir()
    cut = int(len(text) * 0.8)
    (path / "train.txt").write_text(text[:cut])
    (path / "validation.txt").write_text(text[cut:])
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from efficientgpt.data.tokenizer import train_tokenizer
    from efficientgpt.models.tiny import tiny_model

    root = tmp_path_factory.mktemp("bench-world")
    code = _stdlib_text(["json.decoder", "json.encoder", "textwrap", "string"])
    prose = _docs_text()
    tok = train_tokenizer([prose, code], vocab_size=320)
    model = tiny_model("llama", vocab_size=len(tok), max_positions=64)
    eos = tok.eos_token_id
    model.config.eos_token_id = model.config.pad_token_id = model.config.bos_token_id = eos
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = eos
    model.save_pretrained(root / "model", safe_serialization=True)
    tok.save_pretrained(root / "model")
    return {"model": str(root / "model"), "code": str(_split_dir(root / "code", code)),
            "prose": str(_split_dir(root / "prose", prose))}


def _cfg(world, **kw) -> runner.BenchConfig:
    values = dict(model=world["model"], data=world["code"], compress_data=world["prose"], steps=3, batch_size=2,
                  seq_len=16, eval_tokens=256, calib_samples=2, latency_tokens=2, progress=False, device="cpu",
                  tasks=[])
    values.update(kw)
    return runner.BenchConfig(**values)


# ---- a compression method registered only for these tests ----------------------------------------
@dataclasses.dataclass
class ToyPruneConfig(ConfigBase):
    sparsity: float = field(0.5, "fraction of each linear weight set to zero", minimum=0.0, maximum=1.0)


def _toy_prune(model, config, progress=False):
    from efficientgpt.compress.report import CompressionResult, linear_sparsity
    from efficientgpt.models import arch

    with torch.no_grad():
        for t in arch.resolve(model, ["all-linear"]):
            w = t.module.weight
            k = int(w.numel() * config.sparsity)
            threshold = w.abs().flatten().kthvalue(k).values
            w[w.abs() <= threshold] = 0.0
    achieved, _ = linear_sparsity(model)
    return CompressionResult(method="toy_prune", achieved={"sparsity": achieved})


TOY = registry.MethodSpec(name="toy_prune", family="prune", config_cls=ToyPruneConfig, apply=_toy_prune,
                          paper="magnitude-pruning", summary="test-only magnitude pruning")


@pytest.fixture
def toy_prune(monkeypatch):
    registry.methods()  # load the real registry first, so the toy entry is not overwritten
    monkeypatch.setitem(registry._REGISTRY, "toy_prune", TOY)
    return TOY


def _broken(monkeypatch, name: str, exc: BaseException):
    spec = registry.get(name)

    def apply(*args, **kwargs):
        raise exc

    monkeypatch.setitem(registry._REGISTRY, name, dataclasses.replace(spec, apply=apply))


def _load(path):
    return json.loads(path.read_text())


# ---- tests --------------------------------------------------------------------------------------
def test_end_to_end_records_every_run_and_a_failure(world, tmp_path, toy_prune, monkeypatch):
    _broken(monkeypatch, "bitfit", RuntimeError("bitfit exploded on purpose"))
    out = tmp_path / "R"
    outcomes = runner.run_bench(_cfg(world), out, methods=["lora", "bitfit", "dylora", "toy_prune"])
    assert [o.name for o in outcomes] == ["base", "bitfit", "dylora", "lora", "toy_prune"]
    for o in outcomes:
        schema.validate(_load(o.path))  # what is on disk matches the schema
    runs = {o.name: _load(o.path) for o in outcomes}

    bad = runs["bitfit"]
    assert bad["status"] == "failed" and "bitfit exploded on purpose" in bad["error"]["message"]
    assert bad["error"]["type"] == "RuntimeError" and bad["metrics"] == {}

    base = runs["base"]["metrics"]
    assert set(base["quality"]) == {world["code"], world["prose"]} and base["trainable_params"] == 0

    lora = runs["lora"]
    m = lora["metrics"]
    assert lora["status"] == "ok" and lora["family"] == "peft" and lora["kind"] == "tune"
    # LoRA r=8 on q and v of 2 layers: q is 32x32 and v is 32x16 (2 kv heads of 8) in this model
    assert m["trainable_params"] == 2 * (8 * (32 + 32) + 8 * (32 + 16))
    assert m["trainable_pct"] == pytest.approx(100 * m["trainable_params"] / runs["base"]["model"]["parameters"])
    assert m["val_loss_before"] == pytest.approx(base["quality"][world["code"]]["loss"], rel=1e-6)
    assert m["val_ppl"] == pytest.approx(torch.tensor(m["val_loss"]).exp().item(), rel=1e-6)
    for key in ("artifact_bytes", "peak_memory_bytes", "step_time_s", "tokens_per_s", "latency_ms_per_token",
                "wall_s"):
        assert m[key] > 0, key
    assert [p["step"] for p in lora["curves"]["train"]] == [1, 2, 3]
    assert lora["bench"]["train_tokens"] == 3 * 2 * 15 and lora["train_config"]["lr"] == runner.DEFAULT_LR
    assert lora["data"]["train_sha256"] and lora["data"]["eval_sha256"]
    assert lora["environment"]["torch"] == torch.__version__ and lora["environment"]["device"] == "cpu"

    per_rank = runs["dylora"]["metrics"]["ppl_per_rank"]
    assert sorted(per_rank, key=int) == [str(r) for r in range(1, 9)]  # DyLoRA's default r_max = 8

    prune = runs["toy_prune"]
    pm = prune["metrics"]
    assert prune["kind"] == "compress" and pm["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert pm["val_ppl_before"] == pytest.approx(base["quality"][world["prose"]]["ppl"], rel=1e-6)
    assert pm["artifact_bytes"] > 0 and pm["size_ratio"] == pytest.approx(1.0, rel=0.1)
    assert "trainable_params" not in pm

    written = report.write(out)
    text = (out / "report.md").read_text()
    assert "| lora | peft |" in text and "| toy_prune | prune |" in text and "**failed**: bitfit exploded" in text
    assert "`dylora`: validation perplexity at each rank" in text
    assert {p.rsplit("/", 1)[-1] for p in written["plots"]} == set(report.PLOTS.values())
    for p in written["plots"]:
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"

    # the survey's measured column reads these files
    from efficientgpt.survey.results import load_runs

    survey_runs, warnings = load_runs(out)
    assert warnings == [] and survey_runs["lora"][0].metrics["val_ppl"] == m["val_ppl"]
    assert "bitfit" not in survey_runs


def test_task_runs_and_a_task_only_method(world, tmp_path):
    """PEFT methods also adapt to a suite task (accuracy recorded); ATTEMPT, which trains on task data
    only, is skipped on plain text with the reason and runs on the task with source prompts it trains."""
    out = tmp_path / "R"
    outcomes = runner.run_bench(_cfg(world, tasks=["kv_lookup"], steps=2, seq_len=64, latency_tokens=0), out,
                                methods=["attempt", "bitfit"])
    runs = {o.name: o.record for o in outcomes}
    assert list(runs) == ["base", "attempt", "attempt-task-kv_lookup", "bitfit", "bitfit-task-kv_lookup"]
    assert runs["attempt"]["status"] == "skipped" and "task data only" in runs["attempt"]["error"]["message"]
    att = runs["attempt-task-kv_lookup"]
    assert att["status"] == "ok", att["error"]
    assert att["config"]["train_sources"] is None  # the source prompts train for the run's steps, in the run
    for name in ("attempt-task-kv_lookup", "bitfit-task-kv_lookup"):
        assert runs[name]["data"]["train"] == "task:kv_lookup"
        assert 0.0 <= runs[name]["metrics"]["accuracy"] <= 1.0
    assert "accuracy" in runs["base"]["metrics"]["quality"]["task:kv_lookup"]
    text = report.render_report(report.load_runs(out)[0])
    assert "### Adaptation to `task:kv_lookup` (validation split)" in text and "| attempt | peft |" in text
    # without the task, the baseline (which scores every data of the bench) reruns; the methods' runs are reused
    again = runner.run_bench(_cfg(world, tasks=[], steps=2, seq_len=64, latency_tokens=0), out,
                             methods=["attempt", "bitfit"])
    assert {o.name: o.reused for o in again} == {"base": False, "attempt": True, "bitfit": True}


def test_unknown_task_fails_before_any_run_is_written(world, tmp_path):
    out = tmp_path / "R"
    with pytest.raises(UserError, match="unknown task 'kv_lookpu'.*kv_lookup"):
        runner.run_bench(_cfg(world, tasks=["kv_lookpu"]), out, methods=["lora"])
    assert not out.exists()


def test_rerun_skips_force_reruns_and_changed_settings_rerun(world, tmp_path):
    out = tmp_path / "R"
    first = runner.run_bench(_cfg(world), out, methods=["ia3"])
    stamps = {o.name: o.path.stat().st_mtime_ns for o in first}
    again = runner.run_bench(_cfg(world), out, methods=["ia3"])
    assert all(o.reused for o in again) and {o.name: o.path.stat().st_mtime_ns for o in again} == stamps
    forced = runner.run_bench(_cfg(world), out, methods=["ia3"], force=True)
    assert not any(o.reused for o in forced)
    changed = runner.run_bench(_cfg(world, steps=4), out, methods=["ia3"])
    assert [o.reused for o in changed] == [False, False]  # a different budget is a different run
    assert _load(out / "ia3.json")["bench"]["steps"] == 4


def test_run_key_counts_the_processes_only_when_there_are_several(world):
    cfg = _cfg(world)
    item = next(i for i in runner.plan(cfg, "all", ["ia3"]) if i.method == "ia3")
    fp = {"spec": "m", "config_sha256": "0" * 64, "parameters": 1}
    one = runner.run_key(item, cfg, fp)
    assert runner.run_key(item, cfg, fp, world=1) == one  # single-process keys (committed results) unchanged
    assert runner.run_key(item, cfg, fp, world=2) not in (one, runner.run_key(item, cfg, fp, world=4))


def test_interrupted_bench_resumes_and_failed_runs_are_retried(world, tmp_path, monkeypatch):
    out = tmp_path / "R"
    methods = ["ia3", "lora", "bitfit"]  # run in family/name order: bitfit, ia3, lora
    _broken(monkeypatch, "bitfit", ValueError("transient"))
    _broken(monkeypatch, "lora", KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        runner.run_bench(_cfg(world), out, methods=methods)
    assert sorted(p.name for p in out.glob("*.json")) == ["base.json", "bitfit.json", "ia3.json"]
    assert _load(out / "bitfit.json")["status"] == "failed"
    monkeypatch.undo()
    resumed = runner.run_bench(_cfg(world), out, methods=methods)
    assert {o.name: o.reused for o in resumed} == {"base": True, "bitfit": False, "ia3": True, "lora": False}
    assert _load(out / "bitfit.json")["status"] == "ok" and _load(out / "lora.json")["status"] == "ok"


def test_with_peft_runs_hf_peft_and_reports_ratios(world, tmp_path):
    pytest.importorskip("peft")
    out = tmp_path / "R"
    outcomes = runner.run_bench(_cfg(world, with_peft=True), out,
                                methods=["lora", "ia3", "prompt_tuning", "prefix_tuning"])
    # on Llama the paper's (IA)^3 targets are PEFT's defaults, so our default run is the one compared
    assert [o.name for o in outcomes] == ["base", "ia3", "peft-ia3", "lora", "peft-lora", "prefix_tuning",
                                          "peft-prefix_tuning", "prompt_tuning", "peft-prompt_tuning"]
    runs = {o.name: _load(o.path) for o in outcomes}
    for r in runs.values():
        schema.validate(r)
        assert r["status"] == "ok", (r["name"], r["error"])
    theirs, ours = runs["peft-lora"], runs["lora"]
    assert theirs["method"] == "peft:lora" and theirs["implementation"] == "hf-peft" and theirs["pair"] == "lora"
    # same modules, same rank: the same number of trainable parameters
    assert theirs["metrics"]["trainable_params"] == ours["metrics"]["trainable_params"]
    assert theirs["config"]["r"] == 8 and sorted(theirs["config"]["target_modules"]) == [
        f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in ("q", "v")]
    assert runs["peft-ia3"]["pair"] == "ia3"
    assert runs["peft-ia3"]["metrics"]["trainable_params"] == runs["ia3"]["metrics"]["trainable_params"]
    # (IA)^3 vectors start at 1 in both: same modules, same data, same optimizer give the same model
    assert runs["peft-ia3"]["metrics"]["val_loss"] == pytest.approx(runs["ia3"]["metrics"]["val_loss"], rel=1e-5)
    # prompt tuning: PEFT's n + T logits are cut to T, so the loss before training matches the base model's
    pt = runs["peft-prompt_tuning"]["metrics"]
    assert pt["trainable_params"] == 20 * 32 == runs["prompt_tuning"]["metrics"]["trainable_params"]
    assert pt["val_ppl"] < 10 * runs["base"]["metrics"]["val_ppl"]
    rat = report.ratios(ours, theirs)
    assert rat["val_ppl"] == pytest.approx(ours["metrics"]["val_ppl"] / theirs["metrics"]["val_ppl"])
    assert rat["step_time_s"] > 0 and rat["trainable_params"] == 1.0
    report.write(out)
    text = (out / "report.md").read_text()
    assert "Ours vs Hugging Face PEFT" in text and "| lora | lora |" in text


def test_with_peft_on_gpt2_notes_the_fused_projection_and_compares_ia3_peft_compatible(world):
    pytest.importorskip("peft")
    from efficientgpt.bench import peft_anchor
    from efficientgpt.models.tiny import tiny_model
    from efficientgpt.peft.ia3 import IA3Config
    from efficientgpt.peft.lora import LoraConfig

    gpt2 = tiny_model("gpt2")
    cfg, notes = peft_anchor.peft_config("lora", LoraConfig(), gpt2)
    assert sorted(cfg.target_modules) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    assert cfg.fan_in_fan_out is True and "whole fused module (c_attn" in notes[0]
    # the paper's (IA)^3 scales slices k, v of c_attn; PEFT's default the whole c_attn: an extra run of ours
    assert peft_anchor.ours_config("ia3", IA3Config(), gpt2).peft_compatible is True
    planned = runner.plan(_cfg(world, with_peft=True), methods=["ia3"], model=gpt2)
    assert [(p.name, p.pair) for p in planned] == [("base", None), ("ia3", None), ("ia3-peft_compatible", None),
                                                    ("peft-ia3", "ia3-peft_compatible")]


def test_plan_unknown_method_unsupported_family_and_suites(world, tmp_path, monkeypatch, toy_prune):
    with pytest.raises(UserError, match=r"unknown method 'lorra'.*registered methods: .*lora"):
        runner.plan(_cfg(world), methods=["lorra"])
    distill = registry.MethodSpec(name="toy_distill", family="distill", config_cls=ToyPruneConfig,
                                  apply=_toy_prune, paper="x", summary="test-only")
    monkeypatch.setitem(registry._REGISTRY, "toy_distill", distill)
    names = {p.name: p.kind for p in runner.plan(_cfg(world))}
    assert names["base"] == "baseline" and names["lora"] == "tune" and names["full"] == "tune"
    assert names["toy_prune"] == "compress" and names["toy_distill"] == "unsupported"
    compress = runner.plan(_cfg(world), suite="compress")
    assert {"base", "toy_prune"} <= {p.name for p in compress}
    assert {p.family for p in compress} <= {"baseline", *runner.COMPRESS_FAMILIES}
    peft_suite = runner.plan(_cfg(world), suite="peft")
    assert {p.family for p in peft_suite} == {"baseline", "peft"} and "full" in {p.name for p in peft_suite}
    outcomes = runner.run_bench(_cfg(world), tmp_path / "R", methods=["toy_distill"])
    rec = outcomes[1].record
    assert rec["status"] == "skipped" and "no pipeline for family 'distill'" in rec["error"]["message"]


def test_schema_rejects_bad_runs():
    good = {
        "schema": schema.SCHEMA, "schema_version": 1, "name": "x", "method": "x", "family": "peft", "kind": "tune",
        "implementation": "efficientgpt", "pair": None, "status": "ok", "error": None, "key": "k", "config": {},
        "train_config": None, "calibration": None,
        "model": {"spec": "m", "model_type": "llama", "parameters": 1, "config_sha256": "s"},
        "data": {"train": "d", "eval": "d", "train_sha256": None, "eval_sha256": None, "eval_tokens": 1},
        "environment": dict.fromkeys(schema.ENVIRONMENT_FIELDS, "v"),
        "bench": {}, "metrics": {"val_ppl": 3.0}, "curves": {"train": [{"step": 1, "loss": 2.0}]}, "notes": [],
        "created": "now",
    }
    assert schema.problems(good) == []
    assert "missing field 'status'" in schema.problems({k: v for k, v in good.items() if k != "status"})
    assert any("status is 'great'" in p for p in schema.problems({**good, "status": "great"}))
    assert any("needs error" in p for p in schema.problems({**good, "status": "failed"}))
    assert any("not finite" in p for p in schema.problems({**good, "metrics": {"val_ppl": float("nan")}}))
    assert any("unknown metric" in p for p in schema.problems({**good, "metrics": {"speed": 1}}))
    assert any("pair" in p for p in schema.problems({**good, "kind": "peft_anchor"}))
    with pytest.raises(ValueError, match="does not match the schema"):
        schema.validate({**good, "extra": 1})
    assert schema.finite({"a": float("inf"), "b": [float("nan"), 1.0]}) == {"a": None, "b": [None, 1.0]}


# ---- command line -------------------------------------------------------------------------------
def _parser():
    from efficientgpt.commands import bench, main_job

    p = argparse.ArgumentParser(prog="efficientgpt")
    sub = p.add_subparsers(dest="command")
    bench.register(sub)
    main_job.register(sub)
    return p


def test_cli_bench_json_and_report_check(world, tmp_path, capsys):
    out = tmp_path / "R"
    args = _parser().parse_args([
        "bench", "--methods", "lora", "--model", world["model"], "--data", world["code"], "--compress-data",
        world["prose"], "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--eval-tokens", "256",
        "--latency-tokens", "2", "--device", "cpu", "--tasks", "none", "--out", str(out), "--json", "--no-progress"])
    assert args.func(args) == 0
    result = json.loads(capsys.readouterr().out)  # stdout holds exactly one JSON object
    assert [r["name"] for r in result["runs"]] == ["base", "lora"] and result["runs"][1]["status"] == "ok"
    assert result["report"] == str(out / "report.md") and (out / "report.md").exists()

    readme = tmp_path / "README.md"
    readme.write_text("# project\n\nintro\n")
    check = _parser().parse_args(["bench", "report", "--results", str(out), "--readme", str(readme), "--check"])
    assert check.func(check) == 1  # the README has no section yet
    capsys.readouterr()
    write = _parser().parse_args(["bench", "report", "--results", str(out), "--readme", str(readme), "--no-plots"])
    assert write.func(write) == 0
    text = readme.read_text()
    assert text.startswith("# project\n\nintro\n\n" + report.START) and text.rstrip().endswith(report.END)
    assert "| lora | peft |" in text and "(R/report.md)" in text
    assert check.func(check) == 0
    # a changed result makes the README stale; rendering twice changes nothing
    run = _load(out / "lora.json")
    run["metrics"]["val_ppl"] += 1.0
    (out / "lora.json").write_text(json.dumps(run))
    assert check.func(check) == 1
    assert write.func(write) == 0 and check.func(check) == 0
    assert report.splice(readme.read_text(), report.current_section(readme.read_text())) == readme.read_text()


def test_cli_unknown_method_and_main_job_quick(world, tmp_path):
    args = _parser().parse_args(["bench", "--methods", "lora,nope", "--out", str(tmp_path / "R")])
    with pytest.raises(UserError, match="unknown method 'nope'"):
        args.func(args)
    from efficientgpt.commands.bench import bench_config

    args = _parser().parse_args(["run", "--model", "embedded:tiny", "--json"])
    assert args.out == "bench-results"
    args.quick = True  # what main_job.run does for the tiny model
    cfg = bench_config(args)
    assert cfg.model == "embedded:tiny" and cfg.quick and cfg.steps == runner.QUICK["steps"]
    default = bench_config(_parser().parse_args(["run"]))
    assert default.model == "embedded" and not default.quick and default.steps == 120


@pytest.mark.slow
def test_torchrun_bench_is_data_parallel_and_rank_0_writes(world, tmp_path):
    """Under torchrun the PEFT run trains data-parallel (same result as one process with the same global
    batch), compression runs too, and only rank 0 prints and writes."""
    out = tmp_path / "R"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        ["torchrun", "--nproc_per_node", "2", "--master_port", str(29500 + os.getpid() % 200), "-m", "efficientgpt",
         "bench", "--methods", "lora,magnitude", "--model", world["model"], "--data", world["code"],
         "--compress-data", world["prose"], "--steps", "2", "--batch-size", "2", "--seq-len", "16",
         "--eval-tokens", "256", "--calib-samples", "2", "--latency-tokens", "2", "--tasks", "none",
         "--device", "cpu", "--out", str(out), "--json", "--no-progress"],
        capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1  # rank 0 alone prints
    res = json.loads(lines[0])
    assert [(r["name"], r["status"]) for r in res["runs"]] == [("base", "ok"), ("lora", "ok"), ("magnitude", "ok")]
    ddp = _load(out / "lora.json")
    assert ddp["environment"]["world_size"] == 2
    single = runner.run_bench(_cfg(world, latency_tokens=0), tmp_path / "S", methods=["lora"])[1].record
    assert ddp["metrics"]["val_loss"] == pytest.approx(single["metrics"]["val_loss"], rel=1e-4)


def test_report_formats_are_stable():
    assert report.fmt_count(12_345) == "12.3k" and report.fmt_bytes(3 * 2**20) == "3 MiB"
    assert report.fmt_pct(0.12345) == "0.123%" and report.fmt_ppl(None) == "—"
    assert report.fmt_delta(12.0, 10.5) == "+1.50"
    table = report._table(["a", "b"], [["x|y", "1"]], ["l", "r"])
    assert table == ["| a | b |", "|---|---:|", "| x\\|y | 1 |"]
    assert report.splice("x\n", "S") == "x\n\nS\n" and report.splice("x\n\nS\n", "T") == "x\n\nS\n\nT\n"
    marked = f"x\n\n{report.START}\nold\n{report.END}\n"
    assert report.splice(marked, f"{report.START}\nnew\n{report.END}") == f"x\n\n{report.START}\nnew\n{report.END}\n"
