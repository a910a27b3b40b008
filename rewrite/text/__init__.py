"""Text shared by training and serving: examples and their padding, input templates, and PET's label
words and pattern files."""
