"""Files: folded checkpoints, fitting a state_dict to a model, and the set of output files one run writes."""
