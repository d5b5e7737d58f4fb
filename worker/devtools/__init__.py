"""Development tools, never imported by the product's processes: the icomm API sandbox, the
development stack that runs every process on one machine, and the demo.

The worker, clock and web processes import nothing from here (tests/unit/test_layout.py checks
it); only `sms-worker sandbox` and `sms-worker demo` load these modules, when they are run.
"""
