"""The CTranslate2 engine (--quantize ct2) on a tiny random Llama converted with ctranslate2.

Reference: ctranslate2 alone (``generate_batch`` on the same converted model). Requests that join and
leave between steps must get exactly the tokens they get alone, prompt log-probabilities must be
ctranslate2's scores, and a batch whose requests have all left must free its worker.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest

pytest.importorskip("ctranslate2")

from launcher.weights import CONVERTED_DIR, ResolvedModel, WeightsError, ct2_converted
from shard.backends.ct2 import CT2Backend, ct2_model_dir
from shard.ct2_engine import CT2Engine, length_slack
from shard.engines import make_engine
from shard.types import RequestSpec, SamplingParams

pytestmark = pytest.mark.timeout(180)

PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12, 13, 14, 15, 16], list(range(20, 60)), [40, 41, 42]]


@pytest.fixture(scope="module")
def ct2_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = ResolvedModel("tiny", tiny_model_dir, None, None, "local", "tiny safetensors")
    hub = tmp_path_factory.mktemp("hub")
    return ct2_converted(model, hub, "int8", progress=False).path


@pytest.fixture(scope="module")
def backend(ct2_dir: Path) -> CT2Backend:
    return CT2Backend(ct2_dir, None, threads=1, max_batches=2)


@pytest.fixture
def engine(backend: CT2Backend):
    engine = CT2Engine(backend)
    yield engine
    engine.close()


def alone(backend: CT2Backend, prompt: list[int], n: int) -> list[int]:
    result = backend.generator.generate_batch(
        [backend.to_tokens(prompt)], max_length=n, include_prompt_in_result=False, end_token=[]
    )
    return result[0].sequences_ids[0]


def request(rid: int, prompt: list[int], n: int, **kwargs: object) -> RequestSpec:
    return RequestSpec(id=rid, input_ids=prompt, max_new_tokens=n, **kwargs)  # type: ignore[arg-type]


class Driver:
    """Plays the engine core: runs steps, removes requests once they have their tokens."""

    def __init__(self, engine: CT2Engine) -> None:
        self.engine = engine
        self.tokens: dict[int, list[int]] = {}
        self.limits: dict[int, int] = {}

    def take(self, result) -> None:
        assert not result.failures, result.failures
        for rid, token in zip(result.request_ids, result.token_ids, strict=True):
            self.tokens.setdefault(rid, []).append(token)

    def add(self, requests: list[RequestSpec]) -> None:
        for r in requests:
            self.limits[r.id] = r.max_new_tokens
        assert self.engine.add(requests) == []

    def step(self) -> bool:
        """Removes the requests that have their tokens, then one step; False when none was left."""
        done = [rid for rid, n in self.limits.items() if len(self.tokens.get(rid, [])) >= n]
        self.engine.remove(done)
        for rid in done:
            del self.limits[rid]
        if not self.limits:
            return False
        self.take(self.engine.step())
        return True


def test_converted_layout_and_cache(ct2_dir: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    assert ct2_model_dir(ct2_dir) == ct2_dir / "ct2"
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (ct2_dir / name).is_file()
    assert (ct2_dir / "ct2" / "model.bin").is_file()
    assert CONVERTED_DIR.as_posix() in ct2_dir.as_posix()
    # The second conversion of the same model and compute type is the cached entry, untouched.
    hub = ct2_dir.parents[2]
    model = ResolvedModel("tiny", tiny_model_dir, None, None, "local", "tiny safetensors")
    mtime = (ct2_dir / "ct2" / "model.bin").stat().st_mtime_ns
    again = ct2_converted(model, hub, "int8", progress=False)
    assert again.path == ct2_dir and (ct2_dir / "ct2" / "model.bin").stat().st_mtime_ns == mtime
    assert "CTranslate2 int8" in again.weights
    other = ct2_converted(model, hub, "int8_float32", progress=False)  # another compute type: its own
    assert other.path != ct2_dir
    with pytest.raises(WeightsError, match="CTranslate2"):
        broken = tmp_path / "broken"
        broken.mkdir()
        (broken / "config.json").write_text('{"model_type": "nothing-ct2-knows"}')
        ct2_converted(ResolvedModel("broken", broken, None, None, "local", "x"), hub, "int8", progress=False)


def test_info(backend: CT2Backend) -> None:
    info = backend.info
    assert info.name == "ct2" and info.dtype == "int8" and info.device_type == "cpu"
    assert info.eos_token_ids and info.max_position_embeddings == 512
    assert {"typical_p", "seed", "logit_bias", "min_p"} <= set(info.unsupported_parameters)


def test_joining_and_leaving_give_the_tokens_of_ctranslate2_alone(
    engine: CT2Engine, backend: CT2Backend
) -> None:
    driver = Driver(engine)
    driver.add([request(1, PROMPTS[0], 12), request(2, PROMPTS[1], 6)])
    assert not engine.running and engine.num_waiting() == 2  # the group starts in the next step
    driver.step()
    # Close lengths: one batch. ctranslate2 runs the shorter prompt at once and feeds the longer one's
    # last 2 tokens one per step: request 2 is held without a token until then.
    assert set(driver.tokens) == {1} and set(engine.rows) == {1, 2}
    assert len(engine.running) == 1 and engine.num_waiting() == 0
    driver.step()
    driver.step()
    assert set(driver.tokens) == {1, 2}
    driver.add([request(3, PROMPTS[2], 8), request(4, PROMPTS[3], 9)])
    while driver.step():
        pass
    for rid, prompt, n in ((1, PROMPTS[0], 12), (2, PROMPTS[1], 6), (3, PROMPTS[2], 8), (4, PROMPTS[3], 9)):
        assert driver.tokens[rid] == alone(backend, prompt, n), rid
    assert not engine.rows and not engine.waiting
    deadline = time.monotonic() + 10
    while engine.running and time.monotonic() < deadline:  # the last jobs end as their rows left
        engine._release_closing()
        time.sleep(0.05)
    assert not engine.running


def test_a_new_batch_waits_for_a_free_worker(engine: CT2Engine, backend: CT2Backend) -> None:
    # max_batches is 2: the third group (different options, so a group of its own) waits.
    for r in (
        request(1, PROMPTS[0], 50),
        request(2, PROMPTS[0], 50, top_n_tokens=2),
        request(3, PROMPTS[3], 5, params=SamplingParams(repetition_penalty=1.2)),
    ):
        assert engine.add([r]) == []
    result = engine.step()
    assert sorted(result.request_ids) == [1, 2] and not result.failures
    assert len(engine.running) == 2 and engine.num_waiting() == 1 and set(engine.rows) == {1, 2, 3}
    # Request 1 leaves: its group ends, request 3 starts in the same step.
    engine.remove([1])
    result = engine.step()
    assert sorted(result.request_ids) == [2, 3] and not result.failures
    assert engine.num_waiting() == 0 and set(engine.rows) == {2, 3}
    engine.clear()
    assert not engine.rows and not engine.waiting


def test_prompt_logprobs_top_tokens_and_sampling(engine: CT2Engine, backend: CT2Backend) -> None:
    sampled = SamplingParams(do_sample=True, temperature=0.7, top_k=20, top_p=0.9, seed=3)
    refused = engine.add(
        [
            request(1, PROMPTS[1], 3, prefill_logprobs=True, top_n_tokens=3),
            request(2, PROMPTS[0], 3, params=sampled),
        ]
    )
    assert refused == []
    result = engine.step()
    assert sorted(result.request_ids) == [1, 2]
    (prompt,) = result.prefill
    scores = backend.generator.score_batch([backend.to_tokens(PROMPTS[1])])[0].log_probs
    assert prompt.ids == PROMPTS[1] and math.isnan(prompt.logprobs[0])
    assert prompt.logprobs[1:] == pytest.approx(list(scores), abs=1e-5)
    row = result.request_ids.index(1)
    assert result.top_n == 3
    top_ids = result.top_ids[row * 3 : row * 3 + 3]
    top_logprobs = result.top_logprobs[row * 3 : row * 3 + 3]
    assert top_ids[0] == result.token_ids[row]  # greedy: the chosen token is the most likely one
    assert top_logprobs == sorted(top_logprobs, reverse=True)
    assert result.logprobs[row] == pytest.approx(top_logprobs[0], abs=1e-4)
    result = engine.step()
    assert sorted(result.request_ids) == [1, 2]
    assert all(0 <= t < backend.info.vocab_size for t in result.token_ids)
    assert all(lp <= 0 for lp in result.logprobs)


def test_unknown_ids_are_refused_or_ignored(engine: CT2Engine) -> None:
    refused = engine.add([request(1, PROMPTS[0], 5), request(2, [10**6], 5)])
    assert [f.request_id for f in refused] == [2] and "vocabulary" in refused[0].message
    assert set(engine.rows) == {1}
    assert engine.step().request_ids == [1]
    engine.remove([1, 99])  # an id it does not hold is ignored
    engine.remove([1])  # so is one it has already let go
    assert not engine.rows
    result = engine.step()
    assert result.request_ids == [] and not result.failures
    engine.clear()
    assert not engine.rows and not engine.waiting


def test_length_slack() -> None:
    assert length_slack(5) == 8 and length_slack(400) == 50


def test_requests_that_want_top_tokens_each_finish(backend: CT2Backend) -> None:
    """With the step's logits on (top_n_tokens), ctranslate2 does not report a batch's rows in lock step:
    each such request runs in a group of its own, and two of them with one prompt both finish."""
    from shard.core import FINISH_LENGTH, EngineCore

    engine = make_engine(backend)
    assert isinstance(engine, CT2Engine)
    try:
        core = EngineCore(engine)
        core.add([request(i, [5, 6, 7, 8], 3, top_n_tokens=2) for i in range(2)])
        ended: dict[int, int] = {}
        for _ in range(20):
            if not core.live:
                break
            out = core.step()
            for rid, reason in zip(out.result.request_ids, out.finish_reasons, strict=True):
                if reason:
                    ended[rid] = reason
        assert ended == {0: FINISH_LENGTH, 1: FINISH_LENGTH}
    finally:
        engine.close()
