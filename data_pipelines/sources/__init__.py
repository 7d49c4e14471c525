"""Dataset sources for data_pipelines.build."""
