"""`mtml tune` over the training itself: which aggregation, heads, architecture, learning rate or
width suits a suite. `space` reads the config's `search.space`, `trial` runs one setting as a
real training run inside Ray Tune, `run` searches then repeats the best, `summary` reports."""
