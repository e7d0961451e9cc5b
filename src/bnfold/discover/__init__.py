"""Discover: who feeds whom. One forward pass (traced by execution or by ``torch.fx``) becomes a
:class:`~bnfold.discover.graph.DataFlowGraph`; aliasing, lineage and memory layout are what the tracer
observes about each value."""
