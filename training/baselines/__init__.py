"""Classic change-detection baselines, in numpy only, scored like any served model.

They need no training and no torch, so ``rarechange evaluate --model cva`` runs on a serving-only
install and puts a learned model's numbers next to a method that knows nothing about the data.
"""
