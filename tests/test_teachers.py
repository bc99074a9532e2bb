"""The paper's claims under more teachers (stage teachers, paper.teachers > 1): another teacher trained with
seed + k and the claims' rows distilled from it in teachers/s<k>/, with the main seed everywhere else."""

from __future__ import annotations

import json

import pytest

from dcm import config, io
from dcm.pipeline.stages import teachers
from dcm.pipeline.table import STAGES


def smoke_with_teachers(count: int):
    return config.parse(config.deep_merge(config.load_raw("params.yaml", "smoke"),
                                          {"paper": {"teachers": count}}))


def test_the_folders_params_are_the_claims_rows_with_the_main_seed_and_the_teachers_own(project):
    params = smoke_with_teachers(3)
    rows = teachers.claim_rows(params)
    assert rows[0] == "teacher" and {"euler4", "dcm", "pcm", "lcm", "dmd2"} <= set(rows)
    # neither NFE-curve rows nor training-seed rows, and of the Euler rows only the controls' (4 steps)
    assert "dcm8" not in rows and "euler2" not in rows and not any("_s" in m for m in rows)
    sub, teacher = teachers.teacher_params(params, 2)
    assert list(sub.methods) == rows and sub.seed == params.seed and teacher.seed == params.seed + 2
    assert sub.paper.teachers == 1 and sub.paper.seeds == 1 and teacher.teacher == params.teacher
    assert sub.tracking.uri == f"sqlite:///{project / 'mlflow.db'}"  # this project's database
    runs = teachers.runs(sub)
    assert runs[:3] == [("prepare", None), ("teacher", None), ("trajectories", None)]
    assert ("train_seme", "dcm") in runs and ("train_dete", "dcm") in runs and ("sample", "euler4") in runs
    assert ("train_baseline", "euler4") not in runs and runs[-len(rows)] == ("evaluate", "teacher")
    real = smoke_with_teachers(2)
    real.backbone.family = "wan"
    with pytest.raises(config.ConfigError, match=r"paper.teachers.*real teacher is given"):
        teachers.teacher_params(real, 1)


def test_a_second_teacher_runs_the_claims_rows_in_its_folder_and_resumes(project, monkeypatch, capsys):
    monkeypatch.setenv("DCM_TRACKING", "off")
    params = smoke_with_teachers(2)
    STAGES["teachers"].run(params)
    root = project / "teachers" / "s1"
    progress = io.read_json(root / "progress.json")
    runs = teachers.runs(teachers.teacher_params(params, 1)[0])
    assert len(progress["done"]) == len(runs) and progress["teacher_seed"] == params.seed + 1
    assert io.read_json(project / "teachers" / "progress.json") == {"teachers": 2}
    for row in teachers.claim_rows(params):
        assert len(io.read_json(root / "metrics" / f"{row}.json")["per_row"]) == 4, row
    assert not (project / "metrics").exists() and not (project / "models").exists()  # nothing outside
    capsys.readouterr()
    STAGES["teachers"].run(params)  # everything done: skipped
    assert capsys.readouterr().out.count("done before, skipped") == len(runs)
    # the main project's prepare writes the same rows; its teacher (the main seed) is another network
    STAGES["prepare"].run(params)
    STAGES["teacher"].run(params)
    assert json.loads((project / "data" / "prompts.json").read_text()) \
        == json.loads((root / "data" / "prompts.json").read_text())
    weights = sorted((project / "models" / "teacher").rglob("*.safetensors"))
    assert weights and all(w.read_bytes() != (root / w.relative_to(project)).read_bytes() for w in weights)
    # fewer teachers: the folder beyond paper.teachers goes
    STAGES["teachers"].run(smoke_with_teachers(1))
    assert not root.exists() and io.read_json(project / "teachers" / "progress.json") == {"teachers": 1}
