"""The Helm SDK (helm-python-sdk) in a process of its own, as the helm binary would be.

The SDK loads Helm's Go runtime into the calling process. In a test process that has already run OpenVINO graphs
(the engine's default on a CPU), the Go runtime crashed it with a segfault at the first chart call. So each call runs
`python tests/helm_sdk.py` with the request as JSON on stdin and the answer as JSON on stdout; a values error comes
back as HelmValuesError with Helm's message."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


class HelmValuesError(ValueError):
    """The chart's values schema refused the values (helm_python.HelmValuesError, across the process line)."""


def _call(request: dict) -> dict:
    done = subprocess.run([sys.executable, str(Path(__file__).resolve())], input=json.dumps(request),
                          capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"helm SDK process failed ({done.returncode}):\n{done.stderr[-3000:]}")
    answer = json.loads(done.stdout)
    if "values_error" in answer:
        raise HelmValuesError(answer["values_error"])
    return answer["result"]


def lint(chart: str, values: dict | None, strict: bool = True) -> dict:
    return _call({"call": "lint", "chart": chart, "values": values, "strict": strict})


def render(chart: str, values: dict | None, name: str, namespace: str) -> dict[str, str]:
    return _call({"call": "render", "chart": chart, "values": values, "name": name, "namespace": namespace})


def _serve() -> None:
    import helm_python as helm

    request = json.load(sys.stdin)
    try:
        if request["call"] == "lint":
            result = helm.lint(request["chart"], request["values"], strict=request["strict"])
        else:
            with helm.Chart.load(request["chart"]) as chart:
                result = dict(chart.render(request["values"], name=request["name"], namespace=request["namespace"]))
    except helm.HelmValuesError as exc:
        print(json.dumps({"values_error": str(exc)}))
        return
    print(json.dumps({"result": result}))


if __name__ == "__main__":
    _serve()
