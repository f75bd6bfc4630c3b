"""THE inference client and its parts.

* :mod:`~octomed_data.inference.processor`: THE request processor (bounded fan-out, journal, retry
  accounting, abort) of distillation, the LLM judge, difficulty grading and evaluation; its
  backends: online (:mod:`~octomed_data.inference.client`: ``EndpointClient``,
  ``request_with_retries``, ``TeacherUnreachable``, ``sample_seed``) and Batch
  (:mod:`~octomed_data.inference.batch_run`, records in :mod:`~octomed_data.inference.batch_records`,
  over :mod:`~octomed_data.inference.batch_api`); :mod:`~octomed_data.inference.journal`: the
  durable request journal.
* :mod:`~octomed_data.inference.wire`: the transport protocol, error classification, key scrubbing;
  :mod:`~octomed_data.inference.transport_http` (the lean transport), :mod:`~octomed_data.inference.fleet`.
* :mod:`~octomed_data.inference.retry`: ``Backoff``, Retry-After parsing, the dead-endpoint ``Breaker``.
* :mod:`~octomed_data.inference.ratelimit`: requests/tokens-per-window budgets per teacher.
* :mod:`~octomed_data.inference.replies`, :mod:`~octomed_data.inference.servers`: reading replies,
  server kinds; :mod:`~octomed_data.inference.vllm_service`: vLLM as its own service.

Nothing here imports vLLM, Prefect or Ray: vLLM runs in its own environment and is spoken to
over HTTP.
"""
