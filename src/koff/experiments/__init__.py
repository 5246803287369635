"""Research tools built on the library: grids of methods x seeds (`compare`), their report and
plots (`report`, `gap`), and the analysis of which neurons offloading removes (`analysis`).
Nothing in the library imports this package; the CLI and `koff.analyze_run` use it."""
