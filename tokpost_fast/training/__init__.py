"""The training machinery every stage runs on: the process group, optimizers and DeepSpeed engines (engine.py),
exact checkpoints and the content hash of exported weights (checkpoint.py), what a stage reports while it runs
(run_log.py), the autoencoder's objective (autoencoder.py), the step loop with its log / checkpoint / NaN policy
(runner.py) and codebook health (codebook.py)."""
