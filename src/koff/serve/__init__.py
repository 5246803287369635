"""`koff serve`: an OpenAI-compatible server for one backbone with memories chosen per request.

  - `loading`: the backbone (a run directory or an exported backbone) and memory folders, validated
  - `scheduler`: the engine, continuous batching of requests with different memories
  - `router`: `model: "auto"`, the memory with the lowest loss on the prompt
  - `text`: generated tokens -> text pieces, stop sequences
  - `api`: request schemas, validation, OpenAI's error shape
  - `app`: the FastAPI app (endpoints, streaming, memory management, metrics)
  - `metrics`: Prometheus text format
  - `server`: binding the socket and running uvicorn
"""

from koff.serve.scheduler import AUTO, Engine, EngineConfig, Job, Sampling

__all__ = ["AUTO", "Engine", "EngineConfig", "Job", "Sampling"]
