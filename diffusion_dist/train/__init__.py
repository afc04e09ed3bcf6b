"""Training: the DeepSpeed engine, EMA, checkpoints, the loop. The only package that touches ranks."""
