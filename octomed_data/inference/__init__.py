"""THE inference client and its parts.

* :mod:`~octomed_data.inference.client`: :class:`~octomed_data.inference.client.EndpointClient`
  (one OpenAI-compatible endpoint behind a transport), ``request_with_retries`` (THE request
  path of distillation, grading and evaluation), error classification, key scrubbing,
  ``TeacherUnreachable``, ``sample_seed``.
* :mod:`~octomed_data.inference.retry`: ``Backoff``, Retry-After parsing, the dead-endpoint ``Breaker``.
* :mod:`~octomed_data.inference.ratelimit`: requests/tokens-per-window budgets per teacher.
* :mod:`~octomed_data.inference.replies`, :mod:`~octomed_data.inference.servers`: reading replies,
  server kinds; :mod:`~octomed_data.inference.vllm_service`: vLLM as its own service.

Nothing here imports vLLM, Prefect or Ray: vLLM runs in its own environment and is spoken to
over HTTP.
"""
