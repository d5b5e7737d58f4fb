"""`sms-worker schema job|event|asyncapi`: print a published contract (worker/schemas) as shipped."""

from __future__ import annotations

import argparse
import sys

from worker import schemas

EPILOG = """examples:
  sms-worker schema job        > job-v1.schema.json      # JSON Schema (2020-12) of the wire format v1
  sms-worker schema event      > event-v1.schema.json    # JSON Schema (2020-12) of the status event v1
  sms-worker schema asyncapi   > asyncapi.yaml           # AsyncAPI 3.0: the outbox streams and the events stream

The AsyncAPI document refers to the two schema files by name (./job-v1.schema.json,
./event-v1.schema.json): save them beside it."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("document", choices=sorted(schemas.FILES), help="which document to print")


def cmd_schema(args: argparse.Namespace) -> int:
    sys.stdout.write(schemas.text(args.document))
    return 0
