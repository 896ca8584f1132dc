"""Judging an adapter by its samples: items, sampling, scorers, reports and a page to try it."""
