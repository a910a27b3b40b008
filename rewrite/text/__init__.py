"""Text shared by training and serving: input templates, and PET's label words and pattern files."""
