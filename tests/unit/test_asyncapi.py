"""worker/schemas/asyncapi.yaml is a valid AsyncAPI 3.0 document that describes the streams the code
really uses (addresses, entry fields, payload schemas), and `sms-worker schema` prints each document.

Validity is checked twice: always against the AsyncAPI 3.0.0 JSON Schema vendored in
tests/fixtures (no node, no network), and with the real AsyncAPI parser when it is installed
(`npm install --prefix .venv/asyncapi @asyncapi/parser@3.6.6`, or $ASYNCAPI_NODE_MODULES naming a
node_modules directory that holds it); the parser also resolves the payloads' $refs and checks
that every reference exists.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from jsonschema import Draft7Validator, Draft202012Validator

from worker import schemas
from worker.cli import main
from worker.store.keys import Keys

REPO = Path(__file__).resolve().parents[2]
DOC: dict[str, Any] = yaml.safe_load(schemas.text("asyncapi"))
ASYNCAPI_SCHEMA = orjson.loads((REPO / "tests" / "fixtures" / "asyncapi-3.0.0.schema.json").read_bytes())
CHECK_NODE = """
const path = require('path');
const { Parser, fromFile } = require(path.join(process.argv[2], '@asyncapi', 'parser'));
(async () => {
  const { document, diagnostics } = await fromFile(new Parser(), process.argv[3]).parse();
  const errors = diagnostics.filter((d) => d.severity === 0);
  for (const d of errors) console.log(`${d.path.join('.')}: ${d.message}`);
  process.exit(document && errors.length === 0 ? 0 : 1);
})();
"""


def test_the_document_is_valid_against_the_asyncapi_3_json_schema() -> None:
    validator = Draft7Validator(ASYNCAPI_SCHEMA)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(DOC)]
    assert errors == []
    broken = copy.deepcopy(DOC)
    broken["channels"]["outbox"]["address"] = 5
    del broken["info"]
    assert not validator.is_valid(broken)  # the check can fail


def test_the_channels_are_the_streams_the_store_writes() -> None:
    keys = Keys("sms")
    channels = DOC["channels"]
    assert channels["outbox"]["address"].replace("{prefix}", "sms") == keys.outbox("{lane}")
    assert channels["events"]["address"].replace("{prefix}", "sms") == keys.events
    assert set(channels["outbox"]["parameters"]) == {"prefix", "lane"}
    assert channels["outbox"]["parameters"]["prefix"]["default"] == keys.p


def test_the_payloads_are_the_shipped_schemas_and_the_example_is_a_valid_job() -> None:
    messages = DOC["components"]["messages"]
    assert messages["job"]["payload"] == {"$ref": f"./{schemas.FILES['job']}"}
    assert messages["statusEvent"]["payload"] == {"$ref": f"./{schemas.FILES['event']}"}
    assert set(messages["job"]["headers"]["properties"]) == {"mid", "c"}
    job = Draft202012Validator(schemas.load("job"))
    for example in messages["job"]["examples"]:
        assert job.is_valid(example["payload"]), example


def _parser_modules() -> Path | None:
    configured = os.environ.get("ASYNCAPI_NODE_MODULES")
    modules = Path(configured) if configured else REPO / ".venv" / "asyncapi" / "node_modules"
    return modules if (modules / "@asyncapi" / "parser").is_dir() else None


@pytest.mark.skipif(shutil.which("node") is None or _parser_modules() is None,
                    reason="node or @asyncapi/parser not installed (see this module's docstring)")
def test_the_real_asyncapi_parser_accepts_the_document_and_resolves_its_references(tmp_path: Path) -> None:
    script = tmp_path / "check.cjs"
    script.write_text(CHECK_NODE)
    for key, name in schemas.FILES.items():  # as a reader saves them: side by side
        (tmp_path / name).write_text(schemas.text(key))
    good = subprocess.run(["node", str(script), str(_parser_modules()), str(tmp_path / "asyncapi.yaml")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert good.returncode == 0, good.stdout + good.stderr
    # A dangling reference is refused: the parser really resolves them.
    broken = tmp_path / "broken.yaml"
    dangling = schemas.text("asyncapi").replace("#/channels/outbox/messages/job", "#/channels/outbox/messages/x")
    broken.write_text(dangling)
    bad = subprocess.run(["node", str(script), str(_parser_modules()), str(broken)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode == 1 and "does not exist" in bad.stdout


@pytest.mark.parametrize("name", sorted(schemas.FILES))
def test_sms_worker_schema_prints_the_shipped_document(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema", name]) == 0
    out = capsys.readouterr().out
    assert out == (REPO / "worker" / "schemas" / schemas.FILES[name]).read_text(encoding="utf-8")


def test_sms_worker_schema_refuses_an_unknown_document(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["schema", "jobs"])
    assert exit_.value.code == 2 and "invalid choice: 'jobs'" in capsys.readouterr().err


def test_the_schemas_are_package_data() -> None:
    """pyproject ships them: an installed package (not this checkout) has them too."""
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"schemas/*.json", "schemas/*.yaml"' in pyproject
