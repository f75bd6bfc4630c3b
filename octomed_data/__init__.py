"""octomed-data: the OctoMed data recipe as a library."""

__version__ = "0.1.0"
