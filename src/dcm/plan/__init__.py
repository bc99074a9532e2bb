"""Plans made before a job is queued: per-GPU memory of each training stage (``dcm.plan.memory``)."""
