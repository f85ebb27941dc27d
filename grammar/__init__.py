"""The .ivx experiment language: grammar, syntax tree, parser and canonical printer."""
