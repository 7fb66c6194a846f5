"""Reports rendered from a results directory of benchmark runs: Markdown tables, PNG plots, README section.

Everything here reads the run files (:mod:`efficientgpt.bench.schema`) and nothing else, so a report
can be regenerated at any time and a stale one detected (:func:`check`): measured numbers are never
typed by hand. The README holds a copy of the main tables between the markers
``<!-- bench-results:start -->`` and ``<!-- bench-results:end -->``; :func:`update_readme` rewrites only
what lies between them (appending the section at the end of the file the first time).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from efficientgpt.bench import schema
from efficientgpt.bench.schema import number as _num
from efficientgpt.registry import FAMILIES

START = "<!-- bench-results:start -->"
END = "<!-- bench-results:end -->"
REPORT = "report.md"
PLOTS = {"quality": "quality_vs_trainable.png", "curves": "loss_curves.png", "compression": "compression.png"}
_FAMILIES = ("baseline", *FAMILIES)


# ---- reading ------------------------------------------------------------------------------------
def load_runs(results: str | Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The valid runs in ``results`` (sorted: base, then by family and name), and warnings for files that
    declare the run schema but do not match it. Other JSON files (other benchmarks' results) are ignored."""
    runs, warnings = [], []
    directory = Path(results)
    if not directory.is_dir():
        return runs, [f"{directory}: no such results directory"]
    for path in sorted(directory.glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            warnings.append(f"{path.name}: not readable JSON ({err})")
            continue
        if not isinstance(data, dict) or data.get("schema") != schema.SCHEMA:
            continue  # another benchmark's results sharing the directory
        found = schema.problems(data)
        if found:
            warnings.append(f"{path.name}: not a benchmark run ({found[0]})")
            continue
        runs.append(data)
    runs.sort(key=sort_key)
    return runs, warnings


def sort_key(run: dict[str, Any]) -> tuple:
    family = run["family"]
    return (_FAMILIES.index(family) if family in _FAMILIES else len(_FAMILIES), run["kind"] == "peft_anchor",
            run["name"])


# ---- formatting ---------------------------------------------------------------------------------
def fmt_ppl(x: Any) -> str:
    x = _num(x)
    return "—" if x is None else (f"{x:,.2f}" if x < 1e5 else f"{x:.3g}")


def fmt_count(x: Any) -> str:
    x = _num(x)
    if x is None:
        return "—"
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}"
    return f"{int(x)}"


def fmt_bytes(x: Any) -> str:
    x = _num(x)
    if x is None:
        return "—"
    for div, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if abs(x) >= div:
            return f"{x / div:.3g} {suffix}"
    return f"{int(x)} B"


def fmt_pct(x: Any) -> str:
    x = _num(x)
    return "—" if x is None else ("0%" if x == 0 else f"{x:.3g}%")


def fmt_float(x: Any, digits: int = 1, scale: float = 1.0) -> str:
    x = _num(x)
    return "—" if x is None else f"{x * scale:,.{digits}f}"


def fmt_ratio(a: Any, b: Any) -> str:
    a, b = _num(a), _num(b)
    return "—" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def fmt_delta(x: Any, base: Any) -> str:
    x, base = _num(x), _num(base)
    if x is None or base is None:
        return "—"
    return f"{x - base:+,.2f}"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _status(run: dict[str, Any]) -> str:
    if run["status"] == "ok":
        return "ok"
    message = (run.get("error") or {}).get("message", "").strip().splitlines()
    first = message[0] if message else ""
    return f"**{run['status']}**: {first[:120]}"


def _table(header: list[str], rows: list[list[str]], align: list[str]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return out


#: The achieved values shown in tables, in this order (a run's JSON keeps everything the method reported).
ACHIEVED_SHOWN = ("sparsity", "pattern", "ratio", "mean_rank", "bits", "group_size", "bits_per_weight",
                  "bits_per_parameter", "model_ratio", "kv_heads", "heads_removed")


def _achieved(achieved: Any) -> str:
    if not isinstance(achieved, dict):
        return "—"
    shown = [k for k in ACHIEVED_SHOWN if k in achieved] or [
        k for k, v in achieved.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)][:3]
    parts = []
    for k in shown:
        v = achieved[k]
        if isinstance(v, bool) or isinstance(v, (dict, list)) or v is None:
            continue
        parts.append(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}")
    return ", ".join(parts) or "—"


# ---- tables -------------------------------------------------------------------------------------
def _base(runs):
    return next((r for r in runs if r["kind"] == "baseline" and r["status"] == "ok"), None)


def _quality(base, data):
    q = ((base or {}).get("metrics", {}).get("quality") or {}).get(data) or {}
    return q


def _label(run: dict[str, Any]) -> str:
    """The method, and the run's name where it says more than the method and its data (``-task-NAME``)."""
    data = run["data"]["train"] or ""
    name = run["name"]
    if data.startswith("task:") and name.endswith("-task-" + data.split(":", 1)[1]):
        name = name[: -len("-task-" + data.split(":", 1)[1])]
    return run["method"] if name == run["method"] else f"{run['method']} ({name})"


def adaptation_tables(runs: list[dict[str, Any]]) -> list[str]:
    base = _base(runs)
    tuned = [r for r in runs if r["kind"] == "tune"]
    groups: dict[str, list[dict]] = {}
    for r in tuned:
        groups.setdefault(r["data"]["eval"] or "?", []).append(r)
    out = []
    for data, group in groups.items():
        q = _quality(base, data)
        header = ["method", "family", "val ppl", "vs base", "trainable", "% of base", "delta on disk",
                  "peak memory", "step (ms)", "tokens/s", "decode (ms/token)", "wall (s)", "status"]
        align = ["l", "l"] + ["r"] * 10 + ["l"]
        rows = []
        if base is not None:
            bm = base["metrics"]
            rows.append(["base (untouched)", "baseline", fmt_ppl(q.get("ppl")), "—", "0", "0%", "—", "—", "—", "—",
                         fmt_float(bm.get("latency_ms_per_token"), 2), fmt_float(bm.get("wall_s")), "ok"])
        accuracy = any(_num(r["metrics"].get("accuracy")) is not None for r in group)
        if accuracy:
            header.insert(3, "accuracy")
            align.insert(3, "r")
            if rows:
                rows[0].insert(3, fmt_float(q.get("accuracy"), 3))
        for r in group:
            m = r["metrics"]
            label = _label(r)
            row = [label, r["family"], fmt_ppl(m.get("val_ppl")), fmt_delta(m.get("val_ppl"), q.get("ppl")),
                   fmt_count(m.get("trainable_params")), fmt_pct(m.get("trainable_pct")),
                   fmt_bytes(m.get("artifact_bytes")), fmt_bytes(m.get("peak_memory_bytes")),
                   fmt_float(m.get("step_time_s"), 1, 1000.0), fmt_float(m.get("tokens_per_s"), 0),
                   fmt_float(m.get("latency_ms_per_token"), 2), fmt_float(m.get("wall_s")), _status(r)]
            if accuracy:
                row.insert(3, fmt_float(m.get("accuracy"), 3))
            rows.append(row)
        out += [f"### Adaptation to `{data}` (validation split)", ""] + _table(header, rows, align) + [""]
    return out


def compression_table(runs: list[dict[str, Any]]) -> list[str]:
    base = _base(runs)
    group = [r for r in runs if r["kind"] == "compress"]
    if not group:
        return []
    data = group[0]["data"]["eval"]
    q = _quality(base, data)
    header = ["method", "family", "achieved", "val ppl", "vs base", "parameters (nonzero)", "size on disk",
              "size vs base", "peak memory", "compress (s)", "decode (ms/token)", "wall (s)", "status"]
    align = ["l", "l", "l"] + ["r"] * 9 + ["l"]
    rows = []
    if base is not None:
        bm = base["metrics"]
        rows.append(["base (untouched)", "baseline", "—", fmt_ppl(q.get("ppl")), "—", fmt_count(bm.get("total_params")),
                     fmt_bytes(bm.get("artifact_bytes")), "1.00", "—", "—",
                     fmt_float(bm.get("latency_ms_per_token"), 2), fmt_float(bm.get("wall_s")), "ok"])
    for r in group:
        m = r["metrics"]
        params = "—"
        if _num(m.get("params_after")) is not None:
            params = f"{fmt_count(m.get('params_after'))} ({fmt_count(m.get('nonzero_params_after'))})"
        rows.append([r["name"], r["family"], _achieved(m.get("achieved")), fmt_ppl(m.get("val_ppl")),
                     fmt_delta(m.get("val_ppl"), q.get("ppl")), params, fmt_bytes(m.get("artifact_bytes")),
                     fmt_float(m.get("size_ratio"), 2), fmt_bytes(m.get("peak_memory_bytes")),
                     fmt_float(m.get("compress_s"), 1), fmt_float(m.get("latency_ms_per_token"), 2),
                     fmt_float(m.get("wall_s")), _status(r)])
    return [f"### Compression, scored on `{data}` (validation split)", ""] + _table(header, rows, align) + [""]


def peft_pairs(runs: list[dict[str, Any]]) -> list[tuple[dict, dict | None]]:
    """(HF PEFT run, our run it is paired with) for every peft_anchor run."""
    by_name = {r["name"]: r for r in runs}
    return [(r, by_name.get(r["pair"])) for r in runs if r["kind"] == "peft_anchor"]


def ratios(ours: dict[str, Any] | None, theirs: dict[str, Any]) -> dict[str, float | None]:
    """ours/PEFT for step time, peak memory, validation perplexity and trainable parameters."""
    out = {}
    for key in ("step_time_s", "peak_memory_bytes", "val_ppl", "trainable_params", "latency_ms_per_token"):
        a = _num(((ours or {}).get("metrics") or {}).get(key)) if ours and ours["status"] == "ok" else None
        b = _num(theirs["metrics"].get(key)) if theirs["status"] == "ok" else None
        out[key] = a / b if a is not None and b else None
    return out


def peft_table(runs: list[dict[str, Any]]) -> list[str]:
    pairs = peft_pairs(runs)
    if not pairs:
        return []
    header = ["method", "ours: run", "val ppl ours / PEFT", "ratio", "step ms ours / PEFT", "ratio",
              "peak memory ours / PEFT", "ratio", "trainable ours / PEFT", "notes"]
    align = ["l", "l", "r", "r", "r", "r", "r", "r", "r", "l"]
    rows = []
    for theirs, ours in pairs:
        om = (ours or {}).get("metrics", {}) if ours and ours["status"] == "ok" else {}
        tm = theirs["metrics"] if theirs["status"] == "ok" else {}
        rat = ratios(ours, theirs)
        notes = list(theirs.get("notes") or [])
        if theirs["status"] != "ok":
            notes.insert(0, _status(theirs))
        if ours is None:
            notes.insert(0, f"our run {theirs['pair']!r} is missing")
        elif ours["status"] != "ok":
            notes.insert(0, "ours " + _status(ours))
        rows.append([
            theirs["method"].split(":", 1)[-1], theirs["pair"] or "—",
            f"{fmt_ppl(om.get('val_ppl'))} / {fmt_ppl(tm.get('val_ppl'))}", fmt_float(rat["val_ppl"], 3),
            f"{fmt_float(om.get('step_time_s'), 1, 1000.0)} / {fmt_float(tm.get('step_time_s'), 1, 1000.0)}",
            fmt_float(rat["step_time_s"], 2),
            f"{fmt_bytes(om.get('peak_memory_bytes'))} / {fmt_bytes(tm.get('peak_memory_bytes'))}",
            fmt_float(rat["peak_memory_bytes"], 2),
            f"{fmt_count(om.get('trainable_params'))} / {fmt_count(tm.get('trainable_params'))}",
            "; ".join(notes) or "—",
        ])
    return (["### Ours vs Hugging Face PEFT (same model, data, seed, budget and Trainer)", ""]
            + _table(header, rows, align)
            + ["", "Ratios are ours / PEFT: below 1 means ours is faster, smaller or has lower perplexity.", ""])


def rank_tables(runs: list[dict[str, Any]]) -> list[str]:
    out = []
    for r in runs:
        per = r["metrics"].get("ppl_per_rank") if r["status"] == "ok" else None
        if not per:
            continue
        ranks = sorted(per, key=lambda k: int(k))
        out += [f"### `{r['name']}`: validation perplexity at each rank (one training run)", ""]
        out += _table(["rank"] + ranks, [["val ppl"] + [fmt_ppl(per[k]) for k in ranks]], ["l"] + ["r"] * len(ranks))
        out += [""]
    return out


def incomplete_table(runs: list[dict[str, Any]]) -> list[str]:
    bad = [r for r in runs if r["status"] != "ok"]
    if not bad:
        return []
    rows = [[r["name"], r["family"], r["status"],
             ((r.get("error") or {}).get("type", "") + ": " + (r.get("error") or {}).get("message", ""))[:300]]
            for r in bad]
    return ["### Runs that did not complete", ""] + _table(["run", "family", "status", "error"], rows,
                                                          ["l", "l", "l", "l"]) + [""]


def settings(runs: list[dict[str, Any]]) -> list[str]:
    """What the runs share, from the base run (or the first run); differing settings are flagged."""
    ref = _base(runs) or (runs[0] if runs else None)
    if ref is None:
        return ["No benchmark runs."]
    model, env, b = ref["model"], ref["environment"], ref["bench"]
    tuned = next((r for r in runs if r["kind"] == "tune"), None)
    comp = next((r for r in runs if r["kind"] == "compress"), None)
    lines = [f"- Model: `{model['spec']}` ({model['model_type']}, {fmt_count(model['parameters'])} parameters, "
             f"config sha256 `{model['config_sha256'][:12]}`)."]
    if tuned is not None:
        tb = tuned["bench"]
        lines.append(f"- Adaptation: train on `{tuned['data']['train']}` (train split, sha256 "
                     f"`{(tuned['data']['train_sha256'] or '')[:12]}`), {tb.get('steps')} steps x "
                     f"{tb.get('batch_size')} sequences x {tb.get('seq_len')} tokens "
                     f"({fmt_count(tb.get('train_tokens'))} tokens) per method, seed {tb.get('seed')}, AdamW with "
                     "each method's learning rate; scored on "
                     f"{fmt_count(tuned['data'].get('eval_tokens'))} validation tokens.")
    if comp is not None:
        cal = comp.get("calibration") or {}
        lines.append(f"- Compression: default config of each method; calibrated methods use "
                     f"{cal.get('calib_samples', comp['bench'].get('calib_samples'))} windows of "
                     f"`{comp['data']['train']}` (train split); scored on its validation split.")
    lines.append(f"- Environment: {env['device']} ({env['device_name']}), {env['threads']} threads, "
                 f"{env['world_size']} process(es); python {env['python']}, torch {env['torch']}, transformers "
                 f"{env['transformers']}, peft {env['peft']}; quick preset: {'yes' if b.get('quick') else 'no'}.")
    loads = [(r["environment"].get("load_average"), r["environment"].get("threads")) for r in runs]
    busy = [la for la, threads in loads if _num(la) is not None and _num(threads) and la > 1.5 * threads]
    if busy:
        lines.append(f"- **Shared machine**: {len(busy)} of {len(runs)} runs started with a 1-minute load average above "
                     f"1.5x the thread count (up to {max(busy):.1f}); their times and speeds are inflated by "
                     "other processes. Quality, parameter and size columns are unaffected.")
    keys = {json.dumps([r["model"]["config_sha256"], r["bench"].get("quick"), r["bench"].get("seed"),
                        r["environment"]["device"]]) for r in runs}
    if len(keys) > 1:
        lines.append("- **Warning**: these runs do not all share the model, seed, preset and device; "
                     "rerun the bench with --force to make them comparable.")
    return lines


def best_line(runs: list[dict[str, Any]]) -> list[str]:
    """The best run of each table: lowest perplexity (highest accuracy where a task has one)."""
    base = _base(runs)
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in runs:
        if r["kind"] in ("tune", "compress") and r["status"] == "ok" and _num(r["metrics"].get("val_ppl")):
            groups.setdefault((r["kind"], r["data"]["eval"] or "?"), []).append(r)
    out = []
    for (kind, data), group in groups.items():
        what = f"{'adaptation to' if kind == 'tune' else 'compression on'} `{data}`"
        best = min(group, key=lambda r: (r["metrics"]["val_ppl"], r["name"]))
        text = f"lowest perplexity `{best['name']}` ({fmt_ppl(best['metrics']['val_ppl'])})"
        scored = [r for r in group if _num(r["metrics"].get("accuracy")) is not None]
        if scored:
            acc = max(r["metrics"]["accuracy"] for r in scored)
            base_acc = _num(_quality(base, data).get("accuracy"))
            if base_acc is not None and acc <= base_acc:
                text += f"; no method above the base model's accuracy ({fmt_float(base_acc, 3)})"
            else:
                tops = ", ".join(f"`{r['name']}`" for r in scored if r["metrics"]["accuracy"] == acc)
                text += f", highest accuracy {tops} ({fmt_float(acc, 3)})"
        out.append(f"- {what}: {text}")
    return ["Best runs (among methods, not counting the base model):"] + out + [""] if out else []


def body(runs: list[dict[str, Any]], link_prefix: str = "", plots: bool = True,
         sections: tuple[str, ...] = ("adaptation", "compression", "peft", "ranks", "incomplete")) -> list[str]:
    lines = settings(runs) + [""] + best_line(runs)
    if "adaptation" in sections:
        lines += adaptation_tables(runs)
    if "compression" in sections:
        lines += compression_table(runs)
    if "peft" in sections:
        lines += peft_table(runs)
    if "ranks" in sections:
        lines += rank_tables(runs)
    if "incomplete" in sections:
        lines += incomplete_table(runs)
    if plots:
        shown = [(k, f) for k, f in PLOTS.items() if _plot_has_data(k, runs)]
        if shown:
            lines += ["### Plots", ""] + [f"![{k}]({link_prefix}{f})" for k, f in shown] + [""]
    return lines


def render_report(runs: list[dict[str, Any]], warnings: list[str] | None = None) -> str:
    lines = ["# efficientgpt benchmark results", "",
             "Rendered by `efficientgpt bench report` from the JSON files in this directory (one per run; "
             "schema in docs/bench.md). Do not edit by hand.", ""]
    lines += body(runs)
    if warnings:
        lines += ["### Files skipped", ""] + [f"- {_cell(w)}" for w in warnings] + [""]
    return "\n".join(lines).rstrip() + "\n"


def render_readme_section(runs: list[dict[str, Any]], results_link: str) -> str:
    prefix = results_link.rstrip("/") + "/"
    lines = [START, "## Benchmark results", "",
             f"Rendered from [`{results_link}`]({prefix}{REPORT}) by `efficientgpt bench report --results "
             f"{results_link} --readme README.md`; never edited by hand (a test fails when it is stale). "
             f"The full report, with DyLoRA's per-rank quality and the plots, is [{REPORT}]({prefix}{REPORT}).", ""]
    lines += body(runs, link_prefix=prefix, plots=True, sections=("adaptation", "compression", "peft", "incomplete"))
    return "\n".join(lines).rstrip() + "\n" + END


# ---- plots --------------------------------------------------------------------------------------
def _plot_has_data(kind: str, runs: list[dict[str, Any]]) -> bool:
    ok = [r for r in runs if r["status"] == "ok"]
    if kind == "quality":
        return any(r["kind"] in ("tune", "peft_anchor") and _num(r["metrics"].get("val_ppl")) for r in ok)
    if kind == "curves":
        return any(r["curves"].get("train") for r in ok)
    return any(r["kind"] == "compress" and _num(r["metrics"].get("val_ppl")) for r in ok)


def plot(runs: list[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """Write the PNG plots that have data; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    ok = [r for r in runs if r["status"] == "ok"]
    base = _base(runs)
    written = []

    def save(fig, kind: str) -> None:
        path = out_dir / PLOTS[kind]
        fig.tight_layout()
        fig.savefig(path, dpi=110, metadata={"Software": None})  # no version stamp: same results, same file
        plt.close(fig)
        written.append(path)

    if _plot_has_data("quality", runs):
        # One panel per evaluation data: perplexities on different data do not share a scale.
        tuned = [r for r in ok if r["kind"] in ("tune", "peft_anchor") and _num(r["metrics"].get("val_ppl"))
                 and r["metrics"].get("trainable_params")]
        datas = list(dict.fromkeys(r["data"]["eval"] for r in tuned))
        fig, axes = plt.subplots(1, len(datas), figsize=(6.5 * len(datas), 4.8), squeeze=False)
        for ax, data in zip(axes[0], datas):
            for r in (x for x in tuned if x["data"]["eval"] == data):
                m = r["metrics"]
                anchor = r["kind"] == "peft_anchor"
                ax.scatter(m["trainable_params"], m["val_ppl"], marker="s" if anchor else "o", s=50 if anchor else 25,
                           facecolors="none" if anchor else "C0", edgecolors="C3" if anchor else "C0")
                if not anchor:
                    ax.annotate(_label(r), (m["trainable_params"], m["val_ppl"]), fontsize=7, xytext=(3, 3),
                                textcoords="offset points")
            q = _quality(base, data)
            if _num(q.get("ppl")):
                ax.axhline(q["ppl"], color="grey", linestyle="--", linewidth=1, label="base (untouched)")
                ax.legend(fontsize=8)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("trainable parameters")
            ax.set_ylabel("validation perplexity")
            ax.set_title(f"{data}: quality vs trainable parameters (red squares: HF PEFT)", fontsize=9)
            ax.grid(alpha=0.3)
        save(fig, "quality")

    if _plot_has_data("curves", runs):
        curved = [r for r in ok if r["curves"].get("train")]
        datas = list(dict.fromkeys(r["data"]["train"] for r in curved))
        fig, axes = plt.subplots(1, len(datas), figsize=(6.5 * len(datas), 4.8), squeeze=False)
        for ax, data in zip(axes[0], datas):
            ours = [r for r in curved if r["data"]["train"] == data and r["kind"] != "peft_anchor"]
            colour = {r["name"]: f"C{i % 10}" for i, r in enumerate(ours)}
            for r in (x for x in curved if x["data"]["train"] == data):
                pts = r["curves"]["train"]
                anchor = r["kind"] == "peft_anchor"
                ax.plot([p["step"] for p in pts], [p["loss"] for p in pts], linewidth=1,
                        label=None if anchor else _label(r), linestyle="--" if anchor else "-",
                        color=colour.get(r.get("pair") if anchor else r["name"], "black"))
            ax.set_xlabel("optimizer step")
            ax.set_ylabel("training loss (nats/token)")
            ax.set_title(f"{data}: training loss (dashed: HF PEFT, coloured as ours)", fontsize=9)
            ax.legend(fontsize=6, ncol=2)
            ax.grid(alpha=0.3)
        save(fig, "curves")

    if _plot_has_data("compression", runs):
        comp = [r for r in ok if r["kind"] == "compress" and _num(r["metrics"].get("val_ppl"))]
        fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
        q = _quality(base, comp[0]["data"]["eval"])
        for ax, key, label in ((axes[0], "sparsity", "achieved sparsity"),
                               (axes[1], "size_ratio", "size on disk / base model")):
            for r in comp:
                x = _num(r["metrics"].get(key))
                if x is None:
                    continue
                ax.scatter(x, r["metrics"]["val_ppl"], color=f"C{_FAMILIES.index(r['family']) % 10}")
                ax.annotate(r["name"], (x, r["metrics"]["val_ppl"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
            if _num(q.get("ppl")):
                ax.axhline(q["ppl"], color="grey", linestyle="--", linewidth=1, label="base (untouched)")
                ax.legend(fontsize=8)
            ax.set_xlabel(label)
            ax.set_ylabel("validation perplexity")
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
        axes[0].set_title("Perplexity vs sparsity", fontsize=10)
        axes[1].set_title("Perplexity vs compression ratio", fontsize=10)
        save(fig, "compression")
    return written


# ---- writing and checking -----------------------------------------------------------------------
def readme_link(results: str | Path, readme: str | Path) -> str:
    """``results`` relative to the README's directory, with forward slashes."""
    rel = os.path.relpath(Path(results).resolve(), Path(readme).resolve().parent)
    return Path(rel).as_posix()


def splice(readme_text: str, section: str) -> str:
    """``readme_text`` with the marked section replaced by ``section`` (appended at the end if absent)."""
    start, end = readme_text.find(START), readme_text.find(END)
    if start != -1 and end != -1 and end > start:
        return readme_text[:start] + section + readme_text[end + len(END):]
    sep = "" if readme_text.endswith("\n\n") else ("\n" if readme_text.endswith("\n") else "\n\n")
    return readme_text + sep + section + "\n"


def current_section(readme_text: str) -> str | None:
    start, end = readme_text.find(START), readme_text.find(END)
    return readme_text[start:end + len(END)] if start != -1 and end > start else None


def write(results: str | Path, readme: str | Path | None = None, plots: bool = True) -> dict[str, Any]:
    """Render ``report.md`` (+ PNGs) in ``results``, and the README section if ``readme`` is given."""
    from efficientgpt.cache import atomic_write_text

    runs, warnings = load_runs(results)
    results = Path(results)
    report_path = results / REPORT
    atomic_write_text(report_path, render_report(runs, warnings))
    written = plot(runs, results) if plots else []
    out = {"report": str(report_path), "plots": [str(p) for p in written], "runs": len(runs), "warnings": warnings}
    if readme is not None:
        readme = Path(readme)
        text = readme.read_text(encoding="utf-8") if readme.exists() else ""
        new = splice(text, render_readme_section(runs, readme_link(results, readme)))
        if new != text:
            atomic_write_text(readme, new)
        out["readme"] = str(readme)
        out["readme_changed"] = new != text
    return out


def check(results: str | Path, readme: str | Path | None = None) -> list[str]:
    """What is stale: ``report.md`` or the README section differing from what the run files render."""
    runs, warnings = load_runs(results)
    stale = []
    report_path = Path(results) / REPORT
    if not report_path.exists() or report_path.read_text(encoding="utf-8") != render_report(runs, warnings):
        stale.append(f"{report_path} is stale")
    if readme is not None:
        readme = Path(readme)
        text = readme.read_text(encoding="utf-8") if readme.exists() else ""
        if current_section(text) != render_readme_section(runs, readme_link(results, readme)):
            stale.append(f"{readme}: the section between {START} and {END} is stale or missing")
    return stale


def text_tables(runs: list[dict[str, Any]]) -> str:
    """The tables for the terminal (Markdown without the plots)."""
    return "\n".join(body(runs, plots=False)).rstrip() + "\n"
