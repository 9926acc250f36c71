"""`hermes serve`: an OpenAI-compatible server (starlette + uvicorn, the `serve` extra) whose one engine
thread decodes every active request in each pass over the streamed stages (scheduler.py)."""
