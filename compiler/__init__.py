"""The compiler: typed IR, shape checking on fake tensors, scheduling (and, later, fx splicing)."""
