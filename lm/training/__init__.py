"""Training: the LightningModule and everything a run needs around it (options, metrics, averaging,
checkpoints, run folders, the Trainer, throughput)."""
