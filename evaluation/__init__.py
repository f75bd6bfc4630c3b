"""Evaluation of trained models on the held-out medical benchmarks (the OctoMed protocol).

* :mod:`evaluation.harness`: ``evaluate(config)``, the run (questions -> backend -> scores -> outputs);
* :mod:`evaluation.benchmarks`: the held-out benchmark files read as question rows;
* :mod:`evaluation.backends`: ``hf``, ``openai`` and ``vllm`` generation backends;
* :mod:`evaluation.report`: metrics over seeds, the reasoning-length plot, the report;
* the ``octomed-data eval`` command is :mod:`octomed_data.cli.eval`.
"""
