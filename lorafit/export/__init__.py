"""`lorafit export`: an adapter made ready for another server, checked against that server's rules first.

vllm.py     the adapter alone, for vLLM's multi-LoRA serving (`vllm serve BASE --enable-lora`)
"""
