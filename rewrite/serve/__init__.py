"""`rewrite serve`: an OpenAI-style HTTP server over the runtime (`rewrite.runtime`), batching requests across
adapters."""
