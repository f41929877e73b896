"""A reward worker process (`python -m qrl_megatron.rewards.worker package.module:function`), driven by
`qrl_megatron.rewards.pool.RewardPool`; the line protocol is described there."""

from __future__ import annotations

import contextlib
import json
import math
import sys
from typing import Any

from qrl_megatron.rewards.pool import RewardError, resolve_function


def serve(fn_path: str) -> None:
    """The worker's loop: the protocol goes over the real stdout; anything the function prints goes to stderr."""
    out = sys.stdout
    sys.stdout = sys.stderr
    try:
        fn = resolve_function(fn_path)
    except RewardError as err:
        out.write(json.dumps({"error": str(err)}) + "\n")
        out.flush()
        return
    with contextlib.suppress(Exception):  # warm up (the verifier imports math-verify on first use) so the first
        fn("", "0")  # real call meets its deadline
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        completion, ground_truth = json.loads(line)
        try:
            value = float(fn(completion, ground_truth))
            reply: dict[str, Any] = {"value": value}
            if not math.isfinite(value):
                reply = {"error": f"reward function {fn_path!r} returned {value} (must be a finite number)"}
        except Exception as err:
            reply = {
                "error": f"reward function {fn_path!r} raised {type(err).__name__}: {err} "
                f"(on completion {completion[:60]!r}, ground truth {ground_truth[:40]!r})"
            }
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    serve(sys.argv[1])
