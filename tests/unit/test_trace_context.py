"""W3C Trace Context as the service reads it from callers (tracing/w3c.py), the job histograms' exemplars
(tasks/metrics.py), and tracing off when no endpoint is set (tracing/setup.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tasks.metrics import INFERENCE_TIME, LocalMetrics, cumulative_buckets, exemplar_of
from tests.support import REPO_ROOT
from tracing import w3c

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (f"00-{TRACE}-{PARENT}-01", f"00-{TRACE}-{PARENT}-01"),
        (f" 00-{TRACE}-{PARENT}-00 ", f"00-{TRACE}-{PARENT}-00"),
        (f"01-{TRACE}-{PARENT}-01-future-fields", f"00-{TRACE}-{PARENT}-01"),  # a later version: its first four
        (f"00-{TRACE}-{PARENT}-01-extra", None),  # version 00 has exactly four fields
        (f"ff-{TRACE}-{PARENT}-01", None),  # version ff is invalid
        (f"00-{'0' * 32}-{PARENT}-01", None),  # all-zero ids are invalid
        (f"00-{TRACE}-{'0' * 16}-01", None),
        (f"00-{TRACE.upper()}-{PARENT}-01", None),  # hex is lowercase
        (f"00-{TRACE[:-1]}-{PARENT}-01", None),
        ("00-" + "a" * 600, None),
        ("", None),
        (None, None),
    ],
)
def test_a_callers_traceparent_is_taken_only_when_valid(header, expected):
    assert w3c.parse(header) == expected


def test_tracestate_is_passed_on_when_well_formed_and_bounded():
    assert w3c.parse_state("vendor=abc, other@tenant=1") == "vendor=abc,other@tenant=1"
    assert w3c.parse_state("Vendor=abc") is None  # keys are lowercase
    assert w3c.parse_state("vendor") is None
    assert w3c.parse_state(",".join(f"k{i}=v" for i in range(33))) is None  # at most 32 members
    assert w3c.parse_state("k=" + "v" * 600) is None
    assert w3c.parse_state(None) is None


def test_context_pieces():
    header = f"00-{TRACE}-{PARENT}-03"
    assert (w3c.trace_id(header), w3c.span_id(header), w3c.sampled(header)) == (TRACE, PARENT, True)
    assert not w3c.sampled(f"00-{TRACE}-{PARENT}-02")
    assert w3c.make(int(TRACE, 16), int(PARENT, 16), 1) == f"00-{TRACE}-{PARENT}-01"


def test_only_a_sampled_trace_becomes_an_exemplar_and_each_bucket_keeps_its_latest(scratch_redis):
    assert exemplar_of(f"00-{TRACE}-{PARENT}-00") is None  # an unsampled trace leads nowhere
    assert exemplar_of(None) is None
    metrics = LocalMetrics()
    later = "1" * 32
    metrics.observe(INFERENCE_TIME, "m", 0.004, exemplar=exemplar_of(f"00-{TRACE}-{PARENT}-01"), at=100.0)
    metrics.observe(INFERENCE_TIME, "m", 0.003, exemplar=later, at=101.0)  # same bucket (0.005): replaces it
    metrics.observe(INFERENCE_TIME, "m", 0.2)  # no trace: its bucket has no exemplar
    pipe = scratch_redis.pipeline()
    assert LocalMetrics.write(pipe, metrics.take())
    pipe.execute()
    from tasks.metrics import read, read_exemplars

    _counters, histograms = read(scratch_redis)
    exemplars = read_exemplars(scratch_redis)
    buckets = cumulative_buckets(
        INFERENCE_TIME, histograms[INFERENCE_TIME]["m"], {b: e for (_n, _l, b), e in exemplars.items()}
    )
    with_exemplar = [bucket for bucket in buckets if len(bucket) == 3]
    assert [(bound, exemplar.labels["trace_id"], exemplar.value) for bound, _count, exemplar in with_exemplar] == [
        ("0.005", later, 0.003)
    ]
    assert buckets[-1] == ("+Inf", 3.0)


def test_without_an_endpoint_the_sdk_is_never_imported():
    code = (
        "import os, sys\n"
        "for name in list(os.environ):\n"
        "    if name.startswith('OTEL_'): del os.environ[name]\n"
        "from tracing.setup import configure\n"
        "from tracing import spans\n"
        "assert configure('api') is False and not spans.on()\n"
        "assert spans.start('x', '00-" + TRACE + "-" + PARENT + "-01') is None\n"
        "assert not any(m.startswith('opentelemetry') for m in sys.modules), sorted(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)


@pytest.mark.parametrize("trust", [True, False])
def test_a_callers_sampled_flag_is_followed_only_when_trusted(trust):
    """AETHERCORE_TRACE_CALLER_SAMPLING: with a ratio of 0 nothing of ours is sampled; a caller's sampled request is
    recorded when its flag is trusted, dropped when it is not (its trace is continued either way)."""
    code = (
        "import os\n"
        "from tracing.setup import configure\n"
        "from tracing import spans\n"
        "env = {'OTEL_EXPORTER_OTLP_ENDPOINT': 'http://127.0.0.1:9', 'OTEL_TRACES_SAMPLER': 'parentbased_traceidratio',"
        " 'OTEL_TRACES_SAMPLER_ARG': '0'}\n"
        "os.environ.update(env)\n"
        f"assert configure('api', os.environ, trust_caller_sampling={trust})\n"
        f"span = spans.start('GET', '00-{TRACE}-{PARENT}-01', root=True, kind='server')\n"
        f"assert span.get_span_context().trace_id == int('{TRACE}', 16)  # continued\n"
        f"assert span.is_recording() is {trust}\n"
        "assert not spans.start('GET', None, root=True).is_recording()  # our own roots: ratio 0\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)


def test_a_ratio_samplers_roots_are_decided_once_by_its_own_rule():
    """A new trace that a ratio sampler would drop is decided without the SDK (tracing/spans.py `Unsampled`); one it
    keeps goes to the SDK with that very trace id, which keeps it: the kept share is the ratio, never its square."""
    code = (
        "import os\n"
        "from opentelemetry.sdk.trace.sampling import TraceIdRatioBased\n"
        "from tracing.setup import configure\n"
        "from tracing import spans\n"
        "os.environ.update({'OTEL_EXPORTER_OTLP_ENDPOINT': 'http://127.0.0.1:9',"
        " 'OTEL_TRACES_SAMPLER': 'parentbased_traceidratio', 'OTEL_TRACES_SAMPLER_ARG': '0.5'})\n"
        "assert configure('api')\n"
        "rule = TraceIdRatioBased(0.5)\n"
        "made = [spans.start('GET', None, root=True, kind='server') for _ in range(400)]\n"
        "kept = [s for s in made if s.is_recording()]\n"
        "assert 120 < len(kept) < 280, len(kept)\n"
        "assert all(isinstance(s, spans.Unsampled) for s in made if not s.is_recording())\n"
        "for span in made:\n"
        "    trace_id = int(spans.traceparent(span)[3:35], 16)\n"
        "    assert span.is_recording() == (trace_id & (2**64 - 1) < rule.bound)  # the SDK's own rule\n"
        "    assert spans.traceparent(span).endswith('-00') != span.is_recording()\n"
        "    spans.end(span, 'boom')  # ends either kind\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)
