"""The (prompt, seed) rows of every split: training, evaluation (``data/prompts.json``) and
validation.

Train rows cycle over a seeded shuffle of every caption of the world, with distinct seeds from
[0, TRAIN_SEED_LIMIT).  Eval rows are ``world.eval_prompts`` captions chosen to spread evenly over
every attribute value, each with ``world.eval_seeds`` distinct seeds ≥ TRAIN_SEED_LIMIT: unseen by
teacher training and by the trajectories.  Everything is deterministic from ``params.seed``.
"""

from __future__ import annotations

import numpy as np

from dcm.config import ConfigError, Params
from dcm.worlds import shapes

# train seeds lie in [0, limit); eval in [limit, 2·limit); validation in [2·limit, 3·limit)
TRAIN_SEED_LIMIT = 1_000_000


def balanced_captions(captions: list[str], count: int, rng: np.random.Generator) -> list[str]:
    """``count`` captions whose attribute values are as evenly used as possible (greedy, seeded ties).

    Each pick is the caption whose values have been used least so far (sum over the attributes),
    first in a seeded shuffle among equals, so every colour, shape, direction, … appears.
    """
    order = [captions[i] for i in rng.permutation(len(captions))]
    attributes = {c: shapes.parse_caption(c) for c in order}
    used = {key: dict.fromkeys(shapes.VOCABULARY[key], 0) for key in shapes.ATTRIBUTES}
    chosen: list[str] = []
    remaining = list(order)
    for _ in range(count):
        best = min(remaining, key=lambda c: sum(used[k][attributes[c][k]] for k in shapes.ATTRIBUTES))
        remaining.remove(best)
        chosen.append(best)
        for key in shapes.ATTRIBUTES:
            used[key][attributes[best][key]] += 1
    return chosen


def build_prompt_sets(params: Params) -> dict[str, list[dict]]:
    """The ``data/prompts.json`` contract: ``{"train": [...], "eval": [...]}`` rows of prompt_id, prompt,
    seed."""
    captions = shapes.all_captions()
    n_train = params.trajectories.num_trajectories
    n_eval_prompts, n_eval_seeds = params.world.eval_prompts, params.world.eval_seeds
    if n_eval_prompts > len(captions):
        raise ConfigError("world.eval_prompts", n_eval_prompts,
                          f"<= the number of captions ({len(captions)})")
    if n_train > TRAIN_SEED_LIMIT or n_eval_prompts * n_eval_seeds > TRAIN_SEED_LIMIT:
        raise ConfigError("trajectories.num_trajectories", n_train, f"<= {TRAIN_SEED_LIMIT} distinct seeds")
    train_rng, eval_rng = (np.random.default_rng([params.seed, k]) for k in (0, 1))

    order = train_rng.permutation(len(captions))
    train_seeds = train_rng.choice(TRAIN_SEED_LIMIT, size=n_train, replace=False)
    train = [{"prompt_id": int(order[i % len(order)]), "prompt": captions[order[i % len(order)]],
              "seed": int(train_seeds[i])} for i in range(n_train)]

    evaluation = held_out_rows(captions, n_eval_prompts, n_eval_seeds, eval_rng, TRAIN_SEED_LIMIT)
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
    rng = np.random.default_rng([params.seed, 2])
    return held_out_rows(shapes.all_captions(), params.world.eval_prompts, params.world.eval_seeds, rng,
                         2 * TRAIN_SEED_LIMIT)
