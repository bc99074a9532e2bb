"""vbench 0.1.5 on the CPU: ``vbench.launch.evaluate`` without its CUDA-only start-up.

Run by ``dcm.evaluation.vbench`` as ``<venv>/bin/python -I vbench_cpu.py <the launcher's flags>`` in
VBench's own environment (never imported by dcm: it imports ``vbench``, which lives only there; ``-I``
keeps this folder, whose ``vbench.py`` is dcm's backend, off ``sys.path``).

The launcher cannot run without a GPU: ``vbench.distributed.dist_init`` starts an NCCL process group
("ProcessGroupNCCL is only supported with GPUs, no GPUs found!") and calls ``torch.cuda.set_device``,
and ``main`` hard-codes ``torch.device("cuda")``.  This is its ``main`` with the same flags (parsed by
its own ``parse_args``), one process and ``device = cpu``: vbench's Python API
``VBench(device, full_info_dir, output_path).evaluate(...)`` with the arguments the launcher passes, so
it writes the same ``results_<time>_eval_results.json``.
"""

import json
from datetime import datetime


def main() -> None:
    import torch
    from vbench import VBench
    from vbench.launch.evaluate import parse_args

    args = parse_args()
    if args.prompt_file is not None and args.prompt != "None":
        raise SystemExit("--prompt_file and --prompt cannot be used together")
    if (args.prompt_file is not None or args.prompt != "None") and args.mode != "custom_input":
        raise SystemExit("must set --mode=custom_input for using external prompt")
    prompt = []
    if args.prompt_file:
        with open(args.prompt_file) as f:
            prompt = json.load(f)
    elif args.prompt != "None":
        prompt = [args.prompt]
    # as the launcher: category is always passed (None unless given), and the imaging-quality resize mode
    kwargs = {"category": args.category,
              "imaging_quality_preprocessing_mode": args.imaging_quality_preprocessing_mode}
    print(f"args: {args} (dcm: one process, device cpu)", flush=True)
    VBench(torch.device("cpu"), args.full_json_dir, args.output_path).evaluate(
        videos_path=args.videos_path, name=f"results_{datetime.now().strftime('%Y-%m-%d-%H:%M:%S')}",
        prompt_list=prompt, dimension_list=args.dimension, local=args.load_ckpt_from_local,
        read_frame=args.read_frame, mode=args.mode, **kwargs)
    print("done", flush=True)


if __name__ == "__main__":
    main()
