"""Using a trained model: loading it, scoring a stream (plain, the cache, dynamic evaluation), sampling.

Nothing here imports Lightning or lm.training except loading.py, the one module that reads a checkpoint."""
