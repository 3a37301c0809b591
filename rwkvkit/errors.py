"""User-facing error type: one line that names the problem, shown by the CLI without a traceback."""


class RwkvkitError(Exception):
    """A problem with the user's input (file, checkpoint, tokens, arguments).

    The CLI prints ``error: <message>`` and exits with status 2; the Python API raises it as is.
    """
