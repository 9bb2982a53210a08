"""The thin serving layer (model runner, paged KV cache, scheduler, OpenAI-compatible server).

It comes after the kernels; for now `python -m serving` reports which kernels and backends this
machine can run, the check the engine will make at start-up.
"""
