"""User-facing errors: the error type (one line that names the problem, shown by the CLI without a
traceback) and the argument checks that raise it."""


class RwkvkitError(Exception):
    """A problem with the user's input (file, checkpoint, tokens, arguments).

    The CLI prints ``error: <message>`` and exits with status 2; the Python API raises it as is.
    ``param``: the name of the argument or request field the check failed on, when there is one (the
    server answers it as the error's ``param``); set where the check happens.
    """

    def __init__(self, *args: object, param: str | None = None):
        super().__init__(*args)
        self.param = param


def check_int(name: str, value: object, minimum: int = 0, note: str = "") -> int:
    """``value`` if it is an integer (not a bool) >= ``minimum``; else RwkvkitError naming ``name``.

    ``note`` is added after the bound, e.g. ``" (0 = no limit)"``.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise RwkvkitError(f"{name} must be an integer >= {minimum}{note}, got {value!r}", param=name)
    return value
