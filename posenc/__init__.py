"""posenc: the library behind the pipeline's stages (positions, scalings, checkpoints, evaluation, reports)."""
