"""Generation and the OpenAI-style HTTP server."""

MAX_BATCH = 8  # prompts of concurrent requests that goldstick serve runs together by default
