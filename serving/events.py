"""A finished engine request as the wire event the trainer learns from (streams.schema.TokenEvent).

Pure conversion, no I/O: the serving shim calls it after a request finishes and hands the result to
the streams producer off the request path; tests and benchmarks call it on engine runs directly.
"""
from __future__ import annotations

import numpy as np

from serving.engine import FinishedRequest
from streams.schema import ModelRef, Sampling, TokenEvent

# The engine's finish reasons, spelled as the schema spells them.
_FINISH = {"stop": "stop", "length": "length", "abort": "cancelled", "error": "error"}


def drafter_ref(name: str, version: str) -> ModelRef:
    """How a drafter appears in events: name "draft-lm" + version "7" -> ModelRef("draft-lm", "7")."""
    return ModelRef(name, version)


def event_from_finished(fin: FinishedRequest, replica_id: str, target: ModelRef) -> TokenEvent:
    """The TokenEvent for `fin`: every step names the drafter version that proposed it.

    A request that lived across a hot swap lists both versions in `drafters`, in the order they
    first served it; `step_drafter` indexes that list.
    """
    refs: list[ModelRef] = []
    index: dict[ModelRef, int] = {}
    step_drafter = np.empty(len(fin.steps), dtype=np.int32)
    for s, rec in enumerate(fin.steps):
        ref = drafter_ref(rec.drafter, rec.drafter_version)
        if ref not in index:
            index[ref] = len(refs)
            refs.append(ref)
        step_drafter[s] = index[ref]
    if not refs:  # aborted before its first step: the schema still wants a drafter row
        refs.append(drafter_ref("none", "0"))
    p = fin.params
    return TokenEvent(
        request_id=fin.request_id,
        replica_id=replica_id,
        target=target,
        drafters=tuple(refs),
        prompt_ids=np.asarray(fin.prompt_ids, dtype=np.int32),
        output_ids=np.asarray(fin.output_ids, dtype=np.int32),
        step_proposed=np.fromiter((r.proposed for r in fin.steps), dtype=np.int32, count=len(fin.steps)),
        step_accepted=np.fromiter((r.accepted for r in fin.steps), dtype=np.int32, count=len(fin.steps)),
        step_drafter=step_drafter,
        topk_ids=fin.topk_ids.numpy(),
        topk_logprobs=fin.topk_logprobs.numpy(),
        sampling=Sampling(p.temperature, p.top_k, p.top_p, p.max_new_tokens, p.seed),
        finish_reason=_FINISH.get(fin.finish_reason, "error"),
        domain=fin.domain,
        ttft_s=fin.ttft_s,
        total_s=fin.total_s,
    )
