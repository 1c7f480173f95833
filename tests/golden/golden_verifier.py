def letter_share(completion, answer):
    text = completion.lower()
    return sum(c in "aeiou" for c in text) / max(1, len(text))
