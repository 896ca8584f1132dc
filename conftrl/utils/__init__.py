"""Standard plumbing with no conftrl dependencies: atomic writes and image conversions."""
