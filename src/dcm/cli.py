"""``dcm``: run a stage, launch it (locally or on SLURM), inspect params and the stage table.

Each command is one entry of ``COMMANDS``: the function that runs it, given the parsed arguments.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from dcm import config, tracking


def _add_params_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="experiment file (default: params.yaml)")
    p.add_argument("--preset", default=None, help="overlay a preset on the params file (e.g. smoke); "
                   "also read from $DCM_PRESET")


def _params(args: argparse.Namespace) -> config.Params:
    return config.load(args.params, args.preset)


# ------------------------------------------------------------------------------------ commands


def _run(args: argparse.Namespace) -> int:
    from dcm.pipeline import table

    params = _params(args)
    with tracking.stop_signals_handled():  # SIGINT/SIGTERM: exit 130/143, the MLflow run KILLED
        table.get(args.stage).run(params, args.method)
    return 0


def _launch(args: argparse.Namespace) -> int:
    from dcm.pipeline import launch

    params = _params(args)
    if args.methods:
        if args.method:
            raise config.ConfigError("--method", args.method, "either --method or --methods, not both")
        methods = launch.resolve_methods(params, args.stage, args.methods)
        return launch.launch_array(params, args.stage, methods, params_path=args.params, preset=args.preset)
    with tracking.stop_signals_handled():
        return launch.launch(params, args.stage, args.method, params_path=args.params, preset=args.preset)


def _show_params(args: argparse.Namespace) -> int:
    import yaml

    raw = config.load_raw(args.params, args.preset)
    config.parse(raw)  # validate before writing anything
    _write_or_print(yaml.safe_dump(raw, sort_keys=False), args.output)
    return 0


def _schema(args: argparse.Namespace) -> int:
    _write_or_print(config.json_schema_text(), args.write)
    return 0


def _stages(args: argparse.Namespace) -> int:
    from dcm.pipeline import table

    params = _params(args)
    for s in table.STAGES.values():
        runs = s.methods(params, include_ablations=True) if s.per_method else ["-"]
        print(f"{s.name:<15} {', '.join(runs)}")
    return 0


def _vbench(args: argparse.Namespace) -> int:
    from dcm.evaluation import vbench

    vbench.create_env(args.venv, args.requirements or vbench.REQUIREMENTS, args.python, force=args.force)
    print(f"VBench environment ready: {args.venv} (set evaluation.vbench.venv to it)")
    return 0


def _analyze(args: argparse.Namespace) -> int:
    from dcm.analysis import param_change

    param_change.main(args.a, args.b, args.plot, args.json)
    return 0


def _export(args: argparse.Namespace) -> int:
    from dcm.methods.export import export

    print(f"exported {args.method} -> {export(_params(args), args.method, args.out)}")
    return 0


def _pipeline_run(args: argparse.Namespace) -> int:
    params = _params(args)
    if args.finish:
        tracking.finish_pipeline_run(params, args.finish, args.exit_status)
    else:
        print(tracking.start_pipeline_run(params, args.name) or "")
    return 0


def _dvc_setup(args: argparse.Namespace) -> int:
    from dcm.pipeline import dvc_cache

    for command in dvc_cache.setup_shared_cache(args.repo, args.shared_cache,
                                                args.link_types or dvc_cache.DEFAULT_LINK_TYPES,
                                                args.remote, args.local):
        print("dvc " + " ".join(command))
    print("outputs checked out before stay copies until `dvc checkout --relink`")
    return 0


def _warm_server(args: argparse.Namespace) -> int:
    from dcm.pipeline import warm

    warm.serve(Path(args.socket), main)
    return 0


def _write_or_print(text: str, path: str | None) -> None:
    if path:
        Path(path).write_text(text)
    else:
        sys.stdout.write(text)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": _run, "launch": _launch, "params": _show_params, "schema": _schema, "stages": _stages,
    "vbench": _vbench, "analyze": _analyze, "export": _export, "pipeline-run": _pipeline_run,
    "dvc-setup": _dvc_setup, "warm-server": _warm_server,
}


# -------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from dcm.pipeline.table import STAGES

    stage_lines = "\n".join(f"  {s.name:<15} {s.summary}" for s in STAGES.values())
    parser = argparse.ArgumentParser(
        prog="dcm", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Distil a video diffusion teacher into a few-step Dual-Expert Consistency Model.",
        epilog=f"stages:\n{stage_lines}",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run one stage in this process")
    run.add_argument("stage", choices=list(STAGES))
    run.add_argument("--method", default=None, help="method for per-method stages")
    _add_params_args(run)

    launch = sub.add_parser("launch", help="run a stage through the configured launcher (local|slurm|debug)")
    launch.add_argument("stage", choices=list(STAGES))
    launch.add_argument("--method", default=None)
    launch.add_argument("--methods", default=None, help="several methods of a per-method stage at once: a "
                        "comma list or 'all'; with launcher: slurm one job array")
    _add_params_args(launch)

    show = sub.add_parser("params", help="print the validated params (with a preset overlay) as YAML")
    _add_params_args(show)
    show.add_argument("-o", "--output", default=None, help="write to this file instead of stdout")

    schema = sub.add_parser("schema", help="print or check the params JSON schema")
    schema.add_argument("--write", default=None, help="write the schema to this path")

    stages = sub.add_parser("stages", help="list the stages with their runs for these params")
    _add_params_args(stages)

    vbench = sub.add_parser("vbench", help="the real VBench backend (evaluation.backend: vbench)")
    vbench_sub = vbench.add_subparsers(dest="vbench_command", required=True)
    setup = vbench_sub.add_parser("setup", help="create VBench's own virtual environment from the pinned "
                                  "requirements (src/dcm/evaluation/vbench-requirements.txt)")
    setup.add_argument("--venv", default=".venv-vbench",
                       help="where (evaluation.vbench.venv; default .venv-vbench)")
    setup.add_argument("--requirements", default=None,
                       help="another requirements file (default: the pinned one)")
    setup.add_argument("--python", default=sys.executable, help="interpreter for the venv (3.10 or 3.11)")
    setup.add_argument("--force", action="store_true", help="reinstall even if the venv was built from "
                       "these requirements as they are now")

    analyze = sub.add_parser("analyze", help="analyses outside the DAG (the DAG's own is `dcm run analyze`)")
    analyze_sub = analyze.add_subparsers(dest="analyze_command", required=True)
    diff = analyze_sub.add_parser("params", help="relative weight change ||ΔW||/||W|| per module group "
                                  "between two checkpoints (transformer folders, or "
                                  "checkpoints/<method>/seme|dete)")
    diff.add_argument("a", help="reference checkpoint (W)")
    diff.add_argument("b", help="changed checkpoint (W + ΔW)")
    diff.add_argument("--plot", default="param_change.png", help="bar plot path (default: param_change.png)")
    diff.add_argument("--json", default=None, help="also write the table as JSON here")

    export = sub.add_parser("export", help="write a trained dcm method as a folder stock diffusers + peft "
                            "load (transformer, LoRA, copied timestep layers, scheduler, the student "
                            "schedule)")
    _add_params_args(export)
    export.add_argument("--method", default="dcm", help="a method of kind dcm (default: dcm)")
    export.add_argument("--out", default=None, help="output folder (default: export/<method>)")

    pipeline = sub.add_parser("pipeline-run", help="open the MLflow parent run of one pipeline execution "
                              "and print its id: export DCM_PARENT_RUN_ID=$(dcm pipeline-run) before "
                              "dvc repro")
    _add_params_args(pipeline)
    pipeline.add_argument("--name", default=None, help="run name (default: pipeline-<experiment>)")
    pipeline.add_argument("--finish", default=None, metavar="RUN_ID", help="close that parent run instead")
    pipeline.add_argument("--exit-status", type=int, default=0,
                          help="with --finish: the pipeline's exit status")

    dvc_setup = sub.add_parser("dvc-setup", help="configure this DVC project for a cluster's shared "
                               "filesystem: one group-shared cache, outputs linked into it instead of "
                               "copied")
    dvc_setup.add_argument("--shared-cache", required=True, metavar="DIR", help="the cache folder on the "
                           "shared filesystem (the workspaces' own filesystem, so adding an output is a "
                           "rename)")
    dvc_setup.add_argument("--link-types", default=None, help="DVC cache.type, in order of preference "
                           "(default: reflink,symlink,hardlink; never copy)")
    dvc_setup.add_argument("--remote", default=None, metavar="URL",
                           help="also set this default remote (a directory, s3://...)")
    dvc_setup.add_argument("--local", action="store_true", help="write .dvc/config.local (this clone "
                           "only) instead of .dvc/config")
    dvc_setup.add_argument("--repo", default=".", help="the DVC project (default: here)")

    warm = sub.add_parser("warm-server", help="serve warm starts: the server `dcm launch` starts with "
                          "DCM_WARM_START=1 (imports once, forks each local stage)")
    warm.add_argument("socket", help="the Unix socket to listen on")

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except config.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dcm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
