"""Experiment drivers: each reproduces one result of the paper, resumably, cell by cell."""
