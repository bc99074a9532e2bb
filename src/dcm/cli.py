"""``dcm``: run a stage, launch it (locally or on SLURM), inspect params and the stage table.

Every command is one entry of ``COMMANDS`` (``@command``): its help line, the function that declares its
arguments and the function that runs it with the parsed arguments.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dcm import config, tracking


@dataclass(frozen=True)
class Command:
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    own_parser: bool = False  # it parses its arguments itself (``args.rest``; ``main`` passes them on)


COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, arguments: Callable[[argparse.ArgumentParser], None] = lambda p: None,
            own_parser: bool = False):
    def register(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = Command(help, arguments, run, own_parser)
        return run

    return register


def _params_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="experiment file (default: params.yaml)")
    p.add_argument("--preset", default=None, help="overlay a preset on the params file for this command "
                   "(e.g. smoke); DVC sees only the file: `dcm params --preset NAME -o params.yaml` writes "
                   "it there")


def _params(args: argparse.Namespace) -> config.Params:
    return config.load(args.params, args.preset)


def _stage_names() -> list[str]:
    from dcm.pipeline.table import STAGES

    return list(STAGES)


def _write_or_print(text: str, path: str | None) -> None:
    if path:
        Path(path).write_text(text)
    else:
        sys.stdout.write(text)


# ------------------------------------------------------------------------------------ stages


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("stage", choices=_stage_names())
    p.add_argument("--method", default=None, help="method for per-method stages")
    _params_args(p)


@command("run", "run one stage in this process", _run_args)
def _run(args: argparse.Namespace) -> int:
    from dcm.pipeline import table

    params = _params(args)
    with tracking.stop_signals_handled():  # SIGINT/SIGTERM: exit 130/143, the MLflow run KILLED
        table.get(args.stage).run(params, args.method)
    return 0


def _launch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("stage", choices=_stage_names())
    p.add_argument("--method", default=None)
    p.add_argument("--methods", default=None, help="several methods of a per-method stage at once: a comma "
                   "list or 'all'; with launcher: slurm one job array")
    p.add_argument("--no-plan-check", action="store_true",
                   help="launcher: slurm: submit a real family's stage even where its plan (`dcm plan "
                   "--dag`) says it does not fit its row (or DCM_NO_PLAN_CHECK=1)")
    _params_args(p)


@command("launch", "run a stage through the configured launcher (local|slurm|debug)", _launch_args)
def _launch(args: argparse.Namespace) -> int:
    from dcm.pipeline import launch

    params = _params(args)
    if args.methods:
        if args.method:
            raise config.ConfigError("--method", args.method, "either --method or --methods, not both")
        methods = launch.resolve_methods(params, args.stage, args.methods)
        return launch.launch_array(params, args.stage, methods, params_path=args.params, preset=args.preset,
                                   plan_check=not args.no_plan_check)
    with tracking.stop_signals_handled():
        return launch.launch(params, args.stage, args.method, params_path=args.params, preset=args.preset,
                             plan_check=not args.no_plan_check)


def _repro_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("targets", nargs="*", help="DVC stages or runs (report, train_baseline@lcm; a per-method "
                   "stage's name: all its runs) and what they need; none: the whole DAG")
    p.add_argument("-j", "--jobs", type=int, default=2, help="runs at a time (default 2)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of a run that may share the machine (default: this machine's cores // "
                   "jobs); a run nothing can run beside keeps the environment's, as under dvc repro")
    p.add_argument("--heartbeat", type=float, default=300.0,
                   help="seconds between the running runs' progress lines (default 300)")


@command("repro", "dvc repro of params.yaml's DAG with several stage runs at a time: each run is `dvc repro "
         "--single-item` once what it needs is done, its output in logs/repro/", _repro_args)
def _repro(args: argparse.Namespace) -> int:
    from dcm.pipeline import repro

    params = config.load("params.yaml")  # what the stage commands of dvc.yaml read
    repro.check_project(params)
    runs = repro.plan(params, args.targets)
    threads = args.threads or repro.default_threads(args.jobs)
    return repro.execute(runs, args.jobs, threads, heartbeat=args.heartbeat)


@command("check", "pre-flight: everything the DAG of these params needs (weights folder, data files, VBench, "
         "free disk), every problem at once; `prepare` runs it first", _params_args)
def _check(args: argparse.Namespace) -> int:
    from dcm.pipeline import check

    return check.main(_params(args))


@command("stages", "list the stages of the DAG with their runs for these params (what dvc.yaml and the "
         "Snakefile hold), then the opt-in groups switched off", _params_args)
def _stages(args: argparse.Namespace) -> int:
    from dcm.pipeline import table

    params = _params(args)
    for s in table.STAGES.values():
        if s.in_dag(params):
            runs = s.dag_methods(params) if s.per_method else ["-"]
            print(f"{s.name:<15} {', '.join(runs)}")
    for group in config.PIPELINE_GROUPS:
        if not getattr(params.pipeline, group):
            rows = table.dag_rows(params)
            extra = [m for m in table.dag_rows(table.switched(params, **{group: True})) if m not in rows]
            stages = [s.name for s in table.STAGES.values() if s.opt_in == group]
            print(f"off: pipeline.{group} ({', '.join(stages)}; rows {', '.join(extra) or 'none'}): "
                  f"`dcm params --enable {group} -o params.yaml` adds them")
    return 0


def _pipeline_run_args(p: argparse.ArgumentParser) -> None:
    _params_args(p)
    p.add_argument("--name", default=None, help="run name (default: pipeline-<experiment>)")
    p.add_argument("--finish", default=None, metavar="RUN_ID", help="close that parent run instead")
    p.add_argument("--exit-status", type=int, default=0, help="with --finish: the pipeline's exit status")


@command("pipeline-run", "open the MLflow parent run of one pipeline execution and print its id: export "
         "DCM_PARENT_RUN_ID=$(dcm pipeline-run) before dvc repro", _pipeline_run_args)
def _pipeline_run(args: argparse.Namespace) -> int:
    params = _params(args)
    if args.finish:
        tracking.finish_pipeline_run(params, args.finish, args.exit_status)
    else:
        print(tracking.start_pipeline_run(params, args.name) or "")
    return 0


# ------------------------------------------------------------------------------------ params


def _params_out_args(p: argparse.ArgumentParser) -> None:
    _params_args(p)
    p.add_argument("--enable", action="append", default=[], choices=config.PIPELINE_GROUPS,
                   help="switch an opt-in group on (pipeline.<group>: true): its rows and stages join "
                   "the DAG")
    p.add_argument("--disable", action="append", default=[], choices=config.PIPELINE_GROUPS,
                   help="switch an opt-in group off again")
    p.add_argument("-o", "--output", default=None, help="write to this file instead of stdout; a file named "
                   "params.yaml also gets the dvc.yaml beside it rewritten, the DAG of the written params "
                   "(as `python -m dcm.pipeline.dag` does), so DVC runs what the file says")


@command("params", "print or write the validated params (a preset overlaid, opt-in groups switched) as YAML; "
         "`dcm params --preset wan -o params.yaml` chooses a preset DVC can see", _params_out_args)
def _show_params(args: argparse.Namespace) -> int:
    import yaml

    switches = {**dict.fromkeys(args.enable, True), **dict.fromkeys(args.disable, False)}
    if set(args.enable) & set(args.disable):
        raise config.ConfigError("--disable", args.disable,
                                 f"groups not also given to --enable ({args.enable})")
    raw = config.load_raw(args.params, args.preset)
    if args.preset in (None, "shapes"):  # the file as written, comments included, only the switches changed
        text = Path(args.params).read_text()
        text = config.with_pipeline_switches(text, switches) if switches else text
    else:  # a preset overlaid: written out whole (the file's comments describe values the preset replaced)
        if switches:
            raw["pipeline"] = {**(raw.get("pipeline") or {}), **switches}
        text = yaml.safe_dump(raw, sort_keys=False)
    params = config.parse(yaml.safe_load(text))  # validate before writing anything
    _write_or_print(text, args.output)
    if args.output and Path(args.output).name == "params.yaml":
        from dcm.pipeline import dag

        dvc_yaml = Path(args.output).parent / "dvc.yaml"
        dvc_yaml.write_text(dag.dvc_yaml_text(params))
        print(f"wrote {args.output} and {dvc_yaml} ({len(dag.runs(params))} stage runs)", file=sys.stderr)
    return 0


@command("schema", "print or check the params JSON schema",
         lambda p: p.add_argument("--write", default=None, help="write the schema to this path"))
def _schema(args: argparse.Namespace) -> int:
    _write_or_print(config.json_schema_text(), args.write)
    return 0


# ------------------------------------------------------------------------- results and tools


def _results_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--project", default=".", help="the run's project folder (default: here)")
    p.add_argument("--write", default=None, metavar="README",
                   help="replace the block between the README's results markers instead of printing")


@command("results", "the results block of the last run (metrics, the paper's claims; stamped with commit, "
         "date and machine), printed or written into a README", _results_args)
def _results(args: argparse.Namespace) -> int:
    from dcm.evaluation import results_block

    return results_block.main(args.project, args.write)


def _export_args(p: argparse.ArgumentParser) -> None:
    _params_args(p)
    p.add_argument("--method", default="dcm", help="a method of kind dcm (default: dcm)")
    p.add_argument("--out", default=None, help="output folder (default: export/<method>)")


@command("export", "write a trained dcm method as a folder stock diffusers + peft load (transformer, LoRA, "
         "copied timestep layers, scheduler, the student schedule)", _export_args)
def _export(args: argparse.Namespace) -> int:
    from dcm.methods.export import export

    print(f"exported {args.method} -> {export(_params(args), args.method, args.out)}")
    return 0


def _analyze_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="analyze_command", required=True)
    diff = sub.add_parser("params", help="relative weight change ||ΔW||/||W|| per module group between two "
                          "checkpoints (transformer folders, or checkpoints/<method>/seme|dete)")
    diff.add_argument("a", help="reference checkpoint (W)")
    diff.add_argument("b", help="changed checkpoint (W + ΔW)")
    diff.add_argument("--plot", default="param_change.png", help="bar plot path (default: param_change.png)")
    diff.add_argument("--json", default=None, help="also write the table as JSON here")


@command("analyze", "analyses outside the DAG (the DAG's own is `dcm run analyze`)", _analyze_args)
def _analyze(args: argparse.Namespace) -> int:
    from dcm.analysis import param_change

    param_change.main(args.a, args.b, args.plot, args.json)
    return 0


def _vbench_args(p: argparse.ArgumentParser) -> None:
    setup = p.add_subparsers(dest="vbench_command", required=True).add_parser(
        "setup", help="create VBench's own virtual environment from the pinned requirements "
        "(src/dcm/evaluation/vbench-requirements.txt)")
    setup.add_argument("--venv", default=".venv-vbench",
                       help="where (evaluation.vbench.venv; default .venv-vbench)")
    setup.add_argument("--requirements", default=None,
                       help="another requirements file (default: the pinned one)")
    setup.add_argument("--python", default=sys.executable, help="interpreter for the venv (3.10 or 3.11)")
    setup.add_argument("--force", action="store_true",
                       help="reinstall even if the venv was built from these requirements as they are now")


@command("vbench", "the real VBench backend (evaluation.backend: vbench)", _vbench_args)
def _vbench(args: argparse.Namespace) -> int:
    from dcm.evaluation import vbench

    vbench.create_env(args.venv, args.requirements or vbench.REQUIREMENTS, args.python, force=args.force)
    print(f"VBench environment ready: {args.venv} (set evaluation.vbench.venv to it)")
    return 0


def _dvc_setup_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shared-cache", required=True, metavar="DIR", help="the cache folder on the shared "
                   "filesystem (the workspaces' own filesystem, so adding an output is a rename)")
    p.add_argument("--link-types", default=None,
                   help="DVC cache.type, in order of preference (default: reflink,symlink,hardlink; never "
                   "copy)")
    p.add_argument("--remote", default=None, metavar="URL", help="also set this default remote (a directory, "
                   "s3://...)")
    p.add_argument("--local", action="store_true",
                   help="write .dvc/config.local (this clone only) instead of .dvc/config")
    p.add_argument("--repo", default=".", help="the DVC project (default: here)")


@command("dvc-setup", "configure this DVC project for a cluster's shared filesystem: one group-shared cache, "
         "outputs linked into it instead of copied", _dvc_setup_args)
def _dvc_setup(args: argparse.Namespace) -> int:
    from dcm.pipeline import dvc_cache

    for line in dvc_cache.setup_shared_cache(args.repo, args.shared_cache,
                                             args.link_types or dvc_cache.DEFAULT_LINK_TYPES, args.remote,
                                             args.local):
        print("dvc " + " ".join(line))
    print("outputs checked out before stay copies until `dvc checkout --relink`")
    return 0


@command("plan", "per-GPU memory plan of SemE, DetE and DMD2 at a preset's video size, on meta tensors "
         "(no GPU): `dcm plan --help`; the whole DAG's plan on its SLURM rows (GPU-hours, wall time, memory, "
         "disk per stage run): `dcm plan --dag --help`", own_parser=True)
def _plan(args: argparse.Namespace) -> int:
    if "--dag" in args.rest:
        from dcm.pipeline import launch
        from dcm.plan import whole

        return whole.main([a for a in args.rest if a != "--dag"], launch.stage_runs)
    from dcm.plan import memory

    return memory.main(args.rest)


# ------------------------------------------------------------------------------------ entry


def build_parser() -> argparse.ArgumentParser:
    from dcm.pipeline.table import STAGES

    stage_lines = "\n".join(f"  {s.name:<15} {s.summary}" for s in STAGES.values())
    parser = argparse.ArgumentParser(
        prog="dcm", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Distil a video diffusion teacher into a few-step Dual-Expert Consistency Model.",
        epilog=f"stages:\n{stage_lines}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, cmd in COMMANDS.items():
        cmd.arguments(sub.add_parser(name, help=cmd.help, add_help=not cmd.own_parser))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS and COMMANDS[argv[0]].own_parser:  # its options, --help included
        args = argparse.Namespace(command=argv[0], rest=argv[1:])
    else:
        args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command].run(args)
    except config.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dcm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
