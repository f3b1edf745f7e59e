"""Datasets: each one file; each yields labelled image pairs."""
