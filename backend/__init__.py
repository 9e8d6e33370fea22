"""Textbot's backend: model loading, the generation engine and the Serve deployment."""
