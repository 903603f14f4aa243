"""Stop strings: a row ends once its new text contains one of them, as transformers'
`stop_strings` and vLLM's `stop` do. Stops are text, so matching them needs the tokenizer: a
stop may span several tokens, or end inside one, so it is looked for in the decoded text, never
in token ids. The row's tokens keep the token that completed the stop (as an EOS token is
kept); its text is cut before the stop (the stop itself excluded, as in vLLM)."""
from ..ops._checks import fail


def new_text(tokenizer, prompt, tokens):
    """The text the new tokens add after the prompt (decoding them alone can lose context,
    such as the leading space a llama2.c tokenizer drops after BOS)."""
    return tokenizer.decode(prompt + tokens)[len(tokenizer.decode(prompt)):]


def check_stop(stop, tokenizer):
    """stop as a list of non-empty strings (a single string is one stop), or None."""
    if stop is None:
        return None
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, (list, tuple)) or not stops or not all(
            isinstance(s, str) and s for s in stops):
        fail("stop", "a non-empty string or a non-empty list of them", stop)
    if tokenizer is None:
        fail("tokenizer", "a tokenizer (lsk.load_tokenizer) to match stop strings", None)
    return list(stops)


def cut_at_stop(text, stops):
    """text up to the earliest occurrence of any stop (the stop excluded); all of it if none."""
    ends = [i for i in (text.find(s) for s in stops or ()) if i >= 0]
    return text[:min(ends)] if ends else text


class StopStrings:
    """Whether a row's new text contains a stop yet. Outputs asks after every kept token, in
    order, whatever the strategy: a self-speculative round's accepted tokens are checked one by
    one, so greedy self-speculation stops exactly where autoregressive decoding does."""

    def __init__(self, tokenizer, stops, prompts):
        self.tokenizer, self.stops, self.prompts = tokenizer, stops, prompts
        self.longest = max(len(s) for s in stops)
        self.prompt_chars = [len(tokenizer.decode(p)) for p in prompts]
        self.searched = [0] * len(prompts)  # new-text characters already free of any stop

    def hit(self, row, tokens):
        """True when the new text of `tokens` (the row's new tokens so far) holds a stop. Only
        its tail is searched: a stop found now ends within the text the last token added, so
        it starts at most len(longest stop) - 1 characters before that."""
        text = self.tokenizer.decode(self.prompts[row] + tokens)[self.prompt_chars[row]:]
        start = max(0, self.searched[row] - self.longest + 1)
        # A trailing U+FFFD may be a character whose bytes have not all come yet: search it again.
        self.searched[row] = len(text.rstrip("\ufffd"))
        return any(s in text[start:] for s in self.stops)
