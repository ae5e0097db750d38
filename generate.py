"""Generation: greedy decoding and beam search with a KV cache, token-identical to transformers'
`generate(do_sample=False, num_beams=...)`.

  - `generate(model, input_ids, ...)`: a decoder-only model (LLaMA), prompts batched with left
    padding;
  - `generate_seq2seq(model, input_ids, ...)`: an encoder-decoder model (BART, mBART), with the
    checkpoint's generation settings (generation_config.json) as defaults.
Both run one loop, `decode_loop`, over a model given as a step function, and one implementation
of transformers' logits rules (min_length, no_repeat_ngram_size, forced BOS/EOS), `constrain`;
a step's LM head is `head_logits`.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def constrain(scores, seqs, *, eos_id=None, min_length=0, no_repeat_ngram_size=0, forced_bos_id=None,
              forced_eos_id=None, max_length=None):
    """transformers' logits processors, in its order, for the token after seqs (N, L):
    no_repeat_ngram_size (a token that would repeat an n-gram of seqs gets -inf), min_length (no
    EOS while L < min_length), forced BOS (only forced_bos_id when L == 1) and forced EOS (only
    forced_eos_id when L == max_length - 1). scores (N, V) -> scores."""
    N, V = scores.shape
    L = seqs.shape[1]
    n = no_repeat_ngram_size
    if n and L >= n:
        windows = seqs.unfold(1, n, 1)                                        # (N, L - n + 1, n)
        seen = (windows[..., :-1] == seqs[:, L - n + 1:][:, None]).all(-1)  # n-grams starting with the last n-1 tokens
        banned = torch.zeros(N, V + 1, dtype=torch.bool, device=scores.device)
        banned.scatter_(1, torch.where(seen, windows[..., -1].clamp(max=V), V), True)
        scores = scores.masked_fill(banned[:, :V], float("-inf"))
    if eos_id is not None and L < min_length:
        scores = scores.clone()
        scores[:, eos_id] = float("-inf")
    for token, at in ((forced_bos_id, 1), (forced_eos_id, None if max_length is None else max_length - 1)):
        if token is not None and L == at:
            scores = torch.full_like(scores, float("-inf"))
            scores[:, token] = 0
    return scores


def decode_loop(step, reorder, prompt, max_length, num_beams=1, eos_id=None, pad_id=None, length_penalty=1.0,
                early_stopping=False, **rules):
    """Greedy decoding (num_beams=1) or beam search over a model given as two functions, shared by
    decoder-only and encoder-decoder models.

    step(tokens (N, t)) -> fp32 logits (N, V) for the next token, the model keeping its own KV cache
    (t = prompt length on the first call, then 1); reorder(idx) reorders that cache (beam search).
    prompt (B, T): the tokens already there (LLaMA: the prompt; BART: the decoder start token).
    max_length counts them. `rules`: constrain()'s settings. Returns (B, T + generated).

    Beam search follows transformers (generation/utils.py `_beam_search`): each step takes the top
    2·num_beams continuations over all beams; those ending in EOS among the first num_beams become
    finished hypotheses scored logp / generated_length ** length_penalty; the best num_beams not
    ending in EOS keep running. A prompt is done when its best running beam, scored at the current
    length, cannot beat its worst finished hypothesis, or (early_stopping=True) as soon as it has
    num_beams finished hypotheses; everything stops at max_length.
    """
    B, T = prompt.shape
    K, device = num_beams, prompt.device
    if max_length <= T:
        raise ValueError(f"max_length={max_length} leaves no room after the {T} tokens already there")
    rules = dict(rules, eos_id=eos_id, max_length=max_length)
    if K == 1:                                                # greedy; finished rows get pad_id
        seqs, done, tokens = prompt, torch.zeros(B, dtype=torch.bool, device=device), prompt
        for _ in range(T, max_length):
            nxt = constrain(step(tokens), seqs, **rules).argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad_id if pad_id is not None else eos_id), nxt)
            seqs = torch.cat([seqs, nxt[:, None]], dim=1)
            if eos_id is not None:
                done = done | (nxt == eos_id)
                if bool(done.all()):
                    break
            tokens = nxt[:, None]
        return seqs

    fill = pad_id if pad_id else (eos_id if eos_id is not None else -1)     # as transformers fills
    running = torch.full((B, K, max_length), fill, dtype=torch.long, device=device)
    running[:, :, :T] = prompt[:, None]
    run_scores = torch.zeros(B, K, device=device)
    run_scores[:, 1:] = -1e9                        # all beams start equal: expand only the first
    finished = running.clone()
    fin_scores = torch.full((B, K), -1e9, device=device)
    fin_done = torch.zeros(B, K, dtype=torch.bool, device=device)
    fin_len = torch.zeros(B, K, dtype=torch.long, device=device)
    improvable = torch.ones(B, dtype=torch.bool, device=device)
    tokens = prompt.repeat_interleave(K, dim=0)
    batch = torch.arange(B, device=device)[:, None]

    for cur in range(T, max_length):
        logp = constrain(step(tokens).log_softmax(-1), running[:, :, :cur].reshape(B * K, cur), **rules)
        V = logp.shape[-1]
        cand = (logp.view(B, K, V) + run_scores[:, :, None]).view(B, K * V)
        top_scores, top_idx = cand.topk(2 * K, dim=-1)                             # (B, 2K)
        beam, tok = top_idx // V, top_idx % V
        cand_seqs = running[batch, beam]                                           # (B, 2K, max_length)
        cand_seqs[:, :, cur] = tok
        ends = (tok == eos_id) if eos_id is not None else torch.zeros_like(tok, dtype=torch.bool)
        if cur + 1 >= max_length:
            ends = torch.ones_like(ends)                                           # max length reached

        # Running beams for the next step: the best K candidates that did not end.
        keep = (top_scores - 1e9 * ends.float()).topk(K, dim=-1).indices
        running = cand_seqs[batch, keep]
        run_scores = (top_scores - 1e9 * ends.float())[batch, keep]
        parent = beam[batch, keep]

        # Finished hypotheses: merge candidates that ended (among the first K) into the finished set.
        new_scores = top_scores / ((cur + 1 - T) ** length_penalty)
        full = fin_done.all(-1) & (early_stopping is True)
        ok = ends & (torch.arange(2 * K, device=device) < K)[None] & (improvable & ~full)[:, None]
        new_scores = new_scores - 1e9 * (~ok).float()
        all_scores = torch.cat([fin_scores, new_scores], dim=1)
        best = all_scores.topk(K, dim=-1).indices
        finished = torch.cat([finished, cand_seqs], dim=1)[batch, best]
        fin_done = torch.cat([fin_done, ok], dim=1)[batch, best]
        fin_len = torch.cat([fin_len, torch.full_like(tok, cur + 1 - T)], dim=1)[batch, best]
        fin_scores = all_scores[batch, best]

        # Can a running beam still beat the worst finished one?
        best_len = (max_length - T) if early_stopping == "never" and length_penalty > 0 else (cur + 1 - T)
        best_possible = run_scores[:, 0] / (best_len ** length_penalty)
        worst = torch.where(fin_done.all(-1), fin_scores.min(-1).values, torch.full_like(best_possible, -1e9))
        improvable = improvable & (best_possible > worst)
        stop = ~improvable.any() | ends.all()
        if early_stopping is True:
            stop = stop | fin_done.all()
        if bool(stop):                       # the one host-device sync of a step: is anything left to do?
            break
        reorder((parent + batch * K).view(-1))
        tokens = running[:, :, cur].reshape(B * K, 1)

    out_len = T + int(fin_len[:, 0].max())
    return finished[:, 0, :out_len]


def head_logits(h, head, bias=None):
    """fp32 logits (N, V) of one decoding step's last hidden states h (N, d) (+ bias): `head` is the
    LM head module or its weight (V, d) (BART's, tied to the embedding), as in loss.lm_loss.

    On a CPU in fp32, a plain head's product over a few rows is one batched product over the
    weight's two row halves instead of F.linear: the same values up to rounding, and the head is
    the largest product of a step. Measured with bench.py --decoding (AMD EPYC, 2 threads, torch
    2.13 with MKL, a 32000x512 head): 1 row, F.linear 5335 µs, the row halves 946 µs; 4 rows, 9415
    vs 2555 µs. The decoding rows (32 tokens) with F.linear: greedy batch 1 0.43 s (transformers
    0.50), 4 beams 0.70 s (0.82); with the row halves 0.25 s (0.41) and 0.41 s (0.78). BLAS
    libraries differ on few-row products: on another machine, bench.py prints both timings.
    """
    if isinstance(head, nn.Module) and type(head) is not nn.Linear:    # a head that a PEFT method wrapped
        return head(h).float()
    weight, bias = (head, bias) if isinstance(head, torch.Tensor) else (head.weight, head.bias)
    (N, d), V = h.shape, weight.shape[0]
    if h.device.type != "cpu" or h.dtype != torch.float32 or N > 16 or V % 2:
        y = F.linear(h, weight)
    else:
        y = torch.bmm(weight.view(2, V // 2, d), h.t().expand(2, d, N))      # (2, V/2, N)
        y = y.permute(2, 0, 1).reshape(N, V)                                 # (N, V)
    return (y if bias is None else y + bias).float()


@torch.no_grad()
def generate(model, input_ids, attention_mask=None, max_new_tokens=32, num_beams=1, eos_id=None, pad_id=0,
             length_penalty=1.0, early_stopping=False, min_length=0, no_repeat_ngram_size=0):
    """Continue each prompt of a decoder-only model (LLaMA) with greedy decoding or beam search.

    input_ids (B, T), left-padded when prompts differ in length, with attention_mask (B, T) marking
    real tokens. Returns (B, T + generated) token ids, prompts included, like transformers'
    `generate(do_sample=False, num_beams=...)`: finished greedy rows are filled with `pad_id`, and
    beam search returns the best finished hypothesis per prompt (see decode_loop).
    """
    model.eval()
    B, T = input_ids.shape
    K = num_beams
    # Without padding the model needs no mask at all (its fastest path). Checked once per call, not
    # at every step (reading a GPU tensor's values waits for the GPU).
    padded = attention_mask is not None and not bool(attention_mask.all())
    state = {"mask": attention_mask if padded else None}
    # The K beams of a prompt start identical, so the prompt goes through the model once (B rows,
    # not B·K as transformers does) and its cache is then copied to the K beams.
    cache = model.new_cache(B, T + max_new_tokens)

    def step(tokens):
        first = cache.length == 0
        if first:
            tokens = tokens[::K]                          # (B, T): each prompt once
        elif padded:                                      # one new real token per row
            state["mask"] = F.pad(state["mask"], (0, 1), value=1)
        h = model(tokens, attention_mask=state["mask"], cache=cache, return_hidden=True)
        logits = head_logits(h[:, -1], model.lm_head)     # the LM head on the last position only
        if first and K > 1:                               # (B, ...) -> (B·K, ...): beams of prompt b at b·K ...
            beams = torch.arange(B, device=tokens.device).repeat_interleave(K)
            cache.reorder(beams)
            state["mask"] = None if not padded else state["mask"][beams]
            logits = logits[beams]
        return logits

    def reorder(idx):           # beams only ever take a beam of their own prompt: the T prompt slots stay
        cache.reorder(idx, start=T)

    return decode_loop(step, reorder, input_ids, T + max_new_tokens, K, eos_id, pad_id, length_penalty,
                       early_stopping, min_length=min_length, no_repeat_ngram_size=no_repeat_ngram_size)


@torch.no_grad()
def generate_seq2seq(model, input_ids, attention_mask=None, **settings):
    """Generate target sequences with an encoder-decoder model (BART, mBART), token-identical to
    transformers' `generate`. input_ids (B, S) right-padded sources with attention_mask.

    settings (each defaults to the checkpoint's generation config, model.cfg.generation, then to
    transformers' defaults): num_beams (1), max_length (20, counting the decoder start token),
    min_length (0), length_penalty (1.0), no_repeat_ngram_size (0), early_stopping (False),
    decoder_start_token_id, forced_bos_token_id (mBART-50: the target language code),
    forced_eos_token_id, eos_token_id, pad_token_id.
    Returns (B, L) decoder tokens starting with the decoder start token.
    """
    known = ("num_beams", "max_length", "min_length", "length_penalty", "no_repeat_ngram_size", "early_stopping",
             "decoder_start_token_id", "forced_bos_token_id", "forced_eos_token_id", "eos_token_id", "pad_token_id")
    unknown = set(settings) - set(known)
    if unknown:
        raise ValueError(f"unknown generation settings {sorted(unknown)}; valid: {', '.join(known)}")
    g = dict(num_beams=1, max_length=20, min_length=0, length_penalty=1.0, no_repeat_ngram_size=0,
             early_stopping=False, eos_token_id=model.cfg.eos_id, pad_token_id=model.cfg.pad_id)
    g.update(model.cfg.generation or {})
    g.update({k: v for k, v in settings.items() if v is not None})
    start = g.get("decoder_start_token_id", g.get("bos_token_id"))
    if start is None:
        raise ValueError("no decoder_start_token_id in the settings or the checkpoint's generation config")
    model.eval()
    B, K = input_ids.shape[0], g["num_beams"]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    enc = model.encode(input_ids, attention_mask).repeat_interleave(K, dim=0)   # (B·K, S, dim)
    enc_kv = model.cross_kv(enc)     # beams of one source share it: reordering beams never moves it
    enc_mask = attention_mask.repeat_interleave(K, dim=0)
    cache = model.new_cache(B * K, g["max_length"])

    def step(tokens):
        h = model.decode(tokens, enc_kv, enc_mask, cache, return_hidden=True)
        return head_logits(h[:, -1], model.shared.weight, model.final_logits_bias)   # the tied LM head

    prompt = torch.full((B, 1), start, dtype=torch.long, device=input_ids.device)
    return decode_loop(step, cache.reorder, prompt, g["max_length"], K, g["eos_token_id"], g["pad_token_id"],
                       g["length_penalty"], g["early_stopping"], min_length=g["min_length"],
                       no_repeat_ngram_size=g["no_repeat_ngram_size"],
                       forced_bos_id=g.get("forced_bos_token_id"), forced_eos_id=g.get("forced_eos_token_id"))
