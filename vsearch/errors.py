class VsearchError(Exception):
    """A problem the user can fix (bad path, bad option, bad input).

    The CLI prints these as one line and exits non-zero; anything else is a bug
    and keeps its traceback.
    """
