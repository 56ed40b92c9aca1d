"""Driven by api/benches/overhead.rs (E2B_API_URL, E2B_SANDBOX_URL and
E2B_API_KEY point at its server): attach to the sandbox named on the
command line with the official e2b SDK, say "ready", then for every line
read on stdin run `true` with `commands.run` and print the milliseconds the
call took."""

import sys
import time

from e2b import Sandbox

sandbox = Sandbox.connect(sys.argv[1])
print("ready", flush=True)
for _ in sys.stdin:
    started = time.perf_counter()
    result = sandbox.commands.run("true")
    took = (time.perf_counter() - started) * 1000
    assert result.exit_code == 0, result
    print(f"{took:.3f}", flush=True)
