"""What users run around training: evaluation, generation, benchmarks, TPU compiles, plots, environment info."""
