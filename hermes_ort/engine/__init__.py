"""Running stages: ORT sessions and templates, loading agents, the pipeline, memory."""
