"""Drive an in-process Engine the way the HTTP layer does, and replay its events."""

from __future__ import annotations

from dataclasses import dataclass, field

from server.engine.types import Finished, GenerationRequest, Retraction, SamplingParams, SteeringParams, TextDelta


@dataclass
class Replay:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    retractions: list[Retraction] = field(default_factory=list)
    finished: Finished | None = None
    deltas: int = 0

    @property
    def backtracks(self) -> list[tuple[int, int]]:
        report = self.finished.steering
        return [(b.token_index, b.tokens_retracted) for b in report.backtracks] if report else []


async def collect(engine, prompt_ids, steering: SteeringParams | None = None, request_id: str = "test",
                  **sampling) -> Replay:
    """Run one request to the end, applying retractions exactly as a client would."""
    sampling.setdefault("temperature", 0.0)
    request = GenerationRequest(request_id, list(prompt_ids), SamplingParams(**sampling), steering)
    replay = Replay()
    async for event in engine.submit(request):
        if isinstance(event, TextDelta):
            replay.text += event.text
            replay.token_ids += event.token_ids
            replay.deltas += 1
        elif isinstance(event, Retraction):
            assert replay.text.endswith(event.text), "a retraction must delete a suffix of what was sent"
            replay.text = replay.text[: len(replay.text) - len(event.text)]
            del replay.token_ids[len(replay.token_ids) - event.sent_tokens :]
            replay.retractions.append(event)
        else:
            replay.finished = event
    return replay
