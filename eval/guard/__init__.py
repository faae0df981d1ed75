"""Guard behaviours (tone, insults, ...): does FASB fix the answers that go wrong and leave the rest alone?"""
