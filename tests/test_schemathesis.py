"""Schemathesis against a running server: no input the schema allows (or any it does not) gets a 5xx, and
every documented response matches its declared schema. Small limits keep the generated jobs cheap."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from server import ServerProcess

SMALL_LIMITS = {"SDSERVE_MAX_STEPS": "2", "SDSERVE_MAX_SIZE": "128", "SDSERVE_MAX_IMAGES": "2",
                "SDSERVE_JOB_TIMEOUT_S": "60"}


def test_schemathesis_finds_no_server_error_or_schema_violation(models_dir, tmp_path):
    server = ServerProcess(models_dir, tmp_path / "data", "--max-batch", "8", env=SMALL_LIMITS).start()
    try:
        cli = Path(sys.executable).parent / "schemathesis"
        run = subprocess.run(
            [str(cli), "run", f"{server.url}/openapi.json",
             "--checks", "not_a_server_error,response_schema_conformance",
             "--max-examples", "25", "--seed", "1", "--generation-database", "none",
             "--workers", "1", "--request-timeout", "60", "--no-color"],
            capture_output=True, text=True, timeout=600, cwd=tmp_path,
        )
        output = run.stdout + run.stderr
        generated = re.search(r"(\d+) generated", output)
        assert run.returncode == 0, output[-6000:]
        assert generated and int(generated.group(1)) >= 1000, output[-3000:]
        assert "Traceback" not in server.log()
    finally:
        server.terminate()
