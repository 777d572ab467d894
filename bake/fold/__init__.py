"""Applying a FoldPlan: the one executor, the affine module for sites where nothing folds, and its remote code."""
