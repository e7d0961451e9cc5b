"""Check: the folded model against the original (outputs, then layer by layer), finding the one transform
that breaks a run, and measuring latency."""
