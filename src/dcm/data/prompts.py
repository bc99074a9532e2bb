"""The (prompt, seed) rows of every split: training, evaluation (``data/prompts.json``) and
validation.

Train rows cycle over a seeded shuffle of every caption of the world, with distinct seeds from
[0, TRAIN_SEED_LIMIT).  Eval rows are ``world.eval_prompts`` captions chosen to spread evenly over
every attribute value, each with ``world.eval_seeds`` distinct seeds ≥ TRAIN_SEED_LIMIT: unseen by
teacher training and by the trajectories.  Everything is deterministic from ``params.seed``.

A real family (wan, hunyuan, hunyuan15, cogvideox) takes its prompts from the user's files instead
(``real_prompt_sets``: ``data.prompts``, or the captions of ``data.videos``, and ``evaluation.prompts``)
and refuses to run without them: the shapes grammar is the toy teacher's, never a real teacher's.
"""

from __future__ import annotations

import numpy as np

from dcm.config import ConfigError, Params
from dcm.worlds import shapes

# train seeds lie in [0, limit); eval in [limit, 2·limit); validation in [2·limit, 3·limit)
TRAIN_SEED_LIMIT = 1_000_000
OPEN = "open"  # an open caption's unnamed attribute, as a value when balancing the held-out captions


def balanced_captions(captions: list[str], count: int, rng: np.random.Generator) -> list[str]:
    """``count`` captions whose attribute values are as evenly used as possible (greedy, seeded ties).

    Each pick is the caption whose values have been used least so far (sum over the attributes),
    first in a seeded shuffle among equals, so every colour, shape, direction, … appears.  Open captions
    count an unnamed attribute as the value "open", so the open attributes spread evenly too.
    """
    order = [captions[i] for i in rng.permutation(len(captions))]
    attributes = {c: ({k: v or OPEN for k, v in shapes.parse_open_caption(c).items()} if shapes.is_open(c)
                      else shapes.parse_caption(c)) for c in order}
    used = {key: dict.fromkeys([*shapes.VOCABULARY[key], OPEN], 0) for key in shapes.ATTRIBUTES}
    chosen: list[str] = []
    remaining = list(order)
    for _ in range(count):
        best = min(remaining, key=lambda c: sum(used[k][attributes[c][k]] for k in shapes.ATTRIBUTES))
        remaining.remove(best)
        chosen.append(best)
        for key in shapes.ATTRIBUTES:
            used[key][attributes[best][key]] += 1
    return chosen


def build_prompt_sets(params: Params, standard: tuple[list[dict], dict] | None = None) -> dict[str, list]:
    """The ``data/prompts.json`` contract: ``{"train": [...], "eval": [...]}`` rows of prompt_id, prompt,
    seed: the shapes world's splits, or a real family's prompt files (``real_prompt_sets``).  ``standard``:
    VBench's suite as the evaluation rows and the record of what was taken (``"suite"`` in the file)."""
    if params.backbone.family != "toy":
        return real_prompt_sets(params, standard)
    world = params.world
    full = shapes.all_captions()
    n_train = params.trajectories.num_trajectories
    n_eval_prompts, n_eval_seeds = params.world.eval_prompts, params.world.eval_seeds
    if n_eval_prompts > len(full):
        raise ConfigError("world.eval_prompts", n_eval_prompts,
                          f"<= the number of captions ({len(full)})")
    if n_train > TRAIN_SEED_LIMIT or n_eval_prompts * n_eval_seeds > TRAIN_SEED_LIMIT:
        raise ConfigError("trajectories.num_trajectories", n_train, f"<= {TRAIN_SEED_LIMIT} distinct seeds")
    train_rng, eval_rng = (np.random.default_rng([params.seed, k]) for k in (0, 1))

    order = train_rng.permutation(len(full))
    train_seeds = train_rng.choice(TRAIN_SEED_LIMIT, size=n_train, replace=False)
    prompt_id = {c: i for i, c in enumerate(world_captions(params))}
    train = []
    for i in range(n_train):
        # a row's prompt: a full caption, left open as often as the world's (keyed on the row's seed)
        caption = shapes.coarsen_caption(full[order[i % len(order)]], int(train_seeds[i]), world.open_share,
                                         world.open_attributes)
        train.append({"prompt_id": prompt_id[caption], "prompt": caption, "seed": int(train_seeds[i])})

    evaluation = held_out_rows(full, n_eval_prompts, n_eval_seeds, eval_rng, TRAIN_SEED_LIMIT)
    evaluation += open_rows(params, evaluation, TRAIN_SEED_LIMIT, stream=4)
    return {"train": train, "eval": evaluation}


def world_captions(params: Params) -> list[str]:
    """The shapes world's captions, in prompt-id order: the full ones (288), then, when the world has open
    prompts (``world.open_share`` or ``world.eval_open_prompts``), the open ones its attributes allow."""
    world = params.world
    captions = shapes.all_captions()
    if world.open_share > 0 or world.eval_open_prompts > 0:
        captions += shapes.open_captions(world.open_attributes)
    return captions


def open_rows(params: Params, taken: list[dict], seed_base: int, stream: int) -> list[dict]:
    """``world.eval_open_prompts`` open captions (balanced over their values, "open" counted as one) ×
    ``world.eval_seeds`` seeds in [seed_base, seed_base + limit) that no row of ``taken`` uses, drawn on
    their own stream so the full-caption rows are those of a world without open prompts."""
    world = params.world
    if world.eval_open_prompts == 0:
        return []
    captions = world_captions(params)
    candidates = shapes.open_captions(world.open_attributes)
    if world.eval_open_prompts > len(candidates):
        raise ConfigError("world.eval_open_prompts", world.eval_open_prompts,
                          f"<= the number of open captions of world.open_attributes ({len(candidates)})")
    rng = np.random.default_rng([params.seed, stream])
    used = {r["seed"] for r in taken}
    n = world.eval_open_prompts * world.eval_seeds
    drawn = seed_base + rng.choice(TRAIN_SEED_LIMIT, size=n + len(used), replace=False)
    seeds = [int(s) for s in drawn if int(s) not in used][:n]
    prompt_id = {c: i for i, c in enumerate(captions)}
    chosen = balanced_captions(candidates, world.eval_open_prompts, rng)
    return [{"prompt_id": prompt_id[c], "prompt": c, "seed": seeds[i * world.eval_seeds + k]}
            for i, c in enumerate(chosen) for k in range(world.eval_seeds)]


def training_prompts(params: Params) -> list[str]:
    """A real family's training prompts: ``data.prompts``, else the captions of ``data.videos``; never the
    shapes world's grammar."""
    from dcm.data import dataset

    data = params.data
    if data.prompts:
        return [row.prompt for row in dataset.read_prompts("data.prompts", data.prompts)]
    if data.videos:
        return [row.caption for row in dataset.read_videos("data.videos", data.videos)]
    raise ConfigError("data.prompts", None,
                      f"a local prompt file (or data.videos, whose captions are then the prompts) for family "
                      f"{params.backbone.family!r}: the shapes world's captions belong to the toy teacher")


def real_prompt_sets(params: Params, standard: tuple[list[dict], dict] | None = None) -> dict[str, list]:
    """Train rows cycle over a seeded shuffle of the training prompts (prompt_id: the prompt's position in
    its file), with distinct seeds from [0, limit); eval rows are every prompt of ``evaluation.prompts``
    (prompt_id: its position there) × ``evaluation.videos_per_prompt`` distinct seeds from [limit, 2·limit),
    prompt-major; with ``standard``, the eval rows are VBench's suite's (``dcm.evaluation.vbench_suite``)."""
    from dcm.data import dataset

    prompts = training_prompts(params)
    if standard is None and params.evaluation.prompts is None:
        raise ConfigError("evaluation.prompts", None,
                          f"a local prompt file of the evaluation prompts for family "
                          f"{params.backbone.family!r} (each sampled evaluation.videos_per_prompt times), "
                          f"or evaluation.backend: vbench with evaluation.vbench.mode: standard")
    eval_file = params.evaluation.prompts
    eval_prompts = ([] if standard is not None else
                    [row.prompt for row in dataset.read_prompts("evaluation.prompts", eval_file)])
    n_train, per_prompt = params.trajectories.num_trajectories, params.evaluation.videos_per_prompt
    if n_train > TRAIN_SEED_LIMIT or len(eval_prompts) * per_prompt > TRAIN_SEED_LIMIT:
        raise ConfigError("trajectories.num_trajectories", n_train, f"<= {TRAIN_SEED_LIMIT} distinct seeds")
    train_rng, eval_rng = (np.random.default_rng([params.seed, k]) for k in (0, 1))
    order = train_rng.permutation(len(prompts))
    train_seeds = train_rng.choice(TRAIN_SEED_LIMIT, size=n_train, replace=False)
    train = [{"prompt_id": int(order[i % len(order)]), "prompt": prompts[order[i % len(order)]],
              "seed": int(train_seeds[i])} for i in range(n_train)]
    seeds = TRAIN_SEED_LIMIT + eval_rng.choice(TRAIN_SEED_LIMIT, size=len(eval_prompts) * per_prompt,
                                               replace=False)
    evaluation = [{"prompt_id": i, "prompt": p, "seed": int(seeds[i * per_prompt + k])}
                  for i, p in enumerate(eval_prompts) for k in range(per_prompt)]
    if standard is not None:  # VBench's own suite: its rows and the record the reports print
        evaluation, suite = standard
        return {"train": train, "eval": evaluation, "suite": suite}
    return {"train": train, "eval": evaluation}


def held_out_rows(captions: list[str], n_prompts: int, n_seeds: int, rng: np.random.Generator,
                  seed_base: int) -> list[dict]:
    """Balanced captions × ``n_seeds`` distinct seeds from [seed_base, seed_base + limit), caption-major."""
    prompt_id = {c: i for i, c in enumerate(captions)}
    chosen = balanced_captions(captions, n_prompts, rng)
    seeds = seed_base + rng.choice(TRAIN_SEED_LIMIT, size=n_prompts * n_seeds, replace=False)
    return [{"prompt_id": prompt_id[c], "prompt": c, "seed": int(seeds[i * n_seeds + k])}
            for i, c in enumerate(chosen) for k in range(n_seeds)]


def validation_rows(params: Params) -> list[dict]:
    """A validation split shaped like the eval rows (balanced captions × ``world.eval_seeds``) with seeds
    in [2·limit, 3·limit): unseen by training and disjoint from the eval rows, for choosing
    hyperparameters without looking at the numbers that get reported (``benchmarks/validate.py``).  Not in
    prompts.json."""
    if params.backbone.family != "toy":
        raise ConfigError("backbone.family", params.backbone.family,
                          "'toy': the validation split is the shapes world's (a real family has none)")
    rng = np.random.default_rng([params.seed, 2])
    rows = held_out_rows(shapes.all_captions(), params.world.eval_prompts, params.world.eval_seeds, rng,
                         2 * TRAIN_SEED_LIMIT)
    return rows + open_rows(params, rows, 2 * TRAIN_SEED_LIMIT, stream=5)
