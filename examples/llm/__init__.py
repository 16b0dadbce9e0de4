"""A simulated OpenAI-compatible streaming chat API, limited by requests and tokens.

`app.py` is the Starlette app and its one rate-limit rule, `model.py` the
simulated model (tokenizer, reply), `demo.py` three callers playing against it
(`python -m examples.llm --demo`).
"""
