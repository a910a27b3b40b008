"""Text shared by training and serving: examples and their padding, input templates, and PET's label
words and pattern files. The bottom layer: it imports nothing of rewrite but `errors`, and no torch."""
