"""The one exception type that means "the caller asked for something this model cannot do":
a bad setting, size, image or name. The server answers it with a 400 and the CLI with exit 2;
any other exception is an internal error (a 500 with the traceback in the server's log)."""


class InputError(ValueError):
    """A bad input, named with its value and what is accepted. A ValueError, so callers that
    catch ValueError keep working."""
