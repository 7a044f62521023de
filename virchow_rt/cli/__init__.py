"""The ``virchow-rt`` command: :func:`main` parses the command line; each command's body lives in its own
module of this package."""
