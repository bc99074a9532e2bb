"""Parallelism on PyTorch's own engines (FSDP2 ``fully_shard``, DeviceMesh, ``torch.distributed.checkpoint``,
context parallelism), kept out of the models and the training loop."""
