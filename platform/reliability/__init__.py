"""Reliability checks of the served application: nothing lost under load (``lossless``), a bounded
soak with memory tracking (``soak``), and the ``dspark reliability`` commands (``cli``). The fault
tests (killed draft worker, verifier replica and scheduler, client disconnects) live in
``tests/platform/reliability``."""
