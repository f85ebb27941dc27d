"""Execution modes, in a module light enough for the command line to import."""

MODES = ("auto", "off", "graph", "inductor", "cudagraphs")
