"""Command-line tools: result tables, plots of logs, the demo figure, tiny generated data."""
