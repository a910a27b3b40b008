"""The `rewrite` command: a thin layer that parses, calls the library and prints."""
