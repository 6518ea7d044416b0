"""The training engine: phases, the coordinator that schedules them, checkpoints, metrics, the worker loop."""
