"""`serve`: one inference request, its result printed (or its chunks, as they are generated)."""

from __future__ import annotations

import json
from typing import Any

import requests
import typer

from cli.common import client, console, fail, print_json
from tasks.states import FAILED, SUCCEEDED


def serve(
    model_id: str,
    text: str | None = typer.Option(None, help="Input text"),
    inputs: str | None = typer.Option(None, help="Inputs as JSON (for tensor models)"),
    max_length: int | None = typer.Option(None, help="Truncation length or new-token budget"),
    wait: float = typer.Option(60, help="Seconds to wait for the result"),
    stream: bool = typer.Option(False, "--stream", help="Print chunks as they are generated"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Run one inference request and print its result."""
    if (text is None) == (inputs is None):
        fail("give exactly one of --text or --inputs", 2)
    try:
        parsed_inputs = {"text": text} if text is not None else json.loads(inputs or "{}")
    except ValueError:
        fail("--inputs is not valid JSON", 2)
    payload: dict[str, Any] = {"model_id": model_id, "inputs": parsed_inputs, "parameters": {}}
    if max_length is not None:
        payload["parameters"]["max_length"] = max_length
    if stream:
        return _serve_stream(payload)
    with console.status(f"serving {model_id}..."):
        status, job = client().request("POST", "/serve", params={"wait": wait}, json=payload)
    if as_json:
        return print_json(job)
    if job["status"] == FAILED:
        fail(f"{job['error']['code']}: {job['error']['message']}")
    if status == 202:
        console.print(f"job {job['job_id']} is still {job['status']}; poll GET /jobs/{job['job_id']}")
        return
    result = job["result"]
    output = dict(result["output"])
    if "embedding" in output:
        vector = output["embedding"]
        output["embedding"] = f"[{', '.join(f'{v:.4f}' for v in vector[:6])}, ...] ({len(vector)} floats)"
    console.print(
        f"[bold]{model_id}[/bold] on {result['worker']} ({result['device']}), "
        f"queue {result['timings']['queue_ms']} ms, inference {result['timings']['inference_ms']} ms"
    )
    print_json(output)


def _serve_stream(payload: dict[str, Any]) -> None:
    """Submit, then follow the job's Server-Sent Events, printing each chunk as it arrives."""
    api = client()
    _, job = api.request("POST", "/serve", json=payload)
    url = f"{api.base_url}/jobs/{job['job_id']}/stream"
    event = None
    try:
        with requests.get(url, stream=True, timeout=(5, 120), headers=api.headers) as response:
            for line in response.iter_lines(decode_unicode=True):
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    data = json.loads(line[6:])
                    if event == "chunk":
                        piece = data.get("text")
                        console.print(
                            piece if piece is not None else json.dumps(data.get("output", data)),
                            end="",
                            soft_wrap=True,
                            highlight=False,
                            markup=False,
                        )
                    elif event == "error":
                        console.print()
                        fail(f"{data['error']['code']}: {data['error']['message']}")
                    elif event == "done":
                        console.print()
                        finished = data["job"]
                        if finished["status"] != SUCCEEDED:
                            fail(f"job ended {finished['status']}")
                        return
    except requests.RequestException as exc:
        fail(f"the stream {url} broke off: {type(exc).__name__}")
