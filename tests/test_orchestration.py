"""The DAG views: dvc.yaml and the Snakefile are the stage table, and `dcm launch` runs a stage."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dcm import config
from dcm.config import ConfigError
from dcm.pipeline import dag, launch
from dcm.pipeline.table import STAGES, switched
from helpers import smoke_params

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def expand_dvc(doc: dict) -> dict[str, dict[str, set[str]]]:
    """dvc.yaml's stages with foreach expanded: {'sample@lcm': {'deps': {...}, 'outs': {...}}}."""
    runs = {}
    for name, entry in doc["stages"].items():
        if "foreach" not in entry:
            items = {None: (None, None)}
        elif isinstance(entry["foreach"], dict):
            items = {k: (k, v) for k, v in entry["foreach"].items()}
        else:
            items = {m: (m, m) for m in entry["foreach"]}
        for method, (key, item) in items.items():
            body = yaml.safe_dump(entry.get("do", entry))
            if method is not None:
                if isinstance(item, dict):
                    for k, v in item.items():
                        body = body.replace("${item." + k + "}", v)
                body = body.replace("${key}", key).replace("${item}", method)
            stage = yaml.safe_load(body)
            outs = {o if isinstance(o, str) else next(iter(o)) for o in stage.get("outs", [])}
            outs |= {next(iter(m)) for m in stage.get("metrics", [])}
            runs[f"{name}@{method}" if method else name] = {"deps": set(stage.get("deps", [])), "outs": outs,
                                                            "cmd": stage["cmd"]}
    return runs


def snakemake_dry_run(workdir: Path) -> dict[str, dict[str, set[str]]]:
    """Every rule run of the Snakefile's `all`: the DAG of the folder's params.yaml, as `dvc repro` runs."""
    out = subprocess.run([str(BIN / "snakemake"), "-n", "-p", "--cores", "1", "all"],
                         cwd=workdir,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"})
    assert out.returncode == 0, out.stdout
    runs = {}
    for block in re.split(r"\n(?=\[|rule |localrule )", out.stdout):
        m = re.match(r"(?:local)?rule (\w+):", block)
        if not m or m.group(1) == "all":
            continue
        fields = dict(re.findall(r"^\s+(input|output|wildcards): (.*)$", block, re.M))
        method = fields.get("wildcards", "").partition("method=")[2] or None
        split = lambda s: {p.strip() for p in s.split(",") if p.strip()}  # noqa: E731
        # a multi-task rule starts its ranks with srun inside its SLURM job (workflow/rules/stages.smk)
        cmd = re.search(r"^(?:Shell command: )?\s*(?:\$\{SLURM_JOB_ID:\+srun[^}]*\} )?(dcm run .*)$",
                        block, re.M).group(1).strip()
        runs[f"{m.group(1)}@{method}" if method else m.group(1)] = {
            "deps": split(fields.get("input", "")), "outs": split(fields.get("output", "")), "cmd": cmd}
    return runs


def project_copy(work: Path, *groups: str) -> Path:
    """The DAG's files in ``work``; with ``groups``, switched on by `dcm params --enable` (which rewrites the
    copy's dvc.yaml, as `make ablations` / `make paper` do)."""
    from dcm import cli

    for name in ("Snakefile", "dvc.yaml", "workflow", "slurm/resources.yaml", "params.yaml"):
        src = REPO / name
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src, work / name) if src.is_dir() else shutil.copy(src, work / name)
    if groups:
        enable = [arg for group in groups for arg in ("--enable", group)]
        assert cli.main(["params", "--params", str(work / "params.yaml"), *enable,
                         "-o", str(work / "params.yaml")]) == 0
    return work


@pytest.fixture(scope="module")
def default_views(tmp_path_factory):
    """The committed params.yaml (opt-in groups off): its folder, dvc.yaml's runs and the Snakefile's."""
    work = project_copy(tmp_path_factory.mktemp("dag"))
    return work, expand_dvc(yaml.safe_load((work / "dvc.yaml").read_text())), snakemake_dry_run(work)


@pytest.fixture(scope="module")
def opt_in_views(tmp_path_factory):
    """Both opt-in groups switched on (`make ablations` then `make paper`): folder, dvc.yaml's runs and the
    Snakefile's."""
    work = project_copy(tmp_path_factory.mktemp("dag-opt-in"), "ablations", "paper")
    return work, expand_dvc(yaml.safe_load((work / "dvc.yaml").read_text())), snakemake_dry_run(work)


def test_dvc_yaml_is_generated_from_the_stage_table():
    assert dag.main(["--check", "--params", str(REPO / "params.yaml"), "--output",
                     str(REPO / "dvc.yaml")]) == 0


@pytest.mark.parametrize("views", ["default_views", "opt_in_views"])
def test_every_stage_of_the_dag_is_in_dvc_yaml_and_the_snakefile(views, request):
    work, dvc_runs, snake_runs = request.getfixturevalue(views)
    params = config.load(work / "params.yaml")
    dvc_stages = {name.partition("@")[0] for name in dvc_runs}
    snake_stages = {name.partition("@")[0] for name in snake_runs}
    assert dvc_stages == snake_stages == {s.name for s in STAGES.values() if s.in_dag(params)}
    if views == "opt_in_views":
        assert dvc_stages == set(STAGES)


@pytest.mark.parametrize("views", ["default_views", "opt_in_views"])
def test_dvc_yaml_and_snakefile_have_the_same_runs_deps_and_outs(views, request):
    work, dvc_runs, snake_runs = request.getfixturevalue(views)
    params = config.load(work / "params.yaml")
    assert set(dvc_runs) == set(snake_runs) == {f"{s.name}@{m}" if m else s.name for s, m in dag.runs(params)}
    for name, snake in snake_runs.items():
        dvc_run = dvc_runs[name]
        assert dvc_run["outs"] == snake["outs"], name
        # DVC gathers (report) and DCM weights (seme/ + dete/) by their folder: each Snakemake input
        # lies in exactly one DVC dep, and every DVC dep holds at least one Snakemake input
        covering = {d: {i for i in snake["deps"] if i == d or i.startswith(d + "/")} for d in dvc_run["deps"]}
        assert all(covering.values()), (name, covering)
        assert set().union(*covering.values()) == snake["deps"], name
        assert dvc_run["cmd"].replace("dcm launch", "dcm run") == snake["cmd"], name


def test_every_output_folder_of_the_dag_is_in_gitignore():
    """DVC appends an output it finds untracked to .gitignore: a folder missing there shows a `make paper`
    checkout as changed (the README stamp's "uncommitted changes to .gitignore")."""
    params = switched(config.load(REPO / "params.yaml"), paper=True, ablations=True)
    ignored = {line.strip().strip("/") for line in (REPO / ".gitignore").read_text().splitlines()}
    tops = {out.split("/")[0] for run in expand_dvc(dag.dvc_yaml(params)).values() for out in run["outs"]}
    assert {"teachers", "mcm_setting", "paper", "metrics"} <= tops
    assert tops <= ignored, sorted(tops - ignored)


def test_a_bare_dvc_repro_builds_the_default_experiment_and_the_switches_add_the_opt_in_groups(
        default_views, opt_in_views):
    """The committed params.yaml has both groups off: dvc.yaml (what a bare `dvc repro` runs) holds no opt-in
    stage and no opt-in row; `dcm params --enable ablations --enable paper` puts every stage and row of the
    table in it (and in the Snakefile's `all`)."""
    from dcm.pipeline.table import ablation_rows, curve_rows, paper_rows

    _, default_runs, _ = default_views
    work, opt_in_runs, snake_runs = opt_in_views
    params = config.load(REPO / "params.yaml")
    assert (params.pipeline.ablations, params.pipeline.paper) == (False, False)
    opt_in_stages = {s.name for s in STAGES.values() if s.opt_in}
    assert opt_in_stages == {"report_ablations", "mcm_setting", "teachers", "report_paper"}
    opt_in_rows = set(ablation_rows(params)) | set(curve_rows(params)) | set(paper_rows(params))
    assert {"vcm", "dcm_d3", "euler1", "pcm2", "lcm_s1", "dcm_s2"} <= opt_in_rows
    default_methods = {name.partition("@")[2] for name in default_runs} - {""}
    assert not {name.partition("@")[0] for name in default_runs} & opt_in_stages
    assert default_methods == set(params.default_methods) and not default_methods & opt_in_rows
    on = config.load(work / "params.yaml")
    assert (on.pipeline.ablations, on.pipeline.paper) == (True, True)
    assert opt_in_stages <= {name.partition("@")[0] for name in opt_in_runs}
    assert {f"evaluate@{m}" for m in opt_in_rows} <= set(opt_in_runs)
    assert set(opt_in_runs) == set(snake_runs) == {f"{s.name}@{m}" if m else s.name
                                                   for s, m in dag.runs(params, every_row=True)}


def test_the_paper_switch_adds_the_paper_reports_rows_and_not_the_other_ablation_rows():
    """pipeline.paper alone: mcm_setting, teachers, report_paper, the NFE curves, paper.rows (VCM and the OD
    rows among them) and their training seeds; not report_ablations nor the ablation rows outside
    paper.rows."""
    params = config.load(REPO / "params.yaml")
    runs = expand_dvc(dag.dvc_yaml(switched(params, paper=True)))
    stages = {name.partition("@")[0] for name in runs}
    assert {"mcm_setting", "teachers", "report_paper"} <= stages and "report_ablations" not in stages
    for row in ("euler1", "lcm8", "vcm", "od_pe_tc", "vcm_s1", "dcm_s2"):
        assert f"evaluate@{row}" in runs, row
    assert not {"evaluate@dcm_d3", "evaluate@mcm_raw", "train_baseline@dmd2_steps"} & set(runs)
    ablations = expand_dvc(dag.dvc_yaml(switched(params, ablations=True)))
    assert "report_ablations" in ablations and "evaluate@dcm_d3" in ablations
    paper_only = {"report_paper", "mcm_setting", "teachers", "evaluate@euler1", "evaluate@vcm_s1"}
    assert not paper_only & set(ablations)


def test_enable_changes_only_the_switch_in_the_params_file_and_rewrites_dvc_yaml(tmp_path):
    """`dcm params --enable paper -o params.yaml` (`make paper`): the file keeps every other line and comment;
    dvc.yaml beside it is regenerated for the new params; --disable returns both to what they were."""
    from dcm import cli

    work = project_copy(tmp_path)
    before = (work / "params.yaml").read_text()
    args = ["params", "--params", str(work / "params.yaml"), "-o", str(work / "params.yaml")]
    assert cli.main([*args, "--enable", "paper"]) == 0
    after = (work / "params.yaml").read_text()
    changed = [(a, b) for a, b in zip(before.splitlines(), after.splitlines(), strict=True) if a != b]
    assert [(a.split("#")[0].strip(), b.split("#")[0].strip()) for a, b in changed] \
        == [("paper: false", "paper: true")]
    assert changed[0][0].split("#")[1] == changed[0][1].split("#")[1]  # its comment kept
    assert (work / "dvc.yaml").read_text() == dag.dvc_yaml_text(config.load(work / "params.yaml"))
    assert "report_paper" in yaml.safe_load((work / "dvc.yaml").read_text())["stages"]
    assert cli.main([*args, "--disable", "paper"]) == 0
    assert (work / "params.yaml").read_text() == before
    assert (work / "dvc.yaml").read_text() == (REPO / "dvc.yaml").read_text()


def test_a_preset_written_by_dcm_params_comes_with_its_dvc_yaml(tmp_path):
    """`dcm params --preset smoke -o params.yaml` writes the preset where DVC sees it and the dvc.yaml of
    those params beside it; another file name leaves dvc.yaml alone."""
    from dcm import cli

    assert cli.main(["params", "--params", str(REPO / "params.yaml"), "--preset", "smoke",
                     "-o", str(tmp_path / "params.yaml")]) == 0
    written = config.load(tmp_path / "params.yaml")
    assert written.experiment == "smoke" and written == config.load(REPO / "params.yaml", preset="smoke")
    assert (tmp_path / "dvc.yaml").read_text() == dag.dvc_yaml_text(written)
    other = tmp_path / "elsewhere"
    other.mkdir()
    assert cli.main(["params", "--params", str(REPO / "params.yaml"), "--preset", "smoke",
                     "-o", str(other / "smoke.yaml")]) == 0
    assert not (other / "dvc.yaml").exists()


def test_a_preset_chosen_in_the_environment_is_refused_naming_the_variable_and_the_command(monkeypatch,
                                                                                           capsys):
    """DCM_PRESET is invisible to DVC: every command that reads params fails, naming it, its value and how to
    write the preset into params.yaml instead."""
    from dcm import cli

    monkeypatch.setenv("DCM_PRESET", "hunyuan")
    with pytest.raises(ConfigError,
                       match=r"DCM_PRESET = 'hunyuan'.*dcm params --preset <name> -o params\.yaml"):
        config.load(REPO / "params.yaml")
    with pytest.raises(ConfigError, match="DCM_PRESET"):
        config.load(REPO / "params.yaml", preset="smoke")
    assert cli.main(["stages", "--params", str(REPO / "params.yaml")]) == 2
    assert "DCM_PRESET" in capsys.readouterr().err


def test_dcm_stages_lists_the_dags_runs_and_what_each_switch_would_add(capsys):
    from dcm import cli

    assert cli.main(["stages", "--params", str(REPO / "params.yaml")]) == 0
    lines = capsys.readouterr().out.splitlines()
    listed = {line.split()[0]: line.split(None, 1)[1] for line in lines if not line.startswith("off:")}
    params = config.load(REPO / "params.yaml")
    assert list(listed) == [s.name for s in STAGES.values() if s.in_dag(params)]
    assert listed["evaluate"] == ", ".join(params.default_methods)
    off = [line for line in lines if line.startswith("off:")]
    assert len(off) == 2 and "report_ablations" in off[0] and "dcm_d3" in off[0]
    assert "mcm_setting, teachers, report_paper" in off[1] and "euler1" in off[1] and "lcm_s1" in off[1]
    assert "dcm params --enable paper -o params.yaml" in off[1]


def test_launch_local_runs_the_stage_in_process(project):
    params = config.load("params.yaml", preset="smoke")
    assert params.launcher == "local"
    assert launch.launch(params, "prepare", None, "params.yaml", "smoke") == 0
    assert Path("data/prompts.json").is_file()


def test_launch_rejects_an_unknown_stage_before_running_anything(project):
    params = config.load("params.yaml", preset="smoke")
    with pytest.raises(ConfigError, match="stage"):
        launch.launch(params, "distil_everything", None)


def test_resources_overlay_default_and_name_the_bad_key(tmp_path):
    good = dag.load_resources("prepare", REPO / "slurm/resources.yaml")
    assert good.gpus == 0 and good.partition == "gpu"
    assert dag.load_resources("train_seme", REPO / "slurm/resources.yaml").gres == "gpu:a100:8"
    bad = tmp_path / "resources.yaml"
    bad.write_text(yaml.safe_dump({
        "default": yaml.safe_load((REPO / "slurm/resources.yaml").read_text())["default"],
        "teacher": {"gpu": 2}}))
    with pytest.raises(ConfigError, match=r"teacher\.gpu"):
        dag.load_resources("teacher", bad)


def _dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    out = subprocess.run([str(BIN / "dvc"), *args], cwd=repo, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


@pytest.mark.slow
def test_dvc_repro_runs_the_smoke_dag_and_reruns_only_what_a_change_touches(dvc_smoke_repo):
    tmp_path, first_stdout, _ = dvc_smoke_repo
    params = config.load(tmp_path / "params.yaml")
    for s, m in dag.runs(params):  # the smoke params' DAG: the default experiment (groups off)
        for path in s.resolve(params, m)["outs"] + s.resolve(params, m)["metrics"]:
            assert (tmp_path / path).exists(), (path, first_stdout[-2000:])
    again = _dvc(tmp_path, "repro", "report")
    assert "Running stage" not in again.stdout
    # what a change touches, read from `dvc status` (the stages whose own dependencies changed; the re-run
    # itself is shown once, by the κ experiment below): an LCM setting touches LCM's runs only, a DetE setting
    # DetE and what samples from it, never SemE
    original = (tmp_path / "params.yaml").read_text()
    raw = yaml.safe_load(original)
    lcm_runs = {"train_baseline@lcm", "sample@lcm", "evaluate@lcm", "report"}
    dete_runs = {"train_dete@dcm", "sample@dcm", "sample@dcm8", "evaluate@dcm", "evaluate@dcm8", "report"}
    for key, value, allowed, never in ((("lcm", "lr"), 2.0e-4, lcm_runs,
                                        {"train_baseline@pcm", "train_seme@dcm"}),
                                       (("dcm", "dete", "lr"), 1.0e-4, dete_runs,
                                        {"train_seme@dcm", "train_baseline@lcm"})):
        changed = copy.deepcopy(raw)
        section = changed["methods"]
        for part in key[:-1]:
            section = section[part]
        section[key[-1]] = value
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(changed, sort_keys=False))
        stale = set(json.loads(_dvc(tmp_path, "status", "--json").stdout))
        assert f"train_{'dete' if key[0] == 'dcm' else 'baseline'}@{key[0]}" in stale, (key, stale)
        assert stale <= allowed and not stale & never, (key, stale)
        (tmp_path / "params.yaml").write_text(original)
    assert json.loads(_dvc(tmp_path, "status", "--json").stdout) == {}

    # an experiment with another κ: only the expert split and what follows it re-run
    subprocess.run(["git", "-c", "user.name=dcm-test", "-c", "user.email=test@localhost", "add", "-A"],
                   cwd=tmp_path, check=True)
    subprocess.run(["git", "-c", "user.name=dcm-test", "-c", "user.email=test@localhost",
                    "commit", "-qm", "smoke"],
                   cwd=tmp_path, check=True)
    kappa = raw["grid"]["kappa"] - 1
    exp = _dvc(tmp_path, "exp", "run", "report", "-S", f"grid.kappa={kappa}")
    ran = set(re.findall(r"Running stage '([^']+)'", exp.stdout))
    assert {"train_seme@dcm", "train_dete@dcm", "sample@dcm", "evaluate@dcm", "report"} <= ran, ran
    assert not ran & {"prepare", "teacher", "trajectories", "train_baseline@lcm", "train_baseline@pcm"}, ran
    shown = json.loads(_dvc(tmp_path, "exp", "show", "--json").stdout)
    assert f'"kappa": {kappa}' in json.dumps(shown), "dvc exp show lists the experiment's κ"


def test_resumable_stages_keep_their_outputs_when_dvc_reruns_them():
    """DVC deletes a stage's outs before running it unless persisted: the stages that resume from their
    own partial outputs (trajectory shards, training checkpoints) must persist them, the others not."""
    doc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    for name, entry in doc["stages"].items():
        outs = entry.get("do", entry).get("outs", [])
        persisted = [o for o in outs if isinstance(o, dict) and next(iter(o.values())).get("persist")]
        assert bool(persisted) == STAGES[name].resumable, name
    assert {s.name for s in STAGES.values() if s.resumable} \
        >= {"trajectories", "train_baseline", "train_seme", "train_dete"}


def test_stage_inputs_are_checked_from_the_table_naming_the_runs_that_write_them(project):
    """Missing inputs fail before any work and name the `dcm run` that writes them; the trajectory store is
    required only where a cached source reads it (MCM and training.source: online train on the videos)."""
    from dcm.pipeline.table import STAGES

    params = config.load("params.yaml", preset="smoke")
    with pytest.raises(config.ConfigError) as err:
        STAGES["train_dete"].check_inputs(params, "dcm")
    assert "`dcm run teacher`" in str(err.value) and "`dcm run trajectories`" in str(err.value)
    assert "`dcm run train_seme --method dcm`" in str(err.value)
    with pytest.raises(config.ConfigError) as err:
        STAGES["train_baseline"].check_inputs(params, "mcm")
    assert "trajectories" not in str(err.value) and "`dcm run teacher`" in str(err.value)
    with pytest.raises(config.ConfigError, match=r"samples/teacher.*`dcm run sample --method teacher`"):
        STAGES["evaluate"].check_inputs(params, "lcm")


def test_nfe_curve_rows_are_opt_in_and_apart_from_the_ablation_rows():
    """The quality-against-steps rows run only for `make paper`: not in the default DAG (`make demo`), not
    in the ablation report (`make ablations`); the paper report depends on the default rows, the curves,
    paper.rows and their training seeds, not on the other ablation rows (those are `make ablations`')."""
    from dcm.pipeline.table import ablation_rows, curve_rows

    params = config.load(REPO / "params.yaml")
    curves = curve_rows(params)
    assert {"euler1", "euler2", "euler8", "euler16", "lcm1", "lcm2", "lcm8", "pcm2", "dcm2"} <= set(curves)
    default = {m for s, m in dag.runs(params)} | {s.name for s, _ in dag.runs(params)}
    assert not default & set(curves) and "report_paper" not in default
    assert not set(curves) & set(ablation_rows(params))
    assert not any(f"metrics/{m}.json" in STAGES["report_ablations"].resolve(params)["deps"] for m in curves)
    paper_deps = set(STAGES["report_paper"].resolve(params)["deps"])
    seeds = {f"{m}_s{k}" for m in params.paper.rows for k in range(1, params.paper.seeds)}
    wanted = set(STAGES["evaluate"].methods(params)) | set(curves) | set(params.paper.rows) | seeds
    # MCM in its own setting, the other teachers' folders (paper.teachers)
    assert paper_deps == {f"metrics/{m}.json" for m in wanted} | {"mcm_setting", "teachers"}
    assert "metrics/dcm_d3.json" not in paper_deps and "metrics/dmd2_steps.json" not in paper_deps
    # sampling-only rows reuse trained weights; pcm2 is trained as its own row
    train = {m for s, m in dag.runs(params, every_row=True) if s.name.startswith("train_")}
    assert "pcm2" in train and not train & {"lcm1", "lcm2", "lcm8", "dcm2"}


def test_dcm_at_two_steps_is_one_seme_and_one_dete_step():
    from dcm.methods import schedule_for

    for preset in (None, "smoke"):
        params = config.load(REPO / "params.yaml", preset=preset)
        steps = schedule_for(params, "dcm2")
        grid = params.teacher_grid()
        assert [s.expert for s in steps] == ["seme", "dete"], preset
        assert [s.sigma for s in steps] == [grid.sigma(params.grid.steps - 1), grid.sigma(params.grid.kappa)]


def test_a_row_in_both_opt_in_groups_is_refused_naming_the_key():
    raw = config.load_raw(REPO / "params.yaml")
    raw["methods"]["euler1"]["ablation"] = True
    with pytest.raises(ConfigError, match=r"methods\.euler1\.nfe_curve"):
        config.parse(raw)


def test_a_training_seed_row_is_its_row_trained_with_seed_plus_k(smoke):
    """lcm_s1 (paper.seeds) runs lcm's stage with seed + 1: other data order and noise, so other losses
    and weights, from the same teacher, trajectories and settings; its DVC params are lcm's own keys."""
    from safetensors.torch import load_file

    from dcm.pipeline.stages import trajectories

    params = smoke_params()
    assert params.params_row("lcm_s1") == "lcm"
    assert "methods.lcm" in STAGES["train_baseline"].resolve(params, "lcm_s1")["params"]
    assert STAGES["train_seme"].resolve(params, "dcm_s2")["params"][-1] == "methods.dcm.seme"
    trajectories.run(params)
    for method in ("lcm", "lcm_s1"):
        STAGES["train_baseline"].run(params, method)
    runs = {m: json.loads(Path(f"checkpoints/{m}/train.json").read_text()) for m in ("lcm", "lcm_s1")}
    assert (runs["lcm"]["seed"], runs["lcm_s1"]["seed"]) == (params.seed, params.seed + 1)
    assert runs["lcm"]["steps"] == runs["lcm_s1"]["steps"] == params.methods["lcm"].train_steps
    assert runs["lcm"]["final_loss"] != runs["lcm_s1"]["final_loss"]
    weights = [load_file(next(Path(f"checkpoints/{m}/transformer").glob("*.safetensors")))
               for m in ("lcm", "lcm_s1")]
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
