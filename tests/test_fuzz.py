"""Short fuzz run (hypothesis, mutated real files): the GGUF reader, safetensors reading and the
JSONL loader return or raise the project's one-line UserError, never anything else. The long
run (10,000 inputs per target, counts printed) is bench/fuzz.py."""
from __future__ import annotations

import signal

import pytest
from hypothesis import HealthCheck, given, settings

from fuzz_targets import Targets, mutated, run

EXAMPLES = 100  # per target; derandomized, so a CI failure reproduces locally


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    t = Targets(tmp_path_factory.mktemp("fuzz"))
    t.tokenizer()  # loaded once, outside the per-input time limit
    return t


def _alarm(signum, frame):
    raise TimeoutError("hang: one input took over 10 CPU seconds")


@pytest.mark.parametrize("name", ["gguf", "safetensors", "adapter", "jsonl"])
def test_fuzz_reader(targets, name):
    fn, seeds = targets.by_name()[name]
    outcomes = {"ok": 0, "error": 0}

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(data=mutated(targets.seeds(seeds)))
    def check(data):
        old = signal.signal(signal.SIGPROF, _alarm)
        signal.setitimer(signal.ITIMER_PROF, 10)  # CPU seconds: a busy machine is no hang
        try:
            outcomes[run(fn, data)] += 1
        finally:
            signal.setitimer(signal.ITIMER_PROF, 0)
            signal.signal(signal.SIGPROF, old)

    check()
    assert outcomes["error"] > EXAMPLES // 10, outcomes  # the mutations do reach the validation
