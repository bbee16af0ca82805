"""The one error the benchmark raises for bad flags, files or server answers it cannot use."""


class BenchError(Exception):
    """A problem the user can fix (the message names the flag or file); the CLI prints it and exits 2."""
