"""The package version, in a module of its own so that modules inside the package need not import its root."""

__version__ = "0.1.0"
