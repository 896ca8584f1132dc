"""Hydra configuration tree, importable as the package `conftrl.conf` when installed."""
