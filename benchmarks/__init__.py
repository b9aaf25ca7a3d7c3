"""Benchmarks for privacy-gateway (GitHub issue 7): ``python -m benchmarks`` runs them all, see benchmarks/README.md.

Modules:

- :mod:`benchmarks.run`: the single entry point; writes ``benchmarks/results.md``.
- :mod:`benchmarks.micro`: in-process costs of the per-request building blocks (timeit, CPU clock, warm-up).
- :mod:`benchmarks.macro`: loopback load with wrk: bare Starlette app versus the same app inside the gateway.
- :mod:`benchmarks.bench_proxy`: ``gateway serve`` versus nginx direct, nginx ``proxy_pass`` and a naive httpx proxy.
- :mod:`benchmarks.bench_dispatch`: dispatcher deliveries per second to a local Plausible-style collector.
- :mod:`benchmarks.compiled`: the opt-in mypyc build, made in a scratch copy of the working tree, and checks of
  which build a process really runs (every figure is measured for both builds).
- :mod:`benchmarks.apps`: the ASGI apps those runs serve (``uvicorn --factory`` targets).
- :mod:`benchmarks.common`: shared fixtures (the 10 KB page, the geo database, gateway settings, cookies).
- :mod:`benchmarks.bench_ip`, :mod:`benchmarks.bench_middleware`: the older stand-alone micro benchmarks.
"""
