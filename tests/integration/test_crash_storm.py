"""A crash storm: workers SIGKILLed one after another under load. Every job ends, none is failed as poison,
and each has exactly one `done` event. The broker's visibility timeout is left at 300 s, so what brings the
jobs back within seconds is the reaper (workers/reaper.py), not the broker."""

import pytest

from bench.storm import Storm

pytestmark = pytest.mark.slow


def test_a_storm_of_worker_kills_loses_no_job_and_fails_none_as_poison():
    storm = Storm(
        jobs=200,
        clients=8,
        workers=2,
        kill_every=1.5,
        kills=8,
        model="minilm-onnx",
        poison=False,
        grace=45,
        visibility_timeout=300,
    )
    result = storm.run()
    print("\n" + "\n".join(result.lines()))
    assert result.kills == 8
    assert result.submitted == 200 and not result.client_errors
    assert result.never_ended == 0, result.outcomes
    assert result.outcomes["succeeded"] == 200, result.outcomes
    assert result.duplicate_done_events == 0
