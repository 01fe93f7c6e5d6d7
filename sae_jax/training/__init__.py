"""Training: the optimizer step and the loop around it.

step.py         the jitted train step (loss, gradients, update, dead-latent counts)
update.py       Adam with decoder-row projection and renormalisation, chunked per expert
loop.py         `train`: set-up, the loop over steps, final evaluation and export
checkpoint.py   atomic orbax checkpoints, resume checks
preemption.py   SIGTERM / SIGINT to a checkpoint at a step boundary
metrics.py      metric rows to JSONL, TensorBoard and W&B (metric_logs.py)
"""
