"""The `vlmbridge` command line: thin commands over the library, errors turned into one red line."""
