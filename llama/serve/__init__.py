"""An OpenAI-compatible HTTP server over the continuous-batching engine, on one process or under
torchrun: `protocol` (the request schema, checked once), `loop` (the engine's thread and the
torchrun plan broadcast), `responses` (answers shaped as OpenAI's), `app` (one function per
route), `connections` (HTTP connection limits) and `cli` (`llama-serve`)."""
