"""serve under bounded load from a second process on loopback: 80 requests, 8 at a time, base and
two adapters, chat and completions, streamed and not, 15% malformed. Every valid request gets the
answer it gets alone (the right adapter's), every malformed one a JSON error, and the server
stays up. bench/serve_load.py runs 200 and prints p50/p99 latency."""
from __future__ import annotations

import pytest

from serve_load_driver import (_http, build_models, expected_answers, request_mix, run_load, start_server,
                               stop_server)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model, adapters = build_models(tmp_path_factory.mktemp("load"))
    proc, port = start_server(model, adapters)
    yield proc, port
    log = stop_server(proc)
    assert "Traceback" not in log, log[-3000:]


def test_serve_holds_under_load(server):
    proc, port = server
    requests = request_mix(80, seed=1)
    expected = expected_answers(port, requests)
    # the adapters really answer differently, so a request served by the wrong one would show
    for kind, prompt in {(k[0], k[2]) for k in expected}:
        answers = {expected[(kind, m, prompt)] for m in ("base", "sql", "poem") if (kind, m, prompt) in expected}
        if len(answers) > 1:
            break
    else:
        pytest.fail("base and adapters give the same answers: the test could not see a mix-up")
    rep = run_load(port, requests, expected, concurrency=8)
    assert rep.malformed >= 5 and rep.valid >= 50, rep.line()
    assert not rep.wrong, (rep.line(), rep.wrong[:3])
    assert proc.poll() is None and _http(port, "GET", "/health")[0] == 200
