"""What koff keeps on disk: typed manifests, the run directory, training checkpoints."""
