"""Evaluation of trained models on the held-out medical benchmarks (the OctoMed protocol).

* :mod:`evaluation.harness`: ``evaluate(config)``, the run (questions -> backend -> scores -> outputs);
* :mod:`evaluation.questions`: a QUESTION_SCHEMA dataset as input (selection, malformed rows skipped);
* :mod:`evaluation.outputs`: scored prediction rows, their shards and the run's result;
* :mod:`evaluation.stage`: ``EvaluateStage``, evaluation as a global stage (done: metrics.json);
* :mod:`evaluation.benchmarks`: the held-out benchmark files read as question rows;
* :mod:`evaluation.backends`: ``hf``, ``openai`` and ``vllm`` generation backends;
* :mod:`evaluation.report`: metrics over seeds, the reasoning-length plot, the report;
* the ``octomed-data eval`` command is :mod:`cli.eval`.
"""
