"""Run reports: figures, HTML assembly, terminal summaries."""
