"""The lowest layer: errors, typed field validation, names, atomic I/O and locks, fault points,
device and precision, the version, and every use of a third-party internal (`compat`). Imports
nothing else of koff."""
