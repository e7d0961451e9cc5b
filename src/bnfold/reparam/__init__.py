"""Re-parameterization: parallel branches found in the graph, written as recipes, merged by the merge
arithmetic into one :class:`~bnfold.reparam.merged_conv.MergedConv`."""
