"""``prepare``: the pre-flight check of the whole DAG (``dcm.pipeline.check``: every problem at once, before
any work), then the training and evaluation (prompt, seed) sets, ``data/prompts.json``
(``dcm.data.prompts``: the shapes world's splits, or a real family's prompt files; with VBench's standard
mode the evaluation rows are its own suite, ``dcm.evaluation.vbench_suite``)."""

from __future__ import annotations

from dcm import io, paths, tracking
from dcm.config import Params
from dcm.data.prompts import build_prompt_sets
from dcm.evaluation import vbench_suite
from dcm.pipeline import check


def run(params: Params) -> None:
    check.require(params)  # nothing is written when the DAG of these params would fail anywhere
    prompt_sets = build_prompt_sets(params, vbench_suite.standard_rows(params))
    with tracking.stage_run(params, "prepare") as run_log:
        io.write_json_atomic(paths.PROMPTS, prompt_sets)
        run_log.metrics({"train_rows": len(prompt_sets["train"]), "eval_rows": len(prompt_sets["eval"]),
                         "train_prompts": len({r["prompt_id"] for r in prompt_sets["train"]})})
        run_log.artifact(paths.PROMPTS)
    suite = vbench_suite.describe(prompt_sets.get("suite"))
    print(f"prepare: {len(prompt_sets['train'])} train rows, {len(prompt_sets['eval'])} eval rows "
          f"-> {paths.PROMPTS}" + (f"\n  eval rows: {suite}" if suite else ""))
