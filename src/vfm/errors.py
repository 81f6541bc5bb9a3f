"""User-fixable errors. The CLI prints the message (which names the file, field or sample and the fix)
and exits with code 2; anything else is a bug and keeps its traceback."""

from vfm.recipes.errors import RecipeError


class UserError(Exception):
    """Bad input a user can fix (file, archive, manifest, argument)."""


USER_ERRORS: tuple[type[Exception], ...] = (UserError, RecipeError)
