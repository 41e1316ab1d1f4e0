"""The HTTP TTS server: FastAPI app (app.py) over an inference queue (batching.py) with a worker
per device, named reference voices on disk (voices.py) and Prometheus metrics (metrics.py)."""
