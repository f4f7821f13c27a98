"""The AMP error: a bad candidate, option, callback or cache, named precisely (the CLI prints it, exit 2)."""

from qpasses.core.errors import QPassesError


class AmpError(QPassesError):
    """A user-facing automatic-mixed-precision failure."""


class AmpWarning(UserWarning):
    """The saved model does not behave as AMP measured it (``warnings.warn`` category; the CLI prints ``warning:``)."""
