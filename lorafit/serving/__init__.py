"""`lorafit serve`: one base model, many adapters, an OpenAI-compatible HTTP API.

protocol (the OpenAI shapes, validated) → handlers (what an endpoint asks of the engine) → engine (the one
thread that owns the model) → decoding (next token, visible text); registry (what is served, what is
loaded). app.py holds the routes; the engine never sees HTTP.
"""
