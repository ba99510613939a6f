"""atc core: configuration, database access, object storage, broker client, operations and CLI.

Nothing in this package imports Textual; the UI in ``screens`` calls into it.
"""

__version__ = "0.1.0"
