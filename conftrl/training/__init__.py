"""What a training run is made of: the LightningModule, the methods, callbacks, checkpoints, the
adapter folder and the run's logs."""
