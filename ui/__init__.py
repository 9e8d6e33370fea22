"""Textbot's chat page: one Gradio ChatInterface, hosted as a Serve deployment
(streaming from Textbot through a handle) or standalone (streaming over HTTP)."""
