"""Planning a bake without touching weights: the planner, its checks, the maps given, bake history,
runtimes, foldability."""
