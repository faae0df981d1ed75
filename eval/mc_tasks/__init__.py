"""Multiple-choice tasks (COPA, SNLI, MMLU, WinoGrande, or a JSONL set): accuracy rows on an
artifact's held-out items, with ITI / FASB values chosen on its validation items."""
