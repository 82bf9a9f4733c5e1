"""Mutation fuzzing, bounded: a few thousand mutated frame sequences against real mTLS split servers.

The corpus is what a real client sends (tests/fuzz_core.py records it); the cases mutate bodies,
PayloadMeta, tensor data, blosc2 headers, frame fields, frame order and the serialized bytes.
Asserted: every case is answered (its probe's reply or the stream's status: no hang), no answer
is INTERNAL or UNKNOWN (an unhandled exception on the server), no reply is malformed, the server
logs no traceback, and afterwards it serves FORWARD and INFER with the same results as before.
The long run is ``benchmarks/fuzz.py`` (a server in its own process, 100,000 cases, RSS).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_split.channel import ChannelConfig, client_tls, make_certs
from lightning_split.split.connect import open_split
from lightning_split.split.spec import SplitSpec
from tests import fuzz_core as fc

CASES = int(os.environ.get("LS_FUZZ_CASES", "1500"))  # the long run: benchmarks/fuzz.py
SEED = int(os.environ.get("LS_FUZZ_SEED", "20240"))
WORKERS = 2
DEADLINE_S = 15.0


def _well_formed_results(address: str, tls: Any, kind: str) -> dict[str, torch.Tensor]:
    """FORWARD (training call, frozen tail) and INFER (greedy generation) through a fresh session."""
    spec = SplitSpec(**fc.KINDS[kind].spec)
    remote = open_split(address, fc.NODE, tls, source=fc.model_source(), spec=spec, tail={"mode": "frozen"},
                        config=ChannelConfig(connections=1))
    try:
        g = torch.Generator().manual_seed(7)
        ids = torch.randint(0, 128, (2, 9), generator=g)
        mask = torch.ones_like(ids)
        mask[0, :3] = 0
        model = remote.model
        model.train()
        for p in model.parameters():
            p.grad = None
        kw = {"labels": ids, "result": "logits"} if spec.shape == "two_part" else {}
        out = model(input_ids=ids, attention_mask=mask, **kw)
        out.logits.sum().backward()  # FORWARD, then BACKWARD
        grad = model.get_input_embeddings().weight.grad.clone()
        model.eval()
        with torch.no_grad():  # INFER with the server's KV cache
            tokens = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        return {"forward": out.logits.detach(), "grad": grad, "tokens": tokens, "infer": logits}
    finally:
        remote.close()


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.filterwarnings("ignore:.*fan_in_fan_out.*")  # peft, on the LoRA sessions
def test_fuzz_server(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    # lightning_split logs an internal error in one ERROR line, its traceback at DEBUG: capture both.
    caplog.set_level(logging.DEBUG, logger="lightning_split")
    refs = fc.LogRefs()  # error references in short INTERNAL replies -> what the server logged
    ref_handler = refs.handler()
    logging.getLogger("lightning_split").addHandler(ref_handler)
    pki = tmp_path / "pki"
    make_certs(pki, client_ids=fc.client_ids(WORKERS))
    tls = client_tls(pki, fc.NODE)
    servers = {kind: fc.make_server(kind, pki, tmp_path / "state") for kind in fc.KINDS}
    try:
        targets, before = [], {}
        for kind, server in servers.items():
            address = f"127.0.0.1:{server.start()}"
            before[kind] = _well_formed_results(address, tls, kind)
            targets.append(fc.Target(kind, address, pki, fc.build_corpus(address, tls, kind),
                                     bool(fc.KINDS[kind].channel.get("checksum"))))
        stats = fc.run_cases(targets, CASES, seed=SEED, workers=WORKERS, deadline_s=DEADLINE_S, resolver=refs)
        after = {kind: _well_formed_results(t.address, tls, kind) for kind, t in zip(servers, targets, strict=True)}
    finally:
        for server in servers.values():
            server.stop(grace=0)
        logging.getLogger("lightning_split").removeHandler(ref_handler)

    problems = []
    if stats.harness_errors:  # the fuzzer's own bugs: its cases did not run
        problems.append(f"{sum(stats.harness_errors.values())} case(s) not built (fuzzer errors):")
        problems += [f"  x{n} {tb}" for tb, n in stats.harness_errors.items()]
    bad = [f for f in stats.findings.values()
           if f["code"] in fc.BAD_CODES or f["kind"] in ("bad_reply", "reply_count", "oversized_status")]
    hangs = [f for f in stats.findings.values() if f["kind"] == "hang"]
    if hangs:
        problems.append(f"{stats.hangs} case(s) hung (no reply, no status within {DEADLINE_S} s):")
        problems += ["  " + line for f in hangs for line in
                     [f"{f['details']} x{f['count']}", *fc.describe(f["case"]).splitlines()]]
    if bad:
        n = sum(f["count"] for f in bad)
        problems.append(f"{n} INTERNAL/UNKNOWN answer(s), malformed/missing replies or undeliverable statuses, "
                        f"{len(bad)} distinct:")
        for f in sorted(bad, key=lambda f: -f["count"]):
            problems.append(f"  {f['kind']} {f['code']} x{f['count']}: {f['details'][:300]}")
            problems += ["    " + line for line in fc.describe(f["case"]).splitlines()]
    for kind in before:
        for name, value in before[kind].items():
            if value.shape != after[kind][name].shape or not torch.allclose(value.float(), after[kind][name].float(),
                                                                             atol=1e-5, rtol=1e-5):
                problems.append(f"{kind}: the well-formed {name} changed after fuzzing")
    tracebacks = caplog.text.count("Traceback")
    if tracebacks:
        problems.append(f"{tracebacks} traceback(s) in the server log:")
        problems += [f"  x{n} {site}" for site, n in fc.traceback_summary(caplog.text).most_common()]
    statuses = ", ".join(f"{k} {v}" for k, v in stats.statuses.most_common())
    assert not problems, (f"{stats.cases} cases in {stats.seconds:.1f} s; statuses: {statuses}\n"
                          + "\n".join(problems))
