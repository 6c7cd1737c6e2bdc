"""One module per group of `serve-image` commands; each has `register(subparsers)`."""
