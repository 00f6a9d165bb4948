"""Developer tools: the real-model zoo (fetching, exporting, validation inputs)."""
