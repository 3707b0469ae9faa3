"""The baseline of benchmarks/serving.py: a minimal FastAPI JSON endpoint on the same stack."""

from fastapi import FastAPI

app = FastAPI()


@app.get("/hello")
async def hello() -> dict[str, str]:
    """Hello, world."""
    return {"hello": "world"}
