"""Data pipelines: record format, dataset converters, face cropping, grain input pipelines. No JAX here."""
