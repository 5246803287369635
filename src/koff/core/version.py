"""koff's version (also written into every manifest koff writes)."""

__version__ = "0.1.0"
