"""Pretraining the embedded tiny base on ShapesWorld (`python -m conftrl.pretrain`)."""
