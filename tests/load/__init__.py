"""The CI load test's harness (GitHub issue 7, item 2): local peers, a traffic generator and the checks.

- :mod:`tests.load.collectors`: a local upstream site and local Plausible / GA4 collectors that validate every
  payload against the documented limits (protocols.md §1, §2) and record everything they receive;
- :mod:`tests.load.traffic`: a fixed, seeded traffic mix with canaries in every request, and what it expects;
- :mod:`tests.load.checker`: pure functions that turn the run into a list of problems and a printed report.

None of these modules imports :mod:`gateway`: the harness must judge the gateway, not share its code.
"""
