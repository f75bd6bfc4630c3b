"""The inference client's parts: reading replies, server kinds, vLLM as its own service.

Nothing here imports vLLM, Prefect or Ray: vLLM runs in its own environment and is spoken to
over HTTP.
"""
