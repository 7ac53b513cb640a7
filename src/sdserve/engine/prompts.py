"""Prompts as A1111 reads them: prompt editing and alternation, emphasis, BREAK, any length, clip skip.

- `schedule` reads A1111's prompt editing (`[from:to:when]`, `[to:when]`, `[from::when]`) and alternation
  (`[a|b|c]`), nested in each other and in emphasis, into the plain prompts a pass uses and the step each
  one ends at. `when` is a fraction of the steps when it has a decimal point, else a step number; a hires pass
  counts on from the first (`1.5`, or the first pass's steps plus n). A prompt the grammar cannot read is one
  plain prompt, as in A1111.

- `parse_attention` reads A1111's emphasis grammar: `(word)` x1.1, `((word))` x1.21, `(word:1.3)`, `[word]`
  /1.1, the escapes `\\(` `\\)` `\\[` `\\]` `\\\\`, and `BREAK`. It returns A1111's own (text, weight) runs.
- `chunk` turns those runs into 75-token chunks the way A1111 does: `BREAK` starts a new chunk, a chunk that
  fills up mid-phrase moves the words after its last comma (within 20 tokens) into the next one, and each
  chunk becomes `<start> 75 tokens <end>` padded with the end token. A prompt over 75 tokens is several
  chunks, encoded one by one and concatenated, so nothing after token 77 is lost.
- `PromptEncoder` encodes a batch of prompts to the UNet's conditioning: each chunk through the text encoder
  (with clip skip: the hidden state `clip_skip` layers from the end, through the final layer norm), each token
  scaled by its weight and the chunk rescaled to its original mean (A1111's "Original" emphasis, per prompt),
  and every row padded with empty chunks to the batch's longest, so prompts of any length share one pass.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

CHUNK = 75  # prompt tokens per chunk; with start and end tokens, CLIP's 77
ENCODE_ROWS = 64  # prompts through the text encoder at once (a batch's schedules may hold hundreds)
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack default
BREAK = ("BREAK", -1.0)

_ROUND, _SQUARE = 1.1, 1 / 1.1
# One lexeme of the grammar: an escape, an opening bracket, a weighted close `:1.3)`, a close, plain text,
# or a stray colon. Plain text never contains brackets, backslashes or colons.
_LEXEME = re.compile(r"\\[()\[\]\\]?|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|\]|[^\\()\[\]:]+|:", re.DOTALL)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.DOTALL)


def parse_attention(text: str) -> list[tuple[str, float]]:
    """A1111's emphasis: the prompt as runs of (text, weight); `BREAK` is the run ("BREAK", -1).
    Unclosed brackets apply to the end of the prompt; adjacent runs of equal weight are merged."""
    runs: list[list[Any]] = []
    rounds: list[int] = []  # where each open bracket's text starts in `runs`
    squares: list[int] = []

    def scale(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    for match in _LEXEME.finditer(text):
        lexeme, weight = match.group(0), match.group(1)
        if lexeme.startswith("\\"):
            # `\(` is a literal bracket; a backslash before anything else is dropped, as A1111 does.
            runs.append([lexeme[1:], 1.0])
        elif lexeme == "(":
            rounds.append(len(runs))
        elif lexeme == "[":
            squares.append(len(runs))
        elif weight is not None and rounds and _number(weight) is not None:
            scale(rounds.pop(), _number(weight))
        elif lexeme == ")" and rounds:
            scale(rounds.pop(), _ROUND)
        elif lexeme == "]" and squares:
            scale(squares.pop(), _SQUARE)
        else:
            for i, part in enumerate(_BREAK.split(lexeme)):
                if i:
                    runs.append(list(BREAK))
                runs.append([part, 1.0])
    for start in rounds:
        scale(start, _ROUND)
    for start in squares:
        scale(start, _SQUARE)
    if not runs:
        return [("", 1.0)]
    merged: list[list[Any]] = [runs[0]]
    for run in runs[1:]:
        if run[1] == merged[-1][1]:
            merged[-1][0] += run[0]
        else:
            merged.append(run)
    return [(t, w) for t, w in merged]


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:  # `(a:1.2.3)`: not a weight; A1111 raises, we keep it as text
        return None


@dataclass
class Chunk:
    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


def chunk(runs: Sequence[tuple[str, float]], tokenize, comma: int | None, start: int, end: int,
          pad: int | None = None) -> list[Chunk]:
    """A1111's chunking of parsed runs: `tokenize(texts)` gives each run's token ids (no start/end); each
    chunk comes back as 77 ids `<start> ... <end> <pad>...` with a weight per id. `pad` is the id after the
    end token (SD 2's OpenCLIP pads with `!`; SD 1 with the end token)."""
    pad = end if pad is None else pad
    chunks: list[Chunk] = []
    current = Chunk()
    last_comma = -1

    def close() -> None:
        nonlocal current, last_comma
        fill = CHUNK - len(current.tokens)
        ids = [start, *current.tokens, end] + [pad] * fill
        chunks.append(Chunk(ids, [1.0, *current.weights, 1.0] + [1.0] * fill))
        current, last_comma = Chunk(), -1

    texts = [t for t, _ in runs]
    for (text, weight), ids in zip(runs, tokenize(texts)):
        if (text, weight) == BREAK:
            close()
            continue
        for token in ids:
            if token == comma:
                last_comma = len(current.tokens)
            elif len(current.tokens) == CHUNK and last_comma != -1 and CHUNK - last_comma <= COMMA_BACKTRACK:
                # Full mid-phrase: the words after the last comma move to the next chunk together.
                moved = Chunk(current.tokens[last_comma + 1:], current.weights[last_comma + 1:])
                current = Chunk(current.tokens[:last_comma + 1], current.weights[:last_comma + 1])
                close()
                current = moved
            if len(current.tokens) == CHUNK:
                close()
            current.tokens.append(token)
            current.weights.append(weight)
    if current.tokens or not chunks:
        close()
    return chunks


# --- prompt editing and alternation ---------------------------------------------------------------------------

_NUMBER = re.compile(r"\s*([+-]?(?:\d+\.?\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?))\s*")


class _Unreadable(Exception):
    """The text is not in the grammar here: at the top level its brackets are plain text; nested, the
    enclosing bracket is."""


@dataclass
class _Scheduled:
    before: list[Any]  # empty for `[to:when]`
    after: list[Any]
    number: str


@dataclass
class _Alternate:
    options: list[list[Any]]


class _ScheduleParser:
    """A1111's prompt grammar (emphasis, editing, alternation) as nested lists of text and nodes. Emphasis is
    kept as text: it is read later (`parse_attention`), from whatever prompt a step uses."""

    MAX_DEPTH = 64  # brackets nested deeper are outside the grammar here (and never a Python recursion error)

    def __init__(self, text: str) -> None:
        self.text = text
        self.depth = 0

    def parse(self) -> list[Any]:
        items, pos = self._sequence(0, "", top=True)
        return items

    def _sequence(self, pos: int, stops: str, top: bool = False) -> tuple[list[Any], int]:
        text, items = self.text, []
        while pos < len(text) and text[pos] not in stops:
            c = text[pos]
            if c == "\\":
                if pos + 1 == len(text):
                    raise _Unreadable  # a lone trailing backslash is outside the grammar
                items.append(text[pos:pos + 2])
                pos += 2
            elif c in "([":
                try:
                    self.depth += 1
                    if self.depth > self.MAX_DEPTH:
                        raise _Unreadable
                    node, pos = (self._round if c == "(" else self._square)(pos + 1)
                    items.extend(node) if isinstance(node, list) else items.append(node)
                except _Unreadable:
                    if not top:
                        raise
                    items.append(c)  # a stray bracket: plain text, as A1111's top level allows
                    pos += 1
                finally:
                    self.depth -= 1
            elif c in ")]:":
                if not top:
                    raise _Unreadable
                items.append(c)
                pos += 1
            elif c == "|":
                raise _Unreadable  # `|` outside an alternation: the whole prompt is read as plain text
            else:
                end = pos
                while end < len(text) and text[end] not in "\\[]():|":
                    end += 1
                items.append(text[pos:end])
                pos = end
        return items, pos

    def _round(self, pos: int) -> tuple[list[Any], int]:
        """`(prompt)` or `(prompt:weight)`: emphasis, kept as text around what it holds."""
        inner, pos = self._sequence(pos, "):")
        out = ["(", *inner]
        if pos < len(self.text) and self.text[pos] == ":":
            weight, pos = self._sequence(pos + 1, ")")
            out += [":", *weight]
        if pos >= len(self.text):
            raise _Unreadable
        return [*out, ")"], pos + 1

    def _square(self, pos: int) -> tuple[Any, int]:
        """`[prompt]` (emphasis), `[a|b|...]` (alternation) or `[from:to:when]` / `[to:when]` (editing)."""
        parts, separators = [], []
        while True:
            part, pos = self._sequence(pos, "]:|")
            parts.append(part)
            if pos >= len(self.text):
                raise _Unreadable
            if self.text[pos] == "]":
                break
            separators.append(self.text[pos])
            pos += 1
        pos += 1
        if not separators:
            return ["[", *parts[0], "]"], pos
        if set(separators) == {"|"}:
            return _Alternate(parts), pos
        last = parts[-1]
        number = _NUMBER.fullmatch(last[0]) if len(last) == 1 and isinstance(last[0], str) else None
        if set(separators) != {":"} or len(separators) > 2 or number is None:
            raise _Unreadable
        return _Scheduled(parts[0] if len(parts) == 3 else [], parts[-2], number.group(1)), pos


def schedule(prompt: str, steps: int, first_pass_steps: int | None = None) -> list[tuple[int, str]]:
    """A1111's prompt schedule for a pass of `steps` steps: [(last step, prompt)], in order, the last ending at
    `steps`. Step s of the pass (0-based) uses the first prompt whose last step is >= s. For a hires pass,
    `first_pass_steps` is the first pass's: a step number counts from the first pass's start, and a fraction
    over 1 reaches into this pass (`1.5` is its middle)."""
    try:
        tree = _ScheduleParser(prompt).parse()
    except _Unreadable:
        return [(steps, prompt)]
    int_offset, float_offset = (0, 0.0) if first_pass_steps is None else (first_pass_steps, 1.0)
    ends = {steps}

    def when(node: _Scheduled) -> int:
        v = float(node.number)
        v = (v - float_offset) * steps if "." in node.number else v - int_offset
        return min(steps, int(v))

    def collect(items: list[Any]) -> None:
        for item in items:
            if isinstance(item, _Scheduled):
                if when(item) >= 1:
                    ends.add(when(item))
                collect(item.before)
                collect(item.after)
            elif isinstance(item, _Alternate):
                ends.update(range(1, steps + 1))
                for option in item.options:
                    collect(option)

    def at(step: int, items: list[Any]) -> str:
        out = []
        for item in items:
            if isinstance(item, _Scheduled):
                out.append(at(step, item.before if step <= when(item) else item.after))
            elif isinstance(item, _Alternate):
                out.append(at(step, item.options[(step - 1) % len(item.options)]))
            else:
                out.append(item)
        return "".join(out)

    collect(tree)
    return [(end, at(end, tree)) for end in sorted(ends)]


def prompt_at(entries: Sequence[tuple[int, str]], step: int) -> str:
    """The prompt a schedule uses at 0-based step `step` (the last one's after its end)."""
    return next((text for end, text in entries if step <= end), entries[-1][1])


class PromptEncoder:
    """Encodes prompts for one CLIP text encoder and its tokenizer, A1111's way (see the module doc).
    `expand` rewrites a text before tokenizing: diffusers' `maybe_convert_prompt`, which spells a
    multi-vector textual-inversion token as its n tokens."""

    def __init__(self, tokenizer, text_encoder, expand: Callable[[str], str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.expand = expand
        comma = tokenizer.convert_tokens_to_ids(",</w>")
        self.comma = None if comma == tokenizer.unk_token_id else comma
        self.start, self.end = tokenizer.bos_token_id, tokenizer.eos_token_id
        pad = tokenizer.pad_token_id
        self.pad = pad if pad is not None else self.end

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        if self.expand is not None:
            texts = [self.expand(t) for t in texts]
        return self.tokenizer(texts, truncation=False, add_special_tokens=False)["input_ids"]

    def chunks(self, prompt: str) -> list[Chunk]:
        return chunk(parse_attention(prompt), self._tokenize, self.comma, self.start, self.end, self.pad)

    def empty_chunk(self) -> Chunk:
        return Chunk([self.start] + [self.end] * (CHUNK + 1) if self.pad == self.end
                     else [self.start, self.end] + [self.pad] * CHUNK, [1.0] * (CHUNK + 2))

    def encode(self, prompts: Sequence[str], clip_skip: int = 1, layer: int | None = None,
               final_norm: bool = True) -> tuple[Any, Any]:
        """(B, 77 * chunks, width) conditioning and (B, projection) pooled output of the first chunk.

        `clip_skip` 1 is the last layer; n takes the hidden state n-1 layers earlier (through the final layer
        norm when `final_norm`). `layer` instead names a hidden state outright (SDXL reads the penultimate)."""
        import torch

        per_prompt = {p: self.chunks(p) for p in dict.fromkeys(prompts)}
        count = max(len(c) for c in per_prompt.values())
        device = self.text_encoder.device
        columns, pooled = [], None
        for i in range(count):
            rows = [per_prompt[p][i] if i < len(per_prompt[p]) else self.empty_chunk() for p in prompts]
            zs, pools = [], []
            # At most ENCODE_ROWS rows through the encoder at a time: its hidden states (every layer's, for clip
            # skip) stay bounded however many prompts a batch's schedules hold.
            for start in range(0, len(rows), ENCODE_ROWS):
                part = rows[start:start + ENCODE_ROWS]
                out = self.text_encoder(torch.tensor([r.tokens for r in part], device=device),
                                        output_hidden_states=True)
                if layer is not None:
                    z = out.hidden_states[layer]
                elif clip_skip > 1:
                    z = out.hidden_states[-clip_skip]
                else:
                    z = out[0]
                if final_norm and (layer is not None or clip_skip > 1):
                    # transformers 5 keeps the layer norm on the model itself; 4.x under `text_model`
                    z = getattr(self.text_encoder, "text_model", self.text_encoder).final_layer_norm(z)
                weights = torch.tensor([r.weights for r in part], device=device, dtype=z.dtype)
                zs.append(_emphasise(z, weights))
                if i == 0:
                    pool = getattr(out, "text_embeds", None)
                    pools.append(out[1] if pool is None else pool)
            columns.append(torch.cat(zs))
            if i == 0:
                pooled = torch.cat(pools)
        return torch.cat(columns, dim=1), pooled


def _emphasise(z, weights):
    """A1111's "Original" emphasis, per prompt: scale each token's vector by its weight, then rescale the
    chunk so its mean is what it was. A row whose weights are all 1 is left exactly as it was (as is one whose
    weighted mean is 0, which has no scale to restore)."""
    import torch

    before = z.mean(dim=(1, 2), keepdim=True)
    weighted = z * weights.unsqueeze(-1)
    after = weighted.mean(dim=(1, 2), keepdim=True)
    plain = (weights == 1).all(dim=1).view(-1, 1, 1) | (after == 0)
    return torch.where(plain, z, weighted * (before / torch.where(after == 0, 1, after)))


def conditioning(pipe, prompts: Sequence[str], negatives: Sequence[str], clip_skip: int = 1) -> dict[str, Any]:
    """The pipeline's text inputs for a batch, encoded as A1111 encodes them: `prompt_embeds` and
    `negative_prompt_embeds` (plus the pooled embeddings for SDXL), every row as long as the longest.

    SD 1.x/2.x: one CLIP encoder, clip skip as A1111 applies it. SDXL: both encoders read the penultimate
    layer (A1111's default; clip skip does not apply) and are concatenated, the pooled embedding comes from the
    second's first chunk, and an empty negative prompt is all zeros when the model says so
    (`force_zeros_for_empty_prompt`), as A1111 and diffusers both do."""
    import torch

    texts = [*prompts, *negatives]
    n = len(prompts)

    def encoder(tokenizer, text_encoder) -> PromptEncoder:
        convert = getattr(pipe, "maybe_convert_prompt", None)
        return PromptEncoder(tokenizer, text_encoder, (lambda t: convert(t, tokenizer)) if convert else None)

    if getattr(pipe, "text_encoder_2", None) is None:
        z, _ = encoder(pipe.tokenizer, pipe.text_encoder).encode(texts, clip_skip)
        return {"prompt_embeds": z[:n], "negative_prompt_embeds": z[n:]}
    parts, pooled = [], None
    for tokenizer, text_encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        if text_encoder is not None:
            z, pooled = encoder(tokenizer, text_encoder).encode(texts, layer=-2, final_norm=False)
            parts.append(z)
    z = torch.cat(parts, dim=-1)
    if getattr(pipe.config, "force_zeros_for_empty_prompt", False):
        empty = torch.tensor([t == "" for t in texts], device=z.device)
        empty[:n] = False
        z = torch.where(empty[:, None, None], torch.zeros_like(z), z)
        pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
    return {"prompt_embeds": z[:n], "negative_prompt_embeds": z[n:],
            "pooled_prompt_embeds": pooled[:n], "negative_pooled_prompt_embeds": pooled[n:]}


class ScheduledConditioning:
    """A batch's text conditioning as a function of the step: each row's prompt and negative prompt read as
    A1111's prompt schedules (`schedule`) for a pass of `steps`, every distinct prompt encoded once, and the
    pipeline's text inputs gathered per row for any step. Rows with different schedules share the pass; a
    batch whose prompts never change is `constant` (the pipeline needs no callback to swap them)."""

    def __init__(self, pipe, prompts: Sequence[str], negatives: Sequence[str], clip_skip: int, steps: int,
                 first_pass_steps: int | None = None) -> None:
        self.positive = [schedule(p, steps, first_pass_steps) for p in prompts]
        self.negative = [schedule(n, steps, first_pass_steps) for n in negatives]
        # The steps after which some row's prompt changes: the ends of every schedule entry but each last one.
        self.changes = sorted({end for s in (*self.positive, *self.negative) for end, _ in s[:-1]})
        self.constant = not self.changes
        texts = list(dict.fromkeys(t for s in self.positive for _, t in s))
        negative_texts = list(dict.fromkeys(t for s in self.negative for _, t in s))
        self._index = {t: i for i, t in enumerate(texts)}
        self._negative_index = {t: i for i, t in enumerate(negative_texts)}
        self._encoded = conditioning(pipe, texts, negative_texts, clip_skip)
        # The loop's tensors `step_inputs` replaces, for `callback_on_step_end_tensor_inputs`.
        self.swapped: tuple[str, ...] = () if self.constant else (
            ("prompt_embeds", "add_text_embeds") if "pooled_prompt_embeds" in self._encoded else ("prompt_embeds",))

    def changes_between(self, step: int, later: int) -> bool:
        """Whether any row reads another prompt at step `later` than at `step`."""
        i = bisect.bisect_left(self.changes, step)
        return i < len(self.changes) and self.changes[i] < later

    def texts(self, step: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Each row's (prompts, negative prompts) at 0-based step `step` of the pass."""
        return (tuple(prompt_at(s, step) for s in self.positive), tuple(prompt_at(s, step) for s in self.negative))

    def at(self, step: int) -> dict[str, Any]:
        """The pipeline's text inputs (`conditioning`'s keys) for step `step`, one row per image."""
        import torch

        prompts, negatives = self.texts(step)
        rows = torch.tensor([self._index[t] for t in prompts])
        negative_rows = torch.tensor([self._negative_index[t] for t in negatives])
        return {key: value[negative_rows.to(value.device) if key.startswith("negative") else rows.to(value.device)]
                for key, value in self._encoded.items()}

    def step_inputs(self, pipeline: Any, step: int) -> dict[str, Any]:
        """The tensors a diffusers pipeline's denoising loop reads its text from, for `step`: `prompt_embeds`
        (the negative rows first under classifier-free guidance, as the pipelines concatenate them) and SDXL's
        pooled `add_text_embeds`. For `callback_on_step_end`, named in `callback_on_step_end_tensor_inputs`."""
        import torch

        inputs = self.at(step)
        guided = pipeline.do_classifier_free_guidance

        def joined(negative: str, positive: str) -> Any:
            return torch.cat([inputs[negative], inputs[positive]]) if guided else inputs[positive]

        out = {"prompt_embeds": joined("negative_prompt_embeds", "prompt_embeds")}
        if "pooled_prompt_embeds" in inputs:
            out["add_text_embeds"] = joined("negative_pooled_prompt_embeds", "pooled_prompt_embeds")
        return out
