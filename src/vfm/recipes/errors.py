"""Errors a user can fix: they carry the field path and what to do, and the CLI maps them to exit 2."""


class RecipeError(ValueError):
    """Bad recipe input: unknown field, wrong type, inconsistent batch, unknown model or recipe id."""
