"""The training machinery every stage runs on: the process group and DeepSpeed engines (engine.py), exact
checkpoints (checkpoint.py) and what a stage reports while it runs (run_log.py)."""
