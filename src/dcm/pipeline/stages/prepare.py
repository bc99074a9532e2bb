"""``prepare``: the training and evaluation (prompt, seed) sets, ``data/prompts.json``
(``dcm.data.prompts``)."""

from __future__ import annotations

from dcm import io, paths, tracking
from dcm.config import Params
from dcm.data.prompts import build_prompt_sets


def run(params: Params) -> None:
    prompt_sets = build_prompt_sets(params)
    with tracking.stage_run(params, "prepare") as run_log:
        io.write_json_atomic(paths.PROMPTS, prompt_sets)
        run_log.metrics({"train_rows": len(prompt_sets["train"]), "eval_rows": len(prompt_sets["eval"]),
                         "train_prompts": len({r["prompt_id"] for r in prompt_sets["train"]})})
        run_log.artifact(paths.PROMPTS)
    print(f"prepare: {len(prompt_sets['train'])} train rows, {len(prompt_sets['eval'])} eval rows "
          f"-> {paths.PROMPTS}")
