"""Development tools: the icomm API sandbox, the development stack and the demo; never product code.

The sandbox stands in for the provider, the development stack runs every process on one machine,
and the demo runs the whole system and explains what became of a few thousand SMS.

The worker, clock and web processes import nothing from here (tests/unit/test_layout.py checks
it); only `sms-worker sandbox` and `sms-worker demo` load these modules, when they are run.
"""
