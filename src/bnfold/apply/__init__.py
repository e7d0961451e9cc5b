"""Apply: the edits that carry out a plan on a model (copy, rescale, replace), the folding arithmetic they
use, and the record of what they changed."""
