"""``train_baseline``, ``train_seme``, ``train_dete`` (``--method M``): train M's weights in one stage of
its kind (``dcm.config.METHOD_KINDS``: which stages train which kind).  What trains, on which batch
source and with which extra objectives is the method's module's (``dcm.methods.<kind>.train``); the
loop (``dcm.distill.loop``) is the same for every method.  Outputs in ``checkpoints/<M>/`` (DCM:
``seme/``, ``dete/``)."""

from __future__ import annotations

from dcm import methods
from dcm.config import Params


def run(params: Params, method: str, stage: str) -> None:
    methods.train(params, method, stage)
