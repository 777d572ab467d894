"""The bottom of the bake: what a fold is (the frozen FoldPlan types) and how it computes (float64 math, one cast)."""
