"""Generation and the OpenAI-style HTTP server."""
