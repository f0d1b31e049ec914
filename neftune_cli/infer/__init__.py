"""After training: what a run, checkpoint or model is, generation, held-out loss."""
