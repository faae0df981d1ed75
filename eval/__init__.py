"""Quality evaluation of steered decoding: `python -m eval truthfulqa {mc,gen,sweep} ...`."""
