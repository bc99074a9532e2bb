"""VBench's own prompt suite as the evaluation rows: read from the vbench package of the VBench venv
(a real venv here, whose ``vbench`` package holds a suite file in VBench's format), five videos per
prompt, or a subset balanced over the dimensions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dcm.config import ConfigError
from dcm.evaluation import vbench_suite
from dcm.evaluation.scoring import VBENCH

DIMS = list(VBENCH)


def suite_entries(n: int) -> list[dict]:
    """VBench_full_info.json's format: prompt_en, dimension (a list), auxiliary_info."""
    return [{"prompt_en": f"prompt number {i}", "dimension": [DIMS[i % len(DIMS)], DIMS[(3 * i) % len(DIMS)]],
             "auxiliary_info": {}} for i in range(n)]


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A venv whose site-packages holds a ``vbench`` package with the suite file, as pip installs it."""
    root = tmp_path_factory.mktemp("vbench-venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    site = next(root.glob("lib/python3*/site-packages"))
    (site / "vbench").mkdir()
    never_imported = "raise ImportError('the suite is found without importing vbench')\n"
    (site / "vbench" / "__init__.py").write_text(never_imported)
    (site / "vbench" / vbench_suite.SUITE_FILE).write_text(json.dumps(suite_entries(40)))
    return root


def test_the_suite_is_read_from_the_venvs_vbench_package_with_five_videos_per_prompt(venv):
    rows, record = vbench_suite.suite_rows(venv)
    assert record["prompts"] == record["of"] == 40 and not record["subset"]
    assert Path(record["suite"]).parent.name == "vbench" and str(venv) in record["suite"]
    assert len(rows) == 40 * vbench_suite.VIDEOS_PER_PROMPT
    assert [r["k"] for r in rows[:6]] == [0, 1, 2, 3, 4, 0]
    assert rows[5]["prompt"] == "prompt number 1" and rows[5]["prompt_id"] == 1
    assert len({r["seed"] for r in rows}) == len(rows)


def test_a_subset_is_balanced_over_the_dimensions_and_keeps_the_full_suites_rows(venv):
    rows, record = vbench_suite.suite_rows(venv, subset=16)
    assert record["subset"] and record["prompts"] == 16 and record["of"] == 40
    covered = {d for r in rows for d in r["dimensions"]}
    assert covered == set(DIMS)  # 16 prompts, 16 dimensions: each served at least once
    full, _ = vbench_suite.suite_rows(venv)
    by_key = {(r["prompt_id"], r["k"]): r for r in full}
    # the same prompt ids and seeds as the full run
    assert all(by_key[(r["prompt_id"], r["k"])] == r for r in rows)
    assert vbench_suite.suite_rows(venv, subset=16) == (rows, record)  # deterministic


def test_a_bad_suite_or_a_missing_venv_names_the_key_and_what_is_allowed(tmp_path):
    bad = tmp_path / "suite.json"
    bad.write_text(json.dumps([{"prompt_en": "ok", "dimension": ["color"]}, {"dimension": ["color"]}]))
    with pytest.raises(ConfigError, match=r"suite.json\[1\].*prompt_en"):
        vbench_suite.read_suite(bad)
    bad.write_text(json.dumps([{"prompt_en": "ok", "dimension": ["colour"]}]))
    with pytest.raises(ConfigError, match=r"dimension.*'colour'"):
        vbench_suite.read_suite(bad)
    with pytest.raises(ConfigError, match=r"evaluation\.vbench\.venv.*dcm vbench setup"):
        vbench_suite.suite_path(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=r"evaluation\.vbench\.subset = 41"):
        vbench_suite.balanced_subset(vbench_suite.read_suite(_write(tmp_path, suite_entries(40))), 41)


def _write(tmp_path: Path, entries: list[dict]) -> Path:
    path = tmp_path / "full.json"
    path.write_text(json.dumps(entries))
    return path


# ------------------------------------------------------------------------------------ into the DAG's rows


def standard_params(venv: Path, root: Path, **evaluation):
    """A wan project whose evaluation is VBench's standard suite from ``venv`` (``evaluation`` overrides)."""
    from dcm import config
    from helpers import family_raw, real_data

    (root / "wan").mkdir(exist_ok=True)  # parsing asks for the folder; nothing here loads it
    raw = config.deep_merge(family_raw("wan", root / "wan"), real_data(root))
    raw["evaluation"].update(backend="vbench", prompts=None, videos_per_prompt=5)
    raw["evaluation"]["vbench"] = {"venv": str(venv), "mode": "standard", "subset": 16}
    return config.parse(config.deep_merge(raw, {"evaluation": evaluation}))


def test_standard_mode_makes_the_suite_the_evaluation_rows_and_every_report_says_subset(venv, tmp_path):
    from dcm.data.prompts import build_prompt_sets
    from dcm.evaluation import reporting
    from dcm.evaluation.vbench import stage_videos
    from helpers import TRAIN_PROMPTS

    params = standard_params(venv, tmp_path)
    sets = build_prompt_sets(params, vbench_suite.standard_rows(params))
    rows, record = vbench_suite.suite_rows(venv, subset=16)
    assert sets["eval"] == rows and sets["suite"] == record and len(rows) == 16 * 5
    assert {r["prompt"] for r in sets["train"]} == set(TRAIN_PROMPTS)  # training keeps the user's prompts
    train_seeds = {r["seed"] for r in sets["train"]}
    assert not train_seeds & {r["seed"] for r in rows}

    # the sample stage writes one mp4 per row; staged as VBench's standard suite reads them
    samples = tmp_path / "samples"
    samples.mkdir()
    for i in range(len(rows)):
        (samples / f"{i:03d}_{rows[i]['prompt_id']}_{rows[i]['seed']}.mp4").write_bytes(b"")
    videos, prompt_file, _ = stage_videos(rows, samples, tmp_path / "work", "standard")
    assert prompt_file is None
    assert sorted(p.name for p in videos.iterdir()) == sorted(f"{r['prompt']}-{r['k']}.mp4" for r in rows)

    note = reporting.protocol_note({"dcm": {"backend": "vbench", "vbench_suite": record}})
    assert "SUBSET: 16 of its 40 prompts" in note and "not comparable" in note
    whole = vbench_suite.suite_rows(venv)[1]
    assert "all 40 prompts" in reporting.protocol_note({"dcm": {"vbench_suite": whole}})
    assert reporting.protocol_note({"dcm": {"backend": "shapes-bench"}}) is None


def test_standard_mode_refuses_a_prompt_file_another_count_and_the_shapes_world(venv, tmp_path):
    from dcm import config

    with pytest.raises(ConfigError, match=r"evaluation\.prompts = .*eval\.txt.*VBench's own suite"):
        vbench_suite.standard_rows(standard_params(venv, tmp_path, prompts=str(tmp_path / "inputs/eval.txt")))
    with pytest.raises(ConfigError, match=r"evaluation\.videos_per_prompt = 2.*\{prompt\}-4"):
        vbench_suite.standard_rows(standard_params(venv, tmp_path, videos_per_prompt=2))
    smoke = config.load_raw(Path(__file__).parents[1] / "params.yaml", "smoke")
    toy = config.parse(config.deep_merge(smoke, {
        "evaluation": {"backend": "vbench", "vbench": {"venv": str(venv), "mode": "standard"}}}))
    with pytest.raises(ConfigError, match=r"evaluation\.vbench\.mode = 'standard'.*shapes world"):
        vbench_suite.standard_rows(toy)
