"""The one error family users see. Everything a user can fix raises an ``EdgePeftError``
subclass whose message says what went wrong and what to do; anything else is a bug."""


class EdgePeftError(Exception):
    """Base of every user-facing error (the CLI prints these without a traceback)."""


class SpecError(EdgePeftError, ValueError):
    """A method spec or option has a bad value."""


class TargetError(EdgePeftError):
    """A PEFT method's targets match nothing (or the wrong kind of layer) in the model."""


class BundleError(EdgePeftError):
    """A bundle file is missing, unreadable, corrupted or of an unsupported version."""


class ManifestError(BundleError):
    """The bundle's manifest is malformed or of an unsupported schema version."""


class AdapterError(EdgePeftError):
    """An adapter is missing, corrupted, or does not fit the bundle's trainable tensors."""


class DataError(EdgePeftError):
    """A data file has missing fields, bad values or labels the bundle does not know."""


class BackendError(EdgePeftError):
    """A runtime backend is unavailable here or cannot run this bundle."""


class MemoryBudgetError(EdgePeftError):
    """The work does not fit (or did not stay within) the memory budget."""


class ExportError(EdgePeftError):
    """The model cannot be exported as asked."""


class SignatureError(BundleError):
    """A bundle is unsigned, signed by a key that is not trusted, or altered after signing."""


class LockError(EdgePeftError):
    """An adapter is in use by another process (or its lock cannot be taken)."""


class NumericalError(EdgePeftError):
    """A step produced a non-finite loss or parameters; the adapter was restored."""


class PathError(EdgePeftError):
    """A path given to write to (or a cache folder) is unusable: its folder is missing or is a
    file, or it is a folder where a file is expected."""
