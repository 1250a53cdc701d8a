"""`lorafit export`: an adapter made ready for another server, checked against that server's rules first.

vllm.py     the adapter alone, for vLLM's multi-LoRA serving (`vllm serve BASE --enable-lora`)
llamacpp.py llama.cpp's own converters (fetched once from the pinned llama-cpp-python sdist) and runtime
gguf.py     base + adapter merged into one GGUF, the adapter as a GGUF LoRA, the base GGUF
gguf_verify.py  --verify: the run's held-out prompts answered in llama.cpp (and transformers' GGUF reader) vs lorafit
ollama.py   a Modelfile (FROM, TEMPLATE in Ollama's Go syntax, stop tokens, SYSTEM) beside the GGUF
"""
