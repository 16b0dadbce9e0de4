"""The surge demo: `python -m examples.surge` plays a 10x surge against the image API.

`trace` draws the open-loop traffic, `client` behaves like an API SDK and
records what it saw, `runner` serves the app under uvicorn and plays the trace,
`report` and `chart` turn the records into the table, the verdict and the PNG.
"""
