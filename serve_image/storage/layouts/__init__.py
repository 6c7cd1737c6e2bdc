"""Table layouts: how eZ keeps a file's bytes (chunk rows, large objects, a shared mount)."""
