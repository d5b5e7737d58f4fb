"""icomm SMS dispatch worker: jobs from Redis, bulk sends to the icomm SMS API, reports, status events.

The layout follows the data flow; docs/architecture.md maps it.
"""
