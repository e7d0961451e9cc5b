"""Planning: the plan's types, the context every pass reads, and one pass per kind of transform. Nothing
here touches the model."""
