"""Datamodules that turn images and captions into conftrl training batches."""
