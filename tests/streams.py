"""What a correction-aware client shows for a recorded chat stream (README "Streaming corrections"):
deltas appended, each retraction's `retract_text` deleted from the end first."""


def shown_text(chunks: list[dict]) -> str:
    """`chunks`: the parsed `data:` payloads of one chat completion stream, in order."""
    text = ""
    for chunk in chunks:
        for choice in chunk["choices"]:
            steering = choice.get("steering") or {}
            if steering.get("type") == "retract":
                assert text.endswith(steering["retract_text"])
                text = text[: len(text) - len(steering["retract_text"])]
            text += choice["delta"].get("content") or ""
    return text
