"""Errors that mean "fix the input", not "fix the code"."""


class InputError(ValueError):
    """Bad input a user can fix: a raw log, a parameter, a pointer file.

    Its message is one line naming the file, row or parameter. `kedro run` prints just that
    line (see `attention_ctr.cli`); the traceback would only point into this project's code.
    """
